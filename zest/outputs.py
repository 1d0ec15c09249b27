"""Output paths checked before any work, what a path already holds, and folders written whole.

A command that would fail to write its result after minutes of work fails at once instead, with
one line that names the path and the fix (:func:`check_output_file`, :func:`check_output_dir`).
No command overwrites a file of another kind: :func:`path_kind` tells what a path holds (a zest
predictor, delta, record file, run folder, ranking table, report, plot, a model folder, or
something zest did not write), and every ``--out`` check (``kind=``) refuses a path that holds
anything but the kind the command writes. A fine-tuning run folder is written whole or not at all
(:func:`staged_folder`). README: "What is atomic, what resumes, what is refused".
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

from zest.errors import InvalidInputError

#: What a path can hold, as :func:`path_kind` names it, and how messages describe it.
KINDS: dict[str, str] = {
    "empty-file": "an empty file",
    "empty-folder": "an empty folder",
    "run-folder": "a zest fine-tuning run folder",
    "model-folder": "a model folder",
    "folder": "a folder with files zest did not write",
    "predictor": "a zest predictor",
    "delta": "a zest delta",
    "delta-sidecar": "the .json sidecar of a zest delta",
    "merged-weights": "merged weights written by zest apply-delta",
    "weights": "safetensors weights zest did not write",
    "metrics-records": "a zest metric record file",
    "groundtruth-records": "a zest ground-truth record file",
    "ranking": "a zest ranking table",
    "evaluation": "zest evaluation results",
    "report": "a zest evaluation report",
    "plot": "a plot",
    "file": "a file zest did not write",
}

#: The marker ``zest finetune`` writes under the ``"zest"`` key of a run's ``config.json``.
RUN_MARKER: dict[str, Any] = {"kind": "finetune-run", "format_version": 1}
#: The files of a run folder (:func:`zest.pipeline.run_finetune`).
RUN_FILES = ("config.json", "metrics.json", "delta.safetensors", "delta.json", "curve.png")
#: The keys of a run's ``config.json`` written before the marker: such folders are runs too.
_LEGACY_RUN_KEYS = {"model", "dataset", "method", "layers_spec", "layers", "epochs", "lr",
                    "batch_size", "seed", "method_options"}
#: Files that make a folder a model folder (transformers, timm, torch, ONNX, GGUF).
_MODEL_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".gguf", ".h5",
                   ".msgpack")
_READ_LIMIT = 256 * 2**20  # larger files are not parsed: "a file zest did not write"


def _writable_folder(folder: Path, parameter: str, path: Path) -> None:
    for parent in [folder, *folder.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise InvalidInputError(f"{parameter} {str(path)!r} cannot be written: "
                                        f"{str(parent)!r} is a file, not a folder",
                                        parameter=parameter)
            if not os.access(parent, os.W_OK | os.X_OK):
                raise InvalidInputError(f"{parameter} {str(path)!r} cannot be written: "
                                        f"{str(parent)!r} is not writable",
                                        parameter=parameter)
            return


def check_output_file(path: str | os.PathLike, parameter: str = "out",
                      suffixes: Sequence[str] | None = None, kind: str | None = None) -> Path:
    """Validates a file that a command will write: the right suffix, not a folder, its folder
    creatable and writable, the file itself writable when it exists and, with ``kind`` (a key of
    :data:`KINDS`), holding nothing but a file of that kind (:func:`check_replaceable`)."""
    path = Path(path)
    if suffixes and path.suffix not in suffixes:
        raise InvalidInputError(f"{parameter} {str(path)!r} must end in {' or '.join(suffixes)}",
        parameter=parameter)
    if path.is_dir():
        raise InvalidInputError(f"{parameter} {str(path)!r} is a folder; pass a file path",
        parameter=parameter)
    _writable_folder(path.parent if str(path.parent) else Path("."), parameter, path)
    if path.exists() and not os.access(path, os.W_OK):
        raise InvalidInputError(f"{parameter} {str(path)!r} exists and is not writable",
        parameter=parameter)
    if kind is not None:
        check_replaceable(path, parameter, kind)
    return path


def check_output_dir(path: str | os.PathLike, parameter: str = "out_dir") -> Path:
    """Validates a folder that a command will create or fill: not a file, creatable, writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InvalidInputError(f"{parameter} {str(path)!r} is a file; pass a folder",
        parameter=parameter)
    _writable_folder(path, parameter, path)
    return path


def check_replaceable(path: str | os.PathLike, parameter: str, kind: str) -> None:
    """Refuses ``path`` when it holds anything but nothing, an empty file or a ``kind`` file:
    zest replaces only what it wrote of the kind the command writes."""
    found = path_kind(path)
    if found in (None, "empty-file", kind):
        return
    raise InvalidInputError(f"{parameter} {str(path)!r} holds {KINDS[found]}, not {KINDS[kind]}; "
                            f"zest replaces only a file of the kind it writes: choose another "
                            f"{parameter}",
                            parameter=parameter)


def check_run_folder(path: str | os.PathLike, parameter: str = "out",
                     overwrite: bool = False) -> Path:
    """Validates a run folder that ``zest finetune`` will write (:func:`staged_folder`): a new or
    empty folder whose parent can take a temporary folder beside it, or, with ``overwrite``, an
    existing zest run folder, replaced whole. Anything else (a model folder, a folder with other
    files, a file) is refused."""
    path = check_output_dir(path, parameter)
    if path.name in ("", ".", ".."):
        raise InvalidInputError(f"{parameter} {str(path)!r} names no folder of its own (the run is "
                                "renamed into place at the end); pass a path like runs/r1",
                                parameter=parameter)
    parent = path.parent if str(path.parent) else Path(".")
    _writable_folder(parent, parameter, path)
    found = path_kind(path)
    if found in (None, "empty-folder"):
        return path
    if found == "run-folder":
        if overwrite:
            return path
        raise InvalidInputError(f"{parameter} {str(path)!r} is already a zest run folder; "
                                "pass overwrite=True to replace it whole, or choose another "
                                + parameter,
                                parameter=(parameter, "overwrite"))
    others = sorted(p.name for p in path.iterdir() if p.name not in RUN_FILES)[:3]
    listed = f" ({', '.join(others)}{', ...' if len(others) == 3 else ''})" if others else ""
    raise InvalidInputError(f"{parameter} {str(path)!r} holds {KINDS[found]}{listed}; zest "
                            "writes a run only into a new or empty folder or over its own run "
                            f"folder: choose another {parameter}",
                            parameter=parameter)


@contextlib.contextmanager
def staged_folder(path: str | os.PathLike, replaces: Collection[str] = ()) -> Iterator[Path]:
    """A folder written whole or not at all: yields a temporary folder beside ``path`` (same
    parent, ``.<name>.tmp-<pid>-*``); when the block ends normally it takes ``path``'s place
    (``os.replace`` for a new or empty folder; an existing folder of a kind in ``replaces`` is
    renamed aside, the new one renamed in, the old one deleted). When the block raises anything
    (an error, a non-finite loss, Ctrl-C), the temporary folder and any parent folder made for
    it are removed and ``path`` is left exactly as it was."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    made = _make_parents(parent)
    staging = None
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=parent))
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes 0700 folders
        yield staging
        _move_into_place(staging, path, replaces)
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        for folder in made:  # deepest first; only if still empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


@contextlib.contextmanager
def staged_file(path: str | os.PathLike) -> Iterator[Path]:
    """A file written whole or not at all: yields a temporary path beside ``path`` (same
    folder, same suffix, so writers that go by the suffix still work) that takes ``path``'s place
    with ``os.replace`` when the block ends normally; on any failure it is removed and
    ``path`` is left as it was. The folder is created when missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.tmp-{os.getpid()}-", suffix=path.suffix,
                                dir=path.parent)
    os.close(fd)
    staging = Path(name)
    try:
        yield staging
        os.chmod(staging, 0o666 & ~_umask())  # mkstemp makes 0600 files
        os.replace(staging, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            staging.unlink()


def _make_parents(folder: Path) -> list[Path]:
    """Creates ``folder`` and its missing parents; returns those it made, deepest first."""
    missing = []
    for candidate in [folder, *folder.parents]:
        if candidate.exists():
            break
        missing.append(candidate)
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _move_into_place(staging: Path, path: Path, replaces: Collection[str]) -> None:
    found = path_kind(path)
    if found in (None, "empty-folder"):
        os.replace(staging, path)  # atomic; an empty folder is replaced by the rename itself
        return
    if found not in replaces:  # changed while the run was training
        raise InvalidInputError(f"out {str(path)!r} now holds {KINDS[found]}, written while "
                                "this one was being made; nothing replaced: choose another out",
                                parameter="out")
    aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-{os.getpid()}-", dir=path.parent))
    os.rmdir(aside)  # a free name beside path
    os.replace(path, aside)
    try:
        os.replace(staging, path)
    except BaseException:
        os.replace(aside, path)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- what a path holds ---------------------------------------------------------------------------
def path_kind(path: str | os.PathLike) -> str | None:
    """What ``path`` holds, as a key of :data:`KINDS` (``None`` when nothing is there).

    Files are told by their content, not their name: a zest predictor or delta sidecar by its
    ``format``, record files by their parquet metadata (:func:`zest.records.record_kind`), a
    delta by its sidecar, merged weights by their safetensors metadata, ranking tables,
    evaluation results and reports by their columns, keys and title, plots by the
    ``Matplotlib`` stamp matplotlib writes. Folders: a run folder holds only :data:`RUN_FILES`
    and a ``config.json`` with :data:`RUN_MARKER` (or the keys runs had before it); a folder
    with a ``config.json`` or weights files is a model folder.
    """
    path = Path(path)
    if path.is_dir():
        return _folder_kind(path)
    if not path.exists():
        return None
    try:
        size = path.stat().st_size
        if size == 0:
            return "empty-file"
        with open(path, "rb") as handle:
            head = handle.read(8)
    except OSError:
        return "file"
    if head[:4] == b"PAR1":
        from zest.records import record_kind

        found = record_kind(path)
        return f"{found}-records" if found in ("metrics", "groundtruth") else "file"
    found = _safetensors_kind(path, head, size)
    if found is not None:
        return found
    if size > _READ_LIMIT:
        return "file"
    data = path.read_bytes()
    return _json_kind(data) or _text_kind(data) or _plot_kind(data) or "file"


def is_run_config(config: Any) -> bool:
    """Whether a parsed ``config.json`` is a zest run's: it carries :data:`RUN_MARKER`'s kind
    or every key runs wrote before the marker."""
    if not isinstance(config, dict):
        return False
    marker = config.get("zest")
    if isinstance(marker, dict):
        return marker.get("kind") == RUN_MARKER["kind"]
    return set(config) >= _LEGACY_RUN_KEYS


def _folder_kind(path: Path) -> str:
    try:
        entries = list(path.iterdir())
    except OSError:
        return "folder"
    if not entries:
        return "empty-folder"
    config = path / "config.json"
    run_config = False
    if config.is_file():
        with contextlib.suppress(OSError, ValueError):
            run_config = is_run_config(json.loads(config.read_text()))
    if run_config:
        return "run-folder" if all(e.name in RUN_FILES for e in entries) else "folder"
    if config.is_file() or any(e.suffix in _MODEL_SUFFIXES for e in entries):
        return "model-folder"
    return "folder"


def _safetensors_kind(path: Path, head: bytes, size: int) -> str | None:
    """Reads only the header (an 8-byte little-endian length, then JSON), so that large weight
    files are told apart too."""
    if len(head) < 8:
        return None
    (length,) = struct.unpack("<Q", head[:8])
    if not 2 <= length <= min(size - 8, _READ_LIMIT):
        return None
    try:
        with open(path, "rb") as handle:
            handle.seek(8)
            raw = handle.read(length)
        header = json.loads(raw) if raw[:1] == b"{" else None
    except (OSError, ValueError):
        return None
    if not isinstance(header, dict):
        return None
    meta = header.get("__metadata__") or {}
    if isinstance(meta, dict) and "zest_delta" in meta:
        return "merged-weights"
    from zest.finetune.delta import sidecar_path

    sidecar = sidecar_path(path)
    if sidecar != path and sidecar.is_file() and path_kind(sidecar) == "delta-sidecar":
        return "delta"
    return "weights"


def _json_kind(data: bytes) -> str | None:
    if data.lstrip()[:1] not in (b"{", b"["):
        return None
    try:
        value = json.loads(data)
    except ValueError:
        return None
    if isinstance(value, dict):
        if value.get("format") == "zest-predictor":
            return "predictor"
        if value.get("format") == "zest-delta":
            return "delta-sidecar"
        if {"target", "predictor", "summary", "per_group"} <= set(value):
            return "evaluation"
        return None
    if (isinstance(value, list) and value and isinstance(value[0], dict)
            and {"rank", "layer"} <= set(value[0])):
        return "ranking"
    return None


def _text_kind(data: bytes) -> str | None:
    first = data[:4096].split(b"\n", 1)[0].strip()
    if first.split(b",")[:2] == [b"rank", b"layer"]:
        return "ranking"
    if first.startswith((b"# Evaluation of ", b"# Predictor evaluation")):
        return "report"
    return None


def _plot_kind(data: bytes) -> str | None:
    image = data.startswith((b"\x89PNG", b"%PDF")) or b"<svg" in data[:4096]
    return "plot" if image and b"matplotlib" in data.lower() else None

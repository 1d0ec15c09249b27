"""The cache of what metrics compute from the weights alone (singular values, σ_max, ‖W‖,
std(W): :data:`zest.probe.context.WEIGHT_MEMOS`), keyed by the model's weights fingerprint
(:func:`zest.fingerprint.model_fingerprint`) and the layer name.

Those values do not depend on the data, so a second ``zest rank`` of the same weights (another
minibatch, another data set, another process) reuses them; any change of any weight changes
the fingerprint. Kept in process for the last :data:`MODELS_KEPT` fingerprints and on disk
under ``zest.models.cache_dir()/weight_memos`` (one small file per fingerprint, written
atomically; an unreadable or unwritable cache is skipped, never an error).
"""

from __future__ import annotations

import os
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from zest.models import cache_dir
from zest.probe.context import WEIGHT_MEMOS, LayerContext

#: Fingerprints whose memos stay in process (least recently used dropped first).
MODELS_KEPT = 4
#: Part of the file name: bump it when a memoised quantity is computed differently.
FORMAT_VERSION = 1

_memos: OrderedDict[str, dict[str, dict[str, Any]]] = OrderedDict()


def memo_path(fingerprint: str) -> Path:
    """The file on disk that holds the memos of the weights with ``fingerprint``."""
    return cache_dir() / "weight_memos" / f"{fingerprint}.v{FORMAT_VERSION}.pt"


def _memos_of(fingerprint: str) -> dict[str, dict[str, Any]]:
    if fingerprint not in _memos:
        try:
            loaded = torch.load(memo_path(fingerprint), weights_only=True)
        except Exception:  # noqa: BLE001 - missing, unreadable or corrupt: start afresh
            loaded = {}
        _memos[fingerprint] = loaded if _well_formed(loaded) else {}
    _memos.move_to_end(fingerprint)
    while len(_memos) > MODELS_KEPT:
        _memos.popitem(last=False)
    return _memos[fingerprint]


def _well_formed(memos: Any) -> bool:
    """Whether a cache file holds what :func:`remember` writes: per layer name, memo names of
    :data:`WEIGHT_MEMOS` with a 1-D floating tensor (``singular_values``) or a float each. A
    file of any other shape (edited, or written by other code) is a miss: recomputed and
    rewritten, never an error."""
    if not isinstance(memos, dict):
        return False
    for layer, values in memos.items():
        if not isinstance(layer, str) or not isinstance(values, dict):
            return False
        for key, value in values.items():
            if key not in WEIGHT_MEMOS:
                return False
            if key == "singular_values":
                if not (isinstance(value, torch.Tensor) and value.ndim == 1
                        and value.is_floating_point()):
                    return False
            elif not isinstance(value, float):
                return False
    return True


def recall(fingerprint: str, contexts: dict[str, LayerContext]) -> None:
    """Puts the remembered weight memos of ``fingerprint`` into the contexts' caches."""
    memos = _memos_of(fingerprint)
    for name, ctx in contexts.items():
        for key, value in memos.get(name, {}).items():
            ctx.cache.setdefault(key, value)


def remember(fingerprint: str, contexts: dict[str, LayerContext]) -> None:
    """Keeps the contexts' weight memos under ``fingerprint`` (in process, and on disk when
    any is new)."""
    memos = _memos_of(fingerprint)
    new = False
    for name, ctx in contexts.items():
        known = memos.setdefault(name, {})
        for key in WEIGHT_MEMOS & ctx.cache.keys() - known.keys():
            value = ctx.cache[key]
            known[key] = value.detach().cpu() if isinstance(value, torch.Tensor) else value
            new = True
    if new:
        _write(memo_path(fingerprint), memos)


def clear() -> None:
    """Forgets the in-process memos (the files on disk stay)."""
    _memos.clear()


def forget(fingerprint: str) -> None:
    """Forgets the memos of one fingerprint, in process and on disk (e.g. to time a first
    ``zest rank`` of a model)."""
    _memos.pop(fingerprint, None)
    memo_path(fingerprint).unlink(missing_ok=True)


def _write(path: Path, memos: dict[str, dict[str, Any]]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as file:
                torch.save(memos, file)
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
    except OSError:
        pass  # a cache that cannot be written is no error

"""The predictor file: one JSON file, never pickle, stamped with the SHA-256 of its content and
checked completely before anything of it is used (ARCHITECTURE.md §5, "Predictor files").

:func:`write_predictor` and :func:`read_predictor` move the content to and from disk (atomic
write; format, version and checksum verified on reading); the ``check_*`` and ``*_list``
helpers validate the parts :meth:`zest.predictor.ZestRanker.from_dict` rebuilds a ranker from,
each fault a ``ValueError`` that it turns into one :class:`RecordError` line.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from zest.errors import InvalidInputError, RecordError
from zest.outputs import check_output_file
from zest.predictor_features import context_features
from zest.records import METRIC_PREFIX

FORMAT_VERSION = 1

#: The field of a saved predictor that holds the SHA-256 of the rest of the file.
CHECKSUM_KEY = "sha256"


def content_checksum(spec: dict[str, Any]) -> str:
    """SHA-256 of a predictor file's content without its checksum field: the canonical JSON
    (sorted keys, no spaces) of everything else, so any change of any value, the order of the
    features included, changes it."""
    content = {k: v for k, v in spec.items() if k != CHECKSUM_KEY}
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def check_format(spec: Any, source: str) -> None:
    """Raises :class:`RecordError` unless ``spec`` is a zest predictor of this format version."""
    if not isinstance(spec, dict) or spec.get("format") != "zest-predictor":
        raise RecordError(f"{source} is not a zest predictor file; train one with "
                          "`zest train-predictor`")
    version = spec.get("format_version")
    if version != FORMAT_VERSION:
        raise RecordError(f"{source} has predictor format version {version!r}, this zest "
                          f"reads {FORMAT_VERSION}; retrain it with `zest train-predictor`")


#: Ranker parameters added after format version 1 was first written: a file without them was
#: saved before they existed and loads with their defaults (the ranker it was).
LATER_PARAMS = ("prior_blend", "prior_metric", "unseen_modality_blend", "feature_fraction")


def check_predictor_out(path: str | os.PathLike) -> Path:
    """Fails early, before any training, when ``path`` cannot take a predictor file: a folder,
    an unwritable place, or an existing file that is not a zest predictor (never replaced;
    :func:`zest.outputs.path_kind`)."""
    return check_output_file(path, "out", kind="predictor")


def write_predictor(path: str | os.PathLike, content: dict[str, Any]) -> Path:
    """Writes a ranker's :meth:`~zest.predictor.ZestRanker.to_dict` to one JSON file
    (atomically: a temporary file, then ``os.replace``), stamped with the SHA-256 of its content
    (:func:`content_checksum`), which :func:`read_predictor` verifies; an existing file is
    replaced only if it is a zest predictor (:func:`check_predictor_out`)."""
    path = check_predictor_out(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    content = json.loads(json.dumps(content, default=_json_default))
    stamped = {key: content[key] for key in ("format", "format_version")}
    stamped[CHECKSUM_KEY] = content_checksum(content)
    stamped.update(content)
    text = json.dumps(stamped, indent=1)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_predictor(path: str | os.PathLike) -> tuple[dict[str, Any], str]:
    """The content of a file :func:`write_predictor` wrote, its checksum verified and removed,
    and the words naming the file in errors; a missing file, corrupt JSON, another format
    version or a checksum that does not match raise a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"predictor file {str(path)!r} does not exist")
    source = f"predictor file {str(path)!r}"
    try:
        spec = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise RecordError(f"{source} is corrupt (not valid JSON: "
                          f"{exc.__class__.__name__}); train it again with "
                          "`zest train-predictor`") from None
    check_format(spec, source)
    claimed = spec.pop(CHECKSUM_KEY, None)
    if not isinstance(claimed, str):
        raise RecordError(f"{source} has no {CHECKSUM_KEY} checksum (written before zest "
                          "verified its predictors, or edited); train it again with "
                          "`zest train-predictor`")
    if claimed != content_checksum(spec):
        raise RecordError(f"{source} is corrupt (its content does not match its "
                          f"{CHECKSUM_KEY} checksum: damaged or edited); train it again "
                          "with `zest train-predictor`")
    return spec, source


def checked_params(params: Any, defaults: dict[str, Any]) -> dict[str, Any]:
    """The ranker parameters of a file, each of its field's type in ``defaults`` (a fresh
    ranker's ``get_params()``: bool, int, finite float, string), the :data:`LATER_PARAMS` it
    lacks filled in; unknown or missing names and other types raise ``ValueError``."""
    if not isinstance(params, dict):
        raise ValueError("'params' is not an object")
    params = {**{name: defaults[name] for name in LATER_PARAMS if name not in params}, **params}
    if set(params) != set(defaults):
        odd = sorted(set(params) ^ set(defaults))
        raise ValueError(f"'params' names {odd[:4]} differ from a ZestRanker's")
    for name, default in defaults.items():
        value = params[name]
        if isinstance(default, bool):
            fits = isinstance(value, bool)
        elif isinstance(default, int):
            fits = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            fits = isinstance(value, int | float) and not isinstance(value, bool) and \
                math.isfinite(value)
        else:
            fits = isinstance(value, str)
        if not fits:
            raise ValueError(f"parameter {name} is {value!r}, not a {type(default).__name__}")
    return params


def name_list(value: Any, what: str, empty: bool = False) -> list[str]:
    """``value`` as a list of distinct non-empty names (empty only with ``empty``); else
    ``ValueError`` naming the field ``what``."""
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"'{what}' is not a list of names")
    if not value and not empty:
        raise ValueError(f"'{what}' is empty")
    if len(set(value)) != len(value):
        raise ValueError(f"'{what}' names one entry twice")
    return list(value)


def number_list(value: Any, what: str, length: int) -> list[float]:
    """``value`` as ``length`` finite floats; else ``ValueError`` naming the field ``what``."""
    if not isinstance(value, list) or len(value) != length or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            for v in value):
        raise ValueError(f"'{what}' is not a list of {length} finite numbers")
    return [float(v) for v in value]


def check_feature_order(metrics: list[str], features: list[str], *, use_context: bool,
                        use_modality: bool, use_roles: bool) -> None:
    """Features are the metrics, in order, then (with ``use_context``) context features in
    the order :func:`~zest.predictor_features.context_features` makes them with the ranker's
    ``use_modality`` and ``use_roles``; anything else was reordered or edited
    (``ValueError``)."""
    if not all(m.startswith(METRIC_PREFIX) for m in metrics):
        raise ValueError(f"a metric name lacks the {METRIC_PREFIX!r} prefix")
    if features[:len(metrics)] != metrics:
        raise ValueError("its features do not start with its metrics in order (reordered or "
                         "edited)")
    context = features[len(metrics):]
    if context and not use_context:
        raise ValueError("context features without use_context")
    one_layer = pd.DataFrame({"group": ["g"], "layer": ["x"], "depth": [0.0], "n_params": [1],
                              "modality": ["image"], "layer_type": ["Linear"], "block": ["b"]})
    known = list(context_features(one_layer, modality=use_modality, roles=use_roles).columns)
    positions = [known.index(name) if name in known else -1 for name in context]
    if -1 in positions or positions != sorted(positions):
        raise ValueError("its context features are unknown or out of order (reordered or "
                         "edited)")


@contextlib.contextmanager
def native_stderr_silenced():
    """Silences what native code writes to file descriptor 2 (Python errors still raise):
    LightGBM logs "[Fatal]" before raising on a model string it cannot read."""
    try:
        saved = os.dup(2)
    except OSError:  # no real stderr (embedded interpreter)
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")

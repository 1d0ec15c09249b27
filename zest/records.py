"""Parquet records of metrics and ground truth (ARCHITECTURE.md §5): schema, validation, atomic
writes.

One row per (model, dataset, layer[, batch or seed]). Files are written atomically (a temporary
file in the same folder, then ``os.replace``) under a file lock, so a killed writer never leaves
a torn file and two writers on one file cannot corrupt it.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock, Timeout

from zest._version import __version__
from zest.errors import InvalidInputError, RecordError
from zest.outputs import check_output_file, check_replaceable

SCHEMA_VERSION = 1
METADATA_KEY = b"zest.schema_version"
KIND_KEY = b"zest.kind"
SETTINGS_KEY = b"zest.settings"
METRIC_PREFIX = "m_"

#: What a record file holds; stamped into its parquet metadata so that no command replaces or
#: appends to a file of the other kind.
RecordKind = Literal["metrics", "groundtruth"]
KINDS: tuple[str, ...] = ("metrics", "groundtruth")
_KIND_WORDS = {"metrics": "metric", "groundtruth": "ground-truth"}

#: Identity columns every record has.
ID_COLUMNS = ["model", "dataset", "group", "layer", "layer_type", "block", "depth", "n_params"]
#: Key of a ground-truth row (unique within a file; a metrics file, written whole, is keyed by
#: group, layer, batch and seed).
GROUNDTRUTH_KEY = ["group", "layer", "gt_seed"]


def zest_version() -> str:
    """The installed zest version."""
    return __version__


def safe_name(text: str) -> str:
    """A file-name-safe form of a model or dataset spec (``timm:resnet18`` → ``timm-resnet18``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def group_key(model: str, dataset: str) -> str:
    """The group of a (model, dataset) pair: ``<model>__<dataset>`` (file-name safe)."""
    return f"{safe_name(model)}__{safe_name(dataset)}"


def metric_columns(frame: pd.DataFrame) -> list[str]:
    """The ``m_<metric>`` columns of a record table, in order."""
    return [c for c in frame.columns if c.startswith(METRIC_PREFIX)]


def check_writable(path: str | os.PathLike, kind: RecordKind | None = None) -> Path:
    """Fails early, before any work, when ``path`` cannot be written
    (:func:`zest.outputs.check_output_file`), or (with ``kind``) when it holds anything but a
    record file of that kind (:func:`zest.outputs.path_kind`: nothing of another kind is ever
    replaced); creates its folder."""
    path = check_output_file(path, "out")
    if kind is not None:
        try:
            check_replaceable(path, "out", f"{kind}-records")
        except InvalidInputError as exc:
            raise RecordError(str(exc)) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def record_kind(path: str | os.PathLike) -> str | None:
    """The kind of a record file (``metrics`` or ``groundtruth``), from its metadata or, for
    files written before kinds were stamped, from its columns; ``None`` when ``path`` is not a
    readable zest record file."""
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError):
        return None
    meta = schema.metadata or {}
    if METADATA_KEY not in meta:
        return None
    if KIND_KEY in meta:
        return meta[KIND_KEY].decode()
    return kind_of_columns(schema.names)


def kind_of_columns(columns: Sequence[str]) -> str | None:
    """The record kind a set of columns belongs to (``gt_gain`` → ground truth, ``m_*`` →
    metrics)."""
    if "gt_gain" in columns:
        return "groundtruth"
    if any(str(c).startswith(METRIC_PREFIX) for c in columns):
        return "metrics"
    return None


def record_settings(path: str | os.PathLike) -> dict[str, Any] | None:
    """The collection settings stamped into a record file (``None`` for files written before
    settings were stamped, or not record files)."""
    try:
        meta = pq.read_schema(path).metadata or {}
    except (pa.ArrowInvalid, OSError):
        return None
    raw = meta.get(SETTINGS_KEY)
    return json.loads(raw) if raw is not None else None


def settings_difference(old: Mapping[str, Any], new: Mapping[str, Any]) -> str | None:
    """The first setting that differs between two settings dicts, as ``"name=old, not new"``
    (keys present on one side only count as a difference), or ``None``."""
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
            same = float(a) == float(b)
        else:
            same = a == b
        if not same:
            return f"{key}={a!r}, not {b!r}"
    return None


def read_records(path: str | os.PathLike, kind: RecordKind | None = None) -> pd.DataFrame:
    """Reads one record file, or every ``*.parquet`` below a folder, into one table; with
    ``kind``, a file of the other kind is refused."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob("*.parquet"))
        if not files:
            raise RecordError(f"no .parquet record files under {str(path)!r}; run `zest collect` "
                              "first or pass the folder that holds them")
        return pd.concat([read_records(f, kind) for f in files], ignore_index=True)
    if not path.is_file():
        raise RecordError(f"record file {str(path)!r} does not exist")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise RecordError(f"{str(path)!r} is not a readable parquet record file ({exc}); "
                          "delete it and collect again") from None
    version = file_schema_version(table)
    if version != SCHEMA_VERSION:
        raise RecordError(f"{str(path)!r} has record schema version {version}, this zest reads "
                          f"{SCHEMA_VERSION}; collect it again with this version")
    if kind is not None:
        found = (table.schema.metadata or {}).get(KIND_KEY)
        found = found.decode() if found is not None else kind_of_columns(table.schema.names)
        if found != kind:
            raise RecordError(f"{str(path)!r} holds {_KIND_WORDS.get(found, 'unknown')} records, "
                              f"not {_KIND_WORDS[kind]} records; move it to the folder of its "
                              "kind (metrics/ or groundtruth/)")
    return table.to_pandas()


def file_schema_version(table: pa.Table) -> int | None:
    """Schema version stored in a parquet table's metadata (``None`` if absent)."""
    meta = table.schema.metadata or {}
    raw = meta.get(METADATA_KEY)
    return int(raw) if raw is not None else None


def write_records(frame: pd.DataFrame, path: str | os.PathLike, kind: RecordKind | None = None,
                  settings: Mapping[str, Any] | None = None) -> Path:
    """Writes ``frame`` to ``path`` atomically (temporary file + ``os.replace``), stamped with
    its kind (inferred from the columns when not given) and collection ``settings``.

    Raises:
        RecordError: ``path`` holds a file of another kind (it is never replaced).
    """
    kind = kind or kind_of_columns(list(frame.columns))
    if kind not in KINDS:
        raise RecordError(f"cannot tell whether these records are metrics or ground truth "
                          f"(columns {list(frame.columns)[:6]}...); pass kind=")
    path = check_writable(path, kind)
    table = pa.Table.from_pandas(frame.reset_index(drop=True), preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[METADATA_KEY] = str(SCHEMA_VERSION).encode()
    meta[KIND_KEY] = kind.encode()
    if settings is not None:
        meta[SETTINGS_KEY] = json.dumps(dict(settings), sort_keys=True).encode()
    table = table.replace_schema_metadata(meta)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_lock(path: str | os.PathLike, timeout: float = 600.0) -> FileLock:
    """The lock that serialises writers of one record file (``<file>.lock``)."""
    return FileLock(str(path) + ".lock", timeout=timeout)


def append_records(frame: pd.DataFrame, path: str | os.PathLike, key: Sequence[str],
                   kind: RecordKind | None = None,
                   settings: Mapping[str, Any] | None = None) -> Path:
    """Appends rows to a record file under its lock; rows whose ``key`` is present are replaced
    by nothing (the file keeps its row) so a resumed collector never duplicates a row.

    Raises:
        RecordError: The file holds another kind, group, schema version or settings, or is
            locked too long.
    """
    kind = kind or kind_of_columns(list(frame.columns))
    path = check_writable(path, kind)
    try:
        with file_lock(path):
            if path.exists():
                existing = read_records(path, kind)
                check_same_group(existing, frame, path)
                check_same_settings(path, settings)
                merged = pd.concat([existing, frame], ignore_index=True)
                merged = merged.drop_duplicates(subset=list(key), keep="first")
                settings = settings if settings is not None else record_settings(path)
            else:
                merged = frame
            return write_records(merged, path, kind, settings)
    except Timeout:
        raise RecordError(f"{str(path)!r} is locked by another collector; wait for it or "
                          f"remove {str(path)}.lock if no collector is running") from None


def check_same_group(existing: pd.DataFrame, new: pd.DataFrame, path: Path) -> None:
    """Refuses to mix groups in one record file."""
    old_groups = set(existing["group"].unique()) if "group" in existing else set()
    new_groups = set(new["group"].unique()) if "group" in new else set()
    if old_groups and new_groups and old_groups != new_groups:
        raise RecordError(f"{str(path)!r} holds group {sorted(old_groups)[0]!r}, not "
                          f"{sorted(new_groups)[0]!r}; write each (model, dataset) group to its "
                          "own file")


def check_same_settings(path: str | os.PathLike, settings: Mapping[str, Any] | None) -> None:
    """Refuses to add records made with other settings to a file stamped with its own."""
    stamped = record_settings(path)
    if stamped is None or settings is None:
        return
    difference = settings_difference(stamped, settings)
    if difference:
        raise RecordError(f"{str(path)!r} was collected with {difference}; use the same "
                          "settings to resume, or write to another out", parameter="out")

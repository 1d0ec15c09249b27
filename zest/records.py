"""Parquet records of metrics and ground truth (DESIGN §4): schema, validation, atomic writes.

One row per (model, dataset, layer[, batch or seed]). Files are written atomically (a temporary
file in the same folder, then ``os.replace``) under a file lock, so a killed writer never leaves
a torn file and two writers on one file cannot corrupt it.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock, Timeout

from zest.errors import RecordError

SCHEMA_VERSION = 1
METADATA_KEY = b"zest.schema_version"
METRIC_PREFIX = "m_"

#: Identity columns every record has.
ID_COLUMNS = ["model", "dataset", "group", "layer", "layer_type", "block", "depth", "n_params"]
#: Columns of ground-truth records beyond the identity and metric columns.
GT_COLUMNS = ["gt_score", "gt_baseline", "gt_gain", "gt_loss", "gt_loss_baseline",
              "gt_loss_gain", "gt_steps", "gt_lr", "gt_seed", "gt_seconds"]
#: Key of a metrics row and of a ground-truth row (unique within a file).
METRICS_KEY = ["group", "layer", "batch", "seed"]
GROUNDTRUTH_KEY = ["group", "layer", "gt_seed"]


def zest_version() -> str:
    """The installed zest version."""
    from zest import __version__

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


def check_writable(path: str | os.PathLike) -> Path:
    """Fails early, before any work, when ``path`` cannot be written."""
    path = Path(path)
    if path.exists() and path.is_dir():
        raise RecordError(f"output path {str(path)!r} is a directory; pass a file path such as "
                          f"{str(path / 'records.parquet')!r}")
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RecordError(f"cannot create the folder {str(parent)!r} for {str(path)!r} "
                          f"({exc.strerror}); choose a writable --out") from None
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise RecordError(f"output path {str(path)!r} is not writable; choose a writable --out")
    return path


def read_records(path: str | os.PathLike) -> pd.DataFrame:
    """Reads one record file, or every ``*.parquet`` below a folder, into one table."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob("*.parquet"))
        if not files:
            raise RecordError(f"no .parquet record files under {str(path)!r}; run `zest collect` "
                              "first or pass the folder that holds them")
        return pd.concat([read_records(f) for f in files], ignore_index=True)
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
    return table.to_pandas()


def file_schema_version(table: pa.Table) -> int | None:
    """Schema version stored in a parquet table's metadata (``None`` if absent)."""
    meta = table.schema.metadata or {}
    raw = meta.get(METADATA_KEY)
    return int(raw) if raw is not None else None


def write_records(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Writes ``frame`` to ``path`` atomically (temporary file + ``os.replace``)."""
    path = check_writable(path)
    table = pa.Table.from_pandas(frame.reset_index(drop=True), preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[METADATA_KEY] = str(SCHEMA_VERSION).encode()
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


def append_records(frame: pd.DataFrame, path: str | os.PathLike, key: Sequence[str]) -> Path:
    """Appends rows to a record file under its lock; rows whose ``key`` is present are replaced
    by nothing (the file keeps its row) so a resumed collector never duplicates a row.

    Raises:
        RecordError: The file belongs to another group or schema version, or is locked too long.
    """
    path = check_writable(path)
    try:
        with file_lock(path):
            if path.exists():
                existing = read_records(path)
                check_same_group(existing, frame, path)
                merged = pd.concat([existing, frame], ignore_index=True)
                merged = merged.drop_duplicates(subset=list(key), keep="first")
            else:
                merged = frame
            return write_records(merged, path)
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


def existing_keys(path: str | os.PathLike, key: Sequence[str]) -> set[tuple]:
    """Keys already present in a record file (empty when it does not exist)."""
    path = Path(path)
    if not path.exists():
        return set()
    frame = read_records(path)
    return {tuple(row) for row in frame[list(key)].itertuples(index=False, name=None)}

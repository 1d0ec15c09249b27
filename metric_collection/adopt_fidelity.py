"""Adopts a fidelity-study record file as a corpus group made with the same settings.

The fidelity study (``fidelity.py``) collects ground truth on a stratified layer sample under
several settings. The setting chosen for the corpus has then already been run on that group, so
its rows are moved into ``<out_dir>/groundtruth/<group>.parquet`` instead of being recomputed:
the rows are stamped with the sample size (``gt_layer_sample``), and the file is accepted only
if the grid would resume it as its own, i.e. :func:`zest.groundtruth.list_jobs` with the
grid group's settings finds no differing setting and the same layer sample. A partial file is
adopted as well; ``zest collect grid`` then continues it.

    python metric_collection/adopt_fidelity.py metric_collection/corpus.toml smollm2__r8 \\
        data/records/fidelity/smollm2__r8/steps15_len64.parquet
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from zest.grid import grid_jobs
from zest.groundtruth import list_jobs
from zest.records import read_records, record_settings, write_records


def adopt(grid: str, key: str, source: Path) -> Path:
    """Checks ``source`` against group ``key`` of ``grid`` and writes it as the group's file."""
    jobs = [(group, out) for kind, group, out in grid_jobs(grid, only=[key])
            if kind == "groundtruth" and group.key == key]
    if not jobs:
        sys.exit(f"{key!r} is no group of {grid!r}")
    group, out = jobs[0]
    if out.exists():
        sys.exit(f"{str(out)!r} exists already; the grid resumes it (nothing to adopt)")
    sample = group.get("layer_sample")
    if sample is None:
        sys.exit(f"group {key!r} has no layer_sample; only sampled groups come from the study")
    frame = read_records(source, "groundtruth")
    stamp = record_settings(source) or {}
    frame["gt_layer_sample"] = int(sample)
    with tempfile.TemporaryDirectory() as folder:
        trial = Path(folder) / out.name
        write_records(frame, trial, "groundtruth", settings={**stamp,
                                                             "gt_layer_sample": int(sample)})
        # raises RecordError naming the first setting that differs from the grid's
        listed = list_jobs(group.groundtruth_request(trial))
        sampled = {layer.name for layer in listed.layers}
        if not set(frame["layer"]) <= sampled:
            sys.exit(f"{str(source)!r} holds layers outside the grid's sample of {sample}: "
                     f"{sorted(set(frame['layer']) - sampled)[:3]}")
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(trial, out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grid")
    parser.add_argument("group", help="<model>__<dataset> key of a grid group")
    parser.add_argument("source", type=Path, help="fidelity record file of that group")
    args = parser.parse_args()
    out = adopt(args.grid, args.group, args.source)
    print(f"adopted {len(read_records(out))} rows as {out}")


if __name__ == "__main__":
    main()

"""Stamps record files written before zest recorded a file's kind and settings.

Record files now carry their kind (metrics / ground truth) and every setting that changed their
values in the parquet metadata, so that no command replaces a file of another kind and no resume
mixes settings. The corpus files collected earlier carry neither; this script stamps them with
the settings of the grid that made them, after checking every setting column the rows do carry
against the grid. The rows themselves are rewritten unchanged (checked).

    python metric_collection/stamp_records.py metric_collection/corpus.toml
"""

from __future__ import annotations

import sys

import pandas as pd

from zest.collect import metrics_settings
from zest.grid import grid_jobs
from zest.groundtruth import GroundTruthConfig, groundtruth_settings
from zest.metrics import resolve_metrics
from zest.records import read_records, record_kind, record_settings, write_records


def expected(kind: str, group, frame: pd.DataFrame) -> tuple[dict, dict]:
    """The grid's settings for a file, and the row columns that must agree with them."""
    options = group.options()
    if kind == "metrics":
        settings = metrics_settings(
            batch_size=int(group.get("batch_size", 32)), batches=int(group.get("batches", 4)),
            metrics=resolve_metrics(group.get("metrics", "all")),
            probe_loss=group.get("probe_loss", "supcon"), seed=int(group.get("data_seed", 0)),
            options=options, granularity="module", layer_names=None,
            checkpoint=group.get("checkpoint"))
        return settings, {"batch_size": settings["batch_size"], "seed": settings["data_seed"],
                          "probe_loss": settings["probe_loss"]}
    config = GroundTruthConfig(steps=int(group.get("steps", 100)), lr=float(group.get("lr", 1e-3)),
                               batch_size=int(group.get("gt_batch_size", 32)))
    settings = groundtruth_settings(config, options, int(group.get("data_seed", 0)),
                                    group.get("checkpoint"))
    for column in ("gt_train_size", "gt_val_size", "image_size", "max_length"):
        settings[column] = int(frame[column].iloc[0])
    checked = {k: settings[k] for k in ("gt_steps", "gt_lr", "gt_batch_size", "data_seed")}
    return settings, checked


def main(grid: str) -> None:
    for kind, group, path in grid_jobs(grid):
        if not path.exists() or record_settings(path) is not None:
            continue
        frame = read_records(path, kind)
        settings, checked = expected(kind, group, frame)
        for column, value in checked.items():
            values = set(frame[column].unique())
            if values != {value}:
                sys.exit(f"{path}: column {column} holds {sorted(values)}, the grid says {value}")
        write_records(frame, path, kind, settings)
        assert record_kind(path) == kind
        pd.testing.assert_frame_equal(read_records(path, kind), frame)
        print(f"stamped {kind:11s} {path}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "metric_collection/corpus.toml")

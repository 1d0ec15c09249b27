"""``zest collect grid``: metrics and ground truth for every (model, dataset) pair of a TOML grid.

A grid file (``metric_collection/<name>.toml``) has a ``[defaults]`` table and one ``[[group]]``
table per pair; a group's keys override the defaults. Each group writes
``<out_dir>/metrics/<group>.parquet`` and ``<out_dir>/groundtruth/<group>.parquet``; what is
already there is skipped, so the grid resumes where it stopped.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from zest.collect import MetricsRequest, run_metrics
from zest.errors import InvalidInputError, RecordError
from zest.groundtruth import GroundTruthConfig, GroundTruthRequest, run_groundtruth
from zest.loading import DataOptions
from zest.records import (
    METRIC_PREFIX,
    group_key,
    read_records,
    record_settings,
    settings_difference,
)

#: Keys of a grid group: the collection settings, then every data option (DataOptions' fields).
GRID_KEYS = {"model", "dataset", "seeds", "batches", "batch_size", "probe_loss", "metrics",
             "steps", "lr", "gt_batch_size", "n_jobs", "out_dir", "data_seed",
             "checkpoint", "layer_sample"} | {f.name for f in fields(DataOptions)}


@dataclass
class GridGroup:
    """One (model, dataset) pair of a grid with its resolved settings."""

    model: str
    dataset: str
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return group_key(self.model, self.dataset)

    def get(self, name: str, default: Any = None) -> Any:
        return self.settings.get(name, default)

    def options(self) -> DataOptions:
        return DataOptions(**{f.name: self.settings[f.name] for f in fields(DataOptions)
                              if f.name in self.settings})

    def metrics_request(self, out: str | Path) -> MetricsRequest:
        """The metrics collection of this group into ``out``, with the grid's settings."""
        return MetricsRequest(self.model, self.dataset, out,
                              batch_size=int(self.get("batch_size", 32)),
                              batches=int(self.get("batches", 4)),
                              metrics=self.get("metrics", "all"),
                              probe_loss=self.get("probe_loss"),
                              seed=int(self.get("data_seed", 0)), options=self.options(),
                              checkpoint=self.get("checkpoint"))

    def groundtruth_request(self, out: str | Path) -> GroundTruthRequest:
        """The ground-truth collection of this group into ``out``, with the grid's settings."""
        config = GroundTruthConfig(steps=int(self.get("steps", 100)),
                                   lr=float(self.get("lr", 1e-3)),
                                   batch_size=int(self.get("gt_batch_size", 32)))
        return GroundTruthRequest(self.model, self.dataset, out, config=config,
                                  seeds=[int(s) for s in self.get("seeds", [0, 1])],
                                  options=self.options(), data_seed=int(self.get("data_seed", 0)),
                                  checkpoint=self.get("checkpoint"),
                                  n_jobs=int(self.get("n_jobs", 1)),
                                  layer_sample=self.get("layer_sample"))


def read_grid(path: str | Path) -> tuple[list[GridGroup], Path]:
    """Parses a grid file; returns its groups and the output folder."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"grid file {str(path)!r} does not exist; see "
                                "metric_collection/*.toml for examples")
    try:
        spec = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInputError(f"grid file {str(path)!r} is not valid TOML: {exc}") from None
    defaults = spec.get("defaults", {})
    groups = []
    for i, entry in enumerate(spec.get("group", [])):
        merged = {**defaults, **entry}
        unknown = set(merged) - GRID_KEYS
        if unknown:
            raise InvalidInputError(f"grid {str(path)!r}, group {i}: unknown keys "
                                    f"{sorted(unknown)}; known: {sorted(GRID_KEYS)}")
        if "model" not in merged or "dataset" not in merged:
            raise InvalidInputError(f"grid {str(path)!r}, group {i}: needs model and dataset")
        groups.append(GridGroup(merged.pop("model"), merged.pop("dataset"), merged))
    if not groups:
        raise InvalidInputError(f"grid {str(path)!r} lists no [[group]]")
    # a relative out_dir is relative to the working directory (the repository root)
    return groups, Path(defaults.get("out_dir", "data/records"))


def grid_jobs(path: str | Path, only: Sequence[str] | None = None, n_jobs: int | None = None
              ) -> Iterator[tuple[str, GridGroup, Path]]:
    """The (kind, group, output file) work items of a grid, in order.

    Args:
        only: Keep only the groups whose key (``<model>__<dataset>``) or model is listed.
        n_jobs: Ground-truth workers for every group, overriding the grid's ``n_jobs``.
    """
    groups, out_dir = read_grid(path)
    if only:
        known = {g.key for g in groups} | {g.model for g in groups}
        unknown = [name for name in only if name not in known]
        if unknown:
            raise InvalidInputError(f"only={unknown[0]!r} is no group or model of "
                                    f"{str(path)!r}; known: {', '.join(sorted(known))}",
                                    parameter="only")
        groups = [g for g in groups if g.key in only or g.model in only]
    if n_jobs is not None:
        if n_jobs < 1:
            raise InvalidInputError(f"n_jobs must be ≥ 1, got {n_jobs}", parameter="n_jobs")
        for group in groups:
            group.settings["n_jobs"] = n_jobs
    for group in groups:
        yield "metrics", group, out_dir / "metrics" / f"{group.key}.parquet"
        yield "groundtruth", group, out_dir / "groundtruth" / f"{group.key}.parquet"


def run_grid_item(kind: str, group: GridGroup, out: Path,
                  progress: Callable[[int, int], None] | None = None) -> str:
    """Runs (or resumes) one work item; returns a short status."""
    if kind == "metrics":
        request = group.metrics_request(out)
        settings = request.settings()
        if out.exists():
            existing = read_records(out, "metrics")
            stamped = record_settings(out)
            if stamped is not None:
                compared = {k: v for k, v in settings.items() if k not in ("metrics", "batches")}
                difference = settings_difference(
                    {k: v for k, v in stamped.items() if k not in ("metrics", "batches")},
                    compared)
                if difference:
                    raise RecordError(f"{str(out)!r} was collected with {difference}; restore "
                                      "the grid's settings, or move the file away to redo it")
            complete = set(range(request.batches)) <= set(existing["batch"].unique()) and all(
                METRIC_PREFIX + name in existing for name in request.metrics)
            if complete:
                return "done"
        # metrics are cheap: a file missing a batch or a newly registered metric is redone
        run_metrics(request, progress)
        return "collected"
    run_groundtruth(group.groundtruth_request(out), progress)
    return "collected"

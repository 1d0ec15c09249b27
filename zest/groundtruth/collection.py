"""Collecting (or resuming) the ground-truth records of one group: the driver that lists the
jobs, runs the baselines then the layers on an executor, and appends each finished job's rows
to the record file (atomically, under its lock), so a killed collector resumes where it stopped
(ARCHITECTURE.md §5 and §5b)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from zest.groundtruth.executors import execute
from zest.groundtruth.jobs import BASELINE, GroundTruthJobs, list_jobs
from zest.groundtruth.settings import GroundTruthRequest
from zest.layers import Layer
from zest.records import GROUNDTRUTH_KEY, append_records, group_key, read_records, zest_version


def run_groundtruth(request: GroundTruthRequest,
                    progress: Callable[[int, int], None] | None = None) -> pd.DataFrame:
    """Collects (or resumes) the ground-truth records that ``request`` describes.

    Args:
        request: The pair, the record file and every setting, validated.
        progress: Called as ``progress(layers_done, layers_total)``.

    Returns:
        All the rows of ``request.out`` after the run.
    """
    out = request.out
    planned = list_jobs(request)
    total = len(planned.layers) * len(planned.seeds)
    done = planned.done
    if progress is not None:
        progress(done, total)
    layer_info = {layer.name: layer for layer in planned.layers}
    baselines = recorded_baselines(out)
    baseline_jobs = [j for j in planned.jobs if j.block == BASELINE and j.seed not in baselines
                     and any(k.seed == j.seed and k.block != BASELINE for k in planned.jobs)]
    layer_jobs = [j for j in planned.jobs if j.block != BASELINE]
    run = (request.n_jobs, request.backend, request.scheduler)
    for job, results in execute(baseline_jobs, *run):
        baselines[job.seed] = results[0]
    for job, results in execute(layer_jobs, *run):
        rows = [_row(planned, layer_info[r["layer"]], r, baselines[job.seed], job.seed)
                for r in results]
        append_records(pd.DataFrame(rows), out, GROUNDTRUTH_KEY, kind="groundtruth",
                       settings=planned.stamp or None)
        done += len(rows)
        if progress is not None:
            progress(done, total)
    return read_records(out, "groundtruth") if out.exists() else pd.DataFrame()


def collect_groundtruth(model_spec: str, dataset_spec: str, out: str | os.PathLike, *,
                        progress: Callable[[int, int], None] | None = None,
                        **settings: Any) -> pd.DataFrame:
    """Collects (or resumes) the ground-truth records of one group into ``out``: the keyword
    form of :func:`run_groundtruth`.

    Args:
        model_spec: Model spec.
        dataset_spec: Data set spec.
        out: Parquet file; rows already there are kept and not recomputed.
        progress: Called as ``progress(layers_done, layers_total)``.
        **settings: The other fields of :class:`GroundTruthRequest` (``config``, ``seeds``,
            ``options``, ``layer_names``, ``layer_sample``, ``data_seed``, ``device``,
            ``checkpoint``, ``n_jobs``, ``backend``, ``scheduler``).

    Returns:
        All the rows of ``out`` after the run.
    """
    return run_groundtruth(GroundTruthRequest(model_spec, dataset_spec, out, **settings),
                           progress)


def recorded_baselines(out: str | os.PathLike) -> dict[int, dict[str, float]]:
    """The head-only baselines already in a record file, per seed (a resumed collection reuses
    them instead of training the baseline again)."""
    if not Path(out).exists():
        return {}
    frame = read_records(out, "groundtruth")
    return {int(seed): {"score": float(part["gt_baseline"].iloc[0]),
                        "loss": float(part["gt_loss_baseline"].iloc[0])}
            for seed, part in frame.groupby("gt_seed")}


def _row(planned: GroundTruthJobs, layer: Layer, result: dict[str, Any],
         baseline: dict[str, float], seed: int) -> dict[str, Any]:
    pair = planned.pair
    return {
        "model": pair.model, "dataset": pair.dataset, "group": group_key(pair.model, pair.dataset),
        "layer": layer.name, "layer_type": layer.type, "block": layer.block,
        "depth": layer.depth, "n_params": layer.n_params,
        "gt_score": result["score"], "gt_baseline": baseline["score"],
        "gt_gain": result["score"] - baseline["score"],
        "gt_loss": result["loss"], "gt_loss_baseline": baseline["loss"],
        "gt_loss_gain": baseline["loss"] - result["loss"],
        "gt_seed": seed, "gt_seconds": result["seconds"], "gt_cached": bool(result["cached"]),
        **planned.settings, "data_seed": pair.data_seed, "zest_version": zest_version(),
    }

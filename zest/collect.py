"""``zest collect metrics``: per-layer zero-shot metrics of a (model, dataset) pair as records.

Implements step 1 of ZEST (project page, "we first collect zero-shot forward, backward, and
static metrics from the model"): for each of ``batches`` minibatches, one probe
(:func:`zest.probe.probe`) and every requested metric, one row per (layer, batch).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import pandas as pd

from zest.data import task_of_spec
from zest.errors import InvalidInputError
from zest.frames import ProgressCallback, metrics_frame
from zest.layers import check_granularity
from zest.loading import DataOptions, load_pair
from zest.metrics import (
    resolve_metrics,
)
from zest.models import probe_loss_for, resolve_device
from zest.records import (
    check_same_group,
    check_writable,
    file_lock,
    group_key,
    read_records,
    write_records,
    zest_version,
)


def metrics_settings(*, batch_size: int, batches: int, metrics: Sequence[str], probe_loss: str,
                     seed: int, options: DataOptions | None, granularity: str,
                     layer_names: Sequence[str] | None, checkpoint: str | None) -> dict[str, Any]:
    """Every setting that changes a metrics collection's values, as stamped into its file."""
    return {"batch_size": int(batch_size), "batches": int(batches), "metrics": list(metrics),
            "probe_loss": probe_loss, "data_seed": int(seed),
            **(options or DataOptions()).settings(), "granularity": granularity,
            "layers": list(layer_names) if layer_names else None, "checkpoint": checkpoint}


def default_probe_loss(dataset_spec: str, requested: str | None = None) -> str:
    """The probe loss of a metrics collection: ``requested``, else ``supcon``; a causal-LM data
    set (``lm:<text data set>``) always probes with its next-token loss, ``ce``
    (:func:`zest.models.probe_loss_for`)."""
    return probe_loss_for(task_of_spec(dataset_spec)[0], requested)


def collect_metrics(model_spec: str, dataset_spec: str, *, batch_size: int = 32,
                    batches: int = 1, metrics: str | Sequence[str] = "all",
                    probe_loss: str | None = None, seed: int = 0,
                    options: DataOptions | None = None, granularity: str = "module",
                    layer_names: Sequence[str] | None = None, device: str = "cpu",
                    checkpoint: str | None = None, progress: ProgressCallback | None = None,
                    out: str | os.PathLike | None = None) -> pd.DataFrame:
    """Metric records of one (model, dataset) group (ARCHITECTURE.md §5).

    Args:
        model_spec: Model spec (see :func:`zest.load_model`).
        dataset_spec: Data set spec (see :func:`zest.load_dataset`).
        batch_size: Probe minibatch size (≥ 2 with ``supcon``).
        batches: Number of distinct minibatches; each gives one row per layer (``batch`` column).
        metrics: ``all``, a kind or a list of metric names.
        probe_loss: ``supcon`` or ``ce`` (default: :func:`default_probe_loss`).
        seed: Seed of the split, the head and the minibatches.
        options: Data loading options.
        granularity: ``module`` (a row per layer) or ``block``.
        layer_names: Restrict to these layers or blocks.
        device: ``cpu``, ``cuda`` or ``auto``.
        checkpoint: Weights for ``timm:<arch>``.
        progress: Called as ``progress(done, total)`` after each batch.
        out: Parquet file to write the records to (checked before any work). A metrics file of
            the same group is replaced; a file of another kind or group is refused.

    Returns:
        One row per (layer, batch).
    """
    if out is not None:
        check_writable(out, "metrics")
    if batches < 1:
        raise InvalidInputError(f"--batches must be ≥ 1, got {batches}")
    if batch_size < 1:
        raise InvalidInputError(f"--batch-size must be ≥ 1, got {batch_size}")
    probe_loss = default_probe_loss(dataset_spec, probe_loss)
    if probe_loss == "supcon" and batch_size < 2:
        raise InvalidInputError(f"--batch-size {batch_size} is too small for the supcon probe "
                                "loss; use --batch-size 2 or more (32 recommended)")
    names = resolve_metrics(metrics)
    check_granularity(granularity)
    torch_device = resolve_device(device)
    model, task, data = load_pair(model_spec, dataset_spec, options=options, seed=seed,
                                  device=str(torch_device), checkpoint=checkpoint)
    minibatches = data.batches("train", batch_size, batches, seed=seed)
    frame = metrics_frame(model, task, minibatches, metrics=names, probe_loss=probe_loss,
                          layer_names=layer_names, granularity=granularity, progress=progress,
                          device=torch_device)
    frame.insert(0, "group", group_key(model_spec, dataset_spec))
    frame.insert(0, "dataset", dataset_spec)
    frame.insert(0, "model", model_spec)
    frame["modality"] = task.modality
    frame["seed"] = seed
    frame["zest_version"] = zest_version()
    if out is not None:
        settings = metrics_settings(batch_size=batch_size, batches=batches, metrics=names,
                                    probe_loss=probe_loss, seed=seed, options=options,
                                    granularity=granularity, layer_names=layer_names,
                                    checkpoint=checkpoint)
        save_metrics(frame, out, settings)
    return frame


def save_metrics(frame: pd.DataFrame, out: str | os.PathLike, settings: dict[str, Any]) -> None:
    """Writes metric records to ``out`` atomically under its lock, replacing a metrics file of
    the same group (metrics are cheap to redo) and refusing any other file."""
    out = check_writable(out, "metrics")
    with file_lock(out):
        if out.exists():
            check_same_group(read_records(out, "metrics"), frame, out)
        write_records(frame, out, "metrics", settings)

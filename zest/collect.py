"""``zest collect metrics``: per-layer zero-shot metrics of a (model, dataset) pair as records.

Implements step 1 of ZEST (project page, "we first collect zero-shot forward, backward, and
static metrics from the model"): for each of ``batches`` minibatches, one probe
(:func:`zest.probe.probe`) and every requested metric, one row per (layer, batch).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from zest.command_line import CommandLine, setting
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


@dataclass(frozen=True)
class MetricsRequest:
    """One metrics collection, validated once here (errors name the Python parameter); the
    fields with a help text are ``zest collect metrics``'s options (:mod:`zest.command_line`).

    Attributes:
        model: Model spec (see :func:`zest.load_model`).
        dataset: Data set spec (see :func:`zest.load_dataset`).
        out: Parquet file to write the records to (``None``: only return them). A metrics file
            of the same group is replaced; a file of another kind or group is refused.
        batch_size: Probe minibatch size (≥ 2 with ``supcon``).
        batches: Number of distinct minibatches; each gives one row per layer (``batch``).
        metrics: ``all``, a kind or metric names (comma-separated or a sequence); resolved
            to the metric names.
        probe_loss: ``supcon`` or ``ce``; resolved with :func:`default_probe_loss`.
        seed: Seed of the split, the head and the minibatches.
        options: Data loading options.
        granularity: ``module`` (a row per layer) or ``block``.
        layer_names: Restrict to these layers or blocks.
        device: ``cpu``, ``cuda`` or ``auto``.
        checkpoint: Weights for ``timm:<arch>`` or ``tv:<arch>``.
    """

    model: str
    dataset: str
    out: Path | None = None
    batch_size: int = setting(32, "Probe minibatch size.")
    batches: int = setting(1, "Minibatches; each gives a row per layer.")
    metrics: tuple[str, ...] = setting(
        "all", "all, a kind (static, forward, backward) or comma-separated metric names.",
        command_line=CommandLine("metrics", str))
    probe_loss: str | None = setting(
        None, "supcon (no head, τ=0.07) or ce; default supcon, and ce (next-token loss) for "
              "lm: data sets.")
    seed: int = 0
    options: DataOptions = setting(default_factory=DataOptions)
    granularity: str = "module"
    layer_names: tuple[str, ...] | None = None
    device: str = "cpu"
    checkpoint: str | None = None

    def __post_init__(self) -> None:
        fix = object.__setattr__  # frozen: normalised once, here
        if self.out is not None:
            fix(self, "out", Path(os.fspath(self.out)))
        fix(self, "options", self.options if self.options is not None else DataOptions())
        if self.layer_names is not None:
            fix(self, "layer_names", tuple(self.layer_names))
        if self.batches < 1:
            raise InvalidInputError(f"batches must be ≥ 1, got {self.batches}")
        if self.batch_size < 1:
            raise InvalidInputError(f"batch_size must be ≥ 1, got {self.batch_size}")
        fix(self, "probe_loss", default_probe_loss(self.dataset, self.probe_loss))
        if self.probe_loss == "supcon" and self.batch_size < 2:
            raise InvalidInputError(f"batch_size must be ≥ 2 for the supcon probe loss (32 "
                                    f"recommended), got {self.batch_size}")
        fix(self, "metrics", tuple(resolve_metrics(self.metrics)))
        check_granularity(self.granularity)

    def settings(self) -> dict[str, Any]:
        """Every setting that changes the values, as stamped into the record file."""
        return metrics_settings(batch_size=self.batch_size, batches=self.batches,
                                metrics=self.metrics, probe_loss=self.probe_loss,
                                seed=self.seed, options=self.options,
                                granularity=self.granularity, layer_names=self.layer_names,
                                checkpoint=self.checkpoint)


def run_metrics(request: MetricsRequest, progress: ProgressCallback | None = None
                ) -> pd.DataFrame:
    """Metric records of one (model, dataset) group (ARCHITECTURE.md §5), written to
    ``request.out`` when it is set (checked before any work).

    Args:
        request: The pair and every setting, validated.
        progress: Called as ``progress(done, total)`` after each batch.

    Returns:
        One row per (layer, batch).
    """
    if request.out is not None:
        check_writable(request.out, "metrics")
    torch_device = resolve_device(request.device)
    model, task, data = load_pair(request.model, request.dataset, options=request.options,
                                  seed=request.seed, device=str(torch_device),
                                  checkpoint=request.checkpoint)
    minibatches = data.batches("train", request.batch_size, request.batches, seed=request.seed)
    frame = metrics_frame(model, task, minibatches, metrics=list(request.metrics),
                          probe_loss=request.probe_loss,
                          layer_names=list(request.layer_names) if request.layer_names else None,
                          granularity=request.granularity, progress=progress,
                          device=torch_device)
    frame.insert(0, "group", group_key(request.model, request.dataset))
    frame.insert(0, "dataset", request.dataset)
    frame.insert(0, "model", request.model)
    frame["modality"] = task.modality
    frame["seed"] = request.seed
    frame["zest_version"] = zest_version()
    if request.out is not None:
        save_metrics(frame, request.out, request.settings())
    return frame


def collect_metrics(model_spec: str, dataset_spec: str, *,
                    progress: ProgressCallback | None = None, **settings: Any) -> pd.DataFrame:
    """Metric records of one (model, dataset) group: the keyword form of :func:`run_metrics`.

    Args:
        model_spec: Model spec (see :func:`zest.load_model`).
        dataset_spec: Data set spec (see :func:`zest.load_dataset`).
        progress: Called as ``progress(done, total)`` after each batch.
        **settings: The other fields of :class:`MetricsRequest` (``out``, ``batch_size``,
            ``batches``, ``metrics``, ``probe_loss``, ``seed``, ``options``, ``granularity``,
            ``layer_names``, ``device``, ``checkpoint``).

    Returns:
        One row per (layer, batch).
    """
    return run_metrics(MetricsRequest(model_spec, dataset_spec, **settings), progress)


def save_metrics(frame: pd.DataFrame, out: str | os.PathLike, settings: dict[str, Any]) -> None:
    """Writes metric records to ``out`` atomically under its lock, replacing a metrics file of
    the same group (metrics are cheap to redo) and refusing any other file."""
    out = check_writable(out, "metrics")
    with file_lock(out):
        if out.exists():
            check_same_group(read_records(out, "metrics"), frame, out)
        write_records(frame, out, "metrics", settings)

"""``zest collect metrics``: per-layer zero-shot metrics of a (model, dataset) pair as records.

Implements step 1 of ZEST (project page, "we first collect zero-shot forward, backward, and
static metrics from the model"): for each of ``batches`` minibatches, one probe
(:func:`zest.probe.probe`) and every requested metric, one row per (layer, batch).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from torch import nn

from zest.data import Dataset, load_dataset
from zest.errors import InvalidInputError
from zest.layers import Layer, candidate_layers, check_granularity, select_layers
from zest.metrics import (
    METRICS,
    compute_metrics,
    get_metric,
    needs_labels,
    needs_of,
    resolve_metrics,
)
from zest.models import Task, check_model_spec, load_model, resolve_device
from zest.probe import probe
from zest.records import (
    METRIC_PREFIX,
    check_same_group,
    check_writable,
    file_lock,
    group_key,
    read_records,
    write_records,
    zest_version,
)

ProgressCallback = Callable[[int, int], None]


@dataclass
class DataOptions:
    """How to load a data set (ARCHITECTURE.md §3a options shared by every command)."""

    image_size: int | None = None
    max_length: int = 128
    max_train: int | None = None
    max_val: int | None = None
    max_test: int | None = None
    text_column: str = "text"
    label_column: str = "label"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        def integer(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if self.image_size is not None and not (integer(self.image_size)
                                                and self.image_size >= 8):
            raise InvalidInputError(f"--image-size must be an integer of at least 8, got "
                                    f"{self.image_size!r}; omit it for the model's default")
        if not (integer(self.max_length) and self.max_length >= 8):
            raise InvalidInputError(f"--max-length must be an integer of at least 8, got "
                                    f"{self.max_length!r}")
        for name in ("max_train", "max_val", "max_test"):
            cap = getattr(self, name)
            if cap is not None and not (integer(cap) and cap >= 1):
                flag = "--" + name.replace("_", "-")
                raise InvalidInputError(f"{flag} must be a positive integer, got {cap!r}; omit "
                                        "it to keep the whole split")

    def settings(self) -> dict[str, Any]:
        """The options as flat, JSON-friendly settings (``extra`` keys inline), as stamped into
        record files."""
        flat = {k: v for k, v in vars(self).items() if k != "extra"}
        return {**flat, **self.extra}


def load_pair(model_spec: str, dataset_spec: str, *, options: DataOptions | None = None,
              seed: int = 0, device: str = "cpu", checkpoint: str | None = None
              ) -> tuple[nn.Module, Task, Dataset]:
    """Loads a data set and a model with a head of the data set's class count; text data is
    tokenised with the model's tokenizer."""
    options = options or DataOptions()
    check_model_spec(model_spec)
    common = dict(max_length=options.max_length, seed=seed, max_train=options.max_train,
                  max_val=options.max_val, max_test=options.max_test,
                  text_column=options.text_column, label_column=options.label_column,
                  **options.extra)
    image_size = options.image_size or 64
    data = load_dataset(dataset_spec, image_size=image_size, **common)
    n_train = len(data.splits["train"])
    if n_train < 2:
        cap = f" (--max-train {options.max_train})" if options.max_train else ""
        raise InvalidInputError(f"the train split of {dataset_spec!r} has {n_train} example"
                                f"{'' if n_train == 1 else 's'}{cap}; at least 2 are needed: "
                                "raise --max-train or add data")
    model, task = load_model(model_spec, data.num_classes, seed=seed, device=device,
                             checkpoint=checkpoint, image_size=image_size)
    if task.modality != data.modality:
        raise InvalidInputError(f"model {model_spec!r} takes {task.modality} inputs but data set "
                                f"{dataset_spec!r} is {data.modality}; pair image models with "
                                "image data and text models with text data")
    if data.modality == "text":
        data = load_dataset(dataset_spec, image_size=image_size, tokenizer=task.tokenizer,
                            **common)
    return model, task, data


def probe_layers(model: nn.Module, task: Task, layer_names: Sequence[str] | None = None
                 ) -> list[Layer]:
    """The candidate layers, optionally restricted to ``layer_names``."""
    return select_layers(candidate_layers(model, task.head_name), layer_names)


def metrics_frame(model: nn.Module, task: Task, batches: Sequence[Any], *, metrics: Sequence[str],
                  probe_loss: str = "supcon", layer_names: Sequence[str] | None = None,
                  granularity: str = "module", progress: ProgressCallback | None = None,
                  device: Any = None, metrics_reader: str | None = None,
                  skipped: dict[str, str] | None = None) -> pd.DataFrame:
    """Probes each batch and returns one row per (layer, batch) with ``m_<metric>`` columns
    (without the model / dataset identity columns). ``metrics_reader`` names who asked for
    ``metrics`` (e.g. ``"the predictor"``) in the error for unlabelled batches; layers the probe
    had to leave out are added to ``skipped`` (name → reason) when given."""
    check_granularity(granularity)
    layers = probe_layers(model, task, layer_names)
    needs = needs_of(metrics)
    for index, batch in enumerate(batches):
        task.check_batch(batch, where=f"batch {index}")
    check_labels(task, batches, metrics, reader=metrics_reader)
    rows = []
    for index, batch in enumerate(batches):
        result = probe(model, task, batch, layers=layers, needs=needs, loss=probe_loss,
                       device=device, batch_label=f"batch {index}")
        values = compute_metrics(result.contexts, metrics)
        if skipped is not None:
            skipped.update(result.skipped)
        for layer in layers:
            if layer.name not in result.contexts:
                continue
            row = {"layer": layer.name, "layer_type": layer.type, "block": layer.block,
                   "depth": layer.depth, "n_params": layer.n_params}
            row.update({METRIC_PREFIX + k: v for k, v in values[layer.name].items()})
            row.update({"probe_loss": probe_loss, "batch_size": task.batch_size(batch),
                        "batch": index, "probe_seconds": result.seconds})
            rows.append(row)
        if progress is not None:
            progress(index + 1, len(batches))
    frame = pd.DataFrame(rows)
    return aggregate_blocks(frame, metrics) if granularity == "block" else frame


def check_labels(task: Task, batches: Sequence[Any], metrics: Sequence[str],
                 reader: str | None = None) -> None:
    """Raises when a batch has no labels but some of ``metrics`` need them, naming those
    metrics (and ``reader``, e.g. ``"the predictor"``, when it asked for them) and the
    label-free metrics that would work."""
    labelled = [name for name in metrics if needs_labels(name)]
    unlabelled = [i for i, batch in enumerate(batches) if not task.has_labels(batch)]
    if not (labelled and unlabelled):
        return
    names = ", ".join(labelled)
    verb = "needs" if len(labelled) == 1 else "need"
    what = f"{reader} reads {names}, which {verb}" if reader else f"{names} {verb}"
    free = [name for name in METRICS.names() if not needs_labels(name)]
    raise InvalidInputError(
        f"batch {unlabelled[0]} has no labels, but {what} them; pass labelled batches ((images, "
        "labels) pairs or dicts with 'labels'), or rank by a label-free metric (--by / by=): "
        f"{', '.join(free)}")


def aggregate_blocks(frame: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """Combines layer rows into one row per (block, batch) with each metric's aggregate."""
    how = {"mean": "mean", "sum": "sum", "max": "max",
           "rss": lambda s: float(np.sqrt((s.astype(float) ** 2).sum()))}
    spec: dict[str, Any] = {METRIC_PREFIX + m: how[get_metric(m).aggregate] for m in metrics}
    spec.update({"depth": "mean", "n_params": "sum", "probe_loss": "first",
                 "batch_size": "first", "probe_seconds": "first",
                 "layer_type": lambda s: "block"})
    blocks = frame.groupby(["block", "batch"], sort=False).agg(spec).reset_index()
    blocks["layer"] = blocks["block"]
    return blocks


def metrics_settings(*, batch_size: int, batches: int, metrics: Sequence[str], probe_loss: str,
                     seed: int, options: DataOptions | None, granularity: str,
                     layer_names: Sequence[str] | None, checkpoint: str | None) -> dict[str, Any]:
    """Every setting that changes a metrics collection's values, as stamped into its file."""
    return {"batch_size": int(batch_size), "batches": int(batches), "metrics": list(metrics),
            "probe_loss": probe_loss, "data_seed": int(seed),
            **(options or DataOptions()).settings(), "granularity": granularity,
            "layers": list(layer_names) if layer_names else None, "checkpoint": checkpoint}


def collect_metrics(model_spec: str, dataset_spec: str, *, batch_size: int = 32,
                    batches: int = 1, metrics: str | Sequence[str] = "all",
                    probe_loss: str = "supcon", seed: int = 0,
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
        metrics: ``all``, a family or a list of metric names.
        probe_loss: ``supcon`` or ``ce``.
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

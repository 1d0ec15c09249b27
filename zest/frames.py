"""Metric tables from probes: one row per (layer, minibatch) with ``m_<metric>`` columns, the
label check and block aggregation. Shared by ``zest rank`` (online) and ``zest collect metrics``
(offline)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
from torch import nn

from zest.errors import InvalidInputError
from zest.fingerprint import model_fingerprint
from zest.layers import Layer, candidate_layers, check_granularity, select_layers
from zest.metrics import (
    METRICS,
    compute_metrics,
    get_metric,
    needs_labels,
    needs_of,
    uses_weights_alone,
)
from zest.models import Task
from zest.probe import probe
from zest.records import (
    METRIC_PREFIX,
)

ProgressCallback = Callable[[int, int], None]


def probe_layers(model: nn.Module, task: Task, layer_names: Sequence[str] | None = None
                 ) -> list[Layer]:
    """The candidate layers, optionally restricted to ``layer_names``."""
    return select_layers(candidate_layers(model, task.head_name), layer_names)


def metrics_frame(model: nn.Module, task: Task, batches: Sequence[Any], *, metrics: Sequence[str],
                  probe_loss: str | None = None, layer_names: Sequence[str] | None = None,
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
    # the metrics of the weights alone are computed once per model, not per batch or call
    fingerprint = model_fingerprint(model, task.head_name) if uses_weights_alone(metrics) \
        else None
    rows = []
    for index, batch in enumerate(batches):
        result = probe(model, task, batch, layers=layers, needs=needs, loss=probe_loss,
                       device=device, batch_label=f"batch {index}")
        values = compute_metrics(result.contexts, metrics, weights_fingerprint=fingerprint)
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
        del result, values  # the next batch's probe must not run beside this one's tensors
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
    labelled_form = ("dicts with batch['labels'] = batch['input_ids'], a causal LM's labels"
                     if task.kind == "causal_lm" else
                     "(images, labels) pairs or dicts with 'labels'")
    raise InvalidInputError(
        f"batch {unlabelled[0]} has no labels, but {what} them; pass labelled batches "
        f"({labelled_form}), or rank with by set to a label-free metric: {', '.join(free)}",
        parameter="by")


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

"""The jobs of a ground-truth collection: which (block, seed) pairs are still to run for a record
file, after checking that a file being resumed holds the same group with the same settings
(ARCHITECTURE.md §5 and §5b)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from zest.errors import DataError, RecordError
from zest.groundtruth.caches import PairSpec, cached_pair
from zest.groundtruth.settings import GroundTruthConfig, GroundTruthRequest, groundtruth_settings
from zest.layers import Layer, candidate_layers, group_by_block, select_layers, stratified_layers
from zest.records import (
    check_writable,
    group_key,
    read_records,
    record_settings,
    settings_difference,
)

#: The ``block`` of the job that trains the head alone (the baseline every layer's gain is
#: measured against).
BASELINE = "__head__"
MIN_VAL_EXAMPLES = 20


@dataclass(frozen=True)
class Job:
    """One unit of work: the layers of one block (or the baseline) for one seed."""

    pair: PairSpec
    config: GroundTruthConfig
    block: str
    layers: tuple[str, ...]
    seed: int
    threads: int = 0


@dataclass
class GroundTruthJobs:
    """The jobs of one collection and what is already done.

    Attributes:
        pair: The (model, data) pair.
        config: The training settings.
        layers: Every layer the collection covers (done or not).
        seeds: The ground-truth seeds.
        jobs: The jobs still to run: per seed, the baseline, then one per block with layers
            left.
        done: (layer, seed) rows already in the file.
        settings: The setting columns of every row.
        stamp: The settings to stamp into the file (empty for a file written before stamps).
    """

    pair: PairSpec
    config: GroundTruthConfig
    layers: list[Layer]
    seeds: list[int]
    jobs: list[Job]
    done: int
    settings: dict[str, Any]
    stamp: dict[str, Any] = field(default_factory=dict)


def list_jobs(request: GroundTruthRequest) -> GroundTruthJobs:
    """Loads the pair, checks it and the record file against ``request``, and lists the jobs
    still to run for ``request.out``."""
    config = request.config
    out = check_writable(request.out, "groundtruth")
    pair = PairSpec(request.model, request.dataset, request.options, request.data_seed,
                    request.device, request.checkpoint)
    model, task, data = cached_pair(pair)
    n_val = len(data.splits["val"])
    if n_val < MIN_VAL_EXAMPLES:
        raise DataError(f"data set {request.dataset!r} has only {n_val} validation examples (at "
                        f"least {MIN_VAL_EXAMPLES} are needed to score a layer); raise max_val "
                        "or use a larger data set", parameter="max_val")
    layers = select_layers(candidate_layers(model, task.head_name), request.layer_names)
    sampled = {}
    if request.layer_sample is not None:
        every = len(layers)
        layers = stratified_layers(layers, request.layer_sample)
        if len(layers) < every:  # a sample as large as the model is the whole model
            sampled = {"gt_layer_sample": len(layers)}
    settings = {"gt_steps": config.steps, "gt_lr": float(config.lr),
                "gt_batch_size": config.batch_size, "gt_train_size": len(data.splits["train"]),
                "gt_val_size": n_val,
                "image_size": data.image_size if data.modality == "image" else 0,
                "max_length": data.max_length if data.modality == "text" else 0, **sampled}
    stamp = {**groundtruth_settings(config, request.options, request.data_seed,
                                    request.checkpoint), **settings}
    done_keys: set[tuple] = set()
    if out.exists():
        stamp, done_keys = _resumed(out, group_key(request.model, request.dataset), stamp,
                                    {**settings, "data_seed": request.data_seed})
    threads = max(1, (os.cpu_count() or 1) // request.n_jobs) if request.n_jobs > 1 else 0
    jobs = []
    done = 0
    for seed in request.seeds:
        jobs.append(Job(pair, config, BASELINE, (), seed, threads))
        for block, members in group_by_block(layers).items():
            missing = tuple(m.name for m in members if (m.name, seed) not in done_keys)
            done += len(members) - len(missing)
            if missing:
                jobs.append(Job(pair, config, block, missing, seed, threads))
    return GroundTruthJobs(pair, config, layers, list(request.seeds), jobs, done, settings,
                           stamp)


def _resumed(out: os.PathLike, group: str, stamp: dict[str, Any], columns: dict[str, Any]
             ) -> tuple[dict[str, Any], set[tuple]]:
    """Checks that the record file ``out`` holds ``group`` collected with the same settings
    (its stamp, or for a file written before stamps, the setting ``columns`` its rows carry);
    returns the stamp to keep writing and the (layer, seed) keys already done."""
    existing = read_records(out, "groundtruth")
    groups = set(existing["group"].unique())
    if groups and groups != {group}:
        raise RecordError(f"{str(out)!r} holds group {sorted(groups)[0]!r}, not {group!r}; "
                          "write each (model, dataset) group to its own file")
    stamped = record_settings(out)
    if stamped is not None:
        difference = settings_difference(stamped, stamp)
    else:  # written before settings were stamped: compare the setting columns it has
        columns = {c: v for c, v in columns.items() if c in existing and len(existing)}
        difference = settings_difference(
            {c: existing[c].iloc[0].item() if hasattr(existing[c].iloc[0], "item")
             else existing[c].iloc[0] for c in columns}, columns)
        stamp = {}
    if difference:
        raise RecordError(f"{str(out)!r} was collected with {difference}; use the same "
                          "settings to resume, or write to another out", parameter="out")
    done_keys = {(layer, int(seed)) for layer, seed in
                 existing[["layer", "gt_seed"]].itertuples(index=False, name=None)}
    return stamp, done_keys

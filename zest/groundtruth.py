"""Ground truth: how much fine-tuning one layer (plus a fresh head) helps (ZEST, ARCHITECTURE.md
§5).

For every candidate layer and seed, the layer's weight and bias are trained together with a
freshly initialised head for ``steps`` steps on the train split, then accuracy and cross-entropy
are measured on the val split. The head-only baseline uses the same steps, learning rate, head
initialisation and batch order, so ``gt_gain = gt_score − gt_baseline`` isolates the layer.
For a causal-LM task (``lm:<text data set>``) the layer trains alone (the pretrained LM head is
kept), accuracy and cross-entropy are over the val split's next tokens, and the baseline is the
untouched pretrained model (ARCHITECTURE.md §3c).

Speed: everything before the tuned layer's block is frozen, so its output is computed once per
example (eval mode, no augmentation) and reused for every step and every layer of that block
(:mod:`zest.stages`); only the suffix runs forward and backward. The prefix runs only over the
train examples the seed's batch order draws (and every val example), in chunks of texts of
similar length, each trimmed to its longest text. The whole model stays in eval mode (frozen
normalisation statistics, no dropout) so cached and uncached runs compute the same thing.

Jobs are (block, seed) pairs, run serially, with joblib (``n_jobs``) or on a dask.distributed
cluster; the driver alone appends finished rows to the record file (atomically, under a lock),
so a killed collector resumes where it stopped.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from zest.data import LM_PREFIX, Dataset
from zest.errors import DataError, InvalidInputError, RecordError
from zest.layers import Layer, candidate_layers, group_by_block, select_layers, stratified_layers
from zest.loading import DataOptions, load_pair
from zest.models import Task, TaskOutput, check_finite, preserved_training_state
from zest.records import (
    GROUNDTRUTH_KEY,
    append_records,
    check_writable,
    group_key,
    read_records,
    record_settings,
    settings_difference,
    zest_version,
)
from zest.stages import StagePlan, State, pad_tokens, slice_state, stage_plan, trim_padding

BASELINE = "__head__"
MIN_VAL_EXAMPLES = 20
SETTING_COLUMNS = ("gt_steps", "gt_lr", "gt_batch_size", "gt_train_size", "gt_val_size",
                   "image_size", "max_length")


@dataclass(frozen=True)
class GroundTruthConfig:
    """Settings of one ground-truth collection.

    Attributes:
        steps: Optimisation steps per layer (and for the head-only baseline).
        lr: Adam learning rate, shared by the layer and the head.
        batch_size: Training minibatch size.
        eval_batch_size: Batch size of the cache pass and of validation.
        use_cache: Reuse the frozen prefix's outputs (disable only to measure or debug).
    """

    steps: int = 100
    lr: float = 1e-3
    batch_size: int = 32
    eval_batch_size: int = 128
    use_cache: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps <= 0:
            raise InvalidInputError(f"--steps must be a positive integer, got {self.steps!r}")
        if not (isinstance(self.lr, int | float) and self.lr > 0 and math.isfinite(self.lr)):
            raise InvalidInputError(f"--lr must be a positive number, got {self.lr!r}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise InvalidInputError(f"batch sizes must be ≥ 1, got {self.batch_size} and "
                                    f"{self.eval_batch_size}")


@dataclass(frozen=True)
class PairSpec:
    """What a worker needs to rebuild the (model, data) pair of a group."""

    model: str
    dataset: str
    options: DataOptions = field(default_factory=DataOptions)
    data_seed: int = 0
    device: str = "cpu"
    checkpoint: str | None = None

    def key(self) -> tuple:
        return (self.model, self.dataset, repr(self.options), self.data_seed, self.device,
                self.checkpoint)


@dataclass(frozen=True)
class Job:
    """One unit of work: the layers of one block (or the baseline) for one seed."""

    pair: PairSpec
    config: GroundTruthConfig
    block: str
    layers: tuple[str, ...]
    seed: int
    threads: int = 0


# ---------------------------------------------------------------------------------------------
# Training one layer
# ---------------------------------------------------------------------------------------------

_PAIRS: dict[tuple, tuple[nn.Module, Task, Dataset]] = {}


@dataclass
class PrefixCache:
    """The outputs of stages ``0..stop-1`` of some examples of one split.

    Attributes:
        stop: The first stage not run.
        examples: The split's example indices held, ascending (row ``i`` of ``state`` is example
            ``examples[i]``).
        state: The stage state (text: padded back to the split's width).
    """

    stop: int
    examples: torch.Tensor
    state: State

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """The rows of the examples ``index`` (each must be held)."""
        rows = torch.searchsorted(self.examples, index)
        if bool((rows >= len(self.examples)).any()) or not torch.equal(self.examples[rows], index):
            raise RuntimeError("the prefix cache does not hold every example of the batch")
        return rows


#: Per loaded pair and split (``(pair key, eval batch size, split)``), the last frozen-prefix
#: outputs computed in this process. The prefix is frozen and the model is restored after every
#: job, so a later job whose layers sit deeper, over the same examples, continues from there
#: instead of re-running the prefix from the input: across the blocks of one seed the prefix
#: costs one forward pass of the data in all, not one per block. The val entry serves every
#: seed; the train entry holds the examples of one seed's batch order.
_PREFIXES: dict[tuple, PrefixCache] = {}


def _cached_pair(pair: PairSpec) -> tuple[nn.Module, Task, Dataset]:
    """The loaded (model, task, data) of ``pair``, kept per process so a worker loads each
    group once (jobs restore the model before they return)."""
    key = pair.key()
    if key not in _PAIRS:
        if len(_PAIRS) >= 2:
            evicted = next(iter(_PAIRS))
            _PAIRS.pop(evicted)
            for prefix_key in [k for k in _PREFIXES if k[0] == evicted]:
                _PREFIXES.pop(prefix_key)
        _PAIRS[key] = load_pair(pair.model, pair.dataset, options=pair.options,
                                seed=pair.data_seed, device=pair.device,
                                checkpoint=pair.checkpoint)
    return _PAIRS[key]


def _split_inputs(task: Task, data: Dataset, split: str, device: Any) -> tuple[Any, torch.Tensor]:
    part = data.splits[split]
    if task.modality == "image":
        return part.x, part.y
    if not isinstance(part.x, dict):
        raise DataError(f"text data set {data.name} was loaded without a tokenizer")
    return part.x, part.y


def _batch_of(task: Task, inputs: Any, labels: torch.Tensor, index: torch.Tensor) -> Any:
    """The examples ``index`` of a split (text: trimmed to the longest, see
    :func:`~zest.stages.trim_padding`)."""
    if task.modality == "image":
        return inputs[index], labels[index]
    return trim_padding({"input_ids": inputs["input_ids"][index],
                         "attention_mask": inputs["attention_mask"][index],
                         "labels": labels[index]})


def batch_order(n_examples: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """The example indices of each training step: seeded epochs of a random permutation (the
    same for every layer of a seed, so only the tuned layer differs between jobs)."""
    generator = torch.Generator().manual_seed(seed)
    size = min(batch_size, n_examples)
    order: list[torch.Tensor] = []
    while len(order) < steps:
        perm = torch.randperm(n_examples, generator=generator)
        for start in range(0, n_examples - size + 1, size):
            order.append(perm[start:start + size])
            if len(order) == steps:
                break
    return order


class _Trainer:
    """Trains (layer + head, or the layer alone for a causal-LM task) or the head alone, with
    or without the prefix cache."""

    def __init__(self, model: nn.Module, task: Task, data: Dataset, config: GroundTruthConfig,
                 plan: StagePlan | None, pair_key: tuple | None = None) -> None:
        self.pair_key = pair_key
        self.model = model
        self.task = task
        self.config = config
        self.plan = plan
        self.device = next(model.parameters()).device
        self.train_inputs, self.train_labels = _split_inputs(task, data, "train", self.device)
        self.val_inputs, self.val_labels = _split_inputs(task, data, "val", self.device)
        self.head = task.head(model)

    # -- cache ----------------------------------------------------------------------------
    def drawn_examples(self, seed: int) -> torch.Tensor:
        """The train examples that the batch order of ``seed`` draws, ascending (fewer than the
        split when ``steps × batch_size`` does not cover it)."""
        order = batch_order(self.train_labels.shape[0], self.config.batch_size,
                            self.config.steps, seed)
        return torch.unique(torch.cat(order))

    def prefix_states(self, stop: int, seed: int) -> tuple[PrefixCache, PrefixCache]:
        """Outputs of stages ``0..stop-1`` for the train examples that ``seed`` draws and for
        every val example, each continued from the deepest earlier prefix of this pair over the
        same examples when there is one (:data:`_PREFIXES`)."""
        train = self._prefix("train", self.train_inputs, self.train_labels,
                             self.drawn_examples(seed), stop)
        val = self._prefix("val", self.val_inputs, self.val_labels,
                           torch.arange(self.val_labels.shape[0]), stop)
        return train, val

    def _prefix(self, split: str, inputs: Any, labels: torch.Tensor, examples: torch.Tensor,
                stop: int) -> PrefixCache:
        key = (*self.pair_key, split) if self.pair_key is not None else None
        cached = _PREFIXES.get(key) if key is not None else None
        start, state = 0, None
        if cached is not None and cached.stop <= stop and torch.equal(cached.examples,
                                                                      examples):
            if cached.stop == stop:
                return cached
            start, state = cached.stop, cached.state
        if key is not None:
            _PREFIXES.pop(key, None)  # freed before the new prefix is built, unless continued
        prefix = PrefixCache(stop, examples,
                             self._run_prefix(inputs, labels, examples, start, stop, state))
        if key is not None:
            _PREFIXES[key] = prefix
        return prefix

    def _run_prefix(self, inputs: Any, labels: torch.Tensor, examples: torch.Tensor,
                    start: int, stop: int, state: State | None) -> State:
        """Stages ``start..stop-1`` over ``examples`` (from the input, or from ``state``: their
        stage-``start`` outputs, row per example), in chunks of ``eval_batch_size`` examples
        sorted by text length, each trimmed to its longest text and padded back to the split's
        width. The chunks are the same whether the prefix starts at the input or at a cached
        state, so both give the same values."""
        assert self.plan is not None
        n = len(examples)
        order = torch.arange(n)
        width = 0
        if isinstance(inputs, dict):  # text: similar lengths share a chunk
            mask = inputs["attention_mask"]
            width = mask.shape[1]
            order = torch.sort(mask[examples].sum(dim=1), stable=True).indices
        out: State = {}
        with torch.no_grad():
            for first in range(0, n, self.config.eval_batch_size):
                rows = order[first:first + self.config.eval_batch_size]
                if state is None:
                    batch = _batch_of(self.task, inputs, labels, examples[rows])
                    chunk = self.plan.start(self.task.model_inputs(batch, self.device))
                else:
                    chunk = trim_padding({k: v[rows] for k, v in state.items()})
                result = pad_tokens(self.plan.run(chunk, start, stop), width)
                for name, value in result.items():
                    if name not in out:
                        out[name] = value.new_empty((n, *value.shape[1:]))
                    out[name][rows.to(value.device)] = value
        return out

    # -- one run --------------------------------------------------------------------------
    def predictions(self, cache: PrefixCache | None, inputs: Any, labels: torch.Tensor,
                    index: torch.Tensor, first_stage: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and targets of the predictions of examples ``index``
        (:meth:`~zest.models.Task.predictions`: one per example, or one per next token): from
        the cache from ``first_stage`` on, or the full forward when uncached."""
        if self.plan is None or cache is None:
            batch = _batch_of(self.task, inputs, labels, index)
            return self.task.predictions(self.task.forward(self.model, batch, self.device))
        state = slice_state(cache.state, cache.rows(index))  # trimmed to the batch's longest
        features = self.plan.features(self.plan.run(state, first_stage))
        logits = self.head(features)
        next_tokens = None
        if self.task.kind == "causal_lm":  # the same trim as the state's
            batch = _batch_of(self.task, inputs, labels, index)
            next_tokens = self.task.next_tokens(batch).to(logits.device)
        return self.task.predictions(TaskOutput(logits=logits, features=features,
                                                labels=labels[index].to(logits.device),
                                                next_tokens=next_tokens))

    def fit_and_score(self, params: list[nn.Parameter], seed: int, first_stage: int,
                      train_cache: PrefixCache | None, val_cache: PrefixCache | None,
                      label: str) -> dict[str, float]:
        """Trains ``params`` (with the freshly reset head when the task has one) for
        ``config.steps`` and scores on val."""
        if self.task.tunes_head:
            self.task.reset_head(self.model, seed=seed)
        optimizer = torch.optim.Adam(params, lr=self.config.lr)
        order = batch_order(self.train_labels.shape[0], self.config.batch_size,
                            self.config.steps, seed)
        start = time.perf_counter()
        for step, index in enumerate(order):
            logits, targets = self.predictions(train_cache, self.train_inputs,
                                               self.train_labels, index, first_stage)
            loss = F.cross_entropy(logits, targets)
            check_finite(loss, f"step {step} of {label}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        accuracy, val_loss = self.evaluate(val_cache, first_stage)
        return {"score": accuracy, "loss": val_loss, "seconds": time.perf_counter() - start}

    def evaluate(self, val_cache: PrefixCache | None, first_stage: int
                 ) -> tuple[float, float]:
        """Accuracy and mean cross-entropy over the val split's predictions."""
        n = self.val_labels.shape[0]
        correct, total_loss, scored = 0, 0.0, 0
        with torch.no_grad():
            for start in range(0, n, self.config.eval_batch_size):
                index = torch.arange(start, min(n, start + self.config.eval_batch_size))
                logits, target = self.predictions(val_cache, self.val_inputs, self.val_labels,
                                                  index, first_stage)
                correct += int((logits.argmax(dim=1) == target).sum())
                total_loss += float(F.cross_entropy(logits, target, reduction="sum"))
                scored += int(target.shape[0])
        return correct / max(scored, 1), total_loss / max(scored, 1)

    def score_untouched(self) -> dict[str, float]:
        """The baseline of a causal-LM task: the pretrained model scored on val, untrained."""
        start = time.perf_counter()
        accuracy, val_loss = self.evaluate(None, 0)
        return {"score": accuracy, "loss": val_loss, "seconds": time.perf_counter() - start}


def run_job(job: Job) -> list[dict[str, Any]]:
    """Runs one job and returns one result dict per layer (or one for the baseline).

    The model is restored to its loaded state before returning, also when training fails.
    """
    if job.threads:
        torch.set_num_threads(job.threads)
    model, task, data = _cached_pair(job.pair)
    sample = _batch_of(task, *_split_inputs(task, data, "train", None), torch.arange(2))
    plan = stage_plan(model, task, sample) if job.config.use_cache else None
    trainer = _Trainer(model, task, data, job.config, plan,
                       pair_key=(job.pair.key(), job.config.eval_batch_size))
    # a causal-LM task keeps its pretrained LM head: it neither trains nor needs restoring
    head_params = list(trainer.head.parameters()) if task.tunes_head else []
    saved_head = {k: v.detach().clone() for k, v in trainer.head.state_dict().items()} \
        if task.tunes_head else None
    results = []
    with preserved_training_state(model):
        try:
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            if job.block == BASELINE and not task.tunes_head:
                results.append({"layer": BASELINE, **trainer.score_untouched(), "cached": False})
                return results
            if job.block == BASELINE:
                stop = len(plan.names) if plan is not None else 0
                train_cache, val_cache = (trainer.prefix_states(stop, job.seed)
                                          if plan is not None else (None, None))
                for p in head_params:
                    p.requires_grad_(True)
                out = trainer.fit_and_score(head_params, job.seed, stop, train_cache, val_cache,
                                            f"the head-only baseline (seed {job.seed})")
                results.append({"layer": BASELINE, **out, "cached": plan is not None})
                return results
            stages = [plan.stage_of(name) for name in job.layers] if plan is not None else [None]
            first = None if None in stages else min(stages)
            if plan is not None and first is not None:
                train_cache, val_cache = trainer.prefix_states(first, job.seed)
            else:
                train_cache = val_cache = None
                first = 0
            for name in job.layers:
                module = model.get_submodule(name)
                own = [p for p in module._parameters.values() if p is not None]  # noqa: SLF001
                saved = [p.detach().clone() for p in own]
                try:
                    for p in own + head_params:
                        p.requires_grad_(True)
                    out = trainer.fit_and_score(own + head_params, job.seed, first, train_cache,
                                                val_cache, f"layer {name} (seed {job.seed})")
                finally:
                    with torch.no_grad():
                        for p, value in zip(own, saved, strict=True):
                            p.copy_(value)
                            p.requires_grad_(False)
                results.append({"layer": name, **out, "cached": train_cache is not None})
            return results
        finally:
            if saved_head is not None:
                with torch.no_grad():
                    trainer.head.load_state_dict(saved_head)


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

@dataclass
class GroundTruthPlan:
    """The jobs of one collection and what is already done."""

    pair: PairSpec
    config: GroundTruthConfig
    layers: list[Layer]
    seeds: list[int]
    jobs: list[Job]
    done: int
    settings: dict[str, Any]
    stamp: dict[str, Any] = field(default_factory=dict)


def groundtruth_settings(config: GroundTruthConfig, options: DataOptions, data_seed: int,
                         checkpoint: str | None) -> dict[str, Any]:
    """Every setting that changes the data or the training of a ground-truth collection, as
    stamped into its record file (a resume must match them all)."""
    return {"gt_steps": config.steps, "gt_lr": float(config.lr),
            "gt_batch_size": config.batch_size, "data_seed": int(data_seed),
            **options.settings(), "checkpoint": checkpoint}


def plan_groundtruth(model_spec: str, dataset_spec: str, out: str | os.PathLike, *,
                     config: GroundTruthConfig | None = None, seeds: Sequence[int] = (0, 1),
                     options: DataOptions | None = None, layer_names: Sequence[str] | None = None,
                     data_seed: int = 0, device: str = "cpu", checkpoint: str | None = None,
                     n_jobs: int = 1, layer_sample: int | None = None) -> GroundTruthPlan:
    """Validates the inputs and lists the jobs still to run for ``out``."""
    config = config or GroundTruthConfig()
    options = options or DataOptions()
    seeds = list(seeds)
    if not seeds:
        raise InvalidInputError("--seeds is empty; pass e.g. --seeds 0,1")
    if layer_sample is not None and layer_names:
        raise InvalidInputError("--sample-layers and --layers both choose the layers; pass one")
    out = check_writable(out, "groundtruth")
    pair = PairSpec(model_spec, dataset_spec, options, data_seed, device, checkpoint)
    model, task, data = _cached_pair(pair)
    n_val = len(data.splits["val"])
    if n_val < MIN_VAL_EXAMPLES:
        raise DataError(f"data set {dataset_spec!r} has only {n_val} validation examples (at "
                        f"least {MIN_VAL_EXAMPLES} are needed to score a layer); raise --max-val "
                        "or use a larger data set")
    layers = select_layers(candidate_layers(model, task.head_name), layer_names)
    sampled = {}
    if layer_sample is not None:
        every = len(layers)
        layers = stratified_layers(layers, layer_sample)
        if len(layers) < every:  # a sample as large as the model is the whole model
            sampled = {"gt_layer_sample": len(layers)}
    settings = {"gt_steps": config.steps, "gt_lr": float(config.lr),
                "gt_batch_size": config.batch_size, "gt_train_size": len(data.splits["train"]),
                "gt_val_size": n_val,
                "image_size": data.image_size if data.modality == "image" else 0,
                "max_length": data.max_length if data.modality == "text" else 0, **sampled}
    stamp = {**groundtruth_settings(config, options, data_seed, checkpoint), **settings}
    group = group_key(model_spec, dataset_spec)
    done_keys: set[tuple] = set()
    if out.exists():
        existing = read_records(out, "groundtruth")
        groups = set(existing["group"].unique())
        if groups and groups != {group}:
            raise RecordError(f"{str(out)!r} holds group {sorted(groups)[0]!r}, not {group!r}; "
                              "write each (model, dataset) group to its own file")
        stamped = record_settings(out)
        if stamped is not None:
            difference = settings_difference(stamped, stamp)
        else:  # written before settings were stamped: compare the setting columns it has
            columns = {c: v for c, v in {**settings, "data_seed": data_seed}.items()
                       if c in existing and len(existing)}
            difference = settings_difference(
                {c: existing[c].iloc[0].item() if hasattr(existing[c].iloc[0], "item")
                 else existing[c].iloc[0] for c in columns}, columns)
            stamp = {}
        if difference:
            raise RecordError(f"{str(out)!r} was collected with {difference}; use the same "
                              "settings to resume, or write to another --out")
        done_keys = {(layer, int(seed)) for layer, seed in
                     existing[["layer", "gt_seed"]].itertuples(index=False, name=None)}
    threads = max(1, (os.cpu_count() or 1) // n_jobs) if n_jobs > 1 else 0
    jobs = []
    done = 0
    for seed in seeds:
        jobs.append(Job(pair, config, BASELINE, (), seed, threads))
        for block, members in group_by_block(layers).items():
            missing = tuple(m.name for m in members if (m.name, seed) not in done_keys)
            done += len(members) - len(missing)
            if missing:
                jobs.append(Job(pair, config, block, missing, seed, threads))
    return GroundTruthPlan(pair, config, layers, seeds, jobs, done, settings, stamp)


def _execute(jobs: Sequence[Job], n_jobs: int, backend: str, scheduler: str | None
             ) -> Iterator[tuple[Job, list[dict[str, Any]]]]:
    if backend == "dask":
        yield from _execute_on_dask(jobs, scheduler)
        return
    if backend != "loky":
        raise InvalidInputError(f"unknown backend {backend!r}; use 'loky' or 'dask'")
    if n_jobs <= 1:
        for job in jobs:
            yield job, run_job(job)
        return
    from concurrent.futures import as_completed

    from joblib.externals.loky import get_reusable_executor

    # workers watch the driver and exit when it is gone (a `kill -9` of the driver must not
    # leave them training, or idling for minutes)
    executor = get_reusable_executor(max_workers=n_jobs, initializer=_exit_with_driver,
                                     initargs=(os.getpid(),))
    futures = {executor.submit(run_job, job): job for job in jobs}
    for future in as_completed(futures):
        yield futures[future], future.result()


def _exit_with_driver(driver_pid: int) -> None:
    """Worker initializer: a daemon thread that ends the worker once its driver has died (the
    worker is then re-parented, so its parent process id changes)."""
    import threading

    def watch() -> None:
        while os.getppid() == driver_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="zest-driver-watch", daemon=True).start()


#: Seconds without any finished job and without any worker before a dask run gives up.
DASK_NO_WORKER_SECONDS = 60.0


def _shippable(job: Job) -> Job:
    """The job with its data set and checkpoint paths made absolute, so that workers started
    in another folder find the files the driver found (the records keep the user's spec)."""
    pair = job.pair
    task_prefix = LM_PREFIX if pair.dataset.startswith(LM_PREFIX) else ""
    prefix, sep, rest = pair.dataset[len(task_prefix):].partition(":")
    dataset = pair.dataset
    if sep and prefix in ("csv", "parquet", "npz", "imagefolder") and rest:
        dataset = f"{task_prefix}{prefix}:{Path(rest).expanduser().resolve()}"
    checkpoint = str(Path(pair.checkpoint).expanduser().resolve()) if pair.checkpoint else None
    model = pair.model
    if model.startswith("hf:"):
        model = f"hf:{Path(model[3:]).expanduser().resolve()}"
    return replace(job, pair=replace(pair, model=model, dataset=dataset, checkpoint=checkpoint))


def _execute_on_dask(jobs: Sequence[Job], scheduler: str | None
                     ) -> Iterator[tuple[Job, list[dict[str, Any]]]]:
    try:
        from dask.distributed import Client, wait
    except ImportError:
        raise InvalidInputError("--backend dask needs dask.distributed; run: pip install "
                                "'zest[dask]'") from None
    if not scheduler:
        raise InvalidInputError("--backend dask needs --scheduler ADDRESS (e.g. "
                                "tcp://127.0.0.1:8786)")
    try:
        client = Client(scheduler, timeout=15)
    except (OSError, TimeoutError, ValueError) as exc:
        raise InvalidInputError(f"cannot reach the dask scheduler at {scheduler!r} "
                                f"({type(exc).__name__}); start it with `dask scheduler` and "
                                "check the address") from None
    with client:
        futures = {client.submit(run_job, _shippable(job), pure=False): job for job in jobs}
        pending = set(futures)
        waited = 0.0
        while pending:
            try:
                done, pending = wait(pending, timeout=5, return_when="FIRST_COMPLETED")
            except TimeoutError:
                done = set()
            for future in done:
                waited = 0.0
                yield futures[future], future.result()
            if done:
                continue
            try:
                workers = client.scheduler_info().get("workers", {})
            except (OSError, TimeoutError) as exc:
                raise InvalidInputError(f"lost the dask scheduler at {scheduler!r} "
                                        f"({type(exc).__name__}); finished rows are kept: "
                                        "restart it and rerun to resume") from None
            waited = waited + 5 if not workers else 0.0
            if waited >= DASK_NO_WORKER_SECONDS:
                raise InvalidInputError(f"the dask cluster at {scheduler!r} has had no worker "
                                        f"for {int(waited)} s; finished rows are kept: start "
                                        f"workers (dask worker {scheduler}) and rerun to "
                                        "resume")


def collect_groundtruth(model_spec: str, dataset_spec: str, out: str | os.PathLike, *,
                        config: GroundTruthConfig | None = None, seeds: Sequence[int] = (0, 1),
                        options: DataOptions | None = None,
                        layer_names: Sequence[str] | None = None, data_seed: int = 0,
                        device: str = "cpu", checkpoint: str | None = None, n_jobs: int = 1,
                        backend: str = "loky", scheduler: str | None = None,
                        layer_sample: int | None = None,
                        progress: Callable[[int, int], None] | None = None) -> pd.DataFrame:
    """Collects (or resumes) the ground-truth records of one group into ``out``.

    Args:
        model_spec: Model spec.
        dataset_spec: Data set spec.
        out: Parquet file; rows already there are kept and not recomputed.
        config: Steps, learning rate, batch sizes.
        seeds: Ground-truth seeds (head initialisation and batch order).
        options: Data loading options (image size, caps, ...).
        layer_names: Restrict to these layers or blocks.
        data_seed: Seed of the train/val/test split.
        device: ``cpu``/``cuda``/``auto``.
        checkpoint: Weights for ``timm:<arch>``.
        n_jobs: Parallel joblib workers (torch threads are split between them).
        backend: ``loky`` (joblib) or ``dask``.
        scheduler: dask.distributed scheduler address for ``backend="dask"``.
        layer_sample: Collect only a stratified sample of this many candidate layers
            (:func:`~zest.layers.stratified_layers`: every role, spread over depth), for models
            with hundreds of candidates; recorded as ``gt_layer_sample`` (see
            metric_collection/README.md, fidelity study).
        progress: Called as ``progress(layers_done, layers_total)``.

    Returns:
        All the rows of ``out`` after the run.
    """
    if n_jobs < 1:
        raise InvalidInputError(f"--n-jobs must be ≥ 1, got {n_jobs}")
    if backend not in ("loky", "dask"):
        raise InvalidInputError(f"unknown backend {backend!r}; use 'loky' or 'dask'")
    plan = plan_groundtruth(model_spec, dataset_spec, out, config=config, seeds=seeds,
                            options=options, layer_names=layer_names, data_seed=data_seed,
                            device=device, checkpoint=checkpoint, n_jobs=n_jobs,
                            layer_sample=layer_sample)
    total = len(plan.layers) * len(plan.seeds)
    done = plan.done
    if progress is not None:
        progress(done, total)
    layer_info = {layer.name: layer for layer in plan.layers}
    baselines = recorded_baselines(out)
    baseline_jobs = [j for j in plan.jobs if j.block == BASELINE and j.seed not in baselines
                     and any(k.seed == j.seed and k.block != BASELINE for k in plan.jobs)]
    layer_jobs = [j for j in plan.jobs if j.block != BASELINE]
    for job, results in _execute(baseline_jobs, n_jobs, backend, scheduler):
        baselines[job.seed] = results[0]
    for job, results in _execute(layer_jobs, n_jobs, backend, scheduler):
        rows = [_row(plan, layer_info[r["layer"]], r, baselines[job.seed], job.seed)
                for r in results]
        append_records(pd.DataFrame(rows), out, GROUNDTRUTH_KEY, kind="groundtruth",
                       settings=plan.stamp or None)
        done += len(rows)
        if progress is not None:
            progress(done, total)
    return read_records(out, "groundtruth") if Path(out).exists() else pd.DataFrame()


def recorded_baselines(out: str | os.PathLike) -> dict[int, dict[str, float]]:
    """The head-only baselines already in a record file, per seed (a resumed collection reuses
    them instead of training the baseline again)."""
    if not Path(out).exists():
        return {}
    frame = read_records(out, "groundtruth")
    return {int(seed): {"score": float(part["gt_baseline"].iloc[0]),
                        "loss": float(part["gt_loss_baseline"].iloc[0])}
            for seed, part in frame.groupby("gt_seed")}


def _row(plan: GroundTruthPlan, layer: Layer, result: dict[str, Any], baseline: dict[str, float],
         seed: int) -> dict[str, Any]:
    pair = plan.pair
    return {
        "model": pair.model, "dataset": pair.dataset, "group": group_key(pair.model, pair.dataset),
        "layer": layer.name, "layer_type": layer.type, "block": layer.block,
        "depth": layer.depth, "n_params": layer.n_params,
        "gt_score": result["score"], "gt_baseline": baseline["score"],
        "gt_gain": result["score"] - baseline["score"],
        "gt_loss": result["loss"], "gt_loss_baseline": baseline["loss"],
        "gt_loss_gain": baseline["loss"] - result["loss"],
        "gt_seed": seed, "gt_seconds": result["seconds"], "gt_cached": bool(result["cached"]),
        **plan.settings, "data_seed": pair.data_seed, "zest_version": zest_version(),
    }


def seed_list(text: str | Iterable[int]) -> list[int]:
    """Parses ``--seeds 0,1,2``."""
    if not isinstance(text, str):
        return [int(s) for s in text]
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise InvalidInputError(f"--seeds must be comma-separated integers, got {text!r}") \
            from None
    if not seeds:
        raise InvalidInputError("--seeds is empty; pass e.g. --seeds 0,1")
    return sorted(set(seeds))

"""Training one layer (or the head alone) for the ground truth and scoring it on val, from the
frozen-prefix cache or with full forward passes (ARCHITECTURE.md §5).

This loop is the ground truth's own, apart from :class:`zest.finetune.Tuner`'s, on purpose: it
measures one layer in isolation, so it trains with Adam (no weight decay) for a fixed number of
steps on a batch order shared by every layer of a seed, keeps the whole model in eval mode, runs
only the suffix after the cached prefix, and scores val once at the end (no epoch selection on
val). The val scoring itself is the shared :class:`~zest.prediction_scores.PredictionScore`.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zest.data import Dataset
from zest.groundtruth.batches import batch_of, batch_order, split_inputs
from zest.groundtruth.caches import PREFIXES
from zest.groundtruth.settings import GroundTruthConfig
from zest.models import Task, TaskOutput, check_finite
from zest.prediction_scores import PredictionScore
from zest.stages import PrefixCache, StagePlan, State, pad_tokens, slice_state, trim_padding


class LayerTrainer:
    """Trains (layer + head, or the layer alone for a causal-LM task) or the head alone, with
    or without the prefix cache.

    Args:
        model: The loaded model (frozen by the caller but for what it trains).
        task: Its task.
        data: The data set, tokenised for text.
        config: Steps, learning rate, batch sizes.
        plan: The model's stage plan, or ``None`` to run full forward passes.
        pair_key: Key of the pair in :data:`~zest.groundtruth.caches.PREFIXES` (``None``: the
            prefixes are computed but not kept).
    """

    def __init__(self, model: nn.Module, task: Task, data: Dataset, config: GroundTruthConfig,
                 plan: StagePlan | None, pair_key: tuple | None = None) -> None:
        self.pair_key = pair_key
        self.model = model
        self.task = task
        self.config = config
        self.plan = plan
        self.device = next(model.parameters()).device
        self.train_inputs, self.train_labels = split_inputs(task, data, "train")
        self.val_inputs, self.val_labels = split_inputs(task, data, "val")
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
        same examples when there is one (:data:`~zest.groundtruth.caches.PREFIXES`)."""
        train = self._prefix("train", self.train_inputs, self.train_labels,
                             self.drawn_examples(seed), stop)
        val = self._prefix("val", self.val_inputs, self.val_labels,
                           torch.arange(self.val_labels.shape[0]), stop)
        return train, val

    def _prefix(self, split: str, inputs: Any, labels: torch.Tensor, examples: torch.Tensor,
                stop: int) -> PrefixCache:
        key = (*self.pair_key, split) if self.pair_key is not None else None
        cached = PREFIXES.get(key) if key is not None else None
        start, state = 0, None
        if cached is not None and cached.stop <= stop and torch.equal(cached.examples,
                                                                      examples):
            if cached.stop == stop:
                return cached
            start, state = cached.stop, cached.state
        if key is not None:
            PREFIXES.pop(key, None)  # freed before the new prefix is built, unless continued
        prefix = PrefixCache(stop, examples,
                             self._run_prefix(inputs, labels, examples, start, stop, state))
        if key is not None:
            PREFIXES[key] = prefix
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
                    batch = batch_of(self.task, inputs, labels, examples[rows])
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
            batch = batch_of(self.task, inputs, labels, index)
            return self.task.predictions(self.task.forward(self.model, batch, self.device))
        state = slice_state(cache.state, cache.rows(index))  # trimmed to the batch's longest
        features = self.plan.features(self.plan.run(state, first_stage))
        logits = self.head(features)
        next_tokens = None
        if self.task.kind == "causal_lm":  # the same trim as the state's
            batch = batch_of(self.task, inputs, labels, index)
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
            # zeroed before the backward pass: the head's gradients of the previous layer's
            # run must not reach this run's first step
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        accuracy, val_loss = self.evaluate(val_cache, first_stage)
        return {"score": accuracy, "loss": val_loss, "seconds": time.perf_counter() - start}

    def evaluate(self, val_cache: PrefixCache | None, first_stage: int
                 ) -> tuple[float, float]:
        """Accuracy and mean cross-entropy over the val split's predictions."""
        n = self.val_labels.shape[0]
        score = PredictionScore()
        with torch.no_grad():
            for start in range(0, n, self.config.eval_batch_size):
                index = torch.arange(start, min(n, start + self.config.eval_batch_size))
                score.add(*self.predictions(val_cache, self.val_inputs, self.val_labels,
                                            index, first_stage))
        return score.accuracy, score.loss

    def score_untouched(self) -> dict[str, float]:
        """The baseline of a causal-LM task: the pretrained model scored on val, untrained."""
        start = time.perf_counter()
        accuracy, val_loss = self.evaluate(None, 0)
        return {"score": accuracy, "loss": val_loss, "seconds": time.perf_counter() - start}

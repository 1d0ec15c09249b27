"""The training loop every tuner runs (ARCHITECTURE.md §3a): AdamW on what
:meth:`Tuner.prepare <zest.finetune.base.Tuner.prepare>` made trainable, the task's
cross-entropy (of the labels, or of every next token for a causal-LM task), validation every
epoch, the model of the best validation epoch kept, early stopping, and a non-finite loss
stopped with the last good values restored.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from zest.data import Dataset
from zest.errors import InvalidInputError, NonFiniteLossError
from zest.finetune.memory import training_state
from zest.prediction_scores import PredictionScore

if TYPE_CHECKING:
    from zest.finetune.base import Tuner

ProgressCallback = Callable[[dict[str, Any]], None]


@dataclass
class EpochRecord:
    """Metrics of one epoch. Accuracies and losses are per scored prediction: per example, or
    per next token for a causal-LM task (whose perplexity is ``exp(loss)``)."""

    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    seconds: float
    test_loss: float | None = None
    test_accuracy: float | None = None


def better_epoch(record: EpochRecord, best: EpochRecord, task_kind: str) -> bool:
    """Whether ``record`` is a better validation epoch than ``best``: the higher val accuracy
    (ties: the lower val loss) for classification, the lower val next-token loss for a
    causal-LM task (perplexity is its exponential)."""
    if task_kind == "causal_lm":
        return record.val_loss < best.val_loss
    return (record.val_accuracy, -record.val_loss) > (best.val_accuracy, -best.val_loss)


class TrainingLoop:
    """The loop half of :class:`~zest.finetune.base.Tuner` (its base class): :meth:`fit`,
    :meth:`evaluate` and the snapshots a non-finite loss or a better earlier epoch restores."""

    def fit(self, data: Dataset, epochs: int = 3, batch_size: int = 32,
            progress: ProgressCallback | None = None, max_steps: int | None = None,
            test_each_epoch: bool = False, patience: int | None = None) -> Tuner:
        """Selects, then trains for at most ``epochs`` with validation after each one, and
        keeps the model of the best validation epoch (:func:`better_epoch`).

        Args:
            data: A data set (text data must be tokenised with ``task.tokenizer``).
            epochs: The most passes over the train split.
            batch_size: Training batch size.
            progress: Called with a dict after every step (``step``, ``loss``) and epoch.
            max_steps: Stop after this many steps (for benchmarks).
            test_each_epoch: Also score the test split after every epoch.
            patience: Early stopping: stop once this many epochs in a row have not improved
                on the best validation epoch (``None``: train every epoch).

        Returns:
            ``self``; ``history_`` (every epoch trained), ``best_epoch_`` (the epoch whose
            trained values the model holds now), ``trainable_params_``, ``peak_memory_mb_``
            and ``seconds_`` are set; ``optimizer_`` holds the optimizer (its state covers
            only the trained values).
        """
        if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
            raise InvalidInputError(f"epochs must be a positive integer, got {epochs!r}")
        if patience is not None and (not isinstance(patience, int) or isinstance(patience, bool)
                                     or patience < 1):
            raise InvalidInputError(f"patience must be a positive integer or None, got "
                                    f"{patience!r}")
        with training_state(self.model, self.task, self.gradient_checkpointing):
            return self._fit(data, epochs, batch_size, progress, max_steps, test_each_epoch,
                             patience)

    def _fit(self, data: Dataset, epochs: int, batch_size: int,
             progress: ProgressCallback | None, max_steps: int | None,
             test_each_epoch: bool, patience: int | None) -> Tuner:
        start = time.perf_counter()
        self.prepare(self.selection_batches_of(data, batch_size))
        params = self.trainable_parameters()
        optimizer = self.optimizer_ = torch.optim.AdamW(params, lr=self.lr,
                                                         weight_decay=self.weight_decay)
        self.history_: list[EpochRecord] = []
        self.stopped_ = None
        self.best_epoch_: int | None = None
        self._last_good = self._snapshot()
        best_state: dict[str, torch.Tensor] | None = None
        step = 0
        for epoch in range(1, epochs + 1):
            epoch_start = time.perf_counter()
            self._train_mode()
            total_loss, correct, seen = 0.0, 0, 0
            loader = data.train_loader(batch_size=batch_size, shuffle=True,
                                       seed=self.seed * 1000 + epoch)
            for batch in loader:
                output = self.task.forward(self.model, batch, self.device_)
                logits, targets = self.task.predictions(output)
                loss = F.cross_entropy(logits, targets)
                if not bool(torch.isfinite(loss.detach())):
                    self._restore(self._last_good)
                    self.stopped_ = (f"non-finite loss at step {step} (epoch {epoch}); training "
                                     "stopped and the last good delta kept; lower the "
                                     "learning rate")
                    raise NonFiniteLossError(self.stopped_)
                loss.backward()
                optimizer.step()
                # dropped at once, so they never coexist with the next forward's activations
                optimizer.zero_grad(set_to_none=True)
                n = targets.shape[0]
                total_loss += float(loss.detach()) * n
                correct += int((logits.argmax(1) == targets).sum())
                seen += n
                step += 1
                if step % 20 == 0:
                    self._last_good = self._snapshot()
                if progress is not None:
                    progress({"step": step, "epoch": epoch, "loss": float(loss.detach())})
                if max_steps is not None and step >= max_steps:
                    break
            self._last_good = self._snapshot()
            val_loss, val_accuracy = self.evaluate(data, "val")
            record = EpochRecord(epoch, total_loss / max(seen, 1), correct / max(seen, 1),
                                 val_loss, val_accuracy, time.perf_counter() - epoch_start)
            if test_each_epoch:
                record.test_loss, record.test_accuracy = self.evaluate(data, "test")
            self.history_.append(record)
            if self.best_epoch_ is None or better_epoch(
                    record, self.history_[self.best_epoch_ - 1], self.task.kind):
                self.best_epoch_, best_state = epoch, self._last_good
            if progress is not None:
                progress({"epoch_done": epoch, **record.__dict__})
            if max_steps is not None and step >= max_steps:
                break
            if patience is not None and epoch - self.best_epoch_ >= patience:
                self.stopped_ = (f"early stop after epoch {epoch}: no better val epoch in "
                                 f"{patience}")
                break
        if best_state is not None and self.best_epoch_ != len(self.history_):
            self._restore(best_state)
        self.seconds_ = time.perf_counter() - start
        self.peak_memory_mb_ = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.model.eval()
        return self

    def _train_mode(self) -> None:
        """Train mode; the normalisation layers whose parameters are frozen stay in eval mode
        (:meth:`_hold_frozen_norms`), so their running statistics stay frozen too."""
        self.model.train()

    def evaluate(self, data: Dataset, split: str = "val", batch_size: int = 128
                 ) -> tuple[float, float]:
        """Mean cross-entropy and accuracy on a split (per next token for a causal-LM task)."""
        training = self.model.training
        self.model.eval()
        score = PredictionScore()
        try:
            with torch.no_grad():
                for batch in data.loader(split, batch_size=batch_size):
                    output = self.task.forward(self.model, batch, self.device_ if hasattr(
                        self, "device_") else None)
                    score.add(*self.task.predictions(output))
        finally:
            self.model.train(training)
        return score.loss, score.accuracy

    def _snapshot(self) -> dict[str, torch.Tensor]:
        """What training changes: the trained values and the running statistics of the
        normalisation layers that train."""
        state = {str(i): p.detach().clone() for i, p in enumerate(self.trainable_parameters())}
        state.update({name: b.detach().clone()
                      for name, b in self._trained_norm_buffers().items()})
        return state

    def _restore(self, snapshot: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for i, p in enumerate(self.trainable_parameters()):
                p.copy_(snapshot[str(i)])
            for name, buffer in self._trained_norm_buffers().items():
                buffer.copy_(snapshot[name])


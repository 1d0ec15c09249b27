"""The one scoring rule of a trained model on a split: accuracy and mean cross-entropy over a
task's predictions (one per example, or one per next token for a causal-LM task), accumulated
batch by batch. The ground truth's validation (:mod:`zest.groundtruth`) scores with it, and so
can the tuners' (ARCHITECTURE.md §3b)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PredictionScore:
    """Running totals of the predictions scored so far.

    Attributes:
        correct: Predictions whose arg-max is the target.
        loss_sum: Summed cross-entropy.
        count: Predictions scored.
    """

    correct: int = 0
    loss_sum: float = 0.0
    count: int = 0

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Scores one batch of predictions (``logits``: one row per target)."""
        self.correct += int((logits.argmax(dim=1) == targets).sum())
        self.loss_sum += float(F.cross_entropy(logits, targets, reduction="sum"))
        self.count += int(targets.shape[0])

    @property
    def accuracy(self) -> float:
        """Share of correct predictions (0 when none was scored)."""
        return self.correct / max(self.count, 1)

    @property
    def loss(self) -> float:
        """Mean cross-entropy per prediction (0 when none was scored)."""
        return self.loss_sum / max(self.count, 1)

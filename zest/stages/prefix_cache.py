"""The frozen-prefix cache: the outputs of a model's first stages for some examples of one split
(ARCHITECTURE.md §5; the stages are :mod:`zest.stages`'). Everything before a tuned layer's
stage is frozen, so these outputs are computed once and every training step of every layer past
them starts from them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zest.stages.plan import State


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

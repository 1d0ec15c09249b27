"""The stage plan: a forward pass cut at block boundaries (ARCHITECTURE.md §5).

Each architecture declares its plan (``Architecture.stage_plan`` in :mod:`zest.architectures`);
:func:`zest.stages.verify.stage_plan` checks it against the model's own forward before use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from zest.models.task import Task

State = dict[str, torch.Tensor]
StageFunction = Callable[[State], State]


@dataclass
class StagePlan:
    """A forward pass cut into consecutive stages; ``names[i]`` is the block run by stage i.

    ``state = plan.start(inputs)``, ``state = plan.run(state, i, j)``,
    ``features = plan.features(state)`` (the head input). States are dicts of tensors whose
    first dimension is the example, so they can be cached, sliced and concatenated
    (:mod:`zest.stages.states`)."""

    names: list[str]
    functions: list[StageFunction]
    start: Callable[[Any], State]
    features: Callable[[State], torch.Tensor]

    def stage_of(self, layer_name: str) -> int | None:
        """The stage that runs the layer ``layer_name``: the one whose name is the layer's name
        or a dotted prefix of it (``None`` if no stage does)."""
        for i, name in enumerate(self.names):
            if layer_name == name or layer_name.startswith(name + "."):
                return i
        return None

    def run(self, state: State, first: int, stop: int | None = None) -> State:
        """Runs stages ``first .. stop-1`` (to the end when ``stop`` is None)."""
        for function in self.functions[first:stop]:
            state = function(state)
        return state


#: ``(model, task) -> StagePlan`` cut at the model's blocks (``None``: no plan for this model).
PlanBuilder = Callable[[nn.Module, "Task"], "StagePlan | None"]


def image_state(x: torch.Tensor) -> State:
    """The first state of an image model: its (normalised) input images."""
    return {"x": x}

"""Verifying a stage plan against the model's own forward before use (ARCHITECTURE.md §5).

The ground-truth collector fine-tunes one layer at a time with everything before the layer's
block frozen, so the output of that frozen prefix can be computed once per example and reused.
Each architecture declares its plan (``Architecture.stage_plan``: timm EfficientNet/MobileNet-style
CNNs, timm ResNets, timm ViTs, torchvision CNNs; BERT-style, DistilBERT, ALBERT, MPNet and
DeBERTa-v2 encoders; LLaMA-style, GPT-2, OPT, GPT-NeoX, Falcon and Phi decoders).
:func:`stage_plan` checks the architecture's plan against the model's own forward on a sample
batch; a model without a plan, or whose plan does not reproduce the logits, runs the uncached
loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from zest.architectures.base import architecture_named
from zest.stages.plan import StagePlan

if TYPE_CHECKING:
    from zest.models.task import Batch, Task


def _candidate_plan(model: nn.Module, task: Task) -> StagePlan | None:
    """The plan of the task's architecture (``Task.architecture``), when the architecture has
    one, adapts the task's kind and still recognises the model."""
    architecture = architecture_named(task.architecture)
    if architecture.stage_plan is None or task.kind not in architecture.kinds or \
            not architecture.recognise(model):
        return None
    return architecture.stage_plan(model, task)


def stage_plan(model: nn.Module, task: Task, sample: Batch) -> StagePlan | None:
    """The stage plan of ``model``, verified on ``sample`` against the model's own forward
    (``None`` when the architecture has no plan, or its plan cannot be built for this model or
    library version, or does not reproduce the logits)."""
    # the model side imports the architectures, which import the plans: stages stay below it
    from zest.models.task import preserved_training_state

    plan = None
    try:
        plan = _candidate_plan(model, task)
        if plan is None:
            return None
        with preserved_training_state(model), torch.no_grad():
            model.eval()
            expected = task.forward(model, sample).logits
            inputs = task.model_inputs(sample, next(model.parameters()).device)
            got = task.head(model)(plan.features(plan.run(plan.start(inputs), 0)))
        ok = got.shape == expected.shape and torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    except (AttributeError, TypeError, RuntimeError, IndexError):
        ok = False
    return plan if ok else None

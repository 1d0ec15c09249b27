"""Stage plans: a model's forward cut at block boundaries, for the frozen-prefix cache.

The ground-truth collector fine-tunes one layer at a time with everything before the layer's
block frozen, so the output of that frozen prefix can be computed once per example and reused
(ZEST ground truth, ARCHITECTURE.md §5). A :class:`~zest.families.StagePlan` runs the forward
stage by stage; each architecture family declares its own (``Family.plan`` in
:mod:`zest.families`: timm EfficientNet/MobileNet-style CNNs, timm ResNets, timm ViTs; BERT-style,
DistilBERT, ALBERT, MPNet and DeBERTa-v2 encoders; LLaMA-style, GPT-2, OPT, GPT-NeoX, Falcon and
Phi decoders). :func:`stage_plan` checks the family's plan against
the model's own forward on a sample batch before use; a model without a plan, or whose plan does
not reproduce the logits, runs the uncached loop. States are dicts of tensors whose first
dimension is the example, so they can be cached and sliced.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from zest.families import StagePlan, State, family_named
from zest.models import Batch, Task, preserved_training_state


def _candidate_plan(model: nn.Module, task: Task) -> StagePlan | None:
    """The plan of the task's family (``Task.family``), when the family has one, adapts the
    task's kind and still recognises the model."""
    family = family_named(task.family)
    if family.plan is None or task.kind not in family.kinds or not family.recognise(model):
        return None
    return family.plan(model, task)


def stage_plan(model: nn.Module, task: Task, sample: Batch) -> StagePlan | None:
    """The stage plan of ``model``, verified on ``sample`` against the model's own forward
    (``None`` when the family has no plan, or its plan cannot be built for this model or
    library version, or does not reproduce the logits)."""
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


#: State entries with a token dimension (trimmed with the padding): "embedded" is an embedding
#: output a later stage still reads (DeBERTa-v2's convolution after its first layer).
TOKEN_KEYS = ("input_ids", "attention_mask", "hidden", "token_type_ids", "embedded")


def slice_state(state: State, index: torch.Tensor) -> State:
    """The examples ``index`` of a state, trailing padding trimmed (see :func:`trim_padding`)."""
    return trim_padding({k: v[index] for k, v in state.items()})


def trim_padding(state: dict[str, Any]) -> dict[str, Any]:
    """Drops the token columns after the longest sequence of a (right-padded) text batch.

    Padding positions are masked out of attention, so the outputs at real tokens do not change
    (up to float rounding); a batch of short sentences then costs what its longest one costs.
    """
    mask = state.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2:
        return state
    length = int(mask.sum(dim=1).max())
    width = mask.shape[1]
    if length >= width or length == 0:
        return state
    return {k: v[:, :length] if k in TOKEN_KEYS and v.ndim >= 2 and v.shape[1] == width else v
            for k, v in state.items()}


def pad_tokens(state: State, width: int) -> State:
    """Pads the token columns of a trimmed text state back to ``width`` (zeros: masked
    padding, which :func:`slice_state` trims again wherever a batch's texts are all shorter), so
    that states of chunks trimmed to different lengths can be stored side by side."""
    mask = state.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2 or mask.shape[1] >= width:
        return state
    length = mask.shape[1]
    return {k: torch.cat([v, v.new_zeros(v.shape[0], width - length, *v.shape[2:])], dim=1)
            if k in TOKEN_KEYS and v.ndim >= 2 and v.shape[1] == length else v
            for k, v in state.items()}

"""Stage states: slicing, trimming and re-padding the cached states of a stage plan.

States are dicts of tensors whose first dimension is the example (:class:`~zest.stages.plan.
StagePlan`), so the frozen-prefix cache can store them, slice a minibatch out of them and
trim a text batch's padding (ARCHITECTURE.md §5).
"""

from __future__ import annotations

from typing import Any

import torch

from zest.stages.plan import State

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

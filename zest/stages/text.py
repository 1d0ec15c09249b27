"""What the stage plans of transformers text models share (ARCHITECTURE.md §5): their first
state, stages that replace the hidden sequence, the model file's own mask builders."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from zest.stages.plan import StageFunction, State


def library_function(module: nn.Module, name: str) -> Callable[..., Any]:
    """A function as the transformers file that defines ``module``'s class imports it (its own
    ``create_causal_mask``, ``create_bidirectional_mask``)."""
    return getattr(sys.modules[type(module).__module__], name)


def text_start(inputs: Any) -> State:
    """The first state of a text model: its token ids and attention mask."""
    return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}


def hidden_stage(compute: Callable[[State], torch.Tensor]) -> StageFunction:
    """A stage that replaces the state's hidden sequence and carries its attention mask on."""
    return lambda s: {"hidden": compute(s), "attention_mask": s["attention_mask"]}


def hidden_of(out: Any) -> torch.Tensor:
    """A layer's hidden sequence (some layers return a tuple that starts with it)."""
    return out[0] if isinstance(out, tuple) else out


def last_token(s: State) -> torch.Tensor:
    """The hidden state of each text's last non-padding token (texts are right-padded)."""
    hidden = s["hidden"]
    last = s["attention_mask"].long().sum(dim=1).clamp(min=1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

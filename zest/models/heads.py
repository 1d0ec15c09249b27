"""Finding a model's head when zest builds it (ARCHITECTURE.md §2)."""

from __future__ import annotations

from torch import nn

from zest.architectures import HF_HEAD_NAMES, Architecture
from zest.errors import InvalidInputError
from zest.models.specs import not_a_decoder_message
from zest.models.task import TaskKind


def head_of(spec: str, model: nn.Module, architecture: Architecture,
            kind: TaskKind = "classification") -> str:
    """The head module's name as the architecture finds it; a model without one is refused."""
    head = architecture.head(model, kind)
    if head is None:
        if kind == "causal_lm":
            raise InvalidInputError(not_a_decoder_message(spec))
        raise InvalidInputError(f"{spec!r}: {type(model).__name__} has no classification head "
                                f"where the {architecture.name} architecture keeps it; load a "
                                "classification model (transformers: a "
                                "*ForSequenceClassification model, head "
                                f"{' or '.join(HF_HEAD_NAMES)})")
    return head

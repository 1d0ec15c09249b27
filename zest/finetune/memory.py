"""What training keeps in memory: the state every tuner trains in (ARCHITECTURE.md §3a).

:func:`training_state` turns off a causal LM's key/value cache (in training it would keep every
block's keys and values for a generation that never comes) and, when asked, turns on activation
checkpointing (:func:`checkpointed_blocks`); both are restored on exit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from zest.layers import candidate_layers, repeated_blocks
from zest.models import Task


@contextmanager
def training_state(model: nn.Module, task: Task, gradient_checkpointing: bool = False
                   ) -> Iterator[None]:
    """No key/value cache and, with ``gradient_checkpointing``, recomputed blocks; the model's
    settings and forwards are restored on exit."""
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    if use_cache:
        config.use_cache = False
    try:
        if gradient_checkpointing:
            with checkpointed_blocks(model, task):
                yield
        else:
            yield
    finally:
        if use_cache:
            config.use_cache = use_cache


@contextmanager
def checkpointed_blocks(model: nn.Module, task: Task) -> Iterator[list[str]]:
    """Activation checkpointing of every repeated block (:func:`zest.layers.repeated_blocks`).

    While active, each block's forward runs under ``torch.utils.checkpoint`` (non-reentrant;
    dropout masks are replayed), so autograd keeps only each block's inputs and recomputes the
    block in the backward pass: saved activations shrink to the block inputs plus one block's
    own, for about one more forward pass of compute. The block modules themselves are wrapped,
    so it works for every method (LoRA's adapters, SPSFT's hooks and GPS's sparse layers live
    inside the blocks) and every family with indexed blocks. BatchNorm layers in train mode
    update their running statistics again in the recomputation.

    Yields:
        The wrapped block names; their forwards are restored on exit.
    """
    names = repeated_blocks(candidate_layers(model, task.head_name))
    saved: dict[str, Any] = {}
    try:
        for name in names:
            block = model.get_submodule(name)
            saved[name] = block.__dict__.get("forward")
            block.forward = _checkpointed(block.forward)
        yield names
    finally:
        for name, previous in saved.items():
            block = model.get_submodule(name)
            del block.forward
            if previous is not None:
                block.forward = previous


def _checkpointed(forward: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run

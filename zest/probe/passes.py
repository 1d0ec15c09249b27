"""The probe's extra passes: a finite-difference Hessian-vector product (GraSP) and a data-free
SynFlow pass; each swaps parameter storages and puts them back (:func:`swap_back`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from zest.layers import Layer
from zest.models import Batch, Task, check_finite
from zest.probe.context import sum64_of
from zest.probe.gradients import weight_gradients
from zest.probe.recorder import Recorder

HVP_EPSILON = 1e-2


def swap_back(saved: dict[torch.Tensor, torch.Tensor]) -> None:
    """Puts the original storages back into parameters and buffers."""
    for tensor, original in saved.items():
        tensor.data = original
    saved.clear()


def finite_difference_hvp(model: nn.Module, task: Task, batch: Batch, device: Any, loss: str,
                           layers: Sequence[Layer], modules: dict[str, nn.Module],
                           grads: list[torch.Tensor], saved: dict[torch.Tensor, torch.Tensor],
                           batch_label: str) -> list[torch.Tensor]:
    """``H g ≈ (∇L(θ + εĝ) − ∇L(θ)) · ‖g‖ / ε`` over the candidate weights (one extra pass,
    whose weight gradients are formed like the main pass's, see :func:`weight_gradients`).

    The original weight storages are kept in ``saved`` and swapped back by the caller, so the
    model returns bit-for-bit to its state even if this pass raises.
    """
    norm = math.sqrt(sum(sum64_of(lambda x: x * x, g) for g in grads))
    if norm == 0.0:
        return [torch.zeros_like(g) for g in grads]
    step = HVP_EPSILON / norm
    with torch.no_grad():
        for layer, g in zip(layers, grads, strict=True):
            w = modules[layer.name].weight
            saved[w] = w.data
            w.data = w.data + step * g
    recorder = Recorder(layers, modules, {"grad"}, batch, task.batch_size(batch), model)
    try:
        recorder.attach()
        with torch.enable_grad():
            output = task.forward(model, batch, device)
            value = task.loss(output, loss)
            check_finite(value, f"{batch_label} (Hessian-vector pass)")
            shifted, _ = weight_gradients(value, recorder, layers, modules)
    finally:
        recorder.detach()
    return [s.sub_(g).div_(step) for s, g in zip(shifted, grads, strict=True)]


def synflow_gradients(model: nn.Module, task: Task, batch: Batch, device: Any,
             weights: list[nn.Parameter], saved: dict[torch.Tensor, torch.Tensor]
             ) -> list[torch.Tensor] | None:
    """∂R/∂|θ| for R = 1ᵀ f(1; |θ|) on a single all-ones input (Tanaka et al. 2020).

    Parameters are replaced by their absolute values (original storages go to ``saved`` and are
    swapped back by the caller). The pass runs in the model's dtype and is repeated in float64
    only when that overflows (SynFlow's products over depth can exceed float32's range), seen as
    a non-finite sum of some layer's gradient. ``None`` when the model's forward refuses the
    all-ones input with a ``ValueError`` (T5's classifier reads its state at the end-of-text
    tokens, which an all-ones text lacks): SynFlow does not apply to that model.
    """
    try:
        grads = _synflow_pass(model, task, batch, device, weights, saved, None)
    except ValueError:
        return None
    # one pass per gradient: a non-finite entry makes its sum non-finite; finite entries
    # overflow the float32 sum only near float32's range, which calls for float64 as well
    if bool(torch.isfinite(torch.stack([g.sum(dtype=torch.float32) for g in grads])).all()):
        return grads
    swap_back(saved)
    return _synflow_pass(model, task, batch, device, weights, saved, torch.float64)


def _synflow_pass(model: nn.Module, task: Task, batch: Batch, device: Any,
                  weights: list[nn.Parameter], saved: dict[torch.Tensor, torch.Tensor],
                  dtype: torch.dtype | None) -> list[torch.Tensor]:
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            if tensor.is_floating_point():
                saved[tensor] = tensor.data
                value = tensor.data.to(dtype) if dtype is not None else tensor.data
                tensor.data = value.abs() if isinstance(tensor, nn.Parameter) else value
    if task.modality == "image":
        x = task.model_inputs(batch, device)
        inputs: Any = torch.ones((1,) + tuple(x.shape[1:]),
                                 dtype=dtype or weights[0].dtype, device=x.device)
    else:
        ids = batch["input_ids"][:1].to(device)
        inputs = {"input_ids": torch.ones_like(ids), "attention_mask": torch.ones_like(ids)}
    with torch.enable_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
        logits = out.logits if hasattr(out, "logits") else out
        grads = torch.autograd.grad(logits.sum(), weights, allow_unused=True)
    return [(g if g is not None else torch.zeros_like(w)).detach()
            for g, w in zip(grads, weights, strict=True)]

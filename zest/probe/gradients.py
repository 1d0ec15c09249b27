"""Weight gradients of the candidate layers: formed directly from recorded inputs and output
gradients (Linear, Conv2d; one half batch at a time, for ``grad_snr``) or by autograd, and the
per-example Fisher diagonal (``fim_score``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from zest.architectures import conv_forward
from zest.layers import Layer

if TYPE_CHECKING:
    from zest.probe.recorder import Recorder


def weight_gradients(loss: torch.Tensor, recorder: Recorder, layers: Sequence[Layer],
                      modules: dict[str, nn.Module]
                      ) -> tuple[list[torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """∇W of every candidate layer from the one backward pass, and with ``recorder.split`` the
    contributions of the two halves of the batch.

    ``∇W = Σ_n J_W,nᵀ δ_n`` is a sum over examples. Layers the probe forms itself (see
    ``Recorder._pre_hook``) get each half's sum straight from the recorded input and output
    gradient δ as δ arrives (``Recorder._grad_hook``), and ∇W as their total: the same work
    autograd would have done, split in two. For the other layers autograd returns ∇W; the first
    half's part is computed directly for Linear and Conv2d, by re-running the layer alone on the
    first half otherwise, and the second half's part is the rest.
    """
    split = recorder.split
    autograd_layers = [layer for layer in layers if modules[layer.name].weight.requires_grad]
    # the direct layers' outputs are asked for only so that the pass reaches them when no
    # weight needs autograd; their tensor hooks record δ either way
    targets = [modules[layer.name].weight for layer in autograd_layers] + \
        ([] if autograd_layers else list(recorder.direct_edges.values()))
    recorder.direct_edges.clear()
    autograd_grads = dict(zip((layer.name for layer in autograd_layers),
                              torch.autograd.grad(loss, targets, allow_unused=True)
                              if targets else (), strict=False))
    del targets
    half = recorder.batch_size // 2
    grads: list[torch.Tensor] = []
    halves: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for layer in layers:
        module = modules[layer.name]
        delta = recorder.output_grads.get(layer.name)
        from_autograd = autograd_grads.pop(layer.name, None)
        if layer.name in recorder.direct:
            first, second = recorder.direct_parts.pop(layer.name, (None, None))
            if first is None:  # the output does not reach the loss
                first = torch.zeros_like(module.weight)
                second = first if split else None
            if from_autograd is not None:  # further calls of a module called more than once
                second = from_autograd if second is None else second + from_autograd
            grad = first if second is None else first + second
            if split:
                halves[layer.name] = (first, second)
        else:
            grad = from_autograd if from_autograd is not None else torch.zeros_like(module.weight)
            if split and delta is not None:
                first = _first_half_gradient(module, *recorder.inputs[layer.name], delta, half,
                                             recorder.batch_size)
                halves[layer.name] = (first, grad - first)
        grads.append(grad.detach())
    return grads, halves


def _first_half_gradient(module: nn.Module, args: tuple, kwargs: dict, delta: torch.Tensor,
                         half: int, batch_size: int) -> torch.Tensor:
    """∇W of the first ``half`` examples of a layer autograd differentiated."""
    if not kwargs and len(args) == 1 and isinstance(args[0], torch.Tensor) and \
            supports_direct_gradient(module):
        return direct_weight_gradient(module, args[0][:half].detach(), delta[:half])
    with torch.enable_grad():  # any other module type: re-run it alone on the first half
        first_args = tuple(_first_rows(a, half, batch_size) for a in args)
        first_kwargs = {k: _first_rows(v, half, batch_size) for k, v in kwargs.items()}
        out = module(*first_args, **first_kwargs)
        return torch.autograd.grad(out, module.weight, grad_outputs=delta[:half])[0].detach()


def supports_direct_gradient(module: nn.Module) -> bool:
    """Whether :func:`direct_weight_gradient` handles the module: Linear, and convolutions
    whose forward is exactly ``conv2d`` (:func:`zest.architectures.conv_forward`: Conv2d, and
    timm's dynamic "same" padding ``Conv2dSame``) with numeric padding."""
    if type(module) is nn.Linear:
        return True
    return conv_forward(module) is not None and isinstance(module, nn.Conv2d) and \
        not isinstance(module.padding, str)


def direct_weight_gradient(module: nn.Module, x: torch.Tensor, delta: torch.Tensor
                            ) -> torch.Tensor:
    """``∇W = J_Wᵀ δ`` of the examples in ``x`` from the layer's input and output gradient."""
    if type(module) is nn.Linear:
        return (delta.reshape(-1, delta.shape[-1]).T @ x.reshape(-1, x.shape[-1])).detach()
    padding = module.padding
    if conv_forward(module) == "dynamic_same":
        from timm.layers import pad_same

        x = pad_same(x, module.weight.shape[-2:], module.stride, module.dilation)
        padding = (0, 0)
    weight = module.weight.detach()
    if module.groups > 1:
        # oneDNN's grouped (depthwise) weight-gradient kernel is several times faster on
        # channels-last tensors, conversion included (98 → 30 ms for efficientnet_lite0's 16
        # depthwise convolutions at batch 32, measured on this project's 2-core machine)
        x, delta, weight = (t.contiguous(memory_format=torch.channels_last)
                            for t in (x, delta, weight))
    # the real weight (not conv2d_weight's expanded placeholder) lets oneDNN pick its layout
    grad = torch.ops.aten.convolution_backward(
        delta, x, weight, None, module.stride, padding, module.dilation, False, (0, 0),
        module.groups, (False, True, False))[1]
    return grad.detach().contiguous()


def per_example_fisher(recorder: Recorder, modules: dict[str, nn.Module]
                        ) -> dict[str, float]:
    """``mean_n ‖g_n‖²`` per layer, ``g_n`` the contribution of example n to ∇(W, b) (the
    layer's part of the diagonal empirical Fisher; Lodha et al. 2023), in the order the output
    gradients arrived: the layers the probe differentiates itself have it from their gradient
    hook, the others get it here from their recorded input and δ."""
    return {name: value if value is not None else
            per_example_fisher_of(modules[name], *recorder.inputs[name],
                                   recorder.output_grads[name])
            for name, value in recorder.example_fisher.items()}


def per_example_fisher_of(module: nn.Module, args: tuple, kwargs: dict, delta: torch.Tensor,
                           closed_form_only: bool = False) -> float | None:
    """One layer's ``mean_n ‖g_n‖²`` (see :func:`per_example_fisher`); with
    ``closed_form_only``, ``None`` where that takes the per-example loop (autograd), which is
    left for after the backward pass."""
    norms = _closed_form_squared_norms(module, args, kwargs, delta)
    if norms is None:
        if closed_form_only:
            return None
        norms = _looped_squared_norms(module, args, kwargs, delta)
    return float(norms.mean())


def _closed_form_squared_norms(module: nn.Module, args: tuple, kwargs: dict,
                               delta: torch.Tensor) -> torch.Tensor | None:
    """‖∂/∂(W, b) of example n's part‖² for every n, from the recorded input and δ: Gram-matrix
    identities for Linear and Embedding, unfolding for Conv2d; ``None`` for other modules
    (:func:`_looped_squared_norms`)."""
    x = args[0].detach() if args and isinstance(args[0], torch.Tensor) else None
    d = delta.double()
    n = d.shape[0]
    bias = module._parameters.get("bias")  # noqa: SLF001
    if x is not None and not kwargs and type(module) is nn.Linear:
        xs, ds = x.double().reshape(n, -1, x.shape[-1]), d.reshape(n, -1, d.shape[-1])
        norms = ((ds @ ds.transpose(1, 2)) * (xs @ xs.transpose(1, 2))).sum(dim=(1, 2))
        return norms + (ds.sum(dim=1).pow(2).sum(dim=1) if bias is not None else 0)
    if x is not None and not kwargs and isinstance(module, nn.Embedding):
        ids = x.reshape(n, -1)
        ds = d.reshape(n, ids.shape[1], -1)
        same = (ids[:, :, None] == ids[:, None, :]).double()
        if module.padding_idx is not None:
            keep = (ids != module.padding_idx).double()
            same = same * keep[:, :, None] * keep[:, None, :]
        return ((ds @ ds.transpose(1, 2)) * same).sum(dim=(1, 2))
    if x is not None and not kwargs and isinstance(module, nn.Conv2d) and \
            conv_forward(module) is not None and \
            module.groups in (1, module.in_channels) and not isinstance(module.padding, str):
        padding = module.padding
        if conv_forward(module) == "dynamic_same":
            from timm.layers import pad_same

            x = pad_same(x, module.weight.shape[-2:], module.stride, module.dilation)
            padding = (0, 0)
        cols = torch.nn.functional.unfold(x.double(), module.kernel_size, module.dilation,
                                          padding, module.stride)
        ds = d.flatten(2)  # (B, C_out, L)
        if module.groups == 1:
            grads = ds @ cols.transpose(1, 2)
        else:
            k = module.kernel_size[0] * module.kernel_size[1]
            cols = cols.view(n, module.in_channels, k, -1)
            grads = torch.einsum("bcl,bckl->bck", ds, cols)
        norms = grads.pow(2).flatten(1).sum(dim=1)
        return norms + (ds.sum(dim=2).pow(2).sum(dim=1) if bias is not None else 0)
    return None


def _looped_squared_norms(module: nn.Module, args: tuple, kwargs: dict, delta: torch.Tensor
                          ) -> torch.Tensor:
    """:func:`_closed_form_squared_norms` for any module: autograd, one example at a time."""
    n = delta.shape[0]
    bias = module._parameters.get("bias")  # noqa: SLF001
    norms = []
    params = [p for p in (module.weight, bias) if p is not None]
    for p in params:  # the probe froze the biases; it restores every requires_grad flag
        p.requires_grad_(True)
    with torch.enable_grad():
        for i in range(n):
            item_args = tuple(_rows(a, i, n) for a in args)
            item_kwargs = {k: _rows(v, i, n) for k, v in kwargs.items()}
            out = module(*item_args, **item_kwargs)
            grads = torch.autograd.grad(out, params, grad_outputs=delta[i:i + 1],
                                        allow_unused=True)
            norms.append(sum(float(g.double().pow(2).sum()) for g in grads if g is not None))
    return torch.tensor(norms, dtype=torch.float64)


def _rows(value: Any, i: int, batch_size: int) -> Any:
    if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == batch_size:
        return value[i:i + 1].detach()
    return value


def _first_rows(value: Any, half: int, batch_size: int) -> Any:
    if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == batch_size:
        return value[:half].detach()
    return value

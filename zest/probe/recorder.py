"""The hook recorder: summaries of each candidate layer's output (activation statistics, binary
codes, pooled features) and output gradients, recorded during the probe's forward and backward
pass."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from zest.layers import Layer
from zest.models import Batch
from zest.probe import gradients
from zest.probe.context import BACKWARD_NEEDS, sum64

MAX_FEATURE_ROWS = 256


def _valid_mask(out: torch.Tensor, batch: Batch) -> torch.Tensor | None:
    """Token mask (B, T) when ``out`` is a (B, T, ...) token tensor of a text batch."""
    if not isinstance(batch, Mapping) or "attention_mask" not in batch or out.ndim < 3:
        return None
    mask = batch["attention_mask"]
    if mask.shape[0] == out.shape[0] and mask.shape[1] == out.shape[1]:
        return mask.to(out.device).bool()
    return None


def _channels_last_rows(out: torch.Tensor, mask: torch.Tensor | None, channel_dim: int
                        ) -> torch.Tensor:
    """Output as (positions, channels), padding positions dropped."""
    if channel_dim == 1 and out.ndim > 2:
        out = out.movedim(1, -1)
    if mask is not None:
        return out[mask]
    return out.reshape(-1, out.shape[-1])


def _feature_rows(out: torch.Tensor, mask: torch.Tensor | None, channel_dim: int,
                  generator: torch.Generator) -> torch.Tensor:
    """At most :data:`MAX_FEATURE_ROWS` rows of :func:`_channels_last_rows`, drawn without
    replacement with ``generator`` when there are more. Only the drawn rows are copied: for a
    (B, T, C) token output or a (B, C, H, W) map the draw picks row indices first."""
    token_rows = channel_dim != 1 and out.ndim == 3 and mask is not None
    map_rows = channel_dim == 1 and out.ndim == 4 and mask is None
    if not (token_rows or map_rows):
        rows = _channels_last_rows(out, mask, channel_dim)
        if rows.shape[0] > MAX_FEATURE_ROWS:
            pick = torch.randperm(rows.shape[0], generator=generator)
            rows = rows[pick[:MAX_FEATURE_ROWS].to(rows.device)]
        return rows
    if token_rows:
        valid = mask.reshape(-1).nonzero().squeeze(1)
        count = valid.numel()
    else:
        count = out.shape[0] * out.shape[2] * out.shape[3]
    pick = torch.arange(count) if count <= MAX_FEATURE_ROWS else \
        torch.randperm(count, generator=generator)[:MAX_FEATURE_ROWS]
    pick = pick.to(out.device)
    if token_rows:
        return out.reshape(-1, out.shape[-1])[valid[pick]]
    positions = out.shape[2] * out.shape[3]  # row = example · H·W + position, channels last
    return out.flatten(2)[pick // positions, :, pick % positions]


def _channel_dim(module: nn.Module) -> int:
    return 1 if isinstance(module, nn.modules.conv._ConvNd) else -1  # noqa: SLF001


def _positive_codes(out: torch.Tensor, mask: torch.Tensor | None,
                    buffer: torch.Tensor | None = None) -> torch.Tensor:
    """The binary codes ``1[out > 0]`` as float32 zeros and ones, zero at the padding positions
    of a (B, T) token ``mask``; written into ``buffer`` (float32, ``out``'s shape) when given.

    One comparison into a buffer reused across layers of the same output shape: fresh large
    temporaries cost more in page faults than in arithmetic (a new (32, 64, 1536) float32
    tensor: about 8 ms on the 2-core development machine, the comparison itself 1 ms).
    """
    if buffer is None:
        buffer = torch.empty(out.shape, dtype=torch.float32, device=out.device)
    codes = torch.gt(out, 0, out=buffer)
    if mask is not None:
        codes.mul_(mask.view(mask.shape + (1,) * (out.ndim - 2)))
    return codes


def _activation_stats(values: torch.Tensor, codes: torch.Tensor,
                      mask: torch.Tensor | None = None) -> dict[str, float]:
    """Mean, standard deviation (n − 1) and fraction ``≤ 0`` of ``values``; with a (B, T)
    token ``mask`` of a (B, T, ...) output, of its valid positions only. ``codes``: the
    :func:`_positive_codes` of ``values`` and ``mask``.

    One pass of two float32 sums (Σx, Σx²) combined in float64, which is several times faster
    than ``torch.std_mean``; where the variance is small against the squared mean (|mean| > std),
    so that the two sums would cancel, the two-pass ``torch.std_mean`` is used instead. With a
    mask the sums are taken per token (in float32) and added over the valid tokens in float64,
    without copying the valid values out.
    """
    if mask is not None:
        per_token = values.flatten(2)
        valid = mask.double()
        n = int(mask.sum()) * per_token.shape[2]
        total = float((per_token.sum(dim=2, dtype=torch.float32).double() * valid).sum())
        norms = torch.linalg.vector_norm(per_token, dim=2, dtype=torch.float32).double()
        squares = float((norms * norms * valid).sum())
    else:
        flat = values.reshape(-1)
        n = flat.numel()
        total, squares = float(flat.sum()), float(torch.dot(flat, flat))
    positives = sum64(codes)  # exact: float32 sums of 1024 zeros and ones
    mean = total / n
    variance = (squares - n * mean * mean) / (n - 1) if n > 1 else 0.0
    if n > 1 and variance < mean * mean:
        std_t, mean_t = torch.std_mean(values[mask] if mask is not None else values)
        mean, variance = float(mean_t), float(std_t) ** 2
    return {"mean": mean, "std": math.sqrt(max(variance, 0.0)),
            "sparsity": 1.0 - positives / n}


def _binary_code_kernel(codes: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``K = c cᵀ + (1−c)(1−c)ᵀ`` of the binary codes ``c = 1[out > 0]`` per example, padding
    positions counting in neither term; ``codes``: :func:`_positive_codes` (zero at padding).
    Float32 is exact here (integer counts < 2²⁴)."""
    n = codes.shape[0]
    flat = codes.reshape(n, -1).to(torch.float32)
    agree = flat @ flat.T
    if mask is None:
        width = flat.shape[1]
        ones = flat.sum(dim=1)
        # (1−c)(1−c)ᵀ = width − s_i − s_j + c cᵀ
        return (2 * agree + width - ones[:, None] - ones[None, :]).double()
    # with v the valid-position indicator (mask ⊗ 1 over the other dims) and c ≤ v:
    # (v−c)(v−c)ᵀ = v vᵀ − c vᵀ − v cᵀ + c cᵀ, where v vᵀ and c vᵀ reduce to token-level
    # products, so only c cᵀ needs the full width
    per_token = flat.shape[1] // mask.shape[1]  # entries per token position
    m = mask.float()  # (B, T)
    counts = flat.view(n, mask.shape[1], per_token).sum(dim=2)  # (B, T): positives per token
    cross = counts @ m.T  # c_i · v_j
    return (2 * agree + per_token * (m @ m.T) - cross - cross.T).double()


def _pooled(out: torch.Tensor, mask: torch.Tensor | None, channel_dim: int) -> torch.Tensor:
    """Per-example features: mean over spatial positions or (valid) tokens, (B, C)."""
    out = out.detach()
    if out.ndim == 2:
        return out
    if channel_dim == 1:
        return out.flatten(2).mean(dim=2)
    if mask is not None:
        weights = mask.to(out.dtype).view(mask.shape + (1,) * (out.ndim - 2))
        return (out * weights).sum(dim=1).flatten(1) / weights.sum(dim=1).flatten(1).clamp(min=1)
    return out.flatten(1, -2).mean(dim=1)


def _representation_shift(x: Any, y: Any, batch_size: int) -> float:
    """Mean over examples of 1 − cos between a block's input and output representative
    vectors: the first token for (B, T, H) tensors, the globally pooled features for (B, C, H, W).
    NaN when input and output are not comparable (different shapes, not float tensors)."""
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)) or \
            not x.is_floating_point() or x.shape != y.shape or x.shape[0] != batch_size:
        return float("nan")
    if x.ndim == 3:
        a, b = x[:, 0], y[:, 0]
    elif x.ndim == 4:
        a, b = x.mean(dim=(2, 3)), y.mean(dim=(2, 3))
    elif x.ndim == 2:
        a, b = x, y
    else:
        return float("nan")
    cos = torch.nn.functional.cosine_similarity(a.detach().double(), b.detach().double(), dim=1)
    return float((1 - cos).mean())


def _channel_fisher(act: torch.Tensor, grad: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """``½ · mean_n (Σ_s a_nks · δ_nks)²`` per channel k of an output ``act`` and its gradient
    (the ``fisher`` summary), in float64."""
    channel_dim = channel_dim % act.ndim
    reduce = [d for d in range(1, act.ndim) if d != channel_dim]
    # one example at a time: the products stay small (no batch-sized temporary)
    g_nk = torch.stack([(a * g).sum(dim=[d - 1 for d in reduce])
                        for a, g in zip(act, grad, strict=True)]) if reduce else act * grad
    return 0.5 * g_nk.double().pow(2).mean(dim=0).cpu()


class Recorder:
    """Forward and tensor hooks of one probe; summarises what the metrics need."""

    def __init__(self, layers: Sequence[Layer], modules: dict[str, nn.Module], needs: set[str],
                 batch: Batch, batch_size: int, model: nn.Module) -> None:
        self.model_root = model
        self.layers = layers
        self.modules = modules
        self.needs = needs
        self.batch = batch
        self.batch_size = batch_size
        #: outputs kept for ``fisher`` until their gradient arrives (released then)
        self.outputs: dict[str, torch.Tensor] = {}
        #: where the outputs of the layers the probe differentiates itself enter the autograd
        #: graph (no tensor kept): the backward pass's targets when no weight needs autograd
        self.direct_edges: dict[str, GradientEdge] = {}
        self.inputs: dict[str, tuple[tuple, dict]] = {}
        #: output gradients kept past their hook: only of layers autograd differentiates
        self.output_grads: dict[str, torch.Tensor] = {}
        #: the two half-batch contributions to ∇W (the whole ∇W and ``None`` without ``split``)
        #: of the layers the probe differentiates itself, formed as their output gradient arrives
        self.direct_parts: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        #: per-example Fisher of each layer, in the order their output gradients arrive; ``None``
        #: until computed (after the backward pass for layers autograd differentiates)
        self.example_fisher: dict[str, float | None] = {}
        self.activation_stats: dict[str, dict[str, float]] = {}
        self.binary_kernels: dict[str, torch.Tensor] = {}
        self.features: dict[str, torch.Tensor] = {}
        self.fisher: dict[str, torch.Tensor] = {}
        self.pooled: dict[str, torch.Tensor] = {}
        self.block_shifts: dict[str, float] = {}
        self.handles: list[Any] = []
        self.keeps_inputs = bool(needs & {"grad_halves", "per_example_fisher"})
        self.split = "grad_halves" in needs
        self.needs_backward = bool(needs & BACKWARD_NEEDS)
        #: layers whose ∇W the probe forms itself from the recorded input and output gradient
        self.direct: set[str] = set()
        self._called: set[str] = set()
        self.called: set[str] = set()  # every candidate whose forward ran
        self.recorded: set[str] = set()  # candidates whose output was summarised
        self._generator = torch.Generator().manual_seed(0)
        #: float32 buffers of the binary codes, one per output shape (see _positive_codes)
        self._code_buffers: dict[tuple, torch.Tensor] = {}

    def attach(self) -> None:
        for layer in self.layers:
            module = self.modules[layer.name]
            if self.needs_backward:
                self.handles.append(module.register_forward_pre_hook(
                    self._pre_hook(layer.name), with_kwargs=True))
            self.handles.append(module.register_forward_hook(self._forward_hook(layer.name),
                                                             with_kwargs=True))
        if "block_shift" in self.needs:
            for block in dict.fromkeys(layer.block for layer in self.layers):
                module = self.model_root.get_submodule(block)
                self.handles.append(module.register_forward_hook(self._block_hook(block)))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _pre_hook(self, name: str):
        """Decides, per call, who forms the layer's ∇W: the probe itself (first call of a
        Linear/Conv2d whose input carries a gradient: its weight is frozen for this call, so
        autograd only propagates the input gradient, and the probe gets each half-batch's ∇W
        from the recorded input and output gradient at no extra cost), or autograd (every
        other case, e.g. the first layer, whose input needs no gradient)."""
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if len(args) == 1 and not kwargs else None
            direct = (name not in self._called and isinstance(x, torch.Tensor)
                      and x.requires_grad and x.ndim > 0 and x.shape[0] == self.batch_size
                      and gradients.supports_direct_gradient(module))
            self._called.add(name)
            module.weight.requires_grad_(not direct)
            if direct:
                self.direct.add(name)

        return hook

    def _keeps(self, name: str) -> bool:
        return self.keeps_inputs or name in self.direct

    def _forward_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            self.called.add(name)
            if not isinstance(out, torch.Tensor) or name in self.recorded or out.ndim == 0:
                return  # a module called twice keeps the summaries of its first call
            per_example = out.shape[0] == self.batch_size
            tokens = self._token_shape()
            if not per_example and tokens is not None and out.shape[0] == tokens[0] * tokens[1]:
                # tokens flattened to (batch·tokens, ...) (OPT's MLP): summarised per example;
                # no per-example gradient split for them
                self.recorded.add(name)
                self._summarise_forward(name, module, out.detach().reshape(
                    *tokens, *out.shape[1:]))
                return
            if not per_example and out.shape[0] != 1:
                return
            # outputs broadcast over the batch (position embeddings) are summarised as such;
            # they have no per-example gradient, so no half-batch split
            self.recorded.add(name)
            if self._keeps(name) and per_example:
                self.inputs[name] = (args, kwargs)
            summary = out.detach() if per_example else \
                out.detach().expand(self.batch_size, *out.shape[1:])
            self._summarise_forward(name, module, summary)
            if out.requires_grad and (name in self.direct or self.needs & {
                    "fisher", "grad_halves", "per_example_fisher"}):
                if "fisher" in self.needs:
                    self.outputs[name] = out  # the hook takes it (the closure must not hold it)
                if name in self.direct:
                    self.direct_edges[name] = get_gradient_edge(out)
                self.handles.append(out.register_hook(self._grad_hook(name, module,
                                                                      per_example)))

        return hook

    def _token_shape(self) -> tuple[int, int] | None:
        """(batch, tokens) of a text batch, else ``None``."""
        ids = self.batch.get("input_ids") if isinstance(self.batch, Mapping) else None
        return (int(ids.shape[0]), int(ids.shape[1])) if isinstance(ids, torch.Tensor) and \
            ids.ndim == 2 else None

    def _summarise_forward(self, name: str, module: nn.Module, out: torch.Tensor) -> None:
        mask = _valid_mask(out, self.batch)
        codes = None
        if self.needs & {"activations", "binary_codes"}:
            key = (tuple(out.shape), out.device)
            if key not in self._code_buffers:
                self._code_buffers[key] = torch.empty(out.shape, dtype=torch.float32,
                                                      device=out.device)
            codes = _positive_codes(out, mask, self._code_buffers[key])
        if "activations" in self.needs:
            self.activation_stats[name] = _activation_stats(out, codes, mask)
        if "features" in self.needs:
            rows = _feature_rows(out, mask, _channel_dim(module), self._generator)
            self.features[name] = rows.float().detach().cpu()
        if "binary_codes" in self.needs:
            self.binary_kernels[name] = _binary_code_kernel(codes, mask).cpu()
        if "pooled" in self.needs:
            self.pooled[name] = _pooled(out, mask, _channel_dim(module)).float().cpu()

    def _block_hook(self, block: str):
        def hook(_module: nn.Module, args: tuple, out: Any) -> None:
            if block in self.block_shifts:
                return
            x = args[0] if args else None
            y = out[0] if isinstance(out, tuple) else out
            self.block_shifts[block] = _representation_shift(x, y, self.batch_size)

        return hook

    def _keep_for_later(self, name: str, delta: torch.Tensor) -> None:
        """Keeps δ (and the recorded input) of a layer for after the backward pass."""
        self.output_grads[name] = delta
        if "per_example_fisher" in self.needs:
            self.example_fisher[name] = None  # its place in the order of the Fisher sum

    def _grad_hook(self, name: str, module: nn.Module, per_example: bool):
        """Summarises the output gradient δ as soon as it arrives and releases what only it
        needed, so that the backward pass frees memory as a plain one does: the output (kept
        only for ``fisher``), and for a layer the probe differentiates itself, its recorded input
        and δ once its ∇W parts and per-example Fisher are formed. Layers autograd
        differentiates keep δ and their input until after the backward pass."""
        def hook(grad: torch.Tensor) -> None:
            out = self.outputs.pop(name, None)
            if out is not None:
                self.fisher[name] = _channel_fisher(out.detach(), grad, _channel_dim(module))
            del out
            if not (self._keeps(name) and per_example):
                return
            delta = grad.detach()
            if name not in self.direct:
                self._keep_for_later(name, delta)
                return
            args, kwargs = self.inputs[name]
            x = args[0].detach()
            if self.split:
                half = self.batch_size // 2
                self.direct_parts[name] = (
                    gradients.direct_weight_gradient(module, x[:half], delta[:half]),
                    gradients.direct_weight_gradient(module, x[half:], delta[half:]))
            else:
                self.direct_parts[name] = (gradients.direct_weight_gradient(module, x, delta),
                                           None)
            if "per_example_fisher" in self.needs:
                value = gradients.per_example_fisher_of(module, args, kwargs, delta,
                                                         closed_form_only=True)
                if value is None:  # the per-example loop runs after the backward pass
                    self._keep_for_later(name, delta)
                    return
                self.example_fisher[name] = value
            del self.inputs[name]

        return hook

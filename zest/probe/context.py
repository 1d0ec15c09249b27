"""The metric contract: the quantities a metric may need (:data:`NEEDS`), what it reads about a
layer (:class:`LayerContext`) and what one probe returns (:class:`ProbeResult`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from zest.layers import Layer

#: The quantities a metric may declare it needs (``needs=`` of ``register_metric``).
NEEDS = frozenset({
    "weight",        # the weight and bias (always present)
    "grad",          # ∇W of the probe loss
    "grad_halves",   # the two half-batch contributions to ∇W
    "hvp",           # Hessian-vector product H·∇W (restricted to the candidate weights)
    "synflow",       # ∂R/∂|W| of the data-free SynFlow objective
    "activations",   # mean / std / sparsity of the layer's output
    "binary_codes",  # B×B kernel of the output's binary codes (NASWOT)
    "features",      # a row sample of the output features (channels last)
    "fisher",        # per-channel (Σ_spatial a·δ)² summaries of output × output gradient
    "labels",        # the labels of the batch
    "pooled",        # per-example pooled output features (spatial / token mean), (B, C)
    "per_example_fisher",  # mean over examples of ‖per-example ∇(W, b)‖² (empirical Fisher)
    "block_shift",   # 1 − cos(block input, block output) of the enclosing block
})

#: The needs that take the backward pass.
BACKWARD_NEEDS = frozenset({"grad", "grad_halves", "hvp", "fisher", "per_example_fisher"})

#: The needs that read the batch's labels (through the probe loss or directly); the others
#: (weights, activation summaries, the data-free SynFlow pass) work on unlabelled data too.
LABEL_NEEDS = BACKWARD_NEEDS | {"labels"}



SUM64_CHUNK = 1024


def sum64(x: torch.Tensor) -> float:
    """``Σ x`` with float64 accumulation at about float32 speed: float32 sums of chunks of
    1024 consecutive entries (error ≈ ε₃₂·log₂1024 of each chunk's magnitude), added in
    float64. Converting a whole float32 tensor to float64 first is 10–20× slower on CPU, which
    matters for 10⁷-entry embedding matrices."""
    flat = x.reshape(-1)
    if flat.dtype == torch.float64 or flat.numel() <= SUM64_CHUNK:
        return float(flat.sum(dtype=torch.float64))
    cut = flat.numel() - flat.numel() % SUM64_CHUNK
    chunks = flat[:cut].view(-1, SUM64_CHUNK).sum(dim=1)
    return float(chunks.sum(dtype=torch.float64)) + float(flat[cut:].sum(dtype=torch.float64))


_HALF = (torch.float16, torch.bfloat16)


@dataclass
class LayerContext:
    """Everything the metrics may read about one layer, from one probe.

    Tensors are detached; a metric must not modify them. Optional fields are ``None`` unless a
    requested metric declared that it needs them.
    """

    layer: Layer
    weight: torch.Tensor
    bias: torch.Tensor | None
    grad: torch.Tensor | None = None
    grad_halves: tuple[torch.Tensor, torch.Tensor] | None = None
    hvp: torch.Tensor | None = None
    synflow_grad: torch.Tensor | None = None
    activation_stats: dict[str, float] | None = None
    binary_kernel: torch.Tensor | None = None
    features: torch.Tensor | None = None
    fisher_channels: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    fisher_diagonal: float | None = None
    fisher_diagonal_total: float | None = None
    block_shift: float | None = None
    cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        # metrics run in float32 whatever the model's dtype: half-precision linear algebra
        # (eigh, SVD) is missing on CPU, and float16 sums overflow
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor) and value.dtype in _HALF:
                setattr(self, name, value.float())
            elif isinstance(value, tuple) and any(isinstance(v, torch.Tensor)
                                                  and v.dtype in _HALF for v in value):
                setattr(self, name, tuple(v.float() if isinstance(v, torch.Tensor)
                                          and v.dtype in _HALF else v for v in value))

    def weight_matrix(self) -> torch.Tensor:
        """The weight reshaped to (out, in·k·k) (rows = output neurons)."""
        return self.weight.reshape(self.weight.shape[0], -1)

    def singular_values(self) -> torch.Tensor:
        """Singular values of :meth:`weight_matrix`, descending, by a float64 SVD (memoised).

        Not through a Gram matrix: squaring the matrix squares its condition number, and a
        float32 Gram drowns ``σ_min`` in rounding once κ passes about 10³ (on MiniLM's
        ``encoder.layer.1.attention.self.key`` it gave κ = 6.0e8 for the true 2.9e4); the SVD
        keeps every singular value to about ``1e-16 · σ_max``.
        """
        if "singular_values" not in self.cache:
            self.cache["singular_values"] = torch.linalg.svdvals(self.weight_matrix().double())
        return self.cache["singular_values"]

    def largest_singular_value(self) -> float:
        """``σ_max`` of :meth:`weight_matrix`: the largest eigenvalue of the smaller Gram matrix,
        all in the weight's dtype (the top of the spectrum is well conditioned there, unlike
        the bottom that :meth:`singular_values` needs an SVD for); reuses the full spectrum when
        another metric already computed it."""
        if "singular_values" in self.cache:
            return float(self.cache["singular_values"][0])
        w = self.weight_matrix()
        gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
        return float(torch.linalg.eigvalsh(gram)[-1].clamp(min=0).double().sqrt())

    def reduction(self, name: str) -> float:
        """Memoised :func:`sum64` reductions shared by several metrics: ``weight_norm``,
        ``grad_norm``, ``weight_dot_grad`` (Σ W⊙g) and ``abs_weight_dot_grad`` (Σ |W⊙g|)."""
        if name not in self.cache:
            if name == "weight_norm":
                value = math.sqrt(sum64(self.weight * self.weight))
            elif name == "grad_norm":
                value = math.sqrt(sum64(self.grad * self.grad))
            elif name == "weight_dot_grad":
                value = sum64(self.weight * self.grad)
            elif name == "abs_weight_dot_grad":
                value = sum64((self.weight * self.grad).abs_())
            else:
                raise KeyError(name)
            self.cache[name] = value
        return self.cache[name]


@dataclass
class ProbeResult:
    """The contexts of one probe, in forward order, with the loss and timings."""

    contexts: dict[str, LayerContext]
    loss: float  # NaN for an unlabelled batch (no probe loss)
    seconds: float
    passes: list[str]
    #: Candidate layers left out, with the reason (e.g. the forward pass never calls them as
    #: modules, it reads their weight directly).
    skipped: dict[str, str] = field(default_factory=dict)

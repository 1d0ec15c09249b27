"""The metric contract: the quantities a metric may need (:data:`NEEDS`), what it reads about a
layer (:class:`LayerContext`) and what one probe returns (:class:`ProbeResult`)."""

from __future__ import annotations

import math
from collections.abc import Callable
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


#: Entries per block of :func:`sum64_of` (4 MiB of float32): its temporaries are reused memory,
#: and few enough blocks that the per-operation overhead stays small.
SUM64_BLOCK = 1 << 20


def sum64_of(function: Callable[..., torch.Tensor], *tensors: torch.Tensor) -> float:
    """``sum64(function(*tensors))`` for an elementwise ``function`` of same-shaped tensors
    (e.g. ``lambda w, g: w * g``), applied to :data:`SUM64_BLOCK` entries at a time: the same
    float32 chunk sums added in float64, without the whole-tensor temporaries (a product of two
    10⁸-entry weights is 400 MB of fresh memory written and read back): on SmolLM2's weights
    1.5× faster on reused memory and 7× on fresh memory, the value unchanged."""
    flats = [t.reshape(-1) for t in tensors]
    size = flats[0].numel()
    if size <= SUM64_BLOCK:
        return sum64(function(*flats))
    return sum(sum64(function(*(f[start:start + SUM64_BLOCK] for f in flats)))
               for start in range(0, size, SUM64_BLOCK))


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
        """``σ_max`` of :meth:`weight_matrix` (memoised): by :func:`top_singular_value`, a few
        matrix-vector products, or from the full spectrum when another metric already
        computed it."""
        if "singular_values" in self.cache:
            return float(self.cache["singular_values"][0])
        if "largest_singular_value" not in self.cache:
            self.cache["largest_singular_value"] = top_singular_value(self.weight_matrix())
        return self.cache["largest_singular_value"]

    def reduction(self, name: str) -> float:
        """Memoised :func:`sum64` reductions shared by several metrics: ``weight_norm``,
        ``weight_std`` (unbiased), ``grad_norm``, ``weight_dot_grad`` (Σ W⊙g) and
        ``abs_weight_dot_grad`` (Σ |W⊙g|)."""
        if name not in self.cache:
            if name == "weight_norm":
                value = math.sqrt(sum64_of(lambda w: w * w, self.weight))
            elif name == "weight_std":
                n = self.weight.numel()
                value = 0.0
                if n > 1:
                    mean = sum64(self.weight) / n
                    squares = sum64_of(lambda w: (w - mean).square_(), self.weight)
                    value = math.sqrt(squares / (n - 1))
            elif name == "grad_norm":
                value = math.sqrt(sum64_of(lambda g: g * g, self.grad))
            elif name == "weight_dot_grad":
                value = sum64_of(torch.mul, self.weight, self.grad)
            elif name == "abs_weight_dot_grad":
                value = sum64_of(lambda w, g: (w * g).abs_(), self.weight, self.grad)
            else:
                raise KeyError(name)
            self.cache[name] = value
        return self.cache[name]


#: The memo entries of :attr:`LayerContext.cache` that depend on the weight alone:
#: :func:`zest.metrics.compute_metrics` carries them over to later probes of the same weights
#: (ARCHITECTURE.md §4).
WEIGHT_MEMOS = frozenset({"singular_values", "largest_singular_value", "weight_norm",
                          "weight_std"})

#: :func:`top_singular_value` stops when the residual ``‖A y − θ y‖`` of its top Ritz pair
#: (A = WᵀW) is below this fraction of θ. Some eigenvalue of A then lies within that of θ and
#: θ ≤ λ_max, so σ_max is exact to 5e-5 (relative) unless the seeded random start is orthogonal
#: to the top singular vector; the error is in fact about residual² / gap: ≤ 1e-7 on every
#: weight of SmolLM2-135M, where σ₂/σ₁ reaches 0.99.
LANCZOS_RESIDUAL = 1e-4
LANCZOS_MAX_STEPS = 100
#: Matrices whose smaller side is at most this get the exact float64 SVD (as cheap there).
EXACT_SPECTRUM_SIDE = 64


def top_singular_value(matrix: torch.Tensor) -> float:
    """The largest singular value of a 2-D ``matrix`` by the Lanczos method on its Gram operator
    ``v ↦ Mᵀ(M v)`` on the smaller side, fully reorthogonalised, from a seeded random start.

    Each step costs two matrix-vector products (10–40 steps on trained weights), instead of
    forming the Gram matrix (2·m·n² flops) and all its eigenvalues; ``torch.svd_lowrank`` (block
    power iteration) was 3 % off at q = 16, niter = 4 on SmolLM2's weights, whose top singular
    values lie close together, and ``torch.lobpcg`` needs the Gram matrix itself. Small matrices
    (smaller side ≤ :data:`EXACT_SPECTRUM_SIDE`) and a run that has not converged after
    :data:`LANCZOS_MAX_STEPS` steps get the exact float64 SVD.
    """
    from scipy.linalg import eigh_tridiagonal

    m = matrix if matrix.shape[0] >= matrix.shape[1] else matrix.T
    side = m.shape[1]
    if side <= EXACT_SPECTRUM_SIDE or not m.is_floating_point():
        return float(torch.linalg.svdvals(m.double())[0]) if m.numel() else 0.0
    steps = min(LANCZOS_MAX_STEPS, side)
    generator = torch.Generator().manual_seed(0)
    basis = torch.empty(steps + 1, side, dtype=m.dtype, device=m.device)
    start = torch.randn(side, generator=generator, dtype=torch.float64)
    basis[0] = (start / start.norm()).to(device=m.device, dtype=m.dtype)
    alphas: list[float] = []
    betas: list[float] = []
    for j in range(steps):
        z = m.T @ (m @ basis[j])
        alphas.append(float(basis[j] @ z))
        done = basis[:j + 1]
        z -= done.T @ (done @ z)  # removes α_j q_j and β_{j−1} q_{j−1} with everything else
        beta = float(z.norm())
        theta, vector = eigh_tridiagonal(alphas, betas, select="i", select_range=(j, j))
        if not (math.isfinite(beta) and math.isfinite(theta[0])):
            break
        if beta * abs(vector[-1, 0]) <= LANCZOS_RESIDUAL * theta[0]:
            return math.sqrt(max(float(theta[0]), 0.0))
        betas.append(beta)
        basis[j + 1] = z / beta
    return float(torch.linalg.svdvals(m.double())[0])


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

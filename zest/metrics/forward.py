"""Forward metrics: summaries of the layer's output activations on the probe batch.

Outputs are read channels-last (``(positions, channels)``; convolution outputs are moved from
``(B, C, H, W)``); padding tokens of text batches are left out.
"""

from __future__ import annotations

import math

import torch

from zest.metrics import register_metric
from zest.probe import LayerContext

NOT_AVAILABLE = float("nan")

NASWOT_RIDGE = 1e-3


@register_metric("act_mean", family="forward", needs={"activations"})
def act_mean(ctx: LayerContext) -> float:
    """Mean of the output activations."""
    return ctx.activation_stats["mean"]


@register_metric("act_std", family="forward", needs={"activations"})
def act_std(ctx: LayerContext) -> float:
    """Standard deviation of the output activations."""
    return ctx.activation_stats["std"]


@register_metric("act_sparsity", family="forward", needs={"activations"})
def act_sparsity(ctx: LayerContext) -> float:
    """Fraction of output activations ``≤ 0`` (those a following ReLU would silence)."""
    return ctx.activation_stats["sparsity"]


@register_metric("naswot", family="forward", needs={"binary_codes"}, direction=1)
def naswot(ctx: LayerContext) -> float:
    """NASWOT score of the layer (Mellor et al. 2021, "Neural Architecture Search without
    Training"): ``log det(K + εI)`` with ``K_ij = c_i·c_j + (1−c_i)·(1−c_j)``, ``c_i`` the binary
    code ``1[output > 0]`` of example ``i`` (all positions flattened, padding excluded) and
    ``ε = 1e-3`` keeping singular kernels finite."""
    kernel = ctx.binary_kernel.double()
    eye = torch.eye(kernel.shape[0], dtype=kernel.dtype)
    return float(torch.linalg.slogdet(kernel + NASWOT_RIDGE * eye).logabsdet)


@register_metric("effective_rank", family="forward", needs={"features"})
def effective_rank(ctx: LayerContext) -> float:
    """Effective rank (Roy & Vetterli 2007) of the centred output features:
    ``exp(−Σ p_i log p_i)`` with ``p_i = σ_i / Σσ`` the normalised singular values of a
    ≤ 256-row sample of the (positions × channels) output."""
    rows = ctx.features.double()
    rows = rows - rows.mean(dim=0, keepdim=True)
    sigma = torch.linalg.svdvals(rows)
    total = sigma.sum()
    if total <= 0:
        return 0.0
    p = sigma / total
    p = p[p > 0]
    return float(math.exp(-(p * p.log()).sum()))

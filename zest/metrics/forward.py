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


@register_metric("act_mean", kind="forward", needs={"activations"})
def act_mean(ctx: LayerContext) -> float:
    """Mean of the output activations."""
    return ctx.activation_stats["mean"]


@register_metric("act_std", kind="forward", needs={"activations"})
def act_std(ctx: LayerContext) -> float:
    """Standard deviation of the output activations."""
    return ctx.activation_stats["std"]


@register_metric("act_sparsity", kind="forward", needs={"activations"})
def act_sparsity(ctx: LayerContext) -> float:
    """Fraction of output activations ``≤ 0`` (those a following ReLU would silence)."""
    return ctx.activation_stats["sparsity"]


@register_metric("naswot", kind="forward", needs={"binary_codes"}, direction=1)
def naswot(ctx: LayerContext) -> float:
    """NASWOT score of the layer (Mellor et al. 2021, "Neural Architecture Search without
    Training"): ``log det(K + εI)`` with ``K_ij = c_i·c_j + (1−c_i)·(1−c_j)``, ``c_i`` the binary
    code ``1[output > 0]`` of example ``i`` (all positions flattened, padding excluded) and
    ``ε = 1e-3`` keeping singular kernels finite."""
    kernel = ctx.binary_kernel.double()
    eye = torch.eye(kernel.shape[0], dtype=kernel.dtype)
    return float(torch.linalg.slogdet(kernel + NASWOT_RIDGE * eye).logabsdet)


@register_metric("effective_rank", kind="forward", needs={"features"})
def effective_rank(ctx: LayerContext) -> float:
    """Effective rank (Roy & Vetterli 2007) of the centred output features:
    ``exp(−Σ p_i log p_i)`` with ``p_i = σ_i / Σσ`` the normalised singular values of a
    ≤ 256-row sample of the (positions × channels) output."""
    rows = ctx.features.double()
    rows = rows - rows.mean(dim=0, keepdim=True)
    # singular values from the eigenvalues of the smaller Gram matrix (cheaper than an SVD)
    gram = rows @ rows.T if rows.shape[0] <= rows.shape[1] else rows.T @ rows
    sigma = torch.linalg.eigvalsh(gram).clamp(min=0).sqrt()
    total = sigma.sum()
    if total <= 0:
        return 0.0
    p = sigma / total
    p = p[p > 0]
    return float(math.exp(-(p * p.log()).sum()))


@register_metric("repr_shift", kind="forward", needs={"block_shift"}, direction=1)
def repr_shift(ctx: LayerContext) -> float:
    """Representation shift of the layer's enclosing block: mean over examples of
    ``1 − cos(h_in, h_out)`` between the block's input and output representative vectors (the
    first / [CLS] token for transformer blocks, globally pooled features for CNN blocks), from
    the one forward pass; every layer of a block gets the block's score. Training-free layer
    selection by block influence (cosine of a representative token, as in ShortGPT-style block
    importance); tune the blocks that change the representation most (direction +1). NaN (n/a)
    where the block's input and output are not comparable (embeddings, stems, blocks that
    change shape)."""
    return ctx.block_shift if ctx.block_shift is not None else NOT_AVAILABLE


@register_metric("class_separation", kind="forward", needs={"pooled", "labels"}, direction=1)
def class_separation(ctx: LayerContext) -> float:
    """Between-class over within-class variability of the pooled output features
    (Xie et al., Findings of EMNLP 2022, hidden-state variability):
    ``Σ_c n_c ‖μ_c − μ‖² / Σ_c Σ_{i∈c} ‖z_i − μ_c‖²`` on one labelled minibatch (z: spatial /
    valid-token mean of the output). Larger = classes better separated at this layer
    (direction +1). NaN with fewer than two classes in the batch."""
    z = ctx.pooled.double()
    labels = ctx.labels
    if labels.ndim != 1:  # a causal LM's token labels name no class
        return NOT_AVAILABLE
    classes = labels.unique()
    if len(classes) < 2:
        return NOT_AVAILABLE
    mean = z.mean(dim=0)
    between, within = 0.0, 0.0
    for c in classes:
        members = z[labels == c]
        centre = members.mean(dim=0)
        between += len(members) * float((centre - mean).pow(2).sum())
        within += float((members - centre).pow(2).sum())
    return between / within if within > 0 else NOT_AVAILABLE

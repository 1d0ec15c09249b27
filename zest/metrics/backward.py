"""Backward metrics: functions of the gradient of the probe loss (supcon or ce)."""

from __future__ import annotations

import math

import torch

from zest.metrics import register_metric
from zest.probe import LayerContext, sum64_of

NOT_AVAILABLE = float("nan")


@register_metric("grad_norm", kind="backward", needs={"grad"}, direction=1, aggregate="rss")
def grad_norm(ctx: LayerContext) -> float:
    """``‖∇W L‖_F``."""
    return ctx.reduction("grad_norm")


@register_metric("rgn", kind="backward", needs={"grad"}, direction=1)
def rgn(ctx: LayerContext) -> float:
    """Relative gradient norm ``‖∇W L‖ / ‖W‖`` (Lee et al. 2023, "Surgical Fine-Tuning Improves
    Adaptation to Distribution Shifts", auto-RGN: larger → tune)."""
    norm = ctx.reduction("weight_norm")
    return ctx.reduction("grad_norm") / norm if norm > 0 else 0.0


@register_metric("snip", kind="backward", needs={"grad"}, direction=1, aggregate="sum")
def snip(ctx: LayerContext) -> float:
    """SNIP saliency summed over the layer: ``Σ |W ⊙ ∇W L|`` (Lee et al. 2019)."""
    return ctx.reduction("abs_weight_dot_grad")


@register_metric("grasp", kind="backward", needs={"grad", "hvp"}, direction=1,
                 aggregate="sum")
def grasp(ctx: LayerContext) -> float:
    """GraSP score summed over the layer: ``−Σ W ⊙ (H ∇W L)`` (Wang et al. 2020), with the
    Hessian-vector product from one one-sided finite-difference pass over the candidate weights
    (perturbation of norm 1e-2 along ∇L). On piecewise-linear (ReLU) networks the difference
    also sees activation kinks that the exact Hessian ignores, so it approximates the exact
    double-backward value rather than reproducing it (see tests/test_metrics.py)."""
    return -sum64_of(torch.mul, ctx.weight, ctx.hvp)


@register_metric("fisher", kind="backward", needs={"fisher"}, direction=1, aggregate="sum")
def fisher(ctx: LayerContext) -> float:
    """Fisher information of the layer's output channels (Theis et al. 2018; Turner et al.
    2020, as in zero-cost-nas): ``Σ_k ½ · mean_n (Σ_s a_nks · δ_nks)²`` with ``a`` the output,
    ``δ = ∂L/∂a``, ``k`` channels and ``s`` spatial / token positions. For an output broadcast
    over the batch (position embeddings) δ is already summed over the examples."""
    if ctx.fisher_channels is None:  # the output has no gradient on this batch
        return NOT_AVAILABLE
    return float(ctx.fisher_channels.sum())


@register_metric("synflow", kind="backward", needs={"synflow"}, direction=1, aggregate="sum")
def synflow(ctx: LayerContext) -> float:
    """SynFlow saliency summed over the layer: ``Σ |W| ⊙ ∂R/∂|W|`` with
    ``R = 1ᵀ f(1; |θ|)`` computed data-free on one all-ones input, in the model's dtype and in
    float64 when that overflows (Tanaka et al. 2020). On networks with bounded activations the
    all-ones input through |θ| saturates them (ReLU6 in EfficientNet-Lite clips every unit at
    6), so no gradient flows and the score is exactly 0 for every layer: measured, not
    missing, but uninformative there (its Kendall τ against any ground truth is undefined).
    NaN for a model whose forward refuses the all-ones input (T5's classifier reads its state at
    the end-of-text tokens, which that input lacks)."""
    if ctx.synflow_grad is None:
        return NOT_AVAILABLE
    return sum64_of(lambda w, s: w.abs() * s, ctx.weight, ctx.synflow_grad)


@register_metric("plain", kind="backward", needs={"grad"}, aggregate="sum")
def plain(ctx: LayerContext) -> float:
    """First-order Taylor term ``Σ W ⊙ ∇W L`` ("plain" of Abdelfattah et al. 2021)."""
    return ctx.reduction("weight_dot_grad")


@register_metric("grad_snr", kind="backward", needs={"grad_halves"}, direction=1)
def grad_snr(ctx: LayerContext) -> float:
    """Agreement of the two half-batch gradients: cosine similarity of the contributions of the
    first and second half of the batch to ``∇W L`` (they sum to it); 1 = both halves push the
    layer the same way, 0 = unrelated, −1 = opposed. NaN for outputs broadcast over the batch
    (e.g. position embeddings), which have no per-example gradient."""
    if ctx.grad_halves is None:  # output broadcast over the batch: no per-example split
        return NOT_AVAILABLE
    g1, g2 = ctx.grad_halves
    squares = sum64_of(lambda g: g * g, g1) * sum64_of(lambda g: g * g, g2)
    if squares == 0:
        return 0.0
    return sum64_of(torch.mul, g1, g2) / math.sqrt(squares)




@register_metric("fim_score", kind="backward", needs={"per_example_fisher"}, direction=1)
def fim_score(ctx: LayerContext) -> float:
    """The layer's share of the diagonal empirical Fisher (Lodha et al. 2023, "On Surgical
    Fine-Tuning for Language Encoders"): ``mean_n ‖g_n‖²`` summed over the layer's weight and
    bias, divided by the same sum over all probed layers; ``g_n`` is example n's contribution
    to the gradient of the probe loss. Per-example gradients come from the recorded inputs and
    output gradients (Gram identities for Linear/Embedding, unfolding for Conv2d, a per-example
    loop otherwise): about one extra weight-gradient pass. Larger → tune (direction +1)."""
    if ctx.fisher_diagonal is None or not ctx.fisher_diagonal_total:
        return NOT_AVAILABLE
    return ctx.fisher_diagonal / ctx.fisher_diagonal_total

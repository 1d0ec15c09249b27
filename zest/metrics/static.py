"""Static metrics: functions of the weight alone (no data)."""

from __future__ import annotations

from zest.metrics import register_metric
from zest.probe import LayerContext


@register_metric("n_params", kind="static", direction=1, aggregate="sum")
def n_params(ctx: LayerContext) -> float:
    """Parameters the layer owns: ``numel(W) + numel(b)``."""
    return float(ctx.layer.n_params)


@register_metric("depth", kind="static")
def depth(ctx: LayerContext) -> float:
    """Relative position of the layer in forward order, in [0, 1]."""
    return float(ctx.layer.depth)


@register_metric("weight_norm", kind="static", aggregate="rss")
def weight_norm(ctx: LayerContext) -> float:
    """Frobenius norm ``‖W‖_F``."""
    return ctx.reduction("weight_norm")


@register_metric("weight_std", kind="static")
def weight_std(ctx: LayerContext) -> float:
    """Standard deviation of the entries of ``W`` (unbiased)."""
    return ctx.reduction("weight_std")


@register_metric("fan_in", kind="static", aggregate="mean")
def fan_in(ctx: LayerContext) -> float:
    """Inputs per output neuron: ``prod(W.shape[1:])`` (in·k·k for convolutions, the embedding
    dimension for embeddings)."""
    return float(ctx.weight[0].numel())


@register_metric("fan_out", kind="static", aggregate="sum")
def fan_out(ctx: LayerContext) -> float:
    """Output neurons: ``W.shape[0]`` (out channels, out features, vocabulary rows)."""
    return float(ctx.weight.shape[0])


@register_metric("spectral_norm", kind="static", aggregate="max")
def spectral_norm(ctx: LayerContext) -> float:
    """Largest singular value ``σ_max`` of ``W`` reshaped to (out, in·k·k), by Lanczos
    iteration (:func:`zest.probe.context.top_singular_value`, exact to 5e-5 relative)."""
    return ctx.largest_singular_value()


KAPPA_EPSILON = 1e-8


@register_metric("kappa", kind="static", direction=-1, aggregate="max")
def kappa(ctx: LayerContext) -> float:
    """Condition number ``σ_max / (σ_min + 1e-8)`` of W reshaped to (out, in·k·k), as computed
    by HF peft's ``KappaTuneSelector``. Peer selector: KappaTune (arXiv 2506.16289) tunes the
    layers with the *lowest* κ (direction −1)."""
    sigma = ctx.singular_values()
    return float(sigma[0] / (sigma[-1] + KAPPA_EPSILON))

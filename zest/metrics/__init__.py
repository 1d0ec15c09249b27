"""Zero-shot layer metrics, registered by name in three kinds (ARCHITECTURE.md §2, "Metric").

A metric is a pure function ``LayerContext -> float`` registered with
``@register_metric(name, kind=..., needs={...}, direction=...)``. ``needs`` names what the probe
must compute for it (see :data:`zest.probe.NEEDS`); ``direction`` is +1 when a larger value means
"tune this layer" in the metric's source paper, -1 when a smaller one does, 0 when the source
gives no direction. Importing this package registers every metric.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from zest._registry import Registry
from zest.errors import InvalidInputError, UnknownNameError, unknown_name_message
from zest.probe import LABEL_NEEDS, NEEDS, LayerContext

#: What a metric reads: the weight alone, the forward pass, or the gradients too.
METRIC_KINDS = ("static", "forward", "backward")


@dataclass(frozen=True)
class MetricInfo:
    """A registered metric."""

    name: str
    kind: str
    needs: frozenset[str]
    direction: int
    function: Callable[[LayerContext], float]
    aggregate: str = "mean"

    def __call__(self, context: LayerContext) -> float:
        return float(self.function(context))


METRICS: Registry[MetricInfo] = Registry("metric")


MetricFunction = Callable[[LayerContext], float]


AGGREGATES = ("mean", "sum", "rss", "max")


def register_metric(name: str, *, kind: str, needs: Iterable[str] = (), direction: int = 0,
                    aggregate: str = "mean") -> Callable[[MetricFunction], MetricFunction]:
    """Registers a metric function under ``name``.

    Args:
        name: Registry name (the record column is ``m_<name>``).
        kind: ``static``, ``forward`` or ``backward`` (:data:`METRIC_KINDS`).
        needs: Probe quantities the metric reads (:data:`zest.probe.NEEDS`).
        direction: +1 if the source paper tunes layers with large values, -1 small, 0 none.
        aggregate: How ``--granularity block`` combines a block's layers: ``mean``, ``sum``,
            ``rss`` (root of the sum of squares, for norms) or ``max``.
    """
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    if kind not in METRIC_KINDS:
        raise ValueError(f"kind must be one of {METRIC_KINDS}, got {kind!r}")
    needs = frozenset(needs) | {"weight"}
    if needs - NEEDS:
        raise ValueError(f"metric {name}: unknown needs {sorted(needs - NEEDS)}")

    def decorator(function: MetricFunction) -> MetricFunction:
        info = MetricInfo(name, kind, needs, direction, function, aggregate)
        METRICS.register(name, kind=kind)(info)
        return function

    return decorator


def get_metric(name: str) -> MetricInfo:
    """The registered metric ``name`` (unknown names list close and known ones)."""
    return METRICS.get(name)


def metric_names(kind: str | None = None) -> list[str]:
    """Registered metric names, optionally of one kind, in registration order."""
    return [n for n in METRICS.names() if kind is None or METRICS.get(n).kind == kind]


def resolve_metrics(spec: str | Sequence[str] | None) -> list[str]:
    """Parses ``--metrics``: ``all``, a kind (:data:`METRIC_KINDS`), or a comma-separated list
    of names."""
    if spec is None or spec == "all":
        return metric_names()
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names: list[str] = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        if item in METRIC_KINDS:
            names.extend(metric_names(item))
        elif item in METRICS:
            names.append(item)
        else:
            raise UnknownNameError(unknown_name_message("metric", item,
                                                        METRICS.names() + list(METRIC_KINDS)))
    if not names:
        raise InvalidInputError(f"metrics={spec!r} selects no metric; use 'all', a kind "
                                f"({', '.join(METRIC_KINDS)}) or metric names",
                                parameter="metrics")
    return list(dict.fromkeys(names))


def needs_of(names: Iterable[str]) -> set[str]:
    """Union of the probe quantities the named metrics need."""
    result: set[str] = set()
    for name in names:
        result |= get_metric(name).needs
    return result


def needs_labels(name: str) -> bool:
    """Whether the metric ``name`` reads the batch's labels (through the probe loss's gradient
    or directly); the others can rank layers on unlabelled data."""
    return bool(get_metric(name).needs & LABEL_NEEDS)


def compute_metrics(contexts: dict[str, LayerContext], names: Sequence[str], *,
                    weights_fingerprint: str | None = None) -> dict[str, dict[str, float]]:
    """``{layer: {metric: value}}`` for every context and named metric.

    With ``weights_fingerprint`` (:func:`zest.fingerprint.model_fingerprint` of the probed
    model), what the metrics compute from the weights alone (singular values, σ_max, ‖W‖,
    std(W)) is taken from, and added to, the cache of earlier calls on the same weights
    (:mod:`zest.metrics.weight_memos`).
    """
    if weights_fingerprint is not None:
        weight_memos.recall(weights_fingerprint, contexts)
    infos = [get_metric(n) for n in names]
    values = {layer: {info.name: info(ctx) for info in infos} for layer, ctx in contexts.items()}
    if weights_fingerprint is not None:
        weight_memos.remember(weights_fingerprint, contexts)
    return values


def uses_weights_alone(names: Iterable[str]) -> bool:
    """Whether any of the named metrics is a metric of the weights alone (kind ``static``),
    the ones :func:`compute_metrics` can take from the cache of a weights fingerprint."""
    return any(get_metric(name).kind == "static" for name in names)


# importing backward, forward and static registers their metrics
from zest.metrics import backward, forward, static, weight_memos  # noqa: E402,F401

__all__ = ["METRICS", "METRIC_KINDS", "MetricInfo", "compute_metrics", "get_metric", "metric_names",
           "needs_of", "register_metric", "resolve_metrics", "uses_weights_alone"]

"""The tuning methods by name, and what a budget plan reads of a method and a layer.

:data:`METHODS` maps each method name to its :class:`~zest.finetune.base.Tuner` class (a class
registers itself with :func:`register_tuner`); its options are the class's ``options_class``
(:mod:`zest.finetune.options`), read by :func:`tuner_parameters`, :func:`tuner_defaults` and
:func:`method_options`, and by the CLI, which generates ``zest finetune``'s tuner options from
them (ARCHITECTURE.md §3a, §6).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from zest._registry import Registry
from zest.errors import InvalidInputError, UnknownNameError, closest_names
from zest.finetune.options import TunerOptions
from zest.layers import candidate_layers, output_dim
from zest.models import Task

if TYPE_CHECKING:
    from zest.finetune.base import Tuner

#: The tuning methods by name; a tuner class registers itself with :func:`register_tuner`.
METHODS: Registry[type[Tuner]] = Registry("fine-tuning method")


def register_tuner(cls: type[Tuner]) -> type[Tuner]:
    """Class decorator: registers a :class:`~zest.finetune.base.Tuner` subclass in
    :data:`METHODS` under its ``method`` name (whether it takes layers is its ``uses_layers``;
    which it can tune, its ``can_tune``; its options, its ``options_class``)."""
    METHODS.register(cls.method)(cls)
    return cls


def tuner_parameters(method: str) -> set[str]:
    """The options of a registered method beyond the shared ones (``k`` for GPS,
    ``ratio``/``r``/``importance`` for SPSFT, ...), the fields of its ``options_class``."""
    return {f.name for f in METHODS.get(method).options_class.own_fields()}


def tuner_defaults(method: str) -> dict[str, Any]:
    """The default values of :func:`tuner_parameters` (``{"k": 1, ...}`` for GPS)."""
    return METHODS.get(method).options_class.defaults()


def method_options(method: str, options: Mapping[str, Any]) -> TunerOptions:
    """``options`` as ``method``'s validated options object; one line for an option the
    method does not take (``k`` for SPSFT) or a bad value."""
    options_class = METHODS.get(method).options_class
    unknown = set(options) - tuner_parameters(method) - set(TunerOptions.shared_names())
    if unknown:
        known = ", ".join(sorted(tuner_parameters(method))) or "none of its own"
        raise InvalidInputError(f"method={method!r} takes no option "
                                f"{', '.join(sorted(unknown))}; its options: {known}",
                                parameter=("method", *sorted(unknown)))
    return options_class(**options)


def method_aware_choice(method: str) -> str:
    """The call that chooses only layers ``method`` can tune, named by a tuner refusing one."""
    return (f"choose its layers with ranking.top(k, method={method!r}) or zest rank --method "
            f"{method}")


def resolve_layer_names(model: nn.Module, task: Task, layers: Sequence[str] | str | None,
                        allow_any_module: bool = False) -> list[str]:
    """Validates the chosen layer names (``"all"`` → every candidate layer)."""
    candidates = [layer.name for layer in candidate_layers(model, task.head_name)]
    if layers == "all":
        return candidates
    if layers is None or isinstance(layers, str):
        raise InvalidInputError(f"layers must be a list of layer names or 'all', got {layers!r}",
                                parameter="layers")
    names = list(dict.fromkeys(layers))
    if not names:
        raise InvalidInputError("no layer chosen; pass layer names, 'all', or use "
                                "zest.rank(...).top(k, method=...)")
    modules = dict(model.named_modules())
    for name in names:
        if name in candidates:
            continue
        if allow_any_module and name in modules and \
                isinstance(getattr(modules[name], "weight", None), nn.Parameter):
            continue
        close = closest_names(name, candidates)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownNameError(f"no candidate layer named {name!r}{hint}")
    return names


@dataclass(frozen=True)
class LayerShape:
    """What a budget plan reads of a layer: ``rows`` output neurons of ``width`` weight values
    each (the weight viewed per neuron, :func:`zest.layers.neuron_rows`), ``bias`` values, and
    ``params``, every parameter the module owns (weight and bias)."""

    rows: int
    width: int
    bias: int
    params: int

    @classmethod
    def of(cls, module: nn.Module) -> LayerShape:
        """The shape of ``module``'s own parameters."""
        weight = module.weight
        rows = int(weight.shape[output_dim(module)])
        own = module._parameters  # noqa: SLF001 - the module's own, not its children's
        bias = own.get("bias")
        return cls(rows=rows, width=int(weight.numel()) // rows,
                   bias=0 if bias is None else int(bias.numel()),
                   params=sum(int(p.numel()) for p in own.values() if p is not None))

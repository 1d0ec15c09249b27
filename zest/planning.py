"""Budget plans: which ranked layers to fine-tune, how densely, and with which method.

One call, :meth:`zest.Ranking.finetune_plan` (this module's :func:`plan_finetune`), turns a
ranking and a
request (a share of trainable parameters, ``top_k`` layers, or neither) into a
:class:`FinetunePlan`: the layers, the tuner's options and what each layer will train.
``zest finetune --layers auto``, the Python API and ``benchmarks/accuracy_budget.py`` all train
what it returns (ARCHITECTURE.md §3a).

The budget is the share of the model's parameters that train, head included, for every method.
The plan chooses only among the layers the method can tune (``Tuner.can_tune``), best first:

- A dense method (``layers``): the best layers whose weights and biases fit in the budget.
- A sparse method (a knob of its options' ``density_options``: GPS's ``k``, SPSFT's ``ratio``,
  LoRA's ``rank``): (1) the sparsest setting at which the best layers that fit the budget hold,
  densely, at most ``spread`` times the budget — so the update has a density of about ``1 / spread``
  within them; (2) those layers at the densest setting whose trained values still fit; (3)
  further layers, best first, at that setting while they fit. A setting given by the caller
  (``k=4``) is kept, and the plan chooses only the layers. Without a ``spread`` from the caller,
  the method's measured one for the budget (:data:`SPREAD_RULES`, :func:`spread_rule`).

``method="auto"`` picks the method from :data:`METHOD_RULES` by the budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from torch import nn

from zest.errors import InvalidInputError
from zest.finetune.base import Tuner
from zest.finetune.options import TunerOptions
from zest.finetune.registry import METHODS, LayerShape, method_options, tuner_defaults
from zest.models import Task

#: The method name that lets :data:`METHOD_RULES` choose.
AUTO = "auto"
#: Layers chosen when neither a count nor a budget is given.
DEFAULT_TOP_K = 5
#: A plan trains at most the budget and at least ``1 - FILL_TOLERANCE`` of it, or says in its
#: ``notes`` why not (layers too coarse for a dense method, too few tunable layers).
FILL_TOLERANCE = 0.1
#: Spread of a sparse method without a measured rule in :data:`SPREAD_RULES` (LoRA's rank): the
#: chosen layers hold 4× the budget, a 25 % dense update — the accuracy benchmark's setting
#: before the spread was measured.
DEFAULT_SPREAD = 4.0


@dataclass(frozen=True)
class PlanRule:
    """The parameter of the sparse plan, and, in :data:`SPREAD_RULES`, the budgets it is for.

    Attributes:
        spread: How many times the budget the chosen layers hold, counted densely (at least 1);
            the sparse update's density within them is about ``1 / spread``. 1 tunes few layers
            densely, larger values tune more layers more sparsely.
        min_budget: In :data:`SPREAD_RULES`: the rule holds for budgets from this share up
            (to the next rule's).
        reason: In :data:`SPREAD_RULES`: the measurement behind it (the plan records it).
    """

    spread: float = DEFAULT_SPREAD
    min_budget: float = 0.0
    reason: str = ""

    def __post_init__(self) -> None:
        if (isinstance(self.spread, bool) or not isinstance(self.spread, int | float)
                or not math.isfinite(self.spread) or self.spread < 1):
            raise InvalidInputError(f"spread must be a number of at least 1 (how many times "
                                    f"the budget the chosen layers hold), got {self.spread!r}",
                                    parameter="spread")
        if not 0 <= self.min_budget < 1:
            raise InvalidInputError(f"a spread rule's min_budget must be in [0, 1), got "
                                    f"{self.min_budget!r}")


#: The spread of each sparse method's plan when the caller gives none, per budget: the first
#: rule whose ``min_budget`` the budget reaches. Chosen by ``benchmarks/accuracy_budget.py
#: --spread 1,2,4,8`` (README, "The plan's rules, measured": val accuracy, mean over seeds and
#: the groups with every spread, ranked by predictors that did not see the group), at ~5 % and
#: ~1 % only, so the boundary between them (3 %, as in :data:`METHOD_RULES`) is not measured.
SPREAD_RULES: Mapping[str, tuple[PlanRule, ...]] = MappingProxyType({
    "gps": (PlanRule(2.0, 0.03, "GPS at ~5 %: spread 2 led (val 90.0 %; 1: 82.6, 4: 87.8, "
                     "8: 87.5; 7 groups)"),
            PlanRule(8.0, 0.0, "GPS at ~1 %: spread 8 led (val 86.1 %; 1: 82.9, 2: 83.0, "
                     "4: 85.7; 7 groups)")),
    "spsft": (PlanRule(1.0, 0.03, "SPSFT at ~5 %: spread 1 led (val 90.0 %; 2: 87.8, "
                       "4: 87.0, 8: 84.9; 7 groups)"),
              PlanRule(4.0, 0.0, "SPSFT at ~1 %: spread 4 led (val 88.0 %; 1: 84.6, 2: 87.2, "
                       "8: 85.2; 7 groups)")),
})


def spread_rule(method: str, param_budget: float | None) -> PlanRule:
    """The rule a plan for ``method`` at ``param_budget`` follows when the caller gives no
    spread: the method's first :data:`SPREAD_RULES` entry whose ``min_budget`` the budget
    reaches (no budget: the smallest budgets' rule), else ``PlanRule()``:
    :data:`DEFAULT_SPREAD` without a reason (LoRA's rank: not measured)."""
    budget = 0.0 if param_budget is None else param_budget
    return next((rule for rule in SPREAD_RULES.get(method, ()) if budget >= rule.min_budget),
                PlanRule())


@dataclass(frozen=True)
class MethodRule:
    """One row of :data:`METHOD_RULES`: ``method`` for budgets from ``min_budget`` up."""

    min_budget: float
    method: str
    reason: str


#: ``method="auto"``: the first rule whose ``min_budget`` the budget reaches, read off the
#: accuracy benchmark (README, "The plan's rules, measured": val accuracy, mean over 3 seeds and
#: the groups with every option, each method at its learning rate chosen on val from 3e-3 …
#: 1e-4 (and 1e-2 on the two mnist5k groups),
#: ZEST rows through ``Ranking.finetune_plan`` at the shipped spreads, predictors that did not
#: see the
#: group). Measured at ~5 % and ~1 % only: the boundary between them is not measured. At ~5 %
#: the three are a near tie (0.05 and 0.5 points), so GPS there is a default, not a law; at ~1 %
#: SPSFT leads GPS by 1.8 points and dense layers by 8.6.
METHOD_RULES = (
    MethodRule(0.03, "gps", "GPS led at ~5 % by a hair (val 90.0 %, SPSFT at spread 1 "
               "89.95, dense layers 89.5; 7 groups: 5 CNN, 2 minilm)"),
    MethodRule(0.0, "spsft", "SPSFT led at ~1 % (val 88.0 %, GPS at spread 8 86.1, dense "
               "layers 79.3; 7 groups: 5 CNN, 2 minilm)"),
)


def choose_method(param_budget: float | None) -> MethodRule:
    """The rule of :data:`METHOD_RULES` that ``method="auto"`` follows for ``param_budget``."""
    if param_budget is None:
        raise InvalidInputError(f"method='auto' chooses by the budget; pass param_budget (e.g. "
                                f"0.01) or name {_layer_methods()} instead",
                                parameter=("method", "param_budget"))
    check_param_budget(param_budget)
    return _method_rule(param_budget)


def _method_rule(param_budget: float) -> MethodRule:
    """The :data:`METHOD_RULES` row for a budget already checked."""
    return next(rule for rule in METHOD_RULES if param_budget >= rule.min_budget)


def _layer_methods() -> str:
    """The registered methods that take layers, quoted, for a message."""
    names = [repr(name) for name in METHODS.names() if METHODS.get(name).uses_layers]
    return ", ".join(names[:-1]) + f" or {names[-1]}"


@dataclass
class FinetunePlan:
    """What to fine-tune: ``METHODS.get(plan.method)(model, task, layers=plan.layers,
    **plan.options)``.

    Attributes:
        method: The tuning method (``auto`` resolved).
        layers: The chosen layers, best first.
        options: The tuner's options: the caller's, plus the density the plan chose.
        per_layer: Per chosen layer: ``params`` (its weight and bias), ``trainable`` (values
            the method trains in it) and its density setting (``k``, ``r`` or ``rank``).
        head_params: Parameters of the head (always trained).
        total_params: Parameters of the whole model.
        param_budget: The requested share of trainable parameters, if any.
        top_k: The requested number of layers, if any.
        spread: The :class:`PlanRule` spread used (``None`` when the plan set no density).
        spread_rule: The reason of the :data:`SPREAD_RULES` row it followed, when the caller
            gave no spread and the method has a measured one.
        method_rule: With ``method="auto"``: the reason from :data:`METHOD_RULES`.
        notes: What the caller should know (a budget the method cannot fill).
    """

    method: str
    layers: list[str]
    options: dict[str, Any]
    per_layer: dict[str, dict[str, int]]
    head_params: int
    total_params: int
    param_budget: float | None = None
    top_k: int | None = None
    spread: float | None = None
    spread_rule: str | None = None
    method_rule: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def trainable_params(self) -> int:
        """Values the plan trains, head included (what ``Tuner.count_trainable`` reports)."""
        return self.head_params + sum(entry["trainable"] for entry in self.per_layer.values())

    @property
    def trainable_share(self) -> float:
        """:attr:`trainable_params` as a share of the model's parameters."""
        return self.trainable_params / self.total_params

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-friendly values (what ``config.json`` records)."""
        return {"method": self.method, "layers": list(self.layers), "options": dict(self.options),
                "per_layer": {name: dict(entry) for name, entry in self.per_layer.items()},
                "param_budget": self.param_budget, "top_k": self.top_k, "spread": self.spread,
                "spread_rule": self.spread_rule,
                "method_rule": self.method_rule, "head_params": self.head_params,
                "total_params": self.total_params,
                "planned_trainable_params": self.trainable_params,
                "planned_trainable_share": self.trainable_share, "notes": list(self.notes)}


@dataclass(frozen=True)
class PlanRequest:
    """What a plan is asked for (:func:`plan_finetune`), validated once, when built, before any
    work: :func:`check_selection`, :class:`PlanRule`, the method (``auto`` resolved by
    :data:`METHOD_RULES`) and its options. ``zest finetune`` builds one with its request
    (:class:`zest.pipeline.FinetuneRequest`) and the plan reads it as it is.

    Args:
        method: A registered method that takes layers, or ``auto``; or a
            :class:`PlanRequest` (validated already), which then gives every other argument.
        param_budget: Share of the model's parameters to train, head included, in (0, 1].
        top_k: Instead of a budget: this many layers, with the method's own density.
        spread: How many times the budget a sparse plan's layers hold (:class:`PlanRule`).
        options: Tuner options fixed by the caller (``{"k": 4}``).

    Attributes:
        planned_method: The method the plan trains (``auto`` resolved).
        method_rule: With ``auto``: the reason of its :data:`METHOD_RULES` row.
        tuner_options: ``options`` as the planned method's validated options object.
    """

    method: str
    param_budget: float | None = None
    top_k: int | None = None
    spread: float | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    planned_method: str = field(init=False)
    method_rule: str | None = field(init=False)
    tuner_options: TunerOptions = field(init=False, repr=False)

    def __post_init__(self) -> None:
        check_selection(self.top_k, self.param_budget)
        if self.spread is not None:
            PlanRule(spread=self.spread)
        options = dict(self.options or {})
        method, reason = self.method, None
        if method == AUTO:
            if self.param_budget is None:
                choose_method(None)  # one line: auto needs a budget
            specific = set(options) - set(TunerOptions.shared_names())
            if specific:
                raise InvalidInputError(f"method='auto' chooses the tuner and its density; drop "
                                        f"{', '.join(sorted(specific))} or name "
                                        f"{_layer_methods()} instead",
                                        parameter=("method", *specific))
            rule = _method_rule(self.param_budget)
            method, reason = rule.method, rule.reason
        if not METHODS.get(method).uses_layers:
            raise InvalidInputError(f"method={method!r} trains a fixed set of parameters; it "
                                    "has no layers to plan", parameter="method")
        object.__setattr__(self, "options", options)
        object.__setattr__(self, "planned_method", method)
        object.__setattr__(self, "method_rule", reason)
        object.__setattr__(self, "tuner_options", method_options(method, options))


def check_param_budget(param_budget: float) -> None:
    """Refuses a ``param_budget`` outside (0, 1] (the one check of a budget)."""
    if isinstance(param_budget, bool) or not isinstance(param_budget, int | float) \
            or not 0 < param_budget <= 1:
        raise InvalidInputError(f"param_budget must be in (0, 1], got {param_budget!r}",
                                parameter="param_budget")


def check_selection(top_k: int | None, param_budget: float | None) -> None:
    """Validates how many layers to choose, before any work: at most one of ``top_k`` (a
    positive integer) and ``param_budget`` (a share in (0, 1])."""
    if top_k is not None and param_budget is not None:
        raise InvalidInputError("pass either top_k or param_budget, not both",
                                parameter=("top_k", "param_budget"))
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                              or top_k < 1):
        raise InvalidInputError(f"top_k must be a positive integer, got {top_k!r}",
                                parameter="top_k")
    if param_budget is not None:
        check_param_budget(param_budget)


def layer_tuner(method: str) -> type[Tuner]:
    """The tuner class of ``method``, a registered method that takes layers; raises one line
    for an unknown name or a method without layers (``full``, ``head``, ``bitfit``)."""
    tuner_class = METHODS.get(method)
    if not tuner_class.uses_layers:
        raise InvalidInputError(f"method={method!r} trains a fixed set of parameters; it has "
                                "no layers to choose", parameter="method")
    return tuner_class


def tunable_layers(method: str, model: nn.Module, names: Sequence[str]) -> list[str]:
    """The layers of ``names`` that ``method`` can tune, in their order: modules with a weight
    that the method's tuner accepts (``Tuner.can_tune``; a block is no layer). The one test
    behind plans, ``Ranking.top(k, method=...)`` / ``select`` and ``zest rank --method``
    (ARCHITECTURE.md §3a)."""
    tuner_class = layer_tuner(method)
    modules = dict(model.named_modules())
    return [name for name in names if name in modules
            and isinstance(getattr(modules[name], "weight", None), nn.Parameter)
            and tuner_class.can_tune(name, modules[name])]


def fill_budget(layers: Sequence[str], params: Sequence[int], allowed: float) -> list[str]:
    """Greedy budget fill: walks ``layers`` best first and keeps each one whose parameter
    count (``params``, aligned) still fits in ``allowed``; larger ones are skipped, not ended on.
    Empty when not even the smallest fits."""
    chosen, used = [], 0
    for layer, count in zip(layers, params, strict=True):
        if used + count <= allowed:
            chosen.append(layer)
            used += count
    return chosen


def plan_finetune(ranked_layers: Sequence[str], model: nn.Module, task: Task,
                  method: str | PlanRequest, param_budget: float | None = None, *,
                  top_k: int | None = None, spread: float | None = None,
                  options: Mapping[str, Any] | None = None) -> FinetunePlan:
    """Plans a fine-tuning run over ``ranked_layers`` (best first); see the module docstring.

    Args:
        ranked_layers: Candidate layer names, best first (a ranking's ``table["layer"]``).
        model: The model they belong to (read, not changed).
        task: Its task adapter (for the head).
        method: A registered method that takes layers, or ``auto``; or a
            :class:`PlanRequest` (validated already), which then gives every other argument.
        param_budget: Share of the model's parameters to train, head included, in (0, 1].
        top_k: Instead of a budget: this many layers, with the method's own density.
        spread: How many times the budget a sparse plan's layers hold (:class:`PlanRule`);
            ``None``: the method's measured one for the budget, :func:`spread_rule`.
        options: Tuner options fixed by the caller (``{"k": 4}``, ``{"importance": "l2"}``).

    Returns:
        A :class:`FinetunePlan`. Neither ``param_budget`` nor ``top_k``: the
        :data:`DEFAULT_TOP_K` best layers at the method's default density.
    """
    if isinstance(method, PlanRequest):
        if (param_budget, top_k, spread, options) != (None, None, None, None):
            raise InvalidInputError("a PlanRequest carries the budget, top_k, spread and "
                                    "options; pass it alone")
        request = method
    else:
        request = PlanRequest(method, param_budget, top_k=top_k, spread=spread,
                              options=options or {})
    method, options = request.planned_method, dict(request.options)
    param_budget, top_k, spread = request.param_budget, request.top_k, request.spread
    rule = spread_rule(method, param_budget) if spread is None else PlanRule(spread)
    tuner_class = METHODS.get(method)
    tunable = tunable_layers(method, model, ranked_layers)
    if not tunable:
        raise InvalidInputError(f"none of the ranked layers can be tuned by method={method!r}; "
                                "choose another method or name the layers",
                                parameter="method")
    shapes = {name: LayerShape.of(model.get_submodule(name)) for name in tunable}
    settings = {**tuner_defaults(method), **options}
    head = sum(int(p.numel()) for p in task.head(model).parameters()) if task.tunes_head else 0
    total = sum(int(p.numel()) for p in model.parameters())

    def entries(names: Sequence[str], setting: Mapping[str, Any]) -> dict[str, dict | None]:
        return {name: tuner_class.layer_trainable(shapes[name], setting) for name in names}

    def fill(names: Sequence[str], setting: Mapping[str, Any], allowed: float) -> list[str]:
        fitting = {n: e["trainable"] for n, e in entries(names, setting).items() if e is not None}
        return fill_budget(list(fitting), list(fitting.values()), allowed)

    plan = FinetunePlan(method=method, layers=[], options=options, per_layer={},
                        head_params=head, total_params=total, param_budget=param_budget,
                        top_k=top_k, method_rule=request.method_rule)
    if not any(e is not None for e in entries(tunable, settings).values()):
        raise InvalidInputError(f"none of the layers method={method!r} can tune takes "
                                f"{', '.join(f'{k}={v}' for k, v in options.items())}; pass "
                                "a smaller value", parameter=("method", *options))
    if param_budget is None:
        eligible = [n for n, e in entries(tunable, settings).items() if e is not None]
        wanted = top_k or DEFAULT_TOP_K
        if top_k is not None and top_k > len(eligible):
            raise InvalidInputError(f"top_k={top_k} exceeds the {len(eligible)} ranked layers "
                                    f"method={method!r} can tune; pass a smaller top_k",
                                    parameter=("top_k", "method"))
        chosen = eligible[:wanted]
    else:
        allowed = param_budget * total - head
        if allowed < 1:
            raise InvalidInputError(f"param_budget={param_budget} ({int(param_budget * total)} "
                                    f"parameters) does not cover the head alone ({head}); raise "
                                    f"it above {_rounded_up((head + 1) / total)} or use "
                                    "method='head'", parameter=("param_budget", "method"))
        density_options = tuner_class.options_class.density_options
        density = next((o for o in density_options if o in options), None)
        if not density_options or density is not None:
            chosen = fill(tunable, settings, allowed)  # dense, or the caller's density
        else:
            knob = density_options[0]
            chosen, settings = _sparse_choice(tunable, shapes, tuner_class, settings, knob,
                                              allowed, rule.spread, fill)
            for other in density_options[1:]:
                settings[other] = None  # the plan's knob decides (SPSFT: ratio, not r)
            plan.options = {**options, knob: settings[knob]}
            plan.spread, plan.spread_rule = rule.spread, rule.reason or None
        if not chosen:
            cheapest = min(e["trainable"] for e in entries(tunable, settings).values()
                           if e is not None)
            raise InvalidInputError(f"param_budget={param_budget} leaves {int(allowed)} "
                                    f"parameters beside the head, fewer than the smallest layer "
                                    f"method={method!r} can tune ({cheapest}); raise it to at "
                                    f"least {_rounded_up((head + cheapest) / total)}",
                                    parameter=("param_budget", "method"))
    plan.layers = chosen
    plan.per_layer = {name: {"params": shapes[name].params, **entry}
                      for name, entry in entries(chosen, settings).items()}
    if param_budget is not None and plan.trainable_share < (1 - FILL_TOLERANCE) * param_budget:
        plan.notes.append(f"the plan fills only {plan.trainable_share:.3g} of the "
                          f"{param_budget:g} budget: no further layer --method {method} can "
                          "tune fits" + (f" at a density of about 1/{plan.spread:g} or more"
                                         if plan.spread is not None else ""))
    return plan


def _rounded_up(share: float) -> str:
    """``share`` rounded up to two significant digits, for a budget to suggest."""
    scale = 10 ** (1 - math.floor(math.log10(share)))
    return f"{math.ceil(share * scale) / scale:g}"


def _sparse_choice(tunable: list[str], shapes: dict[str, LayerShape], tuner_class: type[Tuner],
                   settings: dict[str, Any], knob: str, allowed: float, spread: float,
                   fill: Callable[[Sequence[str], Mapping[str, Any], float], list[str]]
                   ) -> tuple[list[str], dict[str, Any]]:
    """Steps (1)–(3) of the module docstring; returns the layers and the settings."""
    values = tuner_class.density_values([shapes[name] for name in tunable])
    start, chosen = None, []
    for i, value in enumerate(values):  # (1) the sparsest setting holding ≤ spread × budget
        layers = fill(tunable, {**settings, knob: value}, allowed)
        if layers:
            start, chosen = i, layers
            if sum(shapes[name].params for name in layers) <= spread * allowed:
                break
    if start is None:
        return [], {**settings, knob: values[0]}
    best = start
    for i in range(start + 1, len(values)):  # (2) as dense as the budget allows
        setting = {**settings, knob: values[i]}
        counts = [tuner_class.layer_trainable(shapes[name], setting) for name in chosen]
        if any(c is None for c in counts) or sum(c["trainable"] for c in counts) > allowed:
            break
        best = i
    setting = {**settings, knob: values[best]}
    used = sum(tuner_class.layer_trainable(shapes[name], setting)["trainable"]
               for name in chosen)
    rest = [name for name in tunable if name not in set(chosen)]
    extra = set(fill(rest, setting, allowed - used))  # (3) more layers at that setting
    return [name for name in tunable if name in extra or name in set(chosen)], setting

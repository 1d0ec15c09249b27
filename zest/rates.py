"""The learning rate each method trains at by default (``lr="auto"``, ``zest finetune --lr auto``).

One table, :data:`RATE_RULES`, keyed by (method, model kind), each row with the measurement behind
it; :func:`default_rate` reads it for a tuner, the run prints the row and ``config.json`` records
it. A rate the user passes is kept as given. The rows are read off the accuracy benchmark's
trials (``benchmarks/accuracy_budget.py``: each (group, budget, method) trains at every rate of
its grid at the first seed), the way :data:`zest.planning.SPREAD_RULES` are: the row's rate is
the one with the best mean val accuracy over the benchmark's cases of that method and model
kind (``benchmarks/report.py`` ``measured_rates``), and ``tests/test_benchmark_results.py``
fails when a row no longer matches the committed results (ARCHITECTURE.md §3a).

Model kinds (:func:`model_kind`): ``image`` (CNNs, ViTs), ``encoder`` (text models that read a
first token or the whole sequence: BERT-style) and ``decoder`` (causal text models: a classifier
on the last token, or a causal-LM task). A kind the benchmark has not measured for a method uses
the nearest measured kind, and its row says so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

from zest.errors import InvalidInputError

if TYPE_CHECKING:
    from zest.models import Task

#: The value of ``lr`` that asks for :func:`default_rate`.
AUTO_RATE = "auto"
#: The model kinds the table tells apart (:func:`model_kind`).
MODEL_KINDS = ("image", "encoder", "decoder")


@dataclass(frozen=True)
class RateRule:
    """One row of :data:`RATE_RULES`.

    Attributes:
        lr: The AdamW learning rate.
        reason: The measurement behind it (printed with the run, recorded in ``config.json``).
    """

    lr: float
    reason: str


_TWO_EPOCHS = "accuracy benchmark, 2 epochs x 600 examples"
#: The measurements behind :data:`RATE_RULES`, one row per (method, model kind): the rate
#: chosen, the benchmark's first-seed cases (group x budget x method label) of that method and
#: kind, and the mean val accuracy (%) at every rate of the grid; the chosen rate is the best
#: of them (CNN groups: efficientnet_lite0/lite2 and mobilenetv2 on digits / mnist5k; encoder
#: groups: minilm on r8 and rotten_tomatoes). "lowest" / "highest": the rate is at the grid's
#: edge (a rate beyond it was not tried on every case).
_MEASURED = """
full    image    1e-3   5  1e-4 47.4, 3e-4 74.1, 1e-3 87.0, 3e-3 82.6
full    encoder  1e-4   2  1e-4 81.2, 3e-4 80.5, 1e-3 63.7, 3e-3 51.2; lowest
head    image    3e-3   5  1e-4 34.8, 3e-4 69.0, 1e-3 82.1, 3e-3 86.0; highest
head    encoder  1e-3   2  1e-4 53.8, 3e-4 54.8, 1e-3 56.2, 3e-3 54.0
layers  image    1e-3  50  1e-4 51.4, 3e-4 77.9, 1e-3 84.9, 3e-3 75.7
layers  encoder  3e-3  20  1e-4 57.0, 3e-4 64.8, 1e-3 72.0, 3e-3 75.5; highest
gps     image    1e-3  50  1e-4 49.8, 3e-4 80.0, 1e-3 88.6, 3e-3 81.3
gps     encoder  3e-3  20  1e-4 55.4, 3e-4 62.8, 1e-3 66.9, 3e-3 73.1; highest
spsft   image    1e-3  50  1e-4 51.6, 3e-4 80.2, 1e-3 88.1, 3e-3 82.0
spsft   encoder  3e-3  20  1e-4 59.1, 3e-4 69.0, 1e-3 75.8, 3e-3 77.4; highest
lora    image    1e-3  10  1e-4 54.0, 3e-4 80.7, 1e-3 88.6, 3e-3 84.1
lora    encoder  3e-3   8  1e-4 53.8, 3e-4 55.4, 1e-3 63.5, 3e-3 75.4; highest
"""


def _read_rules(table: str) -> dict[tuple[str, str], RateRule]:
    """:data:`RATE_RULES` from :data:`_MEASURED`, each reason quoting its row."""
    rules = {}
    for row in table.strip().splitlines():
        method, kind, lr, cases, rest = row.split(maxsplit=4)
        means, _, edge = rest.partition("; ")
        reason = f"{_TWO_EPOCHS}; {cases} cases, mean val % by rate: {means}"
        rules[(method, kind)] = RateRule(float(lr), reason + (f"; at the grid's {edge} rate"
                                                               if edge else ""))
    return rules


#: (method, model kind) → rate, read off the accuracy benchmark (:data:`_MEASURED`).
RATE_RULES: Mapping[tuple[str, str], RateRule] = MappingProxyType(_read_rules(_MEASURED))
#: Where a (method, kind) has no row: the kinds tried in turn (a decoder is read as an
#: encoder, the nearest measured text model), then the method (``bitfit`` trains biases
#: and the head densely, as ``layers`` does).
KIND_FALLBACK: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "image": ("image",), "encoder": ("encoder",), "decoder": ("decoder", "encoder")})
METHOD_FALLBACK: Mapping[str, tuple[str, ...]] = MappingProxyType({"bitfit": ("layers",)})


def model_kind(task: Task) -> str:
    """The :data:`MODEL_KINDS` entry of a task: ``image`` for images; ``decoder`` for a causal
    text model (a causal-LM task, or a classifier reading the last token); else ``encoder``."""
    if task.modality == "image":
        return "image"
    return "decoder" if task.kind == "causal_lm" or task.pooling == "last" else "encoder"


def default_rate(method: str, task: Task) -> RateRule:
    """The rate ``method`` trains at on ``task``'s model without an ``lr``: :func:`rate_for`
    its :func:`model_kind`."""
    return rate_for(method, model_kind(task))


def rate_for(method: str, kind: str) -> RateRule:
    """The :data:`RATE_RULES` row of ``method`` on a ``kind`` model (one of
    :data:`MODEL_KINDS`). A row found through :data:`KIND_FALLBACK` or :data:`METHOD_FALLBACK`
    says which one it stands in for in its ``reason``.

    Raises:
        InvalidInputError: no row for the method (a tuner registered without one): pass ``lr``.
    """
    for rate_method in (method, *METHOD_FALLBACK.get(method, ())):
        for rate_kind in KIND_FALLBACK[kind]:
            rule = RATE_RULES.get((rate_method, rate_kind))
            if rule is None:
                continue
            if (rate_method, rate_kind) == (method, kind):
                return rule
            return RateRule(rule.lr, f"not measured for {method} on a {kind}: the rate of "
                                     f"{rate_method} on an {rate_kind} model ({rule.reason})")
    raise InvalidInputError(f"no default learning rate for method {method!r} on a {kind} model; "
                            "pass lr (a positive number)", parameter="lr")


def check_rate(lr: object, parameter: str = "lr") -> None:
    """Raises unless ``lr`` is :data:`AUTO_RATE` or a finite positive number."""
    if lr == AUTO_RATE:
        return
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not math.isfinite(lr) \
            or lr <= 0:
        raise InvalidInputError(f"{parameter} must be a positive number or 'auto' (the "
                                f"method's measured rate), got {lr!r}", parameter=parameter)

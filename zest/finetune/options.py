"""The options of each fine-tuning method: one frozen dataclass per method, validated once.

As in HF peft, where every method has its config dataclass (``LoraConfig(PeftConfig)``: fields
with ``metadata={"help": ...}``, checked in ``__post_init__``), a tuner's options are a
:class:`TunerOptions` subclass: the fields every method shares here, the method's own below
them. Building one validates every value (one line naming the parameter, :mod:`zest.errors`);
a :class:`~zest.finetune.base.Tuner` takes it as ``options=`` or builds it from its keyword
arguments (``GPS(model, task, layers, k=4)``). A field whose metadata has ``"cli"`` becomes a
``zest finetune`` option, generated from it (``help``, and ``flag`` where the flag is not the
field's name); a budget plan sets the first of ``density_options`` (ARCHITECTURE.md §3a, §6).
"""

from __future__ import annotations

import math
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any, ClassVar

from zest.errors import InvalidInputError
from zest.rates import AUTO_RATE, check_rate


def check_finite_options(options: dict[str, Any]) -> None:
    """Refuses a non-finite float option (``ratio=nan``, ``lr=inf``): NaN passes every range
    check, so each float option is checked here first."""
    for name, value in options.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidInputError(f"{name} must be a finite number, got {value!r}",
                                    parameter=name)


def positive_integer(name: str, value: Any) -> None:
    """Refuses ``value`` unless it is a positive integer (``bool`` is not one)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError(f"{name} must be a positive integer, got {value!r}",
                                parameter=name)


@dataclass(frozen=True)
class TunerOptions:
    """Options every method takes.

    Args:
        lr: AdamW learning rate, or ``"auto"``: the method's measured rate for the model's kind
            (:func:`zest.rates.default_rate`).
        weight_decay: AdamW weight decay.
        seed: Seed of batch order and selection.
        device: Where to train (default: where the model is).
        gradient_checkpointing: Recompute each block in the backward pass instead of keeping
            its activations (:func:`zest.finetune.memory.checkpointed_blocks`): less memory,
            about one more forward pass of compute.
    """

    lr: float | str = AUTO_RATE
    weight_decay: float = 0.0
    seed: int = 0
    device: Any = None
    gradient_checkpointing: bool = field(default=False, metadata={"cli": {
        "help": "Recompute each block in the backward pass instead of keeping its activations "
                "(less memory, about one more forward pass); any method."}})
    #: The options that set how densely a chosen layer trains (GPS ``k``, SPSFT ``ratio`` or
    #: ``r``, LoRA ``rank``); a budget plan sets the first one unless one of them is given.
    #: Empty for methods that train the chosen layers densely.
    density_options: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        check_rate(self.lr)
        check_finite_options({f.name: getattr(self, f.name) for f in fields(self)})
        if not isinstance(self.gradient_checkpointing, bool):
            raise InvalidInputError("gradient_checkpointing must be True or False, got "
                                    f"{self.gradient_checkpointing!r}",
                                    parameter="gradient_checkpointing")

    @classmethod
    def shared_names(cls) -> list[str]:
        """The options every method takes (this class's fields)."""
        return [f.name for f in fields(TunerOptions)]

    @classmethod
    def own_fields(cls) -> list[Field]:
        """The method's own options, beyond :meth:`shared_names`, in declaration order."""
        shared = set(cls.shared_names())
        return [f for f in fields(cls) if f.name not in shared]

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """The default values of the method's own options (``{"k": 1, ...}`` for GPS)."""
        return {f.name: f.default for f in cls.own_fields() if f.default is not MISSING}


@dataclass(frozen=True)
class DenseOptions(TunerOptions):
    """The options of the dense methods (``full``, ``head``, ``bitfit``, ``layers``): the
    shared ones only."""


@dataclass(frozen=True)
class GPSOptions(TunerOptions):
    """GPS (:class:`zest.finetune.GPS`).

    Args:
        k: Input connections kept per output neuron (top-K by |gradient|). With
            ``layers="all"``, neurons with fewer inputs (depthwise convolutions: 9 or 25) keep
            all of theirs; a layer named explicitly must have at least ``k``.
        selection_batches: Batches whose supervised-contrastive gradients are accumulated.
        implementation: ``sparse`` (values at fixed indices) or ``dense_mask`` (reference:
            dense gradient masked by a hook; only for comparison).
    """

    k: int = field(default=1, metadata={"cli": {
        "help": "GPS: input connections per neuron (default 1; with --param-budget: planned)."}})
    selection_batches: int = 8
    implementation: str = "sparse"
    density_options: ClassVar[tuple[str, ...]] = ("k",)

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_integer("k", self.k)
        if self.implementation not in ("sparse", "dense_mask"):
            raise InvalidInputError(f"unknown GPS implementation {self.implementation!r}; use "
                                    "'sparse' or 'dense_mask'", parameter="implementation")


#: SPSFT's neuron importances (spsft-paper §3.2, Appendix A).
IMPORTANCES = ("l2", "taylor", "qm_taylor")


@dataclass(frozen=True)
class SPSFTOptions(TunerOptions):
    """SPSFT (:class:`zest.finetune.SPSFT`).

    Args:
        ratio: Share of each chosen layer's output neurons to train (ignored when ``r`` is
            given).
        r: Number of output neurons per layer (overrides ``ratio``).
        importance: ``l2``, ``taylor`` (the paper's default) or ``qm_taylor``.
        selection_batches: Batches for the Taylor importances.
    """

    ratio: float | None = field(default=0.05, metadata={"cli": {
        "help": "SPSFT: share of neurons per layer (default 0.05; with --param-budget: "
                "planned)."}})
    r: int | None = field(default=None, metadata={"cli": {
        "help": "SPSFT: neurons per layer (overrides --ratio)."}})
    importance: str = field(default="taylor", metadata={"cli": {
        "help": "SPSFT: l2, taylor (default) or qm_taylor."}})
    selection_batches: int = 8
    density_options: ClassVar[tuple[str, ...]] = ("ratio", "r")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.importance not in IMPORTANCES:
            raise InvalidInputError(f"unknown importance {self.importance!r}; use one of "
                                    f"{', '.join(IMPORTANCES)}", parameter="importance")
        if self.r is None and (self.ratio is None or not 0 < self.ratio <= 1):
            raise InvalidInputError(f"ratio must be in (0, 1], got {self.ratio!r}",
                                    parameter="ratio")
        if self.r is not None:
            positive_integer("r", self.r)


@dataclass(frozen=True)
class LoRAOptions(TunerOptions):
    """LoRA (:class:`zest.finetune.LoRA`).

    Args:
        rank: LoRA rank ``r``.
        alpha: ``lora_alpha`` (scaling = alpha / rank).
        dropout: ``lora_dropout``.
    """

    rank: int = field(default=8, metadata={"cli": {
        "flag": "--lora-rank", "help": "LoRA rank (default 8; with --param-budget: planned)."}})
    alpha: int = 16
    dropout: float = 0.0
    density_options: ClassVar[tuple[str, ...]] = ("rank",)

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_integer("rank", self.rank)

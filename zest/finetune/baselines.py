"""Baselines with the tuner interface (ARCHITECTURE.md §3a): full, head, bitfit, layers (LoRA is in
:mod:`zest.finetune.lora`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from zest.errors import InvalidInputError
from zest.finetune.base import Tuner, register_tuner
from zest.finetune.delta import DeltaEntry
from zest.models import Batch


@register_tuner
@dataclass
class Full(Tuner):
    """Dense fine-tuning of every parameter."""

    method: str = field(default="full", init=False)
    uses_layers: bool = field(default=False, init=False)

    def _prepare(self, batches: list[Batch]) -> None:
        for p in self.model.parameters():
            p.requires_grad_(True)

    def _delta_entries(self) -> list[DeltaEntry]:
        """Every parameter, and the floating-point buffers (normalisation statistics)."""
        buffers = {n: b for n, b in self.model.named_buffers() if b.is_floating_point()}
        return self._dense_entries({**dict(self.model.named_parameters()), **buffers})


@register_tuner
@dataclass
class Head(Tuner):
    """Only the (fresh) classification head."""

    method: str = field(default="head", init=False)
    uses_layers: bool = field(default=False, init=False)

    def _check_layers(self) -> None:
        if not self.task.tunes_head:
            raise InvalidInputError("--method head trains a fresh classification head, and a "
                                    "causal-LM task keeps its pretrained LM head; use --method "
                                    "layers, gps, spsft or lora")

    def _prepare(self, batches: list[Batch]) -> None:
        self._freeze_all()
        for p in self._head_parameters():
            p.requires_grad_(True)

    def _delta_entries(self) -> list[DeltaEntry]:
        return self._head_entries()


@register_tuner
@dataclass
class BitFit(Tuner):
    """Every bias plus the head (Ben Zaken et al. 2022)."""

    method: str = field(default="bitfit", init=False)
    uses_layers: bool = field(default=False, init=False)

    def _prepare(self, batches: list[Batch]) -> None:
        self._freeze_all()
        for name, p in self.model.named_parameters():
            if name.endswith(".bias") or (self.task.tunes_head
                                          and name.startswith(self.task.head_name + ".")):
                p.requires_grad_(True)

    def _delta_entries(self) -> list[DeltaEntry]:
        trained = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        return self._dense_entries({**trained, **self._trained_norm_buffers()})


@register_tuner
@dataclass
class Layers(Tuner):
    """The chosen layers trained densely (weight and bias), plus the head."""

    method: str = field(default="layers", init=False)

    def _allows_any_module(self) -> bool:
        return True

    def _prepare(self, batches: list[Batch]) -> None:
        self._freeze_all()
        for name in self.layer_names:
            for p in self.model.get_submodule(name)._parameters.values():  # noqa: SLF001
                if p is not None:
                    p.requires_grad_(True)
        for p in self._head_parameters():
            p.requires_grad_(True)

    def _delta_entries(self) -> list[DeltaEntry]:
        trained = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        return self._dense_entries({**trained, **self._trained_norm_buffers()})

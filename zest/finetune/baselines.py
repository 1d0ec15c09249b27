"""Baselines with the tuner interface (ARCHITECTURE.md §3a): full, head, bitfit, layers (LoRA is in
:mod:`zest.finetune.lora`); their options are the shared ones, the tuners' default
``options_class`` (:class:`~zest.finetune.options.DenseOptions`)."""

from __future__ import annotations

from typing import ClassVar

from zest.errors import InvalidInputError
from zest.finetune.base import Tuner
from zest.finetune.delta import DeltaEntry
from zest.finetune.registry import register_tuner
from zest.models import Batch


@register_tuner
class Full(Tuner):
    """Dense fine-tuning of every parameter."""

    method: ClassVar[str] = "full"
    uses_layers: ClassVar[bool] = False

    def _prepare(self, batches: list[Batch]) -> None:
        for p in self.model.parameters():
            p.requires_grad_(True)

    def _delta_entries(self) -> list[DeltaEntry]:
        """Every parameter, and the floating-point buffers (normalisation statistics)."""
        buffers = {n: b for n, b in self.model.named_buffers() if b.is_floating_point()}
        return self._dense_entries({**dict(self.model.named_parameters()), **buffers})


@register_tuner
class Head(Tuner):
    """Only the (fresh) classification head."""

    method: ClassVar[str] = "head"
    uses_layers: ClassVar[bool] = False

    def _check_layers(self) -> None:
        if not self.task.tunes_head:
            raise InvalidInputError("method='head' trains a fresh classification head, and a "
                                    "causal-LM task keeps its pretrained LM head; train with "
                                    "'layers', 'gps', 'spsft' or 'lora' instead",
                                    parameter="method")

    def _prepare(self, batches: list[Batch]) -> None:
        self._freeze_all()
        for p in self._head_parameters():
            p.requires_grad_(True)

    def _delta_entries(self) -> list[DeltaEntry]:
        return self._head_entries()


@register_tuner
class BitFit(Tuner):
    """Every bias plus the head (Ben Zaken et al. 2022)."""

    method: ClassVar[str] = "bitfit"
    uses_layers: ClassVar[bool] = False

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
class Layers(Tuner):
    """The chosen layers trained densely (weight and bias), plus the head."""

    method: ClassVar[str] = "layers"

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

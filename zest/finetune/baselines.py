"""Baselines with the tuner interface (DESIGN §6): full, head, bitfit, layers, lora."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from zest.datasets import Dataset
from zest.errors import InvalidInputError
from zest.finetune.base import Tuner
from zest.finetune.delta import DeltaEntry


@dataclass
class Full(Tuner):
    """Dense fine-tuning of every parameter."""

    method: str = field(default="full", init=False)
    uses_layers: bool = field(default=False, init=False)

    def _prepare(self, data: Dataset, batch_size: int) -> None:
        for p in self.model.parameters():
            p.requires_grad_(True)

    def _delta_entries(self) -> list[DeltaEntry]:
        """Every parameter, and the floating-point buffers (normalisation statistics)."""
        buffers = {n: b for n, b in self.model.named_buffers() if b.is_floating_point()}
        return self._dense_entries({**dict(self.model.named_parameters()), **buffers})


@dataclass
class Head(Tuner):
    """Only the (fresh) classification head."""

    method: str = field(default="head", init=False)
    uses_layers: bool = field(default=False, init=False)

    def _prepare(self, data: Dataset, batch_size: int) -> None:
        self._freeze_all()
        for p in self._head_parameters():
            p.requires_grad_(True)

    def _delta_entries(self) -> list[DeltaEntry]:
        return self._head_entries()


@dataclass
class BitFit(Tuner):
    """Every bias plus the head (Ben Zaken et al. 2022)."""

    method: str = field(default="bitfit", init=False)
    uses_layers: bool = field(default=False, init=False)

    def _prepare(self, data: Dataset, batch_size: int) -> None:
        self._freeze_all()
        for name, p in self.model.named_parameters():
            if name.endswith(".bias") or name.startswith(self.task.head_name + "."):
                p.requires_grad_(True)

    def _delta_entries(self) -> list[DeltaEntry]:
        trained = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        return self._dense_entries({**trained, **self._trained_norm_buffers()})


@dataclass
class Layers(Tuner):
    """The chosen layers trained densely (weight and bias), plus the head."""

    method: str = field(default="layers", init=False)

    def _allows_any_module(self) -> bool:
        return True

    def _prepare(self, data: Dataset, batch_size: int) -> None:
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


@dataclass
class LoRA(Tuner):
    """LoRA (Hu et al. 2022) through HF peft on the chosen layers, plus the head.

    ``target_modules`` are the chosen modules' full names, so no other module whose name ends
    the same way is wrapped.

    Args:
        rank: LoRA rank ``r``.
        alpha: ``lora_alpha`` (scaling = alpha / rank).
        dropout: ``lora_dropout``.
    """

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    method: str = field(default="lora", init=False)

    def _check_layers(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise InvalidInputError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        for name in self.layer_names:
            module = self.model.get_submodule(name)
            if not isinstance(module, nn.Linear | nn.Conv2d | nn.Embedding):
                raise InvalidInputError(f"LoRA cannot wrap {name!r} ({type(module).__name__}); "
                                        "use --method spsft or layers for it")
            if isinstance(module, nn.Conv2d) and module.groups > 1:
                raise InvalidInputError(f"LoRA cannot wrap the grouped convolution {name!r} "
                                        f"(groups={module.groups}); use --method gps or "
                                        "spsft for it")

    def lora_config(self):
        """The ``peft.LoraConfig`` used."""
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(self.layer_names), bias="none")

    def _prepare(self, data: Dataset, batch_size: int) -> None:
        from peft import inject_adapter_in_model

        self._freeze_all()
        inject_adapter_in_model(self.lora_config(), self.model)
        for name, p in self.model.named_parameters():
            p.requires_grad_("lora_" in name)
        for p in self._head_parameters():
            p.requires_grad_(True)

    def _delta_entries(self) -> list[DeltaEntry]:
        entries = []
        for name in self.layer_names:
            module = self.model.get_submodule(name)
            base = module.base_layer
            embedding = isinstance(base, nn.Embedding)
            if embedding:
                a = module.lora_embedding_A["default"].detach()
                b = module.lora_embedding_B["default"].detach()
            else:
                a = module.lora_A["default"].weight.detach()
                b = module.lora_B["default"].weight.detach()
            entries.append(DeltaEntry(name=f"{name}.weight", kind="lora",
                                      tensors={"A": a.cpu(), "B": b.cpu()},
                                      shape=list(base.weight.shape),
                                      extra={"scaling": float(module.scaling["default"]),
                                             "embedding": embedding}))
        entries += self._head_entries()
        return entries

"""LoRA (Hu et al. 2022) through HF peft, and zest's one way of handing layers to peft.

:func:`lora_config` builds every ``peft.LoraConfig`` zest makes (``Ranking.to_lora_config`` and
the ``lora`` tuner alike); :func:`lora_can_wrap` says which layers it may name.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from torch import nn

from zest.errors import InvalidInputError
from zest.finetune.base import Tuner
from zest.finetune.delta import DeltaEntry
from zest.finetune.options import LoRAOptions
from zest.finetune.registry import LayerShape, method_aware_choice, register_tuner
from zest.layers import transforms_weight
from zest.models import Batch


def lora_can_wrap(module: nn.Module) -> bool:
    """Whether peft's LoRA can wrap ``module``: Linear, Embedding and ungrouped Conv2d (peft
    refuses grouped and depthwise convolutions, and has no LoRA for normalisation layers); not
    layers whose forward standardises the weight, where ``BA`` added to the output is not an
    update of the stored weight (:func:`zest.layers.transforms_weight`)."""
    if transforms_weight(module):
        return False
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 and _builds_like_conv2d(type(module))
    return isinstance(module, nn.Linear | nn.Embedding)


def _builds_like_conv2d(cls: type) -> bool:
    """Whether peft can build LoRA's factors from this Conv2d class: peft builds them with the
    layer's own class and ``nn.Conv2d``'s arguments (``padding_mode`` among them), which a
    subclass with another constructor refuses (timm's ``Conv2dSame`` in the ``tf_`` models, a
    ``TypeError`` from inside peft)."""
    return cls is nn.Conv2d or "padding_mode" in inspect.signature(cls.__init__).parameters


def lora_config(target_modules: Sequence[str], **lora_kwargs: Any):
    """A ``peft.LoraConfig`` on exactly ``target_modules``.

    Args:
        target_modules: Full module names (``named_modules()`` of the model); full names
            mean that no other module whose name merely ends the same way is wrapped.
        **lora_kwargs: Other ``LoraConfig`` arguments (``r``, ``lora_alpha``, ...).
    """
    from peft import LoraConfig

    names = list(target_modules)
    if not names:
        raise InvalidInputError("no layer to give LoRA; choose at least one layer")
    if "target_modules" in lora_kwargs:
        raise InvalidInputError("target_modules comes from the chosen layers; do not pass it")
    return LoraConfig(target_modules=names, **lora_kwargs)


@register_tuner
class LoRA(Tuner):
    """LoRA (Hu et al. 2022) through HF peft on the chosen layers, plus the head; its options
    (``rank``, ``alpha``, ``dropout``): :class:`LoRAOptions`.

    ``target_modules`` are the chosen modules' full names, so no other module whose name ends
    the same way is wrapped.
    """

    method: ClassVar[str] = "lora"
    options_class: ClassVar[type[LoRAOptions]] = LoRAOptions

    @classmethod
    def can_tune(cls, name: str, module: nn.Module) -> bool:
        """The layers peft's LoRA can wrap (:func:`lora_can_wrap`)."""
        return lora_can_wrap(module)

    @classmethod
    def density_values(cls, shapes: Sequence[LayerShape]) -> list[Any]:
        """Ranks from 1 to the largest full rank, ``min(rows, width)``, of the layers."""
        return list(range(1, max(min(shape.rows, shape.width) for shape in shapes) + 1))

    @classmethod
    def layer_trainable(cls, shape: LayerShape, options: Mapping[str, Any]
                        ) -> dict[str, int] | None:
        """``A`` (rank × width) and ``B`` (rows × rank); peft's Conv2d ``A`` is a convolution
        with the layer's kernel and ``B`` a 1×1 one, its Embedding ``A`` is rank × vocabulary,
        so the count is the same."""
        rank = options["rank"]
        return {"trainable": rank * (shape.rows + shape.width), "rank": rank}

    def _check_layers(self) -> None:
        for name in self.layer_names:
            module = self.model.get_submodule(name)
            if isinstance(module, nn.Conv2d) and module.groups > 1:
                raise InvalidInputError(f"LoRA cannot wrap the grouped convolution {name!r} "
                                        f"(groups={module.groups}); "
                                        f"{method_aware_choice('lora')}, or train it with the "
                                        "'gps' or 'spsft' method")
            if not lora_can_wrap(module):
                raise InvalidInputError(f"LoRA cannot wrap {name!r} ({type(module).__name__}); "
                                        f"{method_aware_choice('lora')}, or train it with the "
                                        "'spsft' or 'layers' method")

    def lora_config(self):
        """The ``peft.LoraConfig`` used (built by :func:`lora_config`)."""
        return lora_config(self.layer_names, r=self.rank, lora_alpha=self.alpha,
                           lora_dropout=self.dropout, bias="none")

    def _prepare(self, batches: list[Batch]) -> None:
        from peft import inject_adapter_in_model

        self._freeze_all()
        self._had_peft_config = "peft_config" in self.model.__dict__
        inject_adapter_in_model(self.lora_config(), self.model)
        for name, p in self.model.named_parameters():
            p.requires_grad_("lora_" in name)
        for p in self._head_parameters():
            p.requires_grad_(True)

    def _unwrap(self) -> None:
        """Puts each chosen layer's base layer back in place of peft's LoRA wrapper."""
        for name in self.layer_names:
            wrapper = self.model.get_submodule(name)
            base = getattr(wrapper, "base_layer", None)
            if base is None:
                continue
            parent_name, _, attribute = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, attribute, base)
        if not getattr(self, "_had_peft_config", True):
            self.model.__dict__.pop("peft_config", None)

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

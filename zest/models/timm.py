"""timm models: the ``timm:<arch>`` spec scheme and the task of a timm classifier."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from zest.architectures import architecture_for
from zest.errors import UnknownNameError
from zest.models.checkpoints import load_state_dict_file
from zest.models.heads import head_of
from zest.models.specs import ModelScheme, arch_name_family
from zest.models.task import Task


def timm_task(spec: str, model: nn.Module, num_classes: int,
              default_image_size: int = 64) -> Task:
    """The task of a timm classifier: its architecture's head and timm's normalisation."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", {}) or {}
    architecture = architecture_for(model, modality="image")
    return Task(spec=spec, modality="image", num_classes=num_classes,
                head_name=head_of(spec, model, architecture), architecture=architecture.name,
                mean=tuple(cfg.get("mean", (0.5, 0.5, 0.5))),
                std=tuple(cfg.get("std", (0.5, 0.5, 0.5))), default_image_size=default_image_size)


def build_timm(spec: str, arch: str, num_classes: int, *, checkpoint: Any = None,
               image_size: int | None = None, kind: str = "classification"
               ) -> tuple[nn.Module, Task]:
    """A timm architecture (random weights, or ``checkpoint``) with a fresh ``num_classes``
    head; ``kind`` is always classification (:func:`~zest.models.specs.check_task_kind`)."""
    import timm

    if arch not in timm.list_models():
        raise UnknownNameError(f"unknown timm architecture {arch!r}; see timm.list_models() "
                               "(e.g. timm:resnet18, timm:mobilenetv3_small_100)")
    kwargs: dict[str, Any] = {}
    probe = timm.models.get_pretrained_cfg(arch) if hasattr(timm.models, "get_pretrained_cfg") \
        else None
    fixed = bool(getattr(probe, "fixed_input_size", False)) if probe is not None else False
    if fixed or "vit" in arch or "deit" in arch:
        kwargs["img_size"] = image_size or 64
    model = timm.create_model(arch, pretrained=False, **kwargs)
    if checkpoint is not None:
        load_state_dict_file(model, Path(checkpoint))
    model.reset_classifier(num_classes)
    return model, timm_task(spec, model, num_classes,
                            default_image_size=kwargs.get("img_size", 64))


#: The ``timm:<arch>`` scheme (registered by :mod:`zest.models`).
TIMM = ModelScheme(prefix="timm", usage="timm:<arch>", build=build_timm,
                   family=arch_name_family, takes_checkpoint=True)

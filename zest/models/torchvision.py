"""torchvision models: the ``tv:<arch>`` spec scheme."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from zest.architectures import architecture_for
from zest.errors import UnknownNameError, unknown_name_message
from zest.models.checkpoints import load_state_dict_file
from zest.models.heads import head_of
from zest.models.specs import ModelScheme, arch_name_family
from zest.models.task import Task

#: torchvision's ImageNet normalisation.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_torchvision(spec: str, arch: str, num_classes: int, *, checkpoint: Any = None,
                      image_size: int | None = None, kind: str = "classification"
                      ) -> tuple[nn.Module, Task]:
    """A torchvision classification model (random weights, or ``checkpoint``: the state dict
    of that architecture, ImageNet head included or not), with a fresh ``num_classes`` head:
    the last Linear layer, wherever the architecture keeps it (``fc``, ``classifier.1``,
    ``heads.head``, ...). ``image_size`` is not used (ViTs are built for 64 pixels)."""
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if arch not in known:
        raise UnknownNameError(unknown_name_message("torchvision classification model", arch,
                                                    known))
    kwargs = {"image_size": 64} if arch.startswith("vit_") else {}
    model = torchvision.models.get_model(arch, weights=None, **kwargs)
    architecture = architecture_for(model, modality="image")
    head_name = head_of(spec, model, architecture)
    if checkpoint is not None:
        load_state_dict_file(model, Path(checkpoint), head=head_name.rsplit(".", 1)[0] or None)
    old = model.get_submodule(head_name)
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    parent, _, leaf = head_name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)
    return model, Task(spec=spec, modality="image", num_classes=num_classes, head_name=head_name,
                       architecture=architecture.name, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                       default_image_size=64)


#: The ``tv:<arch>`` scheme (registered by :mod:`zest.models`).
TORCHVISION = ModelScheme(prefix="tv", usage="tv:<arch>", build=build_torchvision,
                          family=arch_name_family, takes_checkpoint=True)

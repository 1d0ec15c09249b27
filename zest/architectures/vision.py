"""The vision architectures (ARCHITECTURE.md §6): timm EfficientNet/MobileNet-style CNNs, timm
ResNets, timm ViTs and torchvision's classifiers. Their stage plans are in
:mod:`zest.stages.vision`."""

from __future__ import annotations

from zest.architectures.base import (
    Architecture,
    ModuleType,
    has_attributes,
    last_linear_head,
    timm_head,
)
from zest.stages.vision import (
    timm_efficientnet_plan,
    timm_resnet_plan,
    timm_vit_plan,
    torchvision_plan,
)

TIMM_EFFICIENTNET = Architecture(
    name="timm_efficientnet", modality="image",
    recognise=lambda m: has_attributes(m, "conv_stem", "bn1", "blocks", "conv_head", "bn2"),
    head=timm_head, stage_plan=timm_efficientnet_plan,
    model_families=("efficientnet", "mobilenetv2", "mnasnet", "tinynet"),
    module_types={"Conv2dSame": ModuleType("conv", conv_forward="dynamic_same")},
    description="timm EfficientNet/MobileNetV2-style CNNs (conv_stem, blocks.i.j, conv_head)")

TIMM_RESNET = Architecture(
    name="timm_resnet", modality="image",
    recognise=lambda m: has_attributes(m, "conv1", "bn1", "act1", "maxpool", "layer1", "layer4"),
    head=timm_head, stage_plan=timm_resnet_plan, model_families=("resnet",),
    description="timm ResNets (conv1 stem, layer1-4 of blocks)")

TIMM_VIT = Architecture(
    name="timm_vit", modality="image",
    recognise=lambda m: has_attributes(m, "patch_embed", "_pos_embed", "blocks", "norm"),
    head=timm_head, stage_plan=timm_vit_plan, model_families=("vit", "deit"),
    frozen_name_parts=("pos_embed", "norm"),
    description="timm Vision Transformers (patch_embed, blocks.i, norm)")

TORCHVISION = Architecture(
    name="torchvision", modality="image",
    recognise=lambda m: type(m).__module__.startswith("torchvision.models."),
    head=last_linear_head, stage_plan=torchvision_plan,
    model_families=("resnet", "mobilenetv2", "mobilenetv3", "efficientnet", "vit"),
    description="torchvision classifiers (head: the last Linear; a prefix cache for "
                "features/classifier CNNs and ResNets)")

#: The entries of this module, in recognition order (registered by :mod:`zest.architectures`).
ENTRIES = (TIMM_EFFICIENTNET, TIMM_RESNET, TIMM_VIT, TORCHVISION)

"""The stage plans of the vision architectures (ARCHITECTURE.md §5): timm
EfficientNet/MobileNet-style CNNs, timm ResNets, timm ViTs and torchvision's CNNs, cut at every
block. Their entries are in :mod:`zest.architectures.vision`."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from zest.architectures.base import has_attributes
from zest.stages.plan import StageFunction, StagePlan, State, image_state

if TYPE_CHECKING:
    from zest.models.task import Task


def timm_efficientnet_plan(model: nn.Module, task: Task) -> StagePlan:
    names = ["conv_stem"]
    functions: list[StageFunction] = [lambda s: {"x": model.bn1(model.conv_stem(s["x"]))}]
    for i, stage in enumerate(model.blocks):
        for j, block in enumerate(stage):
            names.append(f"blocks.{i}.{j}")
            functions.append(lambda s, b=block: {"x": b(s["x"])})
    names.append("conv_head")
    functions.append(lambda s: {"x": model.bn2(model.conv_head(s["x"]))})
    return StagePlan(names, functions, image_state,
                     lambda s: model.forward_head(s["x"], pre_logits=True))


def _resnet_plan(model: nn.Module, activation: nn.Module,
                 features: Callable[[State], torch.Tensor]) -> StagePlan:
    """A ResNet's stages, timm's and torchvision's alike: the stem (``conv1``, ``bn1``, the
    activation, ``maxpool``), then every block of ``layer1``-``layer4``."""
    names = ["conv1"]
    functions: list[StageFunction] = [
        lambda s: {"x": model.maxpool(activation(model.bn1(model.conv1(s["x"]))))}]
    for k in range(1, 5):
        for j, block in enumerate(getattr(model, f"layer{k}")):
            names.append(f"layer{k}.{j}")
            functions.append(lambda s, b=block: {"x": b(s["x"])})
    return StagePlan(names, functions, image_state, features)


def timm_resnet_plan(model: nn.Module, task: Task) -> StagePlan:
    return _resnet_plan(model, model.act1,
                        lambda s: model.forward_head(s["x"], pre_logits=True))


def timm_vit_plan(model: nn.Module, task: Task) -> StagePlan:
    """timm ViTs: ``patch_embed`` (with the position embedding), ``blocks.i``, and, for a ViT
    that pools by attention, ``attn_pool`` (its own weights: a stage of its own)."""
    def embed(s: State) -> State:
        x = model.patch_embed(s["x"])
        x = model._pos_embed(x)  # noqa: SLF001 - timm's own stage
        x = model.patch_drop(x)
        return {"x": model.norm_pre(x)}

    names = ["patch_embed"]
    functions: list[StageFunction] = [embed]
    for i, block in enumerate(model.blocks):
        names.append(f"blocks.{i}")
        functions.append(lambda s, b=block: {"x": b(s["x"])})
    if getattr(model, "attn_pool", None) is None:
        return StagePlan(names, functions, image_state,
                         lambda s: model.forward_head(model.norm(s["x"]), pre_logits=True))
    names.append("attn_pool")
    functions.append(lambda s: {"x": model.pool(model.norm(s["x"]))})
    return StagePlan(names, functions, image_state,
                     lambda s: model.head_drop(model.fc_norm(s["x"])))


def _global_pool(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """torchvision's global average pool and flatten (``model.avgpool`` where the model has
    one; MobileNetV2 pools functionally)."""
    pool = getattr(model, "avgpool", None)
    if pool is None:
        return lambda x: torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
    return lambda x: torch.flatten(pool(x), 1)


def torchvision_plan(model: nn.Module, task: Task) -> StagePlan | None:
    """torchvision's CNNs of two layouts, cut at every block:

    - ``features`` (a Sequential of blocks), a global average pool and a ``classifier``
      Sequential that ends in the head (MobileNetV2/V3, EfficientNet V1/V2): stages
      ``features.i``, then each classifier layer before the head (the first one pooling), so
      that MobileNetV3's hidden Linear is a stage of its own;
    - ResNets (``conv1`` stem, ``layer1-4``, ``avgpool``, ``fc``).

    VGG fits the first layout too (its ``avgpool`` pools to 7×7, its classifier's Linears are
    stages). Others (DenseNet's final ReLU, MNASNet's ``layers``, ConvNeXt, ViT) have none; any
    plan is checked against the model's own forward before use."""
    if has_attributes(model, "conv1", "bn1", "relu", "maxpool", "layer1", "layer4", "avgpool",
                      "fc"):
        pool = _global_pool(model)
        return _resnet_plan(model, model.relu, lambda s: pool(s["x"]))
    features, classifier = getattr(model, "features", None), getattr(model, "classifier", None)
    if not (isinstance(features, nn.Sequential) and isinstance(classifier, nn.Sequential)):
        return None
    children = [(f"classifier.{name}", module) for name, module in classifier.named_children()]
    if not children or children[-1][0] != task.head_name:
        return None
    names = [f"features.{i}" for i in range(len(features))]
    functions = [lambda s, b=block: {"x": b(s["x"])} for block in features]
    pool = _global_pool(model)
    before = children[:-1]
    if not before:
        return StagePlan(names, functions, image_state, lambda s: pool(s["x"]))
    for i, (name, module) in enumerate(before):
        names.append(name)
        functions.append((lambda s, m=module: {"x": m(pool(s["x"]))}) if i == 0 else
                         (lambda s, m=module: {"x": m(s["x"])}))
    return StagePlan(names, functions, image_state, lambda s: s["x"])

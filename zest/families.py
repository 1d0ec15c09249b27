"""Architecture families: one registry of adapters (ARCHITECTURE.md §6, "A family").

What zest knows about a kind of architecture is one :class:`Family` entry in :data:`FAMILIES`,
the way peft keeps a table per model type and timm a ``group_matcher`` per model: how to
recognise it (by its modules and attributes, never by a model's name), where its head is, how
the head's input is pooled, its stage plan for the ground-truth prefix cache (verified against
the model's own forward by :func:`zest.stages.stage_plan` before any use), which layers GPS
keeps frozen, and the facts of the module types it brings (:class:`ModuleType`: the layer kind
the predictor sees, the weight dimension of the output neurons, a forward that transforms the
weight, timm's dynamic "same" padding). Module types are facts about a class wherever it
appears, so every entry's types form one table (:func:`module_types`). Candidate layers group
into blocks by one rule for every family (:func:`zest.layers.block_of`: the item of the
innermost indexed container, as timm's ``group_matcher`` groups ``blocks.i.j``); a stage plan
cuts the forward at those blocks.

A model that no entry recognises gets :data:`GENERIC`, which works without guessing:
candidates are the modules with their own weights that the forward pass calls (the probe
leaves the others out with a reason), the head is where its library keeps it, pooling follows
the head (traced: causal decoders read the last non-padding token), and there is no prefix
cache. :func:`zest.models.load_model` says once per model family that it fell back
(:class:`FamilyFallbackWarning`).

Two notions of "family", related here once:

- the *adapter*: ``Task.family`` is the name of the entry that adapts a loaded model
  (``timm_efficientnet``, ``bert``, ``llama``, ``generic``, ...); code asks it what to do.
- the *model family* of a spec, :func:`zest.models.model_family` (``efficientnet``,
  ``mobilenetv2``, ``bert``, ``llama``, ...), read from the spec string alone because records
  hold only specs; leave-one-family-out evaluation and the unseen-family note use it. Each
  entry lists the model families it adapts (``Family.model_families``).
"""

from __future__ import annotations

import inspect
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from zest._registry import Registry

if TYPE_CHECKING:
    from zest.models import Task

#: The coarse kinds of layer the predictor's context features tell apart.
LAYER_KINDS = ("conv", "linear", "embedding", "other")
#: How a convolution's forward uses its weight: ``plain`` is ``conv2d`` with the module's own
#: padding; ``dynamic_same`` pads each input to "same" first (timm's ``pad_same``), then runs
#: ``conv2d`` without padding.
ConvForward = Literal["plain", "dynamic_same"]
Pooling = Literal["first", "last"]
#: Where the transformers sequence classifiers keep their classification head.
HF_HEAD_NAMES = ("score", "classifier", "classification_head")


@dataclass(frozen=True)
class ModuleType:
    """What zest needs to know about a module class.

    Attributes:
        kind: One of :data:`LAYER_KINDS`, a context feature of the predictor.
        output_dim: The weight dimension that indexes output neurons (1 for GPT-2's
            ``Conv1D``, a Linear with a transposed ``(in, out)`` weight).
        transforms_weight: The forward transforms the weight before using it (weight
            standardisation), so an update added to the output (SPSFT's rows, LoRA) is not an
            update of the stored weight: those methods leave the layer alone.
        conv_forward: For a convolution whose forward is exactly ``conv2d`` (the probe then
            computes its gradients directly): ``plain`` or ``dynamic_same`` padding.
    """

    kind: str
    output_dim: int = 0
    transforms_weight: bool = False
    conv_forward: ConvForward | None = None


# -- stage plans -------------------------------------------------------------------------------

State = dict[str, torch.Tensor]
StageFunction = Callable[[State], State]


@dataclass
class StagePlan:
    """A forward pass cut into consecutive stages; ``names[i]`` is the block run by stage i.

    ``state = plan.start(inputs)``, ``state = plan.run(state, i, j)``,
    ``features = plan.features(state)`` (the head input). States are dicts of tensors whose
    first dimension is the example, so they can be cached, sliced and concatenated
    (:mod:`zest.stages`)."""

    names: list[str]
    functions: list[StageFunction]
    start: Callable[[Any], State]
    features: Callable[[State], torch.Tensor]

    def stage_of(self, layer_name: str) -> int | None:
        """The stage that runs the layer ``layer_name``: the one whose name is the layer's name
        or a dotted prefix of it (``None`` if no stage does)."""
        for i, name in enumerate(self.names):
            if layer_name == name or layer_name.startswith(name + "."):
                return i
        return None

    def run(self, state: State, first: int, stop: int | None = None) -> State:
        """Runs stages ``first .. stop-1`` (to the end when ``stop`` is None)."""
        for function in self.functions[first:stop]:
            state = function(state)
        return state


PlanBuilder = Callable[[nn.Module, "Task"], StagePlan | None]


@dataclass(frozen=True)
class Family:
    """One architecture family: everything zest knows about it.

    Attributes:
        name: The registry name; ``Task.family`` of the models it adapts.
        modality: ``image`` or ``text`` (``None``: any).
        recognise: Whether a built model is of this family, from its modules and attributes.
        head: ``(model, task kind) -> name`` of its head module (``None``: it has none).
        pooling: Which token a text head reads (``first``, ``last``); checked against a traced
            forward when the model is loaded, and a model that pools otherwise falls back to
            :data:`GENERIC`. ``None``: whatever the trace says (images: the head input pooled
            by its shape).
        plan: ``(model, task) -> StagePlan`` cut at its blocks, for the ground-truth prefix
            cache; ``None``: no cache.
        kinds: The task kinds it adapts (``classification``, ``causal_lm``).
        model_families: The :func:`zest.models.model_family` values of the models it adapts.
        frozen_name_parts: Name parts of the layers GPS keeps frozen (normalisation layers,
            position embeddings).
        module_types: Facts of the module classes it brings, by class name.
        description: One line for listings and errors.
    """

    name: str
    modality: str | None
    recognise: Callable[[nn.Module], bool]
    head: Callable[[nn.Module, str], str | None]
    pooling: Pooling | None = None
    plan: PlanBuilder | None = None
    kinds: tuple[str, ...] = ("classification",)
    model_families: tuple[str, ...] = ()
    frozen_name_parts: tuple[str, ...] = ()
    module_types: Mapping[str, ModuleType] = field(default_factory=dict)
    description: str = ""


FAMILIES: Registry[Family] = Registry("architecture family")
_module_type_table: dict[str, ModuleType] | None = None
_fallbacks_noted: set[str] = set()


class FamilyFallbackWarning(UserWarning):
    """A model was loaded with the generic adapter: no registered family recognised it."""


def register_family(family: Family) -> Family:
    """Adds ``family`` to :data:`FAMILIES`; recognition tries it after the families registered
    before it (and always before :data:`GENERIC`). A module type it declares must agree with
    every other declaration of that class name.

    Raises:
        ValueError: a bad pooling, kind or layer kind, or a module type declared otherwise.
    """
    global _module_type_table
    if family.pooling not in (None, "first", "last"):
        raise ValueError(f"family {family.name!r}: pooling must be 'first', 'last' or None")
    if family.modality not in (None, "image", "text"):
        raise ValueError(f"family {family.name!r}: modality must be 'image', 'text' or None")
    known = module_types()
    for type_name, facts in family.module_types.items():
        if facts.kind not in LAYER_KINDS:
            raise ValueError(f"family {family.name!r}: {type_name} kind {facts.kind!r} is not "
                             f"one of {LAYER_KINDS}")
        if type_name in known and known[type_name] != facts:
            raise ValueError(f"family {family.name!r} declares {type_name} as {facts}, but it "
                             f"is already {known[type_name]}")
    FAMILIES.register(family.name)(family)
    _module_type_table = None
    return family


def unregister_family(name: str) -> None:
    """Removes a registered family (a plugin's, or a test's); the built-in ones stay."""
    global _module_type_table
    if name in BUILT_IN_FAMILIES:
        raise ValueError(f"{name!r} is a built-in family and cannot be removed")
    FAMILIES.unregister(name)
    _module_type_table = None


def family_named(name: str) -> Family:
    """The entry ``Task.family`` names; :data:`GENERIC` for a name no entry has (a task built
    by hand)."""
    return FAMILIES.get(name) if name in FAMILIES else GENERIC


def family_for(model: nn.Module, *, modality: str, kind: str = "classification",
               pooling: Pooling | None = None) -> Family:
    """The first registered family (in registration order) that adapts ``model``: of its
    modality and task kind, recognising it, and, when the traced ``pooling`` is given, pooling
    that way; :data:`GENERIC` when none does."""
    for name in FAMILIES:
        family = FAMILIES.get(name)
        if family is GENERIC or family.modality not in (None, modality) or \
                kind not in family.kinds:
            continue
        if pooling is not None and family.pooling not in (None, pooling):
            continue
        if family.recognise(model):
            return family
    return GENERIC


def note_fallback(spec: str, model_family: str, model: nn.Module) -> None:
    """Warns, once per model family and process, that ``spec`` runs on the generic adapter."""
    if model_family in _fallbacks_noted:
        return
    _fallbacks_noted.add(model_family)
    warnings.warn(f"no architecture family of zest recognises {model_family} ({spec}, "
                  f"{type(model).__name__}); it runs on the generic adapter: every module with "
                  "its own weight that the forward calls is a candidate, pooling follows the "
                  "head, and ground truth runs without the prefix cache (register a family: "
                  "ARCHITECTURE.md §6)", FamilyFallbackWarning, stacklevel=3)


# -- module types --------------------------------------------------------------------------------

def module_types() -> dict[str, ModuleType]:
    """Every declared module type, by class name: the union of the families' tables."""
    global _module_type_table
    if _module_type_table is None:
        table: dict[str, ModuleType] = {}
        for name in FAMILIES:
            table.update(FAMILIES.get(name).module_types)
        _module_type_table = table
    return _module_type_table


def module_type(module: nn.Module) -> ModuleType | None:
    """The facts of the module's class, or of the nearest declared class it derives from
    (a parametrized module subclasses its original class)."""
    table = module_types()
    for cls in type(module).__mro__:
        if cls.__name__ in table:
            return table[cls.__name__]
    return None


def conv_forward(module: nn.Module) -> ConvForward | None:
    """How the module's own class runs ``conv2d`` (:attr:`ModuleType.conv_forward`); ``None``
    for every other class, subclasses included (their forward may do more)."""
    facts = module_types().get(type(module).__name__)
    return facts.conv_forward if facts is not None else None


def layer_kind(type_name: str) -> str:
    """The kind (:data:`LAYER_KINDS`) of a module class name, as records store it: the declared
    kind; for a class no family declares, the kind its name says (``...Linear`` → linear,
    ``...Conv...`` → conv, ``...Embedding...`` → embedding), else ``other``."""
    facts = module_types().get(type_name)
    if facts is not None:
        return facts.kind
    name = type_name.lower()
    if "linear" in name:
        return "linear"
    if "conv" in name:
        return "conv"
    if "embedding" in name:
        return "embedding"
    return "other"


def gps_keeps_frozen(name: str) -> bool:
    """Whether GPS keeps the layer ``name`` frozen: its name holds a part some family declares
    frozen (``Family.frozen_name_parts``; a tuner sees the layer name, not the model)."""
    return any(part in name for family in map(FAMILIES.get, FAMILIES)
               for part in family.frozen_name_parts)


# -- heads ---------------------------------------------------------------------------------------

def timm_head(model: nn.Module, kind: str = "classification") -> str | None:
    """The classifier a timm model's ``pretrained_cfg`` names (``classifier`` by default)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", {}) or {}
    head = cfg.get("classifier", "classifier")
    return head[0] if isinstance(head, tuple | list) else head


def last_linear_head(model: nn.Module, kind: str = "classification") -> str | None:
    """The last Linear module (torchvision keeps its classifier there: ``fc``,
    ``classifier.1``, ``heads.head``, ...)."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    return names[-1] if names else None


def transformers_head(model: nn.Module, kind: str = "classification") -> str | None:
    """A transformers model's head: the first of :data:`HF_HEAD_NAMES` it has, or, for the
    causal-LM task, its output embeddings, named by identity (a head tied to the input
    embeddings is still named once, as the head)."""
    if kind == "causal_lm":
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        return next((name for name, module in model.named_modules() if module is head),
                    None) if head is not None else None
    return next((name for name in HF_HEAD_NAMES if hasattr(model, name)), None)


def library_head(model: nn.Module, kind: str = "classification") -> str | None:
    """The head where the model's library keeps it: timm's ``pretrained_cfg``, transformers'
    head names, else the last Linear module."""
    if getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None):
        return timm_head(model, kind)
    if hasattr(model, "config") and hasattr(model, "base_model_prefix"):
        return transformers_head(model, kind)
    return last_linear_head(model, kind)


# -- recognition helpers -------------------------------------------------------------------------

def _has(obj: Any, *names: str) -> bool:
    return obj is not None and all(hasattr(obj, name) for name in names)


def _transformers_base(model: nn.Module) -> Any:
    prefix = getattr(model, "base_model_prefix", "")
    return getattr(model, prefix, None) if prefix else None


def _image_state(x: torch.Tensor) -> State:
    return {"x": x}


# -- timm EfficientNet / MobileNet-style CNNs ----------------------------------------------------

def _timm_efficientnet_plan(model: nn.Module, task: Task) -> StagePlan:
    names = ["conv_stem"]
    functions: list[StageFunction] = [lambda s: {"x": model.bn1(model.conv_stem(s["x"]))}]
    for i, stage in enumerate(model.blocks):
        for j, block in enumerate(stage):
            names.append(f"blocks.{i}.{j}")
            functions.append(lambda s, b=block: {"x": b(s["x"])})
    names.append("conv_head")
    functions.append(lambda s: {"x": model.bn2(model.conv_head(s["x"]))})
    return StagePlan(names, functions, _image_state,
                     lambda s: model.forward_head(s["x"], pre_logits=True))


TIMM_EFFICIENTNET = register_family(Family(
    name="timm_efficientnet", modality="image",
    recognise=lambda m: _has(m, "conv_stem", "bn1", "blocks", "conv_head", "bn2"),
    head=timm_head, plan=_timm_efficientnet_plan,
    model_families=("efficientnet", "mobilenetv2", "mnasnet", "tinynet"),
    module_types={"Conv2dSame": ModuleType("conv", conv_forward="dynamic_same")},
    description="timm EfficientNet/MobileNetV2-style CNNs (conv_stem, blocks.i.j, conv_head)"))


# -- timm ResNets --------------------------------------------------------------------------------

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
    return StagePlan(names, functions, _image_state, features)


def _timm_resnet_plan(model: nn.Module, task: Task) -> StagePlan:
    return _resnet_plan(model, model.act1,
                        lambda s: model.forward_head(s["x"], pre_logits=True))


TIMM_RESNET = register_family(Family(
    name="timm_resnet", modality="image",
    recognise=lambda m: _has(m, "conv1", "bn1", "act1", "maxpool", "layer1", "layer4"),
    head=timm_head, plan=_timm_resnet_plan, model_families=("resnet",),
    description="timm ResNets (conv1 stem, layer1-4 of blocks)"))


# -- timm ViTs -----------------------------------------------------------------------------------

def _timm_vit_plan(model: nn.Module, task: Task) -> StagePlan:
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
        return StagePlan(names, functions, _image_state,
                         lambda s: model.forward_head(model.norm(s["x"]), pre_logits=True))
    names.append("attn_pool")
    functions.append(lambda s: {"x": model.pool(model.norm(s["x"]))})
    return StagePlan(names, functions, _image_state,
                     lambda s: model.head_drop(model.fc_norm(s["x"])))


TIMM_VIT = register_family(Family(
    name="timm_vit", modality="image",
    recognise=lambda m: _has(m, "patch_embed", "_pos_embed", "blocks", "norm"),
    head=timm_head, plan=_timm_vit_plan, model_families=("vit", "deit"),
    frozen_name_parts=("pos_embed", "norm"),
    description="timm Vision Transformers (patch_embed, blocks.i, norm)"))


# -- torchvision ---------------------------------------------------------------------------------

def _global_pool(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """torchvision's global average pool and flatten (``model.avgpool`` where the model has
    one; MobileNetV2 pools functionally)."""
    pool = getattr(model, "avgpool", None)
    if pool is None:
        return lambda x: torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
    return lambda x: torch.flatten(pool(x), 1)


def _torchvision_plan(model: nn.Module, task: Task) -> StagePlan | None:
    """torchvision's CNNs of two layouts, cut at every block:

    - ``features`` (a Sequential of blocks), a global average pool and a ``classifier``
      Sequential that ends in the head (MobileNetV2/V3, EfficientNet V1/V2): stages
      ``features.i``, then each classifier layer before the head (the first one pooling), so
      that MobileNetV3's hidden Linear is a stage of its own;
    - ResNets (``conv1`` stem, ``layer1-4``, ``avgpool``, ``fc``).

    VGG fits the first layout too (its ``avgpool`` pools to 7×7, its classifier's Linears are
    stages). Others (DenseNet's final ReLU, MNASNet's ``layers``, ConvNeXt, ViT) have none; any
    plan is checked against the model's own forward before use."""
    if _has(model, "conv1", "bn1", "relu", "maxpool", "layer1", "layer4", "avgpool", "fc"):
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
        return StagePlan(names, functions, _image_state, lambda s: pool(s["x"]))
    for i, (name, module) in enumerate(before):
        names.append(name)
        functions.append((lambda s, m=module: {"x": m(pool(s["x"]))}) if i == 0 else
                         (lambda s, m=module: {"x": m(s["x"])}))
    return StagePlan(names, functions, _image_state, lambda s: s["x"])


TORCHVISION = register_family(Family(
    name="torchvision", modality="image",
    recognise=lambda m: type(m).__module__.startswith("torchvision.models."),
    head=last_linear_head, plan=_torchvision_plan,
    model_families=("resnet", "mobilenetv2", "mobilenetv3", "efficientnet", "vit"),
    description="torchvision classifiers (head: the last Linear; a prefix cache for "
                "features/classifier CNNs and ResNets)"))


# -- transformers text models: what their stage plans share ------------------------------------

def _at(model: nn.Module, path: str) -> Any:
    """The attribute at a dotted ``path`` of ``model`` (``None`` where a part is missing)."""
    obj: Any = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
    return obj


def _library_function(module: nn.Module, name: str) -> Callable[..., Any]:
    """A function as the transformers file that defines ``module``'s class imports it (its own
    ``create_causal_mask``, ``create_bidirectional_mask``)."""
    return getattr(sys.modules[type(module).__module__], name)


def _text_start(inputs: Any) -> State:
    return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}


def _hidden_stage(compute: Callable[[State], torch.Tensor]) -> StageFunction:
    """A stage that replaces the state's hidden sequence and carries its attention mask on."""
    return lambda s: {"hidden": compute(s), "attention_mask": s["attention_mask"]}


def _hidden(out: Any) -> torch.Tensor:
    """A layer's hidden sequence (some layers return a tuple that starts with it)."""
    return out[0] if isinstance(out, tuple) else out


def _last_token(s: State) -> torch.Tensor:
    """The hidden state of each text's last non-padding token (texts are right-padded)."""
    hidden = s["hidden"]
    last = s["attention_mask"].long().sum(dim=1).clamp(min=1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def _bidirectional_mask(base: nn.Module) -> Callable[[State], Any]:
    """The attention mask an encoder's layers get, built from the state's padding mask by the
    model file's own ``create_bidirectional_mask``, as its forward does."""
    create = _library_function(base, "create_bidirectional_mask")
    return lambda s: create(config=base.config, inputs_embeds=s["hidden"],
                            attention_mask=s["attention_mask"])


def _encoder_plan(names: list[str], functions: list[StageFunction], model: nn.Module,
                  pooler: tuple[str, Callable[[torch.Tensor], torch.Tensor]] | None
                  ) -> StagePlan:
    """An encoder's plan from its stages up to its last layer. A head that reads a pooled
    vector gets one more stage, named after the pooling layer, and sees ``model.dropout`` of its
    output (as the ``*ForSequenceClassification`` do); a head that pools the sequence itself
    (``pooler`` None) sees the hidden sequence."""
    if pooler is None:
        return StagePlan(names, functions, _text_start, lambda s: s["hidden"])
    name, pool = pooler
    dropout = getattr(model, "dropout", nn.Identity())
    return StagePlan(names + [name], functions + [lambda s: {"pooled": pool(s["hidden"])}],
                     _text_start, lambda s: dropout(s["pooled"]))


# -- BERT-style encoders -------------------------------------------------------------------------

def _bert_plan(model: nn.Module, task: Task) -> StagePlan:
    """BERT-style encoders (BERT, RoBERTa, XLM-R, ELECTRA: ``<base>.embeddings``, ELECTRA's
    ``embeddings_project``, ``<base>.encoder.layer`` and the base model's own attention-mask
    builder), cut at every encoder layer. Heads that read the pooler (BERT) get
    ``dropout(pooler(h))``; heads that pool themselves (RoBERTa's, ELECTRA's) get the hidden
    sequence."""
    prefix = model.base_model_prefix
    base = getattr(model, prefix)

    # the model's own mask builder; its cache argument was renamed across transformers
    # releases (past_key_values -> cache), so every argument but these two is passed as None
    build_masks = base._create_attention_masks  # noqa: SLF001
    unused = {name: None for name in inspect.signature(build_masks).parameters
              if name not in ("attention_mask", "embedding_output")}

    def mask4d(s: State) -> Any:
        return build_masks(attention_mask=s["attention_mask"], embedding_output=s["hidden"],
                           **unused)[0]

    names = [f"{prefix}.embeddings"]
    functions = [_hidden_stage(lambda s: base.embeddings(input_ids=s["input_ids"]))]
    project = getattr(base, "embeddings_project", None)  # ELECTRA: embedding size -> hidden
    if project is not None:
        names.append(f"{prefix}.embeddings_project")
        functions.append(_hidden_stage(lambda s: project(s["hidden"])))
    for i, layer in enumerate(base.encoder.layer):
        names.append(f"{prefix}.encoder.layer.{i}")
        functions.append(_hidden_stage(
            lambda s, layer=layer: _hidden(layer(s["hidden"], mask4d(s)))))
    pooler = getattr(base, "pooler", None)
    return _encoder_plan(names, functions, model,
                         (f"{prefix}.pooler", pooler) if pooler is not None else None)


BERT = register_family(Family(
    name="bert", modality="text",
    recognise=lambda m: _has(_transformers_base(m), "embeddings", "encoder",
                             "_create_attention_masks"),
    head=transformers_head, pooling="first", plan=_bert_plan,
    model_families=("bert", "roberta", "xlm-roberta", "electra"),
    frozen_name_parts=("position_embeddings",),
    description="BERT-style encoders (BERT, RoBERTa, XLM-R, ELECTRA: embeddings, "
                "encoder.layer.i)"))


# -- DistilBERT ----------------------------------------------------------------------------------

def _distilbert_plan(model: nn.Module, task: Task) -> StagePlan | None:
    """DistilBERT: ``<base>.embeddings``, ``<base>.transformer.layer.i``, then the classifier's
    own pooling, ``relu(pre_classifier(h[:, 0]))`` (its stage is ``pre_classifier``)."""
    pre_classifier = getattr(model, "pre_classifier", None)
    if pre_classifier is None:
        return None
    prefix = model.base_model_prefix
    base = getattr(model, prefix)
    mask = _bidirectional_mask(base)
    names = [f"{prefix}.embeddings"]
    functions = [_hidden_stage(lambda s: base.embeddings(s["input_ids"]))]
    for i, layer in enumerate(base.transformer.layer):
        names.append(f"{prefix}.transformer.layer.{i}")
        functions.append(_hidden_stage(
            lambda s, layer=layer: _hidden(layer(s["hidden"], mask(s)))))
    return _encoder_plan(names, functions, model,
                         ("pre_classifier", lambda h: torch.relu(pre_classifier(h[:, 0]))))


DISTILBERT = register_family(Family(
    name="distilbert", modality="text",
    recognise=lambda m: _has(_at(_transformers_base(m), "transformer"), "layer") and
    _has(_transformers_base(m), "embeddings"),
    head=transformers_head, pooling="first", plan=_distilbert_plan,
    model_families=("distilbert",), frozen_name_parts=("position_embeddings",),
    description="DistilBERT (embeddings, transformer.layer.i, pre_classifier)"))


# -- ALBERT --------------------------------------------------------------------------------------

def _albert_plan(model: nn.Module, task: Task) -> StagePlan:
    """ALBERT: ``<base>.embeddings``, the projection to the hidden size
    (``encoder.embedding_hidden_mapping_in``), then one stage per layer group
    (``encoder.albert_layer_groups.g``) that runs every pass through the group. The passes of a
    group share its weights, so a layer of the group is in each of them and the cache can only
    hold what comes before the group's first pass: with one group (ALBERT's default) the
    projected embeddings. Last, the pooler on the first token; the head reads
    ``dropout(tanh(pooler(h[:, 0])))``."""
    prefix = model.base_model_prefix
    base = getattr(model, prefix)
    encoder = base.encoder
    mask = _bidirectional_mask(base)
    names = [f"{prefix}.embeddings", f"{prefix}.encoder.embedding_hidden_mapping_in"]
    functions = [_hidden_stage(lambda s: base.embeddings(input_ids=s["input_ids"])),
                 _hidden_stage(lambda s: encoder.embedding_hidden_mapping_in(s["hidden"]))]
    layers, groups = encoder.config.num_hidden_layers, encoder.config.num_hidden_groups
    group_of_pass = [int(i / (layers / groups)) for i in range(layers)]  # as the encoder does
    for g, group in enumerate(encoder.albert_layer_groups):

        def run_group(s: State, group: nn.Module = group, passes: int = group_of_pass.count(g)
                      ) -> torch.Tensor:
            hidden, mask4d = s["hidden"], mask(s)
            for _ in range(passes):
                hidden = _hidden(group(hidden, mask4d))
            return hidden

        names.append(f"{prefix}.encoder.albert_layer_groups.{g}")
        functions.append(_hidden_stage(run_group))
    pooler = base.pooler
    return _encoder_plan(names, functions, model, None if pooler is None else (
        f"{prefix}.pooler", lambda h: base.pooler_activation(pooler(h[:, 0]))))


ALBERT = register_family(Family(
    name="albert", modality="text",
    recognise=lambda m: _has(_at(_transformers_base(m), "encoder"), "albert_layer_groups",
                             "embedding_hidden_mapping_in"),
    head=transformers_head, pooling="first", plan=_albert_plan,
    model_families=("albert",), frozen_name_parts=("position_embeddings",),
    description="ALBERT (embeddings, encoder.albert_layer_groups.g shared by its passes, "
                "pooler)"))


# -- MPNet ---------------------------------------------------------------------------------------

def _mpnet_plan(model: nn.Module, task: Task) -> StagePlan:
    """MPNet: ``<base>.embeddings``; the relative position bias every layer adds, from the
    Embedding ``encoder.relative_attention_bias`` (a stage of its own that passes the state on:
    each layer stage recomputes the bias from it, so a prefix cached before it stays valid
    while it trains); ``encoder.layer.i``. Its classification head pools the first token
    itself, so it gets the hidden sequence."""
    prefix = model.base_model_prefix
    base = getattr(model, prefix)
    encoder = base.encoder
    mask = _bidirectional_mask(base)
    names = [f"{prefix}.embeddings", f"{prefix}.encoder.relative_attention_bias"]
    functions: list[StageFunction] = [
        _hidden_stage(lambda s: base.embeddings(input_ids=s["input_ids"])), lambda s: s]
    for i, layer in enumerate(encoder.layer):
        names.append(f"{prefix}.encoder.layer.{i}")
        functions.append(_hidden_stage(lambda s, layer=layer: _hidden(layer(
            s["hidden"], mask(s), encoder.compute_position_bias(s["hidden"])))))
    pooler = getattr(base, "pooler", None)
    return _encoder_plan(names, functions, model,
                         (f"{prefix}.pooler", pooler) if pooler is not None else None)


MPNET = register_family(Family(
    name="mpnet", modality="text",
    recognise=lambda m: _has(_at(_transformers_base(m), "encoder"), "layer",
                             "relative_attention_bias", "compute_position_bias"),
    head=transformers_head, pooling="first", plan=_mpnet_plan,
    model_families=("mpnet",), frozen_name_parts=("position_embeddings",),
    description="MPNet (embeddings, encoder.relative_attention_bias, encoder.layer.i)"))


# -- DeBERTa-v2/v3 -------------------------------------------------------------------------------

def _deberta_plan(model: nn.Module, task: Task) -> StagePlan | None:
    """DeBERTa-v2/v3: ``<base>.embeddings``; the relative position embeddings every layer
    reads (``encoder.rel_embeddings``, a stage of its own that passes the state on: each layer
    stage reads them anew); ``encoder.layer.i``, with the convolution after the first layer
    (``encoder.conv``, DeBERTa-v2 xlarge: a stage of its own, reading the embedding output
    that the first layer's stage keeps in the state); the context pooler on the first token,
    whose ``dropout`` output the head reads. A model that reruns its last layer
    (``z_steps`` > 1) has no plan."""
    prefix = model.base_model_prefix
    base = getattr(model, prefix)
    encoder = base.encoder
    pooler = getattr(model, "pooler", None)
    if getattr(base, "z_steps", 0) > 1 or pooler is None:
        return None

    def run_layer(s: State, layer: nn.Module) -> torch.Tensor:
        hidden = s["hidden"]
        return _hidden(layer(hidden, encoder.get_attention_mask(s["attention_mask"]),
                             relative_pos=encoder.get_rel_pos(hidden),
                             rel_embeddings=encoder.get_rel_embedding()))

    names = [f"{prefix}.embeddings"]
    functions: list[StageFunction] = [_hidden_stage(lambda s: base.embeddings(
        input_ids=s["input_ids"], mask=s["attention_mask"]))]
    if getattr(encoder, "rel_embeddings", None) is not None:
        names.append(f"{prefix}.encoder.rel_embeddings")
        functions.append(lambda s: s)
    for i, layer in enumerate(encoder.layer):
        names.append(f"{prefix}.encoder.layer.{i}")
        if i == 0 and encoder.conv is not None:
            functions.append(lambda s, layer=layer: {
                "hidden": run_layer(s, layer), "attention_mask": s["attention_mask"],
                "embedded": s["hidden"]})
            names.append(f"{prefix}.encoder.conv")
            functions.append(_hidden_stage(
                lambda s: encoder.conv(s["embedded"], s["hidden"], s["attention_mask"])))
        else:
            functions.append(_hidden_stage(lambda s, layer=layer: run_layer(s, layer)))
    return _encoder_plan(names, functions, model, ("pooler", pooler))


DEBERTA_V2 = register_family(Family(
    name="deberta_v2", modality="text",
    recognise=lambda m: _has(_at(_transformers_base(m), "encoder"), "layer",
                             "get_rel_embedding", "get_rel_pos", "get_attention_mask"),
    head=transformers_head, pooling="first", plan=_deberta_plan,
    model_families=("deberta-v2",), frozen_name_parts=("position_embeddings",),
    description="DeBERTa-v2/v3 (embeddings, encoder.rel_embeddings, encoder.layer.i, pooler)"))


# -- causal decoders -----------------------------------------------------------------------------

def _counting_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids 0, 1, 2, ... (right padding: the real tokens come first)."""
    return torch.arange(attention_mask.shape[1], device=attention_mask.device).unsqueeze(0)


def _real_token_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """OPT's position ids: real tokens counted from 0, padding -1."""
    mask = attention_mask.long()
    return (torch.cumsum(mask, dim=1) * mask - 1).long()


def _positions_by_id(module: nn.Module, attention_mask: torch.Tensor,
                     positions: torch.Tensor) -> torch.Tensor:
    return module(positions)


def _opt_positions(module: nn.Module, attention_mask: torch.Tensor,
                   positions: torch.Tensor) -> torch.Tensor:
    return module(attention_mask, 0, position_ids=positions)


@dataclass(frozen=True)
class DecoderLayout:
    """Where a transformers causal decoder keeps its parts: one layout recognises the family
    and builds its stage plan (:meth:`plan`), cut at every decoder layer.

    Attributes:
        stack: Dotted path from the model to the module that holds the layers (``model``,
            ``transformer``, ``gpt_neox``, ``model.decoder``); stage names start with it.
        embed: The token embedding (``embed_tokens``, ``wte``, ``embed_in``, ...).
        layers: The list of decoder layers (``layers``, ``h``).
        final: The modules after the layers, in order (the final norm, OPT's
            ``project_out``); one whose attribute is ``None`` is skipped.
        rotary: Positions enter every layer as rotary embeddings from the stack's
            ``rotary_emb``.
        positions: A learned position embedding added to the token embeddings (GPT-2's
            ``wpe``, OPT's ``embed_positions``), called by ``embed_positions``.
        project_in: A projection of the token embeddings to the hidden size (OPT).
        position_ids: The position ids of a right-padded batch, from its attention mask.
        embed_positions: ``(module, attention_mask, position_ids) -> embeddings``.
        layer_options: Further keyword arguments of every layer call (Falcon's ``alibi``).
        mask_options: Further keyword arguments of the model file's ``create_causal_mask``.
    """

    stack: str
    embed: str
    layers: str
    final: tuple[str, ...]
    rotary: bool = False
    positions: str | None = None
    project_in: str | None = None
    position_ids: Callable[[torch.Tensor], torch.Tensor] = _counting_positions
    embed_positions: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] = \
        _positions_by_id
    layer_options: Mapping[str, Any] = field(default_factory=dict)
    mask_options: Mapping[str, Any] = field(default_factory=dict)

    def recognise(self, model: nn.Module) -> bool:
        """Whether ``model`` has the modules this layout names."""
        parts = [self.embed, self.layers, *self.final, *(["rotary_emb"] if self.rotary else []),
                 *filter(None, [self.positions, self.project_in])]
        return _has(_at(model, self.stack), *parts)

    def plan(self, model: nn.Module, task: Task) -> StagePlan | None:
        """The decoder's stages: the token embedding (then ``project_in`` and the learned
        positions, each a stage), every layer (the causal mask, the position ids and the
        rotary embeddings rebuilt from the state's attention mask by the model's own
        functions), the final modules. For classification the last stage pools the last
        non-padding token for the ``score`` head (as the ``*ForSequenceClassification`` do);
        for the causal-LM task the LM head gets every token."""
        pooled = task.kind != "causal_lm"
        if pooled and task.head_name != "score":
            return None
        stack = _at(model, self.stack)
        mask_functions = _layer_mask_functions(stack, len(getattr(stack, self.layers)))
        accepted = inspect.signature(mask_functions[0]).parameters if mask_functions else {}
        cache_arg = "cache" if "cache" in accepted else "past_key_values"

        def layer_inputs(s: State, index: int) -> dict[str, Any]:
            hidden = s["hidden"]
            positions = self.position_ids(s["attention_mask"])
            inputs = {"attention_mask": mask_functions[index](
                config=stack.config, inputs_embeds=hidden, attention_mask=s["attention_mask"],
                position_ids=positions, **{cache_arg: None}, **self.mask_options),
                "position_ids": positions, **self.layer_options}
            if self.rotary:
                inputs["position_embeddings"] = stack.rotary_emb(hidden, position_ids=positions)
            return inputs

        embed = getattr(stack, self.embed)
        names = [f"{self.stack}.{self.embed}"]
        functions = [_hidden_stage(lambda s: embed(s["input_ids"]))]
        project_in = getattr(stack, self.project_in) if self.project_in else None
        if project_in is not None:
            names.append(f"{self.stack}.{self.project_in}")
            functions.append(_hidden_stage(lambda s: project_in(s["hidden"])))
        if self.positions is not None:
            table = getattr(stack, self.positions)
            names.append(f"{self.stack}.{self.positions}")
            functions.append(_hidden_stage(lambda s: s["hidden"] + self.embed_positions(
                table, s["attention_mask"], self.position_ids(s["attention_mask"]))))
        for i, layer in enumerate(getattr(stack, self.layers)):
            names.append(f"{self.stack}.{self.layers}.{i}")
            functions.append(_hidden_stage(
                lambda s, layer=layer, i=i: _hidden(layer(s["hidden"], **layer_inputs(s, i)))))
        for part in self.final:
            module = getattr(stack, part)
            if module is not None:
                names.append(f"{self.stack}.{part}")
                functions.append(_hidden_stage(lambda s, module=module: module(s["hidden"])))
        if not pooled:
            return StagePlan(names, functions, _text_start, lambda s: s["hidden"])
        last = functions[-1]
        functions[-1] = lambda s: {"pooled": _last_token(last(s))}
        return StagePlan(names, functions, _text_start, lambda s: s["pooled"])


def _layer_mask_functions(stack: nn.Module, n_layers: int) -> list[Callable[..., Any]]:
    """The mask builder of each decoder layer, by the model file's own rule: per-layer
    ``config.layer_types`` (Qwen2, Gemma 2/3: full or sliding-window attention), else the
    sliding window for every layer when ``config.sliding_window`` is set (Mistral), else the
    plain causal mask. A sliding window matters only for texts longer than the window, which
    the plan's check on a short sample would not catch."""
    full = _library_function(stack, "create_causal_mask")
    config = stack.config
    names = {"full_attention": "create_causal_mask",
             "sliding_attention": "create_sliding_window_causal_mask"}
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return [_library_function(stack, names.get(kind, "create_causal_mask"))
                for kind in layer_types[:n_layers]]
    if getattr(config, "sliding_window", None) is not None and getattr(
            sys.modules[type(stack).__module__], "create_sliding_window_causal_mask", None):
        return [_library_function(stack, "create_sliding_window_causal_mask")] * n_layers
    return [full] * n_layers


def register_decoder(name: str, layout: DecoderLayout, *, model_families: tuple[str, ...],
                     description: str, plan: PlanBuilder | None = None,
                     module_types: Mapping[str, ModuleType] | None = None) -> Family:
    """Registers a transformers decoder family: recognised and cut into stages by its
    :class:`DecoderLayout` (or ``plan``), its head where transformers keeps it, pooling the
    last non-padding token, for classification and the causal-LM task."""
    return register_family(Family(
        name=name, modality="text", recognise=layout.recognise, head=transformers_head,
        pooling="last", plan=plan or layout.plan, kinds=("classification", "causal_lm"),
        model_families=model_families, module_types=dict(module_types or {}),
        description=description))


_LLAMA_LAYOUT = DecoderLayout(stack="model", embed="embed_tokens", layers="layers",
                              final=("norm",), rotary=True)
LLAMA = register_decoder(
    "llama", _LLAMA_LAYOUT, model_families=("llama", "mistral", "qwen2", "gemma"),
    description="LLaMA-style decoders (model.embed_tokens, model.layers.i, model.norm)")

_GPT2_LAYOUT = DecoderLayout(stack="transformer", embed="wte", positions="wpe", layers="h",
                             final=("ln_f",))
GPT2 = register_decoder(
    "gpt2", _GPT2_LAYOUT, model_families=("gpt2",),
    module_types={"Conv1D": ModuleType("linear", output_dim=1)},
    description="GPT-2 decoders (transformer.wte, transformer.wpe, transformer.h.i of Conv1D "
                "layers, transformer.ln_f)")

_OPT_LAYOUT = DecoderLayout(stack="model.decoder", embed="embed_tokens",
                            project_in="project_in", positions="embed_positions",
                            layers="layers", final=("final_layer_norm", "project_out"),
                            position_ids=_real_token_positions,
                            embed_positions=_opt_positions)
OPT = register_decoder(
    "opt", _OPT_LAYOUT, model_families=("opt",),
    description="OPT decoders (model.decoder.embed_tokens, embed_positions, layers.i, "
                "final_layer_norm, project_out)")

_GPT_NEOX_LAYOUT = DecoderLayout(stack="gpt_neox", embed="embed_in", layers="layers",
                                 final=("final_layer_norm",), rotary=True)
GPT_NEOX = register_decoder(
    "gpt_neox", _GPT_NEOX_LAYOUT, model_families=("gpt_neox",),
    description="GPT-NeoX/Pythia decoders (gpt_neox.embed_in, gpt_neox.layers.i, "
                "gpt_neox.final_layer_norm)")

# Falcon's forward materialises its causal mask (to add ALiBi to it) and passes alibi
_FALCON_LAYOUT = DecoderLayout(stack="transformer", embed="word_embeddings", layers="h",
                               final=("ln_f",), rotary=True, layer_options={"alibi": None},
                               mask_options={"allow_is_causal_skip": False})


def _falcon_plan(model: nn.Module, task: Task) -> StagePlan | None:
    """Falcon with rotary positions; a Falcon with ALiBi (``config.alibi``: falcon-rw) has no
    plan, since its forward folds the ALiBi bias into the mask inside the model."""
    if getattr(model.transformer, "use_alibi", False):
        return None
    return _FALCON_LAYOUT.plan(model, task)


FALCON = register_decoder(
    "falcon", _FALCON_LAYOUT, model_families=("falcon",), plan=_falcon_plan,
    description="Falcon decoders (transformer.word_embeddings, transformer.h.i, "
                "transformer.ln_f; ALiBi ones without cache)")

_PHI_LAYOUT = DecoderLayout(stack="model", embed="embed_tokens", layers="layers",
                            final=("final_layernorm",), rotary=True)
PHI = register_decoder(
    "phi", _PHI_LAYOUT, model_families=("phi",),
    description="Phi decoders (model.embed_tokens, model.layers.i, model.final_layernorm)")


# -- the generic adapter -------------------------------------------------------------------------

_STANDARDISED_CONV = ModuleType("conv", transforms_weight=True)

GENERIC = register_family(Family(
    name="generic", modality=None, recognise=lambda m: True, head=library_head,
    kinds=("classification", "causal_lm"),
    frozen_name_parts=("position_embeddings", "pos_embed", "norm"),
    module_types={
        "Linear": ModuleType("linear"), "Conv2d": ModuleType("conv", conv_forward="plain"),
        "Conv1d": ModuleType("conv"), "Embedding": ModuleType("embedding"),
        # timm's weight-standardised convolutions (NFNets, BiT ResNets)
        "StdConv2d": _STANDARDISED_CONV, "StdConv2dSame": _STANDARDISED_CONV,
        "ScaledStdConv2d": _STANDARDISED_CONV, "ScaledStdConv2dSame": _STANDARDISED_CONV},
    description="any other model: candidates the forward calls, pooling traced, no cache"))

#: The families that ship with zest (they cannot be unregistered).
BUILT_IN_FAMILIES = tuple(FAMILIES.names())

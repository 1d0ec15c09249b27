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

def _timm_resnet_plan(model: nn.Module, task: Task) -> StagePlan:
    names = ["conv1"]
    functions: list[StageFunction] = [
        lambda s: {"x": model.maxpool(model.act1(model.bn1(model.conv1(s["x"]))))}]
    for k in range(1, 5):
        for j, block in enumerate(getattr(model, f"layer{k}")):
            names.append(f"layer{k}.{j}")
            functions.append(lambda s, b=block: {"x": b(s["x"])})
    return StagePlan(names, functions, _image_state,
                     lambda s: model.forward_head(s["x"], pre_logits=True))


TIMM_RESNET = register_family(Family(
    name="timm_resnet", modality="image",
    recognise=lambda m: _has(m, "conv1", "bn1", "act1", "maxpool", "layer1", "layer4"),
    head=timm_head, plan=_timm_resnet_plan, model_families=("resnet",),
    description="timm ResNets (conv1 stem, layer1-4 of blocks)"))


# -- timm ViTs -----------------------------------------------------------------------------------

def _timm_vit_plan(model: nn.Module, task: Task) -> StagePlan:
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
    return StagePlan(names, functions, _image_state,
                     lambda s: model.forward_head(model.norm(s["x"]), pre_logits=True))


TIMM_VIT = register_family(Family(
    name="timm_vit", modality="image",
    recognise=lambda m: _has(m, "patch_embed", "_pos_embed", "blocks", "norm"),
    head=timm_head, plan=_timm_vit_plan, model_families=("vit", "deit"),
    frozen_name_parts=("pos_embed", "norm"),
    description="timm Vision Transformers (patch_embed, blocks.i, norm)"))


# -- torchvision ---------------------------------------------------------------------------------

TORCHVISION = register_family(Family(
    name="torchvision", modality="image",
    recognise=lambda m: type(m).__module__.startswith("torchvision.models."),
    head=last_linear_head,
    model_families=("resnet", "mobilenetv2", "mobilenetv3", "efficientnet", "vit"),
    description="torchvision classifiers (head: the last Linear; no prefix cache)"))


# -- BERT-style encoders -------------------------------------------------------------------------

def _encoder_plan(model: nn.Module, task: Task) -> StagePlan:
    """BERT-style encoders (BERT, RoBERTa, XLM-R, ...: ``<base>.embeddings``,
    ``<base>.encoder.layer`` and the base model's own attention-mask builder), cut at every
    encoder layer. Heads that read the pooler (BERT) get ``dropout(pooler(h))``; heads that
    pool themselves (RoBERTa's classification head) get the hidden sequence."""
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
    functions: list[StageFunction] = [
        lambda s: {"hidden": base.embeddings(input_ids=s["input_ids"]),
                   "attention_mask": s["attention_mask"]}]
    for i, layer in enumerate(base.encoder.layer):
        names.append(f"{prefix}.encoder.layer.{i}")

        def run_layer(s: State, layer: nn.Module = layer) -> State:
            out = layer(s["hidden"], mask4d(s))
            hidden = out[0] if isinstance(out, tuple) else out
            return {"hidden": hidden, "attention_mask": s["attention_mask"]}

        functions.append(run_layer)
    pooler = getattr(base, "pooler", None)
    if pooler is not None:
        names.append(f"{prefix}.pooler")
        functions.append(lambda s: {"pooled": pooler(s["hidden"])})
        dropout = getattr(model, "dropout", nn.Identity())
        features: Callable[[State], torch.Tensor] = lambda s: dropout(s["pooled"])  # noqa: E731
    else:
        features = lambda s: s["hidden"]  # noqa: E731 - the head pools the sequence itself
    return StagePlan(names, functions,
                     lambda inputs: {"input_ids": inputs["input_ids"],
                                     "attention_mask": inputs["attention_mask"]},
                     features)


BERT = register_family(Family(
    name="bert", modality="text",
    recognise=lambda m: _has(_transformers_base(m), "embeddings", "encoder",
                             "_create_attention_masks"),
    head=transformers_head, pooling="first", plan=_encoder_plan,
    model_families=("bert", "roberta", "xlm-roberta", "electra"),
    frozen_name_parts=("position_embeddings",),
    description="BERT-style encoders (BERT, RoBERTa, XLM-R: embeddings, encoder.layer.i)"))


# -- LLaMA-style decoders ------------------------------------------------------------------------

def _decoder_plan(model: nn.Module, task: Task) -> StagePlan | None:
    """LLaMA-style decoders (``model.model`` with ``embed_tokens``, ``layers``, ``norm`` and
    ``rotary_emb``), cut at every decoder layer: with a ``score`` head on the last non-padding
    token, or (the causal-LM task) with the LM head on every token, the stages then ending at
    the final norm. Each stage rebuilds the causal mask and the rotary embeddings from the
    state's attention mask, through the model's own functions."""
    pooled = task.kind != "causal_lm"
    if task.head_name != ("score" if pooled else "lm_head"):
        return None
    base = model.model
    prefix = "model"
    create_causal_mask = sys.modules[type(base).__module__].create_causal_mask
    accepted = inspect.signature(create_causal_mask).parameters
    cache_arg = "cache" if "cache" in accepted else "past_key_values"

    def context(s: State) -> tuple[Any, Any, torch.Tensor]:
        hidden = s["hidden"]
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask = create_causal_mask(config=base.config, inputs_embeds=hidden,
                                  attention_mask=s["attention_mask"], position_ids=positions,
                                  **{cache_arg: None})
        return mask, base.rotary_emb(hidden, position_ids=positions), positions

    names = [f"{prefix}.embed_tokens"]
    functions: list[StageFunction] = [
        lambda s: {"hidden": base.embed_tokens(s["input_ids"]),
                   "attention_mask": s["attention_mask"]}]
    for i, layer in enumerate(base.layers):
        names.append(f"{prefix}.layers.{i}")

        def run_layer(s: State, layer: nn.Module = layer) -> State:
            mask, rotary, positions = context(s)
            out = layer(s["hidden"], attention_mask=mask, position_embeddings=rotary,
                        position_ids=positions)
            hidden = out[0] if isinstance(out, tuple) else out
            return {"hidden": hidden, "attention_mask": s["attention_mask"]}

        functions.append(run_layer)

    def last_token(s: State) -> State:
        hidden = base.norm(s["hidden"])
        last = s["attention_mask"].long().sum(dim=1).clamp(min=1) - 1
        return {"pooled": hidden[torch.arange(hidden.shape[0], device=hidden.device), last]}

    def every_token(s: State) -> State:
        return {"hidden": base.norm(s["hidden"]), "attention_mask": s["attention_mask"]}

    names.append(f"{prefix}.norm")
    functions.append(last_token if pooled else every_token)
    return StagePlan(names, functions,
                     lambda inputs: {"input_ids": inputs["input_ids"],
                                     "attention_mask": inputs["attention_mask"]},
                     (lambda s: s["pooled"]) if pooled else (lambda s: s["hidden"]))


LLAMA = register_family(Family(
    name="llama", modality="text",
    recognise=lambda m: _has(getattr(m, "model", None), "embed_tokens", "layers", "norm",
                             "rotary_emb"),
    head=transformers_head, pooling="last", plan=_decoder_plan,
    kinds=("classification", "causal_lm"),
    model_families=("llama", "mistral", "qwen2", "gemma"),
    description="LLaMA-style decoders (model.embed_tokens, model.layers.i, model.norm)"))


# -- GPT-2 ---------------------------------------------------------------------------------------

GPT2 = register_family(Family(
    name="gpt2", modality="text",
    recognise=lambda m: _has(getattr(m, "transformer", None), "wte", "wpe", "h"),
    head=transformers_head, pooling="last", kinds=("classification", "causal_lm"),
    model_families=("gpt2",),
    module_types={"Conv1D": ModuleType("linear", output_dim=1)},
    description="GPT-2 decoders (transformer.wte, transformer.h.i of Conv1D layers)"))


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

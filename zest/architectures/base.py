"""Architectures: one registry of adapters (ARCHITECTURE.md §6, "An architecture").

What zest knows about a kind of architecture is one :class:`Architecture` entry in
:data:`ARCHITECTURES`, the way peft keeps a table per model type and timm a ``group_matcher``
per model: how to recognise it (by its modules and attributes, never by a model's name), where
its head is, how the head's input is pooled, its stage plan for the ground-truth prefix cache
(:mod:`zest.stages`, verified against the model's own forward before any use), which layers
GPS keeps frozen, and the facts of the module types it brings (:class:`ModuleType`: the layer
kind the predictor sees, the weight dimension of the output neurons, a forward that transforms
the weight, timm's dynamic "same" padding). Module types are facts about a class wherever it
appears, so every entry's types form one table (:func:`module_types`). Candidate layers group
into blocks by one rule for every architecture (:func:`zest.layers.block_of`: the item of the
innermost indexed container, as timm's ``group_matcher`` groups ``blocks.i.j``); a stage plan
cuts the forward at those blocks. The built-in entries are in :mod:`zest.architectures.vision`,
:mod:`~zest.architectures.encoders` and :mod:`~zest.architectures.decoders`.

A model that no entry recognises gets :data:`GENERIC`, which works without guessing:
candidates are the modules with their own weights that the forward pass calls (the probe
leaves the others out with a reason), the head is where its library keeps it, pooling follows
the head (traced: causal decoders read the last non-padding token), and there is no prefix
cache. :func:`zest.models.load_model` says once per model family that it fell back
(:class:`ArchitectureFallbackWarning`).

An architecture is not a *model family*: ``Task.architecture`` is the name of the entry that
adapts a loaded model (``timm_efficientnet``, ``bert``, ``llama``, ``generic``, ...); code asks
it what to do. The model family of a spec, :func:`zest.models.model_family` (``efficientnet``,
``mobilenetv2``, ``bert``, ``llama``, ...), is read from the spec string alone because records
hold only specs; leave-one-family-out evaluation and the unseen-family note use it. Each entry
lists the model families it adapts (``Architecture.model_families``).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from torch import nn

from zest._registry import Registry

if TYPE_CHECKING:
    from zest.stages.plan import PlanBuilder

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


@dataclass(frozen=True)
class Architecture:
    """One architecture: everything zest knows about it.

    Attributes:
        name: The registry name; ``Task.architecture`` of the models it adapts.
        modality: ``image`` or ``text`` (``None``: any).
        recognise: Whether a built model is of this architecture, from its modules and
            attributes.
        head: ``(model, task kind) -> name`` of its head module (``None``: it has none).
        pooling: Which token a text head reads (``first``, ``last``); checked against a traced
            forward when the model is loaded, and a model that pools otherwise falls back to
            :data:`GENERIC`. ``None``: whatever the trace says (images: the head input pooled
            by its shape).
        stage_plan: ``(model, task) -> StagePlan`` cut at its blocks (:mod:`zest.stages`), for
            the ground-truth prefix cache; ``None``: no cache.
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
    stage_plan: PlanBuilder | None = None
    kinds: tuple[str, ...] = ("classification",)
    model_families: tuple[str, ...] = ()
    frozen_name_parts: tuple[str, ...] = ()
    module_types: Mapping[str, ModuleType] = field(default_factory=dict)
    description: str = ""


ARCHITECTURES: Registry[Architecture] = Registry("architecture")
_fallbacks_noted: set[str] = set()


class ArchitectureFallbackWarning(UserWarning):
    """A model was loaded with the generic adapter: no registered architecture recognised it."""


def register_architecture(architecture: Architecture) -> Architecture:
    """Adds ``architecture`` to :data:`ARCHITECTURES`; recognition tries it after the
    architectures registered before it (and always before :data:`GENERIC`). A module type it
    declares must agree with every other declaration of that class name.

    Raises:
        ValueError: a bad pooling, kind or layer kind, or a module type declared otherwise.
    """
    name = architecture.name
    if architecture.pooling not in (None, "first", "last"):
        raise ValueError(f"architecture {name!r}: pooling must be 'first', 'last' or None")
    if architecture.modality not in (None, "image", "text"):
        raise ValueError(f"architecture {name!r}: modality must be 'image', 'text' or None")
    known = module_types()
    for type_name, facts in architecture.module_types.items():
        if facts.kind not in LAYER_KINDS:
            raise ValueError(f"architecture {name!r}: {type_name} kind {facts.kind!r} is not "
                             f"one of {LAYER_KINDS}")
        if type_name in known and known[type_name] != facts:
            raise ValueError(f"architecture {name!r} declares {type_name} as {facts}, but it "
                             f"is already {known[type_name]}")
    ARCHITECTURES.register(name)(architecture)
    module_types.cache_clear()
    return architecture


def architecture_named(name: str) -> Architecture:
    """The entry ``Task.architecture`` names; :data:`GENERIC` for a name no entry has (a task
    built by hand)."""
    return ARCHITECTURES.get(name) if name in ARCHITECTURES else GENERIC


def architecture_for(model: nn.Module, *, modality: str, kind: str = "classification",
                     pooling: Pooling | None = None) -> Architecture:
    """The first registered architecture (in registration order) that adapts ``model``: of its
    modality and task kind, recognising it, and, when the traced ``pooling`` is given, pooling
    that way; :data:`GENERIC` when none does."""
    for name in ARCHITECTURES:
        architecture = ARCHITECTURES.get(name)
        if architecture is GENERIC or architecture.modality not in (None, modality) or \
                kind not in architecture.kinds:
            continue
        if pooling is not None and architecture.pooling not in (None, pooling):
            continue
        if architecture.recognise(model):
            return architecture
    return GENERIC


def note_fallback(spec: str, model_family: str, model: nn.Module) -> None:
    """Warns, once per model family and process, that ``spec`` runs on the generic adapter."""
    if model_family in _fallbacks_noted:
        return
    _fallbacks_noted.add(model_family)
    warnings.warn(f"no architecture of zest recognises {model_family} ({spec}, "
                  f"{type(model).__name__}); it runs on the generic adapter: every module with "
                  "its own weight that the forward calls is a candidate, pooling follows the "
                  "head, and ground truth runs without the prefix cache (register an "
                  "architecture: ARCHITECTURE.md §6)", ArchitectureFallbackWarning, stacklevel=3)


# -- module types --------------------------------------------------------------------------------


@functools.cache
def module_types() -> dict[str, ModuleType]:
    """Every declared module type, by class name: the union of the architectures' tables
    (cached until an architecture is registered or removed)."""
    table: dict[str, ModuleType] = {}
    for name in ARCHITECTURES:
        table.update(ARCHITECTURES.get(name).module_types)
    return table


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
    kind; for a class no architecture declares, the kind its name says (``...Linear`` → linear,
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
    """Whether GPS keeps the layer ``name`` frozen: its name holds a part some architecture
    declares frozen (``Architecture.frozen_name_parts``; a tuner sees the layer name, not the
    model)."""
    return any(part in name for architecture in map(ARCHITECTURES.get, ARCHITECTURES)
               for part in architecture.frozen_name_parts)

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


def has_attributes(obj: Any, *names: str) -> bool:
    """Whether ``obj`` is there and has every attribute in ``names``."""
    return obj is not None and all(hasattr(obj, name) for name in names)


def transformers_base(model: nn.Module) -> Any:
    """A transformers model's base model (``model.<base_model_prefix>``), else ``None``."""
    prefix = getattr(model, "base_model_prefix", "")
    return getattr(model, prefix, None) if prefix else None


def attribute_at(model: nn.Module, path: str) -> Any:
    """The attribute at a dotted ``path`` of ``model`` (``None`` where a part is missing)."""
    obj: Any = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
    return obj


# -- the generic adapter -------------------------------------------------------------------------

_STANDARDISED_CONV = ModuleType("conv", transforms_weight=True)

#: The adapter of a model no registered architecture recognises (registered last, by
#: :mod:`zest.architectures`).
GENERIC = Architecture(
    name="generic", modality=None, recognise=lambda m: True, head=library_head,
    kinds=("classification", "causal_lm"),
    frozen_name_parts=("position_embeddings", "pos_embed", "norm"),
    module_types={
        "Linear": ModuleType("linear"), "Conv2d": ModuleType("conv", conv_forward="plain"),
        "Conv1d": ModuleType("conv"), "Embedding": ModuleType("embedding"),
        # timm's weight-standardised convolutions (NFNets, BiT ResNets)
        "StdConv2d": _STANDARDISED_CONV, "StdConv2dSame": _STANDARDISED_CONV,
        "ScaledStdConv2d": _STANDARDISED_CONV, "ScaledStdConv2dSame": _STANDARDISED_CONV},
    description="any other model: candidates the forward calls, pooling traced, no cache")

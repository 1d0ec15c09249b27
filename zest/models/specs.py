"""Model specs: one registry of the ways a spec names a model (ARCHITECTURE.md §2).

A *model spec* is a string: a registered name (``minilm``, ``efficientnet_lite0``, ...; the
packaged models, :data:`MODELS`) or ``<prefix>:<name>`` of a registered :class:`ModelScheme`
(``timm:<arch>``, ``tv:<arch>``, ``hf:<local dir>``, registered by the file of their source).
A scheme owns everything a spec's prefix decides: parsing, checking without loading, building,
the model family (:func:`model_family`) and path handling (:func:`absolute_spec`). This module
is the only place that reads a spec's prefix.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zest._registry import Registry
from zest.errors import InvalidInputError, UnknownNameError, unknown_name_message
from zest.models.task import TASK_KINDS

if TYPE_CHECKING:
    from torch import nn

    from zest.models.task import Task

ModelBuilder = Callable[..., "tuple[nn.Module, Task]"]
#: The packaged models, by name; ``MODELS.meta(name)``: ``modality``, ``pretrained``,
#: ``family`` (:func:`model_family`) and ``causal_lm`` (a causal decoder).
MODELS: Registry[ModelBuilder] = Registry("model")
#: ``(spec, name, num_classes, checkpoint=, image_size=, kind=) -> (model, task)``.
SchemeBuilder = Callable[..., "tuple[nn.Module, Task]"]


@dataclass(frozen=True)
class ModelScheme:
    """One way a spec names a model: ``<prefix>:<name>``.

    Attributes:
        prefix: What comes before the colon (``timm``, ``tv``, ``hf``).
        usage: How listings show it (``timm:<arch>``).
        build: ``(spec, name, num_classes, *, checkpoint, image_size, kind) -> (model, task)``.
        family: The model family of a name (:func:`model_family`), without loading it.
        takes_checkpoint: Whether ``load_model(checkpoint=...)`` applies.
        causal_lm: Whether a spec of it may name a causal decoder (checked when loaded).
        local_path: Whether the name is a local path (made absolute by :meth:`absolute`).
    """

    prefix: str
    usage: str
    build: SchemeBuilder
    family: Callable[[str], str]
    takes_checkpoint: bool = False
    causal_lm: bool = False
    local_path: bool = False

    def parse(self, spec: str) -> str:
        """The name of a spec of this scheme (what follows ``<prefix>:``)."""
        return spec[len(self.prefix) + 1:]

    def spec_of(self, name: str) -> str:
        """The spec of this scheme that names ``name`` (``timm:<name>``)."""
        return f"{self.prefix}:{name}"

    def check(self, spec: str) -> str:
        """Refuses, without loading anything, a spec with no name after its prefix."""
        if not self.parse(spec):
            raise InvalidInputError(f"model spec {spec!r} lacks its name; use timm:<arch>, "
                                    "tv:<arch> or hf:<local dir>")
        return spec

    def model_family(self, spec: str) -> str:
        """The model family of a spec of this scheme."""
        return self.family(self.parse(spec))

    def takes_causal_lm(self, spec: str) -> bool:
        """Whether the spec may take the causal-LM task (before loading it)."""
        return self.causal_lm

    def absolute(self, spec: str) -> str:
        """The spec with its local path made absolute (other specs as they are)."""
        if not self.local_path:
            return spec
        return self.spec_of(str(Path(self.parse(spec)).expanduser().resolve()))


@dataclass(frozen=True)
class PackagedScheme(ModelScheme):
    """The packaged models' scheme: a spec is a name registered in :data:`MODELS`."""

    def parse(self, spec: str) -> str:
        return spec

    def check(self, spec: str) -> str:
        if spec not in MODELS:
            raise UnknownNameError(unknown_name_message("model", spec, known_models()))
        return spec

    def model_family(self, spec: str) -> str:
        return str(MODELS.meta(spec).get("family", spec)) if spec in MODELS else spec

    def takes_causal_lm(self, spec: str) -> bool:
        return spec in MODELS and bool(MODELS.meta(spec).get("causal_lm"))


def _build_packaged(spec: str, name: str, num_classes: int, *, checkpoint: Any = None,
                    image_size: int | None = None, kind: str = "classification"
                    ) -> tuple[nn.Module, Task]:
    extra = {"kind": kind} if kind != "classification" else {}
    return MODELS.get(name)(num_classes=num_classes, image_size=image_size, **extra)


PACKAGED = PackagedScheme(prefix="", usage="<name>", build=_build_packaged, family=str)
#: The prefixed schemes, by prefix, in registration order.
SCHEMES: Registry[ModelScheme] = Registry("model spec prefix")


def register_scheme(scheme: ModelScheme) -> ModelScheme:
    """Adds a prefixed scheme (the files of timm, torchvision and transformers register theirs)."""
    SCHEMES.register(scheme.prefix)(scheme)
    return scheme


def scheme_of(spec: str) -> ModelScheme:
    """The scheme a spec names its model by: the one of its prefix, else the packaged names."""
    prefix, sep, _name = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    return SCHEMES.get(prefix) if sep and prefix in SCHEMES else PACKAGED


def check_model_spec(spec: str) -> str:
    """Validates a model spec without loading anything (unknown names list the known ones)."""
    if not isinstance(spec, str) or not spec:
        raise InvalidInputError(f"model spec must be a non-empty string, got {spec!r}")
    return scheme_of(spec).check(spec)


def known_models() -> list[str]:
    """Registered model names plus the ``timm:``/``hf:`` prefixes."""
    return MODELS.names() + [SCHEMES.get(prefix).usage for prefix in SCHEMES]


def causal_lm_models() -> list[str]:
    """The model specs that can take the causal-LM task: registered causal decoders
    (``causal_lm=True`` in :data:`MODELS`) and ``hf:<dir>`` of a causal LM."""
    return [name for name in MODELS.names() if MODELS.meta(name).get("causal_lm")] + [
        SCHEMES.get(prefix).usage for prefix in SCHEMES if SCHEMES.get(prefix).causal_lm]


def not_a_decoder_message(spec: str) -> str:
    """The one-line refusal of the causal-LM task for a model that is not a causal decoder."""
    return (f"model {spec!r} is not a causal decoder, so it cannot take the next-token task of "
            f"an lm: data set; use {', '.join(causal_lm_models())} (a *ForCausalLM model), or "
            "drop the lm: prefix to classify the texts")


def check_task_kind(spec: str, kind: str) -> None:
    """Refuses, without loading anything, an unknown task kind or the causal-LM task for a
    model that cannot take it (every registered model but the causal decoders, ``timm:`` and
    ``tv:``; an ``hf:`` directory is checked when loaded)."""
    if kind not in TASK_KINDS:
        raise InvalidInputError(f"unknown task kind {kind!r}; use {' or '.join(TASK_KINDS)}")
    if kind == "causal_lm" and not scheme_of(spec).takes_causal_lm(spec):
        raise InvalidInputError(not_a_decoder_message(spec))


def model_family(spec: str) -> str:
    """The architecture family of a model spec, without loading it: a registered model's
    ``family`` (``efficientnet``, ``mobilenetv2``, ``bert``, ``llama``, ...), the family part of
    a timm architecture name (``timm:mobilenetv3_large_100`` → ``mobilenetv3``,
    ``timm:tf_efficientnet_b0`` → ``efficientnet``; torchvision names alike), or an ``hf:``
    directory's ``model_type``.
    Families decide the leave-one-family-out evaluation and whether the predictor has seen a
    model's kind. Records hold only specs, so this never loads the model; the architecture
    adapter of a loaded model is ``Task.architecture`` (:mod:`zest.architectures`, whose
    entries list the model families they adapt)."""
    return scheme_of(spec).model_family(spec)


def arch_name_family(name: str) -> str:
    """The family part of a timm or torchvision architecture name (``mobilenetv3_large_100``
    → ``mobilenetv3``, ``tf_efficientnet_b0`` → ``efficientnet``)."""
    match = re.match(r"(?:tf_|tv_|gluon_|legacy_)?([a-z]+?(?:v\d)?)(?:_|\d|$)", name)
    return match.group(1) if match else name


def absolute_spec(spec: str) -> str:
    """The spec with its local path made absolute (``hf:<dir>``), so that workers started in
    another folder find the files the driver found; other specs as they are."""
    return scheme_of(spec).absolute(spec)

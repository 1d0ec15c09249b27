"""The transformers causal decoder architectures (ARCHITECTURE.md §6): LLaMA-style, GPT-2, OPT,
GPT-NeoX, Falcon and Phi, each recognised by its :class:`~zest.stages.decoders.DecoderLayout`,
which also cuts it into stages (:mod:`zest.stages.decoders`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from zest.architectures.base import (
    Architecture,
    ModuleType,
    register_architecture,
    transformers_head,
)
from zest.stages.decoders import (
    FALCON_LAYOUT,
    GPT2_LAYOUT,
    GPT_NEOX_LAYOUT,
    LLAMA_LAYOUT,
    OPT_LAYOUT,
    PHI_LAYOUT,
    DecoderLayout,
    falcon_plan,
)
from zest.stages.plan import PlanBuilder


def decoder_architecture(name: str, layout: DecoderLayout, *,
                         model_families: tuple[str, ...], description: str,
                         stage_plan: PlanBuilder | None = None,
                         module_types: Mapping[str, ModuleType] | None = None) -> Architecture:
    """The entry of a transformers decoder: recognised and cut into stages by its
    :class:`DecoderLayout` (or ``stage_plan``), its head where transformers keeps it, pooling
    the last non-padding token, for classification and the causal-LM task."""
    return Architecture(
        name=name, modality="text", recognise=layout.recognise, head=transformers_head,
        pooling="last", stage_plan=stage_plan or layout.stage_plan,
        kinds=("classification", "causal_lm"), model_families=model_families,
        module_types=dict(module_types or {}), description=description)


def register_decoder(name: str, layout: DecoderLayout, **entry: Any) -> Architecture:
    """Registers a transformers decoder architecture (:func:`decoder_architecture`; a
    plugin's)."""
    return register_architecture(decoder_architecture(name, layout, **entry))


LLAMA = decoder_architecture(
    "llama", LLAMA_LAYOUT, model_families=("llama", "mistral", "qwen2", "gemma"),
    description="LLaMA-style decoders (model.embed_tokens, model.layers.i, model.norm)")

GPT2 = decoder_architecture(
    "gpt2", GPT2_LAYOUT, model_families=("gpt2",),
    module_types={"Conv1D": ModuleType("linear", output_dim=1)},
    description="GPT-2 decoders (transformer.wte, transformer.wpe, transformer.h.i of Conv1D "
                "layers, transformer.ln_f)")

OPT = decoder_architecture(
    "opt", OPT_LAYOUT, model_families=("opt",),
    description="OPT decoders (model.decoder.embed_tokens, embed_positions, layers.i, "
                "final_layer_norm, project_out)")

GPT_NEOX = decoder_architecture(
    "gpt_neox", GPT_NEOX_LAYOUT, model_families=("gpt_neox",),
    description="GPT-NeoX/Pythia decoders (gpt_neox.embed_in, gpt_neox.layers.i, "
                "gpt_neox.final_layer_norm)")

FALCON = decoder_architecture(
    "falcon", FALCON_LAYOUT, model_families=("falcon",), stage_plan=falcon_plan,
    description="Falcon decoders (transformer.word_embeddings, transformer.h.i, "
                "transformer.ln_f; ALiBi ones without cache)")

PHI = decoder_architecture(
    "phi", PHI_LAYOUT, model_families=("phi",),
    description="Phi decoders (model.embed_tokens, model.layers.i, model.final_layernorm)")

#: The entries of this module, in recognition order (registered by :mod:`zest.architectures`).
ENTRIES = (LLAMA, GPT2, OPT, GPT_NEOX, FALCON, PHI)

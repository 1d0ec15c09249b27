"""The stage plans of the transformers causal decoders (ARCHITECTURE.md §5): one
:class:`DecoderLayout` per decoder recognises it and cuts it at every decoder layer (LLaMA-style,
GPT-2, OPT, GPT-NeoX, Falcon, Phi). Their entries are in :mod:`zest.architectures.decoders`."""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from zest.architectures.base import attribute_at, has_attributes
from zest.stages.plan import StagePlan, State
from zest.stages.text import hidden_of, hidden_stage, last_token, library_function, text_start

if TYPE_CHECKING:
    from zest.models.task import Task


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
    """Where a transformers causal decoder keeps its parts: one layout recognises the architecture
    and builds its stage plan (:meth:`stage_plan`), cut at every decoder layer.

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
        return has_attributes(attribute_at(model, self.stack), *parts)

    def stage_plan(self, model: nn.Module, task: Task) -> StagePlan | None:
        """The decoder's stages: the token embedding (then ``project_in`` and the learned
        positions, each a stage), every layer (the causal mask, the position ids and the
        rotary embeddings rebuilt from the state's attention mask by the model's own
        functions), the final modules. For classification the last stage pools the last
        non-padding token for the ``score`` head (as the ``*ForSequenceClassification`` do);
        for the causal-LM task the LM head gets every token."""
        pooled = task.kind != "causal_lm"
        if pooled and task.head_name != "score":
            return None
        stack = attribute_at(model, self.stack)
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
        functions = [hidden_stage(lambda s: embed(s["input_ids"]))]
        project_in = getattr(stack, self.project_in) if self.project_in else None
        if project_in is not None:
            names.append(f"{self.stack}.{self.project_in}")
            functions.append(hidden_stage(lambda s: project_in(s["hidden"])))
        if self.positions is not None:
            table = getattr(stack, self.positions)
            names.append(f"{self.stack}.{self.positions}")
            functions.append(hidden_stage(lambda s: s["hidden"] + self.embed_positions(
                table, s["attention_mask"], self.position_ids(s["attention_mask"]))))
        for i, layer in enumerate(getattr(stack, self.layers)):
            names.append(f"{self.stack}.{self.layers}.{i}")
            functions.append(hidden_stage(
                lambda s, layer=layer, i=i: hidden_of(layer(s["hidden"], **layer_inputs(s, i)))))
        for part in self.final:
            module = getattr(stack, part)
            if module is not None:
                names.append(f"{self.stack}.{part}")
                functions.append(hidden_stage(lambda s, module=module: module(s["hidden"])))
        if not pooled:
            return StagePlan(names, functions, text_start, lambda s: s["hidden"])
        last = functions[-1]
        functions[-1] = lambda s: {"pooled": last_token(last(s))}
        return StagePlan(names, functions, text_start, lambda s: s["pooled"])


def _layer_mask_functions(stack: nn.Module, n_layers: int) -> list[Callable[..., Any]]:
    """The mask builder of each decoder layer, by the model file's own rule: per-layer
    ``config.layer_types`` (Qwen2, Gemma 2/3: full or sliding-window attention), else the
    sliding window for every layer when ``config.sliding_window`` is set (Mistral), else the
    plain causal mask. A sliding window matters only for texts longer than the window, which
    the plan's check on a short sample would not catch."""
    full = library_function(stack, "create_causal_mask")
    config = stack.config
    names = {"full_attention": "create_causal_mask",
             "sliding_attention": "create_sliding_window_causal_mask"}
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return [library_function(stack, names.get(kind, "create_causal_mask"))
                for kind in layer_types[:n_layers]]
    if getattr(config, "sliding_window", None) is not None and getattr(
            sys.modules[type(stack).__module__], "create_sliding_window_causal_mask", None):
        return [library_function(stack, "create_sliding_window_causal_mask")] * n_layers
    return [full] * n_layers


#: The layouts of the built-in decoders (their entries: :mod:`zest.architectures.decoders`).
LLAMA_LAYOUT = DecoderLayout(stack="model", embed="embed_tokens", layers="layers",
                             final=("norm",), rotary=True)
GPT2_LAYOUT = DecoderLayout(stack="transformer", embed="wte", positions="wpe", layers="h",
                            final=("ln_f",))
OPT_LAYOUT = DecoderLayout(stack="model.decoder", embed="embed_tokens",
                           project_in="project_in", positions="embed_positions",
                           layers="layers", final=("final_layer_norm", "project_out"),
                           position_ids=_real_token_positions,
                           embed_positions=_opt_positions)
GPT_NEOX_LAYOUT = DecoderLayout(stack="gpt_neox", embed="embed_in", layers="layers",
                                final=("final_layer_norm",), rotary=True)
# Falcon's forward materialises its causal mask (to add ALiBi to it) and passes alibi
FALCON_LAYOUT = DecoderLayout(stack="transformer", embed="word_embeddings", layers="h",
                              final=("ln_f",), rotary=True, layer_options={"alibi": None},
                              mask_options={"allow_is_causal_skip": False})
PHI_LAYOUT = DecoderLayout(stack="model", embed="embed_tokens", layers="layers",
                           final=("final_layernorm",), rotary=True)


def falcon_plan(model: nn.Module, task: Task) -> StagePlan | None:
    """Falcon with rotary positions; a Falcon with ALiBi (``config.alibi``: falcon-rw) has no
    plan, since its forward folds the ALiBi bias into the mask inside the model."""
    if getattr(model.transformer, "use_alibi", False):
        return None
    return FALCON_LAYOUT.stage_plan(model, task)

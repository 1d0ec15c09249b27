"""Stage plans: a model's forward cut at block boundaries, for the frozen-prefix cache.

The ground-truth collector fine-tunes one layer at a time with everything before the layer's
block frozen, so the output of that frozen prefix can be computed once per example and reused
(ZEST ground truth, ARCHITECTURE.md §5). A :class:`StagePlan` knows, for one architecture
family, how to run the forward stage by stage: ``state = plan.start(inputs)``,
``state = plan.run(state, i, j)``, ``features = plan.features(state)`` (the head input).
States are dicts of tensors whose first dimension is the example, so they can be cached,
sliced and concatenated.

Plans exist for timm EfficientNet/MobileNet-style CNNs, timm ResNets, timm ViTs, Hugging Face
BERT-style encoders (BERT, RoBERTa, XLM-R) and LLaMA-style decoders; every plan is checked
against the model's own forward on a sample batch before use (:func:`stage_plan`), and other
architectures fall back to the uncached loop.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from zest.models import Batch, Task, preserved_training_state

State = dict[str, torch.Tensor]
StageFunction = Callable[[State], State]


@dataclass
class StagePlan:
    """A forward pass cut into consecutive stages; ``names[i]`` is the block run by stage i."""

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


def _image_state(x: torch.Tensor) -> State:
    return {"x": x}


def _timm_efficientnet_plan(model: nn.Module) -> StagePlan:
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


def _timm_resnet_plan(model: nn.Module) -> StagePlan:
    names = ["conv1"]
    functions: list[StageFunction] = [
        lambda s: {"x": model.maxpool(model.act1(model.bn1(model.conv1(s["x"]))))}]
    for k in range(1, 5):
        for j, block in enumerate(getattr(model, f"layer{k}")):
            names.append(f"layer{k}.{j}")
            functions.append(lambda s, b=block: {"x": b(s["x"])})
    return StagePlan(names, functions, _image_state,
                     lambda s: model.forward_head(s["x"], pre_logits=True))


def _timm_vit_plan(model: nn.Module) -> StagePlan:
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


def _encoder_plan(model: nn.Module) -> StagePlan:
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


def _decoder_plan(model: nn.Module, pooled: bool = True) -> StagePlan:
    """LLaMA-style decoders (``model.model`` with ``embed_tokens``, ``layers``, ``norm`` and
    ``rotary_emb``), cut at every decoder layer: with a ``score`` head on the last non-padding
    token (``pooled``), or with the LM head on every token (the causal-LM task). Each stage
    rebuilds the causal mask and the rotary embeddings from the state's attention mask, through
    the model's own functions."""
    import sys

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


def _candidate_plan(model: nn.Module, task: Task) -> StagePlan | None:
    encoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if task.family == "bert" and all(hasattr(encoder, a) for a in (
            "embeddings", "encoder", "_create_attention_masks")):
        return _encoder_plan(model)
    base = getattr(model, "model", None)
    head = "lm_head" if task.kind == "causal_lm" else "score"
    if task.family == "llama" and task.head_name == head and all(
            hasattr(base, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return _decoder_plan(model, pooled=task.kind != "causal_lm")
    if task.modality != "image":
        return None
    if all(hasattr(model, a) for a in ("conv_stem", "bn1", "blocks", "conv_head", "bn2")):
        return _timm_efficientnet_plan(model)
    if all(hasattr(model, a) for a in ("conv1", "bn1", "act1", "maxpool", "layer1", "layer4")):
        return _timm_resnet_plan(model)
    if all(hasattr(model, a) for a in ("patch_embed", "_pos_embed", "blocks", "norm")):
        return _timm_vit_plan(model)
    return None


def stage_plan(model: nn.Module, task: Task, sample: Batch) -> StagePlan | None:
    """The stage plan of ``model``, verified on ``sample`` against the model's own forward
    (``None`` when the family has no plan or the plan does not reproduce the logits)."""
    plan = _candidate_plan(model, task)
    if plan is None:
        return None
    try:
        with preserved_training_state(model), torch.no_grad():
            model.eval()
            expected = task.forward(model, sample).logits
            inputs = task.model_inputs(sample, next(model.parameters()).device)
            got = task.head(model)(plan.features(plan.run(plan.start(inputs), 0)))
        ok = got.shape == expected.shape and torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    except (AttributeError, TypeError, RuntimeError, IndexError):
        ok = False
    return plan if ok else None


TOKEN_KEYS = ("input_ids", "attention_mask", "hidden", "token_type_ids")


def slice_state(state: State, index: torch.Tensor) -> State:
    """The examples ``index`` of a state, trailing padding trimmed (see :func:`trim_padding`)."""
    return trim_padding({k: v[index] for k, v in state.items()})


def trim_padding(state: dict[str, Any]) -> dict[str, Any]:
    """Drops the token columns after the longest sequence of a (right-padded) text batch.

    Padding positions are masked out of attention, so the outputs at real tokens do not change
    (up to float rounding); a batch of short sentences then costs what its longest one costs.
    """
    mask = state.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2:
        return state
    length = int(mask.sum(dim=1).max())
    width = mask.shape[1]
    if length >= width or length == 0:
        return state
    return {k: v[:, :length] if k in TOKEN_KEYS and v.ndim >= 2 and v.shape[1] == width else v
            for k, v in state.items()}


def concat_states(states: list[State]) -> State:
    """Concatenates states along the example dimension."""
    return {k: torch.cat([s[k] for s in states]) for k in states[0]}

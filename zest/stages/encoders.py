"""The stage plans of the transformers encoders (ARCHITECTURE.md §5): BERT-style, DistilBERT,
ALBERT, MPNet and DeBERTa-v2, cut at every encoder layer. Their entries are in
:mod:`zest.architectures.encoders`."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from zest.stages.plan import StageFunction, StagePlan, State
from zest.stages.text import hidden_of, hidden_stage, library_function, text_start

if TYPE_CHECKING:
    from zest.models.task import Task


def _bidirectional_mask(base: nn.Module) -> Callable[[State], Any]:
    """The attention mask an encoder's layers get, built from the state's padding mask by the
    model file's own ``create_bidirectional_mask``, as its forward does."""
    create = library_function(base, "create_bidirectional_mask")
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
        return StagePlan(names, functions, text_start, lambda s: s["hidden"])
    name, pool = pooler
    dropout = getattr(model, "dropout", nn.Identity())
    return StagePlan(names + [name], functions + [lambda s: {"pooled": pool(s["hidden"])}],
                     text_start, lambda s: dropout(s["pooled"]))


def bert_plan(model: nn.Module, task: Task) -> StagePlan:
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
    functions = [hidden_stage(lambda s: base.embeddings(input_ids=s["input_ids"]))]
    project = getattr(base, "embeddings_project", None)  # ELECTRA: embedding size -> hidden
    if project is not None:
        names.append(f"{prefix}.embeddings_project")
        functions.append(hidden_stage(lambda s: project(s["hidden"])))
    for i, layer in enumerate(base.encoder.layer):
        names.append(f"{prefix}.encoder.layer.{i}")
        functions.append(hidden_stage(
            lambda s, layer=layer: hidden_of(layer(s["hidden"], mask4d(s)))))
    pooler = getattr(base, "pooler", None)
    return _encoder_plan(names, functions, model,
                         (f"{prefix}.pooler", pooler) if pooler is not None else None)


def distilbert_plan(model: nn.Module, task: Task) -> StagePlan | None:
    """DistilBERT: ``<base>.embeddings``, ``<base>.transformer.layer.i``, then the classifier's
    own pooling, ``relu(pre_classifier(h[:, 0]))`` (its stage is ``pre_classifier``)."""
    pre_classifier = getattr(model, "pre_classifier", None)
    if pre_classifier is None:
        return None
    prefix = model.base_model_prefix
    base = getattr(model, prefix)
    mask = _bidirectional_mask(base)
    names = [f"{prefix}.embeddings"]
    functions = [hidden_stage(lambda s: base.embeddings(s["input_ids"]))]
    for i, layer in enumerate(base.transformer.layer):
        names.append(f"{prefix}.transformer.layer.{i}")
        functions.append(hidden_stage(
            lambda s, layer=layer: hidden_of(layer(s["hidden"], mask(s)))))
    return _encoder_plan(names, functions, model,
                         ("pre_classifier", lambda h: torch.relu(pre_classifier(h[:, 0]))))


def albert_plan(model: nn.Module, task: Task) -> StagePlan:
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
    functions = [hidden_stage(lambda s: base.embeddings(input_ids=s["input_ids"])),
                 hidden_stage(lambda s: encoder.embedding_hidden_mapping_in(s["hidden"]))]
    layers, groups = encoder.config.num_hidden_layers, encoder.config.num_hidden_groups
    group_of_pass = [int(i / (layers / groups)) for i in range(layers)]  # as the encoder does
    for g, group in enumerate(encoder.albert_layer_groups):

        def run_group(s: State, group: nn.Module = group, passes: int = group_of_pass.count(g)
                      ) -> torch.Tensor:
            hidden, mask4d = s["hidden"], mask(s)
            for _ in range(passes):
                hidden = hidden_of(group(hidden, mask4d))
            return hidden

        names.append(f"{prefix}.encoder.albert_layer_groups.{g}")
        functions.append(hidden_stage(run_group))
    pooler = base.pooler
    return _encoder_plan(names, functions, model, None if pooler is None else (
        f"{prefix}.pooler", lambda h: base.pooler_activation(pooler(h[:, 0]))))


def mpnet_plan(model: nn.Module, task: Task) -> StagePlan:
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
        hidden_stage(lambda s: base.embeddings(input_ids=s["input_ids"])), lambda s: s]
    for i, layer in enumerate(encoder.layer):
        names.append(f"{prefix}.encoder.layer.{i}")
        functions.append(hidden_stage(lambda s, layer=layer: hidden_of(layer(
            s["hidden"], mask(s), encoder.compute_position_bias(s["hidden"])))))
    pooler = getattr(base, "pooler", None)
    return _encoder_plan(names, functions, model,
                         (f"{prefix}.pooler", pooler) if pooler is not None else None)


def deberta_plan(model: nn.Module, task: Task) -> StagePlan | None:
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
        return hidden_of(layer(hidden, encoder.get_attention_mask(s["attention_mask"]),
                             relative_pos=encoder.get_rel_pos(hidden),
                             rel_embeddings=encoder.get_rel_embedding()))

    names = [f"{prefix}.embeddings"]
    functions: list[StageFunction] = [hidden_stage(lambda s: base.embeddings(
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
            functions.append(hidden_stage(
                lambda s: encoder.conv(s["embedded"], s["hidden"], s["attention_mask"])))
        else:
            functions.append(hidden_stage(lambda s, layer=layer: run_layer(s, layer)))
    return _encoder_plan(names, functions, model, ("pooler", pooler))

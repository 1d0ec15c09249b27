"""Candidate-layer discovery and block grouping."""

from __future__ import annotations

import pytest
import torch

from zest.errors import UnknownNameError
from zest.layers import block_of, candidate_layers, group_by_block, select_layers


@pytest.mark.parametrize("name, block", [
    ("bert.encoder.layer.3.attention.self.query", "bert.encoder.layer.3"),
    ("blocks.2.1.conv_pw", "blocks.2.1"),
    ("model.layers.0.mlp.gate_proj", "model.layers.0"),
    ("bert.embeddings.word_embeddings", "bert.embeddings"),
    ("conv_stem", "conv_stem"),
    ("layer1.0.conv1", "layer1.0"),
])
def test_block_of(name, block):
    assert block_of(name) == block


def test_candidates_exclude_head_and_norms(tiny):
    _spec, model, task, _batch = tiny
    layers = candidate_layers(model, task.head_name)
    assert all(not layer.name.startswith(task.head_name) for layer in layers)
    for layer in layers:
        module = model.get_submodule(layer.name)
        assert module.weight.ndim >= 2
    depths = [layer.depth for layer in layers]
    assert depths[0] == 0.0 and depths[-1] == 1.0 and depths == sorted(depths)
    assert len({layer.name for layer in layers}) == len(layers)


def test_block_grouping_covers_every_layer(tiny):
    _spec, model, task, _batch = tiny
    layers = candidate_layers(model, task.head_name)
    groups = group_by_block(layers)
    assert sum(len(members) for members in groups.values()) == len(layers)
    assert all(all(m.block == block for m in members) for block, members in groups.items())


def test_modules_that_share_a_weight_are_not_candidates():
    """T5's layout: one token embedding held by three modules; a weight tied to the head alone
    (a causal LM's input embedding) stays a candidate."""
    from torch import nn

    model = nn.Module()
    model.shared = nn.Embedding(10, 4)
    model.encoder = nn.ModuleDict({"embed_tokens": nn.Embedding(10, 4), "fc": nn.Linear(4, 4)})
    model.decoder = nn.ModuleDict({"embed_tokens": nn.Embedding(10, 4)})
    model.encoder.embed_tokens.weight = model.decoder.embed_tokens.weight = model.shared.weight
    model.head = nn.Linear(4, 10)
    assert [layer.name for layer in candidate_layers(model, "head")] == ["encoder.fc"]
    model.head.weight = model.shared.weight = nn.Parameter(torch.zeros(10, 4))
    del model.encoder["embed_tokens"], model.decoder["embed_tokens"]
    assert [layer.name for layer in candidate_layers(model, "head")] == ["shared", "encoder.fc"]


def test_select_layers_by_name_and_block_and_suggestion():
    from zest.models import load_model

    model, task = load_model("tiny_bert", 3)
    layers = candidate_layers(model, task.head_name)
    chosen = select_layers(layers, ["bert.encoder.layer.0"])
    assert chosen and all(layer.block == "bert.encoder.layer.0" for layer in chosen)
    with pytest.raises(UnknownNameError) as info:
        select_layers(layers, ["bert.encoder.layer.0.attention.self.querry"])
    assert "bert.encoder.layer.0.attention.self.query" in str(info.value)


def test_stratified_sample_spreads_over_roles_and_depth():
    from zest.layers import Layer, layer_leaf_name, stratified_layers

    roles = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    place = {r: "self_attn" if r[0] in "qkvo" else "mlp" for r in roles}
    names = ["model.embed_tokens"] + [f"model.layers.{b}.{place[r]}.{r}"
                                      for b in range(30) for r in roles]
    layers = [Layer(n, "Linear", i / (len(names) - 1), 10, n) for i, n in enumerate(names)]
    for n in (1, 8, 24, 70, 211, 500):
        sample = stratified_layers(layers, n)
        assert len(sample) == min(n, len(layers))
        assert [layer.name for layer in sample] == [layer.name for layer in layers
                                                   if layer in sample]  # model order
    sample = stratified_layers(layers, 24)
    assert {layer_leaf_name(layer) for layer in sample} == set(roles) | {"embed_tokens"}
    blocks = {int(layer.name.split(".")[2]) for layer in sample if "layers" in layer.name}
    assert min(blocks) < 5 and max(blocks) > 25 and len(blocks) > 12
    assert stratified_layers(layers, 24) == sample  # deterministic

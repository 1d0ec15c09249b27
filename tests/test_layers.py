"""Candidate-layer discovery and block grouping."""

from __future__ import annotations

import pytest

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


def test_select_layers_by_name_and_block_and_suggestion():
    from zest.models import load_model

    model, task = load_model("tiny_bert", 3)
    layers = candidate_layers(model, task.head_name)
    chosen = select_layers(layers, ["bert.encoder.layer.0"])
    assert chosen and all(layer.block == "bert.encoder.layer.0" for layer in chosen)
    with pytest.raises(UnknownNameError) as info:
        select_layers(layers, ["bert.encoder.layer.0.attention.self.querry"])
    assert "bert.encoder.layer.0.attention.self.query" in str(info.value)

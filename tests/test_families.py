"""The registry of architectures (zest/architectures/, ARCHITECTURE.md §6) and their stage
plans (zest/stages/)."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch import nn

from tests.conftest import batch_for
from tests.test_conformance import _hf_spec
from zest.architectures import (
    ARCHITECTURES,
    GENERIC,
    Architecture,
    ArchitectureFallbackWarning,
    ModuleType,
    architecture_for,
    architecture_named,
    base,
    conv_forward,
    gps_keeps_frozen,
    layer_kind,
    register_architecture,
    timm_head,
    unregister_architecture,
)
from zest.layers import candidate_layers, output_dim, transforms_weight
from zest.models import load_model, model_family
from zest.stages import StagePlan, slice_state, stage_plan, trim_padding

#: A tiny model of every built-in architecture: (spec, task kind); ``hf:`` names a transformers
#: model type built by tests/test_conformance.py. A new architecture adds its tiny model here.
TINY_OF_ARCHITECTURE = {
    "timm_efficientnet": ("tiny_cnn", "classification"),
    "timm_resnet": ("tiny_resnet", "classification"),
    "timm_vit": ("tiny_vit", "classification"),
    "torchvision": ("tv:mobilenet_v3_small", "classification"),
    "bert": ("tiny_bert", "classification"),
    "distilbert": ("hf:distilbert", "classification"),
    "albert": ("hf:albert", "classification"),
    "mpnet": ("hf:mpnet", "classification"),
    "deberta_v2": ("hf:deberta-v2", "classification"),
    "llama": ("tiny_llama", "causal_lm"),
    "gpt2": ("hf:gpt2", "causal_lm"),
    "opt": ("hf:opt", "causal_lm"),
    "gpt_neox": ("hf:gpt_neox", "causal_lm"),
    "falcon": ("hf:falcon", "causal_lm"),
    "phi": ("hf:phi", "causal_lm"),
    "generic": ("timm:test_convnext", "classification"),
}


@pytest.fixture(scope="module")
def hf_root(tmp_path_factory):
    return tmp_path_factory.mktemp("hf")


def _load(spec: str, hf_root, kind: str = "classification"):
    if spec.startswith("hf:"):
        spec = _hf_spec(hf_root, spec[3:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ArchitectureFallbackWarning)
        model, task = load_model(spec, 3, seed=0, image_size=32, kind=kind)
    return spec, model, task


def test_every_architecture_has_a_tiny_model_in_this_test():
    assert set(TINY_OF_ARCHITECTURE) == set(ARCHITECTURES.names())


@pytest.mark.parametrize("name", list(TINY_OF_ARCHITECTURE))
def test_every_architecture_is_recognised_on_a_tiny_model_of_it(name, hf_root):
    spec, kind = TINY_OF_ARCHITECTURE[name]
    spec, model, task = _load(spec, hf_root)
    architecture = ARCHITECTURES.get(name)
    assert task.architecture == name
    assert task.head_name == architecture.head(model, "classification")
    if architecture.pooling is not None:
        assert task.pooling == architecture.pooling
    # its plan, when it has one, reproduces the model's own forward and runs every candidate
    batch = batch_for(task)
    _check_plan(model, task, batch, architecture)
    if kind != "classification":
        _spec, model, task = _load(spec, hf_root, kind=kind)
        batch = batch_for(task)
        batch.pop("labels")
        assert task.architecture == name and task.head_name == architecture.head(model, kind)
        _check_plan(model, task, batch, architecture)


def _check_plan(model: nn.Module, task, batch, architecture: Architecture,
                has_plan: bool | None = None) -> StagePlan | None:
    plan = stage_plan(model, task, batch)
    expected = architecture.stage_plan is not None if has_plan is None else has_plan
    assert (plan is not None) == expected
    if plan is not None:
        layers = candidate_layers(model, task.head_name)
        assert [layer.name for layer in layers if plan.stage_of(layer.name) is None] == []
    return plan


#: transformers layouts beyond the conformance configurations, each changing which modules a
#: plan runs: (model type, configuration changes, architecture, whether it has a plan).
PLAN_VARIANTS = {
    "opt_projections_norm_after": ("opt", dict(word_embed_proj_dim=16,
                                               do_layer_norm_before=False), "opt", True),
    "deberta_relative_conv": ("deberta-v2", dict(relative_attention=True, position_buckets=8,
                                                 norm_rel_ebd="layer_norm", conv_kernel_size=3,
                                                 pos_att_type=["p2c", "c2p"]),
                              "deberta_v2", True),
    "albert_two_groups": ("albert", dict(num_hidden_layers=4, num_hidden_groups=2,
                                         inner_group_num=2), "albert", True),
    "falcon_new_architecture": ("falcon", dict(num_attention_heads=4, num_kv_heads=2,
                                               new_decoder_architecture=True), "falcon", True),
    "falcon_alibi": ("falcon", dict(alibi=True), "falcon", False),
    # sliding-window attention narrower than the batch's texts: every layer (Mistral), or
    # the layers past max_window_layers (Qwen2's layer_types)
    "mistral_sliding_window": ("mistral", dict(sliding_window=3), "llama", True),
    "qwen2_sliding_layers": ("qwen2", dict(use_sliding_window=True, sliding_window=3,
                                           max_window_layers=1), "llama", True),
}


@pytest.mark.parametrize("variant", list(PLAN_VARIANTS))
def test_a_plan_follows_the_layout_of_the_model(variant, tmp_path):
    """The architecture's plan adapts to the modules the configuration builds (or, where it cannot
    follow the forward, there is none), and a prefix run on a padded batch, sliced to its short
    texts and trimmed as the ground-truth cache does, continues to the model's own logits from
    every stage."""
    model_type, changes, name, has_plan = PLAN_VARIANTS[variant]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ArchitectureFallbackWarning)
        model, task = load_model(_hf_spec(tmp_path, model_type, **changes), 3, seed=0)
    assert task.architecture == name
    batch = batch_for(task)
    plan = _check_plan(model, task, batch, ARCHITECTURES.get(name), has_plan)
    if plan is None:
        return
    mask = batch["attention_mask"]
    short = (mask.sum(dim=1) < mask.shape[1]).nonzero().flatten()
    expected = task.forward(model, trim_padding({k: v[short] for k, v in batch.items()})).logits
    inputs = task.model_inputs(batch)
    with torch.no_grad():
        for stop in range(len(plan.names) + 1):
            state = slice_state(plan.run(plan.start(inputs), 0, stop), short)
            got = task.head(model)(plan.features(plan.run(state, stop)))
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


#: torchvision architectures → whether the torchvision architecture has a plan for their layout
TORCHVISION_LAYOUTS = {"mobilenet_v2": True, "mobilenet_v3_small": True, "resnet18": True,
                       "efficientnet_b0": True, "mnasnet0_5": False, "densenet121": False}


@pytest.mark.parametrize("arch", list(TORCHVISION_LAYOUTS))
def test_a_torchvision_plan_continues_to_the_logits_from_every_cut(arch):
    model, task = load_model(f"tv:{arch}", 3, image_size=32, seed=0)
    assert task.architecture == "torchvision"
    batch = batch_for(task)
    plan = _check_plan(model, task, batch, ARCHITECTURES.get("torchvision"),
                       TORCHVISION_LAYOUTS[arch])
    if plan is None:
        return
    expected = task.forward(model, batch).logits
    inputs = task.model_inputs(batch)
    with torch.no_grad():
        for stop in range(len(plan.names) + 1):
            state = plan.run(plan.start(inputs), 0, stop)
            got = task.head(model)(plan.features(plan.run(state, stop)))
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("spec", ["tiny_cnn", "tiny_resnet", "tiny_vit", "tiny_bert",
                                  "tiny_llama"])
def test_an_architecture_lists_the_model_family_of_its_registered_models(spec):
    """The two notions meet here: ``Task.architecture`` names the adapter, whose entry lists the
    spec-level families (``model_family``, what leave-one-family-out holds out) it adapts."""
    _model, task = load_model(spec, 3)
    assert model_family(spec) in architecture_named(task.architecture).model_families


def test_the_generic_adapter_says_once_which_family_it_fell_back_for(monkeypatch):
    monkeypatch.setattr(base, "_fallbacks_noted", set())
    with pytest.warns(ArchitectureFallbackWarning) as caught:
        model, task = load_model("timm:test_convnext", 3, image_size=32)
    message = str(caught[0].message)
    assert len(caught) == 1 and model_family("timm:test_convnext") in message
    assert "timm:test_convnext" in message and type(model).__name__ in message
    with warnings.catch_warnings():
        warnings.simplefilter("error", ArchitectureFallbackWarning)
        load_model("timm:test_convnext", 3, image_size=32)  # said once: no second warning
    assert task.architecture == GENERIC.name and task.head_name == timm_head(model)
    assert stage_plan(model, task, batch_for(task)) is None  # no prefix cache


def test_a_decoder_of_a_known_structure_that_pools_otherwise_is_generic():
    """Pooling is checked against a traced forward, not assumed from the structure."""
    model, _task = load_model("tiny_llama", 3)
    assert architecture_for(model, modality="text", pooling="last") is ARCHITECTURES.get("llama")
    assert architecture_for(model, modality="text", pooling="first") is GENERIC


def _convnext_plan(model: nn.Module, task) -> StagePlan:
    names = ["stem"] + [f"stages.{i}" for i in range(len(model.stages))]
    functions = [lambda s: {"x": model.stem(s["x"])}] + [
        (lambda s, stage=stage: {"x": stage(s["x"])}) for stage in model.stages]
    return StagePlan(names, functions, lambda x: {"x": x},
                     lambda s: model.forward_head(model.norm_pre(s["x"]), pre_logits=True))


@pytest.fixture
def toy_architecture():
    architecture = Architecture(
        name="toy_convnext", modality="image",
        recognise=lambda m: all(hasattr(m, a) for a in ("stem", "stages", "norm_pre", "head")),
        head=timm_head, stage_plan=_convnext_plan, model_families=("test",),
        frozen_name_parts=("toy_frozen",), module_types={"ToyMixer": ModuleType("conv")})
    yield architecture
    if architecture.name in ARCHITECTURES:
        unregister_architecture(architecture.name)


def test_a_new_architecture_is_one_register_call_that_loading_and_the_plan_lookup_use(
        toy_architecture):
    before = load_model("timm:test_convnext", 3, image_size=32)[1]
    assert before.architecture == "generic"
    register_architecture(toy_architecture)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ArchitectureFallbackWarning)  # no fallback any more
        model, task = load_model("timm:test_convnext", 3, image_size=32)
    assert task.architecture == "toy_convnext"
    plan = stage_plan(model, task, batch_for(task))
    assert plan is not None and plan.names[0] == "stem"
    layers = candidate_layers(model, task.head_name)
    assert all(plan.stage_of(layer.name) is not None for layer in layers)
    assert gps_keeps_frozen("stages.0.toy_frozen") and layer_kind("ToyMixer") == "conv"
    unregister_architecture("toy_convnext")
    assert not gps_keeps_frozen("stages.0.toy_frozen") and layer_kind("ToyMixer") == "other"
    assert architecture_for(model, modality="image") is GENERIC


def test_a_plan_that_does_not_reproduce_the_forward_is_not_used(toy_architecture):
    def wrong(model, task):
        plan = _convnext_plan(model, task)
        plan.functions = plan.functions[:-1]  # skips the last stage
        return plan

    register_architecture(dataclasses.replace(toy_architecture, stage_plan=wrong))
    model, task = load_model("timm:test_convnext", 3, image_size=32)
    assert task.architecture == "toy_convnext" and stage_plan(model, task, batch_for(task)) is None


def test_a_module_type_is_declared_once():
    with pytest.raises(ValueError, match="Conv1D"):
        register_architecture(Architecture(name="clash", modality="text", recognise=lambda m: False,
                               head=timm_head,
                               module_types={"Conv1D": ModuleType("linear", output_dim=0)}))
    assert "clash" not in ARCHITECTURES
    with pytest.raises(ValueError, match="built-in"):
        unregister_architecture("bert")


def test_module_type_facts():
    from timm.layers import Conv2dSame, StdConv2d
    from transformers.pytorch_utils import Conv1D

    # the layer kinds of every module type in the corpus records stay what the predictor saw
    assert {t: layer_kind(t) for t in ("Linear", "Conv2d", "Conv2dSame", "Embedding")} == {
        "Linear": "linear", "Conv2d": "conv", "Conv2dSame": "conv", "Embedding": "embedding"}
    assert layer_kind("Conv1D") == "linear" and layer_kind("Conv1d") == "conv"
    assert layer_kind("FalconLinear") == "linear" and layer_kind("LayerNorm") == "other"
    gpt2_conv = Conv1D(4, 3)
    assert output_dim(gpt2_conv) == 1 and output_dim(nn.Linear(3, 4)) == 0
    same, plain, std = Conv2dSame(3, 4, 3), nn.Conv2d(3, 4, 3), StdConv2d(3, 4, 3)
    assert conv_forward(same) == "dynamic_same" and conv_forward(plain) == "plain"
    assert conv_forward(std) is None and transforms_weight(std) and not transforms_weight(plain)
    # a parametrized layer keeps its class's facts (GPS parametrizes the layers it tunes)
    torch.nn.utils.parametrize.register_parametrization(gpt2_conv, "weight", nn.Identity())
    assert output_dim(gpt2_conv) == 1


def test_gps_keeps_the_frozen_parts_of_every_architecture():
    assert gps_keeps_frozen("bert.embeddings.position_embeddings")
    assert gps_keeps_frozen("pos_embed") and gps_keeps_frozen("blocks.0.norm1")
    assert not gps_keeps_frozen("bert.encoder.layer.0.attention.self.query")

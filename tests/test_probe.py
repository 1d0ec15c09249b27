"""The probe: one forward + one backward pass, and the model left exactly as it was."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import image_batch
from zest.errors import InvalidInputError, NonFiniteLossError
from zest.metrics import compute_metrics, metric_names, needs_of
from zest.models import load_model
from zest.probe import probe
from zest.probe.recorder import Recorder

ALL_NEEDS = needs_of(metric_names())


def snapshot(model):
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "dtypes": {n: p.dtype for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "grads": {n: None if p.grad is None else p.grad.clone()
                  for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks)
                     + len(m._backward_hooks) for m in model.modules()),
    }


def assert_same(before, after):
    for key in ("params", "buffers"):
        for name, value in before[key].items():
            assert torch.equal(value, after[key][name]), f"{key} {name} changed"
    assert before["dtypes"] == after["dtypes"]
    for name, grad in before["grads"].items():
        other = after["grads"][name]
        assert (grad is None and other is None) or torch.equal(grad, other), name
    assert before["requires_grad"] == after["requires_grad"]
    assert before["training"] == after["training"]
    assert before["hooks"] == after["hooks"]


def _perturb_state(model):
    """A model state that a careless probe would change: mixed flags, existing grads."""
    model.train()
    params = list(model.parameters())
    params[0].requires_grad_(False)
    params[-1].grad = torch.full_like(params[-1], 0.5)
    modules = list(model.modules())
    modules[1].eval()


def test_probe_leaves_model_exactly_as_it_was(tiny):
    _spec, model, task, batch = tiny
    _perturb_state(model)
    before = snapshot(model)
    result = probe(model, task, batch, needs=ALL_NEEDS)
    values = compute_metrics(result.contexts, metric_names())
    assert values
    assert_same(before, snapshot(model))
    assert result.passes == ["forward", "backward", "hvp", "synflow"]


def test_model_restored_when_a_hook_raises(monkeypatch):
    model, task = load_model("tiny_cnn", 3)
    _perturb_state(model)
    before = snapshot(model)

    def boom(*_args, **_kwargs):
        raise RuntimeError("metric summary failed")

    monkeypatch.setattr(Recorder, "_summarise_forward", boom)
    with pytest.raises(RuntimeError, match="metric summary failed"):
        probe(model, task, image_batch(), needs=ALL_NEEDS)
    assert_same(before, snapshot(model))


def test_model_restored_when_synflow_pass_raises(monkeypatch):
    model, task = load_model("tiny_cnn", 3)
    before = snapshot(model)
    import zest.probe.passes as probe_module

    original = probe_module.synflow_gradients

    def failing(*args, **kwargs):
        original(*args, **kwargs)  # leaves the model in its float64 |θ| state
        raise RuntimeError("synflow failed")

    monkeypatch.setattr(probe_module, "synflow_gradients", failing)
    with pytest.raises(RuntimeError, match="synflow failed"):
        probe(model, task, image_batch(), needs=ALL_NEEDS)
    assert_same(before, snapshot(model))


def test_synflow_is_nan_for_a_model_that_refuses_the_all_ones_input():
    """T5's classifier raises ValueError on a text without end-of-text tokens; here a tiny CNN
    refuses an all-ones image the same way: SynFlow is NaN, the other metrics are not, and
    the model is left as it was."""
    model, task = load_model("tiny_cnn", 3)

    def refuse_all_ones(_module, args):
        if bool((args[0] == 1).all()):
            raise ValueError("no end-of-text token")

    model.register_forward_pre_hook(refuse_all_ones)
    before = snapshot(model)
    result = probe(model, task, image_batch(), needs=ALL_NEEDS)
    assert_same(before, snapshot(model))
    assert result.passes == ["forward", "backward", "hvp"]
    values = compute_metrics(result.contexts, metric_names())
    assert all(math.isnan(v["synflow"]) and math.isfinite(v["snip"]) for v in values.values())


def test_model_restored_when_loss_is_not_finite():
    model, task = load_model("tiny_cnn", 3)
    before = snapshot(model)
    x, y = image_batch()
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="batch 7"):
        probe(model, task, (x, y), needs=ALL_NEEDS, batch_label="batch 7")
    assert_same(before, snapshot(model))


def test_model_intact_when_a_metric_raises_during_collection(monkeypatch):
    from zest.frames import metrics_frame
    from zest.metrics import METRICS, MetricInfo

    model, task = load_model("tiny_cnn", 3)
    _perturb_state(model)
    before = snapshot(model)

    def bad(_ctx):
        raise ValueError("bad metric")

    monkeypatch.setitem(METRICS._items, "snip",
                        MetricInfo("snip", "backward", frozenset({"grad", "weight"}), 1, bad))
    with pytest.raises(ValueError, match="bad metric"):
        metrics_frame(model, task, [image_batch()], metrics=metric_names())
    assert_same(before, snapshot(model))


def test_supcon_needs_two_examples():
    model, task = load_model("tiny_cnn", 3)
    x, y = image_batch(1)
    with pytest.raises(InvalidInputError, match="batch_size"):
        probe(model, task, (x, y), needs={"grad"})
    result = probe(model, task, image_batch(2), needs={"grad"}, loss="ce")
    assert result.contexts


def test_only_needed_passes_run():
    model, task = load_model("tiny_cnn", 3)
    result = probe(model, task, image_batch(), needs={"activations"})
    assert result.passes == ["forward"]
    result = probe(model, task, image_batch(), needs={"grad"})
    assert result.passes == ["forward", "backward"]


@pytest.mark.parametrize("spec", ["tiny_cnn", "tiny_bert", "timm:tf_efficientnet_lite0"])
def test_direct_half_batch_gradients_match_recomputing_the_layer(monkeypatch, spec):
    """Linear/Conv2d (incl. timm's Conv2dSame) half-batch gradients computed directly equal
    those of re-running each layer on the first half and back-propagating through it."""
    import zest.probe.gradients as probe_module
    from tests.conftest import batch_for

    model, task = load_model(spec, 3)
    batch = batch_for(task)
    direct = probe(model, task, batch, needs={"grad", "grad_halves"})
    monkeypatch.setattr(probe_module, "supports_direct_gradient", lambda module: False)
    recomputed = probe(model, task, batch, needs={"grad", "grad_halves"})
    checked = 0
    for name, ctx in direct.contexts.items():
        other = recomputed.contexts[name].grad_halves
        if ctx.grad_halves is None:
            assert other is None
            continue
        torch.testing.assert_close(ctx.grad_halves[0], other[0], atol=1e-6, rtol=1e-4)
        checked += 1
    assert checked >= 3


def test_synflow_retries_in_float64_when_float32_overflows():
    model, task = load_model("tiny_cnn", 3)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.mul_(300.0)  # data forward stays finite, SynFlow does not
    before = snapshot(model)
    result = probe(model, task, image_batch(), needs={"synflow"})
    values = compute_metrics(result.contexts, ["synflow"])
    assert all(math.isfinite(v["synflow"]) for v in values.values())
    assert max(v["synflow"] for v in values.values()) > 3.4e38  # beyond float32's range
    assert_same(before, snapshot(model))


class _SharedBlockNet(torch.nn.Module):
    """A tiny CNN whose middle convolution is applied twice (weights shared across calls)."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.shared = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.mix = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, classes)

    def forward_features(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.shared(x))
        x = torch.relu(self.shared(x))
        return self.mix(x.mean(dim=(2, 3)))

    def forward(self, x):
        return self.head(self.forward_features(x))


@pytest.mark.parametrize("spec", ["tiny_cnn", "tiny_bert", "timm:tf_efficientnet_lite0",
                                  "shared"])
@pytest.mark.parametrize("split", [False, True])
def test_gradients_formed_by_the_probe_equal_autograd(spec, split):
    """Linear/Conv2d weight gradients the probe forms itself from inputs and output gradients
    (per half batch) equal autograd's ∇W of the same loss, also for a module called twice and
    for a subset of the layers."""
    from tests.conftest import batch_for
    from zest.models import Task

    if spec == "shared":
        model = _SharedBlockNet()
        task = Task(spec="shared", modality="image", num_classes=3, head_name="head",
                    architecture="custom")
    else:
        model, task = load_model(spec, 3)
    batch = batch_for(task)
    model.eval()
    needs = {"grad", "grad_halves"} if split else {"grad"}
    result = probe(model, task, batch, needs=needs)
    names = list(result.contexts)
    for subset in (names, names[len(names) // 2:]):
        result = probe(model, task, batch, needs=needs, layer_names=subset)
        weights = [model.get_submodule(name).weight for name in subset]
        for w in model.parameters():
            w.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        output = task.forward(model, batch)
        expected = torch.autograd.grad(task.loss(output, "supcon"), weights, allow_unused=True)
        for w in model.parameters():
            w.requires_grad_(True)
        for name, grad in zip(subset, expected, strict=True):
            ctx = result.contexts[name]
            grad = torch.zeros_like(ctx.weight) if grad is None else grad
            torch.testing.assert_close(ctx.grad, grad, atol=1e-6, rtol=1e-4, msg=name)
            if split and ctx.grad_halves is not None:
                torch.testing.assert_close(ctx.grad_halves[0] + ctx.grad_halves[1], grad,
                                           atol=1e-6, rtol=1e-4, msg=name)


def test_gradients_when_the_probe_forms_every_layers_gradient():
    """An input that requires grad makes every Linear/Conv2d layer one whose ∇W the probe forms
    itself; the backward pass then targets their outputs' graph edges, and ∇W still equals
    autograd's."""
    model, task = load_model("tiny_cnn", 3)
    model.eval()
    x, y = image_batch()
    x.requires_grad_(True)
    result = probe(model, task, (x, y), needs={"grad", "grad_halves"}, loss="ce")
    weights = [model.get_submodule(name).weight for name in result.contexts]
    expected = torch.autograd.grad(task.loss(task.forward(model, (x, y)), "ce"), weights)
    for name, grad in zip(result.contexts, expected, strict=True):
        torch.testing.assert_close(result.contexts[name].grad, grad, atol=1e-6, rtol=1e-4,
                                   msg=name)


class _OtherLinear(torch.nn.Linear):
    """A Linear the probe does not recognise as one (``type(m) is nn.Linear`` is false)."""


def test_per_example_fisher_of_other_modules_matches_the_closed_form():
    """``fim_score`` of a layer that takes the per-example autograd loop (here a Linear subclass,
    its bias frozen by the probe like every bias) equals the Gram-identity value of the same
    layer as a plain Linear."""
    from tests.conftest import batch_for

    model, task = load_model("tiny_bert", 3)
    batch = batch_for(task)
    closed = compute_metrics(probe(model, task, batch, needs={"per_example_fisher"},
                                   loss="ce").contexts, ["fim_score"])
    name = "bert.encoder.layer.0.intermediate.dense"
    model.get_submodule(name).__class__ = _OtherLinear
    before = snapshot(model)
    looped = compute_metrics(probe(model, task, batch, needs={"per_example_fisher"},
                                   loss="ce").contexts, ["fim_score"])
    assert_same(before, snapshot(model))
    assert looped[name]["fim_score"] > 0
    for layer, values in closed.items():
        assert looped[layer]["fim_score"] == pytest.approx(values["fim_score"], rel=1e-9,
                                                           nan_ok=True), layer


@pytest.mark.parametrize("spec", ["tiny_llama", "tiny_cnn"])
def test_backward_pass_releases_what_each_layer_needed(monkeypatch, spec):
    """Once a layer's output gradient has arrived, the probe holds neither its output nor, for
    a layer whose ∇W it forms itself, its input or output gradient: the backward pass frees
    memory as a plain one does (issue 17)."""
    from tests.conftest import batch_for

    model, task = load_model(spec, 3)
    held = []
    make_hook = Recorder._grad_hook

    def spying_hook(self, name, module, per_example):
        hook = make_hook(self, name, module, per_example)

        def spy(grad):
            hook(grad)
            held.append((name, name in self.direct, name in self.outputs,
                         name in self.inputs or name in self.output_grads))
        return spy

    monkeypatch.setattr(Recorder, "_grad_hook", spying_hook)
    probe(model, task, batch_for(task), needs=ALL_NEEDS, loss="ce")
    assert sum(direct for _, direct, _, _ in held) >= 3
    for name, direct, output_held, input_or_delta_held in held:
        assert not output_held, name
        assert not (direct and input_or_delta_held), name


@pytest.mark.parametrize("shape", [(6, 5, 7), (6, 5, 3, 4)])
def test_binary_code_kernel_leaves_padding_out(shape):
    """NASWOT's kernel with padding: K_ij = Σ over positions valid in both of c_i c_j +
    (1 − c_i)(1 − c_j), against the explicit masked formula."""
    from zest.probe.recorder import _binary_code_kernel, _positive_codes

    generator = torch.Generator().manual_seed(0)
    out = torch.randn(shape, generator=generator)
    lengths = torch.tensor([5, 3, 1, 5, 2, 4])
    mask = torch.arange(shape[1])[None, :] < lengths[:, None]
    kernel = _binary_code_kernel(_positive_codes(out, mask), mask)
    valid = mask.view(mask.shape + (1,) * (len(shape) - 2)).expand(shape).reshape(shape[0], -1)
    codes = (out > 0).reshape(shape[0], -1).double()
    v = valid.double()
    expected = (codes * v) @ (codes * v).T + ((1 - codes) * v) @ ((1 - codes) * v).T
    torch.testing.assert_close(kernel, expected, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(6, 5, 7), (6, 5, 3, 4)])
def test_masked_activation_stats_and_feature_rows_match_the_valid_positions(shape):
    """With a token mask, activation statistics and feature rows are those of the valid
    positions copied out (mean and std to float32 rounding; the same drawn rows)."""
    from zest.probe.recorder import (
        MAX_FEATURE_ROWS,
        _activation_stats,
        _feature_rows,
        _positive_codes,
    )

    generator = torch.Generator().manual_seed(0)
    out = torch.randn(shape, generator=generator) + 0.3
    lengths = torch.tensor([5, 3, 1, 5, 2, 4])
    mask = torch.arange(shape[1])[None, :] < lengths[:, None]
    stats = _activation_stats(out, _positive_codes(out, mask), mask)
    valid = out[mask].double()
    assert stats["mean"] == pytest.approx(float(valid.mean()), rel=1e-6)
    assert stats["std"] == pytest.approx(float(valid.std()), rel=1e-6)
    assert stats["sparsity"] == pytest.approx(float((valid <= 0).double().mean()), abs=1e-15)
    unmasked = _activation_stats(out, _positive_codes(out, None))
    assert unmasked["mean"] == pytest.approx(float(out.double().mean()), rel=1e-6)
    assert unmasked["sparsity"] == pytest.approx(float((out <= 0).double().mean()), abs=1e-15)

    torch.testing.assert_close(_feature_rows(out, mask, -1, torch.Generator()), out[mask])
    big = torch.randn(4, 3, 20, 20, generator=generator)  # 1600 rows > MAX_FEATURE_ROWS
    expected = big.movedim(1, -1).reshape(-1, 3)
    pick = torch.randperm(expected.shape[0], generator=torch.Generator().manual_seed(1))
    drawn = _feature_rows(big, None, 1, torch.Generator().manual_seed(1))
    torch.testing.assert_close(drawn, expected[pick[:MAX_FEATURE_ROWS]], rtol=0, atol=0)
    tokens = torch.randn(6, 100, 5, generator=generator)
    long_mask = torch.arange(100)[None, :] < torch.tensor([100, 90, 80, 70, 60, 50])[:, None]
    pick = torch.randperm(int(long_mask.sum()), generator=torch.Generator().manual_seed(2))
    drawn = _feature_rows(tokens, long_mask, -1, torch.Generator().manual_seed(2))
    torch.testing.assert_close(drawn, tokens[long_mask][pick[:MAX_FEATURE_ROWS]], rtol=0, atol=0)

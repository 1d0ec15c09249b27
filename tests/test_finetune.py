"""Fine-tuners: GPS, SPSFT and baselines; deltas; bad input."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn.utils import parametrize

from zest.errors import InvalidInputError, NonFiniteLossError, UnknownNameError
from zest.finetune import GPS, METHODS, SPSFT, Delta, LoRA, apply_delta
from zest.layers import candidate_layers
from zest.loading import DataOptions, load_pair
from zest.models import load_model

IMAGE = ("tiny_cnn", "digits", DataOptions(image_size=16, max_train=64, max_val=32,
                                           max_test=32))
TEXT = ("tiny_bert", "rotten_tomatoes", DataOptions(max_length=24, max_train=64, max_val=32,
                                                    max_test=32))


def pair(case):
    model, task, data = load_pair(case[0], case[1], options=case[2])
    names = [layer.name for layer in candidate_layers(model, task.head_name)]
    if task.modality == "text":
        names = [n for n in names if "encoder" in n]
    return model, task, data, names[-3:]


def outputs(model, task, data):
    batch = data.batches("val", 16, 1)[0]
    with torch.no_grad():
        return task.forward(model, batch).logits


@pytest.mark.parametrize("case", [IMAGE, TEXT], ids=["image", "text"])
@pytest.mark.parametrize("method", ["gps", "spsft", "lora", "layers", "full", "head", "bitfit"])
def test_delta_reproduces_the_tuned_model(tmp_path, case, method):
    model, task, data, layers = pair(case)
    kwargs = {} if method in ("full", "head", "bitfit") else {"layers": layers}
    tuner = METHODS.get(method)(model, task, lr=1e-2, **kwargs).fit(data, epochs=1,
                                                                  batch_size=16)
    path = tuner.delta().save(tmp_path / "delta.safetensors")
    fresh, fresh_task = load_model(case[0], task.num_classes)
    assert not torch.allclose(outputs(fresh, fresh_task, data), outputs(model, task, data))
    apply_delta(fresh, path, model_spec=case[0])
    torch.testing.assert_close(outputs(fresh, fresh_task, data), outputs(model, task, data),
                               atol=1e-5, rtol=1e-5)


def test_gps_sparse_keeps_no_dense_gradient_or_optimizer_state():
    model, task, data, layers = pair(IMAGE)
    tuner = GPS(model, task, layers=layers, k=2).fit(data, epochs=1, batch_size=16)
    for name in layers:
        module = model.get_submodule(name)
        assert parametrize.is_parametrized(module, "weight")
        original = module.parametrizations.weight.original
        assert not original.requires_grad and original.grad is None
        values = module.parametrizations.weight[0].values
        assert values.shape == (original.shape[0], 2)
    trained = {id(p) for p in tuner.trainable_parameters()}
    assert all(id(model.get_submodule(n).parametrizations.weight.original) not in trained
               for n in layers)
    head = sum(p.numel() for p in task.head(model).parameters())
    biases = sum(model.get_submodule(n).bias.numel() for n in layers
                 if model.get_submodule(n).bias is not None)
    entries = sum(model.get_submodule(n).parametrizations.weight.original.shape[0] * 2
                  for n in layers)
    assert tuner.trainable_params_ == entries + biases + head


def test_gps_selects_top_k_gradient_per_neuron():
    model, task, data, layers = pair(IMAGE)
    tuner = GPS(model, task, layers=layers, k=3, selection_batches=2)
    tuner.device_ = torch.device("cpu")
    scores = tuner.importance(tuner.selection_batches_of(data, 16))
    tuner.fit(data, epochs=1, batch_size=16)
    for name in layers:
        flat = scores[name].reshape(scores[name].shape[0], -1)
        expected = flat.topk(3, dim=1).indices.sort(dim=1).values
        assert torch.equal(tuner.indices_[name], expected)


def test_gps_dense_mask_matches_sparse_selection_and_updates_only_selected():
    model, task, data, layers = pair(IMAGE)
    before = {n: model.get_submodule(n).weight.detach().clone() for n in layers}
    tuner = GPS(model, task, layers=layers, k=1, implementation="dense_mask").fit(
        data, epochs=1, batch_size=16)
    for name in layers:
        change = (model.get_submodule(name).weight.detach() - before[name]).reshape(
            before[name].shape[0], -1)
        changed = (change != 0).sum(dim=1)
        assert (changed <= 1).all()
        weight = model.get_submodule(name).weight  # the dense reference: dense Adam state
        assert tuner.optimizer_.state[weight]["exp_avg"].shape == weight.shape


def test_spsft_frozen_weight_gets_no_gradient_and_starts_at_the_base_model():
    model, task, data, layers = pair(TEXT)
    base_out = outputs(model, task, data)
    tuner = SPSFT(model, task, layers=layers, ratio=0.25, importance="l2")
    tuner.prepare(tuner.selection_batches_of(data, 16))
    torch.testing.assert_close(outputs(model, task, data), base_out)  # W_f starts at zero
    batch = data.batches("train", 16, 1)[0]
    loss = torch.nn.functional.cross_entropy(task.forward(model, batch).logits,
                                             batch["labels"])
    loss.backward()
    for name in layers:
        module = model.get_submodule(name)
        assert module.weight.grad is None and not module.weight.requires_grad
        assert tuner.deltas_[name].grad is not None
        assert tuner.deltas_[name].shape[0] == max(1, round(0.25 * module.weight.shape[0]))
        norms = module.weight.detach().norm(dim=1)
        expected = norms.topk(len(tuner.rows_[name])).indices.sort().values
        assert torch.equal(tuner.rows_[name], expected)


def test_spsft_quantile_mean_taylor_is_the_mean_of_eleven_quantiles():
    model, task, data, layers = pair(IMAGE)
    tuner = SPSFT(model, task, layers=layers[:1], ratio=0.5, importance="qm_taylor",
                  selection_batches=2)
    tuner.device_ = torch.device("cpu")
    batches = tuner.selection_batches_of(data, 16)
    scores = tuner.neuron_importance(batches)[layers[0]]
    weights = {layers[0]: model.get_submodule(layers[0]).weight}
    per_class_grads = tuner._mean_gradients(batches, weights, by_class=True)[layers[0]]
    w = weights[layers[0]].detach().reshape(weights[layers[0]].shape[0], -1)
    eta = torch.stack([(g.reshape(w.shape[0], -1) * w).abs().sum(1) for g in per_class_grads])
    expected = torch.stack([torch.quantile(eta.double(), q / 10, dim=0)
                            for q in range(11)]).mean(0)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-12)


def test_spsft_norm_layer_per_row_variant(tmp_path):
    model, task, data, _ = pair(TEXT)
    norm = "bert.encoder.layer.1.output.LayerNorm"
    tuner = SPSFT(model, task, layers=[norm], r=4, importance="taylor").fit(
        data, epochs=1, batch_size=16)
    assert tuner.deltas_[norm].shape == (4,)
    path = tuner.delta().save(tmp_path / "d.safetensors")
    fresh, fresh_task = load_model("tiny_bert", task.num_classes)
    apply_delta(fresh, path)
    torch.testing.assert_close(outputs(fresh, fresh_task, data), outputs(model, task, data),
                               atol=1e-5, rtol=1e-5)


def test_lora_wraps_exactly_the_chosen_modules():
    model, task, data, layers = pair(TEXT)
    LoRA(model, task, layers=layers[:2]).fit(data, epochs=1, batch_size=16)
    wrapped = {name for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert wrapped == set(layers[:2])


def test_delta_is_small_and_refuses_another_model(tmp_path):
    model, task, data, layers = pair(IMAGE)
    tuner = SPSFT(model, task, layers=layers, ratio=0.1).fit(data, epochs=1, batch_size=16)
    delta = tuner.delta()
    total = sum(p.numel() for p in model.parameters())
    assert delta.numel() < 0.2 * total
    path = delta.save(tmp_path / "d.safetensors")
    other, _ = load_model("tiny_resnet", task.num_classes)
    snapshot = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(InvalidInputError, match="tiny_cnn"):
        apply_delta(other, path, model_spec="tiny_resnet")
    with pytest.raises(InvalidInputError, match="no parameter"):
        apply_delta(other, path)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in snapshot.items())
    wrong_classes, _ = load_model("tiny_cnn", task.num_classes + 2)
    snapshot = {k: v.clone() for k, v in wrong_classes.state_dict().items()}
    with pytest.raises(InvalidInputError, match="num_classes"):
        apply_delta(wrong_classes, path)
    assert all(torch.equal(v, wrong_classes.state_dict()[k]) for k, v in snapshot.items())
    loaded = Delta.load(path)
    assert loaded.meta["method"] == "spsft" and loaded.meta["layers"] == layers


def test_bad_inputs():
    model, task, data, layers = pair(IMAGE)
    with pytest.raises(InvalidInputError, match="no layer chosen"):
        GPS(model, task, layers=[])
    with pytest.raises(UnknownNameError, match="did you mean"):
        GPS(model, task, layers=[layers[0] + "x"])
    width = model.get_submodule(layers[0]).weight[0].numel()
    with pytest.raises(InvalidInputError, match="larger than"):
        GPS(model, task, layers=layers[:1], k=width + 1)
    rows = model.get_submodule(layers[0]).weight.shape[0]
    with pytest.raises(InvalidInputError, match="larger than"):
        SPSFT(model, task, layers=layers[:1], r=rows + 1)
    for ratio in (0.0, 1.5):
        with pytest.raises(InvalidInputError, match="ratio"):
            SPSFT(model, task, layers=layers[:1], ratio=ratio)
    grouped = [n for n, module in model.named_modules() if getattr(module, "groups", 1) > 1]
    with pytest.raises(InvalidInputError, match="grouped convolution"):
        LoRA(model, task, layers=grouped[:1])
    text_model, text_task, _, _ = pair(TEXT)
    with pytest.raises(InvalidInputError, match="gps"):
        SPSFT(text_model, text_task, layers=["bert.embeddings.word_embeddings"])
    with pytest.raises(InvalidInputError, match="position embeddings"):
        GPS(text_model, text_task, layers=["bert.embeddings.position_embeddings"])


def test_budget_outside_range_and_auto_layers():
    import pandas as pd

    from zest.pipeline import parse_layers
    from zest.ranking import Ranking

    ranking = Ranking(pd.DataFrame({"layer": ["a", "b"], "params": [10, 30]}), 100, "x", 0.0)
    for budget in (0.0, 1.5, -0.1):
        with pytest.raises(InvalidInputError, match="^param_budget must be"):
            ranking.select(budget)
    assert ranking.select(0.2) == ["a"]
    with pytest.raises(InvalidInputError, match="smallest layer"):
        ranking.select(0.05)
    with pytest.raises(InvalidInputError, match="top:K"):
        parse_layers("top:x")


def test_non_finite_loss_stops_and_keeps_the_last_good_delta(tmp_path):
    """The tuner keeps its last good delta; ``run_finetune`` writes no run at all."""
    from zest.pipeline import run_finetune

    model, task, data, _layers = pair(IMAGE)
    tuner = METHODS.get("layers")(model, task, layers=["conv_stem"], lr=1e30)
    with pytest.raises(NonFiniteLossError, match="step"):
        tuner.fit(data, epochs=2, batch_size=16)
    delta = tuner.delta()
    assert all(torch.isfinite(t).all() for e in delta.entries for t in e.tensors.values())
    with pytest.raises(NonFiniteLossError, match="not written"):
        run_finetune(IMAGE[0], IMAGE[1], tmp_path / "run", method="layers", layers="conv_stem",
                     lr=1e30, epochs=2, batch_size=16, options=IMAGE[2])
    assert list(tmp_path.iterdir()) == []


def test_finetune_lora_auto_takes_the_layers_of_to_lora_config(tmp_path):
    """``zest finetune --method lora --layers top:K`` wraps exactly the modules
    ``Ranking.to_lora_config(k=K)`` names, with the same predictor and probe batch."""
    from zest.loading import load_pair
    from zest.pipeline import run_finetune
    from zest.ranking import rank

    run_finetune(TEXT[0], TEXT[1], tmp_path, method="lora", layers="top:3", epochs=1,
                 batch_size=16, options=TEXT[2])
    config = json.loads((tmp_path / "config.json").read_text())
    model, task, data = load_pair(TEXT[0], TEXT[1], options=TEXT[2], seed=0)
    expected = rank(model, task, data.batches("train", 16, 1, seed=0)).to_lora_config(k=3)
    assert set(config["layers"]) == set(expected.target_modules)  # peft keeps a set
    assert len(config["layers"]) == 3


def test_to_lora_config_passes_over_layers_lora_cannot_wrap():
    """On a network with depthwise convolutions and norms, the chosen modules are all ones
    peft can wrap, and peft wraps exactly them."""
    from peft import inject_adapter_in_model

    from tests.conftest import image_batch
    from zest.finetune import lora_can_wrap
    from zest.ranking import rank

    model, task = load_model("timm:tf_efficientnet_lite0", 3)
    ranking = rank(model, task, image_batch(4), by="fan_in")  # ranks depthwise convs low/high
    assert not ranking.table["lora"].all()  # there are layers LoRA cannot take
    config = ranking.to_lora_config(k=4, r=2)
    chosen = list(config.target_modules)
    assert len(chosen) == 4
    assert all(lora_can_wrap(model.get_submodule(name)) for name in chosen)
    assert set(chosen) == set(ranking.for_lora().top(4))
    inject_adapter_in_model(config, model)
    wrapped = {name for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert wrapped == set(chosen)


def test_gps_on_all_layers_keeps_every_input_of_narrow_neurons():
    """With layers="all", a k above a depthwise convolution's fan-in keeps all its inputs
    (as GPS on every layer must); named layers still refuse such a k."""
    model, task, data, _ = pair(IMAGE)
    grouped = next(n for n, m in model.named_modules() if getattr(m, "groups", 1) > 1)
    width = model.get_submodule(grouped).weight[0].numel()
    tuner = GPS(model, task, layers="all", k=width + 2, selection_batches=1)
    tuner.fit(data, epochs=1, batch_size=16)
    assert tuner.indices_[grouped].shape[1] == width
    wide = [n for n, idx in tuner.indices_.items() if idx.shape[1] == width + 2]
    assert wide  # the other layers keep k
    fresh, fresh_task, _, _ = pair(IMAGE)
    with pytest.raises(InvalidInputError, match="larger than"):
        GPS(fresh, fresh_task, layers=[grouped], k=width + 2)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, snapshot):
    return all(torch.equal(v, model.state_dict()[k]) for k, v in snapshot.items())


@pytest.fixture(scope="module")
def trained_deltas(tmp_path_factory):
    """A GPS and an SPSFT delta of the image test model (each with several entries)."""
    folder = tmp_path_factory.mktemp("deltas")
    out = {}
    for method, kwargs in (("gps", {"k": 2}), ("spsft", {"ratio": 0.25})):
        model, task, data, layers = pair(IMAGE)
        tuner = METHODS.get(method)(model, task, layers=layers, **kwargs).fit(
            data, epochs=1, batch_size=16)
        out[method] = (tuner.delta(), task.num_classes)
    return folder, out


@pytest.mark.parametrize("method, corrupt, message", [
    ("spsft", lambda t: t.update(rows=t["rows"][:-1]), "row indices do not fit|rows of"),
    ("spsft", lambda t: t.update(indices=-t["indices"] - 1), "outside"),
    ("spsft", lambda t: t.update(indices=torch.zeros_like(t["indices"])), "twice"),
    ("gps", lambda t: t.update(indices=-t["indices"] - 1), "outside"),
    ("gps", lambda t: t.update(values=torch.cat([t["values"], t["values"]], dim=1)),
     "do not fit"),
    ("gps", lambda t: t.update(values=torch.full_like(t["values"], float("nan"))),
     "non-finite"),
    ("gps", lambda t: t.pop("values"), "lacks"),
])
def test_malformed_deltas_are_refused_and_change_nothing(trained_deltas, method, corrupt,
                                                         message):
    import copy

    folder, deltas = trained_deltas
    delta, num_classes = deltas[method]
    bad = copy.deepcopy(delta)
    last = [e for e in bad.entries if e.kind != "replace"][-1]  # earlier entries would apply
    corrupt(last.tensors)
    path = bad.save(folder / f"{method}-bad.safetensors")
    fresh, _ = load_model("tiny_cnn", num_classes)
    snapshot = _state(fresh)
    with pytest.raises(InvalidInputError, match=message):
        apply_delta(fresh, path)
    assert _unchanged(fresh, snapshot)


def test_delta_refuses_a_base_with_other_weights(trained_deltas):
    _, deltas = trained_deltas
    delta, num_classes = deltas["gps"]
    assert delta.meta["seed"] == 0 and delta.meta["base_fingerprint"]
    other_seed, _ = load_model("tiny_cnn", num_classes, seed=1)  # random weights differ
    snapshot = _state(other_seed)
    with pytest.raises(InvalidInputError, match="another base.*seed=0"):
        apply_delta(other_seed, delta)
    assert _unchanged(other_seed, snapshot)
    same, _ = load_model("tiny_cnn", num_classes, seed=0)
    apply_delta(same, delta)  # the head seed does not matter: the delta replaces the head


@pytest.mark.parametrize("content", [b"", b"garbage" * 10, b"\x08\x00\x00\x00\x00\x00\x00\x00{}"])
def test_garbage_delta_files_are_one_line_errors(trained_deltas, tmp_path, content):
    from zest.errors import RecordError

    _, deltas = trained_deltas
    path = deltas["gps"][0].save(tmp_path / "d.safetensors")
    path.write_bytes(content)
    with pytest.raises(RecordError, match="corrupt"):
        Delta.load(path)


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory):
    from zest.models import write_random_hf_model

    folder = tmp_path_factory.mktemp("gpt2")
    write_random_hf_model(folder, "gpt2", n_embd=32, n_layer=2, n_head=2, pad_token_id=0,
                          bos_token_id=101, eos_token_id=102)
    return folder


@pytest.mark.parametrize("method, kwargs", [("spsft", {"ratio": 0.25}), ("gps", {"k": 3}),
                                            ("gps", {"k": 3, "implementation": "dense_mask"})])
def test_gpt2_conv1d_layers_tune_by_output_neuron_and_deltas_apply_exactly(
        tiny_gpt2_dir, tmp_path, method, kwargs):
    spec = f"hf:{tiny_gpt2_dir}"
    case = (spec, "rotten_tomatoes", DataOptions(max_length=16, max_train=48, max_val=24,
                                                 max_test=24))
    model, task, data = load_pair(case[0], case[1], options=case[2])
    layers = ["transformer.h.1.attn.c_attn", "transformer.h.1.mlp.c_proj"]
    shapes = {name: tuple(model.get_submodule(name).weight.shape) for name in layers}
    assert all(type(model.get_submodule(n)).__name__ == "Conv1D" for n in layers)
    tuner = METHODS.get(method)(model, task, layers=layers, lr=1e-2, **kwargs).fit(
        data, epochs=1, batch_size=8)
    delta = tuner.delta()
    for entry in delta.entries:
        if entry.name.endswith(".weight") and entry.name[:-7] in layers:
            n_in, n_out = shapes[entry.name[:-7]]  # Conv1D keeps (in, out)
            assert entry.extra.get("transposed")
            if method == "spsft":  # rows are output neurons: W_f is r × d_in
                assert entry.tensors["rows"].shape == (round(0.25 * n_out), n_in)
                assert int(entry.tensors["indices"].max()) < n_out
            else:  # one row of k input connections per output neuron
                assert tuple(entry.tensors["indices"].shape) == (n_out, 3)
    path = delta.save(tmp_path / "delta.safetensors")
    fresh, fresh_task = load_model(spec, task.num_classes)
    apply_delta(fresh, path, model_spec=spec)
    torch.testing.assert_close(outputs(fresh, fresh_task, data), outputs(model, task, data),
                               atol=1e-5, rtol=1e-5)


def test_spsft_on_grouped_convolutions_applies_exactly(tmp_path):
    import timm

    from zest.models.timm import build_timm

    torch.manual_seed(0)
    spec = "timm:regnetx_002"
    data_options = DataOptions(image_size=32, max_train=48, max_val=24, max_test=24)
    model, task, data = load_pair(spec, "digits", options=data_options)
    grouped = [n for n, m in model.named_modules()
               if isinstance(m, torch.nn.Conv2d) and 1 < m.groups < m.in_channels][-2:]
    assert grouped, "regnetx_002 has grouped convolutions"
    tuner = SPSFT(model, task, layers=grouped, ratio=0.25, lr=1e-2).fit(data, epochs=1,
                                                                        batch_size=16)
    path = tuner.delta().save(tmp_path / "delta.safetensors")
    fresh, fresh_task = load_model(spec, task.num_classes)
    apply_delta(fresh, path, model_spec=spec)
    torch.testing.assert_close(outputs(fresh, fresh_task, data), outputs(model, task, data),
                               atol=1e-5, rtol=1e-5)
    assert timm is not None and build_timm is not None


def test_auto_layers_are_chosen_among_those_the_method_can_tune(tmp_path):
    """Regression: SPSFT with --layers auto on a BERT-style model picked an embedding."""
    from zest.pipeline import run_finetune

    metrics = run_finetune("tiny_bert", "rotten_tomatoes", tmp_path / "run", method="spsft",
                           layers="auto", param_budget=0.3, epochs=1, batch_size=16,
                           options=TEXT[2])
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    model, task = load_model("tiny_bert", 2)
    assert config["layers"] and all(SPSFT.can_tune(n, model.get_submodule(n))
                                    for n in config["layers"])
    assert not any("embeddings" in n for n in config["layers"])
    assert metrics["trainable_params"] > 0


def test_spsft_keeps_no_dense_gradient_for_frozen_weights():
    model, task, data, layers = pair(IMAGE)
    tuner = SPSFT(model, task, layers=layers, ratio=0.25).fit(data, epochs=1, batch_size=16)
    trained = {id(p) for p in tuner.trainable_parameters()}
    for name in layers:
        weight = model.get_submodule(name).weight
        assert not weight.requires_grad and weight.grad is None and id(weight) not in trained
        delta = tuner.deltas_[name]
        assert delta.shape[0] == len(tuner.rows_[name]) < weight.shape[0]
        assert tuner.optimizer_.state[delta]["exp_avg"].shape == delta.shape
    frozen = [p for p in model.parameters() if id(p) not in trained]
    assert all(p.grad is None and p not in tuner.optimizer_.state for p in frozen)


@pytest.mark.parametrize("method", ["spsft", "full", "gps"])
def test_the_model_kept_is_the_best_val_epoch(method):
    """Issue 35: after fit, the model holds the best validation epoch's values (not the last),
    and the history keeps every epoch trained."""
    model, task, data, layers = pair(IMAGE)
    kwargs = {} if method == "full" else {"layers": layers}
    # a rate high enough that later epochs move away from the best one on this tiny set
    tuner = METHODS.get(method)(model, task, lr=3e-2, **kwargs).fit(data, epochs=5,
                                                                  batch_size=16)
    records = tuner.history_
    assert len(records) == 5
    best = max(records, key=lambda r: (r.val_accuracy, -r.val_loss))
    assert tuner.best_epoch_ == best.epoch
    val_loss, val_accuracy = tuner.evaluate(data, "val")
    assert val_accuracy == pytest.approx(best.val_accuracy)
    assert val_loss == pytest.approx(best.val_loss, rel=1e-4, abs=1e-5)


def test_patience_stops_early_and_keeps_the_best_epoch():
    model, task, data, layers = pair(IMAGE)
    # a tiny rate: val barely changes, so some epoch fails to improve within a few
    tuner = METHODS.get("layers")(model, task, layers=layers, lr=1e-7).fit(
        data, epochs=30, batch_size=16, patience=2)
    epochs = len(tuner.history_)
    assert epochs < 30 and tuner.stopped_.startswith("early stop")
    assert epochs - tuner.best_epoch_ == 2
    assert all(not (r.val_accuracy, -r.val_loss) > (
        tuner.history_[tuner.best_epoch_ - 1].val_accuracy,
        -tuner.history_[tuner.best_epoch_ - 1].val_loss) for r in tuner.history_)


@pytest.mark.parametrize("patience", [0, -1, 1.5, True])
def test_a_bad_patience_is_refused(patience):
    model, task, data, layers = pair(IMAGE)
    with pytest.raises(InvalidInputError, match="patience"):
        METHODS.get("head")(model, task).fit(data, epochs=2, patience=patience)


def test_lora_leaves_out_convolutions_peft_cannot_rebuild():
    """peft builds LoRA's factors with the layer's own class and ``nn.Conv2d``'s arguments;
    timm's ``Conv2dSame`` (the ``tf_`` EfficientNets, MobileNets) refuses ``padding_mode`` with a
    TypeError from inside peft. Such layers are not LoRA candidates, and a LoRA plan over every
    convolution of such a model trains."""
    from timm.layers import Conv2dSame

    from zest.finetune.lora import lora_can_wrap

    assert not lora_can_wrap(Conv2dSame(3, 4, 3)) and lora_can_wrap(torch.nn.Conv2d(3, 4, 3))
    model, task, data = load_pair("timm:tf_efficientnet_lite0", "digits",
                                  options=DataOptions(image_size=32, max_train=32, max_val=16,
                                                      max_test=16))
    convs = [layer.name for layer in candidate_layers(model, task.head_name)
             if isinstance(model.get_submodule(layer.name), Conv2dSame)]
    assert convs  # the tf_ model has same-padding convolutions
    with pytest.raises(InvalidInputError, match="lora"):
        LoRA(model, task, layers=convs[:1])
    tunable = [layer.name for layer in candidate_layers(model, task.head_name)
               if LoRA.can_tune(layer.name, model.get_submodule(layer.name))]
    LoRA(model, task, layers=tunable, lr=1e-3).fit(data, epochs=1, batch_size=16)

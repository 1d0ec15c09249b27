"""The causal-LM task (``lm:<text data set>``): next-token loss, the kept LM head, ground truth,
ranking, fine-tuning and the refusals, on ``tiny_llama`` (its LM head tied to its embeddings, as
SmolLM2's is)."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from zest.cli import app
from zest.errors import DataError, InvalidInputError
from zest.finetune import Delta, Layers, apply_delta
from zest.frames import metrics_frame
from zest.groundtruth import GroundTruthConfig, collect_groundtruth
from zest.layers import candidate_layers
from zest.loading import DataOptions, load_pair
from zest.models import load_model
from zest.probe import probe
from zest.ranking import rank
from zest.records import group_key
from zest.stages import stage_plan

runner = CliRunner()
OPTIONS = DataOptions(max_length=24, max_train=64, max_val=24, max_test=16)
VALUE_COLUMNS = ["gt_score", "gt_baseline", "gt_gain", "gt_loss", "gt_loss_baseline",
                 "gt_loss_gain"]


def _lm(seed: int = 0):
    return load_model("tiny_llama", 2, seed=seed, kind="causal_lm")


def _batch(task, texts):
    encoded = task.tokenizer(texts, padding=True, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
            "labels": torch.arange(len(texts)) % 2}


def _csv(tmp_path):
    pd.DataFrame({"text": [f"note {i}: the pump at station {i % 7} was checked " + "and ok " *
                           (i % 4) for i in range(80)],
                  "label": ["a", "b"] * 40}).to_csv(tmp_path / "notes.csv", index=False)
    return f"lm:csv:{tmp_path / 'notes.csv'}"


def _shifted_cross_entropy(logits: torch.Tensor, ids: torch.Tensor, lengths: list[int]
                           ) -> torch.Tensor:
    """Mean of -log p(token t+1 | tokens ≤ t) over every real token but the first of each text,
    written out position by position."""
    terms = []
    for i, n in enumerate(lengths):
        for t in range(n - 1):
            terms.append(-torch.log_softmax(logits[i, t], dim=-1)[ids[i, t + 1]])
    return torch.stack(terms).mean()


def test_loss_is_the_shifted_next_token_cross_entropy_over_real_tokens():
    model, task = _lm()
    texts = ["the pump was checked twice today", "ok"]
    batch = _batch(task, texts)
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    assert lengths[0] > lengths[1]  # the second text is padded
    with torch.no_grad():
        output = task.forward(model, batch)
        loss = task.loss(output)
    assert output.logits.shape[:2] == batch["input_ids"].shape
    expected = _shifted_cross_entropy(output.logits, batch["input_ids"], lengths)
    assert torch.allclose(loss, expected, atol=1e-5)
    # padding is ignored: other ids at padded positions, and each text scored alone, agree
    scrambled = dict(batch, input_ids=batch["input_ids"].masked_fill(
        batch["attention_mask"] == 0, 1037))
    with torch.no_grad():
        assert torch.allclose(task.loss(task.forward(model, scrambled)), loss, atol=1e-5)
        alone = [task.loss(task.forward(model, _batch(task, [text]))) for text in texts]
        per_text = task.example_losses(output)
    counts = [n - 1 for n in lengths]
    pooled = sum(c * value for c, value in zip(counts, alone, strict=True)) / sum(counts)
    assert torch.allclose(loss, pooled, atol=1e-5)
    assert torch.allclose(per_text, torch.stack(alone), atol=1e-5)
    # features: the last real token's final hidden state (forward metrics still work)
    assert output.features.shape == (2, model.config.hidden_size)


def test_the_pretrained_lm_head_is_kept_tied_and_never_a_candidate(tmp_path):
    model, task = _lm()
    assert task.kind == "causal_lm" and task.head_name == "lm_head" and not task.tunes_head
    assert model.lm_head.weight is model.model.embed_tokens.weight
    names = [layer.name for layer in candidate_layers(model, task.head_name)]
    assert names.count("model.embed_tokens") == 1 and not any("lm_head" in n for n in names)
    kept, _ = load_model("tiny_llama", 2, seed=0, kind="causal_lm", reset_head=False)
    assert torch.equal(model.lm_head.weight, kept.lm_head.weight)  # reset_head=True kept it
    with pytest.raises(InvalidInputError, match="pretrained LM head"):
        task.reset_head(model, seed=1)
    # a pretrained decoder from a directory keeps its LM head exactly
    model.save_pretrained(tmp_path)
    task.tokenizer.save_pretrained(tmp_path)
    loaded, loaded_task = load_model(f"hf:{tmp_path}", 2, seed=3, kind="causal_lm")
    assert loaded_task.head_name == "lm_head"
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_tuning_a_layer_leaves_the_tied_head_and_embeddings_alone():
    model, task, data = load_pair("tiny_llama", "lm:rotten_tomatoes", options=OPTIONS)
    embeddings = model.model.embed_tokens.weight.detach().clone()
    layer = "model.layers.0.mlp.up_proj"
    before = model.get_submodule(layer).weight.detach().clone()
    tuner = Layers(model, task, layers=[layer], lr=1e-2).fit(data, epochs=1, batch_size=16)
    assert torch.equal(model.model.embed_tokens.weight, embeddings)
    assert not torch.equal(model.get_submodule(layer).weight, before)
    assert [entry.name for entry in tuner.delta().entries] == [f"{layer}.weight"]
    assert tuner.trainable_params_ == before.numel()


def test_the_decoder_stage_plan_reproduces_the_token_logits():
    model, task, data = load_pair("tiny_llama", "lm:rotten_tomatoes", options=OPTIONS)
    plan = stage_plan(model, task, data.batches("train", 4, 1)[0])
    assert plan is not None and plan.names[-1] == "model.norm"


def test_groundtruth_of_an_lm_group(tmp_path):
    spec = "lm:rotten_tomatoes"
    # the tied embedding (stage 0) and a layer after the cached prefix of block 0
    layers = ["model.embed_tokens", "model.layers.1.mlp.down_proj"]
    cached = collect_groundtruth("tiny_llama", spec, tmp_path / "a.parquet",
                                 config=GroundTruthConfig(steps=3, batch_size=16, lr=1e-2),
                                 seeds=[0], options=OPTIONS, layer_names=layers)
    plain = collect_groundtruth("tiny_llama", spec, tmp_path / "b.parquet",
                                config=GroundTruthConfig(steps=3, batch_size=16, lr=1e-2,
                                                         use_cache=False),
                                seeds=[0], options=OPTIONS, layer_names=layers)
    assert cached["gt_cached"].all() and not plain["gt_cached"].any()
    a, b = (f.sort_values(["gt_seed", "layer"]).reset_index(drop=True) for f in (cached, plain))
    pd.testing.assert_frame_equal(a[VALUE_COLUMNS], b[VALUE_COLUMNS], atol=1e-4, rtol=1e-4)
    assert len(a) == 2 and set(a["group"]) == {group_key("tiny_llama", spec)}
    # the baseline is the untouched pretrained model's next-token loss and accuracy on val
    model, task, data = load_pair("tiny_llama", spec, options=OPTIONS)
    val = data.splits["val"]
    total, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for i in range(len(val)):
            n = int(val.x["attention_mask"][i].sum())
            ids = val.x["input_ids"][i:i + 1, :n]
            logits = model(input_ids=ids).logits[0, :-1]
            total += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            correct += int((logits.argmax(dim=1) == ids[0, 1:]).sum())
            count += n - 1
    assert a["gt_loss_baseline"].to_numpy() == pytest.approx(total / count, abs=1e-4)
    assert a["gt_baseline"].to_numpy() == pytest.approx(correct / count)
    assert (a["gt_loss_gain"] - (a["gt_loss_baseline"] - a["gt_loss"])).abs().max() < 1e-9
    # a step size this large moves the loss: the gains are measured, not zero
    assert a["gt_loss_gain"].abs().max() > 1e-3


def test_rank_and_finetune_an_lm_data_set_from_the_cli(tmp_path):
    spec = _csv(tmp_path)
    result = runner.invoke(app, ["rank", "--model", "tiny_llama", "--dataset", spec,
                                 "--batch-size", "8", "--max-length", "24", "--top-k", "3",
                                 "--out", str(tmp_path / "r.csv")])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "r.csv")
    assert "model.embed_tokens" in set(table["layer"]) and not table["layer"].str.contains(
        "lm_head").any()
    assert "next-token loss" in result.output  # the note on the probe loss
    run = tmp_path / "run"
    result = runner.invoke(app, ["finetune", "--model", "tiny_llama", "--dataset", spec,
                                 "--out", str(run), "--method", "spsft", "--layers", "top:2",
                                 "--epochs", "1", "--batch-size", "16", "--max-length", "24",
                                 "--max-train", "32", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "perplexity" in result.output and "accuracy" not in result.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["task_kind"] == "causal_lm"
    assert metrics["test_perplexity"] == pytest.approx(math.exp(metrics["test_loss"]))
    # the delta goes back onto a fresh decoder and reproduces the tuned loss
    delta = Delta.load(run / "delta.safetensors")
    assert delta.meta["task_kind"] == "causal_lm" and delta.meta["head"] is None
    base, task = load_model("tiny_llama", 2, kind="causal_lm")
    apply_delta(base, delta, model_spec="tiny_llama")
    assert not torch.equal(base.get_submodule(delta.meta["layers"][0]).weight,
                           load_model("tiny_llama", 2, kind="causal_lm")[0].get_submodule(
                               delta.meta["layers"][0]).weight)


@pytest.mark.parametrize("model, dataset, message", [
    ("tiny_bert", "lm:rotten_tomatoes", "not a causal decoder"),
    ("tiny_cnn", "lm:digits", "not a causal decoder"),
    ("timm:test_resnet", "lm:rotten_tomatoes", "not a causal decoder"),
    ("tiny_llama", "lm:digits", "holds images"),
    ("tiny_llama", "lm:", "one text data set after lm:"),
    ("tiny_llama", "lm:lm:r8", "one text data set after lm:"),
])
def test_what_cannot_take_the_lm_task_is_refused_in_one_line(model, dataset, message):
    with pytest.raises(InvalidInputError) as info:
        load_pair(model, dataset, options=OPTIONS)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_an_encoder_with_an_lm_head_is_refused_by_tracing(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    _, task = load_model("tiny_bert", 2)
    config = BertConfig(vocab_size=task.tokenizer.vocab_size, hidden_size=32,
                        num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    BertForMaskedLM(config).save_pretrained(tmp_path)
    task.tokenizer.save_pretrained(tmp_path)
    with pytest.raises(InvalidInputError, match="not a causal decoder"):
        load_model(f"hf:{tmp_path}", 2, kind="causal_lm")


def test_supcon_is_refused_and_ce_is_the_default_probe_loss_for_lm(tmp_path):
    model, task, data = load_pair("tiny_llama", "lm:rotten_tomatoes", options=OPTIONS)
    batch = data.batches("train", 8, 1)
    with pytest.raises(InvalidInputError, match="probe_loss='ce'"):
        rank(model, task, batch, by="snip", probe_loss="supcon")
    with pytest.raises(InvalidInputError, match="probe_loss='ce'"):
        probe(model, task, batch[0], loss="supcon")
    # the library's own calls take the task's loss when none is given
    assert probe(model, task, batch[0]).loss == pytest.approx(
        probe(model, task, batch[0], loss="ce").loss)
    frame = metrics_frame(model, task, batch, metrics=["snip"])
    assert frame["m_snip"].notna().all()
    result = runner.invoke(app, ["collect", "metrics", "--model", "tiny_llama", "--dataset",
                                 "lm:rotten_tomatoes", "--out", str(tmp_path / "m.parquet"),
                                 "--batch-size", "4", "--metrics", "snip", "--max-length", "24",
                                 "--max-train", "32"])
    assert result.exit_code == 0, result.output
    assert set(pd.read_parquet(tmp_path / "m.parquet")["probe_loss"]) == {"ce"}
    result = runner.invoke(app, ["collect", "metrics", "--model", "tiny_llama", "--dataset",
                                 "lm:rotten_tomatoes", "--out", str(tmp_path / "n.parquet"),
                                 "--probe-loss", "supcon", "--max-train", "32"])
    assert result.exit_code == 1 and "--probe-loss ce" in result.output


@pytest.mark.slow
def test_smollm2_ranks_its_layers_for_next_token_prediction_on_r8():
    model, task, data = load_pair("smollm2", "lm:r8",
                                  options=DataOptions(max_length=32, max_train=16))
    assert task.head_name == "lm_head" and model.lm_head.weight is \
        model.model.embed_tokens.weight
    ranking = rank(model, task, data.batches("train", 4, 1))
    layers = set(ranking.table["layer"])
    assert "model.embed_tokens" in layers and not any("lm_head" in n for n in layers)
    assert len(layers) == 1 + 30 * 7
    # the kept pretrained LM head predicts the real texts far better than the same tokens
    # shuffled within each text (measured: 7.1 against 9.7 nats)
    batch = data.batches("train", 4, 1)[0]
    generator = torch.Generator().manual_seed(0)
    shuffled = batch["input_ids"].clone()
    for i, n in enumerate(batch["attention_mask"].sum(dim=1).tolist()):
        shuffled[i, 1:n] = shuffled[i, 1:n][torch.randperm(n - 1, generator=generator)]
    with torch.no_grad():
        real = task.loss(task.forward(model, batch))
        scrambled = task.loss(task.forward(model, dict(batch, input_ids=shuffled)))
    assert float(real) < float(scrambled) - 1.0, (float(real), float(scrambled))


def test_an_lm_text_file_needs_no_label_column(tmp_path):
    """Adapting a decoder to a domain reads only texts: ``lm:csv:`` without a label column
    loads (one class, ``text``), ranks and fine-tunes; a classification task still asks for
    the column."""
    path = tmp_path / "notes.csv"
    words = ["river", "stone", "market", "light", "engine", "model", "token", "layer"]
    rows = [" ".join(words[(i + j) % len(words)] for j in range(12)) for i in range(40)]
    pd.DataFrame({"text": rows}).to_csv(path, index=False)
    model, task, data = load_pair("tiny_llama", f"lm:csv:{path}", options=OPTIONS)
    assert data.class_names == ["text"] and task.kind == "causal_lm"
    assert len(rank(model, task, data.batches("train", 8, 1)).table) > 0
    result = runner.invoke(app, ["finetune", "--model", "tiny_llama", "--dataset",
                                 f"lm:csv:{path}", "--method", "layers", "--layers", "top:2",
                                 "--epochs", "1", "--max-length", "24",
                                 "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    with pytest.raises(DataError, match="label_column"):
        load_pair("tiny_llama", f"csv:{path}", options=OPTIONS)

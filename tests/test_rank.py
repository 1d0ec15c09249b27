"""``zest rank`` (API and CLI), and training / evaluating a predictor from record files."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import zest
from tests.conftest import image_batch
from tests.test_predictor import synthetic_records
from zest.cli import app
from zest.models import load_model
from zest.ranking import rank
from zest.records import write_records

runner = CliRunner()


def test_rank_api_with_the_shipped_predictor_and_by_metric():
    model, task = load_model("tiny_cnn", 3)
    ranking = rank(model, task, image_batch())
    table = ranking.to_frame()
    assert list(table["rank"]) == list(range(1, len(table) + 1))
    assert table["score"].is_monotonic_decreasing
    assert ranking.top(3) == table["layer"].head(3).tolist()
    by = rank(model, task, [image_batch(), image_batch(seed=1)], by="n_params")
    assert by.table["params"].is_monotonic_decreasing
    assert by.stability is not None and -1 <= by.stability["kendall_tau"] <= 1
    chosen = by.select(0.3)
    assert sum(by.table.set_index("layer").loc[chosen, "params"]) <= 0.3 * by.total_params


def _npz(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 255, (60, 12, 12), dtype=np.uint8),
             y=np.arange(60) % 3)
    return f"npz:{tmp_path / 'd.npz'}"


def _csv(tmp_path):
    pd.DataFrame({"sentence": [f"text number {i} " + "word " * (i % 5) for i in range(60)],
                  "sentiment": ["pos", "neg"] * 30}).to_csv(tmp_path / "d.csv", index=False)
    return f"csv:{tmp_path / 'd.csv'}"


def _imagefolder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("cats", "dogs"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(15):
            array = rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)
            Image.fromarray(array).save(tmp_path / "images" / label / f"{i}.png")
    return f"imagefolder:{tmp_path / 'images'}"


@pytest.mark.parametrize("kind", ["npz", "csv", "imagefolder"])
def test_rank_cli_on_user_data(tmp_path, kind):
    spec = {"npz": _npz, "csv": _csv, "imagefolder": _imagefolder}[kind](tmp_path)
    model = "tiny_bert" if kind == "csv" else "tiny_cnn"
    extra = ["--text-column", "sentence", "--label-column", "sentiment"] if kind == "csv" \
        else ["--image-size", "16"]
    out = tmp_path / "ranking.csv"
    result = runner.invoke(app, ["rank", "--model", model, "--dataset", spec, "--batch-size",
                                 "8", "--batches", "2", "--top-k", "3", "--out", str(out),
                                 "--plot", str(tmp_path / "r.png"), *extra])
    assert result.exit_code == 0, result.output
    assert "stability over 2 minibatches" in result.output
    table = pd.read_csv(out)
    assert table["chosen"].sum() == 3 and (tmp_path / "r.png").stat().st_size > 1000


def test_rank_cli_formats_and_errors(tmp_path):
    base = ["rank", "--model", "tiny_cnn", "--dataset", "digits", "--batch-size", "8"]
    result = runner.invoke(app, base + ["--format", "peft", "--top-k", "2", "--by", "snip"])
    assert result.exit_code == 0
    assert eval(result.output.strip()) and len(eval(result.output.strip())) == 2  # noqa: S307
    result = runner.invoke(app, base + ["--param-budget", "0.2", "--out",
                                        str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r.json").read_text())
    for args, message in ((["--top-k", "2", "--param-budget", "0.1"], "either"),
                          (["--by", "snipp"], "snip"), (["--param-budget", "2"], "(0, 1]"),
                          (["--predictor", str(tmp_path / "none.json")], "predictor")):
        result = runner.invoke(app, base + args)
        assert result.exit_code == 1, (args, result.output)
        assert message in result.output and "Traceback" not in result.output


def test_train_and_evaluate_predictor_cli(tmp_path):
    metrics, gt = synthetic_records(n_groups=6, flip=False)
    for kind, frame in (("metrics", metrics), ("groundtruth", gt)):
        for group, part in frame.groupby("group"):
            write_records(part, tmp_path / "records" / kind / f"{group}.parquet")
    predictor = tmp_path / "p.json"
    result = runner.invoke(app, ["train-predictor", "--records", str(tmp_path / "records"),
                                 "--out", str(predictor), "--features", "a,b,c"])
    assert result.exit_code == 0, result.output
    assert "leave-one-group-out" in result.output
    spec = json.loads(predictor.read_text())
    assert spec["cv"]["logo"]["kendall"] > 0.5 and len(spec["training_groups"]) == 6
    result = runner.invoke(app, ["evaluate-predictor", "--predictor", str(predictor),
                                 "--records", str(tmp_path / "records"), "--out-dir",
                                 str(tmp_path / "eval"), "--report", str(tmp_path / "r.md"),
                                 "--schemes", "logo,lomo,cross_modality"])
    assert result.exit_code == 0, result.output
    for name in ("report.md", "results.json", "logo.png"):
        assert (tmp_path / "eval" / name).exists()
    assert "| predictor |" in (tmp_path / "r.md").read_text()


def test_to_lora_config_wraps_exactly_the_chosen_modules():
    from peft import inject_adapter_in_model

    model, task = load_model("tiny_bert", 3)
    from tests.conftest import text_batch

    ranking = rank(model, task, text_batch(task), by="n_params")
    linear = ranking.table[ranking.table["type"] == "Linear"]
    chosen = linear["layer"].head(2).tolist()
    ranking.table = linear.reset_index(drop=True)
    config = ranking.to_lora_config(k=2, r=4)
    assert list(config.target_modules) == chosen or set(config.target_modules) == set(chosen)
    inject_adapter_in_model(config, model)
    wrapped = {name for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert wrapped == set(chosen)
    with pytest.raises(Exception, match="exactly one"):
        ranking.to_lora_config()


def test_rank_by_a_metric_that_is_not_available_shows_n_a():
    result = runner.invoke(app, ["rank", "--model", "tiny_cnn", "--dataset", "digits",
                                 "--batch-size", "8", "--by", "repr_shift", "--top-k", "2"])
    assert result.exit_code == 0, result.output
    assert "n/a" in result.output


@pytest.mark.parametrize("model_spec", ["tiny_cnn", "tiny_bert"])
def test_unlabelled_batch_ranks_by_label_free_metrics_and_names_the_rest(model_spec):
    from tests.conftest import text_batch
    from zest.errors import InvalidInputError
    from zest.metrics import METRICS, needs_labels

    model, task = load_model(model_spec, 3)
    labelled = image_batch() if model_spec == "tiny_cnn" else text_batch(task)
    unlabelled_batches = [labelled[0], (labelled[0],)] if model_spec == "tiny_cnn" else \
        [{k: v for k, v in labelled.items() if k != "labels"}]
    assert not needs_labels("n_params") and not needs_labels("synflow")
    assert needs_labels("snip") and needs_labels("class_separation")
    for unlabelled in unlabelled_batches:
        assert not task.has_labels(unlabelled) and task.has_labels(labelled)
        for by in ("n_params", "act_mean", "synflow"):
            expected = rank(model, task, labelled, by=by).table.set_index("layer")["score"]
            got = rank(model, task, unlabelled, by=by).table.set_index("layer")["score"]
            pd.testing.assert_series_equal(got, expected.loc[got.index], atol=1e-6, rtol=1e-5)
        with pytest.raises(InvalidInputError, match="class_separation needs them") as error:
            rank(model, task, unlabelled, by="class_separation")
        free = [name for name in METRICS.names() if not needs_labels(name)]
        assert all(name in str(error.value) for name in free)
        with pytest.raises(InvalidInputError, match="the predictor reads .*snip"):
            rank(model, task, unlabelled)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("spec", ["tiny_cnn", "tiny_bert"])
def test_half_precision_models_rank_with_float32_metrics(dtype, spec):
    from zest.loading import DataOptions, load_pair

    model, task, data = load_pair(spec, "digits" if spec == "tiny_cnn" else "r8",
                                  options=DataOptions(image_size=16, max_length=16,
                                                      max_train=64))
    model = model.to(dtype)
    batch = data.batches("train", 16, 1)[0]  # float32 images go into the half model
    ranking = zest.rank(model, task, batch)
    assert ranking.table["score"].notna().all()
    assert all(p.dtype == dtype for p in model.parameters())


@pytest.mark.parametrize("args, message", [
    (["rank", "--top-k", "0"], "--top-k"),
    (["rank", "--param-budget", "0"], "--param-budget"),
    (["rank", "--image-size", "0"], "--image-size"),
    (["rank", "--max-train", "0"], "--max-train"),
    (["finetune", "--layers", "top:3", "--param-budget", "0.01"], "contradict"),
    (["finetune", "--layers", "top:0"], "at least 1"),
    (["finetune", "--layers", "all", "--param-budget", "0.1"], "--layers auto"),
    (["finetune", "--method", "full", "--layers", "top:3"], "drop --layers"),
    (["finetune", "--method", "head", "--param-budget", "0.1"], "drop --param-budget"),
])
def test_empty_or_contradictory_requests_are_refused_before_loading(args, message, tmp_path,
                                                                    monkeypatch):
    import zest.loading
    import zest.pipeline

    def no_loading(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(zest.loading, "load_pair", no_loading)
    monkeypatch.setattr(zest.pipeline, "load_pair", no_loading)
    out = ["--out", str(tmp_path / "run")] if args[0] == "finetune" else []
    result = runner.invoke(app, [*args, "--model", "tiny_cnn", "--dataset", "digits", *out])
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "config.json").exists()

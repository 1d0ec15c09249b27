"""Trust boundaries (issue 30): files zest loads are untrusted. A model folder never runs code,
a damaged predictor or delta is one line (never a crash, never applied), and bad records or data
are refused in one line naming the value and the fix."""

from __future__ import annotations

import ast
import copy
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import zest
from tests.test_predictor import synthetic_records
from zest.cli import app
from zest.errors import DataError, InvalidInputError, RecordError, ZestError
from zest.finetune import GPS, SPSFT, Delta, LoRA, apply_delta
from zest.layers import candidate_layers
from zest.loading import DataOptions, load_pair
from zest.models import load_model, write_random_hf_model
from zest.predictor import ZestRanker
from zest.predictor_features import join_records
from zest.predictor_file import CHECKSUM_KEY, content_checksum
from zest.records import write_records

runner = CliRunner()
REPO = Path(zest.__file__).resolve().parents[1]
PROPERTY = settings(max_examples=30, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


def _one_line(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def _single_line(error: BaseException) -> str:
    text = str(error)
    assert text and "\n" not in text, text
    return text


# -- 1. model folders never run code ---------------------------------------------------------

@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "bert"
    write_random_hf_model(folder, "bert", hidden_size=16, num_hidden_layers=1,
                          num_attention_heads=2, intermediate_size=32,
                          max_position_embeddings=64)
    return folder


def _copy_folder(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def _with_custom_code(hf_folder: Path, folder: Path, config_name: str) -> Path:
    """A model folder whose ``config_name`` maps its classes to a Python file that writes
    ``MARKER`` when imported (a model type transformers does not know, so it would ask)."""
    folder = _copy_folder(hf_folder, folder)
    marker = folder / "MARKER"
    (folder / "custom.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                      "from transformers import BertConfig as CustomConfig\n"
                                      "from transformers import BertForSequenceClassification "
                                      "as CustomModel\n")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "zest-custom"
    (folder / "config.json").write_text(json.dumps(config))
    settings_ = json.loads((folder / config_name).read_text())
    settings_["auto_map"] = {"AutoConfig": "custom.CustomConfig",
                             "AutoModelForSequenceClassification": "custom.CustomModel",
                             "AutoTokenizer": ["custom.CustomTokenizer", None]}
    (folder / config_name).write_text(json.dumps(settings_))
    return folder


def test_auto_map_folder_is_refused_whatever_stdin_says(hf_folder, tmp_path):
    folder = _with_custom_code(hf_folder, tmp_path / "custom", "config.json")
    data = tmp_path / "t.csv"
    pd.DataFrame({"text": [f"text number {i}" for i in range(20)],
                  "label": ["a", "b"] * 10}).to_csv(data, index=False)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", "from zest.cli import main; main()", "rank", "--model",
         f"hf:{folder}", "--dataset", f"csv:{data}"],
        input="y\n", capture_output=True, text=True, env=env, timeout=300)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 1, output
    assert len(output.splitlines()) == 1 and "auto_map" in output and str(folder) in output
    assert not (folder / "MARKER").exists()


def test_tokenizer_auto_map_is_refused_before_transformers_reads_it(hf_folder, tmp_path):
    folder = _with_custom_code(hf_folder, tmp_path / "custom", "tokenizer_config.json")
    with pytest.raises(InvalidInputError, match="auto_map in tokenizer_config.json") as caught:
        load_model(f"hf:{folder}", 2)
    _single_line(caught.value)
    assert not (folder / "MARKER").exists()


class _WritesMarker:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "ran"))


def test_pickled_weights_are_never_unpickled(hf_folder, tmp_path):
    folder = _copy_folder(hf_folder, tmp_path / "pickled")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "MARKER"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_WritesMarker(str(marker))))
    with pytest.raises(InvalidInputError, match="only pickled weights") as caught:
        load_model(f"hf:{folder}", 2)
    assert "pytorch_model.bin" in _single_line(caught.value)
    assert not marker.exists()


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.pop("model_type"), "has no model_type"),
    (lambda c: c.update(model_type=7), "has no model_type"),
])
def test_a_config_without_model_type_is_one_line(hf_folder, tmp_path, edit, message):
    folder = _copy_folder(hf_folder, tmp_path / "typeless")
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidInputError, match=message) as caught:
        load_model(f"hf:{folder}", 2)
    assert str(folder) in _single_line(caught.value)


def test_a_config_that_is_not_an_object_is_one_line(hf_folder, tmp_path):
    folder = _copy_folder(hf_folder, tmp_path / "listed")
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(InvalidInputError, match="not a JSON object"):
        load_model(f"hf:{folder}", 2)


def test_the_clean_folder_still_loads(hf_folder):
    model, task = load_model(f"hf:{hf_folder}", 3)
    assert task.architecture == "bert" and model.config.num_labels == 3


def test_every_transformers_load_refuses_remote_code():
    """Every ``from_pretrained`` call in the package passes ``**HF_LOAD_SAFELY``
    (``trust_remote_code=False``)."""
    calls = []
    for path in sorted((REPO / "zest").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr == "from_pretrained":
                safe = any((k.arg is None and isinstance(k.value, ast.Name)
                            and k.value.id == "HF_LOAD_SAFELY")
                           or (k.arg == "trust_remote_code" and isinstance(k.value, ast.Constant)
                               and k.value.value is False) for k in node.keywords)
                calls.append((f"{path.name}:{node.lineno}", safe))
    assert len(calls) >= 5
    assert [where for where, safe in calls if not safe] == []


# -- 2. predictor files ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def predictor_file(tmp_path_factory):
    metrics, groundtruth = synthetic_records(n_groups=3, n_layers=12)
    table = join_records(metrics, groundtruth, "gt_loss_gain")
    ranker = ZestRanker(n_estimators=20).fit(table, table["gt_loss_gain"])
    path = ranker.save(tmp_path_factory.mktemp("predictor") / "p.json")
    return path, table, ranker.predict(table)


def _restamped(spec: dict) -> dict:
    spec = {k: v for k, v in spec.items() if k != CHECKSUM_KEY}
    return {**spec, CHECKSUM_KEY: content_checksum(spec)}


@pytest.fixture
def lightgbm_must_not_load(monkeypatch):
    import lightgbm

    def refuse(*args, **kwargs):
        raise AssertionError("a malformed model string reached LightGBM")

    monkeypatch.setattr(lightgbm, "Booster", refuse)


def test_saved_predictors_carry_a_checksum_and_their_feature_names(predictor_file):
    path, table, scores = predictor_file
    spec = json.loads(path.read_text())
    assert spec[CHECKSUM_KEY] == content_checksum(spec)
    assert "feature_names=" + " ".join(spec["features"]) in spec["model"]["lightgbm"]
    np.testing.assert_array_equal(ZestRanker.load(path).predict(table), scores)


def test_the_shipped_predictor_keeps_loading_and_both_copies_agree():
    shipped = REPO / "zest" / "predictors" / "universal.json"
    copy_ = REPO / "data" / "predictors" / "universal.json"
    assert shipped.read_bytes() == copy_.read_bytes()
    spec = json.loads(shipped.read_text())
    assert spec[CHECKSUM_KEY] == content_checksum(spec)
    ranker = ZestRanker.load(shipped)
    assert len(ranker.features_) == 36


@pytest.mark.parametrize("keep", [0.999, 0.5, 0.1])
def test_a_truncated_model_string_never_reaches_lightgbm(predictor_file, tmp_path, keep,
                                                         lightgbm_must_not_load):
    path, _, _ = predictor_file
    spec = json.loads(path.read_text())
    text = spec["model"]["lightgbm"]
    spec["model"]["lightgbm"] = text[:int(len(text) * keep)]
    damaged = tmp_path / "damaged.json"
    damaged.write_text(json.dumps(spec))  # the checksum no longer matches
    with pytest.raises(RecordError, match="checksum"):
        ZestRanker.load(damaged)
    damaged.write_text(json.dumps(_restamped(spec)))  # consistent, but truncated
    with pytest.raises(RecordError, match="LightGBM model") as caught:
        ZestRanker.load(damaged)
    _single_line(caught.value)


def test_rank_and_evaluate_predictor_on_a_truncated_predictor_are_one_line(predictor_file,
                                                                           tmp_path):
    path, _, _ = predictor_file
    damaged = tmp_path / "truncated.json"
    damaged.write_text(path.read_text()[: len(path.read_text()) // 2])
    result = runner.invoke(app, ["evaluate-predictor", "--predictor", str(damaged),
                                 "--records", str(tmp_path / "none"), "--out-dir",
                                 str(tmp_path / "eval"), "--report", str(tmp_path / "r.md")])
    assert "corrupt" in _one_line(result)
    spec = json.loads(path.read_text())
    spec["model"]["lightgbm"] = spec["model"]["lightgbm"][:5000]
    damaged.write_text(json.dumps(_restamped(spec)))
    result = runner.invoke(app, ["rank", "--model", "tiny_cnn", "--dataset", "digits",
                                 "--predictor", str(damaged)])
    assert "truncated" in _one_line(result)


def test_a_reordered_feature_list_is_refused(predictor_file, tmp_path):
    path, _, _ = predictor_file
    spec = json.loads(path.read_text())
    features = spec["features"]
    spec["features"] = [features[1], features[0], *features[2:]]
    spec["metrics"] = spec["features"][:len(spec["metrics"])]
    damaged = tmp_path / "reordered.json"
    damaged.write_text(json.dumps(spec))
    with pytest.raises(RecordError, match="checksum"):
        ZestRanker.load(damaged)
    damaged.write_text(json.dumps(_restamped(spec)))
    with pytest.raises(RecordError, match="differs from the one its LightGBM model"):
        ZestRanker.load(damaged)


def test_reordered_context_features_of_the_shipped_predictor_are_refused(tmp_path):
    spec = json.loads((REPO / "zest" / "predictors" / "universal.json").read_text())
    features = spec["features"]
    spec["features"] = features[:-2] + [features[-1], features[-2]]
    damaged = tmp_path / "reordered.json"
    damaged.write_text(json.dumps(_restamped(spec)))
    with pytest.raises(RecordError, match="out of order"):
        ZestRanker.load(damaged)


def test_a_predictor_without_checksum_is_refused(predictor_file, tmp_path):
    path, _, _ = predictor_file
    spec = json.loads(path.read_text())
    del spec[CHECKSUM_KEY]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(spec))
    with pytest.raises(RecordError, match="no sha256 checksum"):
        ZestRanker.load(old)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s["params"].update(n_estimators="200"), "n_estimators"),
    (lambda s: s["params"].update(use_context=1), "use_context"),
    (lambda s: s["params"].update(extra=1), "differ"),
    (lambda s: s.update(features="m_a"), "features"),
    (lambda s: s.update(metrics=[]), "metrics"),
    (lambda s: s.update(model=[]), "model"),
    (lambda s: s["model"].update(lightgbm=7), "no LightGBM model string"),
    (lambda s: s["model"].update(lightgbm=s["model"]["lightgbm"].replace(
        "num_class=1", "num_class=3")), "num_class"),
    (lambda s: s["model"].update(lightgbm=s["model"]["lightgbm"].replace(
        "left_child=", "left_child=9", 1)), "tree 0"),
])
def test_malformed_predictor_fields_are_one_line(predictor_file, tmp_path, edit, message,
                                                 lightgbm_must_not_load):
    path, _, _ = predictor_file
    spec = json.loads(path.read_text())
    edit(spec)
    damaged = tmp_path / "damaged.json"
    damaged.write_text(json.dumps(_restamped(spec)))
    with pytest.raises(RecordError, match=message) as caught:
        ZestRanker.load(damaged)
    _single_line(caught.value)


# -- 5. deltas -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def image_data():
    return load_pair("tiny_cnn", "digits", options=DataOptions(image_size=16, max_train=48,
                                                               max_val=16, max_test=16))


@pytest.fixture(scope="module")
def deltas(image_data):
    """A GPS, an SPSFT and a LoRA delta of the tiny image model (several entries each)."""
    model, task, data = image_data
    layers = [layer.name for layer in candidate_layers(model, task.head_name)][-3:]
    out = {}
    for name, tuner, options in (("gps", GPS, {"k": 2}), ("spsft", SPSFT, {"ratio": 0.25}),
                                 ("lora", LoRA, {"rank": 2})):
        fresh, fresh_task = load_model("tiny_cnn", task.num_classes)
        out[name] = tuner(fresh, fresh_task, layers=layers, **options).fit(
            data, epochs=1, batch_size=16).delta()
    return out, task.num_classes


def _base(num_classes: int):
    model, _ = load_model("tiny_cnn", num_classes)
    return model


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model, state) -> bool:
    return all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("edit", [
    lambda meta: meta.pop("base_fingerprint"),
    lambda meta: meta.update(base_fingerprint=None),
    lambda meta: meta.pop("model"),
])
def test_a_delta_that_does_not_record_its_base_is_refused_unless_told(deltas, edit):
    found, num_classes = deltas
    delta = copy.deepcopy(found["gps"])
    edit(delta.meta)
    base = _base(num_classes)
    state = _state(base)
    with pytest.raises(InvalidInputError, match="does not record its base") as caught:
        apply_delta(base, delta)
    assert "check_base=False" in _single_line(caught.value) and _unchanged(base, state)
    apply_delta(base, delta, check_base=False)
    expected = apply_delta(_base(num_classes), found["gps"])
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in expected.state_dict().items())


def test_apply_delta_no_check_base_cli(deltas, tmp_path):
    found, _ = deltas
    delta = copy.deepcopy(found["gps"])
    del delta.meta["base_fingerprint"]
    path = delta.save(tmp_path / "d.safetensors")
    args = ["apply-delta", "--model", "tiny_cnn", "--delta", str(path), "--out",
            str(tmp_path / "merged.safetensors")]
    assert "--no-check-base" in _one_line(runner.invoke(app, args))
    assert not (tmp_path / "merged.safetensors").exists()
    result = runner.invoke(app, [*args, "--no-check-base"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "merged.safetensors").is_file()


def _sparse_entry(delta: Delta):
    return [e for e in delta.entries if e.kind == "sparse_add"][0]


@pytest.mark.parametrize("method, corrupt, message", [
    ("gps", lambda e: e.tensors.update(indices=e.tensors["indices"].bool()), "integers"),
    ("spsft", lambda e: e.tensors.update(indices=e.tensors["indices"].bool()) if
     e.kind == "rows_add" else None, "integers"),
    ("gps", lambda e: e.tensors["indices"].__setitem__((slice(None), 1),
                                                       e.tensors["indices"][:, 0]), "twice"),
    ("gps", lambda e: e.tensors.update(indices=e.tensors["indices"].float()), "integers"),
    ("gps", lambda e: e.tensors.update(values=e.tensors["values"].long()), "floating"),
])
def test_indices_must_be_integers_in_range_and_unique(deltas, method, corrupt, message):
    found, num_classes = deltas
    delta = copy.deepcopy(found[method])
    for entry in delta.entries:
        if entry.kind in ("sparse_add", "rows_add"):
            corrupt(entry)
            break
    base = _base(num_classes)
    state = _state(base)
    with pytest.raises(InvalidInputError, match=message) as caught:
        apply_delta(base, delta)
    _single_line(caught.value)
    assert _unchanged(base, state)


def _rewrite_sidecar(path: Path, edit) -> None:
    sidecar = path.with_suffix(".json")
    spec = json.loads(sidecar.read_text())
    edit(spec)
    sidecar.write_text(json.dumps(spec))


@pytest.mark.parametrize("method, edit, message", [
    ("gps", lambda s: s.update(num_classes="10"), "num_classes"),
    ("gps", lambda s: s.update(num_classes=True), "num_classes"),
    ("lora", lambda s: [e["extra"].update(scaling="2.0") for e in s["entries"]
                        if e["kind"] == "lora"], "scaling"),
    ("gps", lambda s: s["entries"][0].update(shape="[1]"), "shape"),
    ("gps", lambda s: s["entries"][0].update(tensors={"indices": "no.such"}), "tensors"),
    ("gps", lambda s: s["entries"][0].update(kind=["sparse_add"]), "kind"),
    ("gps", lambda s: s.update(entries={}), "entries"),
])
def test_malformed_sidecars_are_one_line(deltas, tmp_path, method, edit, message):
    found, num_classes = deltas
    path = found[method].save(tmp_path / "d.safetensors")
    _rewrite_sidecar(path, edit)
    with pytest.raises(RecordError, match=message) as caught:
        apply_delta(_base(num_classes), path)
    _single_line(caught.value)
    result = runner.invoke(app, ["apply-delta", "--model", "tiny_cnn", "--delta", str(path),
                                 "--out", str(tmp_path / "m.safetensors")])
    _one_line(result)


@pytest.mark.parametrize("buffer", ["bn1.num_batches_tracked", "bn1.running_mean"])
def test_an_entry_naming_a_buffer_its_kind_cannot_change_is_one_line(deltas, buffer):
    found, num_classes = deltas
    delta = copy.deepcopy(found["gps"])
    base = _base(num_classes)
    entry = _sparse_entry(delta)
    entry.name, entry.shape = buffer, list(dict(base.named_buffers())[buffer].shape)
    state = _state(base)
    with pytest.raises(InvalidInputError) as caught:
        apply_delta(base, delta)
    assert buffer in _single_line(caught.value) and _unchanged(base, state)


# -- 6. train-predictor ----------------------------------------------------------------------

def _records(tmp_path: Path, metrics: pd.DataFrame, groundtruth: pd.DataFrame) -> Path:
    folder = tmp_path / "records"
    for kind, frame in (("metrics", metrics), ("groundtruth", groundtruth)):
        for group, part in frame.groupby("group"):
            write_records(part.reset_index(drop=True), folder / kind / f"{group}.parquet")
    return folder


def _train(folder: Path, tmp_path: Path, *extra: str):
    return runner.invoke(app, ["train-predictor", "--records", str(folder), "--out",
                               str(tmp_path / "p.json"), *extra])


def test_train_predictor_on_one_group_is_one_line(tmp_path):
    metrics, groundtruth = synthetic_records(n_groups=1, n_layers=8)
    line = _one_line(_train(_records(tmp_path, metrics, groundtruth), tmp_path,
                            "--features", "a,b,c"))
    assert "at least 2 complete groups" in line and "model0__data0" in line
    assert not (tmp_path / "p.json").exists()


def test_train_predictor_on_nan_targets_names_the_group(tmp_path):
    metrics, groundtruth = synthetic_records(n_groups=3, n_layers=8)
    groundtruth.loc[groundtruth["group"] == "model1__data1", "gt_loss_gain"] = np.nan
    line = _one_line(_train(_records(tmp_path, metrics, groundtruth), tmp_path,
                            "--features", "a,b,c"))
    assert "model1__data1" in line and "gt_loss_gain" in line and "NaN" in line


def test_train_predictor_on_disagreeing_metric_columns_names_group_and_column(tmp_path):
    metrics, groundtruth = synthetic_records(n_groups=3, n_layers=8)
    folder = _records(tmp_path, metrics, groundtruth)
    part = metrics[metrics["group"] == "model2__data2"].drop(columns=["m_c"])
    (folder / "metrics" / "model2__data2.parquet").unlink()
    write_records(part.reset_index(drop=True), folder / "metrics" / "model2__data2.parquet")
    line = _one_line(_train(folder, tmp_path, "--features", "a,b,c"))
    assert "model2__data2" in line and "m_c" in line


def test_train_predictor_with_no_features_is_one_line(tmp_path):
    metrics, groundtruth = synthetic_records(n_groups=3, n_layers=8)
    line = _one_line(_train(_records(tmp_path, metrics, groundtruth), tmp_path,
                            "--features", ","))
    assert "--features" in line


def test_train_predictor_on_string_metrics_names_group_and_column(tmp_path):
    metrics, groundtruth = synthetic_records(n_groups=3, n_layers=8)
    folder = _records(tmp_path, metrics, groundtruth)
    part = metrics[metrics["group"] == "model0__data0"].reset_index(drop=True)
    part["m_b"] = part["m_b"].map(lambda v: f"{v:.3f}")
    (folder / "metrics" / "model0__data0.parquet").unlink()
    write_records(part, folder / "metrics" / "model0__data0.parquet")
    line = _one_line(_train(folder, tmp_path, "--features", "a,b,c"))
    assert "model0__data0" in line and "m_b" in line and "not numbers" in line


def test_train_predictor_still_trains_on_good_records(tmp_path):
    metrics, groundtruth = synthetic_records(n_groups=3, n_layers=8)
    result = _train(_records(tmp_path, metrics, groundtruth), tmp_path, "--features", "a,b,c")
    assert result.exit_code == 0, result.output
    assert ZestRanker.load(tmp_path / "p.json").groups_ == sorted(metrics["group"].unique())


# -- 7. remaining tracebacks -----------------------------------------------------------------

@pytest.mark.parametrize("labels", [[[1, 2], [3]], [{"a": 1}, {"b": 2}]])
def test_parquet_labels_of_lists_or_dicts_are_one_line(tmp_path, labels):
    path = tmp_path / "d.parquet"
    pd.DataFrame({"text": ["one", "two"] * 10, "label": labels * 10}).to_parquet(path)
    with pytest.raises(DataError, match="one string or integer per row") as caught:
        zest.load_dataset(f"parquet:{path}")
    _single_line(caught.value)


def test_an_image_over_the_decompression_bomb_limit_is_one_line(tmp_path, monkeypatch):
    from PIL import Image

    for label in ("a", "b"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (12, 12), (i * 40, 0, 0)).save(tmp_path / "images" / label /
                                                            f"{i}.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # 144 pixels > 2 × 50
    with pytest.raises(DataError, match="decompression bomb") as caught:
        zest.load_dataset(f"imagefolder:{tmp_path / 'images'}")
    _single_line(caught.value)


def test_non_finite_float_options_are_one_line(image_data, tmp_path):
    model, task, _ = image_data
    layers = [candidate_layers(model, task.head_name)[-1].name]
    with pytest.raises(InvalidInputError, match="^ratio must be a finite number"):
        SPSFT(model, task, layers=layers, ratio=float("nan"))
    with pytest.raises(InvalidInputError, match="^weight_decay must be a finite number"):
        GPS(model, task, layers=layers, weight_decay=float("inf"))
    result = runner.invoke(app, ["finetune", "--model", "tiny_cnn", "--dataset", "digits",
                                 "--method", "spsft", "--ratio", "nan", "--epochs", "1",
                                 "--image-size", "16", "--max-train", "32", "--out",
                                 str(tmp_path / "run")])
    assert "--ratio must be a finite number, got nan" in _one_line(result)


def test_a_weight_memo_file_of_other_value_types_is_recomputed(monkeypatch, tmp_path):
    from tests.conftest import batch_for
    from zest.fingerprint import model_fingerprint
    from zest.frames import metrics_frame
    from zest.metrics import weight_memos

    monkeypatch.setenv("ZEST_CACHE_DIR", str(tmp_path))
    weight_memos.clear()
    model, task = load_model("tiny_cnn", 3, seed=0)
    layer = candidate_layers(model, task.head_name)[0].name
    path = weight_memos.memo_path(model_fingerprint(model, task.head_name))
    path.parent.mkdir(parents=True)
    torch.save({layer: {"weight_norm": "large", "singular_values": torch.tensor([1, 2])}}, path)
    frame = metrics_frame(model, task, [batch_for(task)],
                          metrics=["weight_norm", "spectral_norm"]).set_index("layer")
    weight = model.get_submodule(layer).weight.detach().double()
    assert frame.loc[layer, "m_weight_norm"] == pytest.approx(float(weight.norm()), rel=1e-6)
    rewritten = torch.load(path, weights_only=True)
    assert isinstance(rewritten[layer]["weight_norm"], float)
    weight_memos.clear()


# -- 8. property tests: damaged deltas and predictor files -----------------------------------

def _reference_merge(state: dict[str, torch.Tensor], delta: Delta) -> dict[str, torch.Tensor]:
    """What applying ``delta`` must give, computed entry by entry, value by value."""
    merged = {k: v.clone() for k, v in state.items()}
    for entry in delta.entries:
        weight = merged[entry.name]
        if entry.kind == "replace":
            merged[entry.name] = entry.tensors["value"].to(weight.dtype).clone()
            continue
        transposed = entry.extra.get("transposed") and weight.ndim == 2
        view = weight.T.contiguous() if transposed else weight.clone()
        flat = view.reshape(view.shape[0], -1)
        if entry.kind == "sparse_add":
            indices, values = entry.tensors["indices"], entry.tensors["values"]
            for row in range(indices.shape[0]):
                for k in range(indices.shape[1]):
                    flat[row, int(indices[row, k])] += values[row, k].to(weight.dtype)
        elif entry.kind == "rows_add":
            rows = entry.tensors["rows"].to(weight.dtype).reshape(len(entry.tensors["indices"]),
                                                                   -1)
            for j, row in enumerate(entry.tensors["indices"].tolist()):
                flat[row] += rows[j]
        else:
            a = entry.tensors["A"].to(weight.dtype)
            b = entry.tensors["B"].to(weight.dtype)
            scaling = float(entry.extra.get("scaling", 1.0))
            if entry.extra.get("embedding"):
                change = (b @ a).T
            else:
                change = b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)
            flat += change.reshape(flat.shape) * scaling
        updated = flat.reshape(view.shape)
        merged[entry.name] = updated.T.contiguous() if transposed else updated
    return merged


_JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 300),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
                         st.lists(st.integers(0, 5), max_size=3))
_TENSOR_EDITS = ("offset", "negate", "bool", "float", "int8", "duplicate", "drop_row",
                 "nan_values", "int_values", "drop_tensor", "transpose")


def _damage_tensors(entry_tensors: dict, edit: str, amount: int) -> None:
    key = "indices" if "indices" in entry_tensors else next(iter(entry_tensors))
    value_key = next(k for k in entry_tensors if k != "indices")
    tensor = entry_tensors[key]
    if edit == "offset":
        entry_tensors[key] = tensor + amount
    elif edit == "negate":
        entry_tensors[key] = -tensor - 1
    elif edit == "bool":
        entry_tensors[key] = tensor.bool()
    elif edit == "float":
        entry_tensors[key] = tensor.float()
    elif edit == "int8":
        entry_tensors[key] = tensor.to(torch.int8)
    elif edit == "duplicate" and tensor.ndim == 2 and tensor.shape[1] > 1:
        tensor = tensor.clone()
        tensor[:, -1] = tensor[:, 0]
        entry_tensors[key] = tensor
    elif edit == "duplicate" and tensor.ndim == 1 and len(tensor) > 1:
        tensor = tensor.clone()
        tensor[-1] = tensor[0]
        entry_tensors[key] = tensor
    elif edit == "drop_row":
        entry_tensors[key] = tensor[: max(0, len(tensor) - 1 - amount % 3)]
    elif edit == "nan_values":
        values = entry_tensors[value_key].clone()
        if values.is_floating_point() and values.numel():
            values.view(-1)[amount % values.numel()] = float("nan")
        entry_tensors[value_key] = values
    elif edit == "int_values":
        entry_tensors[value_key] = entry_tensors[value_key].long()
    elif edit == "drop_tensor":
        entry_tensors.pop(value_key)
    elif edit == "transpose" and entry_tensors[value_key].ndim >= 2:
        entry_tensors[value_key] = entry_tensors[value_key].transpose(0, 1).contiguous()


@PROPERTY
@given(method=st.sampled_from(["gps", "spsft", "lora"]), data=st.data())
def test_damaged_deltas_are_one_line_or_applied_exactly(deltas, tmp_path, method, data):
    found, num_classes = deltas
    delta = copy.deepcopy(found[method])
    index = data.draw(st.integers(0, len(delta.entries) - 1), label="entry")
    entry = delta.entries[index]
    target = data.draw(st.sampled_from(["tensors", "sidecar", "entry"]), label="target")
    if target == "tensors":
        _damage_tensors(entry.tensors, data.draw(st.sampled_from(_TENSOR_EDITS), label="edit"),
                        data.draw(st.integers(1, 10_000), label="amount"))
    folder = Path(tmp_path) / f"d{data.draw(st.integers(0, 10**9), label='name')}"
    path = delta.save(folder / "d.safetensors")
    if target != "tensors":
        key = data.draw(st.sampled_from(
            ["num_classes", "model", "head", "base_fingerprint", "seed", "task_kind",
             "layers", "method"] if target == "sidecar" else
            ["name", "kind", "shape", "tensors", "extra", "scaling", "transposed",
             "embedding"]), label="key")
        value = data.draw(_JSON_VALUES, label="value")
        remove = data.draw(st.booleans(), label="remove")

        def edit(spec):
            where = spec if target == "sidecar" else spec["entries"][index]
            if key in ("scaling", "transposed", "embedding"):
                where = where.setdefault("extra", {})
            if remove:
                where.pop(key, None)
            else:
                where[key] = value

        _rewrite_sidecar(path, edit)
    base = _base(num_classes)
    state = _state(base)
    try:
        loaded = Delta.load(path)
        apply_delta(base, loaded)
    except ZestError as error:
        _single_line(error)
        assert _unchanged(base, state)
        event("refused")
        return
    event("applied")
    expected = _reference_merge(state, loaded)
    for name, value in base.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=1e-6, atol=1e-6)


@PROPERTY
@given(edit=st.sampled_from(["truncate_file", "truncate_model", "reorder", "garbage",
                             "swap_lines", "delete_line", "digit"]),
       restamp=st.booleans(), position=st.floats(0.0, 1.0), garbage=st.text(max_size=12))
def test_damaged_predictor_files_are_one_line_or_load_intact(predictor_file, tmp_path, edit,
                                                             restamp, position, garbage):
    path, table, scores = predictor_file
    text = path.read_text()
    spec = json.loads(text)
    model = spec["model"]["lightgbm"]
    at = int(position * (len(model) - 1))
    lines = model.split("\n")
    line = int(position * (len(lines) - 1))
    if edit == "truncate_file":
        damaged_text = text[: int(position * (len(text) - 1))]
    else:
        if edit == "truncate_model":
            spec["model"]["lightgbm"] = model[:at]
        elif edit == "reorder":
            features = spec["features"]
            i = line % len(features)
            features[i], features[-1 - i] = features[-1 - i], features[i]
        elif edit == "garbage":
            spec["model"]["lightgbm"] = model[:at] + garbage + model[at + len(garbage):]
        elif edit == "swap_lines":
            lines[line], lines[-1 - line] = lines[-1 - line], lines[line]
            spec["model"]["lightgbm"] = "\n".join(lines)
        elif edit == "delete_line":
            del lines[line]
            spec["model"]["lightgbm"] = "\n".join(lines)
        else:
            digits = [i for i, c in enumerate(model) if c.isdigit()]
            i = digits[int(position * (len(digits) - 1))]
            spec["model"]["lightgbm"] = model[:i] + str((int(model[i]) + 7) % 10) + model[i + 1:]
        damaged_text = json.dumps(_restamped(spec) if restamp else spec)
    damaged = Path(tmp_path) / "damaged.json"
    damaged.write_text(damaged_text)
    try:
        ranker = ZestRanker.load(damaged)
    except ZestError as error:
        _single_line(error)
        event("refused")
        return
    changed = json.loads(damaged_text) != json.loads(text)
    event("loaded, changed" if changed else "loaded, unchanged")
    predicted = ranker.predict(table)
    if not changed:
        np.testing.assert_array_equal(predicted, scores)
    else:  # only a consistently re-stamped file can load, and it must still predict
        assert restamp and np.isfinite(predicted).all()

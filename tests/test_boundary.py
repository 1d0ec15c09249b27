"""The boundary: every bad input is one line and exit 1 (CLI) or an InvalidInputError-family
error (API), nothing is written or changed, and no traceback reaches the user."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from zest.cli import app
from zest.errors import InvalidInputError, ZestError
from zest.loading import DataOptions, load_pair

runner = CliRunner()
FAST = settings(max_examples=25, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def _fingerprint(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line_failure(result) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output




bad_counts = st.integers(max_value=0)
bad_shares = st.one_of(st.floats(max_value=0.0, allow_nan=False),
                       st.floats(min_value=1.0, exclude_min=True, allow_infinity=False))


@FAST
@given(option=st.sampled_from(["--top-k", "--image-size", "--max-train", "--batches"]),
       value=bad_counts)
def test_generated_non_positive_counts_are_refused_before_loading(no_loading, option, value):
    result = runner.invoke(app, ["rank", "--model", "tiny_cnn", "--dataset", "digits", option,
                                 str(value)])
    _one_line_failure(result)


@FAST
@given(share=bad_shares, command=st.sampled_from(["rank", "finetune"]))
def test_generated_budgets_outside_the_unit_interval_are_refused(no_loading, tmp_path, share,
                                                                 command):
    extra = ["--out", str(tmp_path / "run")] if command == "finetune" else []
    result = runner.invoke(app, [command, "--model", "tiny_cnn", "--dataset", "digits",
                                 "--param-budget", repr(share), *extra])
    _one_line_failure(result)
    assert not (tmp_path / "run").exists()


@FAST
@given(content=st.binary(max_size=300))
def test_generated_garbage_files_are_one_line_errors(tmp_path_factory, content):
    folder = tmp_path_factory.mktemp("garbage")
    for name in ("data.npz", "weights.safetensors", "weights.pt", "predictor.json"):
        (folder / name).write_bytes(content)
    before = _fingerprint(folder)
    commands = [
        ["rank", "--model", "tiny_cnn", "--dataset", f"npz:{folder / 'data.npz'}"],
        ["rank", "--model", "timm:test_efficientnet", "--dataset", "digits", "--max-train",
         "32", "--checkpoint", str(folder / "weights.safetensors")],
        ["rank", "--model", "timm:test_efficientnet", "--dataset", "digits", "--max-train",
         "32", "--checkpoint", str(folder / "weights.pt")],
        ["rank", "--model", "tiny_cnn", "--dataset", "digits", "--predictor",
         str(folder / "predictor.json")],
    ]
    for command in commands:
        _one_line_failure(runner.invoke(app, command))
    assert _fingerprint(folder) == before


@pytest.mark.parametrize("make_path", [
    lambda tmp: tmp / "afile" / "x.csv",  # under a file
    lambda tmp: tmp / "folder",  # a folder where a file is expected
])
@pytest.mark.parametrize("option", ["--out", "--plot"])
def test_unwritable_rank_outputs_fail_before_the_work(no_loading, tmp_path, make_path, option):
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "folder").mkdir()
    path = make_path(tmp_path)
    if option == "--plot" and path.suffix:
        path = path.with_suffix(".png")
    result = runner.invoke(app, ["rank", "--model", "tiny_cnn", "--dataset", "digits", option,
                                 str(path)])
    _one_line_failure(result)
    assert (tmp_path / "afile").read_text() == "mine"


def test_unwritable_evaluation_outputs_fail_before_the_work(tmp_path):
    (tmp_path / "afile").write_text("mine")
    for args in (["--out-dir", str(tmp_path / "afile")],
                 ["--out-dir", str(tmp_path / "ev"), "--report", str(tmp_path / "afile" / "r.md")]):
        result = runner.invoke(app, ["evaluate-predictor", "--predictor", "universal",
                                     "--records", str(tmp_path / "none"), *args])
        _one_line_failure(result)
    assert (tmp_path / "afile").read_text() == "mine"


def test_train_predictor_into_a_folder_leaves_nothing_behind(tmp_path):
    (tmp_path / "out").mkdir()
    result = runner.invoke(app, ["train-predictor", "--records", str(tmp_path / "none"),
                                 "--out", str(tmp_path / "out")])
    _one_line_failure(result)
    assert list((tmp_path / "out").iterdir()) == []


def test_a_npy_file_named_npz_and_a_truncated_npz(tmp_path):
    np.save(tmp_path / "array.npy", np.zeros(3))
    (tmp_path / "array.npy").rename(tmp_path / "fake.npz")
    np.savez(tmp_path / "good.npz", x=np.random.rand(40, 1, 8, 8).astype("float32"),
             y=np.arange(40) % 2)
    (tmp_path / "cut.npz").write_bytes((tmp_path / "good.npz").read_bytes()[:200])
    for name, message in (("fake.npz", "single array"), ("cut.npz", "truncated")):
        result = runner.invoke(app, ["rank", "--model", "tiny_cnn", "--dataset",
                                     f"npz:{tmp_path / name}"])
        _one_line_failure(result)
        assert message in result.output


def test_a_checkpoint_that_is_not_a_state_dict(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    result = runner.invoke(app, ["rank", "--model", "timm:test_efficientnet", "--dataset",
                                 "digits", "--checkpoint", str(tmp_path / "list.pt")])
    _one_line_failure(result)
    assert "not a state dict" in result.output


@pytest.mark.parametrize("field, value, message", [
    (("params", "backend"), "xgboost", "unknown backend"),
    (("features",), ["m_n_params"], "features do not start with its metrics"),
    (("model", "lightgbm"), "tree\nversion=v4\ngarbage", "LightGBM"),
])
def test_corrupt_predictor_files_fail_before_the_probe(tmp_path, no_loading, field, value,
                                                       message):
    from zest.predictor import content_checksum
    from zest.ranking import shipped_predictor_path

    spec = json.loads(shipped_predictor_path().read_text())
    target = spec
    for key in field[:-1]:
        target = target[key]
    target[field[-1]] = value
    spec["sha256"] = content_checksum(spec)  # a consistent file: its structure is what fails
    (tmp_path / "p.json").write_text(json.dumps(spec))
    result = runner.invoke(app, ["rank", "--model", "tiny_cnn", "--dataset", "digits",
                                 "--predictor", str(tmp_path / "p.json")])
    _one_line_failure(result)
    assert message in result.output


@pytest.fixture(scope="module")
def image_pair():
    return load_pair("tiny_cnn", "digits", options=DataOptions(image_size=16, max_train=64))


@FAST
@given(extra=st.integers(min_value=1, max_value=20),
       shift=st.integers(min_value=10, max_value=10**9))
def test_generated_malformed_api_batches_are_refused(image_pair, extra, shift):
    import zest

    model, task, data = image_pair
    x, y = data.batches("train", 16, 1)[0]
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    for batch in ((x, torch.cat([y, y[:extra]])), (x, y + shift), (x.numpy(), y),
                  (x[0], y)):
        with pytest.raises(InvalidInputError):
            zest.rank(model, task, batch)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in snapshot.items())


def test_an_all_zero_attention_mask_and_an_images_labels_list():
    import zest

    model, task, data = load_pair("tiny_bert", "r8", options=DataOptions(max_length=16,
                                                                       max_train=32))
    batch = dict(data.batches("train", 8, 1)[0])
    batch["attention_mask"] = batch["attention_mask"].clone()
    batch["attention_mask"][3] = 0
    with pytest.raises(InvalidInputError, match="text 3 has an all-zero attention mask"):
        zest.rank(model, task, batch)
    model, task, data = load_pair("tiny_cnn", "digits", options=DataOptions(image_size=16,
                                                                          max_train=32))
    x, y = data.batches("train", 8, 1)[0]
    ranking = zest.rank(model, task, [x, y])  # a list pair is one labelled batch
    assert ranking.table["score"].notna().all()


@FAST
@given(kind=st.sampled_from(["indices", "values", "shape"]), value=st.integers(1, 10_000))
def test_generated_corrupt_gps_deltas_change_nothing(image_pair, kind, value):
    from zest.finetune import GPS, apply_delta
    from zest.layers import candidate_layers
    from zest.models import load_model

    global _GPS_DELTA
    model, task, data = image_pair
    if "_GPS_DELTA" not in globals():
        layers = [layer.name for layer in candidate_layers(model, task.head_name)][-3:]
        fresh, fresh_task = load_model("tiny_cnn", task.num_classes)
        _GPS_DELTA = GPS(fresh, fresh_task, layers=layers, k=2).fit(
            data, epochs=1, batch_size=16).delta()
    delta = copy.deepcopy(_GPS_DELTA)
    entry = [e for e in delta.entries if e.kind == "sparse_add"][-1]
    if kind == "indices":
        entry.tensors["indices"] = entry.tensors["indices"] + value * 1000
    elif kind == "values":
        entry.tensors["values"] = torch.cat([entry.tensors["values"]] * (1 + value % 3)
                                            + [entry.tensors["values"][:, :1]], dim=1)
    else:
        entry.tensors["indices"] = entry.tensors["indices"][: -(1 + value % 3)]
    base, _ = load_model("tiny_cnn", task.num_classes)
    snapshot = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ZestError):
        apply_delta(base, delta)
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in snapshot.items())


def test_unreachable_dask_scheduler_is_one_line(tmp_path):
    pytest.importorskip("dask.distributed")
    result = runner.invoke(app, ["collect", "groundtruth", "--model", "tiny_cnn", "--dataset",
                                 "digits", "--max-train", "64", "--steps", "1", "--backend",
                                 "dask", "--scheduler", "tcp://127.0.0.1:9", "--out",
                                 str(tmp_path / "gt.parquet")])
    _one_line_failure(result)
    assert "cannot reach the dask scheduler" in result.output


@pytest.mark.slow
def test_dask_workers_find_relative_data_paths(tmp_path, monkeypatch):
    distributed = pytest.importorskip("dask.distributed")
    from zest.groundtruth import GroundTruthConfig, collect_groundtruth

    np.savez(tmp_path / "good.npz", x=np.random.rand(240, 1, 8, 8).astype("float32"),
             y=np.arange(240) % 3)
    work = tmp_path / "elsewhere"
    work.mkdir()
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address=None) as cluster:
        monkeypatch.chdir(tmp_path)  # the driver sees good.npz; the worker started elsewhere
        frame = collect_groundtruth("tiny_cnn", "npz:good.npz", tmp_path / "gt.parquet",
                                    config=GroundTruthConfig(steps=1, batch_size=16),
                                    seeds=[0], options=DataOptions(image_size=16),
                                    layer_names=["conv_stem"], backend="dask",
                                    scheduler=cluster.scheduler_address)
    assert list(frame["dataset"].unique()) == ["npz:good.npz"] and len(frame) == 1


@pytest.mark.slow
def test_a_dask_cluster_without_workers_says_so(tmp_path, monkeypatch):
    distributed = pytest.importorskip("dask.distributed")
    import zest.groundtruth.executors
    from zest.groundtruth import GroundTruthConfig, collect_groundtruth

    monkeypatch.setattr(zest.groundtruth.executors, "DASK_NO_WORKER_SECONDS", 10.0)
    with distributed.LocalCluster(n_workers=0, processes=True, host="127.0.0.1",
                                  dashboard_address=None) as cluster, \
            pytest.raises(InvalidInputError, match="no worker for 10 s; finished rows are kept"):
        collect_groundtruth("tiny_cnn", "digits", tmp_path / "gt.parquet",
                            config=GroundTruthConfig(steps=1, batch_size=16), seeds=[0],
                            options=DataOptions(image_size=16, max_train=64, max_val=40),
                            layer_names=["conv_stem"], backend="dask",
                            scheduler=cluster.scheduler_address)

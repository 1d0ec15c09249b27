"""Ground-truth collector: cache equivalence, resumability, parallel backends, bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from zest.errors import InvalidInputError, RecordError, UnknownNameError
from zest.groundtruth import GroundTruthConfig, batch_order, collect_groundtruth
from zest.loading import DataOptions
from zest.records import read_records

OPTIONS = DataOptions(image_size=16, max_train=96, max_val=48)
VALUE_COLUMNS = ["gt_score", "gt_baseline", "gt_gain", "gt_loss", "gt_loss_baseline",
                 "gt_loss_gain"]


def _sorted(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(["gt_seed", "layer"]).reset_index(drop=True)


def _run(tmp_path: Path, name: str, **kwargs) -> pd.DataFrame:
    config = kwargs.pop("config", GroundTruthConfig(steps=3, batch_size=16))
    return collect_groundtruth(kwargs.pop("model", "tiny_cnn"), "digits", tmp_path / name,
                               config=config, seeds=kwargs.pop("seeds", [0]),
                               options=kwargs.pop("options", OPTIONS), **kwargs)


@pytest.mark.parametrize("model", ["tiny_cnn", "tiny_bert", "tiny_llama"])
def test_cached_and_uncached_give_the_same_records(tmp_path, model):
    dataset_options = OPTIONS if model == "tiny_cnn" else DataOptions(max_length=24,
                                                                      max_train=96, max_val=48)
    kwargs = dict(model=model, options=dataset_options, seeds=[0, 1])
    if model != "tiny_cnn":
        cached = collect_groundtruth(model, "rotten_tomatoes", tmp_path / "a.parquet",
                                     config=GroundTruthConfig(steps=3, batch_size=16),
                                     seeds=[0, 1], options=dataset_options)
        plain = collect_groundtruth(model, "rotten_tomatoes", tmp_path / "b.parquet",
                                    config=GroundTruthConfig(steps=3, batch_size=16,
                                                             use_cache=False),
                                    seeds=[0, 1], options=dataset_options)
    else:
        cached = _run(tmp_path, "a.parquet", **kwargs)
        plain = _run(tmp_path, "b.parquet",
                     config=GroundTruthConfig(steps=3, batch_size=16, use_cache=False), **kwargs)
    assert cached["gt_cached"].all() and not plain["gt_cached"].any()
    a, b = _sorted(cached), _sorted(plain)
    assert list(a["layer"]) == list(b["layer"])
    pd.testing.assert_frame_equal(a[VALUE_COLUMNS], b[VALUE_COLUMNS], atol=1e-4, rtol=1e-4)
    # the cached run computed the train prefix only for the examples the last seed's 3 batches
    # of 16 draw, not for the split's 96
    import torch

    from zest.groundtruth import PairSpec
    from zest.groundtruth.caches import PREFIXES

    pair = PairSpec(model, "digits" if model == "tiny_cnn" else "rotten_tomatoes",
                    dataset_options)
    held = PREFIXES[(pair.key(), GroundTruthConfig().eval_batch_size, "train")]
    assert torch.equal(held.examples, torch.unique(torch.cat(batch_order(96, 16, 3, seed=1))))
    assert len(held.examples) == 48 and next(iter(held.state.values())).shape[0] == 48


def test_records_have_schema_and_one_row_per_layer_and_seed(tmp_path):
    frame = _run(tmp_path, "gt.parquet", seeds=[0, 1])
    assert not frame.duplicated(["layer", "gt_seed"]).any()
    assert len(frame) == 2 * frame["layer"].nunique()
    assert (frame["gt_gain"] - (frame["gt_score"] - frame["gt_baseline"])).abs().max() < 1e-12
    assert (frame["gt_loss_gain"]
            - (frame["gt_loss_baseline"] - frame["gt_loss"])).abs().max() < 1e-12
    for column in ("gt_steps", "gt_lr", "gt_seed", "gt_seconds", "layer_type", "depth"):
        assert column in frame
    # the baseline is shared by every layer of a seed
    assert frame.groupby("gt_seed")["gt_baseline"].nunique().max() == 1


def test_a_layer_sample_is_stratified_stamped_and_resumed(tmp_path):
    from zest.layers import candidate_layers, stratified_layers
    from zest.loading import load_pair
    from zest.records import record_settings

    model, task, _ = load_pair("tiny_cnn", "digits", options=OPTIONS)
    expected = [layer.name for layer in stratified_layers(
        candidate_layers(model, task.head_name), 3)]
    frame = _run(tmp_path, "s.parquet", layer_sample=3)
    assert sorted(frame["layer"].unique()) == sorted(expected)
    assert (frame["gt_layer_sample"] == 3).all()
    assert record_settings(tmp_path / "s.parquet")["gt_layer_sample"] == 3
    again = _run(tmp_path, "s.parquet", layer_sample=3)  # resumes: nothing left to do
    assert len(again) == len(frame)
    with pytest.raises(RecordError, match="gt_layer_sample"):
        _run(tmp_path, "s.parquet", layer_sample=2)
    with pytest.raises(RecordError, match="gt_layer_sample"):
        _run(tmp_path, "s.parquet")  # the whole model is another setting
    with pytest.raises(InvalidInputError, match="layer_sample and layer_names"):
        _run(tmp_path, "t.parquet", layer_sample=2, layer_names=["conv_stem"])
    whole = _run(tmp_path, "w.parquet", layer_sample=1000)  # as large as the model: no sample
    assert "gt_layer_sample" not in whole


def test_batch_order_is_seeded_and_covers_epochs():
    a = batch_order(10, 4, 6, seed=3)
    b = batch_order(10, 4, 6, seed=3)
    assert all((x == y).all() for x, y in zip(a, b, strict=True))
    assert len(a) == 6 and all(len(x) == 4 for x in a)
    first_epoch = set(int(i) for batch in a[:2] for i in batch)
    assert len(first_epoch) == 8


def test_resume_skips_done_rows(tmp_path):
    full = _run(tmp_path, "full.parquet")
    partial = _run(tmp_path, "part.parquet", layer_names=["conv_stem"])
    assert set(partial["layer"]) == {"conv_stem"}
    resumed = _run(tmp_path, "part.parquet")
    pd.testing.assert_frame_equal(_sorted(full)[VALUE_COLUMNS], _sorted(resumed)[VALUE_COLUMNS])


SCRIPT = """
import sys
from zest.loading import DataOptions
from zest.groundtruth import GroundTruthConfig, collect_groundtruth
collect_groundtruth("tiny_cnn", "digits", sys.argv[1],
                    config=GroundTruthConfig(steps=int(sys.argv[2]), batch_size=16),
                    seeds=[0, 1], options=DataOptions(image_size=16, max_train=96, max_val=48))
"""


@pytest.mark.slow
def test_sigkill_and_restart_gives_the_uninterrupted_records(tmp_path):
    steps = "40"
    reference = tmp_path / "reference.parquet"
    subprocess.run([sys.executable, "-c", SCRIPT, str(reference), steps], check=True)
    target = tmp_path / "killed.parquet"
    process = subprocess.Popen([sys.executable, "-c", SCRIPT, str(target), steps])
    deadline = time.time() + 120
    while time.time() < deadline and not target.exists():
        time.sleep(0.05)
    assert target.exists(), "the collector wrote nothing before the deadline"
    time.sleep(0.3)
    process.send_signal(signal.SIGKILL)
    process.wait()
    rows_at_kill = len(read_records(target))
    expected = read_records(reference)
    assert rows_at_kill < len(expected), "killed too late to test resumption"
    subprocess.run([sys.executable, "-c", SCRIPT, str(target), steps], check=True)
    resumed = read_records(target)
    assert len(resumed) == len(expected)
    assert not resumed.duplicated(["layer", "gt_seed"]).any()
    pd.testing.assert_frame_equal(_sorted(expected)[VALUE_COLUMNS],
                                  _sorted(resumed)[VALUE_COLUMNS], atol=1e-5, rtol=1e-5)
    leftovers = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert not leftovers


def test_joblib_workers_give_the_serial_records(tmp_path):
    serial = _run(tmp_path, "serial.parquet", seeds=[0, 1])
    parallel = _run(tmp_path, "parallel.parquet", seeds=[0, 1], n_jobs=2)
    pd.testing.assert_frame_equal(_sorted(serial)[VALUE_COLUMNS],
                                  _sorted(parallel)[VALUE_COLUMNS], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_dask_local_cluster_gives_the_serial_records(tmp_path):
    distributed = pytest.importorskip("dask.distributed")
    serial = _run(tmp_path, "serial.parquet", seeds=[0, 1])
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address=None) as cluster:
        remote = _run(tmp_path, "dask.parquet", seeds=[0, 1], backend="dask",
                      scheduler=cluster.scheduler_address)
    pd.testing.assert_frame_equal(_sorted(serial)[VALUE_COLUMNS],
                                  _sorted(remote)[VALUE_COLUMNS], atol=1e-5, rtol=1e-5)


def test_unknown_layer_suggests_close_names(tmp_path):
    with pytest.raises(UnknownNameError, match="conv_stem"):
        _run(tmp_path, "x.parquet", layer_names=["conv_stemm"])
    assert not (tmp_path / "x.parquet").exists()


@pytest.mark.parametrize("steps", [0, -3])
def test_non_positive_steps(steps):
    with pytest.raises(InvalidInputError, match=f"^steps must be an integer ≥ 1, got {steps}$"):
        GroundTruthConfig(steps=steps)


def test_refuses_to_append_to_another_group_or_setting(tmp_path):
    _run(tmp_path, "g.parquet", layer_names=["conv_stem"])
    before = (tmp_path / "g.parquet").read_bytes()
    with pytest.raises(RecordError, match="group"):
        _run(tmp_path, "g.parquet", model="tiny_resnet")
    with pytest.raises(RecordError, match="gt_steps"):
        _run(tmp_path, "g.parquet", config=GroundTruthConfig(steps=4, batch_size=16))
    assert (tmp_path / "g.parquet").read_bytes() == before


@pytest.mark.parametrize("change", [
    {"data_seed": 5},
    {"options": DataOptions(image_size=16, max_train=80, max_val=48)},
    {"options": DataOptions(image_size=20, max_train=96, max_val=48)},
    {"config": GroundTruthConfig(steps=3, batch_size=16, lr=2e-3)},
    {"config": GroundTruthConfig(steps=3, batch_size=8)},
])
def test_resume_with_other_settings_is_refused_naming_the_difference(tmp_path, change):
    _run(tmp_path, "g.parquet", layer_names=["conv_stem"])
    before = (tmp_path / "g.parquet").read_bytes()
    with pytest.raises(RecordError, match="collected with") as info:
        _run(tmp_path, "g.parquet", **change)
    setting = next(iter(change))
    named = {"data_seed": "data_seed", "options": ("max_train", "gt_train_size", "image_size"),
             "config": ("gt_lr", "gt_batch_size")}[setting]
    assert any(name in str(info.value) for name in
               ((named,) if isinstance(named, str) else named))
    assert (tmp_path / "g.parquet").read_bytes() == before


def test_no_collector_writes_over_a_file_of_the_other_kind(tmp_path):
    from typer.testing import CliRunner

    from zest.cli import app

    _run(tmp_path, "gt.parquet", layer_names=["conv_stem"])
    common = ["--model", "tiny_cnn", "--dataset", "digits", "--max-train", "64", "-q"]
    runner = CliRunner()
    before = (tmp_path / "gt.parquet").read_bytes()
    result = runner.invoke(app, ["collect", "metrics", *common, "--out",
                                 str(tmp_path / "gt.parquet")])
    assert result.exit_code == 1 and "ground-truth record file" in result.output
    assert (tmp_path / "gt.parquet").read_bytes() == before
    result = runner.invoke(app, ["collect", "metrics", *common, "--out",
                                 str(tmp_path / "m.parquet")])
    assert result.exit_code == 0, result.output
    metrics_bytes = (tmp_path / "m.parquet").read_bytes()
    result = runner.invoke(app, ["collect", "groundtruth", *common, "--steps", "2", "--out",
                                 str(tmp_path / "m.parquet")])
    assert result.exit_code == 1 and "metric record file" in result.output
    assert "Traceback" not in result.output
    assert (tmp_path / "m.parquet").read_bytes() == metrics_bytes
    (tmp_path / "notes.parquet").write_text("my notes")
    result = runner.invoke(app, ["collect", "metrics", *common, "--out",
                                 str(tmp_path / "notes.parquet")])
    assert result.exit_code == 1 and "zest did not write" in result.output
    assert (tmp_path / "notes.parquet").read_text() == "my notes"
    result = runner.invoke(app, ["train-predictor", "--records", str(tmp_path), "--out",
                                 str(tmp_path / "m.parquet")])
    assert result.exit_code == 1 and "not a zest predictor" in result.output
    assert (tmp_path / "m.parquet").read_bytes() == metrics_bytes


def test_record_files_carry_kind_and_settings(tmp_path):
    from zest.records import record_kind, record_settings

    _run(tmp_path, "gt.parquet", layer_names=["conv_stem"], data_seed=3)
    assert record_kind(tmp_path / "gt.parquet") == "groundtruth"
    settings = record_settings(tmp_path / "gt.parquet")
    assert settings["data_seed"] == 3 and settings["gt_steps"] == 3
    assert settings["image_size"] == 16 and settings["max_train"] == 96
    with pytest.raises(RecordError, match="not metric records"):
        read_records(tmp_path / "gt.parquet", "metrics")


def test_refuses_another_schema_version(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _run(tmp_path, "v.parquet", layer_names=["conv_stem"])
    table = pq.read_table(tmp_path / "v.parquet")
    table = table.replace_schema_metadata({b"zest.schema_version": b"999"})
    pq.write_table(table, tmp_path / "v.parquet")
    with pytest.raises(RecordError, match="schema version 999"):
        _run(tmp_path, "v.parquet")
    assert pa is not None


def test_too_small_validation_split(tmp_path):
    with pytest.raises(Exception, match="validation examples") as info:
        _run(tmp_path, "small.parquet", options=DataOptions(image_size=16, max_train=96,
                                                              max_val=5))
    assert "raise max_val" in str(info.value)
    assert not (tmp_path / "small.parquet").exists()


def test_cli_groundtruth_bad_steps(tmp_path):
    from typer.testing import CliRunner

    from zest.cli import app

    out = tmp_path / "gt.parquet"
    result = CliRunner().invoke(app, ["collect", "groundtruth", "--model", "tiny_cnn",
                                      "--dataset", "digits", "--steps", "0", "--out", str(out)])
    assert result.exit_code == 1 and "--steps" in result.output
    assert not out.exists()
    assert os.path.exists(tmp_path)


def test_trimming_padding_keeps_the_outputs():
    import torch

    from tests.conftest import text_batch
    from zest.models import load_model
    from zest.stages import trim_padding

    model, task = load_model("tiny_bert", 3)
    batch = text_batch(task)
    padded = {k: torch.nn.functional.pad(v, (0, 7)) if k != "labels" else v
              for k, v in batch.items()}
    trimmed = trim_padding(padded)
    assert trimmed["input_ids"].shape[1] == batch["input_ids"].shape[1]
    with torch.no_grad():
        torch.testing.assert_close(task.forward(model, padded).logits,
                                   task.forward(model, trimmed).logits, atol=1e-5, rtol=1e-5)


def test_prefix_chunks_are_trimmed_and_keep_the_full_width_outputs():
    import torch

    from zest.groundtruth import PairSpec
    from zest.groundtruth.batches import batch_of, split_inputs
    from zest.groundtruth.caches import cached_pair
    from zest.groundtruth.trainer import LayerTrainer
    from zest.stages import stage_plan

    options = DataOptions(max_length=48, max_train=96, max_val=48)
    net, task, data = cached_pair(PairSpec("tiny_bert", "rotten_tomatoes", options))
    inputs, labels = split_inputs(task, data, "val")
    plan = stage_plan(net, task, batch_of(task, inputs, labels, torch.arange(2)))
    stop = len(plan.names) - 1  # the last encoder layer's output, before pooling
    config = GroundTruthConfig(steps=3, batch_size=16, eval_batch_size=8)
    val = LayerTrainer(net, task, data, config, plan).prefix_states(stop, seed=0)[1]
    with torch.no_grad():  # all val examples at once, at the split's full width
        full = plan.run(plan.start(task.model_inputs({k: v for k, v in inputs.items()})), 0,
                        stop)
    mask = inputs["attention_mask"].bool()
    assert val.state["hidden"].shape == full["hidden"].shape
    torch.testing.assert_close(val.state["hidden"][mask], full["hidden"][mask], atol=1e-5,
                               rtol=1e-5)
    # chunks of short texts ran trimmed: their padding past the chunk's longest was not computed
    assert (val.state["hidden"][~mask] == 0).all(dim=-1).any()
    assert not (full["hidden"][~mask] == 0).all(dim=-1).any()


def test_grid_collects_both_kinds_and_skips_what_is_done(tmp_path):
    from typer.testing import CliRunner

    from zest.cli import app
    from zest.records import write_records

    grid = tmp_path / "grid.toml"
    grid.write_text(f"""
[defaults]
out_dir = "{tmp_path / 'records'}"
seeds = [0]
batches = 2
batch_size = 8
steps = 2
gt_batch_size = 16
image_size = 16
max_train = 64
max_val = 32

[[group]]
model = "tiny_cnn"
dataset = "digits"
""")
    runner = CliRunner()
    first = runner.invoke(app, ["collect", "grid", str(grid), "--quiet"])
    assert first.exit_code == 0, first.output
    metrics_file = tmp_path / "records" / "metrics" / "tiny_cnn__digits.parquet"
    gt_file = tmp_path / "records" / "groundtruth" / "tiny_cnn__digits.parquet"
    assert len(read_records(metrics_file)) == 2 * read_records(gt_file)["layer"].nunique()
    second = runner.invoke(app, ["collect", "grid", str(grid), "--quiet"])
    assert "done" in second.output.splitlines()[0]
    # a metric registered after the collection makes the (cheap) metrics file be redone
    write_records(read_records(metrics_file).drop(columns=["m_kappa"]), metrics_file)
    third = runner.invoke(app, ["collect", "grid", str(grid), "--quiet"])
    assert third.output.splitlines()[0].startswith("collected")
    assert "m_kappa" in read_records(metrics_file)


def test_grid_layer_sample_collects_a_sample_the_corpus_keeps(tmp_path):
    from zest.grid import grid_jobs, run_grid_item
    from zest.training import load_corpus

    grid = tmp_path / "grid.toml"
    grid.write_text(f"""
[defaults]
out_dir = "{tmp_path / 'records'}"
seeds = [0, 1]
batches = 1
batch_size = 8
steps = 2
gt_batch_size = 16
image_size = 16
max_train = 64
max_val = 32
layer_sample = 2

[[group]]
model = "tiny_cnn"
dataset = "digits"
""")
    for kind, group, out in grid_jobs(grid):
        run_grid_item(kind, group, out)
    metrics, groundtruth = load_corpus(tmp_path / "records", min_seeds=2)
    assert groundtruth["layer"].nunique() == 2 and metrics["layer"].nunique() > 2
    assert set(groundtruth["group"]) == {"tiny_cnn__digits"}


@pytest.mark.parametrize("model", ["tiny_cnn", "tiny_llama"])
def test_prefix_continued_from_a_cached_state_is_identical(model):
    import torch

    from zest.groundtruth import PairSpec
    from zest.groundtruth.batches import batch_of, split_inputs
    from zest.groundtruth.caches import PREFIXES, cached_pair
    from zest.groundtruth.trainer import LayerTrainer
    from zest.stages import stage_plan

    options = OPTIONS if model == "tiny_cnn" else DataOptions(max_length=24, max_train=96,
                                                              max_val=48)
    pair = PairSpec(model, "digits" if model == "tiny_cnn" else "r8", options)
    net, task, data = cached_pair(pair)
    sample = batch_of(task, *split_inputs(task, data, "train"), torch.arange(2))
    plan = stage_plan(net, task, sample)
    config = GroundTruthConfig(steps=3, batch_size=16, eval_batch_size=40)
    stop = len(plan.names) - 1
    plain = LayerTrainer(net, task, data, config, plan).prefix_states(stop, seed=0)
    key = ("test", model)
    trainer = LayerTrainer(net, task, data, config, plan, pair_key=key)
    for step in range(stop + 1):  # one stage at a time, as jobs of successive blocks do
        continued = trainer.prefix_states(step, seed=0)
    assert PREFIXES[(*key, "train")].stop == PREFIXES[(*key, "val")].stop == stop
    for part, expected in zip(continued, plain, strict=True):
        assert torch.equal(part.examples, expected.examples)
        assert expected.state.keys() == part.state.keys()
        for name in expected.state:
            assert torch.equal(expected.state[name], part.state[name]), name
    # another seed draws other train examples: its prefix starts again from the input
    other = trainer.prefix_states(stop, seed=1)[0]
    assert not torch.equal(other.examples, continued[0].examples)
    assert torch.equal(other.examples, PREFIXES[(*key, "train")].examples)
    for split in ("train", "val"):
        PREFIXES.pop((*key, split))


def _children(pid: int) -> set[int]:
    found = set()
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines()
                          if ":\t" in line)
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(pid):
            found.add(int(status.parent.name))
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_workers_exit_when_the_driver_is_killed(tmp_path):
    script = ("import sys\nfrom zest.loading import DataOptions\n"
              "from zest.groundtruth import GroundTruthConfig, collect_groundtruth\n"
              "collect_groundtruth('tiny_cnn', 'digits', sys.argv[1], config=GroundTruthConfig("
              "steps=400, batch_size=16), seeds=[0, 1], n_jobs=2, options=DataOptions("
              "image_size=16, max_train=96, max_val=48))\n")
    process = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "gt.parquet")])
    deadline = time.time() + 120
    workers: set[int] = set()
    while time.time() < deadline and len(workers) < 2:
        time.sleep(0.2)
        workers = {pid for pid in _children(process.pid)
                   if "popen_loky" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(
                       errors="replace")} if Path(f"/proc/{process.pid}").exists() else set()
    assert len(workers) >= 2, "no loky workers appeared"
    process.send_signal(signal.SIGKILL)
    process.wait()
    deadline = time.time() + 15
    while time.time() < deadline and any(Path(f"/proc/{pid}").exists() for pid in workers):
        time.sleep(0.2)
    alive = [pid for pid in workers if Path(f"/proc/{pid}").exists()
             and "(Z)" not in Path(f"/proc/{pid}/stat").read_text().split(")")[1][:4]]
    assert not alive, f"workers {alive} outlived the driver"


@pytest.mark.parametrize(("settings", "message"), [
    ({"seeds": ()}, "seeds is empty"),
    ({"seeds": "0,x"}, "seeds must be comma-separated integers"),
    ({"n_jobs": 0}, "n_jobs must be ≥ 1, got 0"),
    ({"backend": "spark"}, "backend must be one of loky, dask, got 'spark'"),
    ({"backend": "dask"}, "scheduler is needed with backend dask"),
    ({"layer_sample": 0}, "layer_sample must be an integer ≥ 1, got 0"),
    ({"layer_sample": 2, "layer_names": ["conv_stem"]}, "layer_sample and layer_names both"),
])
def test_a_request_is_checked_once_naming_the_parameter(tmp_path, settings, message):
    from zest.groundtruth import GroundTruthRequest

    with pytest.raises(InvalidInputError, match=f"^{message}"):
        GroundTruthRequest("tiny_cnn", "digits", tmp_path / "gt.parquet", **settings)
    with pytest.raises(InvalidInputError, match=f"^{message}"):  # the keyword form alike
        collect_groundtruth("tiny_cnn", "digits", tmp_path / "gt.parquet", **settings)
    assert not (tmp_path / "gt.parquet").exists()


def test_a_request_keeps_the_seed_order_and_parses_a_seed_string(tmp_path):
    from zest.groundtruth import GroundTruthRequest

    assert GroundTruthRequest("m", "d", tmp_path / "o", seeds=[3, 1]).seeds == (3, 1)
    assert GroundTruthRequest("m", "d", tmp_path / "o", seeds="2,0,2").seeds == (0, 2)


@pytest.mark.parametrize(("arguments", "message"), [
    (["--steps", "0"], "--steps must be an integer ≥ 1, got 0"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--batch-size", "0"], "--batch-size must be ≥ 1, got 0"),
    (["--n-jobs", "0"], "--n-jobs must be ≥ 1, got 0"),
    (["--seeds", "a"], "--seeds must be comma-separated integers"),
    (["--backend", "dask"], "--scheduler is needed with --backend dask"),
    (["--sample-layers", "2", "--layers", "conv_stem"], "--sample-layers and --layers both"),
])
def test_cli_names_the_flag_of_a_bad_setting(tmp_path, arguments, message):
    from typer.testing import CliRunner

    from zest.cli import app

    result = CliRunner().invoke(app, ["collect", "groundtruth", "-m", "tiny_cnn", "-d", "digits",
                                      "--out", str(tmp_path / "gt.parquet"), *arguments])
    assert result.exit_code == 1 and f"error: {message}" in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "gt.parquet").exists()


def test_cli_options_are_generated_from_the_settings():
    import typer.main

    from zest.cli import app

    command = typer.main.get_command(app).commands["collect"].commands["groundtruth"]
    options = {p.name: p for p in command.params}
    assert set(options) == {"model", "dataset", "out", "steps", "lr", "batch_size", "no_cache",
                            "seeds", "n_jobs", "backend", "scheduler", "sample_layers", "seed",
                            "layers", "device", "checkpoint", "quiet", "image_size",
                            "max_length", "max_train", "max_val", "text_column", "label_column"}
    assert (options["steps"].default, options["lr"].default, options["seeds"].default,
            options["no_cache"].default, options["backend"].default) == (100, 1e-3, "0,1",
                                                                          False, "loky")
    assert options["steps"].help == "Training steps per layer and for the baseline."
    assert options["no_cache"].help == "Disable the frozen-prefix cache."


def test_jobs_shipped_to_dask_workers_carry_absolute_paths(tmp_path, monkeypatch):
    from zest.groundtruth import GroundTruthConfig, Job, PairSpec
    from zest.groundtruth.executors import shippable

    monkeypatch.chdir(tmp_path)
    here = tmp_path.resolve()
    for spec, expected in [("npz:a.npz", f"npz:{here / 'a.npz'}"),
                           ("lm:csv:t.csv", f"lm:csv:{here / 't.csv'}"),
                           ("imagefolder:imgs", f"imagefolder:{here / 'imgs'}"),
                           ("digits", "digits"), ("lm:r8", "lm:r8")]:
        job = Job(PairSpec("hf:model", spec, checkpoint="w.pt"), GroundTruthConfig(), "b", (), 0)
        shipped = shippable(job).pair
        assert shipped.dataset == expected
        assert (shipped.model, shipped.checkpoint) == (f"hf:{here / 'model'}",
                                                       str(here / "w.pt"))
    assert shippable(Job(PairSpec("tiny_cnn", "digits"), GroundTruthConfig(), "b", (), 0)
                     ).pair.model == "tiny_cnn"

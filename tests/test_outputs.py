"""Outputs (issue 30): run folders are written whole or not at all, and no command overwrites a
file of another kind (:mod:`zest.outputs`)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from zest.cli import app
from zest.errors import InvalidInputError
from zest.outputs import RUN_FILES, check_run_folder, path_kind, staged_folder

runner = CliRunner()
DATA = ["--model", "tiny_cnn", "--dataset", "digits", "--max-train", "64"]
RUN = [*DATA, "--method", "layers", "--layers", "conv_stem", "--epochs", "1", "-q"]


def _fingerprint(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder`` (hidden ones too), files by content."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest()
                                         if p.is_file() else "folder")
            for p in sorted(folder.rglob("*"))}


def _one_line_failure(result, *words: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """One of each thing zest writes: a run folder, a ranking table (csv, json), a plot,
    merged weights, record files, the shipped predictor."""
    from zest.ranking import shipped_predictor_path
    from zest.records import write_records

    root = tmp_path_factory.mktemp("made")
    result = runner.invoke(app, ["finetune", *RUN, "--out", str(root / "run")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["rank", *DATA, "--out", str(root / "ranking.csv"),
                                 "--plot", str(root / "plot.png")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["rank", *DATA, "--out", str(root / "ranking.json")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["apply-delta", "--model", "tiny_cnn", "--delta",
                                 str(root / "run" / "delta.safetensors"),
                                 "--out", str(root / "merged.safetensors")])
    assert result.exit_code == 0, result.output
    row = {"model": "m", "dataset": "d", "group": "m__d", "layer": "l", "layer_type": "Linear",
           "block": "b", "depth": 0.0, "n_params": 1}
    write_records(pd.DataFrame([{**row, "batch": 0, "seed": 0, "m_grad_norm": 1.0}]),
                  root / "metrics.parquet")
    write_records(pd.DataFrame([{**row, "gt_seed": 0, "gt_gain": 0.1}]),
                  root / "groundtruth.parquet")
    shutil.copy(shipped_predictor_path(), root / "predictor.json")
    return root




def test_path_kind_tells_what_each_path_holds(made, tmp_path):
    expected = {"run": "run-folder", "run/config.json": "file",
                "run/delta.safetensors": "delta", "run/delta.json": "delta-sidecar",
                "run/curve.png": "plot", "ranking.csv": "ranking", "ranking.json": "ranking",
                "plot.png": "plot", "merged.safetensors": "merged-weights",
                "metrics.parquet": "metrics-records",
                "groundtruth.parquet": "groundtruth-records", "predictor.json": "predictor"}
    assert {name: path_kind(made / name) for name in expected} == expected
    assert path_kind(tmp_path / "nothing") is None
    (tmp_path / "empty").touch()
    (tmp_path / "folder").mkdir()
    (tmp_path / "notes.csv").write_text("rank_of_city,name\n1,Paris\n")
    model = tmp_path / "bert"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "bert"}))
    legacy = tmp_path / "legacy"  # a run folder written before the "zest" marker
    shutil.copytree(made / "run", legacy)
    config = json.loads((legacy / "config.json").read_text())
    del config["zest"]
    (legacy / "config.json").write_text(json.dumps(config))
    mixed = tmp_path / "mixed"  # a run folder someone added notes to
    shutil.copytree(made / "run", mixed)
    (mixed / "notes.txt").write_text("mine")
    assert [path_kind(tmp_path / name) for name in
            ("empty", "folder", "notes.csv", "bert", "legacy", "mixed")] == [
        "empty-file", "empty-folder", "file", "model-folder", "run-folder", "folder"]


def test_large_weight_files_are_told_by_their_header_alone(made, monkeypatch):
    import zest.outputs

    monkeypatch.setattr(zest.outputs, "_READ_LIMIT", 20_000)  # below the files, above headers
    assert (made / "merged.safetensors").stat().st_size > 20_000
    assert path_kind(made / "merged.safetensors") == "merged-weights"
    assert path_kind(made / "predictor.json") == "file"  # too large to parse now


#: Refusals of ``zest finetune``: each must be one line and leave no folder or file behind.
REFUSALS = [
    (["--lr", "-1"], "lr"),
    (["--lr", "nan"], "lr"),
    (["--epochs", "0"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--method", "gps", "--k", "0"], "k"),
    (["--method", "spsft", "--ratio", "2"], "ratio"),
    (["--method", "spsft", "--r", "0"], "r"),
    (["--method", "lora", "--lora-rank", "0"], "rank"),
    (["--method", "spsft", "--importance", "bogus"], "bogus"),
    (["--method", "spsft", "--k", "2"], "k"),
    (["--method", "bogus"], "bogus"),
    (["--layers", "no_such_layer"], "no_such_layer"),
    (["--layers", "top:0", "--method", "spsft"], "top:0"),
    (["--layers", "auto", "--method", "spsft", "--param-budget", "2"], "--param-budget"),
    (["--layers", "auto", "--method", "spsft", "--predictor", "CORRUPT"], "corrupt"),
    (["--dataset", "no_such_data"], "no_such_data"),
]


@pytest.mark.parametrize("extra, word", REFUSALS, ids=[" ".join(r[0]) for r in REFUSALS])
def test_finetune_refusals_leave_no_folder_behind(tmp_path, extra, word):
    corrupt = tmp_path / "inputs" / "corrupt.json"
    corrupt.parent.mkdir()
    corrupt.write_text('{"format": "zest-predictor", "format_version": 1, "model": {"lightgbm": '
                       '"tree\\nversion=v4\\ngarbage"}}')
    extra = [str(corrupt) if value == "CORRUPT" else value for value in extra]
    args = {**dict(zip(RUN[:-1:2], RUN[1::2], strict=True)),
            **dict(zip(extra[::2], extra[1::2], strict=True))}
    command = ["finetune", *[x for item in args.items() for x in item], "-q",
               "--out", str(tmp_path / "new" / "run")]
    _one_line_failure(runner.invoke(app, command), word)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs"]


def test_a_refusal_leaves_an_existing_run_byte_identical(made, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(made / "run", run)
    before = _fingerprint(tmp_path)
    result = runner.invoke(app, ["finetune", *RUN[:-1], "--method", "gps", "--k", "0",
                                 "--overwrite", "--out", str(run)])
    _one_line_failure(result, "k")
    assert _fingerprint(tmp_path) == before


def test_a_non_finite_loss_leaves_an_existing_run_byte_identical(made, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(made / "run", run)
    before = _fingerprint(tmp_path)
    result = runner.invoke(app, ["finetune", *RUN, "--lr", "1e30", "--overwrite",
                                 "--out", str(run)])
    _one_line_failure(result, "non-finite loss", "as it was")
    assert _fingerprint(tmp_path) == before  # no temporary folder either
    result = runner.invoke(app, ["finetune", *RUN, "--lr", "1e30",
                                 "--out", str(tmp_path / "a" / "new")])
    _one_line_failure(result, "non-finite loss")
    assert _fingerprint(tmp_path) == before  # nor the parent it made


def test_an_interrupted_run_leaves_out_as_it_was(made, tmp_path):
    from zest.loading import DataOptions
    from zest.pipeline import run_finetune

    run = tmp_path / "run"
    shutil.copytree(made / "run", run)
    before = _fingerprint(tmp_path)

    def interrupt(event: dict) -> None:
        if "step" in event:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_finetune("tiny_cnn", "digits", run, method="layers", layers="conv_stem", epochs=1,
                     options=DataOptions(max_train=64), progress=interrupt, overwrite=True)
    assert _fingerprint(tmp_path) == before


def test_an_existing_run_is_refused_without_overwrite_and_replaced_whole_with_it(made,
                                                                                 tmp_path):
    run = tmp_path / "run"
    shutil.copytree(made / "run", run)
    config = json.loads((run / "config.json").read_text())
    del config["zest"]  # a run folder from before the marker is a run folder too
    (run / "config.json").write_text(json.dumps(config))
    before = _fingerprint(tmp_path)
    _one_line_failure(runner.invoke(app, ["finetune", *RUN, "--out", str(run)]), "--overwrite")
    assert _fingerprint(tmp_path) == before
    result = runner.invoke(app, ["finetune", *RUN, "--seed", "1", "--overwrite",
                                 "--out", str(run)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing left aside
    config = json.loads((run / "config.json").read_text())
    assert config["seed"] == 1 and config["zest"]["kind"] == "finetune-run"
    assert sorted(p.name for p in run.iterdir()) == sorted(RUN_FILES)


def test_finetune_refuses_folders_and_files_it_did_not_write(made, tmp_path, no_loading):
    model = tmp_path / "bert"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (model / "model.safetensors").write_bytes(b"weights")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    mixed = tmp_path / "mixed"
    shutil.copytree(made / "run", mixed)
    (mixed / "todo.txt").write_text("mine")
    (tmp_path / "afile").write_text("mine")
    before = _fingerprint(tmp_path)
    for out, word in ((model, "model folder"), (notes, "todo.txt"), (mixed, "todo.txt"),
                      (tmp_path / "afile", "is a file"), (tmp_path / "new" / "..", "no folder")):
        result = runner.invoke(app, ["finetune", *RUN, "--overwrite", "--out", str(out)])
        _one_line_failure(result, word)
    assert _fingerprint(tmp_path) == before


def test_staged_folder_refuses_a_folder_that_changed_kind_while_training(tmp_path):
    out = check_run_folder(tmp_path / "run")
    with pytest.raises(InvalidInputError, match="now holds"), staged_folder(out) as staging:
        (staging / "config.json").write_text("{}")
        out.mkdir()
        (out / "todo.txt").write_text("mine")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert [p.name for p in out.iterdir()] == ["todo.txt"]


def test_a_run_that_appeared_while_training_is_replaced_only_with_overwrite(made, tmp_path):
    """Two runs onto one new --out: the second one to finish does not replace the first
    unless it was given --overwrite."""
    out = check_run_folder(tmp_path / "run")
    refused = pytest.raises(InvalidInputError, match="now holds a zest fine-tuning run folder")
    with refused, staged_folder(out) as staging:
        (staging / "config.json").write_text("{}")
        shutil.copytree(made / "run", out)
    before = _fingerprint(tmp_path)
    with staged_folder(out, replaces=("run-folder",)) as staging:
        (staging / "config.json").write_text("{}")
    assert before != _fingerprint(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert [p.name for p in out.iterdir()] == ["config.json"]


@pytest.mark.parametrize("target, option, word", [
    ("predictor.json", "--out", "zest predictor"),
    ("run/delta.json", "--out", "sidecar of a zest delta"),
    ("notes.csv", "--out", "zest did not write"),
    ("photo.png", "--plot", "zest did not write"),
    ("run/curve.png", "--out", "must end in"),
    ("records.json", "--out", "zest metric record file"),
    ("model.json", "--out", "is a folder"),
])
def test_rank_refuses_outputs_of_another_kind(made, tmp_path, no_loading, target, option,
                                              word):
    folder = tmp_path / "files"
    shutil.copytree(made, folder)
    (folder / "notes.csv").write_text("city,population\nParis,2100000\n")
    (folder / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n a photo from a camera")
    shutil.copy(folder / "metrics.parquet", folder / "records.json")
    (folder / "model.json").mkdir()  # a model folder with an unlucky name
    (folder / "model.json" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    before = _fingerprint(folder)
    _one_line_failure(runner.invoke(app, ["rank", *DATA, option, str(folder / target)]), word)
    assert _fingerprint(folder) == before


def test_rank_replaces_its_own_table_and_plot(made, tmp_path):
    shutil.copy(made / "ranking.csv", tmp_path / "ranking.csv")
    shutil.copy(made / "plot.png", tmp_path / "plot.png")
    (tmp_path / "ranking.csv").write_text((tmp_path / "ranking.csv").read_text()
                                          .replace("conv_stem", "conv_stem_edited"))
    result = runner.invoke(app, ["rank", *DATA, "--out", str(tmp_path / "ranking.csv"),
                                 "--plot", str(tmp_path / "plot.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ranking.csv").read_bytes() == (made / "ranking.csv").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png", "ranking.csv"]


def test_apply_delta_refuses_its_own_delta_and_other_kinds(made, tmp_path):
    folder = tmp_path / "files"
    shutil.copytree(made, folder)
    before = _fingerprint(folder)
    delta = folder / "run" / "delta.safetensors"
    for out, word in ((delta, "the delta itself"), (folder / "run" / "delta.json", "delta itself"),
                      (folder / "predictor.json", "must end in")):
        result = runner.invoke(app, ["apply-delta", "--model", "tiny_cnn", "--delta", str(delta),
                                     "--out", str(out)])
        _one_line_failure(result, word)
    other = tmp_path / "other.safetensors"  # another delta, given by its own path
    shutil.copy(delta, other)
    shutil.copy(folder / "run" / "delta.json", tmp_path / "other.json")
    result = runner.invoke(app, ["apply-delta", "--model", "tiny_cnn", "--delta", str(delta),
                                 "--out", str(other)])
    _one_line_failure(result, "holds a zest delta")
    assert _fingerprint(folder) == before
    assert other.read_bytes() == delta.read_bytes()
    result = runner.invoke(app, ["apply-delta", "--model", "tiny_cnn", "--delta", str(delta),
                                 "--out", str(folder / "merged.safetensors")])
    assert result.exit_code == 0, result.output  # merged weights replace merged weights


def test_predictor_commands_and_collectors_refuse_other_kinds(made, tmp_path):
    folder = tmp_path / "files"
    shutil.copytree(made, folder)
    before = _fingerprint(folder)
    commands = [
        (["train-predictor", "--records", str(tmp_path / "none"), "--out",
          str(folder / "run" / "delta.json")], "sidecar of a zest delta"),
        (["train-predictor", "--records", str(tmp_path / "none"), "--out",
          str(folder / "ranking.json")], "ranking table"),
        (["evaluate-predictor", "--records", str(tmp_path / "none"), "--out-dir",
          str(tmp_path / "ev"), "--report", str(folder / "notes.md")], "zest did not write"),
        (["evaluate-predictor", "--records", str(tmp_path / "none"), "--out-dir",
          str(folder / "run"), "--report", str(tmp_path / "r.md"), "--schemes", "logo"],
         None),
        (["collect", "metrics", *DATA, "--out", str(folder / "predictor.json")],
         "zest predictor"),
        (["collect", "groundtruth", *DATA, "--out", str(folder / "ranking.csv")],
         "ranking table"),
    ]
    (folder / "run" / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n a photo")
    (folder / "notes.md").write_text("# My notes\n")
    before = _fingerprint(folder)
    for command, word in commands:
        result = runner.invoke(app, command)
        _one_line_failure(result, *([word] if word else ["logo.png", "zest did not write"]))
    assert _fingerprint(folder) == before
    assert not (tmp_path / "ev").exists()

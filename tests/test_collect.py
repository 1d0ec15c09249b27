"""``zest collect metrics``: records, batches, block granularity and bad input at the CLI."""

from __future__ import annotations

import pandas as pd
import pytest
from typer.testing import CliRunner

from zest.cli import app
from zest.collect import collect_metrics
from zest.metrics import metric_names
from zest.records import ID_COLUMNS, read_records

runner = CliRunner()


def test_collect_metrics_records_have_the_schema():
    frame = collect_metrics("tiny_cnn", "digits", batch_size=8, batches=2)
    for column in ID_COLUMNS + ["probe_loss", "batch_size", "batch", "seed", "zest_version"]:
        assert column in frame.columns, column
    for name in metric_names():
        assert f"m_{name}" in frame.columns
    assert sorted(frame["batch"].unique()) == [0, 1]
    assert frame.groupby("batch").size().nunique() == 1
    assert frame["group"].iloc[0] == "tiny_cnn__digits"


def test_collect_metrics_is_deterministic():
    a = collect_metrics("tiny_cnn", "digits", batch_size=8, metrics="static,grad_norm")
    b = collect_metrics("tiny_cnn", "digits", batch_size=8, metrics="static,grad_norm")
    pd.testing.assert_frame_equal(a.drop(columns="probe_seconds"),
                                  b.drop(columns="probe_seconds"))


def test_block_granularity_aggregates():
    frame = collect_metrics("tiny_cnn", "digits", batch_size=8, metrics="n_params,snip",
                            granularity="block")
    module = collect_metrics("tiny_cnn", "digits", batch_size=8, metrics="n_params,snip")
    assert len(frame) == module["block"].nunique()
    sums = module.groupby("block")["m_n_params"].sum()
    for _, row in frame.iterrows():
        assert row["m_n_params"] == sums[row["layer"]]
        assert row["layer_type"] == "block"


def test_cli_writes_parquet(tmp_path):
    out = tmp_path / "m.parquet"
    result = runner.invoke(app, ["collect", "metrics", "--model", "tiny_cnn", "--dataset",
                                 "digits", "--batch-size", "8", "--batches", "2", "--out",
                                 str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    frame = read_records(out)
    assert len(frame) == 2 * frame["layer"].nunique()


def _csv(tmp_path, labels, n=40, name="data.csv"):
    path = tmp_path / name
    pd.DataFrame({"text": [f"sentence number {i}" for i in range(n)],
                  "label": [labels[i % len(labels)] for i in range(n)]}).to_csv(path, index=False)
    return path


def _bad_case(tmp_path, case):
    out = tmp_path / "out" / "m.parquet"
    base = ["collect", "metrics", "--quiet", "--out", str(out), "--batch-size", "4"]
    if case == "unknown_model":
        return base + ["--model", "resnet9000", "--dataset", "digits"], out, "known:"
    if case == "unknown_dataset":
        return base + ["--model", "tiny_cnn", "--dataset", "digitz"], out, "digits"
    if case == "one_class":
        path = _csv(tmp_path, ["only"])
        return base + ["--model", "tiny_bert", "--dataset", f"csv:{path}"], out, "class"
    if case == "empty_split":
        path = _csv(tmp_path, ["a", "b"], n=2)
        return base + ["--model", "tiny_bert", "--dataset", f"csv:{path}"], out, "split"
    if case == "missing_label_column":
        path = _csv(tmp_path, ["a", "b"])
        return base + ["--model", "tiny_bert", "--dataset", f"csv:{path}", "--label-column",
                       "sentiment"], out, "sentiment"
    if case == "batch_size_one":
        args = [a if a != "4" else "1" for a in base]
        return args + ["--model", "tiny_cnn", "--dataset", "digits"], out, "--batch-size"
    if case == "non_finite_loss":
        from safetensors.torch import save_file

        from zest.models import load_model

        model, _ = load_model("timm:test_efficientnet", 10)
        state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
        state["conv_stem.weight"].fill_(float("inf"))
        save_file(state, str(tmp_path / "broken.safetensors"))
        return base + ["--model", "timm:test_efficientnet", "--checkpoint",
                       str(tmp_path / "broken.safetensors"), "--dataset", "digits"], out, \
            "batch 0"
    if case == "unwritable_output":
        blocker = tmp_path / "file"
        blocker.write_text("not a folder")
        bad = blocker / "m.parquet"
        return (["collect", "metrics", "--quiet", "--out", str(bad), "--model", "tiny_cnn",
                 "--dataset", "digits"], bad, "--out")
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["unknown_model", "unknown_dataset", "one_class", "empty_split",
                                  "missing_label_column", "batch_size_one", "non_finite_loss",
                                  "unwritable_output"])
def test_bad_input_one_line_exit_1_nothing_written(tmp_path, case):
    args, out, expected = _bad_case(tmp_path, case)
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ")
    assert expected in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.parametrize(("settings", "message"), [
    ({"batches": 0}, "batches must be ≥ 1, got 0"),
    ({"batch_size": 0}, "batch_size must be ≥ 1, got 0"),
    ({"batch_size": 1}, "batch_size must be ≥ 2 for the supcon probe loss"),
])
def test_a_metrics_request_is_checked_once_naming_the_parameter(tmp_path, settings, message):
    from zest.collect import MetricsRequest
    from zest.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match=f"^{message}"):
        MetricsRequest("tiny_cnn", "digits", tmp_path / "m.parquet", **settings)
    with pytest.raises(InvalidInputError, match=f"^{message}"):
        collect_metrics("tiny_cnn", "digits", out=tmp_path / "m.parquet", **settings)
    assert not (tmp_path / "m.parquet").exists()


def test_a_metrics_request_resolves_metrics_and_probe_loss():
    from zest.collect import MetricsRequest

    request = MetricsRequest("tiny_cnn", "digits", metrics="static", batch_size=4)
    assert request.probe_loss == "supcon" and "n_params" in request.metrics
    assert MetricsRequest("tiny_llama", "lm:r8").probe_loss == "ce"
    assert request.settings()["metrics"] == list(request.metrics)


def test_collect_metrics_options_are_generated_from_the_request():
    import typer.main

    from zest.cli import app

    command = typer.main.get_command(app).commands["collect"].commands["metrics"]
    options = {p.name: p for p in command.params}
    assert [name for name in options][3:7] == ["batch_size", "batches", "metrics", "probe_loss"]
    assert (options["batch_size"].default, options["batches"].default,
            options["metrics"].default, options["probe_loss"].default) == (32, 1, "all", None)
    assert options["batches"].help == "Minibatches; each gives a row per layer."
    result = runner.invoke(app, ["collect", "metrics", "-m", "tiny_cnn", "-d", "digits", "--out",
                                 "never.parquet", "--batches", "0"])
    assert result.exit_code == 1 and "error: --batches must be ≥ 1, got 0" in result.output

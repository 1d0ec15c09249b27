"""``zest collect metrics``, ``zest collect groundtruth`` and ``zest collect grid``: records
for the corpus (ARCHITECTURE.md §3b)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from zest.cli.common import (
    QuietOption,
    collect_app,
    comma_names,
    echo_written,
    progress_bar,
    settings_named,
    user_errors,
    with_data_options,
    with_pair_options,
    with_settings,
)
from zest.collect import MetricsRequest
from zest.command_line import option_flags
from zest.groundtruth.settings import GroundTruthConfig, GroundTruthRequest


@collect_app.command("metrics")
@with_data_options()
@with_settings(MetricsRequest, "request")
@with_pair_options()
def collect_metrics_command(
    out: Annotated[Path, typer.Option(help="Parquet file to write.")],
    pair: Any = None,
    request: Any = None,
    options: Any = None,
) -> None:
    """Zero-shot metrics of every candidate layer from one forward and backward pass."""
    from zest.collect import run_metrics

    with user_errors():
        with settings_named(option_flags(MetricsRequest, layer_names="--layers")):
            settings = MetricsRequest(pair.model, pair.dataset, out, seed=pair.seed,
                                      options=options, granularity=pair.granularity,
                                      layer_names=pair.layer_names, device=pair.device,
                                      checkpoint=pair.checkpoint, **request)
        with progress_bar("probe", pair.quiet) as progress:
            frame = run_metrics(settings, progress)
        echo_written(out, len(frame), "metric")


@collect_app.command("groundtruth")
@with_data_options()
@with_settings(GroundTruthConfig, "config")
@with_settings(GroundTruthRequest, "request")
@with_pair_options(granularity=False)
def collect_groundtruth_command(
    out: Annotated[Path, typer.Option(help="Parquet file; existing rows are kept (resume).")],
    pair: Any = None,
    config: Any = None,
    request: Any = None,
    options: Any = None,
) -> None:
    """Fine-tune each candidate layer alone (plus a fresh head) and record its gain."""
    from zest.groundtruth import run_groundtruth

    flags = option_flags(GroundTruthConfig, GroundTruthRequest, layer_names="--layers",
                         data_seed="--seed")
    with user_errors():
        with settings_named(flags):
            settings = GroundTruthRequest(
                pair.model, pair.dataset, out, config=GroundTruthConfig(**config),
                options=options, layer_names=pair.layer_names, data_seed=pair.seed,
                device=pair.device, checkpoint=pair.checkpoint, **request)
        with progress_bar("layers", pair.quiet) as progress:
            frame = run_groundtruth(settings, progress)
        echo_written(out, len(frame), "ground-truth")


@collect_app.command("grid")
def collect_grid_command(
    grid: Annotated[Path, typer.Argument(help="metric_collection/<name>.toml")],
    only: Annotated[str | None, typer.Option(
        help="Run only these groups (comma-separated <model>__<dataset> keys or models).")]
    = None,
    n_jobs: Annotated[int | None, typer.Option(
        help="Override the grid's ground-truth workers (records do not depend on it).")] = None,
    quiet: QuietOption = False,
) -> None:
    """Metrics and ground truth for every (model, dataset) pair of a grid; resumable."""
    from zest.grid import grid_jobs, run_grid_item

    with user_errors():
        items = list(grid_jobs(grid, only=comma_names(only), n_jobs=n_jobs))
        bar = None
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=len(items), desc="grid", unit="job", file=sys.stderr)
        for kind, group, out in items:
            with progress_bar(f"{group.key} {kind}", quiet) as progress:
                status = run_grid_item(kind, group, out, progress=progress)
            typer.echo(f"{status:9s} {kind:11s} {group.key} -> {out}")
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()



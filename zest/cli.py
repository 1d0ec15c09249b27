"""The ``zest`` command line (DESIGN §7): thin Typer commands over the library functions.

Every command prints one line and exits with code 1 on a :class:`~zest.errors.ZestError`;
progress bars go to stderr and are off when stderr is not a terminal or with ``--quiet``.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from zest.errors import ZestError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="ZEST: pick the layers worth fine-tuning from one minibatch.")
collect_app = typer.Typer(no_args_is_help=True, help="Collect metric and ground-truth records.")
app.add_typer(collect_app, name="collect")

# -- shared options ------------------------------------------------------------------------------
ModelOption = Annotated[str, typer.Option("--model", "-m", help="Model spec: minilm, "
                                          "efficientnet_lite0, efficientnet_lite2, timm:<arch>, "
                                          "hf:<dir>, tiny_* test models.")]
DatasetOption = Annotated[str, typer.Option("--dataset", "-d", help="Data set spec: digits, "
                                            "mnist5k, lfw_faces, 20ng, r8, r52, rotten_tomatoes, "
                                            "csv:<path>, parquet:<path>, imagefolder:<dir>, "
                                            "npz:<path>.")]
SeedOption = Annotated[int, typer.Option(help="Seed of splits, head initialisation, batches.")]
ImageSizeOption = Annotated[int | None, typer.Option(help="Image side in pixels (default 64).")]
MaxLengthOption = Annotated[int, typer.Option(help="Maximum tokens per text.")]
MaxTrainOption = Annotated[int | None, typer.Option(help="Cap on train examples.")]
MaxValOption = Annotated[int | None, typer.Option(help="Cap on validation examples.")]
TextColumnOption = Annotated[str, typer.Option(help="Text column of csv:/parquet: data.")]
LabelColumnOption = Annotated[str, typer.Option(help="Label column of csv:/parquet: data.")]
LayersOption = Annotated[str | None, typer.Option("--layers", help="Restrict to these "
                                                  "candidate layers or blocks, comma-separated.")]
GranularityOption = Annotated[str, typer.Option(help="module: a row per layer; block: per "
                                                "enclosing block.")]
DeviceOption = Annotated[str, typer.Option(help="cpu, cuda or auto.")]
CheckpointOption = Annotated[Path | None, typer.Option(help="Weights for timm:<arch> "
                                                       "(.safetensors or a state dict).")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]


def main() -> None:
    """Entry point of the ``zest`` console script."""
    app()


@contextmanager
def _user_errors():
    try:
        yield
    except ZestError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from None
    except KeyboardInterrupt:
        typer.echo("interrupted; finished records are kept, run the same command to resume",
                   err=True)
        raise typer.Exit(code=130) from None


@contextmanager
def _progress(description: str, quiet: bool):
    """A tqdm bar on stderr as a ``progress(done, total)`` callback."""
    if quiet or not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(desc=description, unit="step", file=sys.stderr, leave=False)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        yield update
    finally:
        bar.close()


def _names(text: str | None) -> list[str] | None:
    return [n.strip() for n in text.split(",") if n.strip()] if text else None


def _options(image_size: int | None, max_length: int, max_train: int | None,
             max_val: int | None, text_column: str, label_column: str):
    from zest.collect import DataOptions

    return DataOptions(image_size=image_size, max_length=max_length, max_train=max_train,
                       max_val=max_val, text_column=text_column, label_column=label_column)


def _echo_written(path: Path, rows: int, what: str) -> None:
    typer.echo(f"wrote {rows} {what} rows to {path}")


# -- collect ---------------------------------------------------------------------------------------
@collect_app.command("metrics")
def collect_metrics_command(
    model: ModelOption,
    dataset: DatasetOption,
    out: Annotated[Path, typer.Option(help="Parquet file to write.")],
    batch_size: Annotated[int, typer.Option(help="Probe minibatch size.")] = 32,
    batches: Annotated[int, typer.Option(help="Minibatches; each gives a row per layer.")] = 1,
    metrics: Annotated[str, typer.Option(help="all, a family (static, forward, backward) or "
                                         "comma-separated metric names.")] = "all",
    probe_loss: Annotated[str, typer.Option(help="supcon (no head, τ=0.07) or ce.")] = "supcon",
    seed: SeedOption = 0,
    image_size: ImageSizeOption = None,
    max_length: MaxLengthOption = 128,
    max_train: MaxTrainOption = None,
    max_val: MaxValOption = None,
    text_column: TextColumnOption = "text",
    label_column: LabelColumnOption = "label",
    layers: LayersOption = None,
    granularity: GranularityOption = "module",
    device: DeviceOption = "cpu",
    checkpoint: CheckpointOption = None,
    quiet: QuietOption = False,
) -> None:
    """Zero-shot metrics of every candidate layer from one forward and backward pass."""
    from zest.collect import collect_metrics
    from zest.records import METRICS_KEY, append_records, check_writable

    with _user_errors():
        check_writable(out)
        with _progress("probe", quiet) as progress:
            frame = collect_metrics(model, dataset, batch_size=batch_size, batches=batches,
                                    metrics=metrics, probe_loss=probe_loss, seed=seed,
                                    options=_options(image_size, max_length, max_train, max_val,
                                                     text_column, label_column),
                                    granularity=granularity, layer_names=_names(layers),
                                    device=device,
                                    checkpoint=str(checkpoint) if checkpoint else None,
                                    progress=progress)
        if out.exists():
            out.unlink()
        append_records(frame, out, METRICS_KEY)
        _echo_written(out, len(frame), "metric")


@collect_app.command("groundtruth")
def collect_groundtruth_command(
    model: ModelOption,
    dataset: DatasetOption,
    out: Annotated[Path, typer.Option(help="Parquet file; existing rows are kept (resume).")],
    steps: Annotated[int, typer.Option(help="Training steps per layer and for the baseline.")]
    = 100,
    lr: Annotated[float, typer.Option(help="Adam learning rate (layer and head).")] = 1e-3,
    batch_size: Annotated[int, typer.Option(help="Training batch size.")] = 32,
    seeds: Annotated[str, typer.Option(help="Comma-separated ground-truth seeds.")] = "0,1",
    n_jobs: Annotated[int, typer.Option(help="Parallel workers (joblib).")] = 1,
    backend: Annotated[str, typer.Option(help="loky (joblib) or dask.")] = "loky",
    scheduler: Annotated[str | None, typer.Option(help="dask.distributed scheduler address.")]
    = None,
    no_cache: Annotated[bool, typer.Option(help="Disable the frozen-prefix cache.")] = False,
    seed: SeedOption = 0,
    image_size: ImageSizeOption = None,
    max_length: MaxLengthOption = 128,
    max_train: MaxTrainOption = None,
    max_val: MaxValOption = None,
    text_column: TextColumnOption = "text",
    label_column: LabelColumnOption = "label",
    layers: LayersOption = None,
    device: DeviceOption = "cpu",
    checkpoint: CheckpointOption = None,
    quiet: QuietOption = False,
) -> None:
    """Fine-tune each candidate layer alone (plus a fresh head) and record its gain."""
    from zest.groundtruth import GroundTruthConfig, collect_groundtruth, seed_list

    with _user_errors():
        config = GroundTruthConfig(steps=steps, lr=lr, batch_size=batch_size,
                                   use_cache=not no_cache)
        with _progress("layers", quiet) as progress:
            frame = collect_groundtruth(
                model, dataset, out, config=config, seeds=seed_list(seeds),
                options=_options(image_size, max_length, max_train, max_val, text_column,
                                 label_column),
                layer_names=_names(layers), data_seed=seed, device=device,
                checkpoint=str(checkpoint) if checkpoint else None, n_jobs=n_jobs,
                backend=backend, scheduler=scheduler, progress=progress)
        _echo_written(out, len(frame), "ground-truth")


@collect_app.command("grid")
def collect_grid_command(
    grid: Annotated[Path, typer.Argument(help="metric_collection/<name>.toml")],
    quiet: QuietOption = False,
) -> None:
    """Metrics and ground truth for every (model, dataset) pair of a grid; resumable."""
    from zest.grid import grid_jobs, run_grid_item

    with _user_errors():
        items = list(grid_jobs(grid))
        bar = None
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=len(items), desc="grid", unit="job", file=sys.stderr)
        for kind, group, out in items:
            with _progress(f"{group.key} {kind}", quiet) as progress:
                status = run_grid_item(kind, group, out, progress=progress)
            typer.echo(f"{status:9s} {kind:11s} {group.key} -> {out}")
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()

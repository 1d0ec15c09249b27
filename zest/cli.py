"""The ``zest`` command line (ARCHITECTURE.md §3a): thin Typer commands over the library functions.

Every command prints one line and exits with code 1 on a :class:`~zest.errors.ZestError`;
progress bars go to stderr and are off when stderr is not a terminal or with ``--quiet``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any

import typer

from zest.collect import MetricsRequest
from zest.command_line import option_flags
from zest.errors import ZestError, message_for
from zest.groundtruth.settings import GroundTruthConfig, GroundTruthRequest

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="ZEST: pick the layers worth fine-tuning from one minibatch.")
collect_app = typer.Typer(no_args_is_help=True, help="Collect metric and ground-truth records.")
app.add_typer(collect_app, name="collect")

# -- shared options ------------------------------------------------------------------------------
ModelOption = Annotated[str, typer.Option("--model", "-m", help="Model spec: minilm, smollm2, "
                                          "efficientnet_lite0, efficientnet_lite2, mobilenetv2, "
                                          "timm:<arch>, tv:<arch>, "
                                          "hf:<dir>, tiny_* test models.")]
DatasetOption = Annotated[str, typer.Option("--dataset", "-d", help="Data set spec: digits, "
                                            "mnist5k, lfw_faces, patches, 20ng, r8, r52, "
                                            "rotten_tomatoes, "
                                            "csv:<path>, parquet:<path>, imagefolder:<dir>, "
                                            "npz:<path>; lm:<text data set> for next-token "
                                            "prediction on its texts (causal decoders: "
                                            "smollm2, tiny_llama, hf:<dir>).")]
SeedOption = Annotated[int, typer.Option(help="Seed of splits, head initialisation, batches.")]
LayersOption = Annotated[str | None, typer.Option("--layers", help="Restrict to these "
                                                  "candidate layers or blocks, comma-separated.")]
GranularityOption = Annotated[str, typer.Option(help="module: a row per layer; block: per "
                                                "enclosing block.")]
DeviceOption = Annotated[str, typer.Option(help="cpu, cuda or auto.")]
CheckpointOption = Annotated[Path | None, typer.Option(help="Weights for timm:<arch> or "
                                                       "tv:<arch> (.safetensors or a state "
                                                       "dict).")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]


def main() -> None:
    """Entry point of the ``zest`` console script."""
    app()


#: The flags of the command running now (:func:`command_flags`), set by :func:`_knowing_flags`.
_RUNNING_FLAGS: ContextVar[dict[str, str] | None] = ContextVar("zest_running_flags",
                                                               default=None)


def command_flags(command: Callable[..., Any]) -> dict[str, str]:
    """The flag of each option of ``command``, by the Python names it stands for: its
    parameter name and its flag's name in Python spelling (``--top-k`` → ``top_k``), read off
    the command's Typer options (a two-way flag also by ``name=True``/``name=False``); how
    :func:`zest.errors.message_for` names a library error's parameters on the command line
    (the one place parameters become flags)."""
    import inspect
    import typing

    from typer.models import OptionInfo

    hints = typing.get_type_hints(command, include_extras=True)
    flags: dict[str, str] = {}
    for name in inspect.signature(command).parameters:
        info = next((m for m in getattr(hints.get(name), "__metadata__", ())
                     if isinstance(m, OptionInfo)), None)
        if info is None:
            continue
        # in Annotated[..., typer.Option("--top-k")] the first declaration sits in `default`
        first = (info.default,) if isinstance(info.default, str) and \
            info.default.startswith("-") else ()
        declared = [d.strip() for decl in (*first, *(info.param_decls or ()))
                    for d in decl.split("/")]
        long = [d for d in declared if d.startswith("--")]
        flag = long[0] if long else "--" + name.replace("_", "-")
        flags.setdefault(flag[2:].replace("-", "_"), flag)
        flags[name] = flag
        if typing.get_args(hints[name])[0] is bool:  # --check-base / --no-check-base
            flags[f"{name}=True"] = flag
            flags[f"{name}=False"] = long[1] if len(long) > 1 else f"--no-{flag[2:]}"
    return flags


def _knowing_flags(typer_app: typer.Typer) -> None:
    """Runs every command of ``typer_app`` (and of its sub-apps) with its
    :func:`command_flags` known to :func:`_user_errors`."""
    import functools

    for info in typer_app.registered_commands:
        callback = info.callback
        flags = command_flags(callback)

        @functools.wraps(callback)
        def run(*args: Any, __callback=callback, __flags=flags, **kwargs: Any) -> Any:
            token = _RUNNING_FLAGS.set(__flags)
            try:
                return __callback(*args, **kwargs)
            finally:
                _RUNNING_FLAGS.reset(token)

        info.callback = run
    for group in typer_app.registered_groups:
        _knowing_flags(group.typer_instance)


@contextmanager
def _user_errors():
    try:
        yield
    except ZestError as exc:
        typer.echo(f"error: {message_for(exc, _RUNNING_FLAGS.get() or {})}", err=True)
        raise typer.Exit(code=1) from None
    except KeyboardInterrupt:
        typer.echo("interrupted; nothing half-written is left (outputs are written whole or "
                   "not at all; a collector keeps its finished records: run the same command to "
                   "resume)", err=True)
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


def with_data_options(exclude: tuple[str, ...] = ()):
    """Adds the data options to a command, generated from the fields of
    :class:`~zest.loading.DataOptions` (declared once there), and hands the command one
    ``options`` argument built from them (validated before any work)."""
    import dataclasses
    import functools
    import inspect
    import typing

    from zest.loading import DataOptions

    hints = typing.get_type_hints(DataOptions)
    exposed = [f for f in dataclasses.fields(DataOptions)
               if f.metadata.get("cli") and f.name not in exclude]

    def decorate(command):
        signature = inspect.signature(command)
        resolved = typing.get_type_hints(command, include_extras=True)
        kept = [p.replace(annotation=resolved.get(p.name, p.annotation))
                for p in signature.parameters.values() if p.name != "options"]
        added = [inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                   default=f.default,
                                   annotation=Annotated[hints[f.name],
                                                        typer.Option(help=f.metadata["help"])])
                 for f in exposed]

        @functools.wraps(command)
        def wrapper(**kwargs):
            values = {f.name: kwargs.pop(f.name) for f in exposed}
            with _user_errors():
                options = DataOptions(**values)
            return command(options=options, **kwargs)

        wrapper.__signature__ = signature.replace(parameters=kept + added)
        wrapper.__annotations__ = {p.name: p.annotation for p in kept + added}
        return wrapper

    return decorate


def _echo_written(path: Path, rows: int, what: str) -> None:
    typer.echo(f"wrote {rows} {what} rows to {path}")


# -- collect ---------------------------------------------------------------------------------------
def with_settings(settings_class: type, argument: str):
    """Adds the options of a settings dataclass's fields that carry a help text (see
    :func:`zest.command_line.setting`; named, typed and parsed by their
    :class:`~zest.command_line.CommandLine` form where they have one) in place of the
    command's ``argument`` parameter, and hands the command ``argument`` as a dict of field
    values. The class is built by the command, under :func:`_settings_named` with the
    flags of :func:`zest.command_line.option_flags`."""
    import functools
    import inspect
    import typing

    from zest.command_line import cli_fields

    hints = typing.get_type_hints(settings_class)
    exposed = {}  # option name -> (field, its command-line form or None)
    for f in cli_fields(settings_class):
        form = f.metadata["command_line"]
        exposed[form.name if form else f.name] = (f, form)

    def option(name: str) -> inspect.Parameter:
        f, form = exposed[name]
        kind = form.type if form and form.type is not None else hints[f.name]
        default = form.default if form and form.default is not None else f.default
        return inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default,
                                 annotation=Annotated[kind, typer.Option(help=f.metadata["help"])])

    def decorate(command):
        signature = inspect.signature(command)
        resolved = typing.get_type_hints(command, include_extras=True)
        parameters = []
        for p in signature.parameters.values():
            if p.name == argument:  # the options take the placeholder's place
                parameters += [option(name) for name in exposed]
            else:
                parameters.append(p.replace(annotation=resolved.get(p.name, p.annotation)))

        @functools.wraps(command)
        def wrapper(**kwargs):
            values = {}
            for name, (f, form) in exposed.items():
                value = kwargs.pop(name)
                values[f.name] = form.parse(value) if form and form.parse else value
            return command(**{argument: values}, **kwargs)

        wrapper.__signature__ = signature.replace(parameters=parameters)
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
        return wrapper

    return decorate


@contextmanager
def _settings_named(flags: dict[str, str]):
    """Errors raised while a command builds its settings name their parameters
    (:func:`zest.errors.naming`), and those parameters' flags (``flags``, from
    :func:`zest.command_line.option_flags`) join the running command's, so :func:`_user_errors`
    prints them as flags through :func:`zest.errors.message_for`, the one renaming."""
    from zest.errors import naming

    _RUNNING_FLAGS.set({**(_RUNNING_FLAGS.get() or {}), **flags})  # reset when the command ends
    with naming(*flags):
        yield


@collect_app.command("metrics")
@with_data_options()
@with_settings(MetricsRequest, "request")
def collect_metrics_command(
    model: ModelOption,
    dataset: DatasetOption,
    out: Annotated[Path, typer.Option(help="Parquet file to write.")],
    request: Any = None,
    seed: SeedOption = 0,
    options: Any = None,
    layers: LayersOption = None,
    granularity: GranularityOption = "module",
    device: DeviceOption = "cpu",
    checkpoint: CheckpointOption = None,
    quiet: QuietOption = False,
) -> None:
    """Zero-shot metrics of every candidate layer from one forward and backward pass."""
    from zest.collect import run_metrics

    with _user_errors():
        with _settings_named(option_flags(MetricsRequest, layer_names="--layers")):
            settings = MetricsRequest(model, dataset, out, seed=seed, options=options,
                                      granularity=granularity, layer_names=_names(layers),
                                      device=device,
                                      checkpoint=str(checkpoint) if checkpoint else None,
                                      **request)
        with _progress("probe", quiet) as progress:
            frame = run_metrics(settings, progress)
        _echo_written(out, len(frame), "metric")


@collect_app.command("groundtruth")
@with_data_options()
@with_settings(GroundTruthConfig, "config")
@with_settings(GroundTruthRequest, "request")
def collect_groundtruth_command(
    model: ModelOption,
    dataset: DatasetOption,
    out: Annotated[Path, typer.Option(help="Parquet file; existing rows are kept (resume).")],
    config: Any = None,
    request: Any = None,
    seed: SeedOption = 0,
    options: Any = None,
    layers: LayersOption = None,
    device: DeviceOption = "cpu",
    checkpoint: CheckpointOption = None,
    quiet: QuietOption = False,
) -> None:
    """Fine-tune each candidate layer alone (plus a fresh head) and record its gain."""
    from zest.groundtruth import run_groundtruth

    flags = option_flags(GroundTruthConfig, GroundTruthRequest, layer_names="--layers",
                         data_seed="--seed")
    with _user_errors():
        with _settings_named(flags):
            settings = GroundTruthRequest(
                model, dataset, out, config=GroundTruthConfig(**config), options=options,
                layer_names=_names(layers), data_seed=seed, device=device,
                checkpoint=str(checkpoint) if checkpoint else None, **request)
        with _progress("layers", quiet) as progress:
            frame = run_groundtruth(settings, progress)
        _echo_written(out, len(frame), "ground-truth")


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

    with _user_errors():
        items = list(grid_jobs(grid, only=_names(only), n_jobs=n_jobs))
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


# -- predictor -------------------------------------------------------------------------------------
RecordsOption = Annotated[Path, typer.Option(help="Folder with metrics/ and groundtruth/ "
                                             "record files.")]
TargetOption = Annotated[str, typer.Option(help="gt_loss_gain (steadier) or gt_gain.")]
MinSeedsOption = Annotated[int, typer.Option(
    help="Use only groups whose every layer has ground truth from this many seeds (groups "
         "still being collected are left out).")]


@app.command("train-predictor")
def train_predictor_command(
    records: RecordsOption = Path("data/records"),
    out: Annotated[Path, typer.Option(help="Predictor JSON file.")] = Path(
        "zest/predictors/universal.json"),
    backend: Annotated[str, typer.Option(help="lightgbm or pairwise_logistic.")] = "lightgbm",
    target: TargetOption = "gt_loss_gain",
    normalization: Annotated[str, typer.Option(help="rank or robust_z (within group).")]
    = "rank",
    seed: SeedOption = 0,
    context: Annotated[bool, typer.Option(
        "--context/--no-context", help="Context features beside the metrics (layer type, "
        "depth, parameter share).")] = True,
    roles: Annotated[bool, typer.Option(
        "--roles/--no-roles", help="Context: each layer's role in its block and its position "
        "there (named alike in every family).")] = False,
    modality: Annotated[bool, typer.Option(
        "--modality/--no-modality", help="Context: a text/image flag.")] = True,
    unseen_modality_blend: Annotated[float, typer.Option(
        help="Weight of the n_params prior on a model of a modality no training group had "
             "(1 = the prior alone; issue 33, predictor_training/robust_variants.md).")] = 0.0,
    feature_fraction: Annotated[float, typer.Option(
        help="Share of the features each LightGBM tree may split on (issue 33).")] = 1.0,
    min_seeds: MinSeedsOption = 2,
    features: Annotated[str | None, typer.Option(
        help="Comma-separated metrics to learn from (default: every metric but the peer-only "
             "selectors kappa, fim_score, repr_shift, class_separation).")] = None,
) -> None:
    """Train the universal predictor on every complete group of the records (with a LOGO CV
    summary)."""
    from zest.training import train_predictor

    with _user_errors():
        ranker, summary = train_predictor(records, out, backend=backend, target=target,
                                          normalization=normalization, seed=seed,
                                          min_seeds=min_seeds, features=_names(features),
                                          use_context=context, use_roles=roles,
                                          use_modality=modality,
                                          unseen_modality_blend=unseen_modality_blend,
                                          feature_fraction=feature_fraction)
        typer.echo(f"trained {backend} on {len(ranker.groups_)} groups "
                   f"({len(ranker.features_)} features); leave-one-group-out mean Kendall τ "
                   f"{summary['kendall']:.3f}, top-5 recall {summary['recall']:.3f} -> {out}")


@app.command("evaluate-predictor")
def evaluate_predictor_command(
    predictor: Annotated[str, typer.Option(help="Predictor JSON file or 'universal'.")]
    = "universal",
    records: RecordsOption = Path("data/records"),
    out_dir: Annotated[Path, typer.Option(help="Folder for report.md, results.json, "
                                          "plot PNGs.")] = Path("predictor_training"),
    report: Annotated[Path | None, typer.Option(help="Also write the markdown report here.")]
    = Path("data/predictors/universal.report.md"),
    schemes: Annotated[str, typer.Option(help="Comma-separated: logo, lodo, lomo, lofo "
                                         "(leave one family out), cross_modality.")]
    = "logo,lodo,lomo,lofo,cross_modality",
    target: Annotated[str | None, typer.Option(help="Default: the predictor's target.")] = None,
    min_seeds: MinSeedsOption = 2,
) -> None:
    """Held-out evaluation of the predictor next to every single metric and the baselines."""
    from zest.training import evaluate_predictor

    with _user_errors():
        summary = evaluate_predictor(predictor, records, out_dir, report=report,
                                     schemes=_names(schemes) or [], target=target,
                                     min_seeds=min_seeds)
        for line in summary:
            typer.echo(line)


@app.command("rank")
@with_data_options(exclude=("max_val",))
def rank_command(
    model: ModelOption,
    dataset: DatasetOption,
    predictor: Annotated[str, typer.Option(help="'universal' or a predictor JSON file.")]
    = "universal",
    by: Annotated[str | None, typer.Option(help="Rank by this single metric instead.")] = None,
    k: Annotated[int | None, typer.Option("--top-k", help="Choose the k best layers.")] = None,
    param_budget: Annotated[float | None, typer.Option(help="Choose the best layers within "
                                                       "this fraction of the parameters.")]
    = None,
    batch_size: Annotated[int, typer.Option(help="Minibatch size.")] = 32,
    batches: Annotated[int, typer.Option(help="Rank on N minibatches and report stability.")]
    = 1,
    out: Annotated[Path | None, typer.Option(help="Write the table (.csv or .json).")] = None,
    plot: Annotated[Path | None, typer.Option(help="PNG of score over depth.")] = None,
    output_format: Annotated[str, typer.Option("--format", help="table or peft.")] = "table",
    method: Annotated[str | None, typer.Option(
        help="Choose only layers this tuning method can tune (gps, spsft, lora, layers); "
             "default: any ranked layer.")] = None,
    seed: SeedOption = 0,
    options: Any = None,
    layers: LayersOption = None,
    granularity: GranularityOption = "module",
    device: DeviceOption = "cpu",
    checkpoint: CheckpointOption = None,
    quiet: QuietOption = False,
) -> None:
    """Rank the layers of a model for fine-tuning on a data set, from one minibatch."""
    from zest.errors import InvalidInputError
    from zest.loading import load_pair
    from zest.models import resolve_device
    from zest.outputs import check_output_file, staged_file
    from zest.planning import layer_tuner
    from zest.ranking import check_selection, load_predictor, rank

    with _user_errors():
        check_selection(k, param_budget)
        if output_format not in ("table", "peft"):
            raise InvalidInputError(f"unknown --format {output_format!r}; use table or peft")
        if method is not None:
            layer_tuner(method)
        if output_format == "peft" and method not in (None, "lora"):
            raise InvalidInputError(f"--format peft lists layers for LoRA; drop --method {method} "
                                    "or use --method lora")
        if out is not None:
            check_output_file(out, "--out", (".csv", ".json"), kind="ranking")
        if plot is not None:
            check_output_file(plot, "--plot", (".png", ".pdf", ".svg"), kind="plot")
        if batches < 1:
            raise InvalidInputError(f"--batches must be ≥ 1, got {batches}")
        if by is None:
            load_predictor(predictor)  # fail before loading the model
        torch_device = resolve_device(device)
        model_, task, data = load_pair(model, dataset, options=options, seed=seed,
                                       device=str(torch_device),
                                       checkpoint=str(checkpoint) if checkpoint else None)
        minibatches = data.batches("train", batch_size, batches, seed=seed)
        ranking = rank(model_, task, minibatches, predictor=predictor, by=by,
                       granularity=granularity, layer_names=_names(layers), device=torch_device)
        # --format peft chooses among the layers LoRA can wrap, as Ranking.to_lora_config does
        chooser = "lora" if output_format == "peft" else method
        chosen = ranking.top(k, method=chooser) if k is not None else (
            ranking.select(param_budget, method=chooser) if param_budget is not None
            else ranking.default_choice(method=chooser))
        table = ranking.to_frame()
        table["chosen"] = table["layer"].isin(chosen)
        if output_format == "peft":
            typer.echo(repr(chosen))
        else:
            shown = table[["rank", "layer", "type", "params", "score",
                           *([method] if method is not None else []), "chosen"]]
            shown = shown.astype({"score": object})
            shown.loc[:, "score"] = [f"{v:.4f}" if v == v else "n/a" for v in table["score"]]
            typer.echo(shown.to_string(index=False))
            share = table.loc[table["chosen"], "params"].sum() / ranking.total_params
            among = (f" among the {int(table[method].sum())} that --method {method} can tune"
                     if method is not None else "")
            typer.echo(f"\n{len(chosen)} layers chosen{among}, {share:.2%} of "
                       f"{ranking.total_params:,} parameters; ranked by {ranking.by} in "
                       f"{ranking.seconds:.2f} s")
            if ranking.stability:
                s = ranking.stability
                typer.echo(f"stability over {s['batches']} minibatches: mean pairwise Kendall τ "
                           f"{s['kendall_tau']:.3f}, top-5 Jaccard {s['top5_jaccard']:.3f}")
        for note in ranking.notes:
            typer.echo(f"note: {note}", err=True)
        if out is not None:
            with staged_file(out) as staging:
                if out.suffix == ".csv":
                    table.to_csv(staging, index=False)
                else:
                    table.to_json(staging, orient="records", indent=1)
        if plot is not None:
            with staged_file(plot) as staging:
                ranking.plot(staging, chosen=chosen)


# -- fine-tuning -----------------------------------------------------------------------------------
def tuner_option_fields() -> list[tuple[Any, Any]]:
    """The tuner options ``zest finetune`` exposes: every field with ``cli`` metadata of the
    registered methods' options classes (:mod:`zest.finetune.options`), each name once, the
    methods' own in the order their classes were declared and then the shared ones, with its
    type hint."""
    import dataclasses
    import typing

    from zest.finetune import METHODS, TunerOptions

    def declared(cls: type) -> list[type]:
        return [cls] + [c for sub in cls.__subclasses__() for c in declared(sub)]

    order = declared(TunerOptions)
    found: dict[str, tuple[Any, Any]] = {}
    classes = sorted({METHODS.get(name).options_class for name in METHODS.names()},
                     key=lambda cls: order.index(cls) if cls in order else len(order))
    for options_class in classes:
        hints = typing.get_type_hints(options_class)
        for option in options_class.own_fields():
            if option.metadata.get("cli"):
                found.setdefault(option.name, (option, hints[option.name]))
    hints = typing.get_type_hints(TunerOptions)
    for option in dataclasses.fields(TunerOptions):
        if option.metadata.get("cli"):
            found.setdefault(option.name, (option, hints[option.name]))
    return list(found.values())


def with_request_options(request_class, shared: dict[str, Any]):
    """Adds a request dataclass's options to a command, generated from its fields (their
    ``cli`` metadata: ``help``, and ``type``/``flag`` where the CLI differs), the way
    :func:`with_data_options` adds :class:`~zest.loading.DataOptions`; ``shared`` gives the
    options other commands declare too (``--model``, ...), by field name. A field whose
    metadata is ``"tuner options"`` becomes the tuners' options
    (:func:`tuner_option_fields`), collected into a dict of those given. The command gets one
    ``request`` argument, built (and so validated) before any work, beside its own parameters
    and ``options`` (the data options, which :func:`with_data_options` adds)."""
    import dataclasses
    import functools
    import inspect
    import typing

    hints = typing.get_type_hints(request_class)
    keyword = inspect.Parameter.POSITIONAL_OR_KEYWORD
    generated: list[inspect.Parameter] = []
    tuner_names: list[str] = []
    field_names: list[str] = []

    def option(name: str, annotation: Any, default: Any, cli: dict[str, Any]) -> inspect.Parameter:
        flags = (cli["flag"],) if "flag" in cli else ()
        return inspect.Parameter(name, keyword, default=default, annotation=Annotated[
            annotation, typer.Option(*flags, help=cli["help"])])

    for entry in dataclasses.fields(request_class):
        cli = entry.metadata.get("cli")
        if not entry.init or cli is None:
            continue
        default = (inspect.Parameter.empty if entry.default is dataclasses.MISSING
                   and entry.default_factory is dataclasses.MISSING else entry.default)
        if cli == "tuner options":
            for tuner_field, hint in tuner_option_fields():
                flag_type = bool if hint is bool else hint | None
                generated.append(option(tuner_field.name, flag_type,
                                        False if hint is bool else None,
                                        tuner_field.metadata["cli"]))
                tuner_names.append(tuner_field.name)
            field_names.append(entry.name)
            continue
        if cli == "shared":
            generated.append(inspect.Parameter(entry.name, keyword, default=default,
                                               annotation=shared[entry.name]))
        else:
            annotation = cli.get("type", hints[entry.name])
            if default is None:
                annotation = annotation | None
            generated.append(option(entry.name, annotation, default, cli))
        field_names.append(entry.name)
    generated.append(inspect.Parameter("options", keyword, default=None, annotation=Any))

    def decorate(command):
        resolved = typing.get_type_hints(command, include_extras=True)
        own = [p.replace(annotation=resolved.get(p.name, p.annotation))
               for p in inspect.signature(command).parameters.values() if p.name != "request"]

        @functools.wraps(command)
        def wrapper(**kwargs):
            given = {name: kwargs.pop(name) for name in tuner_names}
            values = {name: kwargs.pop(name) for name in field_names if name in kwargs}
            values["method_options"] = {name: value for name, value in given.items()
                                        if value is not None and value is not False}
            with _user_errors():
                request = request_class(**values, options=kwargs.pop("options"))
            return command(request=request, **kwargs)

        parameters = generated + own
        wrapper.__signature__ = inspect.Signature(parameters)
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
        return wrapper

    return decorate


def _finetune_request_options():
    from zest.pipeline import FinetuneRequest

    return with_request_options(FinetuneRequest, shared={
        "model": ModelOption, "dataset": DatasetOption, "seed": SeedOption,
        "device": DeviceOption, "checkpoint": CheckpointOption})


@app.command("finetune")
@with_data_options()
@_finetune_request_options()
def finetune_command(request: Any = None, quiet: QuietOption = False) -> None:
    """Fine-tune the chosen layers (GPS/SPSFT or a baseline) and save the delta; the run folder
    is written whole or not at all."""
    from zest.pipeline import run_finetune

    with _user_errors(), _progress(f"{request.method}", quiet) as progress:
        def report(event: dict) -> None:
            if "plan" in event and not quiet:
                typer.echo(_plan_line(event["plan"]), err=True)
            if "lr" in event and not quiet:
                typer.echo(f"learning rate {event['lr']:g} ({event['lr_reason']})", err=True)
            if progress is not None and "step" in event:
                progress(event["step"], event["step"])
            if "epoch_done" in event and not quiet:
                typer.echo(f"epoch {event['epoch_done']}: train acc "
                           f"{event['train_accuracy']:.3f}, val acc {event['val_accuracy']:.3f}, "
                           f"val loss {event['val_loss']:.4f}", err=True)

        metrics = run_finetune(request, progress=report)
        score = (f"test next-token loss {metrics['test_loss']:.4f} (perplexity "
                 f"{metrics['test_perplexity']:.2f})" if "test_perplexity" in metrics
                 else f"test accuracy {metrics['test_accuracy']:.4f}")
        chose = f"--method auto chose {metrics['method']}; " if request.method == "auto" else ""
        typer.echo(f"{chose}{score} at the best val epoch ({metrics['best_epoch']} of "
                   f"{len(metrics['epochs'])}); {metrics['trainable_params']:,} trainable "
                   f"parameters ({metrics['trainable_share']:.2%}); run written to "
                   f"{request.out}")


def _plan_line(plan: dict) -> str:
    """One line on a fine-tuning plan: method (and why, for --method auto), layers, density."""
    per_layer: dict[str, set] = {}
    for entry in plan["per_layer"].values():
        for key, value in entry.items():
            if key not in ("params", "trainable"):
                per_layer.setdefault(key, set()).add(value)
    settings = [f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}"
                for key, value in plan["options"].items() if key not in per_layer]
    settings += [f"{key}={min(values)}" + (f"–{max(values)}" if len(values) > 1 else "")
                 for key, values in sorted(per_layer.items())]
    density = f" at {', '.join(settings)}" if settings else " densely"
    if plan["spread"] is not None:
        spread = f"{plan['spread']:g}"
        why = f"; {plan['spread_rule']}" if plan["spread_rule"] else ""
        density += f" (spread {spread}: the chosen layers hold up to {spread}× the budget{why})"
    line = (f"plan: {plan['method']} on {len(plan['layers'])} layers{density}, "
            f"{plan['planned_trainable_share']:.2%} of the parameters trainable")
    if plan["method_rule"]:
        line += f"; --method auto chose {plan['method']}: {plan['method_rule']} (provisional rule)"
    return "; ".join([line, *plan["notes"]])


@app.command("apply-delta")
def apply_delta_command(
    model: ModelOption,
    delta: Annotated[Path, typer.Option(help="delta.safetensors (with its .json sidecar).")],
    out: Annotated[Path, typer.Option(help="Merged weights (.safetensors).")],
    seed: SeedOption = 0,
    checkpoint: CheckpointOption = None,
    check_base: Annotated[bool, typer.Option(
        "--check-base/--no-check-base", help="Refuse a base other than the one the delta was "
        "trained on, and a delta that does not record its base. --no-check-base applies it to "
        "any base it fits: only for a base you know is the right one.")] = True,
) -> None:
    """Merge a delta into a fresh base model and save the merged weights."""
    from safetensors.torch import save_file

    from zest.errors import InvalidInputError
    from zest.finetune import Delta, apply_delta
    from zest.finetune.delta import sidecar_path
    from zest.models import load_model
    from zest.outputs import check_output_file, staged_file

    with _user_errors():
        if out.resolve() in (delta.resolve(), sidecar_path(delta).resolve()):
            raise InvalidInputError(f"--out {str(out)!r} is the delta itself; write the merged "
                                    "weights to another --out")
        check_output_file(out, "--out", (".safetensors",), kind="merged-weights")
        loaded = Delta.load(delta)
        num_classes = int(loaded.meta.get("num_classes") or 2)
        base, _task = load_model(model, num_classes, seed=seed,
                                 checkpoint=str(checkpoint) if checkpoint else None,
                                 kind=loaded.meta.get("task_kind", "classification"))
        apply_delta(base, loaded, model_spec=model, check_base=check_base)
        state = {k: v.detach().contiguous() for k, v in base.state_dict().items()}
        with staged_file(out) as staging:
            save_file(state, str(staging), metadata={"zest_delta": str(delta)})
        typer.echo(f"merged {len(loaded.entries)} delta entries ({loaded.numel():,} values) "
                   f"into {model}; wrote {out}")


_knowing_flags(app)  # after every command is registered

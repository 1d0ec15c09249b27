"""``zest rank``, ``zest finetune`` and ``zest apply-delta``: the online path (ARCHITECTURE.md
§3a); ``zest finetune``'s options are generated from its request and the tuners' options."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from zest.cli.common import (
    CheckpointOption,
    DatasetOption,
    DeviceOption,
    ModelOption,
    QuietOption,
    SeedOption,
    app,
    progress_bar,
    user_errors,
    with_data_options,
    with_pair_options,
)


@app.command("rank")
@with_data_options(exclude=("max_val",))
@with_pair_options()
def rank_command(
    pair: Any = None,
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
    options: Any = None,
) -> None:
    """Rank the layers of a model for fine-tuning on a data set, from one minibatch."""
    from zest.errors import InvalidInputError
    from zest.loading import load_pair
    from zest.models import resolve_device
    from zest.outputs import check_output_file, staged_file
    from zest.planning import layer_tuner
    from zest.ranking import check_selection, load_predictor, rank

    with user_errors():
        check_selection(k, param_budget)
        if output_format not in ("table", "peft"):
            raise InvalidInputError(f"unknown --format {output_format!r}; use table or peft")
        if method is not None:
            layer_tuner(method)
        if output_format == "peft" and method not in (None, "lora"):
            raise InvalidInputError(f"--format peft lists layers for LoRA; drop --method {method} "
                                    "or use --method lora")
        if out is not None:
            check_output_file(out, "out", (".csv", ".json"), kind="ranking")
        if plot is not None:
            check_output_file(plot, "plot", (".png", ".pdf", ".svg"), kind="plot")
        if batches < 1:
            raise InvalidInputError(f"--batches must be ≥ 1, got {batches}")
        if by is None:
            load_predictor(predictor)  # fail before loading the model
        torch_device = resolve_device(pair.device)
        model, task, data = load_pair(pair.model, pair.dataset, options=options, seed=pair.seed,
                                      device=str(torch_device), checkpoint=pair.checkpoint)
        minibatches = data.batches("train", batch_size, batches, seed=pair.seed)
        ranking = rank(model, task, minibatches, predictor=predictor, by=by,
                       granularity=pair.granularity, layer_names=pair.layer_names,
                       device=torch_device)
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
            with user_errors():
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

    with user_errors(), progress_bar(f"{request.method}", quiet) as progress:
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

    with user_errors():
        if out.resolve() in (delta.resolve(), sidecar_path(delta).resolve()):
            raise InvalidInputError(f"--out {str(out)!r} is the delta itself; write the merged "
                                    "weights to another --out")
        check_output_file(out, "out", (".safetensors",), kind="merged-weights")
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



"""What every ``zest`` command shares (ARCHITECTURE.md §3a): the Typer apps, the options
several commands take, the options generated from settings dataclasses (``DataOptions``,
the collectors' requests), one-line errors with the library's parameters respelled as the
running command's flags (the one place parameters become flags), and progress bars."""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from zest.errors import ZestError, message_for

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="ZEST: pick the layers worth fine-tuning from one minibatch.")
collect_app = typer.Typer(no_args_is_help=True, help="Collect metric and ground-truth records.")
app.add_typer(collect_app, name="collect")

# -- shared options ------------------------------------------------------------------------------
ModelOption = Annotated[str, typer.Option("--model", "-m", help="Model spec: minilm, smollm2, "
                                          "mpnet, gemma3, efficientnet_lite0, "
                                          "efficientnet_lite2, mobilenetv2, "
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



#: The flags of the command running now (:func:`command_flags`), set by :func:`knowing_flags`.
RUNNING_FLAGS: ContextVar[dict[str, str] | None] = ContextVar("zest_running_flags",
                                                               default=None)


def command_flags(command: Callable[..., Any]) -> dict[str, str]:
    """The flag of each option of ``command``, by the Python names it stands for: its
    parameter name and its flag's name in Python spelling (``--top-k`` → ``top_k``), read off
    the command's Typer options (a two-way flag also by ``name=True``/``name=False``); how
    :func:`zest.errors.message_for` names a library error's parameters on the command line
    (the one place parameters become flags)."""
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


def knowing_flags(typer_app: typer.Typer) -> None:
    """Runs every command of ``typer_app`` (and of its sub-apps) with its
    :func:`command_flags` known to :func:`user_errors`."""
    import functools

    for info in typer_app.registered_commands:
        callback = info.callback
        flags = command_flags(callback)

        @functools.wraps(callback)
        def run(*args: Any, __callback=callback, __flags=flags, **kwargs: Any) -> Any:
            token = RUNNING_FLAGS.set(__flags)
            try:
                return __callback(*args, **kwargs)
            finally:
                RUNNING_FLAGS.reset(token)

        info.callback = run
    for group in typer_app.registered_groups:
        knowing_flags(group.typer_instance)


@contextmanager
def user_errors():
    try:
        yield
    except ZestError as exc:
        typer.echo(f"error: {message_for(exc, RUNNING_FLAGS.get() or {})}", err=True)
        raise typer.Exit(code=1) from None
    except KeyboardInterrupt:
        typer.echo("interrupted; nothing half-written is left (outputs are written whole or "
                   "not at all; a collector keeps its finished records: run the same command to "
                   "resume)", err=True)
        raise typer.Exit(code=130) from None


@contextmanager
def progress_bar(description: str, quiet: bool):
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


def comma_names(text: str | None) -> list[str] | None:
    return [n.strip() for n in text.split(",") if n.strip()] if text else None


def with_data_options(exclude: tuple[str, ...] = ()):
    """Adds the data options to a command, generated from the fields of
    :class:`~zest.loading.DataOptions` (declared once there), and hands the command one
    ``options`` argument built from them (validated before any work)."""
    import dataclasses
    import functools
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
            with user_errors():
                options = DataOptions(**values)
            return command(options=options, **kwargs)

        wrapper.__signature__ = signature.replace(parameters=kept + added)
        wrapper.__annotations__ = {p.name: p.annotation for p in kept + added}
        return wrapper

    return decorate


def echo_written(path: Path, rows: int, what: str) -> None:
    typer.echo(f"wrote {rows} {what} rows to {path}")



def with_settings(settings_class: type, argument: str):
    """Adds the options of a settings dataclass's fields that carry a help text (see
    :func:`zest.command_line.setting`; named, typed and parsed by their
    :class:`~zest.command_line.CommandLine` form where they have one) in place of the
    command's ``argument`` parameter, and hands the command ``argument`` as a dict of field
    values. The class is built by the command, under :func:`settings_named` with the
    flags of :func:`zest.command_line.option_flags`."""
    import functools
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
def settings_named(flags: dict[str, str]):
    """Errors raised while a command builds its settings name their parameters
    (:func:`zest.errors.naming`), and those parameters' flags (``flags``, from
    :func:`zest.command_line.option_flags`) join the running command's, so :func:`user_errors`
    prints them as flags through :func:`zest.errors.message_for`, the one renaming."""
    from zest.errors import naming

    RUNNING_FLAGS.set({**(RUNNING_FLAGS.get() or {}), **flags})  # reset when the command ends
    with naming(*flags):
        yield



@dataclass(frozen=True)
class PairArguments:
    """The options of every command that loads one (model, data set) pair, parsed once
    (:func:`with_pair_options`): the layer list split, the checkpoint a string."""

    model: str
    dataset: str
    seed: int
    layer_names: list[str] | None
    device: str
    checkpoint: str | None
    quiet: bool
    granularity: str = "module"


#: The pair options, declared once: name → (Typer annotation, default).
PAIR_OPTIONS: dict[str, tuple[Any, Any]] = {
    "model": (ModelOption, inspect.Parameter.empty),
    "dataset": (DatasetOption, inspect.Parameter.empty),
    "seed": (SeedOption, 0), "layers": (LayersOption, None),
    "granularity": (GranularityOption, "module"), "device": (DeviceOption, "cpu"),
    "checkpoint": (CheckpointOption, None), "quiet": (QuietOption, False)}


def with_pair_options(granularity: bool = True):
    """Adds the pair options (:data:`PAIR_OPTIONS`; ``--granularity`` only with
    ``granularity``) to a command, ``--model`` and ``--dataset`` first and the rest last, and
    hands the command one ``pair`` argument, a :class:`PairArguments`."""
    import functools
    import typing

    names = [name for name in PAIR_OPTIONS if granularity or name != "granularity"]

    def option(name: str) -> inspect.Parameter:
        annotation, default = PAIR_OPTIONS[name]
        return inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                 default=default, annotation=annotation)

    def decorate(command):
        signature = inspect.signature(command)
        resolved = typing.get_type_hints(command, include_extras=True)
        kept = [p.replace(annotation=resolved.get(p.name, p.annotation))
                for p in signature.parameters.values() if p.name != "pair"]
        required = [p for p in kept if p.default is inspect.Parameter.empty]
        parameters = ([option("model"), option("dataset")] + required
                      + [p for p in kept if p not in required]
                      + [option(name) for name in names[2:]])

        @functools.wraps(command)
        def wrapper(**kwargs):
            values = {name: kwargs.pop(name) for name in names}
            checkpoint = values.pop("checkpoint")
            pair = PairArguments(layer_names=comma_names(values.pop("layers")),
                                 checkpoint=str(checkpoint) if checkpoint else None, **values)
            return command(pair=pair, **kwargs)

        wrapper.__signature__ = signature.replace(parameters=parameters)
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
        return wrapper

    return decorate

"""How a settings dataclass declares its command-line options, once, on its fields
(ARCHITECTURE.md §3a): a field made with :func:`setting` and a help text is an option of the
commands built on the class, named, typed and defaulted like the field unless its
:class:`CommandLine` form says otherwise. The CLI generates the options from these fields
(``zest.cli.with_settings``), and maps the Python parameters an error names to their flags
(:func:`option_flags`; the CLI renames them with :func:`zest.errors.message_for`); the library
itself never reads the command line and its errors name its parameters (``steps must be
...``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class CommandLine:
    """How a setting reads on the command line where that differs from its field.

    Attributes:
        name: The option's parameter name (its flag is ``--`` + the name with dashes).
        type: The option's type (``None``: the field's).
        default: The option's default (``None``: the field's).
        parse: Turns the option's value into the field's value (``None``: taken as it is);
            it must not raise: checking the value is ``__post_init__``'s.
    """

    name: str
    type: Any = None
    default: Any = None
    parse: Callable[[Any], Any] | None = None


def setting(default: Any = dataclasses.MISSING, help: str | None = None, *,  # noqa: A002
            default_factory: Any = dataclasses.MISSING,
            command_line: CommandLine | None = None) -> Any:
    """A dataclass field with the help text of its command-line option (no help: not an
    option) and, where the option differs from the field, its :class:`CommandLine` form."""
    return field(default=default, default_factory=default_factory,
                 metadata={"help": help, "command_line": command_line})


def cli_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of a settings dataclass that are command-line options, in declaration order."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("help")]


def option_flags(*settings_classes: type, **others: str) -> dict[str, str]:
    """The flag of every Python parameter a command's settings come from: the options of
    ``settings_classes`` (``--`` + the option's name with dashes) and ``others`` (parameter:
    flag, for the command's hand-written options)."""
    flags = dict(others)
    for settings_class in settings_classes:
        for f in cli_fields(settings_class):
            form = f.metadata["command_line"]
            flags[f.name] = "--" + (form.name if form else f.name).replace("_", "-")
    return flags

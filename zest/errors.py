"""User-facing errors.

Every error a user can cause derives from :class:`ZestError`. Its message is one line that names
the bad value and says how to fix it; the CLI prints it and exits with code 1.

The library speaks Python: a message names the parameter as the Python API spells it
(``param_budget must be in (0, 1], got 0``) and the error lists it in ``parameters``. A front
end that spells its parameters otherwise renames them in one place, :func:`message_for`: the
CLI passes its flags, generated from its options (``--param-budget must be in (0, 1], got 0``).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager


class ZestError(Exception):
    """Base class of every error caused by user input or user data.

    Args:
        message: One line naming the bad value and the fix, in Python terms.
        parameter: The Python parameter (or parameters) the message names, written in it as a
            word (``param_budget``, or ``param_budget=0``); :func:`message_for` renames them.
    """

    def __init__(self, message: str = "", *, parameter: str | Iterable[str] = ()) -> None:
        super().__init__(message)
        self.parameters: tuple[str, ...] = ((parameter,) if isinstance(parameter, str)
                                            else tuple(parameter))


class UnknownNameError(ZestError, KeyError):
    """A name (model, dataset, metric, layer, ...) that no registry or model knows."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class InvalidInputError(ZestError, ValueError):
    """An argument outside its valid range or of the wrong kind."""


class DataError(ZestError):
    """A data set that cannot be used as asked (missing file, too few classes, empty split)."""


class NonFiniteLossError(ZestError, FloatingPointError):
    """A loss that became NaN or infinite."""


class RecordError(ZestError):
    """A record file that cannot be read, appended to or written."""


def message_for(error: BaseException, names: Mapping[str, str]) -> str:
    """The message of ``error`` with each parameter it names spelled as ``names`` spells it
    (the CLI: ``{"param_budget": "--param-budget"}``): ``param_budget`` becomes
    ``--param-budget``, ``param_budget=0`` becomes ``--param-budget 0`` and
    ``method='gps'`` becomes ``--method gps`` (and ``check_base=False`` the flag ``names`` gives
    it, ``--no-check-base``), wherever the message writes the name as a word of its own (not
    inside a longer name, an attribute, a flag or quotes, nor as a call's first argument:
    ``ranking.top(k)`` stays). A parameter without a new name, and an error that lists none,
    keep their words."""
    message = str(error)
    for parameter in getattr(error, "parameters", ()):
        for setting in (f"{parameter}=True", f"{parameter}=False"):  # --x / --no-x
            if setting in names:
                message = message.replace(setting, names[setting])
        flag = names.get(parameter)
        if flag is None:
            continue
        word = re.compile(rf"(?<![\w.\-'\"`])(?<!\w\(){re.escape(parameter)}(?![\w(`'\"])"
                          r"(?P<assign>=(?:'(?P<token>[\w.:/+-]*)')?)?")

        def spelled(match: re.Match, flag: str = flag) -> str:
            if not match.group("assign"):
                return flag
            return f"{flag} {match.group('token') or ''}"

        message = word.sub(spelled, message)
    return message


@contextmanager
def naming(*parameters: str) -> Iterator[None]:
    """Adds ``parameters`` to a :class:`ZestError` raised inside, for a check written elsewhere
    that names the value as it is told (``check_positive("epochs", epochs)``)."""
    try:
        yield
    except ZestError as error:
        error.parameters = (*error.parameters, *parameters)
        raise


def closest_names(name: str, known: Iterable[str], n: int = 3) -> list[str]:
    """The known names closest to ``name`` (difflib ratio), best first."""
    known = list(known)
    close = difflib.get_close_matches(name, known, n=n, cutoff=0.5)
    if not close:
        close = [k for k in known if name and (name in k or k in name)][:n]
    return close


def unknown_name_message(kind: str, name: str, known: Iterable[str], list_all: bool = True) -> str:
    """One-line message for an unknown ``name`` of ``kind``, with suggestions."""
    known = sorted(known)
    parts = [f"unknown {kind} {name!r}"]
    close = closest_names(name, known)
    if close:
        parts.append(f"did you mean {', '.join(repr(c) for c in close)}?")
    if list_all:
        shown = known if len(known) <= 30 else known[:30] + ["..."]
        parts.append(f"known: {', '.join(shown)}")
    return "; ".join(parts)

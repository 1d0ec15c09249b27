"""User-facing errors.

Every error a user can cause derives from :class:`ZestError`. Its message is one line that names
the bad value and says how to fix it; the CLI prints it and exits with code 1.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ZestError(Exception):
    """Base class of every error caused by user input or user data."""


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

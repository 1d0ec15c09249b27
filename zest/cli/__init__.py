"""The ``zest`` command line (ARCHITECTURE.md §3a): thin Typer commands over the library functions.

Every command prints one line and exits with code 1 on a :class:`~zest.errors.ZestError`;
progress bars go to stderr and are off when stderr is not a terminal or with ``--quiet``.
"""

from __future__ import annotations

from zest.cli import collect, corpus, online  # noqa: F401 - registers the commands, in this order
from zest.cli.common import app, collect_app, knowing_flags

__all__ = ["app", "collect_app", "main"]


def main() -> None:
    """Entry point of the ``zest`` console script."""
    app()


knowing_flags(app)  # after every command is registered

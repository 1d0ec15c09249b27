"""Output paths checked before any work: a command that would fail to write its result after
minutes of work fails at once instead, with one line that names the path and the fix."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from zest.errors import InvalidInputError


def _writable_folder(folder: Path, flag: str, path: Path) -> None:
    for parent in [folder, *folder.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise InvalidInputError(f"{flag} {str(path)!r} cannot be written: "
                                        f"{str(parent)!r} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise InvalidInputError(f"{flag} {str(path)!r} cannot be written: "
                                        f"{str(parent)!r} is not writable")
            return


def check_output_file(path: str | os.PathLike, flag: str = "--out",
                      suffixes: Sequence[str] | None = None) -> Path:
    """Validates a file that a command will write: the right suffix, not a folder, its folder
    creatable and writable, the file itself writable when it exists."""
    path = Path(path)
    if suffixes and path.suffix not in suffixes:
        raise InvalidInputError(f"{flag} {str(path)!r} must end in {' or '.join(suffixes)}")
    if path.is_dir():
        raise InvalidInputError(f"{flag} {str(path)!r} is a folder; pass a file path")
    _writable_folder(path.parent if str(path.parent) else Path("."), flag, path)
    if path.exists() and not os.access(path, os.W_OK):
        raise InvalidInputError(f"{flag} {str(path)!r} exists and is not writable")
    return path


def check_output_dir(path: str | os.PathLike, flag: str = "--out-dir") -> Path:
    """Validates a folder that a command will create or fill: not a file, creatable, writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InvalidInputError(f"{flag} {str(path)!r} is a file; pass a folder")
    _writable_folder(path, flag, path)
    return path

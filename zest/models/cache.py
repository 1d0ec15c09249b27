"""zest's cache folder (converted weights, weight memos)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """zest's cache folder: ``$ZEST_CACHE_DIR``, else ``$XDG_CACHE_HOME/zest``, else
    ``~/.cache/zest``."""
    root = os.environ.get("ZEST_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "zest"

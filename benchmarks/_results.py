"""Resumable result files shared by the benchmark scripts (finished cases are kept)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def zest_update(method: str) -> str | None:
    """The update of a ZEST row from its label (``"zest + gps (spread 2)"`` → ``"gps"``,
    ``"zest + dense"`` → ``"dense"``); ``None`` for the other methods' rows."""
    if not method.startswith("zest + "):
        return None
    return method.removeprefix("zest + ").split(" ")[0]


def zest_label(tuner: str, spread: float) -> str:
    """The label of ZEST + GPS/SPSFT rows at ``spread`` (the method's default spread,
    ``zest.planning.default_spread``, unlabelled)."""
    from zest.planning import default_spread

    return f"zest + {tuner}" + ("" if spread == default_spread(tuner)
                                else f" (spread {spread:g})")


def relabel_spreads(rows: list[dict]) -> None:
    """Labels ZEST + GPS/SPSFT rows by the spread they recorded, so that rows keep their
    meaning after a default spread (``zest.planning.SPREAD_RULES``) changes."""
    for row in rows:
        tuner = zest_update(row["method"])
        if tuner in ("gps", "spsft") and row.get("spread") is not None:
            row["method"] = zest_label(tuner, row["spread"])


def load(path: Path) -> dict:
    """The results written so far (``{"results": []}`` when there are none)."""
    return json.loads(path.read_text()) if path.exists() else {"results": []}


def save(path: Path, data: dict, machine: str) -> None:
    """Writes ``data`` atomically with a description of the machine."""
    data["machine"] = machine
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def predictor_fingerprint(predictor: str = "universal") -> str:
    """A short hash of a predictor's content: results ranked by another predictor are redone."""
    from zest.ranking import load_predictor

    spec = json.dumps(load_predictor(predictor).to_dict(), sort_keys=True, default=str)
    return hashlib.sha256(spec.encode()).hexdigest()[:12]

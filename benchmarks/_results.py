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


def rate_tuner(method: str) -> str:
    """The tuner a method label trains with (``"zest + gps (spread 2)"`` → ``gps``, ``"lora
    (...)"`` → ``lora``, the dense layer choices → ``layers``)."""
    if method in ("full", "head"):
        return method
    for tuner in ("gps", "spsft", "lora"):
        if tuner in method:
            return tuner
    return "layers"


def group_kind(group: str) -> str:
    """The model kind (``zest.rates.MODEL_KINDS``) of a benchmark group, from its model."""
    from zest.models import MODELS

    meta = MODELS.meta(group.split("__")[0])
    if meta["modality"] == "image":
        return "image"
    return "decoder" if meta.get("causal_lm") else "encoder"


def zest_label(tuner: str, spread: float, budget: float) -> str:
    """The label of ZEST + GPS/SPSFT rows at ``spread`` and ``budget`` (the spread the method
    ships for the budget, ``zest.planning.spread_rule``, unlabelled)."""
    from zest.planning import spread_rule

    return f"zest + {tuner}" + ("" if spread == spread_rule(tuner, budget).spread
                                else f" (spread {spread:g})")


def relabel_spreads(rows: list[dict]) -> None:
    """Labels ZEST + GPS/SPSFT rows by the spread they recorded and their budget, so that rows
    keep their meaning after a default spread (``zest.planning.SPREAD_RULES``) changes."""
    for row in rows:
        tuner = zest_update(row["method"])
        if tuner in ("gps", "spsft") and row.get("spread") is not None:
            row["method"] = zest_label(tuner, row["spread"], row["budget"])


def load(path: Path, settings: dict | None = None) -> dict:
    """The results written so far (``{"results": []}`` when there are none).

    ``settings`` are the run's options (named as on its command line, without the dashes)
    that change what a row means (epochs, minibatches, predictor, ...): the file keeps them,
    and a run with other settings stops with one line rather than mixing its rows with rows
    made otherwise. A file from before it kept settings takes the run's.
    """
    data = json.loads(path.read_text()) if path.exists() else {"results": []}
    if settings is not None:
        recorded = data.setdefault("settings", dict(settings))
        for name, value in settings.items():
            if name in recorded and recorded[name] != value:
                raise SystemExit(
                    f"{path} holds results made with --{name} {recorded[name]}, not "
                    f"{value}: pass --out NEW.json to keep both, or --{name} "
                    f"{recorded[name]} to resume it")
            recorded.setdefault(name, value)
    return data


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


#: The rates a grid extends to at its edges: about half a decade apart.
RATE_LADDER = (1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def centred_rates(group: str, method: str) -> list[float]:
    """The rates a converged-regime case starts from: ``zest.rates``' default for the method
    label's tuner on the group's model kind, and its neighbours on :data:`RATE_LADDER` (the
    grid is then extended at its edges while the best rate sits there)."""
    from zest.rates import rate_for

    rate = rate_for(rate_tuner(method), group_kind(group)).lr
    i = min(range(len(RATE_LADDER)), key=lambda j: abs(RATE_LADDER[j] / rate - 1))
    return list(RATE_LADDER[max(i - 1, 0):i + 2])

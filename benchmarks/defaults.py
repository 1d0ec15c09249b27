"""What `zest finetune` does with its defaults (issue 35): every method, nothing but the model, the
data set, the method and the run folder.

For each packaged group below, ``zest finetune --model M --dataset D --method X --out RUN`` (the
library call ``zest.pipeline.run_finetune(M, D, RUN, method=X)``: ``--lr auto``, 3 epochs at most
with the best val epoch kept, ``--layers auto`` = the top 5 layers the method can tune) for every
method, one seed. The check a user would make: full fine-tuning at least as good as the head alone,
and every method well above chance.

Resumable: each finished (group, method) is kept in ``benchmarks/results/defaults.json``; rows
made by another version of the defaults (``zest.rates.RATE_RULES``) are redone.
Usage: python benchmarks/defaults.py [--groups efficientnet_lite0__digits,...] [--methods ...]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import tempfile
from pathlib import Path

import _results

from zest.finetune import METHODS
from zest.pipeline import run_finetune
from zest.rates import RATE_RULES
from zest.records import group_key

GROUPS = [("efficientnet_lite0", "digits"), ("minilm", "rotten_tomatoes")]
OUT = Path("benchmarks/results/defaults.json")


def rates_fingerprint() -> str:
    """A short hash of the default-rate table: rows made under another one are redone."""
    table = {f"{m}/{k}": rule.lr for (m, k), rule in sorted(RATE_RULES.items())}
    return hashlib.sha256(json.dumps(table, sort_keys=True).encode()).hexdigest()[:12]


def run_default(model: str, dataset: str, method: str) -> dict:
    """One ``zest finetune`` with the defaults; the row it leaves."""
    with tempfile.TemporaryDirectory() as tmp:
        metrics = run_finetune(model, dataset, Path(tmp) / "run", method=method)
        config = json.loads((Path(tmp) / "run" / "config.json").read_text())
    return {"test_accuracy": metrics["test_accuracy"], "val_accuracy": metrics["val_accuracy"],
            "best_epoch": metrics["best_epoch"], "epochs": len(metrics["epochs"]),
            "lr": config["lr"], "lr_reason": config["lr_reason"],
            "layers": len(config["layers"]), "trainable_share": metrics["trainable_share"],
            "seconds": metrics["wall_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--groups", default=",".join(group_key(*g) for g in GROUPS))
    parser.add_argument("--methods", default=",".join(sorted(METHODS.names())))
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    known = {group_key(*g): g for g in GROUPS}
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if set(groups) - set(known) or set(methods) - set(METHODS.names()):
        raise SystemExit(f"--groups must be among {sorted(known)} and --methods among "
                         f"{sorted(METHODS.names())}")
    data = _results.load(args.out)
    fingerprint = rates_fingerprint()
    rows = {(r["group"], r["method"]): r for r in data["results"]
            if r.get("rates") == fingerprint}
    machine = f"{platform.machine()} CPU, zest finetune defaults (lr auto, 3 epochs, best kept)"
    for name in groups:
        for method in methods:
            if (name, method) in rows:
                continue
            rows[name, method] = {"group": name, "method": method, "rates": fingerprint,
                                  **run_default(*known[name], method)}
            data["results"] = list(rows.values())
            _results.save(args.out, data, machine)
            r = rows[name, method]
            print(f"{name:32s} {method:7s} test acc {r['test_accuracy']:.3f} (lr {r['lr']:g}, "
                  f"best epoch {r['best_epoch']} of {r['epochs']}, {r['seconds']:.0f} s)",
                  flush=True)


if __name__ == "__main__":
    main()

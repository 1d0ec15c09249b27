"""How cheap can ground truth get and keep its ranking? (fidelity study, for costly models)

On a stratified sample of a group's candidate layers (:func:`zest.layers.stratified_layers`:
every role, spread over depth), ground truth is collected under several settings, each into its
own record file under ``data/records/fidelity/<group>/`` (outside the corpus folders, so the
predictor never trains on it). ``report`` then gives, per setting, the Kendall τ over layers of
its seed-averaged gains against the longest setting's (the reference), its own seed-to-seed τ,
and its CPU time. Resumable: rerun ``collect`` and finished rows are kept.

    python metric_collection/fidelity.py collect smollm2 r8
    python metric_collection/fidelity.py report smollm2 r8
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import kendalltau

from zest.groundtruth import GroundTruthConfig, collect_groundtruth
from zest.layers import candidate_layers, stratified_layers
from zest.loading import DataOptions, load_pair
from zest.records import group_key, read_records

#: name -> (steps, max_length); batch 16, 1,000 train / 300 val examples, seeds 0 and 1 for all.
#: The reference is listed first; the others are run cheapest first.
SETTINGS = {"steps60_len64": (60, 64), "steps15_len64": (15, 64), "steps30_len64": (30, 64),
            "steps30_len32": (30, 32)}
REFERENCE = "steps60_len64"
ORDER = ("steps15_len64", "steps60_len64", "steps30_len64", "steps30_len32")
SAMPLE = 20
TRAIN, VAL, BATCH, SEEDS = 1000, 300, 16, (0, 1)


def folder(model: str, dataset: str) -> Path:
    return Path("data/records/fidelity") / group_key(model, dataset)


def sample_names(model: str, dataset: str, n: int) -> list[str]:
    net, task, _ = load_pair(model, dataset, options=DataOptions(max_length=32, max_train=64,
                                                                max_val=32))
    return [layer.name for layer in stratified_layers(candidate_layers(net, task.head_name), n)]


def collect(model: str, dataset: str, only: list[str] | None, n: int) -> None:
    names = sample_names(model, dataset, n)
    out_dir = folder(model, dataset)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sample.json").write_text(json.dumps(names, indent=1))
    for setting in only or ORDER:
        steps, length = SETTINGS[setting]
        collect_groundtruth(model, dataset, out_dir / f"{setting}.parquet",
                            config=GroundTruthConfig(steps=steps, batch_size=BATCH),
                            seeds=SEEDS, layer_names=names,
                            options=DataOptions(max_length=length, max_train=TRAIN, max_val=VAL))
        print(f"done {setting}", flush=True)


def seed_tau(frame: pd.DataFrame, target: str) -> float:
    table = frame.pivot_table(index="layer", columns="gt_seed", values=target)
    taus = [kendalltau(table[a], table[b]).statistic
            for a, b in itertools.combinations(table.columns, 2)]
    return float(np.mean(taus)) if taus else float("nan")


def report(model: str, dataset: str) -> str:
    out_dir = folder(model, dataset)
    frames = {s: read_records(out_dir / f"{s}.parquet", "groundtruth") for s in SETTINGS
              if (out_dir / f"{s}.parquet").exists()}
    if REFERENCE not in frames:
        return f"no reference ({REFERENCE}) yet under {out_dir}"
    sample = json.loads((out_dir / "sample.json").read_text())
    complete = {s: f for s, f in frames.items() if f.groupby("layer")["gt_seed"].nunique().min()
                == len(SEEDS) and f["layer"].nunique() == len(sample)}
    lines = ["| setting | steps | tokens | layers | seed τ (loss) | seed τ (acc) | τ vs reference "
             "(loss) | τ vs reference (acc) | CPU s per layer-seed |", "|" + "---|" * 9]
    reference = frames[REFERENCE].groupby("layer")[["gt_loss_gain", "gt_gain"]].mean()
    for setting, frame in frames.items():
        mean = frame.groupby("layer")[["gt_loss_gain", "gt_gain"]].mean()
        both = mean.merge(reference, left_index=True, right_index=True, suffixes=("", "_ref"))
        steps, length = SETTINGS[setting]
        flag = "" if setting in complete else " (partial)"
        lines.append(
            f"| {setting}{flag} | {steps} | {length} | {len(both)} | "
            f"{seed_tau(frame, 'gt_loss_gain'):.2f} | {seed_tau(frame, 'gt_gain'):.2f} | "
            f"{kendalltau(both['gt_loss_gain'], both['gt_loss_gain_ref']).statistic:.2f} | "
            f"{kendalltau(both['gt_gain'], both['gt_gain_ref']).statistic:.2f} | "
            f"{frame['gt_seconds'].mean():.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("collect", "report"))
    parser.add_argument("model")
    parser.add_argument("dataset")
    parser.add_argument("--only", help="comma-separated settings to collect")
    parser.add_argument("--sample", type=int, default=SAMPLE, help="layers in the sample")
    args = parser.parse_args()
    if args.action == "collect":
        collect(args.model, args.dataset, args.only.split(",") if args.only else None,
                args.sample)
    else:
        print(report(args.model, args.dataset))


if __name__ == "__main__":
    main()

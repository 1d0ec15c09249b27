"""Speed of `zest rank` against the brute-force ground truth it replaces (issue 7, item 3).

For every group of the committed records, the ground truth's cost is the sum of its rows'
``gt_seconds`` (every layer fine-tuned alone, every seed, as collected); `zest rank` is timed on
one minibatch of 32 from the same data at the group's settings (image size / sequence length
of the records), median of 3 runs after a warm-up. ZEST's headline is about 1000×.
Each row records the machine's 1-minute load average before and after its timing and the torch
threads: on a shared machine the time moves with them.
Resumable: finished groups are kept (and redone after the shipped predictor changes, or with
``--redo``).
Usage: python benchmarks/rank_vs_groundtruth.py [--records data/records] [--redo GROUP,...]
[--out FILE.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import _results
import torch

from zest.loading import DataOptions, load_pair
from zest.ranking import rank
from zest.training import load_corpus

BATCH_SIZE = 32
REPEATS = 3


def measure(model_spec: str, dataset: str, options: DataOptions) -> float:
    model, task, data = load_pair(model_spec, dataset, options=options)
    batch = data.batches("train", BATCH_SIZE, 1, seed=0)
    rank(model, task, batch)  # warm-up
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        rank(model, task, batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=Path, default=Path("data/records"))
    parser.add_argument("--out", type=Path,
                        default=Path("benchmarks/results/rank_vs_groundtruth.json"))
    parser.add_argument("--redo", default="", help="comma-separated groups to time again "
                        "(e.g. after a run on a busy machine)")
    args = parser.parse_args()
    done = _results.load(args.out, {"records": str(args.records)})
    redo = {g.strip() for g in args.redo.split(",") if g.strip()}
    # `zest rank` computes only the metrics its predictor reads: another predictor is re-timed
    fingerprint = _results.predictor_fingerprint()
    done["results"] = [r for r in done["results"]
                       if r.get("predictor_sha") == fingerprint and r["group"] not in redo]
    _, groundtruth = load_corpus(args.records, min_seeds=2)
    known = sorted(set(groundtruth["group"]))
    if redo - set(known):
        raise SystemExit(f"--redo: no complete group {sorted(redo - set(known))} in "
                         f"{args.records}; groups: {', '.join(known)}")
    finished = {r["group"] for r in done["results"]}
    for group, rows in groundtruth.groupby("group"):
        if group in finished:
            continue
        first = rows.iloc[0]
        text = int(first["max_length"]) > 0  # the records store 0 for the setting not used
        options = DataOptions(max_length=int(first["max_length"])) if text else \
            DataOptions(image_size=int(first["image_size"]))
        load_before = os.getloadavg()[0]
        rank_seconds = measure(str(first["model"]), str(first["dataset"]), options)
        gt_seconds = float(rows["gt_seconds"].sum())
        done["results"].append({
            "group": group, "model": str(first["model"]), "dataset": str(first["dataset"]),
            "settings": {"max_length": options.max_length} if text else
            {"image_size": options.image_size},
            "layers": int(rows["layer"].nunique()), "seeds": int(rows["gt_seed"].nunique()),
            "groundtruth_seconds": round(gt_seconds, 1), "rank_seconds": round(rank_seconds, 3),
            "speedup": round(gt_seconds / rank_seconds), "predictor_sha": fingerprint,
            "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)],
            "torch_threads": torch.get_num_threads()})
        _results.save(args.out, done, platform.machine())
    for r in done["results"]:
        print(f"{r['group']:32s} ground truth {r['groundtruth_seconds'] / 3600:.2f} CPU-h "
              f"({r['layers']} layers × {r['seeds']} seeds), zest rank {r['rank_seconds']:.2f} s "
              f"-> {r['speedup']:,}×")


if __name__ == "__main__":
    main()

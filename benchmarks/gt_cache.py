"""Speed-up of the frozen-prefix cache of the ground-truth collector over the naive loop.

For each model, the same layers (evenly spread over depth), steps and data are tuned once with
the cache and once without; the wall times are compared and the records checked to agree.
Resumable: finished cases are kept in the output JSON and skipped.
Usage: python benchmarks/gt_cache.py [--steps 30] [--every N] [--models M ...] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import _results
import torch

from zest.groundtruth import GroundTruthConfig, collect_groundtruth
from zest.layers import candidate_layers
from zest.loading import DataOptions, load_pair

#: model → (data set, options, every n-th layer of its candidates): the decoder's 211 layers at
#: a few CPU-minutes each are thinned further
CASES = {
    "efficientnet_lite0": ("digits", DataOptions(image_size=64, max_train=512, max_val=256), 4),
    "minilm": ("r8", DataOptions(max_length=64, max_train=512, max_val=256), 4),
    "mobilenetv2": ("digits", DataOptions(image_size=64, max_train=512, max_val=256), 4),
    "smollm2": ("r8", DataOptions(max_length=64, max_train=512, max_val=256), 30),
}


def run_case(model: str, steps: int, every: int | None) -> dict:
    dataset, options, default_every = CASES[model]
    every = every or default_every
    net, task, _ = load_pair(model, dataset, options=options)
    layers = [layer.name for layer in candidate_layers(net, task.head_name)][::every]
    timings, frames = {}, {}
    load_before = os.getloadavg()[0]
    for cached in (True, False):
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            frames[cached] = collect_groundtruth(
                model, dataset, Path(folder) / "gt.parquet",
                config=GroundTruthConfig(steps=steps, use_cache=cached), seeds=[0],
                options=options, layer_names=layers)
            timings[cached] = time.perf_counter() - start
    a = frames[True].sort_values("layer").reset_index(drop=True)
    b = frames[False].sort_values("layer").reset_index(drop=True)
    return {"model": model, "family": task.family, "dataset": dataset, "layers": len(layers),
            "steps": steps,
            "train": options.max_train, "val": options.max_val,
            "cached_seconds": round(timings[True], 1), "naive_seconds": round(timings[False], 1),
            "speedup": round(timings[False] / timings[True], 2),
            # False: the family has no verified stage plan, so both runs were the plain loop
            "cache_used": bool(frames[True]["gt_cached"].all()),
            "load": f"{load_before:.1f}-{os.getloadavg()[0]:.1f} (1-min load average), "
                    f"{torch.get_num_threads()} threads",
            "max_abs_loss_difference": float((a["gt_loss"] - b["gt_loss"]).abs().max()),
            "max_abs_score_difference": float((a["gt_score"] - b["gt_score"]).abs().max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--every", type=int, default=None,
                        help="take every n-th layer (default: the case's)")
    parser.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES),
                        help="only these models (default: all)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gt_cache.json"))
    args = parser.parse_args()
    done = _results.load(args.out)
    finished = {r["model"] for r in done["results"]
                if r["steps"] == args.steps and r.get("cache_used", True)}
    for model in args.models:
        if model in finished:
            continue
        result = run_case(model, args.steps, args.every)
        done["results"] = [r for r in done["results"] if r["model"] != model] + [result]
        _results.save(args.out, done,
                      f"{platform.machine()}, {torch.get_num_threads()} torch threads")
    for r in done["results"]:
        print(f"{r['model']:20s} {r['layers']} layers x {r['steps']} steps: naive "
              f"{r['naive_seconds']} s, cached {r['cached_seconds']} s -> {r['speedup']}x "
              f"(records agree to {r['max_abs_loss_difference']:.1e} in val loss)")


if __name__ == "__main__":
    main()

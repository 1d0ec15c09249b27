"""Ranking stability: Kendall τ between the rankings of 8 different minibatches, at batch sizes
8, 16, 32 and 64, per packaged model (issue 7). Resumable: finished cases are kept.
Usage: python benchmarks/stability.py [--batches 8] [--predictor universal] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import _results

from zest.loading import DataOptions, load_pair
from zest.ranking import load_predictor, rank

CASES = [("efficientnet_lite0", "digits", DataOptions(image_size=64)),
         ("efficientnet_lite2", "digits", DataOptions(image_size=64)),
         ("minilm", "r8", DataOptions(max_length=128))]
BATCH_SIZES = (8, 16, 32, 64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--predictor", default="universal")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/stability.json"))
    args = parser.parse_args()
    done = _results.load(args.out, {"batches": args.batches, "predictor": args.predictor})
    # a retrained predictor (same name, other content) ranks differently: its results are redone
    groups = sorted(load_predictor(args.predictor).groups_)
    fingerprint = _results.predictor_fingerprint(args.predictor)
    done["results"] = [r for r in done["results"] if r.get("predictor_sha") == fingerprint]
    finished = {(r["model"], r["batch_size"]) for r in done["results"]}
    for model_spec, dataset, options in CASES:
        if all((model_spec, b) in finished for b in BATCH_SIZES):
            continue
        model, task, data = load_pair(model_spec, dataset, options=options)
        for batch_size in BATCH_SIZES:
            if (model_spec, batch_size) in finished:
                continue
            batches = data.batches("train", batch_size, args.batches, seed=0)
            ranking = rank(model, task, batches, predictor=args.predictor)
            done["results"].append({"model": model_spec, "dataset": dataset,
                                    "batch_size": batch_size, "batches": args.batches,
                                    **{k: v for k, v in ranking.stability.items()
                                       if k != "batches"},
                                    "seconds_per_batch": ranking.seconds / args.batches,
                                    "predictor": args.predictor, "predictor_groups": groups,
                                    "predictor_sha": fingerprint})
            _results.save(args.out, done, platform.machine())
    for r in done["results"]:
        print(f"{r['model']:20s} batch {r['batch_size']:3d}: mean pairwise Kendall τ "
              f"{r['kendall_tau']:.3f}, top-5 Jaccard {r['top5_jaccard']:.3f}")


if __name__ == "__main__":
    main()

"""Cost of all metrics for all layers (the probe and the metric values computed from its
contexts) against one plain forward+backward pass; also with the peer selectors and of
``zest rank`` (probe + metrics + predictor).

Issue target: ≤ 3× on efficientnet_lite0 (32 images, 64 px) and minilm (32 × 128 tokens).
Plain and probe runs are interleaved and the medians compared, so background load affects
both alike. Usage: python benchmarks/probe_cost.py [--repeats 5] [--models M ...] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from zest.loading import DataOptions, load_pair
from zest.metrics import compute_metrics, metric_names, needs_of
from zest.probe import probe
from zest.ranking import rank

#: (model, data set, options, batch size): the decoder at the two shapes of issue 17.
CASES = [("efficientnet_lite0", "digits", DataOptions(image_size=64), 32),
         ("minilm", "r8", DataOptions(max_length=128), 32),
         ("smollm2", "r8", DataOptions(max_length=64), 32),
         ("smollm2", "r8", DataOptions(max_length=256), 8)]


def measure(model_spec: str, dataset: str, options: DataOptions, batch_size: int,
            repeats: int) -> dict:
    model, task, data = load_pair(model_spec, dataset, options=options)
    batch = data.batches("train", batch_size, 1, seed=0)[0]
    from zest.evaluation import predictor_metrics

    core = predictor_metrics()
    needs = needs_of(core)
    all_needs = needs_of(metric_names())

    def plain() -> None:
        model.zero_grad(set_to_none=True)
        output = task.forward(model, batch)
        F.cross_entropy(output.logits, output.labels).backward()
        model.zero_grad(set_to_none=True)

    def full_probe() -> None:  # the probe and the metric values computed from it
        compute_metrics(probe(model, task, batch, needs=needs).contexts, core)

    def all_metrics() -> None:
        compute_metrics(probe(model, task, batch, needs=all_needs).contexts, metric_names())

    def ranked() -> None:
        rank(model, task, batch)  # the shipped predictor

    def ratio(function) -> tuple[float, float, float, list[float]]:
        """Median seconds of plain and of ``function``, alternating, after one warm-up each;
        their ratio and the quartiles of the ratios of adjacent pairs (the run-to-run spread on
        a shared machine)."""
        plain()
        function()
        plain_times, times = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            plain()
            plain_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            function()
            times.append(time.perf_counter() - start)
        pairs = [t / p for t, p in zip(times, plain_times, strict=True)]
        quartiles = statistics.quantiles(pairs, n=4) if len(pairs) > 1 else pairs * 3
        return (statistics.median(plain_times), statistics.median(times),
                statistics.median(times) / statistics.median(plain_times),
                [round(quartiles[0], 2), round(quartiles[-1], 2)])

    base, probe_seconds, core_ratio, core_spread = ratio(full_probe)
    _, rank_seconds, rank_ratio, rank_spread = ratio(ranked)
    _, _, all_ratio, _ = ratio(all_metrics)  # last: its per-example passes churn memory
    per_need = {}
    for need in sorted(all_needs - {"weight"}):
        start = time.perf_counter()
        probe(model, task, batch, needs={need})
        per_need[need] = round((time.perf_counter() - start) / base, 2)
    shape = tuple(batch["input_ids"].shape) if task.modality == "text" else tuple(batch[0].shape)
    return {"model": model_spec, "dataset": dataset, "batch_shape": shape,
            "metrics": len(core), "plain_seconds": round(base, 3),
            "probe_seconds": round(probe_seconds, 3), "ratio": round(core_ratio, 2),
            "ratio_iqr": core_spread, "rank_ratio_iqr": rank_spread, "repeats": repeats,
            "all_metrics": len(metric_names()), "all_ratio": round(all_ratio, 2),
            "rank_seconds": round(rank_seconds, 3), "rank_ratio": round(rank_ratio, 2),
            "single_need_ratios": per_need}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=[case[0] for case in CASES],
                        help="only these models (default: all)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/probe_cost.json"))
    args = parser.parse_args()
    results = [measure(*case, repeats=args.repeats) for case in CASES if case[0] in args.models]
    for r in results:
        print(f"{r['model']:20s} batch {r['batch_shape']}: plain {r['plain_seconds']:.3f} s, "
              f"probe ({r['metrics']} metrics) {r['probe_seconds']:.3f} s -> {r['ratio']:.2f}x "
              f"(pairs IQR {r['ratio_iqr'][0]:.2f}-{r['ratio_iqr'][1]:.2f}); "
              f"with the peer selectors ({r['all_metrics']} metrics) {r['all_ratio']:.2f}x; "
              f"zest rank {r['rank_ratio']:.2f}x "
              f"(IQR {r['rank_ratio_iqr'][0]:.2f}-{r['rank_ratio_iqr'][1]:.2f})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": f"{platform.processor() or platform.machine()}, "
                          f"{torch.get_num_threads()} torch threads",
               "torch": torch.__version__, "results": results}
    args.out.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()

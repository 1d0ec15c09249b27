"""Cost of the probe (all metrics, all layers) against one plain forward+backward pass.

Issue target: ≤ 3× on efficientnet_lite0 (32 images, 64 px) and minilm (32 × 128 tokens).
Plain and probe runs are interleaved and the medians compared, so background load affects
both alike. Usage: python benchmarks/probe_cost.py [--repeats 5] [--out FILE.json]
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

from zest.collect import DataOptions, load_pair
from zest.metrics import metric_names, needs_of
from zest.probe import probe

CASES = [("efficientnet_lite0", "digits", DataOptions(image_size=64)),
         ("minilm", "r8", DataOptions(max_length=128))]


def measure(model_spec: str, dataset: str, options: DataOptions, repeats: int) -> dict:
    model, task, data = load_pair(model_spec, dataset, options=options)
    batch = data.batches("train", 32, 1, seed=0)[0]
    from zest.evaluation import PEER_SELECTORS

    core = [m for m in metric_names() if m not in PEER_SELECTORS or m == "rgn"]
    needs = needs_of(core)
    all_needs = needs_of(metric_names())

    def plain() -> None:
        model.zero_grad(set_to_none=True)
        output = task.forward(model, batch)
        F.cross_entropy(output.logits, output.labels).backward()
        model.zero_grad(set_to_none=True)

    def full_probe() -> None:
        probe(model, task, batch, needs=needs)

    plain()
    full_probe()  # warm-up
    from zest.ranking import rank

    plain_times, probe_times, all_times, rank_times, per_need = [], [], [], [], {}
    for _ in range(repeats):
        start = time.perf_counter()
        plain()
        plain_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        full_probe()
        probe_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        probe(model, task, batch, needs=all_needs)
        all_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        rank(model, task, batch)  # the shipped predictor
        rank_times.append(time.perf_counter() - start)
    base = statistics.median(plain_times)
    for need in sorted(all_needs - {"weight"}):
        start = time.perf_counter()
        probe(model, task, batch, needs={need})
        per_need[need] = round((time.perf_counter() - start) / base, 2)
    shape = tuple(batch["input_ids"].shape) if task.modality == "text" else tuple(batch[0].shape)
    return {"model": model_spec, "dataset": dataset, "batch_shape": shape,
            "metrics": len(core), "plain_seconds": round(base, 3),
            "probe_seconds": round(statistics.median(probe_times), 3),
            "ratio": round(statistics.median(probe_times) / base, 2),
            "all_metrics": len(metric_names()),
            "all_ratio": round(statistics.median(all_times) / base, 2),
            "rank_seconds": round(statistics.median(rank_times), 3),
            "rank_ratio": round(statistics.median(rank_times) / base, 2),
            "single_need_ratios": per_need}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/probe_cost.json"))
    args = parser.parse_args()
    results = [measure(*case, repeats=args.repeats) for case in CASES]
    for r in results:
        print(f"{r['model']:20s} batch {r['batch_shape']}: plain {r['plain_seconds']:.3f} s, "
              f"probe ({r['metrics']} metrics) {r['probe_seconds']:.3f} s -> {r['ratio']:.2f}x; "
              f"with the peer selectors ({r['all_metrics']} metrics) {r['all_ratio']:.2f}x; "
              f"zest rank {r['rank_ratio']:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": f"{platform.processor() or platform.machine()}, "
                          f"{torch.get_num_threads()} torch threads",
               "torch": torch.__version__, "results": results}
    args.out.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()

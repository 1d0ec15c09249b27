"""Cost of all metrics for all layers (the probe and the metric values computed from its
contexts) against one plain forward+backward pass; also with the peer selectors and of
``zest rank`` (probe + metrics + predictor), warm (the metrics of the weights alone cached from
an earlier call, ``zest.metrics.weight_memos``) and cold (first call on these weights).

Issue targets: ≤ 3× on efficientnet_lite0 (32 images, 64 px) and minilm (32 × 128 tokens);
``zest rank`` ≤ 2× (goal 1.5×) on the decoder smollm2 at 32 × 64 and 8 × 256 tokens.
Plain and measured runs alternate and the medians are compared, so background load affects
both alike; each result records the torch threads and the load average during its run.
Results of other cases already in ``--out`` are kept.
Usage: python benchmarks/probe_cost.py [--repeats 5] [--models M ...] [--threads N]
[--no-extras] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from zest.fingerprint import model_fingerprint
from zest.loading import DataOptions, load_pair
from zest.metrics import compute_metrics, metric_names, needs_of, weight_memos
from zest.probe import probe
from zest.ranking import rank

#: (model, data set, options, batch size): the decoder at the two shapes of issue 17.
CASES = [("efficientnet_lite0", "digits", DataOptions(image_size=64), 32),
         ("minilm", "r8", DataOptions(max_length=128), 32),
         ("smollm2", "r8", DataOptions(max_length=64), 32),
         ("smollm2", "r8", DataOptions(max_length=256), 8)]


def measure(model_spec: str, dataset: str, options: DataOptions, batch_size: int,
            repeats: int, extras: bool = True) -> dict:
    model, task, data = load_pair(model_spec, dataset, options=options)
    batch = data.batches("train", batch_size, 1, seed=0)[0]
    from zest.evaluation import predictor_metrics

    core = predictor_metrics()
    needs = needs_of(core)
    all_needs = needs_of(metric_names())
    fingerprint = model_fingerprint(model, task.head_name)

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
        rank(model, task, batch)  # the shipped predictor; weight memos from the call before

    def ranked_cold() -> None:
        weight_memos.forget(fingerprint)
        rank(model, task, batch)

    def ratios(functions: dict) -> tuple[float, dict[str, tuple[float, float, list[float]]]]:
        """Median seconds of plain and of each function, a plain run before each round of
        them, after one warm-up round; each median's ratio to plain's and the quartiles of the
        ratios to the plain run of the same round (the run-to-run spread on a shared
        machine)."""
        plain_times: list[float] = []
        times: dict[str, list[float]] = {name: [] for name in functions}
        for round_ in range(repeats + 1):
            start = time.perf_counter()
            plain()
            if round_:
                plain_times.append(time.perf_counter() - start)
            for name, function in functions.items():
                start = time.perf_counter()
                function()
                if round_:
                    times[name].append(time.perf_counter() - start)
        base = statistics.median(plain_times)
        result = {}
        for name, values in times.items():
            pairs = [t / p for t, p in zip(values, plain_times, strict=True)]
            quartiles = statistics.quantiles(pairs, n=4) if len(pairs) > 1 else pairs * 3
            result[name] = (statistics.median(values), statistics.median(values) / base,
                            [round(quartiles[0], 2), round(quartiles[-1], 2)])
        return base, result

    load_before = os.getloadavg()[0]
    base, timed = ratios({"probe": full_probe, "rank": ranked, "rank_cold": ranked_cold})
    load_after = os.getloadavg()[0]
    shape = tuple(batch["input_ids"].shape) if task.modality == "text" else tuple(batch[0].shape)
    result = {"model": model_spec, "dataset": dataset, "batch_shape": shape,
              "metrics": len(core), "plain_seconds": round(base, 3),
              "probe_seconds": round(timed["probe"][0], 3), "ratio": round(timed["probe"][1], 2),
              "ratio_iqr": timed["probe"][2], "repeats": repeats,
              "rank_seconds": round(timed["rank"][0], 3), "rank_ratio": round(timed["rank"][1], 2),
              "rank_ratio_iqr": timed["rank"][2],
              "rank_cold_seconds": round(timed["rank_cold"][0], 3),
              "rank_cold_ratio": round(timed["rank_cold"][1], 2),
              "rank_cold_ratio_iqr": timed["rank_cold"][2],
              "torch_threads": torch.get_num_threads(),
              "load_average": [round(load_before, 1), round(load_after, 1)]}
    if not extras:
        return result
    _, everything = ratios({"all": all_metrics})  # last: its per-example passes churn memory
    per_need = {}
    for need in sorted(all_needs - {"weight"}):
        start = time.perf_counter()
        probe(model, task, batch, needs={need})
        per_need[need] = round((time.perf_counter() - start) / base, 2)
    return result | {"all_metrics": len(metric_names()),
                     "all_ratio": round(everything["all"][1], 2), "single_need_ratios": per_need}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=[case[0] for case in CASES],
                        help="only these models (default: all)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's; 1 when other jobs keep the "
                             "cores busy, as multithreaded LAPACK then stalls)")
    parser.add_argument("--no-extras", action="store_true",
                        help="skip the peer selectors and the per-need probes (slow on a "
                             "decoder)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/probe_cost.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    previous = json.loads(args.out.read_text())["results"] if args.out.exists() else []
    results = []
    for case in CASES:
        if case[0] not in args.models:
            continue
        r = measure(*case, repeats=args.repeats, extras=not args.no_extras)
        results.append(r)
        print(f"{r['model']:20s} batch {r['batch_shape']}: plain {r['plain_seconds']:.3f} s, "
              f"probe ({r['metrics']} metrics) {r['probe_seconds']:.3f} s -> {r['ratio']:.2f}x "
              f"(pairs IQR {r['ratio_iqr'][0]:.2f}-{r['ratio_iqr'][1]:.2f}); "
              f"zest rank {r['rank_ratio']:.2f}x "
              f"(IQR {r['rank_ratio_iqr'][0]:.2f}-{r['rank_ratio_iqr'][1]:.2f}), cold "
              f"{r['rank_cold_ratio']:.2f}x; {r['torch_threads']} threads, load "
              f"{r['load_average'][0]}-{r['load_average'][1]}"
              + (f"; with the peer selectors ({r['all_metrics']} metrics) {r['all_ratio']:.2f}x"
                 if "all_ratio" in r else ""), flush=True)
    measured = {(r["model"], tuple(r["batch_shape"])) for r in results}
    kept = [r for r in previous if (r["model"], tuple(r["batch_shape"])) not in measured]
    order = {(case[0], case[3]): i for i, case in enumerate(CASES)}
    merged = sorted(kept + results,
                    key=lambda r: order.get((r["model"], r["batch_shape"][0]), len(order)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": f"{platform.processor() or platform.machine()}, "
                          f"{os.cpu_count()} cores",
               "torch": torch.__version__, "results": merged}
    args.out.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()

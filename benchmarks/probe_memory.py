"""Peak memory of ``zest rank`` against one plain forward+backward pass (issue 17: keep the
probe's memory bounded on a 24 GiB machine), on the cases of ``probe_cost.py``.

Each measurement runs in a fresh process: the model and the batch are loaded, the resident set
size is read (``VmRSS``, after garbage collection and ``malloc_trim``: the loaded baseline), the
peak is reset (``/proc/self/clear_refs``), then either one
plain forward+backward pass (full fine-tuning's gradients kept to its end: the training step's
peak, the reference) or one ``zest rank`` with the shipped predictor, the metrics of the
weights alone forgotten first (``weight_memos.forget``: the first call on these weights, which
also computes the spectra), and the peak resident set size since the reset is read
(``VmHWM``). "Extra" is that peak minus the loaded baseline; the ratio is rank's extra over the
training step's. ``ru_maxrss`` (the process's peak, loading included) is recorded beside it.
By default glibc gets a fixed mmap threshold, so that freed tensors go back to the system at
once and the resident set follows live memory (as in ``finetune_memory.py --measured``; run to
run within 0.01 GiB); ``--system-allocator`` measures what a process gets with glibc's
defaults instead, which keep some freed memory (a few tenths of a GiB more, varying from run
to run). Results of other cases (and of the other allocator setting) in ``--out`` are kept.

Usage: python benchmarks/probe_memory.py [--models M ...] [--threads N] [--system-allocator]
[--out FILE.json]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import _results
from probe_cost import CASES

GIB = 2**30
STAGES = ("train_step", "rank")
#: a fixed mmap threshold: glibc returns every freed block above it to the system at once
LIVE_ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def _status_gib(field: str) -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / GIB
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure_stage(case_index: int, stage: str) -> dict:
    """One stage of one case in this (fresh) process: loaded RSS, then the stage's peak."""
    import torch
    import torch.nn.functional as F

    from zest.fingerprint import model_fingerprint
    from zest.loading import load_pair
    from zest.metrics import weight_memos
    from zest.ranking import rank

    model_spec, dataset, options, batch_size = CASES[case_index]
    model, task, data = load_pair(model_spec, dataset, options=options)
    batch = data.batches("train", batch_size, 1, seed=0)[0]
    if stage == "rank":
        weight_memos.forget(model_fingerprint(model, task.head_name))
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    loaded = _status_gib("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets VmHWM to the current resident set
    start = time.perf_counter()
    if stage == "train_step":
        model.zero_grad(set_to_none=True)
        output = task.forward(model, batch)
        F.cross_entropy(output.logits, output.labels).backward()
    else:
        rank(model, task, batch)
    seconds = time.perf_counter() - start
    shape = tuple(batch["input_ids"].shape) if task.modality == "text" else tuple(batch[0].shape)
    return {"model": model_spec, "dataset": dataset, "batch_shape": shape, "stage": stage,
            "loaded_gib": round(loaded, 3), "peak_gib": round(_status_gib("VmHWM"), 3),
            "process_max_rss_gib": round(
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 3),
            "seconds": round(seconds, 1), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__}


def run_child(case_index: int, stage: str, threads: int | None, allocator: str) -> dict:
    """:func:`measure_stage` in a fresh interpreter (its JSON is the last line it prints)."""
    command = [sys.executable, __file__, "--child", str(case_index), stage]
    if threads:
        command += ["--threads", str(threads)]
    env = {key: value for key, value in os.environ.items() if key not in LIVE_ALLOCATOR}
    env = {**env, "HF_HUB_OFFLINE": "1"} | (LIVE_ALLOCATOR if allocator == "live" else {})
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_case(case_index: int, threads: int | None, allocator: str) -> dict:
    stages = {stage: run_child(case_index, stage, threads, allocator) for stage in STAGES}
    train, ranked = stages["train_step"], stages["rank"]
    train_extra = train["peak_gib"] - train["loaded_gib"]
    rank_extra = ranked["peak_gib"] - ranked["loaded_gib"]
    return {"model": train["model"], "dataset": train["dataset"],
            "batch_shape": train["batch_shape"], "loaded_gib": ranked["loaded_gib"],
            "train_step_peak_gib": train["peak_gib"], "train_step_extra_gib": round(train_extra, 3),
            "rank_peak_gib": ranked["peak_gib"], "rank_extra_gib": round(rank_extra, 3),
            "rank_to_train_step": round(rank_extra / train_extra, 2),
            "rank_seconds": ranked["seconds"], "rank_cache": "first call (weight memos forgotten)",
            "process_max_rss_gib": {stage: r["process_max_rss_gib"]
                                    for stage, r in stages.items()},
            "allocator": allocator, "torch_threads": ranked["torch_threads"],
            "torch": ranked["torch"],
            "load_average": round(os.getloadavg()[0], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=[case[0] for case in CASES],
                        help="only these models (default: all)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's)")
    parser.add_argument("--system-allocator", action="store_true",
                        help="glibc's default settings instead of a fixed mmap threshold")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/probe_memory.json"))
    parser.add_argument("--child", nargs=2, metavar=("CASE", "STAGE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        print(json.dumps(measure_stage(int(args.child[0]), args.child[1])), flush=True)
        return
    allocator = "system" if args.system_allocator else "live"
    data = _results.load(args.out)
    for index, case in enumerate(CASES):
        if case[0] not in args.models:
            continue
        r = measure_case(index, args.threads, allocator)
        kept = [old for old in data["results"] if (old["model"], old["batch_shape"],
                                                   old["allocator"]) !=
                (r["model"], r["batch_shape"], allocator)]
        order = {(c[0], c[3]): i for i, c in enumerate(CASES)}
        data["results"] = sorted(kept + [r], key=lambda row: (row["allocator"] != "live", order.get(
            (row["model"], row["batch_shape"][0]), len(order))))
        _results.save(args.out, data, f"{platform.machine()}, {os.cpu_count()} cores, "
                      f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / GIB:.0f} GiB")
        print(f"{r['model']:20s} {tuple(r['batch_shape'])}: loaded {r['loaded_gib']:.2f} GiB, "
              f"train step +{r['train_step_extra_gib']:.2f}, zest rank "
              f"+{r['rank_extra_gib']:.2f} GiB ({r['rank_to_train_step']:.2f}x; {allocator} "
              "allocator)", flush=True)


if __name__ == "__main__":
    main()

"""Peak training memory above the loaded model, per fine-tuning method (issue 6).

Each (model, method) runs in a fresh subprocess (like the SPSFT paper's TTL − model): the
resident set size after loading the model and data and after the method's selection step is the
baseline; the kernel's peak-RSS mark is reset and the peak over a few training steps minus that
baseline is reported (glibc is told to return freed memory at once, so cached arenas do not
hide the training's own memory). Methods are matched in trainable
parameters on the same layers: LoRA of rank 8 sets the budget; SPSFT's ratio and GPS's K are
chosen to match it. On CUDA, ``torch.cuda.max_memory_allocated`` is used instead.
Resumable: finished cases are kept in the output JSON.
Usage: python benchmarks/finetune_memory.py [--steps 3] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

import _results

CASES = {
    "minilm": {"dataset": "r8", "batch_size": 32, "max_length": 128},
    "efficientnet_lite2": {"dataset": "digits", "batch_size": 64, "image_size": 64},
}
METHODS = ["full", "lora", "gps_dense_mask", "gps", "spsft"]
LORA_RANK = 8


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def reset_peak() -> None:
    """Resets the kernel's peak-RSS mark (VmHWM) of this process (Linux ≥ 4.0)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def peak_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(model_spec: str, method: str, steps: int) -> dict:
    import torch
    import torch.nn.functional as F
    from torch import nn

    from zest.finetune import GPS, SPSFT, Full, LoRA
    from zest.layers import candidate_layers
    from zest.loading import DataOptions, load_pair

    case = CASES[model_spec]
    options = DataOptions(image_size=case.get("image_size"),
                          max_length=case.get("max_length", 128),
                          max_train=case["batch_size"] * 8, max_val=64)
    model, task, data = load_pair(model_spec, case["dataset"], options=options)
    layers = [layer.name for layer in candidate_layers(model, task.head_name)
              if isinstance(model.get_submodule(layer.name), nn.Linear | nn.Conv2d)
              and getattr(model.get_submodule(layer.name), "groups", 1) == 1]
    modules = [model.get_submodule(n) for n in layers]
    rows = sum(m.weight.shape[0] for m in modules)
    dense = sum(m.weight.numel() for m in modules)
    lora_budget = sum(LORA_RANK * (m.weight[0].numel() + m.weight.shape[0]) for m in modules)
    if method == "full":
        tuner = Full(model, task)
    elif method == "lora":
        tuner = LoRA(model, task, layers=layers, rank=LORA_RANK)
    elif method.startswith("gps"):
        k = max(1, round(lora_budget / rows))
        tuner = GPS(model, task, layers=layers, k=k, selection_batches=1,
                    implementation="dense_mask" if method == "gps_dense_mask" else "sparse")
    else:
        tuner = SPSFT(model, task, layers=layers, ratio=min(1.0, lora_budget / dense),
                      importance="l2")
    batches = data.batches("train", case["batch_size"], steps, seed=0)
    tuner.device_ = torch.device("cpu")
    tuner._prepare(data, case["batch_size"])  # noqa: SLF001 - selection before the baseline
    params = tuner.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    baseline = rss_mb()
    reset_peak()
    tuner._train_mode()  # noqa: SLF001
    for batch in batches:
        output = task.forward(model, batch)
        loss = F.cross_entropy(output.logits, output.labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    peak = peak_mb()
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    return {"model": model_spec, "method": method, "layers": len(layers),
            "trainable_params": int(tuner.count_trainable()),
            "model_mb": round(model_mb, 1), "baseline_rss_mb": round(baseline, 1),
            "peak_above_model_mb": round(peak - baseline, 1),
            "peak_rss_mb": round(peak, 1), "batch_size": case["batch_size"], "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/memory.json"))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.steps)))
        return
    done = _results.load(args.out)
    finished = {(r["model"], r["method"]) for r in done["results"]}
    for model in CASES:
        for method in METHODS:
            if (model, method) in finished:
                continue
            # a fixed mmap threshold makes glibc return freed tensors to the OS at once, so the
            # resident set follows live memory (no arena caching between selection and training)
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072",
                   "MALLOC_TRIM_THRESHOLD_": "131072"}
            out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps),
                                  "--child", model, method], capture_output=True, text=True,
                                 check=True, env=env)
            done["results"].append(json.loads(out.stdout.strip().splitlines()[-1]))
            _results.save(args.out, done,
                          f"{platform.machine()} CPU; peak RSS above the loaded model")
    for r in done["results"]:
        print(f"{r['model']:20s} {r['method']:15s} {r['trainable_params']:>10,} params  "
              f"peak above model {r['peak_above_model_mb']:8.1f} MB")


if __name__ == "__main__":
    main()

"""Speed-up of the frozen-prefix cache of the ground-truth collector over the naive loop.

For each case, the same layers (evenly spread over depth), steps and data are tuned once with
the cache and once without, one seed; the times are compared and the records checked to agree.
The speed-up is the ratio of the process's CPU times (one torch thread), which the other jobs
of a shared machine change far less than the wall times (also recorded); the pair is loaded
before either run is timed.
Cases are the packaged models and, per architecture family without packaged weights, a
random-init configuration of a real model's size (timing does not depend on the weights; the
transformers ones are written to a temporary folder with the MiniLM tokenizer and loaded as
``hf:<dir>``, the timm one is ``timm:<arch>``, random unless given a checkpoint).
Resumable: finished cases are kept in the output JSON and skipped (``--rerun`` measures again).
Usage: python benchmarks/gt_cache.py [--steps N] [--every N] [--models M ...] [--rerun]
       [--out FILE.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import _results
import torch

from zest.groundtruth import GroundTruthConfig, GroundTruthRequest, collect_groundtruth, list_jobs
from zest.layers import candidate_layers
from zest.loading import DataOptions, load_pair
from zest.models import write_random_hf_model

TEXT = DataOptions(max_length=64, max_train=512, max_val=256)
IMAGES = DataOptions(image_size=64, max_train=512, max_val=256)


@dataclass(frozen=True)
class Case:
    """One benchmark case.

    Attributes:
        model: The model spec (for a random-init transformers configuration: filled in with the
            temporary folder it is written to).
        dataset: The data set spec.
        options: Data options.
        every: Take every n-th candidate layer.
        steps: Default training steps (``--steps`` overrides).
        batch_size: Training batch size.
        weights: ``packaged`` (zest's registered pretrained weights) or ``random``.
        shape: Which real model's size a random configuration has.
        config: A random-init transformers configuration: ``model_type`` and its settings.
    """

    model: str
    dataset: str
    options: DataOptions
    every: int
    steps: int
    batch_size: int = 32
    weights: str = "packaged"
    shape: str = ""
    config: dict[str, Any] = field(default_factory=dict)


def _random(model_type: str, shape: str, every: int, **config: Any) -> Case:
    return Case("", "r8", TEXT, every, 15, weights="random", shape=shape,
                config={"model_type": model_type, **config})


#: name → case. Layers are thinned so that a case runs in minutes on one core (three layers of each
#: random configuration, the first being the embedding, which has no prefix to cache); the
#: decoder's 211 layers at a few CPU-minutes each are thinned most (4 layers; 8 at the corpus's
#: settings).
CASES = {
    "efficientnet_lite0": Case("efficientnet_lite0", "digits", IMAGES, 4, 30),
    "minilm": Case("minilm", "r8", TEXT, 4, 30),
    "mobilenetv2": Case("mobilenetv2", "digits", IMAGES, 4, 30),
    "smollm2": Case("smollm2", "r8", TEXT, 60, 15),
    "distilbert": _random("distilbert", "distilbert-base: 6 layers, hidden 768", 13),
    "roberta": _random("roberta", "distilroberta-base: 6 layers, hidden 768", 13,
                       num_hidden_layers=6, pad_token_id=1, max_position_embeddings=514),
    "deberta_v3": _random("deberta-v2", "deberta-v3-small: 6 layers, hidden 768", 14,
                          hidden_size=768, num_hidden_layers=6, num_attention_heads=12,
                          intermediate_size=3072, relative_attention=True,
                          position_buckets=256, max_relative_positions=-1,
                          pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm",
                          share_att_key=True, position_biased_input=False, type_vocab_size=0),
    "gpt2": _random("gpt2", "distilgpt2: 6 layers, hidden 768", 9, n_layer=6, pad_token_id=0,
                    bos_token_id=101, eos_token_id=102),
    "llama": _random("llama", "llama2.c stories42M: 8 layers, hidden 512", 19, hidden_size=512,
                     num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                     intermediate_size=1376, pad_token_id=0),
    "resnet50": Case("timm:resnet50", "digits", IMAGES, 18, 30, weights="random",
                     shape="resnet50: 16 bottleneck blocks"),
    # the corpus's settings for the decoder (metric_collection/corpus.toml): 15 steps of 16
    # draw 240 of the 1,000 train examples, the only ones whose prefix the cache computes
    "smollm2_corpus": Case("smollm2", "r8", DataOptions(max_length=64, max_train=1000,
                                                        max_val=300), 30, 15, batch_size=16),
}


def run_case(name: str, steps: int | None, every: int | None) -> dict:
    case = CASES[name]
    with tempfile.TemporaryDirectory() as scratch:
        settings = dict(case.config)
        model = write_random_hf_model(Path(scratch) / "model", settings.pop("model_type"),
                                      **settings) if settings else case.model
        return measure(name, case, model, steps or case.steps, every or case.every)


def measure(name: str, case: Case, model: str, steps: int, every: int) -> dict:
    """Times the cached and the naive collection of one seed and compares their records."""
    dataset, options = case.dataset, case.options
    net, task, _ = load_pair(model, dataset, options=options)
    layers = [layer.name for layer in candidate_layers(net, task.head_name)][::every]
    config = GroundTruthConfig(steps=steps, batch_size=case.batch_size)
    timings, cpu, frames = {}, {}, {}
    with tempfile.TemporaryDirectory() as folder:  # loads the pair that both runs use
        list_jobs(GroundTruthRequest(model, dataset, Path(folder) / "gt.parquet", config=config,
                                     seeds=[0], options=options, layer_names=layers))
    load_before = os.getloadavg()[0]
    for cached in (True, False):
        with tempfile.TemporaryDirectory() as folder:
            start, start_cpu = time.perf_counter(), time.process_time()
            frames[cached] = collect_groundtruth(
                model, dataset, Path(folder) / "gt.parquet",
                config=replace(config, use_cache=cached), seeds=[0],
                options=options, layer_names=layers)
            timings[cached] = time.perf_counter() - start
            cpu[cached] = time.process_time() - start_cpu
    a = frames[True].sort_values("layer").reset_index(drop=True)
    b = frames[False].sort_values("layer").reset_index(drop=True)
    return {"model": name, "family": task.architecture, "weights": case.weights,
            **({"shape": case.shape} if case.shape else {}),
            "parameters": sum(p.numel() for p in net.parameters()),
            "dataset": dataset, "layers": len(layers), "steps": steps,
            "batch_size": config.batch_size, "train": options.max_train, "val": options.max_val,
            "cached_cpu_seconds": round(cpu[True], 1), "naive_cpu_seconds": round(cpu[False], 1),
            "speedup": round(cpu[False] / cpu[True], 2),
            "cached_seconds": round(timings[True], 1), "naive_seconds": round(timings[False], 1),
            "wall_speedup": round(timings[False] / timings[True], 2),
            # False: the family has no verified stage plan, so both runs were the plain loop
            "cache_used": bool(frames[True]["gt_cached"].all()),
            "load": f"{load_before:.1f}-{os.getloadavg()[0]:.1f} (1-min load average), "
                    f"{torch.get_num_threads()} threads",
            "max_abs_loss_difference": float((a["gt_loss"] - b["gt_loss"]).abs().max()),
            "max_abs_score_difference": float((a["gt_score"] - b["gt_score"]).abs().max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps (default: the case's, 30 or 15)")
    parser.add_argument("--every", type=int, default=None,
                        help="take every n-th layer (default: the case's)")
    parser.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES),
                        help="only these cases (default: all)")
    parser.add_argument("--rerun", action="store_true",
                        help="measure the chosen cases again even when finished")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gt_cache.json"))
    args = parser.parse_args()
    done = _results.load(args.out)
    for result in done["results"]:  # results from before the field: packaged models
        result.setdefault("weights", CASES[result["model"]].weights)
    finished = {r["model"] for r in done["results"]
                if r["steps"] == (args.steps or CASES[r["model"]].steps)
                and r.get("cache_used", True)}
    for name in args.models:
        if name in finished and not args.rerun:
            continue
        result = run_case(name, args.steps, args.every)
        done["results"] = [r for r in done["results"] if r["model"] != name] + [result]
        done["results"].sort(key=lambda r: list(CASES).index(r["model"]))
        _results.save(args.out, done,
                      f"{platform.machine()}, {torch.get_num_threads()} torch threads")
    for r in done["results"]:
        kind = "CPU" if "naive_cpu_seconds" in r else "wall"
        naive, cached = (r["naive_cpu_seconds"], r["cached_cpu_seconds"]) if kind == "CPU" \
            else (r["naive_seconds"], r["cached_seconds"])
        print(f"{r['model']:20s} ({r.get('family', '?')}, {r['weights']} weights) {r['layers']} "
              f"layers x {r['steps']} steps: naive {naive} s, cached {cached} s ({kind}) -> "
              f"{r['speedup']}x (records agree to {r['max_abs_loss_difference']:.1e} in val "
              "loss)")


if __name__ == "__main__":
    main()

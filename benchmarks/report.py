"""Regenerates the result tables of benchmarks/README.md and README.md from
benchmarks/results/*.json.

Nothing in those tables is typed by hand: run this after any benchmark.
Usage: python benchmarks/report.py
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import _results

RESULTS = Path("benchmarks/results")
READMES = (Path("benchmarks/README.md"), Path("README.md"))
START, END = "<!-- results:start -->", "<!-- results:end -->"
STABLE_TAU = 0.8  # whole rankings this consistent across minibatches ...
STABLE_JACCARD = 0.6  # ... and top-5 sets sharing most of their layers
ACCURACY_METHODS = ["zest + dense", "zest + gps", "zest + spsft", "random-k + dense",
                    "last-k + dense", "kappatune + dense", "fim + dense",
                    "lora (linear / dense convs)", "gps (all layers)", "spsft (all layers)"]


def _load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def probe_section() -> list[str]:
    data = _load("probe_cost.json")
    if not data:
        return []
    lines = ["### Probe cost (`probe_cost.json`)", "",
             "| model | batch | plain fwd+bwd | probe | ratio | with peer selectors | zest rank "
             "| zest rank, first call |",
             "|---|---|---|---|---|---|---|---|"]
    conditions = []
    for r in data["results"]:
        peers = f"{r['all_ratio']:.2f}× ({r['all_metrics']} metrics)" if "all_ratio" in r \
            else "—"
        ranked = f"{r['rank_ratio']:.2f}×{_spread(r, 'rank_ratio_iqr')}" \
            if "rank_ratio" in r else "—"
        cold = f"{r['rank_cold_ratio']:.2f}×{_spread(r, 'rank_cold_ratio_iqr')}" \
            if "rank_cold_ratio" in r else "—"
        lines.append(f"| {r['model']} | {tuple(r['batch_shape'])} | {r['plain_seconds']:.3f} s | "
                     f"{r['probe_seconds']:.3f} s ({r['metrics']} metrics) | "
                     f"{r['ratio']:.2f}×{_spread(r, 'ratio_iqr')} | {peers} | {ranked} | "
                     f"{cold} |")
        runs = f"{r['repeats']} rounds" if "repeats" in r else "rounds not recorded"
        if "torch_threads" in r:
            low, high = r["load_average"]
            conditions.append(f"{r['model']} {tuple(r['batch_shape'])}: {runs}, "
                              f"{r['torch_threads']} torch thread(s), load average {low}–{high}")
        else:
            conditions.append(f"{r['model']} {tuple(r['batch_shape'])}: {runs}, "
                              f"{data.get('machine', '')}, background jobs paused")
    note = ("Ratio of medians over alternating rounds (a plain forward+backward, then each "
            "measured call); in brackets the interquartile range of the ratios within a "
            "round, i.e. how much a single measurement on this shared machine moves. `probe`: "
            "the probe and the values of the metrics the predictor reads by default "
            "(`zest.evaluation.predictor_metrics()`); `with peer selectors`: every registered "
            "metric; `zest rank`: probe, metrics and the shipped predictor, the metrics of the "
            "weights alone cached by an earlier call on the same weights "
            "(`zest.metrics.weight_memos`; the weights fingerprint is still taken); `first "
            "call`: that cache emptied first. Conditions: " + "; ".join(conditions) + ".")
    return lines + ["", note, ""]


def probe_memory_section() -> list[str]:
    data = _load("probe_memory.json")
    if not data:
        return []
    lines = ["### Probe memory (`probe_memory.json`)", "",
             "| model | batch | allocator | loaded | plain fwd+bwd: peak (extra) "
             "| zest rank: peak (extra) | ratio of extras |",
             "|---|---|---|---|---|---|---|"]
    for r in data["results"]:
        lines.append(f"| {r['model']} | {tuple(r['batch_shape'])} | {r['allocator']} | "
                     f"{r['loaded_gib']:.2f} GiB | {r['train_step_peak_gib']:.2f} GiB "
                     f"(+{r['train_step_extra_gib']:.2f}) | {r['rank_peak_gib']:.2f} GiB "
                     f"(+{r['rank_extra_gib']:.2f}) | {r['rank_to_train_step']:.2f}× |")
    threads = sorted({r["torch_threads"] for r in data["results"]})
    note = ("Peak resident set size of a fresh process per measurement, and its extra above "
            "the model and batch loaded: one plain forward+backward with every weight's "
            "gradient (the training step), and one `zest rank` with the shipped predictor, "
            "the first call on these weights. `live`: glibc with a fixed mmap threshold, so "
            "the resident set follows live memory (reproducible to 0.01 GiB); `system`: "
            "glibc's defaults, as a user's process runs, which keep some freed memory and vary "
            f"from run to run. torch {data['results'][0]['torch']}, "
            f"{'/'.join(map(str, threads))} thread(s); method: "
            "[benchmarks/probe_memory.py](/benchmarks/probe_memory.py).")
    return lines + ["", note, ""]


def _spread(result: dict, key: str) -> str:
    low_high = result.get(key)
    return f" [{low_high[0]:.2f}–{low_high[1]:.2f}]" if low_high else ""


def cache_section() -> list[str]:
    data = _load("gt_cache.json")
    if not data:
        return []
    lines = ["### Ground-truth cache (`gt_cache.json`)", "",
             "| model (family) | weights | layers × steps | naive | cached | speed-up | "
             "max val-loss difference | machine load |",
             "|---|---|---|---|---|---|---|---|"]
    for r in data["results"]:
        family = f" ({r['family']})" if r.get("family") else ""
        weights = r.get("weights", "packaged")
        if r.get("shape"):
            weights += f" ({r['shape']})"
        speedup = f"{r['speedup']}×" if r.get("cache_used", True) else "no plan: not cached"
        times = [f"{r[f'{run}_cpu_seconds']} s CPU ({r[f'{run}_seconds']} s wall)"
                 if f"{run}_cpu_seconds" in r else f"{r[f'{run}_seconds']} s wall"
                 for run in ("naive", "cached")]
        lines.append(f"| {r['model']}{family} | {weights} | {r['layers']} × {r['steps']} | "
                     f"{times[0]} | {times[1]} | {speedup} | "
                     f"{r['max_abs_loss_difference']:.1e} | {r.get('load', 'idle')} |")
    note = ("One seed, the same layers (every n-th candidate, the first being the embedding or "
            "stem) tuned with and without the cache; the speed-up is the ratio of CPU times "
            "where they were recorded (one torch thread; the machine is shared), else of wall "
            "times. `random`: a random-init configuration of "
            "the named model's size (transformers ones with the MiniLM tokenizer's vocabulary); "
            "the time does not depend on the weights. Method: "
            "[benchmarks/gt_cache.py](/benchmarks/gt_cache.py).")
    return lines + ["", note, ""]


MEMORY_MAIN = ("full", "lora r16", "spsft r16", "spsft r32", "gps", "gps dense-mask")
MEMORY_PARTS = ("new trainable values", "gradients", "optimizer state", "method state",
                "saved activations", "transients")


def memory_section() -> list[str]:
    data = _load("memory.json")
    if not data or not any("mem_mb" in r for r in data["results"]):
        return []
    rows = [r for r in data["results"] if "mem_mb" in r]
    counted = {(r["model"], r["point"], r["setting"]): r for r in rows if r["mode"] == "counted"}
    measured = {(r["model"], r["point"], r["setting"]): r for r in rows
                if r["mode"] == "measured"}
    points = list(dict.fromkeys((r["model"], r["point"]) for r in rows))
    lines = ["### Training memory (`memory.json`): \"mem\" of the SPSFT paper's appendix D.1",
             "",
             "mem = peak memory of a training step (Adam's state allocated) minus the peak of "
             "inference on the same batch with the pretrained model, in MB. *Counted*: the "
             "bytes of live tensor storages (every storage an operator creates, released when "
             "freed), on fake tensors; *measured*: peak RSS of a real run in a fresh process. "
             "Decoders: LoRA (peft, dropout 0.05) and SPSFT on every linear layer of the "
             "blocks, or on the MLP only (FA, attention frozen); GPS on all layers with K "
             "matched to LoRA r=8; `+ckpt`: activation checkpointing. Method and breakdown: "
             "[benchmarks/finetune_memory.py](/benchmarks/finetune_memory.py).", ""]
    decoders = [pt for pt in points if any(k[:2] == pt and k[2].startswith("lora r16")
                                           for k in counted)]
    if decoders:
        labels = list(dict.fromkeys(k[2] for k in counted if k[:2] in decoders))
        models = list(dict.fromkeys(model for model, _ in decoders))
        lines += ["| setting | " + " | ".join(
                      f"{model} trainable | " + " | ".join(
                          f"{model} {pt}" for m, pt in decoders if m == model)
                      for model in models) + " |",
                  "|---|" + "---|" * (len(models) + len(decoders))]
        for label in labels:
            cells = []
            for model in models:
                first = next((counted[(model, pt, label)] for m, pt in decoders
                              if m == model and (model, pt, label) in counted), None)
                cells.append(f"{first['trainable_params']:,}" if first else "—")
                for m, pt in decoders:
                    if m == model:
                        r = counted.get((model, pt, label))
                        cells.append(f"{r['mem_mb']:,.0f}" if r else "—")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines += ["", "Ratios of mem at the same point (targets at the decoders' 4×512 "
                  "instruction-tuning point: SPSFT ≤ 0.75 × LoRA of equal rank and below LoRA "
                  "of matched parameters; our GPS ≤ 0.8 × dense-mask GPS):", "",
                  "| model | point | SPSFT r / LoRA r (r = 8, 16, 64) | SPSFT 2r / LoRA r | "
                  "FA: equal rank; 2r | GPS / dense-mask | full / LoRA r16 |",
                  "|---|---|---|---|---|---|---|"]
        for model, pt in decoders:
            def ratio(a, b, model=model, pt=pt):
                x, y = counted.get((model, pt, a)), counted.get((model, pt, b))
                return f"{x['mem_mb'] / y['mem_mb']:.2f}" if x and y else "—"

            equal = ", ".join(ratio(f"spsft r{r}", f"lora r{r}") for r in (8, 16, 64))
            matched = ", ".join(ratio(f"spsft r{2 * r}", f"lora r{r}") for r in (8, 16, 64))
            fa = "; ".join([", ".join(ratio(f"spsft r{r} FA", f"lora r{r} FA")
                                      for r in (8, 16, 64)),
                            ", ".join(ratio(f"spsft r{2 * r} FA", f"lora r{r} FA")
                                      for r in (8, 16, 64))])
            lines.append(f"| {model} | {pt} | {equal} | {matched} | {fa} | "
                         f"{ratio('gps', 'gps dense-mask')} | {ratio('full', 'lora r16')} |")
    lines += ["", "Where it goes (MB): saved activations after the forward pass, gradients "
              "after the backward pass, optimizer state, trainable values; then what is alive at "
              "the training peak besides the weights and the batch.", "",
              "| model | point | setting | mem | saved activations | gradients | optimizer "
              "state | trainable values | at the peak: " + ", ".join(MEMORY_PARTS) + " |",
              "|---|---|---|---|---|---|---|---|---|"]
    for model, pt in points:
        for label in _memory_labels(counted, model, pt):
            r = counted[(model, pt, label)]
            peak = " / ".join(f"{r['at_peak_mb'][part]:,.0f}" for part in MEMORY_PARTS)
            lines.append(f"| {model} | {pt} | {label} | {r['mem_mb']:,.0f} | "
                         f"{r['saved_activations_mb']:,.0f} | {r['gradients_mb']:,.0f} | "
                         f"{r['optimizer_state_mb']:,.0f} | {r['trainable_mb']:,.1f} | "
                         f"{peak} |")
    if measured:
        lines += ["", "Counted against measured (the same real run: live tensor storages and "
                  "peak RSS; the RSS also holds kernel workspaces and allocator slack), and the "
                  "counted fake-tensor run of the setting:", "",
                  "| model | point | setting | trainable | mem measured (RSS) | counted, same run "
                  "| counted, fake tensors |", "|---|---|---|---|---|---|---|"]
        for key, r in measured.items():
            fake = f"{counted[key]['mem_mb']:,.0f}" if key in counted else "—"
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {r['trainable_params']:,} | "
                         f"{r['rss_mem_mb']:,.0f} | {r['mem_mb']:,.0f} | {fake} |")
    lines += ["", *memory_notes(counted, points)]
    path = RESULTS / "memory.png"
    memory_plot(counted, points, path)
    return lines + ["", f"![training memory](/{path.as_posix()})", ""]


def memory_notes(counted: dict, points: list) -> list[str]:
    """One line per (model, point): the ratios of mem that the methods are about, and the
    share of saved activations in LoRA's training peak above the weights and the batch."""

    def ratio(model, pt, a, b):
        x, y = counted.get((model, pt, a)), counted.get((model, pt, b))
        return f"{x['mem_mb'] / y['mem_mb']:.2f}×" if x and y else "—"

    notes = []
    for model, pt in points:
        labels = {k[2] for k in counted if k[:2] == (model, pt)}
        lora = "lora r16" if "lora r16" in labels else next(
            (label for label in sorted(labels) if label.startswith("lora")), None)
        reference = counted.get((model, pt, lora or "full"))
        above = sum(reference["at_peak_mb"][part] for part in MEMORY_PARTS)
        share = reference["at_peak_mb"]["saved activations"] / above
        if "lora r16" in labels:
            text = (f"SPSFT {ratio(model, pt, 'spsft r16', 'lora r16')} LoRA at equal rank "
                    f"(r=16; {ratio(model, pt, 'spsft r32', 'lora r16')} at 2r), our GPS "
                    f"{ratio(model, pt, 'gps', 'gps dense-mask')} dense-mask GPS, full "
                    f"{ratio(model, pt, 'full', 'lora r16')} LoRA r16")
            if "lora r16 +ckpt" in labels:
                text += (f"; checkpointed: SPSFT "
                         f"{ratio(model, pt, 'spsft r16 +ckpt', 'lora r16 +ckpt')} LoRA, GPS "
                         f"{ratio(model, pt, 'gps +ckpt', 'gps dense-mask +ckpt')} dense-mask, "
                         f"LoRA r16 {ratio(model, pt, 'lora r16 +ckpt', 'lora r16')} of "
                         f"itself unchecked")
        else:
            text = (f"SPSFT {ratio(model, pt, 'spsft', lora)} LoRA r=8 (matched parameters; "
                    f"LoRA without dropout), our GPS {ratio(model, pt, 'gps', 'gps dense-mask')}"
                    f" dense-mask GPS")
        notes.append(f"- {model} {pt}: {text}; saved activations are {share:.0%} of "
                     f"{lora or 'full'}'s training peak above the weights and the batch.")
    return notes


def _memory_labels(counted: dict, model: str, point: str) -> list[str]:
    """The decoders' main settings, or every setting of an encoder or CNN."""
    labels = [k[2] for k in counted if k[:2] == (model, point)]
    main = [label for label in MEMORY_MAIN if label in labels]
    return main if "lora r16" in labels else labels


def memory_plot(counted: dict, points: list, path: Path) -> None:
    """One panel per (model, point), and one for its checkpointed settings: the parts alive at
    the training peak (weights and batch left out) stacked per setting; the dot is mem (the
    peak minus inference's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for model, pt in points:
        panels.append((f"{model} {pt}", model, pt, _memory_labels(counted, model, pt)))
        checkpointed = [f"{label} +ckpt" for label in MEMORY_MAIN
                        if (model, pt, f"{label} +ckpt") in counted]
        if checkpointed:
            panels.append((f"{model} {pt}, checkpointed", model, pt, checkpointed))
    columns = min(4, len(panels))
    rows = -(-len(panels) // columns)
    fig, grid = plt.subplots(rows, columns, figsize=(3.6 * columns, 4.2 * rows), squeeze=False)
    axes = [list(grid.flat)]
    for ax in axes[0][len(panels):]:
        ax.set_visible(False)
    colors = dict(zip(MEMORY_PARTS, ("tab:green", "tab:red", "tab:purple", "tab:brown",
                                     "tab:blue", "tab:gray"), strict=True))
    for ax, (title, model, pt, labels) in zip(axes[0], panels, strict=False):
        bottom = [0.0] * len(labels)
        for part in MEMORY_PARTS:
            heights = [counted[(model, pt, label)]["at_peak_mb"][part] for label in labels]
            ax.bar(range(len(labels)), heights, bottom=bottom, color=colors[part],
                   label=part if ax is axes[0][0] else None)
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        ax.plot(range(len(labels)), [counted[(model, pt, label)]["mem_mb"] for label in labels],
                "ko", markersize=4, label="mem" if ax is axes[0][0] else None)
        ax.set_xticks(range(len(labels)), [label.removesuffix(" +ckpt") for label in labels],
                      rotation=60, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("MB above weights and batch", fontsize=8)
    fig.legend(loc="upper center", ncol=len(MEMORY_PARTS) + 1, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.06 / rows))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def grouped_bars(values: dict[str, dict[str, tuple[float, float]]], path: Path,
                 ylabel: str, reference: str | None = None, highlight: str | None = None) -> None:
    """One panel per group, a bar per method with its error bar (mean, std); the ``reference``
    method's value as a dashed line across its panel, methods starting with ``highlight`` in
    another colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(values), figsize=(4.5 * len(values), 4), squeeze=False)
    for ax, (group, bars) in zip(axes[0], values.items(), strict=True):
        labels = list(bars)
        colors = ["tab:orange" if highlight and m.startswith(highlight) else "tab:blue"
                  for m in labels]
        ax.bar(range(len(labels)), [bars[m][0] for m in labels],
               yerr=[bars[m][1] for m in labels], color=colors, capsize=3)
        if reference in bars:
            ax.axhline(bars[reference][0], color="gray", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
        ax.set_title(group, fontsize=10)
        ax.set_ylabel(ylabel)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def stability_section() -> list[str]:
    data = _load("stability.json")
    if not data:
        return []
    lines = ["### Ranking stability (`stability.json`)", "",
             "| model | batch size | mean pairwise Kendall τ (8 minibatches) | top-5 Jaccard |",
             "|---|---|---|---|"]
    for r in data["results"]:
        lines.append(f"| {r['model']} | {r['batch_size']} | {r['kendall_tau']:.3f} | "
                     f"{r['top5_jaccard']:.3f} |")
    advice = []
    for model in dict.fromkeys(r["model"] for r in data["results"]):
        rows = sorted((r for r in data["results"] if r["model"] == model),
                      key=lambda r: r["batch_size"])
        enough = [r["batch_size"] for r in rows if r["kendall_tau"] >= STABLE_TAU
                  and r["top5_jaccard"] >= STABLE_JACCARD]
        advice.append(f"{model}: batch {enough[0]}" if enough else
                      f"{model}: none of {[r['batch_size'] for r in rows]} (top-5 Jaccard at most "
                      f"{max(r['top5_jaccard'] for r in rows):.2f})")
    groups = data["results"][0].get("predictor_groups") if data["results"] else None
    lines += ["", f"Smallest batch size whose rankings agree across minibatches (mean pairwise "
              f"τ ≥ {STABLE_TAU} and top-5 Jaccard ≥ {STABLE_JACCARD}): {'; '.join(advice)}."
              + (f" Ranked by the shipped predictor trained on {len(groups)} groups."
                 if groups else "")]
    return lines + [""]


def ranking_section() -> list[str]:
    """Held-out ranking quality from ``zest evaluate-predictor`` (predictor_training/)."""
    path = Path("predictor_training/results.json")
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    per_group = data["per_group"]
    summary = [r for r in data["summary"] if r["scheme"] == "logo"]
    if not summary:
        return []
    groups = sorted({r["group"] for r in per_group if r["scheme"] == "logo"})
    ceiling = [r["noise_ceiling"] for r in per_group
               if r["scheme"] == "logo" and r["method"] == "predictor"]
    peers = ("rgn (paper direction)", "kappa (paper direction)", "fim_score (paper direction)",
             "repr_shift (paper direction)", "class_separation (paper direction)")
    ordered = sorted(summary, key=lambda r: -r["kendall"])
    singles = [r for r in ordered if r["method"] not in peers + ("predictor", "random",
                                                                  "first_k", "last_k")]
    shown = [r for r in ordered if r["method"] == "predictor"] + singles[:3] + \
        [r for r in ordered if r["method"] in peers + ("random", "first_k", "last_k")]
    lines = [f"### Ranking quality, leave-one-group-out over {len(groups)} groups "
             "(`predictor_training/results.json`)", "",
             f"Noise ceiling (ground truth's own seed-to-seed Kendall τ): "
             f"{sum(ceiling) / len(ceiling):.3f}. Best three single metrics shown (signs fitted on "
             "the training folds); peer selectors with their papers' directions. Full table, "
             "other schemes and per-group values: "
             "[predictor_training/report.md](/predictor_training/report.md).", "",
             "| method | Kendall τ | Spearman ρ | NDCG@5 | top-5 recall |", "|---|---|---|---|---|"]
    for r in shown:
        lines.append(f"| {r['method']} | {r['kendall']:.3f} | {r['spearman']:.3f} | "
                     f"{r['ndcg']:.3f} | {r['recall']:.3f} |")
    cross = {r["method"]: r["kendall"] for r in data["summary"] if r["scheme"] == "cross_modality"}
    if "predictor" in cross:
        best = max((m for m in cross if m != "predictor"), key=lambda m: cross[m])
        gap = round(cross["predictor"] - cross[best], 3)
        verdict = "above" if gap > 0 else "below" if gap < 0 else "equal to"
        lines += ["", f"Cross-modality (train on one modality, test on the other): predictor "
                  f"Kendall τ {cross['predictor']:.3f}, {verdict} the best single method "
                  f"({best}, {cross[best]:.3f})."]
    lofo = [r for r in per_group if r["scheme"] == "lofo"]
    if lofo:
        families = sorted({r["fold"] for r in lofo})
        methods = sorted({r["method"] for r in lofo})

        def family_mean(method: str, family: str) -> float:
            values = [r["kendall"] for r in lofo if r["method"] == method and r["fold"] == family]
            return sum(values) / len(values)

        singles = [m for m in methods if m not in peers + ("predictor", "random", "first_k",
                                                           "last_k")]
        means = {m: sum(family_mean(m, f) for f in families) / len(families) for m in methods}
        best = max(singles, key=lambda m: means[m])
        lines += ["", f"Leave-one-family-out (every model of a family held out; families: "
                  f"{', '.join(families)}): predictor mean Kendall τ {means['predictor']:.3f} "
                  f"against the best single metric's ({best}) {means[best]:.3f}.", "",
                  "| held-out family | predictor | " + best + " | best single metric there |",
                  "|---|---|---|---|"]
        for family in families:
            top = max(singles, key=lambda m: family_mean(m, family))
            lines.append(f"| {family} | {family_mean('predictor', family):.3f} | "
                         f"{family_mean(best, family):.3f} | {top} "
                         f"{family_mean(top, family):.3f} |")
    return lines + ["", "![leave-one-group-out](/predictor_training/logo.png)", ""]


def speed_section() -> list[str]:
    data = _load("rank_vs_groundtruth.json")
    if not data:
        return []
    lines = ["### `zest rank` vs the brute-force ground truth (`rank_vs_groundtruth.json`)", "",
             "| group | settings | ground truth (layers × seeds) | zest rank (batch 32) | "
             "speed-up | load average, torch threads |", "|---|---|---|---|---|---|"]
    for r in data["results"]:
        settings = ", ".join(f"{k} {v}" for k, v in r["settings"].items())
        load = (f"{r['load_average'][0]:g}–{r['load_average'][1]:g}, {r['torch_threads']}"
                if "load_average" in r else "not recorded")
        lines.append(f"| {r['group']} | {settings} | {r['groundtruth_seconds'] / 3600:.2f} CPU-h "
                     f"({r['layers']} × {r['seeds']}) | {r['rank_seconds']:.2f} s | "
                     f"{r['speedup']:,}× | {load} |")
    return lines + ["", "The load average is the machine's (1-minute, before and after the "
                    "timing): on these 2 cores a load above 2 means other jobs shared them, and "
                    "the time grows with it (`probe_cost.py` below times the probe against a "
                    "plain forward+backward in alternating rounds, which cancels it)."]


def _rate_grid(data: dict) -> tuple[dict[str, set[float]], set[tuple]]:
    """Each group's grid of learning rates (those its first-seed trials tried), and the cases
    (group, budget, method) that chose from fewer rates than their group's grid (marked †)."""
    from collections import defaultdict

    tried: dict[tuple, set[float]] = defaultdict(set)
    for t in data.get("trials", []):
        tried[t["group"], t["budget"], t["method"]].add(t["lr"])
    grid: dict[str, set[float]] = defaultdict(set)
    for (group, _, _), rates_tried in tried.items():
        grid[group] |= rates_tried
    cases = {(r["group"], r["budget"], r["method"]) for r in data["results"]}
    return grid, {key for key in cases if tried.get(key, set()) != grid[key[0]]}


def whole_grid_results(data: dict) -> list[dict]:
    """The results whose case chose its rate from its group's whole grid: the rules ship what
    these chose (cases still missing a rate are left out)."""
    _, partial = _rate_grid(data)
    return [r for r in data["results"] if (r["group"], r["budget"], r["method"]) not in partial]


def load_accuracy(name: str = "accuracy_budget.json") -> dict | None:
    """The accuracy benchmark's results and trials, ZEST rows labelled by the spreads that ship
    now (``_results.relabel_spreads``); ``None`` when there are none."""
    data = _load(name)
    if not data or not data["results"]:
        return None
    for kind in ("results", "trials"):
        _results.relabel_spreads(data.get(kind, []))
    return data


def accuracy_section(name: str = "accuracy_budget.json") -> list[str]:
    """Test accuracy at a parameter budget, mean ± std over seeds, the mean over groups, and the
    verdict on ZEST's claim: within 1 point of full fine-tuning, and (the layer choice alone,
    dense updates on both sides) above random-k and last-k of the same size."""
    data = load_accuracy(name)
    if data is None:
        return []
    import statistics
    from collections import Counter, defaultdict

    cells: dict[tuple, list] = defaultdict(list)
    shares: dict[tuple, list] = defaultdict(list)
    rates: dict[tuple, float | None] = {}
    for r in data["results"]:
        key = (r["group"], r["budget"], r["method"])
        cells[key].append(r["test_accuracy"])
        shares[key].append(r["trainable_share"])
        rates[key] = r.get("lr")

    grid, partial = _rate_grid(data)

    def mean(key):
        return statistics.mean(cells[key]) if key in cells else None

    def cell(key):
        if key not in cells:
            return "—"
        values = cells[key]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        rate = f", lr {rates[key]:g}{'†' if key in partial else ''}" if rates.get(key) else ""
        return (f"{100 * statistics.mean(values):.1f} ± {100 * spread:.1f} "
                f"({100 * statistics.mean(shares[key]):.3g} %, n={len(values)}{rate})")

    groups = list(dict.fromkeys(r["group"] for r in data["results"]))
    budgets = sorted({r["budget"] for r in data["results"] if r["budget"] is not None},
                     reverse=True)
    methods = sorted({r["method"] for r in data["results"]
                      if r["budget"] is not None and "(spread" not in r["method"]},
                     key=lambda m: (ACCURACY_METHODS + [m]).index(m))
    zest_methods = [m for m in methods if m.startswith("zest")]
    lines = [f"### Test accuracy at a parameter budget (`{name}`)", "",
             "Test accuracy in % (mean ± std over seeds; in brackets the trainable share, head "
             "included, the number of seeds and the Adam learning rate, chosen per method on the "
             "val split at the first seed from the rates its group lists; † chosen from fewer "
             "rates, the others still to run). ZEST ranks each group with a predictor trained on "
             "the other corpus groups only (`benchmarks/results/held_out_predictors/`).", ""]
    complete = [g for g in groups if all((g, b, m) in cells for b in budgets for m in methods)
                and (g, None, "full") in cells]
    if complete:
        lines += [f"**Mean over the {len(complete)} groups with every method** "
                  f"({', '.join(complete)}), in points against full fine-tuning "
                  f"({100 * statistics.mean(mean((g, None, 'full')) for g in complete):.1f} %):",
                  "", "| method | " + " | ".join(f"~{b:.0%} budget" for b in budgets) + " |",
                  "|---|" + "---|" * len(budgets)]
        for method in methods:
            deltas = [statistics.mean(100 * (mean((g, b, method)) - mean((g, None, "full")))
                                      for g in complete) for b in budgets]
            lines.append(f"| {method} | " + " | ".join(f"{d:+.1f}" for d in deltas) + " |")
        head = statistics.mean(100 * (mean((g, None, "head")) - mean((g, None, "full")))
                               for g in complete if (g, None, "head") in cells)
        lines += [f"| head only | {head:+.1f} (any budget) |" + " |" * (len(budgets) - 1), ""]
    for group in groups:
        lines += [f"**{group}** — full fine-tuning {cell((group, None, 'full'))}, head only "
                  f"{cell((group, None, 'head'))}; rates tried: "
                  f"{', '.join(f'{x:g}' for x in sorted(grid[group], reverse=True))}", "",
                  "| method | " + " | ".join(f"~{b:.0%} budget" for b in budgets) + " |",
                  "|---|" + "---|" * len(budgets)]
        for method in methods:
            lines.append(f"| {method} | " + " | ".join(cell((group, b, method)) for b in budgets)
                         + " |")
        lines.append("")
    settled = [key for key in cells if key not in partial and rates.get(key)]
    edges = {edge: sum(rates[key] == edge(grid[key[0]]) for key in settled)
             for edge in (max, min)}
    chosen: dict[tuple, Counter] = defaultdict(Counter)  # (method, budget) → rate → cases
    for group, budget, method in settled:
        label = method.split(" (spread")[0] + (" (any spread)" if "spread" in method else "")
        chosen[label, budget][rates[group, budget, method]] += 1
    order = ["full", "head", *ACCURACY_METHODS]
    labels = sorted({label for label, _ in chosen}, key=lambda label: (
        order.index(label.split(" (any")[0]) if label.split(" (any")[0] in order
        else len(order), label))
    lines += ["**Learning rates chosen** on val (cases per rate, over groups and spreads; cells "
              "marked † left out):", "",
              "| method | " + " | ".join(f"~{b:.0%} budget" if b else "no budget"
                                       for b in [None, *budgets]) + " |",
              "|---|" + "---|" * (len(budgets) + 1)]
    for label in labels:
        lines.append(f"| {label} | " + " | ".join(
            ", ".join(f"{rate:g} ×{n}" for rate, n in sorted(chosen[label, b].items(),
                                                               reverse=True)) or "—"
            for b in [None, *budgets]) + " |")
    lines += ["", f"Learning rates at the edge of their group's grid: {edges[max]} of "
              f"{len(settled)} cases chose the highest rate, {edges[min]} the lowest (a rate "
              "beyond the edge might do better there).", ""]
    lines += _claim_verdict(data["results"], groups, budgets, zest_methods)
    lines += _best_plan_verdict(data["results"], groups, budgets)
    whole_grid = whole_grid_results(data)
    lines += _spread_section(whole_grid, groups, budgets)
    lines += _rule_section(whole_grid, budgets)
    lines += rate_section(data.get("trials", []), "2 epochs x 600 examples, the rates "
                          "`zest.rates.RATE_RULES` ships")
    for budget in budgets:
        bars = {}
        for group in groups:
            keys = [(group, None, "full"), (group, None, "head")] + \
                [(group, budget, m) for m in methods]
            bars[group] = {key[2]: (100 * statistics.mean(cells[key]),
                                    100 * (statistics.stdev(cells[key])
                                           if len(cells[key]) > 1 else 0.0))
                           for key in keys if key in cells}
        path = RESULTS / name.replace(".json", f"_{round(100 * budget)}pct.png")
        grouped_bars(bars, path, f"test accuracy (%) at ~{budget:.0%} budget",
                     reference="full", highlight="zest")
        lines += ["", f"![accuracy at ~{budget:.0%} budget](/{path.as_posix()})"]
    return lines + [""]


CLAIM_POINTS = 1.0  # ZEST's claim: within this many points of full fine-tuning
CLAIM_RIVALS = ["random-k + dense", "last-k + dense", "kappatune + dense", "fim + dense"]


def _claim_verdict(results: list[dict], groups: list[str], budgets: list[float],
                   zest_methods: list[str]) -> list[str]:
    """The verdict on ZEST's claim per (group, budget): each ZEST variant against full
    fine-tuning (within :data:`CLAIM_POINTS`), and ZEST's dense choice against the other layer
    choices of the same size, dense updates on both sides. Differences are paired by seed (the
    same seed gives both methods the same splits, head initialisation and batch order) and
    shown as mean ± std over seeds, so that a difference smaller than its spread reads as one."""
    import statistics

    paired = _paired_differences(results)
    text = _difference_text
    rivals = [m for m in CLAIM_RIVALS if any(r["method"] == m for r in results)]
    columns = [f"{m} − full" for m in zest_methods] + \
        [f"zest + dense − {m.removesuffix(' + dense')}" for m in rivals]
    lines = ["", "**Verdict on ZEST's claim**, per group and budget: test-accuracy points, "
             "paired by seed (mean ± std over seeds). Against full fine-tuning ✓ means within "
             f"{CLAIM_POINTS:g} point; against another layer choice of the same size (dense "
             "updates on both sides) ✓ means ahead on average.", "",
             "| group | budget | " + " | ".join(columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    held = {c: 0 for c in columns}
    cases = 0
    for group in groups:
        for budget in budgets:
            cells = []
            for method in zest_methods:
                diffs = paired(group, budget, method, None, "full")
                cells.append((f"{method} − full", diffs,
                              bool(diffs) and statistics.mean(diffs) >= -CLAIM_POINTS))
            for rival in rivals:
                diffs = paired(group, budget, "zest + dense", budget, rival)
                cells.append((f"zest + dense − {rival.removesuffix(' + dense')}", diffs,
                              bool(diffs) and statistics.mean(diffs) > 0))
            if not any(diffs for _, diffs, _ in cells):
                continue
            cases += 1
            for column, _, holds in cells:
                held[column] += holds
            lines.append(f"| {group} | ~{budget:.0%} | " + " | ".join(
                text(diffs, holds) if diffs else "—" for _, diffs, holds in cells) + " |")
    lines += ["", f"Cases where it holds, of {cases}: " + "; ".join(
        f"{column} {count}" for column, count in held.items()) + "."]
    return lines


def _accuracy_points(row: dict, other: dict) -> float:
    """Test-accuracy points of ``row`` minus ``other``."""
    return 100 * (row["test_accuracy"] - other["test_accuracy"])


def _perplexity_percent(row: dict, other: dict) -> float:
    """How much higher ``row``'s test perplexity (exp of the next-token loss) is than
    ``other``'s, in % of ``other``'s (negative: lower, better)."""
    return 100 * (math.exp(row["test_loss"] - other["test_loss"]) - 1)


def _paired_differences(results: list[dict],
                        difference: Callable[[dict, dict], float] = _accuracy_points
                        ) -> Callable[..., list[float]]:
    """``paired(group, budget, method, other_budget, other)``: ``difference`` of the rows of
    ``method`` and ``other`` (by default test-accuracy points of ``method`` minus ``other``),
    per seed both have (the same seed gives both the same splits, head initialisation and batch
    order)."""
    by_seed = {(r["group"], r["budget"], r["method"], r["seed"]): r for r in results}
    seeds = sorted({r["seed"] for r in results})

    def paired(group, budget, method, other_budget, other) -> list[float]:
        return [difference(by_seed[group, budget, method, s],
                           by_seed[group, other_budget, other, s])
                for s in seeds if (group, budget, method, s) in by_seed
                and (group, other_budget, other, s) in by_seed]

    return paired


def _difference_text(diffs: list[float], holds: bool, unit: str = "") -> str:
    """``mean ± std ✓/✗`` of paired differences (``unit`` after the mean, e.g. " %")."""
    import statistics

    spread = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    return f"{statistics.mean(diffs):+.1f}{unit} ± {spread:.1f} {'✓' if holds else '✗'}"


def _seed_means(results: list[dict], key: str | Callable[[dict], float]
                ) -> dict[tuple, float]:
    """(group, budget, method) → mean over seeds of ``key`` (a field, or a function of a row)."""
    import statistics
    from collections import defaultdict

    value = key if callable(key) else (lambda r: r[key])
    values: dict[tuple, list[float]] = defaultdict(list)
    for r in results:
        values[r["group"], r["budget"], r["method"]].append(value(r))
    return {k: statistics.mean(v) for k, v in values.items()}


def _best_on_val(val: dict[tuple, float], group: str, budget: float | None, prefix: str
                 ) -> str | None:
    """The method label starting with ``prefix`` with the best mean val score (``val``, from
    :func:`_seed_means`) at (group, budget); ``None`` when there is none."""
    labels = [m for (g, b, m) in val if g == group and b == budget and m.startswith(prefix)]
    return max(labels, key=lambda m: val[group, budget, m]) if labels else None


def _best_plan_verdict(results: list[dict], groups: list[str], budgets: list[float]
                       ) -> list[str]:
    """Issue 22's target, per (group, budget): the ZEST plan a user would pick on validation
    accuracy (every method and spread measured) against full fine-tuning (within
    :data:`CLAIM_POINTS`) and against random-k and last-k of the same budget, paired by seed."""
    import statistics

    val, test = _seed_means(results, "val_accuracy"), _seed_means(results, "test_accuracy")
    paired = _paired_differences(results)
    misses = []
    lines = ["", "**The best ZEST plan** (method and spread chosen on val accuracy, mean over "
             "seeds), test-accuracy points paired by seed: ✓ against full fine-tuning means "
             f"within {CLAIM_POINTS:g} point, against random-k / last-k ahead on average.", "",
             "| group | budget | plan (val) | − full | − random-k | − last-k |",
             "|---|---|---|---|---|---|"]
    held: dict[float, list[int]] = {b: [0, 0] for b in budgets}
    for group in groups:
        for budget in budgets:
            best = _best_on_val(val, group, budget, "zest")
            if best is None:
                continue
            cells, ok = [], []
            # within CLAIM_POINTS of full fine-tuning; ahead of the rivals on average
            for other_budget, other, holds_at in (
                    (None, "full", lambda mean: mean >= -CLAIM_POINTS),
                    (budget, "random-k + dense", lambda mean: mean > 0),
                    (budget, "last-k + dense", lambda mean: mean > 0)):
                diffs = paired(group, budget, best, other_budget, other)
                holds = bool(diffs) and holds_at(statistics.mean(diffs))
                cells.append(_difference_text(diffs, holds) if diffs else "—")
                ok.append(holds)
                if diffs and not holds:
                    misses.append(_miss_text(group, budget, best, other, diffs, test))
            held[budget][0] += 1
            held[budget][1] += all(ok)
            lines.append(f"| {group} | ~{budget:.0%} | {best} "
                         f"({100 * val[group, budget, best]:.1f}) | " + " | ".join(cells) + " |")
    lines += ["", "All three hold: " + "; ".join(
        f"~{b:.0%} budget {n_ok} of {n} groups" for b, (n, n_ok) in held.items()) + "."]
    if misses:
        lines += ["", "Where it misses (test points paired by seed; for full fine-tuning, how "
                  "much full fine-tuning gains over training the head alone there, and the "
                  "share of that gain the plan recovers):", ""] + [f"- {m}" for m in misses]
    return lines


def _miss_text(group: str, budget: float, plan: str, other: str, diffs: list[float],
               test: dict[tuple, float]) -> str:
    """One line on a miss of :func:`_best_plan_verdict`, with what measured context there is."""
    import statistics

    spread = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    text = (f"{group} at ~{budget:.0%}: {plan} is {abs(statistics.mean(diffs)):.1f} ± "
            f"{spread:.1f} points {'below' if statistics.mean(diffs) < 0 else 'above'} "
            f"{other} over {len(diffs)} seed{'s' if len(diffs) > 1 else ''}")
    full, head = test.get((group, None, "full")), test.get((group, None, "head"))
    if other == "full" and full is not None and head is not None and full > head:
        recovered = (test[group, budget, plan] - head) / (full - head)
        text += (f"; full fine-tuning gains {100 * (full - head):.1f} points over the head "
                 f"there, the plan recovers {recovered:.0%} of it")
    return text + "."


def _spread_section(results: list[dict], groups: list[str], budgets: list[float]
                    ) -> list[str]:
    """The measurement behind ``zest.planning.SPREAD_RULES``: ZEST + GPS / SPSFT at each
    spread (the chosen layers hold this many times the budget), mean val and test accuracy
    over seeds, per group and over the groups that have every spread."""
    import statistics

    rows = [r for r in results if r["method"].startswith(("zest + gps", "zest + spsft"))
            and r.get("spread") is not None]
    spreads = sorted({r["spread"] for r in rows})
    if len(spreads) < 2:
        return []
    val, test = _seed_means(rows, "val_accuracy"), _seed_means(rows, "test_accuracy")
    label = {(r["group"], r["budget"], r["method"]): r["spread"] for r in rows}
    lines = ["", "**Spread** (`--spread`: the chosen layers hold this many times the budget, "
             "GPS's K / SPSFT's ratio then filling it): val / test accuracy in %, mean over "
             "seeds; the last row is the mean over the groups with every spread; cells marked "
             "† above are left out.", ""]
    for budget in budgets:
        for tuner in ("gps", "spsft"):
            cell: dict[tuple[str, float], tuple[float, float]] = {}
            for key, spread in label.items():
                group, b, method = key
                if b == budget and method.startswith(f"zest + {tuner}"):
                    cell[group, spread] = (val[key], test[key])
            present = [g for g in groups if any((g, x) in cell for x in spreads)]
            if not present:
                continue
            lines += [f"ZEST + {tuner.upper()} at ~{budget:.0%}:", "",
                      "| group | " + " | ".join(f"spread {x:g}" for x in spreads) + " |",
                      "|---|" + "---|" * len(spreads)]
            for group in present:
                lines.append(f"| {group} | " + " | ".join(
                    f"{100 * cell[group, x][0]:.1f} / {100 * cell[group, x][1]:.1f}"
                    if (group, x) in cell else "—" for x in spreads) + " |")
            full = [g for g in present if all((g, x) in cell for x in spreads)]
            if full:
                means = [(statistics.mean(cell[g, x][0] for g in full),
                          statistics.mean(cell[g, x][1] for g in full)) for x in spreads]
                lines.append(f"| mean of {len(full)} | " + " | ".join(
                    f"{100 * v:.1f} / {100 * t:.1f}" for v, t in means) + " |")
            lines.append("")
    return lines


def measured_rules(results: list[dict], budgets: list[float]) -> dict:
    """Issue 22's rules as the accuracy benchmark measured them (val accuracy, mean over seeds,
    then over the groups that have every option compared; pass :func:`whole_grid_results`).

    Returns:
        ``spreads``: the spreads measured; ``spread``: (budget, update) → (groups, mean val
        accuracy per spread); ``method``: budget → (groups, option → mean val accuracy), the
        options being dense layers and GPS / SPSFT at the spread ``zest.planning`` ships for
        the budget (``(tuner, spread)``).
    """
    import statistics
    from collections import defaultdict

    from zest.planning import spread_rule

    runs: dict[tuple, list[float]] = defaultdict(list)
    for r in results:
        tuner = _results.zest_update(r["method"])
        if tuner is not None and r["budget"] is not None:
            spread = r.get("spread") if tuner in ("gps", "spsft") else None
            runs[r["group"], r["budget"], tuner, spread].append(r["val_accuracy"])
    val = {key: statistics.mean(v) for key, v in runs.items()}
    spreads = sorted({key[3] for key in val if key[3] is not None})
    measured: dict = {"spreads": spreads, "spread": {}, "method": {}}
    for budget in budgets:
        for tuner in ("gps", "spsft"):
            groups = sorted({g for (g, b, t, _) in val if b == budget and t == tuner
                             and all((g, b, t, x) in val for x in spreads)})
            if groups and len(spreads) > 1:
                measured["spread"][budget, tuner] = (groups, [
                    statistics.mean(val[g, budget, tuner, x] for g in groups) for x in spreads])
        options = [("layers", None), ("gps", spread_rule("gps", budget).spread),
                   ("spsft", spread_rule("spsft", budget).spread)]
        lookup = {option: ("dense" if option[0] == "layers" else option[0], option[1])
                  for option in options}
        groups = sorted({g for (g, b, _, _) in val if b == budget
                         and all((g, b, *lookup[o]) in val for o in options)})
        if groups:
            measured["method"][budget] = (groups, {o: statistics.mean(
                val[(g, budget, *lookup[o])] for g in groups) for o in options})
    return measured


def measured_rates(trials: list[dict]) -> dict[tuple[str, str], dict]:
    """The learning rates the benchmark measured, per (tuner, model kind) as
    ``zest.rates.RATE_RULES`` keys them: over the first-seed cases (group, budget, method
    label) of the cell, the mean val accuracy at each rate every case tried, the best of them,
    and whether it sits at an edge of those rates (a rate beyond it is untested somewhere)."""
    import statistics
    from collections import defaultdict

    cases: dict[tuple, dict[float, float]] = defaultdict(dict)
    for t in trials:
        cell = (_results.rate_tuner(t["method"]), _results.group_kind(t["group"]))
        cases[cell, t["group"], t["budget"], t["method"]][t["lr"]] = t["val_accuracy"]
    cells: dict[tuple, list[dict[float, float]]] = defaultdict(list)
    for (cell, *_), by_rate in cases.items():
        cells[cell].append(by_rate)
    measured = {}
    for cell, rows in cells.items():
        rates = sorted(set.intersection(*(set(r) for r in rows)))
        if not rates:
            continue
        means = {rate: statistics.mean(r[rate] for r in rows) for rate in rates}
        best = max(rates, key=means.get)
        measured[cell] = {"cases": len(rows), "means": means, "best": best,
                          "edge": best in (rates[0], rates[-1])}
    return measured


def rate_section(trials: list[dict], regime: str) -> list[str]:
    """The rates measured (:func:`measured_rates`) beside what ``zest.rates`` ships."""
    from zest.rates import RATE_RULES

    measured = measured_rates(trials)
    lines = ["", f"**Learning rates, measured** ({regime}; mean val accuracy in % over the "
             "first-seed cases of each method and model kind; best in bold; `zest.rates."
             "RATE_RULES` ships a rate per row, `--lr auto`):", "",
             "| method | model kind | cases | val accuracy by rate | best | shipped |",
             "|---|---|---|---|---|---|"]
    edges = []
    for (tuner, kind), m in sorted(measured.items()):
        by_rate = ", ".join(("**{:g}: {:.1f}**" if rate == m["best"] else "{:g}: {:.1f}").format(
            rate, 100 * acc) for rate, acc in m["means"].items())
        rule = RATE_RULES.get((tuner, kind))
        shipped = f"{rule.lr:g}" if rule else "—"
        lines.append(f"| {tuner} | {kind} | {m['cases']} | {by_rate} | {m['best']:g}"
                     f"{' (edge)' if m['edge'] else ''} | {shipped} |")
        if m["edge"]:
            edges.append(f"{tuner} on {kind} models")
    lines += ["", f"Best rate at an edge of the rates every case tried: {len(edges)} of "
              f"{len(measured)} ({', '.join(edges) or 'none'})."]
    return lines


def _rule_section(results: list[dict], budgets: list[float]) -> list[str]:
    """The rules of :func:`measured_rules` beside what ``zest.planning`` ships
    (``SPREAD_RULES``, ``METHOD_RULES``)."""
    from zest.planning import choose_method, spread_rule

    measured = measured_rules(results, budgets)
    spreads = measured["spreads"]
    if not measured["spread"]:
        return []
    lines = ["", "**The plan's rules, measured** (val accuracy in %, mean over seeds, then over "
             "the groups that have every option, each with its rate chosen from the whole grid; "
             "best in bold; `zest.planning.SPREAD_RULES` ships a spread per update and budget):",
             "", "| budget | update | groups | " + " | ".join(f"spread {x:g}" for x in spreads)
             + " | shipped |", "|---|---|---|" + "---|" * len(spreads) + "---|"]
    misses = []
    for (budget, tuner), (groups, means) in measured["spread"].items():
        best, shipped = max(means), spread_rule(tuner, budget).spread
        winner = spreads[means.index(best)]
        if winner != shipped:
            misses.append(f"{tuner.upper()} at ~{budget:.0%} ships {shipped:g}, " + (
                f"{100 * (best - means[spreads.index(shipped)]):.1f} points below spread "
                f"{winner:g}" if shipped in spreads else f"not measured; spread {winner:g} led"))
        lines.append(f"| ~{budget:.0%} | {tuner.upper()} | {len(groups)} | " + " | ".join(
            f"**{100 * m:.1f}**" if m == best else f"{100 * m:.1f}" for m in means)
            + f" | {shipped:g} |")
    lines += ["", "Shipped spreads against the measured best: " + (
        "; ".join(misses) + "." if misses else "each is the best of its row.")]
    lines += ["", "| budget | groups | ZEST + dense | ZEST + GPS (shipped spread) | ZEST + SPSFT "
              "(shipped spread) | best on val | `--method auto` ships |",
              "|---|---|---|---|---|---|---|"]
    for budget, (groups, means) in measured["method"].items():
        best = max(means, key=means.get)[0]
        lines.append(f"| ~{budget:.0%} | {len(groups)} | " + " | ".join(
            f"{100 * m:.1f}" + (f" (spread {x:g})" if x is not None else "")
            for (_, x), m in means.items()) + f" | {best} | {choose_method(budget).method} |")
    return lines


LM_CLAIM_PERCENT = 2.0  # decoders (lm: groups): within this many % of full's test perplexity
CONVERGED_TARGET_GROUPS = 6  # issue 32: each target holds on at least this many groups
PRETRAINED = "pretrained"  # an lm: group's untouched pretrained model (budget None), if recorded


def _perplexity_scored(group: str) -> bool:
    """Whether ``group`` is an ``lm:`` group (``<model>__lm-<data set>``): scored by test
    perplexity, chosen on val next-token loss (``accuracy_budget.val_score``)."""
    return "__lm-" in group


def _test_score(row: dict) -> float:
    """What a converged row is reported by: test accuracy in %, or (``lm:`` groups) test
    perplexity, exp of the next-token loss."""
    return math.exp(row["test_loss"]) if _perplexity_scored(row["group"]) \
        else 100 * row["test_accuracy"]


def _mean_std_text(values: list[float]) -> str:
    import statistics

    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {spread:.1f}"


def converged_section(name: str = "accuracy_converged.json") -> list[str]:
    """Issue 32's converged benchmark (``accuracy_budget.py --regime converged``): full
    fine-tuning against the head (``lm:`` groups: the pretrained model) per group; per group and
    budget the best ZEST plan (method, spread and rate chosen on val) against full fine-tuning
    and the best LoRA of the budget, paired by seed; issue 32's targets counted; epochs; a plot
    per group of test accuracy (perplexity) against trainable share; the rates chosen."""
    data = load_accuracy(name)
    if data is None:
        return []
    results = data["results"]
    groups = list(dict.fromkeys(r["group"] for r in results))
    budgets = sorted({r["budget"] for r in results if r["budget"] is not None}, reverse=True)
    lines = [f"### Accuracy trained to convergence (`{name}`)", "",
             "`python benchmarks/accuracy_budget.py --regime converged` (issue 32): each trial "
             "trained until val stops improving, scored on test at its best val epoch; "
             f"{data.get('machine', 'machine not recorded')}. Classification groups in test "
             "accuracy % (points), `lm:` groups in test perplexity (exp of the next-token loss; "
             "differences in % of the other's perplexity, lower is better); mean ± std over "
             "seeds, differences paired by seed.", ""]
    lines += _converged_references(results, groups)
    lines += _converged_plans(results, groups, budgets)
    lines += _converged_epochs(results, data.get("settings", {}))
    for group in groups:
        path = RESULTS / name.replace(".json", f"_{group}.png")
        share_plot(results, group, path)
        lines += ["", f"![{group}: test score against trainable share](/{path.as_posix()})"]
    trials = data.get("trials", [])
    lines += converged_rate_section(trials, results)
    lines += _rate_edges(trials, results)
    return lines + [""]


def converged_rates(trials: list[dict], results: list[dict]) -> dict[tuple[str, str], dict]:
    """The learning rates the converged benchmark chose, per (tuner, model kind) as
    ``zest.rates.RATE_RULES`` keys them. Each case (group, budget, method label) at the first
    seed has its own grid, centred on the shipped rate and extended while its best sits at an
    edge, so grids differ and their val scores are not averaged across cases (as
    :func:`measured_rates` does for the quick regime's common grid): each case votes for the rate
    it chose on val (``lm:`` groups on val loss), and the cell's rate is the median vote
    (the lower one of an even count) on ``accuracy_budget.RATE_LADDER``. ``open`` counts cases
    whose chosen rate is still the lowest or highest they tried (a rate beyond is untested)."""
    from collections import Counter, defaultdict

    from accuracy_budget import RATE_LADDER

    tried: dict[tuple, set[float]] = defaultdict(set)
    for t in trials:
        if t["seed"] == 0:
            tried[t["group"], t["budget"], t["method"]].add(t["lr"])
    votes: dict[tuple, list[float]] = defaultdict(list)
    open_cases: Counter = Counter()
    for r in results:
        key = (r["group"], r["budget"], r["method"])
        if r["seed"] != 0 or r.get("lr") is None or key not in tried:
            continue
        cell = (_results.rate_tuner(r["method"]), _results.group_kind(r["group"]))
        votes[cell].append(r["lr"])
        rates = tried[key]
        open_cases[cell] += len(rates) > 1 and r["lr"] in (min(rates), max(rates)) and \
            r["lr"] not in (RATE_LADDER[0], RATE_LADDER[-1])
    measured = {}
    for cell, chosen in votes.items():
        ordered = sorted(chosen)
        measured[cell] = {"cases": len(chosen), "votes": dict(sorted(Counter(chosen).items())),
                          "best": ordered[(len(ordered) - 1) // 2], "open": open_cases[cell]}
    return measured


def converged_rate_section(trials: list[dict], results: list[dict]) -> list[str]:
    """The rates the converged benchmark chose (:func:`converged_rates`) beside what
    ``zest.rates`` ships."""
    from zest.rates import RATE_RULES

    measured = converged_rates(trials, results)
    if not measured:
        return []
    lines = ["", "**Learning rates, chosen** (converged regime; per method and model kind, the "
             "rate each first-seed case chose on its own val-chosen grid, as votes; the median "
             "vote in bold; `open`: cases whose choice is still at an edge of what they tried; "
             "`zest.rates.RATE_RULES` ships a rate per row, `--lr auto`):", "",
             "| method | model kind | cases | votes (rate: cases) | median | open | shipped |",
             "|---|---|---|---|---|---|---|"]
    for (tuner, kind), m in sorted(measured.items()):
        votes = ", ".join(("**{:g}: {}**" if rate == m["best"] else "{:g}: {}").format(
            rate, count) for rate, count in m["votes"].items())
        rule = RATE_RULES.get((tuner, kind))
        lines.append(f"| {tuner} | {kind} | {m['cases']} | {votes} | {m['best']:g} | "
                     f"{m['open']} | {f'{rule.lr:g}' if rule else '—'} |")
    return lines


def _converged_references(results: list[dict], groups: list[str]) -> list[str]:
    """Full fine-tuning against head only per group (issue 32: full must beat the head, a group
    where it does not is reported as such); ``lm:`` groups: full's test perplexity, and the
    untouched pretrained model's where recorded (:data:`PRETRAINED`)."""
    import statistics

    scores: dict[tuple, list[float]] = {}
    for r in results:
        if r["budget"] is None:
            scores.setdefault((r["group"], r["method"]), []).append(_test_score(r))
    paired = {False: _paired_differences(results),
              True: _paired_differences(results, _perplexity_percent)}
    lines = ["**Full fine-tuning against the head alone** (`lm:` groups: against the pretrained "
             "model, perplexity):", "",
             "| group | score | full | head only / pretrained | full − reference, paired |",
             "|---|---|---|---|---|"]
    short = []
    for group in groups:
        lm = _perplexity_scored(group)
        reference = PRETRAINED if lm else "head"
        if (group, "full") not in scores:
            continue
        diffs = paired[lm](group, None, "full", None, reference)
        beats = bool(diffs) and (statistics.mean(diffs) < 0 if lm else
                                 statistics.mean(diffs) > 0)
        if diffs and not beats:
            short.append(f"{group} (full − {reference}: {_mean_std_text(diffs)}"
                         f"{' % perplexity' if lm else ' points'})")
        lines.append(f"| {group} | {'test perplexity' if lm else 'test accuracy %'} | "
                     f"{_mean_std_text(scores[group, 'full'])} | "
                     + (_mean_std_text(scores[group, reference])
                        if (group, reference) in scores else "—")
                     + f" | {_difference_text(diffs, beats, ' %' if lm else '') if diffs else '—'}"
                     " |")
    compared = [g for g in groups if (g, "full") in scores
                and (g, PRETRAINED if _perplexity_scored(g) else "head") in scores]
    lines += ["", f"Full fine-tuning beats its reference on {len(compared) - len(short)} of "
              f"{len(compared)} groups" + (f"; it does NOT on {'; '.join(short)}." if short
                                          else ".")]
    return lines


def _converged_plans(results: list[dict], groups: list[str], budgets: list[float]
                     ) -> list[str]:
    """Per (group, budget): the best ZEST plan on val (every update and spread; classification
    by mean val accuracy, ``lm:`` groups by mean val loss, ``accuracy_budget.val_score``) against
    full fine-tuning and against the best LoRA on val of the budget, paired by seed; issue 32's
    targets counted over the groups, the misses listed with by how much."""
    import statistics

    from accuracy_budget import val_score

    val, test = _seed_means(results, val_score), _seed_means(results, _test_score)
    rates = {(r["group"], r["budget"], r["method"]): r.get("lr") for r in results}
    paired = {False: _paired_differences(results),
              True: _paired_differences(results, _perplexity_percent)}
    lines = ["", "**The best ZEST plan against full fine-tuning and the best LoRA** (method, "
             "spread and rate chosen on val for both, mean over seeds); test differences paired "
             "by seed, points (`lm:` groups: % of the other's perplexity). Against full ✓ means "
             f"within {CLAIM_POINTS:g} point (`lm:` {LM_CLAIM_PERCENT:g} % perplexity) at ~1 %, "
             "at or above it at larger budgets; against LoRA, ahead on average.", "",
             "| group | budget | best ZEST (val, lr) | test | − full | best LoRA (val, lr) | "
             "test | ZEST − LoRA |", "|---|---|---|---|---|---|---|---|"]
    # (budget, rival) → [groups compared, groups where it holds], and the misses
    held: dict[tuple, list[int]] = {}
    misses = []
    for group in groups:
        lm = _perplexity_scored(group)
        unit = " %" if lm else ""
        for budget in budgets:
            best = _best_on_val(val, group, budget, "zest")
            if best is None:
                continue
            lora = _best_on_val(val, group, budget, "lora")
            tolerance = (LM_CLAIM_PERCENT if lm else CLAIM_POINTS) if budget <= 0.01 else 0.0
            cells = []
            # against full: within the tolerance; against the best LoRA (None): ahead
            for rival, other_budget, other, allowed in (("full", None, "full", tolerance),
                                                        ("best LoRA", budget, lora, None)):
                diffs = paired[lm](group, budget, best, other_budget, other) if other else []
                if not diffs:
                    cells.append("—")
                    continue
                # points ahead (lm: % of perplexity below), rounded off float noise: a plan
                # exactly 1.0 point below full is within 1 point
                gain = round(-statistics.mean(diffs) if lm else statistics.mean(diffs), 9)
                holds = gain > 0 if allowed is None else gain >= -allowed
                count = held.setdefault((budget, rival), [0, 0])
                count[0] += 1
                count[1] += holds
                cells.append(_difference_text(diffs, holds, unit))
                if not holds:
                    misses.append(_converged_miss(group, budget, best, other, diffs, lm,
                                                  allowed))
            lines.append(
                f"| {group} | ~{budget:.0%} | {best} ({_val_text(val[group, budget, best], lm)}, "
                f"lr {rates[group, budget, best]:g}) | {test[group, budget, best]:.1f} | "
                f"{cells[0]} | " + (f"{lora} ({_val_text(val[group, budget, lora], lm)}, lr "
                                    f"{rates[group, budget, lora]:g}) | "
                                    f"{test[group, budget, lora]:.1f}" if lora else "— | —")
                + f" | {cells[1]} |")
    lines += ["", f"**Issue 32's targets** (each on at least {CONVERGED_TARGET_GROUPS} groups):",
              ""]
    for budget in budgets:
        against_full = (f"within {CLAIM_POINTS:g} point of full fine-tuning (`lm:` "
                        f"{LM_CLAIM_PERCENT:g} % perplexity)" if budget <= 0.01
                        else "at or above full fine-tuning")
        for rival, what in (("full", against_full), ("best LoRA", "ahead of the best LoRA")):
            compared, holding = held.get((budget, rival), (0, 0))
            lines.append(f"- ~{budget:.0%}: best ZEST plan {what} on {holding} of {compared} "
                         f"groups (target: at least {CONVERGED_TARGET_GROUPS}) "
                         + ("✓" if holding >= CONVERGED_TARGET_GROUPS else "✗"))
    if misses:
        lines += ["", "Misses (paired by seed):", ""] + [f"- {m}" for m in misses]
    return lines


def _val_text(score: float, lm: bool) -> str:
    """A mean val score (``accuracy_budget.val_score``) as read: accuracy % or next-token loss."""
    return f"val loss {-score:.3f}" if lm else f"val {100 * score:.1f}"


def _converged_miss(group: str, budget: float, plan: str, other: str, diffs: list[float],
                    lm: bool, allowed: float | None) -> str:
    """One line on a target the best ZEST plan misses against ``other``: by how much, and the
    target (``allowed``: how far behind it may be; ``None``: it must be ahead)."""
    import statistics

    mean = statistics.mean(diffs)
    spread = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    seeds = f"{len(diffs)} seed{'s' if len(diffs) > 1 else ''}"

    def side(value: float) -> str:
        return "above" if value > 0 else "below" if value < 0 else "level with"

    if lm:
        text = f"test perplexity {abs(mean):.1f} ± {spread:.1f} % {side(mean)} {other}'s"
        target = ("a lower perplexity" if allowed is None else
                  f"within {allowed:g} %" if allowed else "at most its perplexity")
    else:
        text = f"{abs(mean):.1f} ± {spread:.1f} points {side(mean)} {other}"
        target = ("ahead" if allowed is None else
                  f"within {allowed:g} point{'s' if allowed != 1 else ''}" if allowed
                  else "at or above")
    return f"{group} at ~{budget:.0%}: {plan} is {text} over {seeds} (target: {target})."


def _converged_epochs(results: list[dict], settings: dict) -> list[str]:
    """Mean best val epoch and epochs trained per method, and the trials that trained every
    epoch allowed with their patience not run out (not converged); the limits are the run's,
    as its ``settings`` record them (decoders apart), or the converged regime's defaults
    (``accuracy_budget._regime_limits``)."""
    import argparse
    import statistics
    from collections import defaultdict

    from accuracy_budget import DECODERS, _regime_limits

    default_epochs, default_patience = _regime_limits(argparse.Namespace(
        epochs=None, patience=None), converged=True)

    def epochs_of(model: str) -> int:
        key = "decoder-epochs" if model in DECODERS else "epochs"
        return settings.get(key) or default_epochs(model)

    def patience_of(model: str) -> int:
        key = "decoder-patience" if model in DECODERS else "patience"
        return settings.get(key) or default_patience(model)

    def still_improving(r: dict) -> bool:
        model = r["group"].split("__")[0]
        return (r["epochs_trained"] >= epochs_of(model)
                and r["epochs_trained"] - r["best_epoch"] < patience_of(model))

    rows: dict[str, list[dict]] = defaultdict(list)
    trained = [r for r in results if "best_epoch" in r]  # the pretrained reference trains none
    for r in sorted(trained, key=lambda r: (r["budget"] is not None, r["method"])):
        rows[r["method"]].append(r)
    lines = ["", f"**Epochs** (the reported trials; at most {epochs_of('x')} epochs, decoders "
             f"{epochs_of('smollm2')}; patience {patience_of('x')}, decoders "
             f"{patience_of('smollm2')}):", "",
             "| method | trials | mean best val epoch | mean epochs trained | at the maximum, "
             "still improving |", "|---|---|---|---|---|"]
    for method, method_rows in rows.items():
        lines.append(f"| {method} | {len(method_rows)} | "
                     f"{statistics.mean(r['best_epoch'] for r in method_rows):.1f} | "
                     f"{statistics.mean(r['epochs_trained'] for r in method_rows):.1f} | "
                     f"{sum(map(still_improving, method_rows))} |")
    unconverged = [f"{r['group']} {r['method']}"
                   + (f" ~{r['budget']:.0%}" if r["budget"] is not None else "")
                   + f" seed {r['seed']} (best epoch {r['best_epoch']} of "
                   f"{r['epochs_trained']})" for r in trained if still_improving(r)]
    lines += ["", f"Trials that reached the epoch maximum still improving (not converged): "
              f"{len(unconverged)}" + (": " + "; ".join(unconverged) + "." if unconverged
                                      else ".")]
    return lines


def _rate_edges(trials: list[dict], results: list[dict]) -> list[str]:
    """Per method (spreads together): of the cases whose rate is chosen, how many chose the
    lowest or the highest rate they tried (``--extend-edges`` tries the next rate of
    ``accuracy_budget.RATE_LADDER`` beyond such an edge: an edge left is the ladder's end, or a
    case still running)."""
    from collections import defaultdict

    from accuracy_budget import RATE_LADDER

    tried: dict[tuple, set[float]] = defaultdict(set)
    for t in trials:
        tried[t["group"], t["budget"], t["method"]].add(t["lr"])
    chosen = {(r["group"], r["budget"], r["method"]): r["lr"] for r in results
              if r.get("lr") is not None}
    counts: dict[str, list[int]] = {}  # method → cases, lowest, highest, at the ladder's end
    for key, lr in chosen.items():
        if key not in tried:
            continue
        count = counts.setdefault(key[2].split(" (spread")[0], [0, 0, 0, 0])
        for column, hit in enumerate((True, lr == min(tried[key]), lr == max(tried[key]),
                                      lr in (RATE_LADDER[0], RATE_LADDER[-1]))):
            count[column] += hit
    if not counts:
        return []
    lines = ["", "**Rates at an edge** (all groups, `lm:` ones chosen on val loss): cases "
             "whose chosen rate is the lowest or the highest they tried, and at the end of "
             "`RATE_LADDER` (nothing beyond to try):", "",
             "| method | cases | lowest tried | highest tried | end of the ladder |",
             "|---|---|---|---|---|"]
    for method, (cases, lowest, highest, end) in counts.items():
        lines.append(f"| {method} | {cases} | {lowest} | {highest} | {end} |")
    total = [sum(c[i] for c in counts.values()) for i in range(4)]
    return lines + ["", f"At an edge: {total[1]} of {total[0]} cases at the lowest rate tried, "
                    f"{total[2]} at the highest."]


def share_plot(results: list[dict], group: str, path: Path) -> None:
    """Test accuracy (``lm:`` groups: perplexity) against trainable share (log scale) for every
    method of ``group``, mean ± std over seeds, a method's budgets joined by a line; full
    fine-tuning's score as a dashed line."""
    import statistics
    from collections import defaultdict

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases: dict[tuple, list[dict]] = defaultdict(list)
    for r in results:
        if r["group"] == group:
            cases[r["method"], r["budget"]].append(r)
    points: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    for (method, _), rows in cases.items():
        scores = [_test_score(r) for r in rows]
        points[method].append((statistics.mean(r["trainable_share"] for r in rows),
                               statistics.mean(scores),
                               statistics.stdev(scores) if len(scores) > 1 else 0.0))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    colors = plt.get_cmap("tab20").colors
    for i, (method, method_points) in enumerate(sorted(points.items())):
        shares, means, spreads = zip(*sorted(method_points), strict=True)
        ax.errorbar(shares, means, yerr=spreads, marker="o", capsize=3, label=method,
                    color=colors[i % len(colors)],
                    linewidth=2 if method.startswith("zest") else 1)
    if "full" in points:
        ax.axhline(points["full"][0][1], color="gray", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("trainable share (head included)")
    ax.set_ylabel("test perplexity" if _perplexity_scored(group) else "test accuracy (%)")
    ax.set_title(group)
    ax.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def defaults_section(name: str = "defaults.json") -> list[str]:
    """``zest finetune`` with its defaults (``benchmarks/defaults.py``, issue 35): every method
    with nothing but model, data set, method and run folder; per group, full fine-tuning
    against the head alone."""
    data = _load(name)
    if not data or not data.get("results"):
        return []
    groups = list(dict.fromkeys(r["group"] for r in data["results"]))
    lines = [f"### `zest finetune` with its defaults (`{name}`)", "",
             "Each method with only `--model`, `--dataset`, `--method` and `--out` (the whole "
             "packaged split, `--lr auto`, at most 3 epochs with the best val epoch kept, "
             "`--layers auto` = the top 5 layers the method can tune), one seed:", "",
             "| group | method | test accuracy | lr (auto) | best epoch | trainable | time |",
             "|---|---|---|---|---|---|---|"]
    verdicts = []
    for group in groups:
        rows = {r["method"]: r for r in data["results"] if r["group"] == group}
        for method in sorted(rows):
            r = rows[method]
            lines.append(f"| {group} | {method} | {100 * r['test_accuracy']:.1f} % | "
                         f"{r['lr']:g} | {r['best_epoch']} of {r['epochs']} | "
                         f"{100 * r['trainable_share']:.3g} % | {r['seconds'] / 60:.1f} min |")
        if "full" in rows and "head" in rows:
            gain = 100 * (rows["full"]["test_accuracy"] - rows["head"]["test_accuracy"])
            verdicts.append(f"{group}: full fine-tuning {'≥' if gain >= 0 else '<'} head only "
                            f"({gain:+.1f} points)")
        else:
            verdicts.append(f"{group}: full or head not run yet")
    return lines + ["", "Full fine-tuning against the head alone: " + "; ".join(verdicts)
                    + ".", ""]


def main() -> None:
    body = ranking_section() + accuracy_section() + converged_section() + \
        converged_section("accuracy_converged_decoders.json") + defaults_section() + \
        speed_section() + probe_section() + probe_memory_section() + cache_section() + \
        memory_section() + stability_section()
    for readme in READMES:
        text = readme.read_text()
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        readme.write_text(f"{head}{START}\n" + "\n".join(body) + f"\n{END}{tail}")
    print("\n".join(body))


if __name__ == "__main__":
    main()

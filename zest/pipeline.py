"""``zest finetune``: resolve the layers (``auto`` = ``zest.rank``), fine-tune, write a run dir.

A run directory holds ``config.json``, ``metrics.json`` (per-epoch train/val accuracy and loss,
test accuracy, trainable parameters, peak memory, wall time), ``delta.safetensors`` +
``delta.json`` and ``curve.png``. For a causal-LM task (``lm:<text data set>``) accuracy and
loss are per next token, ``metrics.json`` adds the val and test perplexity (``exp`` of the
loss) and the curve shows the loss.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from zest.errors import InvalidInputError
from zest.finetune import METHODS, Tuner
from zest.loading import DataOptions, load_pair
from zest.models import resolve_device
from zest.outputs import check_output_dir
from zest.ranking import Ranking, rank


def takes_layers(method: str) -> bool:
    """Whether a registered tuning method trains chosen layers (``Tuner.uses_layers``), rather
    than a fixed set of parameters (full, head, bitfit)."""
    return bool(METHODS.get(method).uses_layers)


def resolve_layers(spec: str | Sequence[str] | None, ranking_factory: Callable[[], Ranking],
                   param_budget: float | None = None) -> tuple[list[str] | str, dict]:
    """``auto`` (top-5 or the budget), ``top:K``, ``all`` or comma-separated names."""
    info: dict[str, Any] = {}
    if spec is None:
        spec = "auto"
    if not isinstance(spec, str):
        return list(spec), info
    if spec == "all":
        return "all", info
    if spec == "auto" or spec.startswith("top:"):
        k = None
        if spec.startswith("top:"):
            try:
                k = int(spec[4:])
            except ValueError:
                raise InvalidInputError(f"--layers {spec!r}: use top:K with an integer K") \
                    from None
        ranking = ranking_factory()
        info = {"ranked_by": ranking.by, "rank_seconds": ranking.seconds,
                "ranking": ranking.table[["rank", "layer", "params", "score"]].to_dict(
                    orient="records")}
        if k is not None:
            return ranking.top(k), info
        if param_budget is not None:
            return ranking.select(param_budget), info
        return ranking.default_choice(), info
    if param_budget is not None:
        raise InvalidInputError("--param-budget goes with --layers auto, not with layer names")
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise InvalidInputError("--layers is empty; pass auto, top:K, all or layer names")
    return names, info


def check_layer_request(method: str, layers: str | Sequence[str] | None,
                        param_budget: float | None) -> None:
    """Refuses empty or contradictory layer requests before anything is loaded: a budget with
    ``top:K`` or with layer names, ``top:0``, layers or a budget for a method that trains a
    fixed set of parameters."""
    if param_budget is not None and (isinstance(param_budget, bool)
                                     or not isinstance(param_budget, int | float)
                                     or not 0 < param_budget <= 1):
        raise InvalidInputError(f"--param-budget must be in (0, 1], got {param_budget!r}")
    if not takes_layers(method):
        if layers not in (None, "auto"):
            raise InvalidInputError(f"--method {method} trains a fixed set of parameters; drop "
                                    f"--layers {layers if isinstance(layers, str) else '...'}")
        if param_budget is not None:
            raise InvalidInputError(f"--method {method} trains a fixed set of parameters; drop "
                                    "--param-budget")
        return
    if isinstance(layers, str) and layers.startswith("top:"):
        try:
            k = int(layers[4:])
        except ValueError:
            raise InvalidInputError(f"--layers {layers!r}: use top:K with an integer K") \
                from None
        if k < 1:
            raise InvalidInputError(f"--layers {layers!r}: K must be at least 1")
        if param_budget is not None:
            raise InvalidInputError(f"--layers {layers} and --param-budget {param_budget} "
                                    "contradict each other; pass one (a budget goes with "
                                    "--layers auto)")
    elif layers not in (None, "auto") and param_budget is not None:
        raise InvalidInputError("--param-budget goes with --layers auto, not with 'all' or "
                                "layer names")


def run_finetune(model_spec: str, dataset_spec: str, out_dir: str | os.PathLike, *,
                 method: str = "spsft", layers: str | Sequence[str] | None = "auto",
                 param_budget: float | None = None, epochs: int = 3, lr: float = 1e-3,
                 batch_size: int = 32, seed: int = 0, options: DataOptions | None = None,
                 device: str = "cpu", checkpoint: str | None = None,
                 predictor: str = "universal", method_options: dict[str, Any] | None = None,
                 progress: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Fine-tunes and writes a run directory; returns the metrics dict."""
    tuner_class = METHODS.get(method)
    check_layer_request(method, layers, param_budget)
    out_dir = check_output_dir(out_dir, "--out")
    out_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(out_dir, os.W_OK):
        raise InvalidInputError(f"run directory {str(out_dir)!r} is not writable")
    torch_device = resolve_device(device)
    model, task, data = load_pair(model_spec, dataset_spec, options=options, seed=seed,
                                  device=str(torch_device), checkpoint=checkpoint)
    start = time.perf_counter()
    info: dict[str, Any] = {}
    chosen: list[str] | str | None = None
    if takes_layers(method):
        def make_ranking() -> Ranking:
            ranking = rank(model, task, data.batches("train", batch_size, 1, seed=seed),
                           predictor=predictor, device=torch_device)
            # only among the layers the method can tune (LoRA: as Ranking.to_lora_config does)
            tunable = [name for name in ranking.table["layer"]
                       if tuner_class.can_tune(name, model.get_submodule(name))]
            return ranking.restricted(tunable, f"--method {method}")

        chosen, info = resolve_layers(layers, make_ranking, param_budget)
    kwargs = dict(method_options or {})
    tuner: Tuner = tuner_class(model, task, layers=chosen, lr=lr, seed=seed, **kwargs)
    config = {"model": model_spec, "dataset": dataset_spec, "method": method,
              "layers_spec": layers if isinstance(layers, str) or layers is None else
              list(layers), "layers": tuner.layer_names, "param_budget": param_budget,
              "epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed,
              "method_options": kwargs, "data": data.summary(), **info}
    (out_dir / "config.json").write_text(json.dumps(config, indent=1, default=str))
    failure = None
    try:
        tuner.fit(data, epochs=epochs, batch_size=batch_size, progress=progress,
                  test_each_epoch=True)
    except Exception as exc:  # keep the last good delta, then re-raise
        failure = exc
    delta = tuner.delta() if hasattr(tuner, "trainable_params_") else None
    if delta is not None:
        delta.meta.update({"dataset": dataset_spec})
        delta.save(out_dir / "delta.safetensors")
    if failure is not None:
        raise failure
    test_loss, test_accuracy = tuner.history_[-1].test_loss, tuner.history_[-1].test_accuracy
    total_params = sum(p.numel() for p in model.parameters())
    metrics = {
        "task_kind": task.kind,
        "epochs": [record.__dict__ for record in tuner.history_],
        "test_accuracy": test_accuracy, "test_loss": test_loss,
        "trainable_params": int(tuner.trainable_params_),
        "trainable_share": tuner.trainable_params_ / total_params,
        "delta_values": int(delta.numel()) if delta is not None else 0,
        "peak_memory_mb": tuner.peak_memory_mb_, "wall_seconds": time.perf_counter() - start,
    }
    if task.kind == "causal_lm":
        metrics["val_perplexity"] = math.exp(tuner.history_[-1].val_loss)
        metrics["test_perplexity"] = math.exp(test_loss)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    plot_curves(metrics, out_dir / "curve.png", title=f"{model_spec} / {dataset_spec} / {method}")
    return metrics


def plot_curves(metrics: dict[str, Any], path: Path, title: str = "") -> None:
    """Learning curve: train and val accuracy per epoch, test accuracy marked (the next-token
    loss for a causal-LM task)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = "loss" if metrics.get("task_kind") == "causal_lm" else "accuracy"
    epochs = [e["epoch"] for e in metrics["epochs"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [e[f"train_{shown}"] for e in metrics["epochs"]], "o-", label="train")
    ax.plot(epochs, [e[f"val_{shown}"] for e in metrics["epochs"]], "o-", label="val")
    ax.plot(epochs, [e[f"test_{shown}"] for e in metrics["epochs"]], "s--", color="k",
            label=f"test (final {metrics[f'test_{shown}']:.3f})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("next-token loss" if shown == "loss" else shown)
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

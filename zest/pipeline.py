"""``zest finetune``: plan the layers (``auto``: ``zest.rank``, then
``Ranking.finetune_plan``), fine-tune,
write a run dir whole or not at all (:func:`zest.outputs.staged_folder`).

A run directory holds ``config.json`` (the request, and under ``plan`` the plan: layers,
per-layer density, options, planned and measured trainable share), ``metrics.json`` (per-epoch
train/val accuracy and loss, test accuracy, trainable parameters, peak memory, wall time),
``delta.safetensors`` + ``delta.json`` and ``curve.png``. For a causal-LM task
(``lm:<text data set>``) accuracy and loss are per next token, ``metrics.json`` adds the val and
test perplexity (``exp`` of the loss) and the curve shows the loss.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from zest._version import __version__
from zest.data.dataset import check_positive
from zest.errors import InvalidInputError, NonFiniteLossError
from zest.finetune import METHODS, Tuner
from zest.loading import DataOptions, load_pair
from zest.models import resolve_device
from zest.outputs import RUN_MARKER, check_run_folder, staged_folder
from zest.planning import (
    AUTO,
    FinetunePlan,
    check_method_options,
    check_plan_request,
    check_selection,
)
from zest.ranking import load_predictor, rank


def takes_layers(method: str) -> bool:
    """Whether a tuning method trains chosen layers (``Tuner.uses_layers``; ``auto`` always
    chooses such a method), rather than a fixed set of parameters (full, head, bitfit)."""
    return method == AUTO or bool(METHODS.get(method).uses_layers)


def parse_layers(spec: str | Sequence[str] | None) -> str | int | list[str]:
    """A ``--layers`` value: ``"auto"`` (``None`` too), ``"all"``, ``K`` for ``top:K``, or the
    layer names."""
    if spec is None:
        return "auto"
    if not isinstance(spec, str):
        return list(spec)
    if spec in ("auto", "all"):
        return spec
    if spec.startswith("top:"):
        try:
            k = int(spec[4:])
        except ValueError:
            raise InvalidInputError(f"--layers {spec!r}: use top:K with an integer K") from None
        if k < 1:
            raise InvalidInputError(f"--layers {spec!r}: K must be at least 1")
        return k
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise InvalidInputError("--layers is empty; pass auto, top:K, all or layer names")
    return names


def check_layer_request(method: str, layers: str | Sequence[str] | None,
                        param_budget: float | None, spread: float | None = None,
                        method_options: dict[str, Any] | None = None) -> None:
    """Refuses empty or contradictory requests before anything is loaded: a budget with
    ``top:K`` or with layer names, ``top:0``, layers or a budget for a method that trains a
    fixed set of parameters, ``auto`` without a budget, options the method does not take; the
    budget, spread and options through :func:`zest.planning.check_plan_request`."""
    check_selection(None, param_budget)
    options = method_options or {}
    if not takes_layers(method):
        if layers not in (None, "auto"):
            raise InvalidInputError(f"--method {method} trains a fixed set of parameters; drop "
                                    f"--layers {layers if isinstance(layers, str) else '...'}")
        if param_budget is not None:
            raise InvalidInputError(f"--method {method} trains a fixed set of parameters; drop "
                                    "--param-budget")
        check_method_options(method, options)
        return
    request = parse_layers(layers)
    if isinstance(request, int) and param_budget is not None:
        raise InvalidInputError(f"--layers {layers} and --param-budget {param_budget} "
                                "contradict each other; pass one (a budget goes with "
                                "--layers auto)")
    if not isinstance(request, int) and request != "auto":
        if param_budget is not None:
            raise InvalidInputError("--param-budget goes with --layers auto, not with 'all' or "
                                    "layer names")
        if method == AUTO:
            raise InvalidInputError("--method auto plans the layers from --param-budget; use "
                                    "--layers auto or name a method")
    check_plan_request(method, param_budget, top_k=request if isinstance(request, int) else None,
                       spread=spread, options=options)


def default_method(method: str | None, param_budget: float | None) -> str:
    """The method a run trains without ``method``: ``auto`` (the measured rule of
    :data:`zest.planning.METHOD_RULES` for the budget) with a ``param_budget``, else SPSFT."""
    if method is not None:
        return method
    return AUTO if param_budget is not None else "spsft"


def run_finetune(model_spec: str, dataset_spec: str, out_dir: str | os.PathLike, *,
                 method: str | None = None, layers: str | Sequence[str] | None = "auto",
                 param_budget: float | None = None, spread: float | None = None,
                 epochs: int = 3, lr: float | str = "auto", patience: int | None = None,
                 batch_size: int = 32, seed: int = 0, options: DataOptions | None = None,
                 device: str = "cpu", checkpoint: str | None = None,
                 predictor: str = "universal", method_options: dict[str, Any] | None = None,
                 progress: Callable[[dict], None] | None = None,
                 overwrite: bool = False) -> dict[str, Any]:
    """Fine-tunes and writes a run directory (``zest finetune``), whole or not at all.

    With ``layers="auto"`` or ``"top:K"`` the layers are ranked on one training minibatch and
    :meth:`zest.Ranking.finetune_plan` chooses what to train: the layers the method can tune
    and, with a
    ``param_budget`` (share of trainable parameters, head included), the density that fills it
    (``spread``: :class:`zest.planning.PlanRule`; ``None``, the method's measured one for the
    budget, :func:`zest.planning.spread_rule`); ``method="auto"`` also chooses the method
    (:data:`zest.planning.METHOD_RULES`), and so does no ``method`` with a ``param_budget``
    (:func:`default_method`). ``method_options`` are tuner options (``k``,
    ``ratio``, ``r``, ``importance``, ``rank``); a density given there is kept.
    ``lr="auto"`` trains at the method's measured rate for the model's kind
    (:func:`zest.rates.default_rate`; ``config.json`` records the rate and why). ``epochs`` is
    a maximum: the model kept is the one of the best val epoch (``metrics.json``
    ``best_epoch``), and with ``patience`` training stops once that many epochs have not
    improved on it.

    Every option is checked, the model loaded, the layers planned and the tuner built before
    anything is written (:func:`zest.outputs.check_run_folder`: ``out_dir`` must be new, empty,
    or with ``overwrite`` a zest run folder, replaced whole); the run is trained into a
    temporary folder beside ``out_dir`` that takes its place at the end
    (:func:`zest.outputs.staged_folder`). A run that fails (a non-finite loss, Ctrl-C, any
    error) leaves ``out_dir`` exactly as it was and no temporary folder behind.

    Returns:
        The metrics written to ``metrics.json``, plus ``method`` (the method trained) and
        ``plan`` (the plan as ``config.json`` records it, with the measured trainable share;
        ``None`` for named layers or a method without layers). ``progress`` receives
        ``{"plan": ...}`` once the plan is made, before training.
    """
    method = default_method(method, param_budget)
    check_layer_request(method, layers, param_budget, spread, method_options)
    check_positive("--epochs", epochs)
    check_positive("--batch-size", batch_size)
    out_dir = check_run_folder(out_dir, "--out", overwrite=overwrite)
    request = parse_layers(layers) if takes_layers(method) else None
    if request == "auto" or isinstance(request, int):
        load_predictor(predictor)  # a bad --predictor fails before the model is loaded
    torch_device = resolve_device(device)
    model, task, data = load_pair(model_spec, dataset_spec, options=options, seed=seed,
                                  device=str(torch_device), checkpoint=checkpoint)
    start = time.perf_counter()
    info: dict[str, Any] = {}
    kwargs = dict(method_options or {})
    chosen: list[str] | str | None = None
    plan: FinetunePlan | None = None
    if request == "auto" or isinstance(request, int):
        ranking = rank(model, task, data.batches("train", batch_size, 1, seed=seed),
                       predictor=predictor, device=torch_device)
        plan = ranking.finetune_plan(model, task, method, param_budget,
                                     top_k=request if isinstance(request, int) else None,
                                     spread=spread, options=kwargs)
        method, chosen, kwargs = plan.method, plan.layers, dict(plan.options)
        info = {"ranked_by": ranking.by, "rank_seconds": ranking.seconds,
                "ranking": ranking.table[["rank", "layer", "params", "score"]].to_dict(
                    orient="records")}
        if progress is not None:
            progress({"plan": plan.to_dict()})
    elif request is not None:
        chosen = request
    tuner: Tuner = METHODS.get(method)(model, task, layers=chosen, lr=lr, seed=seed, **kwargs)
    if progress is not None:
        progress({"lr": tuner.lr, "lr_reason": tuner.lr_reason_})
    config = {"zest": {**RUN_MARKER, "zest_version": __version__},
              "model": model_spec, "dataset": dataset_spec, "method": method,
              "layers_spec": layers if isinstance(layers, str) or layers is None else
              list(layers), "layers": tuner.layer_names, "param_budget": param_budget,
              "epochs": epochs, "patience": patience, "lr": tuner.lr,
              "lr_requested": lr, "lr_reason": tuner.lr_reason_,
              "batch_size": batch_size, "seed": seed,
              "method_options": kwargs, "data": data.summary(),
              "plan": plan.to_dict() if plan is not None else None, **info}
    with staged_folder(out_dir, replaces=("run-folder",) if overwrite else ()) as staging:
        (staging / "config.json").write_text(json.dumps(config, indent=1, default=str))
        try:
            tuner.fit(data, epochs=epochs, batch_size=batch_size, progress=progress,
                      test_each_epoch=True, patience=patience)
        except NonFiniteLossError as exc:
            reason = str(exc).split(";")[0]
            raise NonFiniteLossError(f"{reason}; the run was not written and --out "
                                     f"{str(out_dir)!r} is as it was; lower the learning rate "
                                     f"(--lr {tuner.lr:g})") from None
        delta = tuner.delta()
        delta.meta.update({"dataset": dataset_spec})
        delta.save(staging / "delta.safetensors")
        best = tuner.history_[tuner.best_epoch_ - 1]
        test_loss, test_accuracy = best.test_loss, best.test_accuracy
        total_params = sum(p.numel() for p in model.parameters())
        metrics = {
            "task_kind": task.kind,
            "epochs": [record.__dict__ for record in tuner.history_],
            "best_epoch": tuner.best_epoch_, "selected_by": (
                "val loss" if task.kind == "causal_lm" else "val accuracy (ties: val loss)"),
            "stopped": tuner.stopped_,
            "val_accuracy": best.val_accuracy, "val_loss": best.val_loss,
            "test_accuracy": test_accuracy, "test_loss": test_loss,
            "trainable_params": int(tuner.trainable_params_),
            "trainable_share": tuner.trainable_params_ / total_params,
            "delta_values": int(delta.numel()),
            "peak_memory_mb": tuner.peak_memory_mb_, "wall_seconds": time.perf_counter() - start,
        }
        if task.kind == "causal_lm":
            metrics["val_perplexity"] = math.exp(best.val_loss)
            metrics["test_perplexity"] = math.exp(test_loss)
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=1))
        if plan is not None:  # what the tuner measured, beside what the plan expected
            config["plan"].update(trainable_params=metrics["trainable_params"],
                                  trainable_share=metrics["trainable_share"])
            (staging / "config.json").write_text(json.dumps(config, indent=1, default=str))
        plot_curves(metrics, staging / "curve.png",
                    title=f"{model_spec} / {dataset_spec} / {method}")
    return {**metrics, "method": method, "plan": config["plan"]}


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

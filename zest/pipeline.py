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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zest._version import __version__
from zest.data.dataset import check_positive
from zest.errors import InvalidInputError, NonFiniteLossError, naming
from zest.finetune import METHODS, Tuner
from zest.finetune.options import TunerOptions
from zest.finetune.registry import method_options
from zest.loading import DataOptions, load_pair
from zest.models import resolve_device
from zest.outputs import RUN_MARKER, check_run_folder, staged_folder
from zest.planning import AUTO, FinetunePlan, PlanRequest, PlanRule, plan_finetune
from zest.ranking import load_predictor, rank
from zest.rates import AUTO_RATE


def takes_layers(method: str) -> bool:
    """Whether a tuning method trains chosen layers (``Tuner.uses_layers``; ``auto`` always
    chooses such a method), rather than a fixed set of parameters (full, head, bitfit)."""
    return method == AUTO or bool(METHODS.get(method).uses_layers)


def parse_layers(spec: str | Sequence[str] | None) -> str | int | list[str]:
    """A ``layers`` value: ``"auto"`` (``None`` too), ``"all"``, ``K`` for ``top:K``, or the
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
            raise InvalidInputError(f"layers={spec!r}: use top:K with an integer K",
                                    parameter="layers") from None
        if k < 1:
            raise InvalidInputError(f"layers={spec!r}: K must be at least 1", parameter="layers")
        return k
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise InvalidInputError("layers is empty; pass 'auto', 'top:K', 'all' or layer names",
                                parameter="layers")
    return names


def default_method(method: str | None, param_budget: float | None) -> str:
    """The method a run trains without ``method``: ``auto`` (the measured rule of
    :data:`zest.planning.METHOD_RULES` for the budget) with a ``param_budget``, else SPSFT."""
    if method is not None:
        return method
    return AUTO if param_budget is not None else "spsft"


def parse_rate(lr: float | str) -> float | str:
    """``lr``: :data:`zest.rates.AUTO_RATE` (any case) or a number, also written as text
    (``"1e-3"``, as the CLI passes it); the tuner's options check its range."""
    if not isinstance(lr, str):
        return lr
    if lr.strip().lower() == AUTO_RATE:
        return AUTO_RATE
    try:
        return float(lr)
    except ValueError:
        raise InvalidInputError(f"lr must be a positive number or 'auto', got {lr!r}",
                                parameter="lr") from None


def _cli(help_text: str, **more: Any) -> dict[str, Any]:
    """A field's metadata: its ``zest finetune`` option (``help``; ``type`` where the CLI
    reads another type than the field's, ``flag`` where the flag is not the field's name)."""
    return {"cli": {"help": help_text, **more}}


#: A field whose option the CLI declares itself (shared with other commands: ``--model``, ...).
SHARED_OPTION = {"cli": "shared"}


@dataclass(frozen=True)
class FinetuneRequest:
    """One ``zest finetune`` run, validated once, when built, before anything is loaded or
    written; :func:`run_finetune` runs it. The CLI's options are generated from these fields
    (their ``cli`` metadata) and from the tuners' options (``method_options``).

    Args:
        model: Model spec.
        dataset: Data set spec.
        out: Run directory to write (:func:`zest.outputs.check_run_folder`).
        method: A registered method or ``auto``; ``None``: :func:`default_method`.
        layers: ``"auto"`` (rank, then plan), ``"top:K"``, ``"all"``, or layer names.
        param_budget: With ``layers="auto"``: share of the parameters to train, head included.
        spread: With a budget and a sparse method: :class:`zest.planning.PlanRule`.
        epochs: The most epochs; the model kept is the one of the best val epoch.
        lr: AdamW learning rate, or ``"auto"`` (:func:`zest.rates.default_rate`).
        patience: Early stopping after this many epochs without a better val epoch.
        batch_size: Batch size.
        method_options: Tuner options (``k``, ``ratio``, ``r``, ``importance``, ``rank``,
            ``gradient_checkpointing``, ...); a density given here is kept.
        predictor: Predictor for ``layers="auto"`` / ``"top:K"``.
        overwrite: Replace an existing zest run folder at ``out``, whole, at the end.
        seed: Seed of splits, head initialisation, batches and selection.
        options: How to load the data set (:class:`zest.loading.DataOptions`).
        device: ``cpu``, ``cuda`` or ``auto``.
        checkpoint: Weights for ``timm:<arch>`` or ``tv:<arch>``.

    Attributes:
        layer_request: ``layers`` parsed (:func:`parse_layers`; ``None`` for a method without
            layers).
        plan_request: The validated :class:`zest.planning.PlanRequest` when the layers are
            planned (``"auto"`` or ``"top:K"``), else ``None``.
        tuner_options: The trained method's validated options (``method_options``, ``lr`` and
            ``seed``); a plan adds its density.
    """

    model: str = field(metadata=SHARED_OPTION)
    dataset: str = field(metadata=SHARED_OPTION)
    out: str | os.PathLike = field(metadata=_cli("Run directory to write.", type=Path))
    method: str | None = field(default=None, metadata=_cli(
        "gps, spsft, layers, full, head, bitfit, lora, or auto (chosen by --param-budget "
        "from the accuracy benchmark's measured rule). Default: auto with --param-budget, "
        "else spsft."))
    layers: str | Sequence[str] | None = field(default="auto", metadata=_cli(
        "auto (zest rank, then the plan), top:K, all, or comma-separated layer names.",
        type=str))
    param_budget: float | None = field(default=None, metadata=_cli(
        "With --layers auto: share of the parameters to train, head included; the plan "
        "picks the layers and the density (GPS --k, SPSFT --ratio, LoRA rank) that fill "
        "it."))
    spread: float | None = field(default=None, metadata=_cli(
        "With --param-budget and a sparse method: the chosen layers hold this many times "
        "the budget, so the density is about 1/spread (default: the method's measured "
        "spread for the budget, zest.planning.SPREAD_RULES)."))
    epochs: int = field(default=3, metadata=_cli(
        "The most epochs; the model kept is the one of the best val epoch."))
    lr: float | str = field(default=AUTO_RATE, metadata=_cli(
        "AdamW learning rate, or auto: the method's measured rate for the model's kind "
        "(zest.rates.RATE_RULES).", type=str))
    patience: int | None = field(default=None, metadata=_cli(
        "Early stopping: stop once this many epochs have not improved on the best val "
        "epoch (default: train every epoch)."))
    batch_size: int = field(default=32, metadata=_cli("Batch size."))
    method_options: Mapping[str, Any] = field(default_factory=dict,
                                              metadata={"cli": "tuner options"})
    predictor: str = field(default="universal", metadata=_cli("Predictor for --layers auto."))
    overwrite: bool = field(default=False, metadata=_cli(
        "Replace an existing zest run folder at --out, whole, once the new run has "
        "finished (without it such a folder is refused)."))
    seed: int = field(default=0, metadata=SHARED_OPTION)
    options: DataOptions | None = None
    device: str = field(default="cpu", metadata=SHARED_OPTION)
    checkpoint: str | os.PathLike | None = field(default=None, metadata=SHARED_OPTION)
    layer_request: str | int | list[str] | None = field(init=False, repr=False)
    plan_request: PlanRequest | None = field(init=False, repr=False)
    tuner_options: TunerOptions = field(init=False, repr=False)

    def __post_init__(self) -> None:
        method = default_method(self.method, self.param_budget)
        options = dict(self.method_options or {})
        layers, budget = self.layers, self.param_budget
        request = parse_layers(layers) if takes_layers(method) else None
        if request is None:
            if layers not in (None, "auto"):
                shown = f"{layers!r}" if isinstance(layers, str) else "[...]"
                raise InvalidInputError(f"method={method!r} trains a fixed set of parameters; "
                                        f"drop layers={shown}", parameter=("method", "layers"))
            if budget is not None:
                raise InvalidInputError(f"method={method!r} trains a fixed set of parameters; "
                                        "drop param_budget",
                                        parameter=("method", "param_budget"))
        elif isinstance(request, int) and budget is not None:
            raise InvalidInputError(f"layers={layers!r} and param_budget={budget} contradict "
                                    "each other; pass one (a budget goes with layers='auto')",
                                    parameter=("layers", "param_budget"))
        elif request != "auto" and not isinstance(request, int):
            if budget is not None:
                raise InvalidInputError("param_budget goes with layers='auto', not with 'all' "
                                        "or layer names", parameter=("param_budget", "layers"))
            if method == AUTO:
                raise InvalidInputError("method='auto' plans from param_budget; use "
                                        "layers='auto' or name the tuner",
                                        parameter=("method", "param_budget", "layers"))
        planned = request == "auto" or isinstance(request, int)
        plan = PlanRequest(method, budget, top_k=request if isinstance(request, int) else None,
                           spread=self.spread, options=options) if planned else None
        if request is not None and not planned and self.spread is not None:
            PlanRule(spread=self.spread)  # named layers: checked, though no plan reads it
        with naming("epochs"):
            check_positive("epochs", self.epochs)
        with naming("batch_size"):
            check_positive("batch_size", self.batch_size)
        trained = plan.planned_method if plan is not None else method
        tuner_options = method_options(trained, {**options, "lr": parse_rate(self.lr),
                                                 "seed": self.seed})
        for name, value in (("method", method), ("method_options", options),
                            ("layer_request", request), ("plan_request", plan),
                            ("tuner_options", tuner_options)):
            object.__setattr__(self, name, value)


def run_finetune(request: FinetuneRequest | str, dataset: str | None = None,
                 out: str | os.PathLike | None = None, *,
                 progress: Callable[[dict], None] | None = None,
                 **fields: Any) -> dict[str, Any]:
    """Fine-tunes and writes a run directory (``zest finetune``), whole or not at all.

    ``request`` is a :class:`FinetuneRequest`; or, as before, the model spec, with the data
    set, the run directory and the request's other fields as keywords
    (``run_finetune("minilm", "r8", "run", method="gps", param_budget=0.05)``).

    With ``layers="auto"`` or ``"top:K"`` the layers are ranked on one training minibatch and
    the plan (:func:`zest.planning.plan_finetune`, on the request's validated
    :class:`~zest.planning.PlanRequest`) chooses what to train: the layers the method can tune
    and, with a ``param_budget`` (share of trainable parameters, head included), the density
    that fills it (``spread``: :class:`zest.planning.PlanRule`; ``None``, the method's measured
    one for the budget, :func:`zest.planning.spread_rule`); ``method="auto"`` also chooses the
    method (:data:`zest.planning.METHOD_RULES`), and so does no ``method`` with a
    ``param_budget`` (:func:`default_method`). ``method_options`` are tuner options (``k``,
    ``ratio``, ``r``, ``importance``, ``rank``); a density given there is kept.
    ``lr="auto"`` trains at the method's measured rate for the model's kind
    (:func:`zest.rates.default_rate`; ``config.json`` records the rate and why). ``epochs`` is
    a maximum: the model kept is the one of the best val epoch (``metrics.json``
    ``best_epoch``), and with ``patience`` training stops once that many epochs have not
    improved on it.

    The request is validated when built; the model is loaded, the layers planned and the
    tuner built before anything is written (:func:`zest.outputs.check_run_folder`: ``out``
    must be new, empty, or with ``overwrite`` a zest run folder, replaced whole); the run is
    trained into a temporary folder beside ``out`` that takes its place at the end
    (:func:`zest.outputs.staged_folder`). A run that fails (a non-finite loss, Ctrl-C, any
    error) leaves ``out`` exactly as it was and no temporary folder behind.

    Returns:
        The metrics written to ``metrics.json``, plus ``method`` (the method trained) and
        ``plan`` (the plan as ``config.json`` records it, with the measured trainable share;
        ``None`` for named layers or a method without layers). ``progress`` receives
        ``{"plan": ...}`` once the plan is made, before training.
    """
    if not isinstance(request, FinetuneRequest):
        request = FinetuneRequest(request, dataset, out, **fields)
    elif dataset is not None or out is not None or fields:
        raise InvalidInputError("a FinetuneRequest carries every setting; pass it alone",
                                parameter="request")
    out_dir = check_run_folder(request.out, "out", overwrite=request.overwrite)
    layers = request.layer_request
    if request.plan_request is not None:
        load_predictor(request.predictor)  # a bad predictor fails before the model is loaded
    torch_device = resolve_device(request.device)
    checkpoint = None if request.checkpoint is None else str(request.checkpoint)
    model, task, data = load_pair(request.model, request.dataset, options=request.options,
                                  seed=request.seed, device=str(torch_device),
                                  checkpoint=checkpoint)
    start = time.perf_counter()
    info: dict[str, Any] = {}
    method, kwargs = request.method, dict(request.method_options)
    tuner_options = request.tuner_options
    chosen: list[str] | str | None = None
    plan: FinetunePlan | None = None
    if request.plan_request is not None:
        ranking = rank(model, task, data.batches("train", request.batch_size, 1,
                                                 seed=request.seed),
                       predictor=request.predictor, device=torch_device)
        plan = plan_finetune(ranking.table["layer"].tolist(), model, task, request.plan_request)
        method, chosen, kwargs = plan.method, plan.layers, dict(plan.options)
        tuner_options = method_options(method, {**kwargs, "lr": tuner_options.lr,
                                                "seed": tuner_options.seed})
        info = {"ranked_by": ranking.by, "rank_seconds": ranking.seconds,
                "ranking": ranking.table[["rank", "layer", "params", "score"]].to_dict(
                    orient="records")}
        if progress is not None:
            progress({"plan": plan.to_dict()})
    elif layers is not None:
        chosen = layers
    tuner: Tuner = METHODS.get(method)(model, task, layers=chosen, options=tuner_options)
    if progress is not None:
        progress({"lr": tuner.lr, "lr_reason": tuner.lr_reason_})
    spec = request.layers
    config = {"zest": {**RUN_MARKER, "zest_version": __version__},
              "model": request.model, "dataset": request.dataset, "method": method,
              "layers_spec": spec if isinstance(spec, str) or spec is None else list(spec),
              "layers": tuner.layer_names, "param_budget": request.param_budget,
              "epochs": request.epochs, "patience": request.patience, "lr": tuner.lr,
              "lr_requested": tuner_options.lr, "lr_reason": tuner.lr_reason_,
              "batch_size": request.batch_size, "seed": request.seed,
              "method_options": kwargs, "data": data.summary(),
              "plan": plan.to_dict() if plan is not None else None, **info}
    with staged_folder(out_dir, replaces=("run-folder",) if request.overwrite else ()
                       ) as staging:
        (staging / "config.json").write_text(json.dumps(config, indent=1, default=str))
        try:
            tuner.fit(data, epochs=request.epochs, batch_size=request.batch_size,
                      progress=progress, test_each_epoch=True, patience=request.patience)
        except NonFiniteLossError as exc:
            reason = str(exc).split(";")[0]
            raise NonFiniteLossError(f"{reason}; the run was not written and out="
                                     f"{str(out_dir)!r} is as it was; lower the learning rate "
                                     f"(lr={tuner.lr:g})", parameter=("out", "lr")) from None
        delta = tuner.delta()
        delta.meta.update({"dataset": request.dataset})
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
                    title=f"{request.model} / {request.dataset} / {method}")
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

"""``zest.rank``: one minibatch → metrics → predictor → ranked layers (ZEST inference).

The universal predictor (or a single metric with ``by=``) scores every candidate layer; a
:class:`Ranking` then picks the top-k layers or the best layers within a parameter budget.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.stats import kendalltau
from torch import nn

from zest.errors import InvalidInputError, UnknownNameError, unknown_name_message
from zest.finetune import METHODS
from zest.frames import metrics_frame
from zest.layers import check_granularity
from zest.metrics import METRICS, get_metric
from zest.models import Batch, Task, infer_task, model_family, probe_loss_for
from zest.planning import (
    DEFAULT_TOP_K,
    FinetunePlan,
    check_selection,
    fill_budget,
    layer_tuner,
    plan_finetune,
    tunable_layers,
)
from zest.predictor import ZestRanker
from zest.records import METRIC_PREFIX

SHIPPED_PREDICTORS = ("universal",)


def shipped_predictor_path(name: str = "universal") -> Path:
    """Path of a predictor shipped inside the package (``zest/predictors/<name>.json``)."""
    return Path(str(resources.files("zest") / "predictors" / f"{name}.json"))


def load_predictor(predictor: str | os.PathLike | ZestRanker = "universal") -> ZestRanker:
    """A fitted ranker: ``"universal"`` (shipped), a JSON file path, or a ranker instance."""
    if isinstance(predictor, ZestRanker):
        return predictor
    if str(predictor) in SHIPPED_PREDICTORS:
        path = shipped_predictor_path(str(predictor))
        if not path.is_file():
            raise InvalidInputError(f"the shipped predictor {predictor!r} is missing from this "
                                    "installation; reinstall zest or pass predictor= a JSON "
                                    "file", parameter="predictor")
        return ZestRanker.load(path)
    path = Path(predictor)
    if not path.exists():
        raise InvalidInputError(f"unknown predictor={str(predictor)!r}: neither a shipped one "
                                f"({', '.join(SHIPPED_PREDICTORS)}) nor an existing file",
                                parameter="predictor")
    return ZestRanker.load(path)


@dataclass
class Ranking:
    """Layers ranked for fine-tuning, best first.

    Attributes:
        table: One row per layer: ``rank, layer, type, params, score, depth, block``, the
            metric values used, and one boolean column per tuning method that takes layers
            (``gps``, ``spsft``, ``lora``, ``layers``, ...): whether it can tune the layer
            (:func:`zest.planning.tunable_layers`).
        total_params: Parameters of the whole model (for budgets).
        by: ``predictor:<name>`` or ``metric:<name>``.
        seconds: Wall time of the probe(s) and scoring.
        stability: With several minibatches: mean pairwise Kendall τ between their rankings and
            mean top-k Jaccard overlap.
        notes: What the user should know about how far to trust the ranking (e.g. a model
            family the predictor was not trained on, layers left out).
        skipped: Candidate layers left out of the ranking, with the reason.
        task: The task the model was ranked for (inferred by ``zest.rank(model, batch)``).
    """

    table: pd.DataFrame
    total_params: int
    by: str
    seconds: float
    stability: dict[str, float] | None = None
    notes: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    task: Task | None = field(default=None, repr=False)

    def to_frame(self) -> pd.DataFrame:
        """The ranked table (a copy)."""
        return self.table.copy()

    def top(self, k: int, method: str | None = None) -> list[str]:
        """Names of the ``k`` best layers; with ``method`` (``"gps"``, ``"spsft"``, ``"lora"``,
        ...), the ``k`` best that method can tune (:meth:`for_method`), ready for its tuner.
        Without a method every ranked layer counts, as the ranking orders them (what
        ``layers``, peft on its own targets or a loop of your own can take)."""
        check_selection(k, None)
        source = self if method is None else self.for_method(method)
        if k > len(source.table):
            which = ("candidate layers" if method is None else
                     f"ranked layers method={method!r} can tune")
            raise InvalidInputError(f"k={k} exceeds the {len(source.table)} {which}; pass "
                                    "a smaller k", parameter=("k", "method"))
        return source.table["layer"].head(k).tolist()

    def default_choice(self, method: str | None = None) -> list[str]:
        """The :data:`DEFAULT_TOP_K` best layers (``method``: that it can tune; all of them
        when there are fewer)."""
        source = self if method is None else self.for_method(method)
        return source.top(min(DEFAULT_TOP_K, len(source.table)))

    def select(self, param_budget: float, method: str | None = None) -> list[str]:
        """Best layers, in rank order, whose parameters fit in ``param_budget`` (a fraction of
        the model's parameters in (0, 1]); layers too large for what is left are skipped. With
        ``method``, only layers it can tune (:meth:`for_method`); each counts its whole weight
        and bias (:meth:`finetune_plan` sizes a sparse method's density to a budget instead)."""
        check_selection(None, param_budget)
        source = self if method is None else self.for_method(method)
        allowed = param_budget * self.total_params
        chosen = fill_budget(source.table["layer"], source.table["params"], allowed)
        if not chosen:
            smallest = int(source.table["params"].min())
            which = "" if method is None else f" method={method!r} can tune"
            raise InvalidInputError(f"param_budget={param_budget} ({int(allowed)} parameters) "
                                    f"is smaller than the smallest layer{which} ({smallest}); "
                                    f"raise it to at least {smallest / self.total_params:.2g}",
                                    parameter=("param_budget", "method"))
        return chosen

    def for_method(self, method: str) -> Ranking:
        """This ranking restricted to the layers ``method`` can tune (its column of
        :attr:`table`, :func:`zest.planning.tunable_layers`), re-numbered from 1, with the same
        parameter total for budgets."""
        layer_tuner(method)  # an unknown name or a method without layers: one line
        if method not in self.table.columns:
            raise InvalidInputError(f"this ranking does not record which layers "
                                    f"method={method!r} can tune (it was made before that tuner "
                                    "was registered, or by hand); rank the model again with "
                                    "zest.rank", parameter="method")
        table = self.table[self.table[method].astype(bool)].reset_index(drop=True)
        if table.empty:
            blocks = "type" in self.table.columns and bool((self.table["type"] == "block").all())
            raise InvalidInputError(f"none of the ranked layers can be tuned by "
                                    f"method={method!r}"
                                    + (" (a tuner takes layers, not blocks: rank with "
                                       "granularity='module')" if blocks else "")
                                    + "; choose another method or name the layers",
                                    parameter=("method", "granularity"))
        table["rank"] = range(1, len(table) + 1)
        return replace(self, table=table)

    def finetune_plan(self, model: nn.Module, task: Task, method: str,
             param_budget: float | None = None, *, top_k: int | None = None,
             spread: float | None = None, options: dict[str, Any] | None = None
             ) -> FinetunePlan:
        """The fine-tuning plan for ``method`` (or ``"auto"``) on this ranking's layers: the
        best layers the method can tune and the density (GPS's ``k``, SPSFT's ``ratio``, LoRA's
        ``rank``) that fill ``param_budget``, a share of trainable parameters, head included.
        ``spread``: how many times the budget the chosen layers hold (density ≈ 1/spread;
        default: the method's measured one for the budget, :data:`zest.planning.SPREAD_RULES`).
        Without a budget: ``top_k`` (default :data:`DEFAULT_TOP_K`) layers at the method's
        density. See :func:`zest.planning.plan_finetune`; ``zest finetune --layers auto``
        trains this plan::

            plan = ranking.finetune_plan(model, task, "gps", 0.05)
            tuner = zest.METHODS.get(plan.method)(model, task, layers=plan.layers,
                                                  **plan.options)
        """
        return plan_finetune(self.table["layer"].tolist(), model, task, method, param_budget,
                             top_k=top_k, spread=spread, options=options)

    def to_lora_config(self, k: int | None = None, param_budget: float | None = None,
                       **lora_kwargs: Any):
        """A ``peft.LoraConfig`` whose ``target_modules`` are exactly the chosen layers.

        Full module names are used, so no other module whose name ends the same way is wrapped.
        Pass ``k`` (top-k) or ``param_budget`` (share of the parameters); other keyword
        arguments (``r``, ``lora_alpha``, ...) go to ``LoraConfig``.
        """
        from zest.finetune.lora import lora_config

        if (k is None) == (param_budget is None):
            raise InvalidInputError("pass exactly one of k or param_budget")
        wrappable = self.for_lora()
        chosen = wrappable.top(k) if k is not None else wrappable.select(param_budget)
        return lora_config(chosen, **lora_kwargs)

    def for_lora(self) -> Ranking:
        """This ranking restricted to the layers peft's LoRA can wrap (Linear, Embedding,
        ungrouped Conv2d; see :func:`zest.finetune.lora_can_wrap`): ``for_method("lora")``."""
        return self.for_method("lora")

    def plot(self, path: str | os.PathLike | None = None, chosen: Sequence[str] | None = None):
        """Score over depth with the chosen layers marked; saved to ``path`` if given."""
        import matplotlib

        if path is not None:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        chosen = set(chosen or self.default_choice())
        table = self.table.sort_values("depth")
        fig, ax = plt.subplots(figsize=(9, 4))
        ax.plot(table["depth"], table["score"], "-", color="0.7", zorder=1)
        marked = table["layer"].isin(chosen)
        ax.scatter(table.loc[~marked, "depth"], table.loc[~marked, "score"], s=14, c="0.4",
                   zorder=2, label="layer")
        ax.scatter(table.loc[marked, "depth"], table.loc[marked, "score"], s=40, c="tab:red",
                   zorder=3, label=f"chosen ({marked.sum()})")
        ax.set_xlabel("relative depth")
        ax.set_ylabel(f"score ({self.by})")
        ax.legend()
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
            plt.close(fig)
        return fig


def _metric_direction(name: str) -> int:
    direction = get_metric(name).direction
    return direction if direction != 0 else 1


def rank(model: nn.Module, task: Task | Batch | Sequence[Batch],
         batches: Batch | Sequence[Batch] | None = None, *,
         predictor: str | os.PathLike | ZestRanker = "universal", by: str | None = None,
         probe_loss: str | None = None, granularity: str = "module",
         layer_names: Sequence[str] | None = None, device: Any = None,
         head: str | None = None) -> Ranking:
    """Ranks the candidate layers of ``model`` for fine-tuning on the task of ``batches``:
    ``rank(model, task, batches)``, or ``rank(model, batches)`` for a model loaded without zest
    (its task inferred from the model and the first batch: :func:`zest.models.infer_task`).

    Args:
        model: The pretrained model (left unchanged).
        task: Its task adapter (:func:`zest.load_model`); or the batches, for the task to be
            inferred: a transformers ``*ForSequenceClassification`` / ``*ForCausalLM`` model
            with tokenised dicts (``labels``: classes, or a causal LM's token ids), a timm,
            torchvision or other image classifier with ``(images, labels)`` as it takes them.
        batches: One minibatch (an ``(x, y)`` tuple or a dict), or a ``list`` of minibatches
            (scores are averaged over them and the ranking's stability across them reported).
            An unlabelled batch (a bare image tensor, ``(x,)``, or a dict of tokens alone) can
            be ranked only ``by`` a label-free metric (:func:`zest.metrics.needs_labels`).
        predictor: ``"universal"``, a predictor JSON file, or a fitted :class:`ZestRanker`.
        by: Rank by this single metric (with its paper's direction) instead of the predictor.
        probe_loss: ``supcon`` or ``ce``; default: the predictor's training setting (a
            causal-LM task always probes with its next-token loss, ``ce``).
        granularity: ``module`` or ``block``.
        layer_names: Restrict to these candidates.
        device: Where to run the probe.
        head: With an inferred task: the head's module name, where its family cannot find it.

    Returns:
        A :class:`Ranking` (its ``task``: the one given or inferred).
    """
    check_granularity(granularity)
    inferred = not isinstance(task, Task)
    if inferred:
        if batches is not None:
            raise InvalidInputError(f"the second argument must be a zest Task when batches "
                                    f"follow it, got {type(task).__name__}; pass "
                                    "zest.rank(model, batch) to infer the task, or "
                                    "zest.rank(model, task, batch)")
        batches = task
    elif batches is None:
        raise InvalidInputError("no minibatch to rank on; pass zest.rank(model, task, batch)")
    elif head is not None:
        raise InvalidInputError("head= names the head of a model ranked without a Task; the "
                                f"Task names its own ({task.head_name!r})")
    batch_list = list(batches) if isinstance(batches, list) else [batches]
    if (len(batch_list) == 2 and all(isinstance(b, torch.Tensor) for b in batch_list)
            and batch_list[0].ndim >= 2 and batch_list[1].ndim == 1):
        batch_list = [tuple(batch_list)]  # an [images, labels] pair, not two batches
    if not batch_list:
        raise InvalidInputError("no minibatch to rank on; pass at least one batch")
    start = time.perf_counter()
    if inferred:
        task = infer_task(model, batch_list[0], head=head)
    if by is not None:
        if by not in METRICS:
            raise UnknownNameError(unknown_name_message("metric for by", by, METRICS.names()),
                                   parameter="by")
        ranker, names, label = None, [by], f"metric:{by}"
        trained_loss = "supcon"
    else:
        ranker = load_predictor(predictor)
        names = [m[len(METRIC_PREFIX):] for m in ranker.metrics_]
        label = f"predictor:{predictor if isinstance(predictor, str) else 'custom'}"
        trained_loss = (getattr(ranker, "info_", {}).get("probe", {}) or {}).get(
            "probe_loss", "supcon")
    loss = probe_loss_for(task.kind, probe_loss, trained_loss)
    skipped: dict[str, str] = {}
    frame = metrics_frame(model, task, batch_list, metrics=names, probe_loss=loss,
                          layer_names=layer_names, granularity=granularity, device=device,
                          metrics_reader=None if by is not None else "the predictor",
                          skipped=skipped)
    frame["modality"] = task.modality
    per_batch = []
    for _, part in frame.groupby("batch", sort=True):
        part = part.reset_index(drop=True).assign(group="__inference__")
        if ranker is not None:
            scores = ranker.predict(part)
        else:
            scores = _metric_direction(by) * part[METRIC_PREFIX + by].to_numpy(dtype=float)
        per_batch.append(pd.Series(scores, index=part["layer"]))
    scores = pd.concat(per_batch, axis=1).mean(axis=1)
    first = frame[frame["batch"] == frame["batch"].min()].set_index("layer")
    table = pd.DataFrame({"layer": scores.index, "type": first.loc[scores.index, "layer_type"],
                          "params": first.loc[scores.index, "n_params"].astype(int),
                          "score": scores.to_numpy(), "depth": first.loc[scores.index, "depth"],
                          "block": first.loc[scores.index, "block"]}).reset_index(drop=True)
    for name in names:
        table[name] = first.loc[table["layer"], METRIC_PREFIX + name].to_numpy()
    for method in METHODS.names():  # which layers each tuner can take (Ranking.for_method)
        if METHODS.get(method).uses_layers:
            table[method] = table["layer"].isin(tunable_layers(method, model, table["layer"]))
    table = table.sort_values("score", ascending=False, kind="stable", na_position="last")
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    table = table.reset_index(drop=True)
    total = sum(p.numel() for p in model.parameters())
    stability = _stability(per_batch) if len(per_batch) > 1 else None
    family = getattr(getattr(model, "config", None), "model_type", None) if inferred else None
    notes = [note] if ranker is not None and (
        note := unseen_family_note(ranker, task, family)) else []
    if ranker is not None and loss != trained_loss:
        notes.append(f"the predictor learned from {trained_loss} probes and this ranking probed "
                     f"with {loss}" + (" (a causal-LM task probes with its next-token loss)"
                                       if task.kind == "causal_lm" else "")
                     + ", so treat it as an estimate")
    if skipped:
        shown = "; ".join(f"{name}: {reason}" for name, reason in list(skipped.items())[:3])
        more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        notes.append(f"{len(skipped)} candidate layer{'s' if len(skipped) > 1 else ''} left out "
                     f"of the ranking ({shown}{more})")
    return Ranking(table=table, total_params=int(total), by=label,
                   seconds=time.perf_counter() - start, stability=stability,
                   notes=notes, skipped=skipped, task=task)


def unseen_family_note(ranker: ZestRanker, task: Task, family: str | None = None) -> str | None:
    """One line when ``task``'s model family (``family``, default :func:`model_family` of its
    spec; a transformers model loaded without zest passes its ``model_type``) is not among
    those the predictor was trained on, with the predictor's measured leave-one-family-out
    Kendall τ (how well it ranked families it had not seen); ``None`` when the family was seen
    or the predictor does not record its families."""
    info = getattr(ranker, "info_", {}) or {}
    families = info.get("families")
    if not families:
        return None
    family = family or model_family(task.spec)
    if family in families:
        return None
    per_family = (info.get("cv") or {}).get("lofo_per_family") or {}
    if per_family:
        values = list(per_family.values())
        measured = (f"on families held out of its training it reached a mean Kendall τ of "
                    f"{np.mean(values):.2f} (from {min(values):.2f} to {max(values):.2f})")
    else:
        measured = "its accuracy on an unseen family was not measured"
    return (f"the predictor has not seen the {family} family (trained on "
            f"{', '.join(families)}); {measured}, so treat this ranking as an estimate")


def _stability(per_batch: list[pd.Series], k: int = 5) -> dict[str, float]:
    taus, jaccards = [], []
    for a, b in itertools.combinations(per_batch, 2):
        taus.append(kendalltau(a.to_numpy(), b.loc[a.index].to_numpy()).statistic)
        top_a = set(a.sort_values(ascending=False).index[:k])
        top_b = set(b.sort_values(ascending=False).index[:k])
        jaccards.append(len(top_a & top_b) / len(top_a | top_b))
    return {"kendall_tau": float(np.nanmean(taus)), f"top{k}_jaccard": float(np.mean(jaccards)),
            "batches": len(per_batch)}

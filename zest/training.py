"""Training and evaluating the universal predictor from committed records (issue 5).

``train_predictor`` fits a :class:`~zest.predictor.ZestRanker` on every group that has both
metric and ground-truth records and stores, in the same JSON file, its leave-one-group-out
cross-validation summary. ``evaluate_predictor`` re-fits the predictor's configuration on each
held-out split and writes the report (markdown, JSON, PNG).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import kendalltau

from zest.errors import InvalidInputError, RecordError
from zest.evaluation import (
    SCHEMES,
    evaluate,
    markdown_report,
    plot_summary,
    predictor_metrics,
    summarise,
)
from zest.models import model_family
from zest.outputs import check_output_dir, check_output_file, staged_file
from zest.predictor import ZestRanker
from zest.predictor_features import (
    TARGETS,
    blend_with_prior,
    join_records,
    require_metric_columns,
)
from zest.predictor_file import check_predictor_out
from zest.ranking import load_predictor
from zest.records import METRIC_PREFIX, read_records


def load_corpus(records: str | os.PathLike, min_seeds: int = 1
                ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Metric and ground-truth records under ``records/metrics`` and ``records/groundtruth``,
    keeping the groups whose ground truth is complete (see :func:`incomplete_groups`)."""
    records = Path(records)
    for kind in ("metrics", "groundtruth"):
        if not (records / kind).is_dir():
            raise RecordError(f"{str(records / kind)!r} does not exist; pass records, the "
                              "folder that holds metrics/ and groundtruth/", parameter="records")
    metrics = read_records(records / "metrics", "metrics")
    groundtruth = read_records(records / "groundtruth", "groundtruth")
    partial = incomplete_groups(metrics, groundtruth, min_seeds)
    return (metrics[~metrics["group"].isin(partial)].reset_index(drop=True),
            groundtruth[~groundtruth["group"].isin(partial)].reset_index(drop=True))


def incomplete_groups(metrics: pd.DataFrame, groundtruth: pd.DataFrame, min_seeds: int = 1
                      ) -> list[str]:
    """Groups in which some layer with metrics has ground truth from fewer than ``min_seeds``
    seeds (a collection still running): a predictor trained or judged on them would see a
    partial group, and their seed-to-seed noise ceiling would be missing. A group collected on
    a sample of its layers (``gt_layer_sample``) needs only the sampled layers, all of them."""
    if min_seeds < 1:
        raise InvalidInputError(f"min_seeds must be at least 1, got {min_seeds}",
                                parameter="min_seeds")
    seeds = groundtruth.groupby(["group", "layer"])["gt_seed"].nunique()
    sample_sizes = (groundtruth.groupby("group")["gt_layer_sample"].max().dropna()
                    if "gt_layer_sample" in groundtruth else pd.Series(dtype=float))
    partial = []
    for group, layers in metrics.groupby("group")["layer"]:
        if group in sample_sizes.index:
            counts = seeds.loc[group]
            complete = len(counts) >= int(sample_sizes[group]) and int(counts.min()) >= min_seeds
        else:
            counts = seeds.reindex([(group, layer) for layer in layers.unique()], fill_value=0)
            complete = int(counts.min()) >= min_seeds
        if not complete:
            partial.append(str(group))
    return sorted(partial)


#: The prior weights :func:`choose_prior_blend` tries (0 = the ranker alone).
PRIOR_BLEND_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def choose_prior_blend(table: pd.DataFrame, y: Sequence[float], metrics: Sequence[str],
                       params: dict[str, Any], grid: Sequence[float] = PRIOR_BLEND_GRID
                       ) -> float:
    """The prior weight (``ZestRanker.prior_blend``) that ranks best on the training groups'
    own leave-one-family-out: a ranker is fitted without each training family in turn, and
    each weight of ``grid`` scored by the mean Kendall τ of its blend over the left-out
    family's groups (ties: the smaller weight). With one family it falls back to
    leave-one-group-out. Nothing of a group the result is later judged on is read (issue 33).
    """
    y = np.asarray(y, dtype=float)
    families = table["model"].map(model_family).to_numpy()
    held_out = families if len(set(families)) >= 2 else table["group"].to_numpy()
    scores = {weight: [] for weight in grid}
    base = {**params, "prior_blend": 0.0}
    for value in pd.unique(held_out):
        inside = held_out != value
        if len(set(table.loc[inside, "group"])) < 1:
            continue
        ranker = ZestRanker(**base).fit(table[inside], y[inside], metrics)
        test = table[~inside]
        own = ranker.predict_ranker(test)
        prior = test[METRIC_PREFIX + ranker.prior_metric].to_numpy(dtype=float)
        for weight in grid:
            blended = blend_with_prior(own, prior, test["group"], weight)
            for group in pd.unique(test["group"]):
                rows = (test["group"] == group).to_numpy()
                scores[weight].append(kendalltau(blended[rows], y[~inside][rows]).statistic)
    means = {weight: float(np.nanmean(taus)) if taus else -np.inf
             for weight, taus in scores.items()}
    return float(max(grid, key=lambda weight: (round(means[weight], 6), -weight)))


class BlendChoosingRanker:
    """A :class:`~zest.predictor.ZestRanker` recipe whose ``prior_blend`` is chosen at fit time
    by :func:`choose_prior_blend` on the training groups only; ``fit`` returns the fitted
    ``ZestRanker`` (so the held-out schemes of :func:`~zest.evaluation.evaluate` judge the
    choice too)."""

    def __init__(self, grid: Sequence[float] = PRIOR_BLEND_GRID, **params: Any) -> None:
        self.grid = tuple(grid)
        self.params = params

    def fit(self, table: pd.DataFrame, y: Sequence[float], metrics: Sequence[str]
            ) -> ZestRanker:
        weight = choose_prior_blend(table, y, metrics, self.params, self.grid)
        return ZestRanker(**{**self.params, "prior_blend": weight}).fit(table, y, metrics)


def train_predictor(records: str | os.PathLike, out: str | os.PathLike, *,
                    backend: str = "lightgbm", target: str = "gt_loss_gain",
                    normalization: str = "rank", seed: int = 0, min_seeds: int = 2,
                    features: Sequence[str] | None = None, **ranker_params: Any
                    ) -> tuple[ZestRanker, dict]:
    """Fits the predictor on every complete group (ground truth from at least ``min_seeds``
    seeds for every layer) and saves it with its LOGO summary.

    Args:
        features: Metric names to learn from (default: :func:`~zest.evaluation.predictor_metrics`,
            every metric but the peer-only selectors).
        ranker_params: Other :class:`~zest.predictor.ZestRanker` parameters (``use_roles``,
            ``use_modality``, LightGBM settings).
    """
    check_predictor_out(out)
    features = list(features) if features is not None else predictor_metrics()
    if not features:
        raise InvalidInputError("features names no metric; pass metric names, or leave it "
                                "out for every predictor metric", parameter="features")
    if target not in TARGETS:
        raise InvalidInputError(f"unknown target={target!r}; use one of {', '.join(TARGETS)}",
                                parameter="target")
    metrics, groundtruth = load_corpus(records, min_seeds)
    if metrics.empty:
        raise RecordError(f"no group under {str(records)!r} has ground truth from {min_seeds} "
                          "seeds for every layer; finish the collection or lower min_seeds",
                          parameter="min_seeds")
    table = join_records(metrics, groundtruth, target)
    metric_cols = [METRIC_PREFIX + name for name in features]
    require_metric_columns(table, metric_cols, "recollect them with `zest collect grid` or "
                           "pass features without them", parameter="features")
    check_training_groups(table, metric_cols)
    unknown = sorted(set(ranker_params) - set(ZestRanker().get_params()))
    if unknown:
        raise InvalidInputError(f"unknown predictor parameters {unknown}; known: "
                                f"{', '.join(ZestRanker().get_params())}")
    template = ZestRanker(backend=backend, normalization=normalization, random_state=seed,
                          **ranker_params)
    template._validate()  # noqa: SLF001 - fail before the CV
    groups = table["group"].nunique()  # at least 2: check_training_groups
    families = sorted({model_family(m) for m in table["model"].unique()})
    schemes = ("logo", "lofo") if len(families) >= 2 else ("logo",)
    results = evaluate(metrics, groundtruth, target=target, schemes=schemes,
                       make_ranker=lambda: ZestRanker(**template.get_params()),
                       features=features)
    mean = summarise(results)
    cv: dict[str, Any] = {}
    for scheme in schemes:
        row = mean[(mean["scheme"] == scheme) & (mean["method"] == "predictor")].iloc[0]
        cv[scheme] = {m: float(row[m]) for m in ("kendall", "spearman", "ndcg", "recall")}
    summary = cv["logo"]
    cv["groups"] = int(groups)
    if "lofo" in cv:
        own = results[(results["scheme"] == "lofo") & (results["method"] == "predictor")]
        cv["lofo_per_family"] = {str(k): float(v) for k, v in
                                 own.groupby("fold")["kendall"].mean().items()}
    ranker = ZestRanker(**template.get_params()).fit(table, table[target].to_numpy(),
                                                         metric_cols)
    probe = {"probe_loss": str(metrics["probe_loss"].iloc[0]) if "probe_loss" in metrics
             else "supcon",
             "batch_size": int(metrics["batch_size"].iloc[0]) if "batch_size" in metrics
             else None,
             "batches_per_group": int(metrics["batch"].nunique()) if "batch" in metrics else 1}
    ranker.save(out, target=target, probe=probe, cv=cv,
                groups=sorted(table["group"].unique().tolist()), families=families)
    return ranker, summary


def check_training_groups(table: pd.DataFrame, metric_cols: Sequence[str]) -> None:
    """Refuses a joined table (:func:`~zest.predictor.join_records`) no predictor can be
    learned from: fewer than two complete groups (a ranker learns how layers compare across
    groups; its cross-validation needs one to hold out), or a group in which a metric column
    has no value at all (records collected with other metrics than the rest)."""
    groups = sorted(table["group"].unique().tolist())
    if len(groups) < 2:
        raise RecordError(f"training a predictor needs at least 2 complete groups, the records "
                          f"hold {len(groups)} ({', '.join(map(repr, groups))}); collect more "
                          "groups or lower min_seeds", parameter="min_seeds")
    absent = table[["group", *metric_cols]].groupby("group")[list(metric_cols)].count() == 0
    if absent.to_numpy().any():
        group, column = absent.stack()[absent.stack()].index[0]
        raise RecordError(f"group {group!r} has no values in the metric column {column!r} "
                          "that other groups have (collected with other metrics); recollect "
                          "it with `zest collect metrics --metrics all` or pass features "
                          "without that metric", parameter="features")


def evaluate_predictor(predictor: str | os.PathLike, records: str | os.PathLike,
                       out_dir: str | os.PathLike, *, report: str | os.PathLike | None = None,
                       schemes: Sequence[str] = SCHEMES, target: str | None = None,
                       min_seeds: int = 2) -> list[str]:
    """Writes ``report.md``, ``results.json`` and ``<scheme>.png`` to ``out_dir``, holding out
    each complete group (ground truth from at least ``min_seeds`` seeds for every layer)."""
    out_dir = check_output_dir(out_dir, "out_dir")
    if report is not None:
        check_output_file(report, "report", (".md",), kind="report")
    ranker = load_predictor(predictor)
    schemes = list(schemes) or list(SCHEMES)
    unknown = [s for s in schemes if s not in SCHEMES]
    if unknown:
        raise InvalidInputError(f"unknown schemes {unknown}; use {', '.join(SCHEMES)}")
    for name, kind in [("report.md", "report"), ("results.json", "evaluation"),
                       *((f"{scheme}.png", "plot") for scheme in schemes)]:
        check_output_file(out_dir / name, "out_dir", kind=kind)
    target = target or getattr(ranker, "info_", {}).get("target", "gt_loss_gain")
    metrics, groundtruth = load_corpus(records, min_seeds)
    params = ranker.get_params()
    results = evaluate(metrics, groundtruth, target=target, schemes=schemes,
                       make_ranker=lambda: ZestRanker(**params),
                       features=[m[len(METRIC_PREFIX):] for m in ranker.metrics_])
    if results.empty:
        raise RecordError("no held-out split could be formed; the records need at least two "
                          "groups (and both modalities for cross_modality)")
    text = markdown_report(results, target, title=f"Evaluation of {predictor}")
    with staged_file(out_dir / "report.md") as staging:
        staging.write_text(text)
    with staged_file(out_dir / "results.json") as staging:
        staging.write_text(json.dumps(
            {"target": target, "predictor": str(predictor), "params": params,
             "summary": summarise(results).to_dict(orient="records"),
             "per_group": results.to_dict(orient="records")}, indent=1, default=str))
    for scheme in results["scheme"].unique():
        with staged_file(out_dir / f"{scheme}.png") as staging:
            plot_summary(results, str(staging), scheme=scheme)
    if report is not None:
        with staged_file(report) as staging:
            staging.write_text(text)
    lines = []
    summary = summarise(results)
    for scheme in results["scheme"].unique():
        part = summary[summary["scheme"] == scheme].reset_index(drop=True)
        row = part[part["method"] == "predictor"].iloc[0]
        position = int(part.index[part["method"] == "predictor"][0]) + 1
        lines.append(f"{scheme:15s} predictor Kendall τ {row['kendall']:.3f}, top-5 recall "
                     f"{row['recall']:.3f} (rank {position} of {len(part)} methods)")
    lines.append(f"report: {out_dir / 'report.md'}")
    return lines

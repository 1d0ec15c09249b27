"""Honest evaluation of layer rankings against the ground truth (ARCHITECTURE.md §3b, issue 5).

Held-out schemes: leave-one-group-out (``logo``), leave-one-dataset-out (``lodo``),
leave-one-model-out (``lomo``), leave-one-family-out (``lofo``: every model of an architecture
family held out at once, :func:`zest.models.model_family`) and cross-modality (train on vision,
test on text, and the reverse). For each held-out group: Kendall τ, Spearman ρ, NDCG@k and
top-k recall of the predictor and, side by side, of every single metric (its sign chosen on the
training folds only), of the peer selectors with their papers' fixed directions, of random,
first-k and last-k choices, and the ground truth's own seed-to-seed τ (the noise ceiling).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import kendalltau, spearmanr

from zest.errors import InvalidInputError
from zest.metrics import get_metric, metric_names
from zest.models import model_family
from zest.predictor import ZestRanker
from zest.predictor_features import join_records, require_metric_columns
from zest.records import METRIC_PREFIX, metric_columns

SCHEMES = ("logo", "lodo", "lomo", "lofo", "cross_modality")
RANDOM_DRAWS = 50
#: Peer layer selectors, ranked with the direction their paper tunes (registered with the metric).
PEER_SELECTORS = ("rgn", "kappa", "fim_score", "repr_shift", "class_separation")


#: Metrics left out of the predictor's default features because they cost more than they add:
#: ``grasp`` alone needs the Hessian-vector pass (about 0.7× a forward+backward pass on
#: efficientnet_lite0), and the predictor trained without it scored the same on the complete
#: corpus (leave-one-group-out Kendall τ 0.771 with and without; predictor_training/README.md).
COSTLY_METRICS = ("grasp",)


def predictor_metrics() -> list[str]:
    """The metrics the universal predictor reads by default: every registered metric except
    the peer-only selectors and :data:`COSTLY_METRICS`. Both are evaluated beside it, but as
    features they would make every ``zest rank`` pay for them (``fim_score`` needs per-example
    gradients, about 4× a forward+backward pass on efficientnet_lite0; ``repr_shift`` exists
    only inside blocks)."""
    return [name for name in metric_names()
            if (name not in PEER_SELECTORS or name == "rgn") and name not in COSTLY_METRICS]


def ndcg_at_k(scores: np.ndarray, truth: np.ndarray, k: int) -> float:
    """NDCG@k of ranking by ``scores`` with gains ``truth − min(truth)`` (non-negative)."""
    gains = truth - truth.min()
    if gains.max() <= 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")[:k]
    ideal = np.sort(gains)[::-1][:k]
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = float((gains[order] * discounts[:len(order)]).sum())
    return dcg / float((ideal * discounts[:len(ideal)]).sum())


def top_k_recall(scores: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Share of the true top-k layers among the predicted top-k."""
    k = min(k, len(truth))
    predicted = set(np.argsort(-scores, kind="stable")[:k])
    actual = set(np.argsort(-truth, kind="stable")[:k])
    return len(predicted & actual) / k


def ranking_quality(scores: np.ndarray, truth: np.ndarray, k: int = 5) -> dict[str, float]:
    """Kendall τ, Spearman ρ, NDCG@k and top-k recall of ``scores`` against ``truth``."""
    scores = np.asarray(scores, dtype=float)
    truth = np.asarray(truth, dtype=float)
    valid = ~np.isnan(scores)
    if valid.sum() < 2:
        return {"kendall": float("nan"), "spearman": float("nan"), "ndcg": float("nan"),
                "recall": float("nan")}
    filled = np.where(valid, scores, np.nanmin(scores) - 1)  # n/a layers rank last
    if np.ptp(filled) == 0:  # a method that cannot tell the layers apart ranks none of them
        return {"kendall": float("nan"), "spearman": float("nan"), "ndcg": float("nan"),
                "recall": float("nan")}
    return {"kendall": float(kendalltau(filled, truth).statistic),
            "spearman": float(spearmanr(filled, truth).statistic),
            "ndcg": ndcg_at_k(filled, truth, k), "recall": top_k_recall(filled, truth, k)}


def noise_ceiling(groundtruth: pd.DataFrame, target: str) -> dict[str, float]:
    """Per group: mean Kendall τ of ``target`` over layers between every pair of seeds."""
    result = {}
    for group, frame in groundtruth.groupby("group"):
        table = frame.pivot_table(index="layer", columns="gt_seed", values=target)
        taus = []
        for a, b in itertools.combinations(table.columns, 2):
            both = table[[a, b]].dropna()  # layers collected for both seeds
            if len(both) >= 3:
                taus.append(kendalltau(both[a], both[b]).statistic)
        result[group] = float(np.nanmean(taus)) if taus else float("nan")
    return result


@dataclass
class Fold:
    """One held-out split."""

    scheme: str
    name: str
    train_groups: list[str]
    test_groups: list[str]


def folds(table: pd.DataFrame, scheme: str) -> Iterator[Fold]:
    """The held-out splits of a scheme over the groups of ``table``."""
    groups = table.drop_duplicates("group").set_index("group")
    if scheme == "logo":
        for group in groups.index:
            yield Fold(scheme, group, [g for g in groups.index if g != group], [group])
    elif scheme in ("lodo", "lomo", "lofo"):
        column = {"lodo": "dataset", "lomo": "model", "lofo": "family"}[scheme]
        if column == "family":
            groups = groups.assign(family=groups["model"].map(model_family))
        for value, members in groups.groupby(column):
            test = list(members.index)
            train = [g for g in groups.index if g not in test]
            if train:
                yield Fold(scheme, str(value), train, test)
    elif scheme == "cross_modality":
        for train_modality, test_modality in (("image", "text"), ("text", "image")):
            train = list(groups.index[groups["modality"] == train_modality])
            test = list(groups.index[groups["modality"] == test_modality])
            if train and test:
                yield Fold(scheme, f"{train_modality}->{test_modality}", train, test)
    else:
        raise InvalidInputError(f"unknown scheme {scheme!r}; use one of {', '.join(SCHEMES)}")


def evaluate(metrics: pd.DataFrame, groundtruth: pd.DataFrame, *, target: str = "gt_loss_gain",
             schemes: Sequence[str] = SCHEMES, make_ranker: Callable[[], ZestRanker] = ZestRanker,
             k: int = 5, seed: int = 0,
             extra_methods: dict[str, Callable[[pd.DataFrame], np.ndarray]] | None = None,
             features: Sequence[str] | None = None) -> pd.DataFrame:
    """Every method on every held-out group of every scheme.

    Args:
        features: Metric names the predictor is fitted on (default: every metric in the
            records); single metrics are always all evaluated.

    Returns:
        One row per (scheme, fold, group, method) with ``kendall, spearman, ndcg, recall``.
    """
    table = join_records(metrics, groundtruth, target)
    metric_cols = metric_columns(table)
    feature_cols = metric_cols if features is None else [METRIC_PREFIX + f for f in features]
    require_metric_columns(table, feature_cols, "recollect them with `zest collect grid` or "
                           "drop them from the features")
    ceilings = noise_ceiling(groundtruth, target)
    both = {t: noise_ceiling(groundtruth, t) for t in ("gt_gain", "gt_loss_gain")
            if t in groundtruth}
    rows = []
    for scheme in schemes:
        for fold in folds(table, scheme):
            train = table[table["group"].isin(fold.train_groups)]
            ranker = make_ranker().fit(train, train[target].to_numpy(), feature_cols)
            signs = metric_signs(train, metric_cols, target)
            for group in fold.test_groups:
                test = table[table["group"] == group].reset_index(drop=True)
                truth = test[target].to_numpy(dtype=float)
                methods = {"predictor": ranker.predict(test)}
                for column in metric_cols:
                    methods[column[len(METRIC_PREFIX):]] = signs[column] * \
                        test[column].to_numpy(dtype=float)
                for name in PEER_SELECTORS:
                    column = METRIC_PREFIX + name
                    if column in test and test[column].notna().any():
                        methods[f"{name} (paper direction)"] = get_metric(name).direction * \
                            test[column].to_numpy(dtype=float)
                methods["first_k"] = -test["depth"].to_numpy(dtype=float)
                methods["last_k"] = test["depth"].to_numpy(dtype=float)
                for name, function in (extra_methods or {}).items():
                    methods[name] = function(test)
                base = {"scheme": scheme, "fold": fold.name, "group": group,
                        "n_layers": len(test), "noise_ceiling": ceilings.get(group, np.nan),
                        **{f"noise_ceiling_{t}": c.get(group, np.nan) for t, c in both.items()}}
                for name, scores in methods.items():
                    rows.append({**base, "method": name, **ranking_quality(scores, truth, k)})
                rng = np.random.default_rng(seed)
                draws = [ranking_quality(rng.permutation(len(truth)).astype(float), truth, k)
                         for _ in range(RANDOM_DRAWS)]
                rows.append({**base, "method": "random",
                             **{m: float(np.mean([d[m] for d in draws])) for m in draws[0]}})
    return pd.DataFrame(rows)


def metric_signs(train: pd.DataFrame, metric_cols: Sequence[str], target: str
                 ) -> dict[str, float]:
    """+1 or −1 per metric: the sign of its mean within-group Kendall τ with the target on the
    training groups only."""
    signs = {}
    for column in metric_cols:
        taus = []
        for _, frame in train.groupby("group"):
            values = frame[column].to_numpy(dtype=float)
            if np.isnan(values).all() or np.nanstd(values) == 0:
                continue
            taus.append(kendalltau(np.nan_to_num(values, nan=np.nanmin(values)),
                                   frame[target]).statistic)
        mean = float(np.nanmean(taus)) if taus else 0.0
        signs[column] = 1.0 if mean >= 0 else -1.0
    return signs


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """Mean over held-out groups per (scheme, method), sorted by Kendall τ."""
    summary = results.groupby(["scheme", "method"])[["kendall", "spearman", "ndcg", "recall"]] \
        .mean().reset_index()
    return summary.sort_values(["scheme", "kendall"], ascending=[True, False])


def markdown_report(results: pd.DataFrame, target: str, title: str = "Predictor evaluation"
                    ) -> str:
    """A markdown report: per-scheme summary tables and the per-group LOGO table."""
    lines = [f"# {title}", "", f"Target: `{target}` (averaged over ground-truth seeds). "
             "Single metrics use the sign that fits the training folds; "
             "`(paper direction)` rows use the source paper's fixed direction; `random` is the "
             f"mean of {RANDOM_DRAWS} random orders. Noise ceiling: mean seed-to-seed Kendall τ "
             "of the ground truth itself.", ""]
    summary = summarise(results)
    ceilings = results.drop_duplicates("group").set_index("group")["noise_ceiling"]
    for scheme in summary["scheme"].unique():
        part = summary[summary["scheme"] == scheme]
        groups = results.loc[results["scheme"] == scheme, "group"].unique()
        lines += [f"## {scheme} (mean over {len(groups)} held-out groups; noise ceiling "
                  f"{ceilings.loc[groups].mean():.3f})", "",
                  "| method | Kendall τ | Spearman ρ | NDCG@5 | top-5 recall |",
                  "|---|---|---|---|---|"]
        for _, row in part.iterrows():
            lines.append(f"| {row['method']} | {row['kendall']:.3f} | {row['spearman']:.3f} | "
                         f"{row['ndcg']:.3f} | {row['recall']:.3f} |")
        lines += ["", where_beaten(results[results["scheme"] == scheme], scheme), ""]
    lofo = results[results["scheme"] == "lofo"]
    if not lofo.empty:
        pivot = _sorted_pivot(lofo, "fold")
        lines += ["## Per held-out family (lofo): mean Kendall τ over the family's groups", "",
                  "| method | " + " | ".join(pivot.columns) + " | mean |",
                  "|---|" + "---|" * (len(pivot.columns) + 1)]
        for method, row in pivot.head(15).iterrows():
            lines.append(f"| {method} | " + " | ".join(f"{v:.3f}" for v in row) +
                         f" | {row.mean():.3f} |")
        lines.append("")
    logo = results[results["scheme"] == "logo"]
    if not logo.empty:
        pivot = _sorted_pivot(logo, "group")
        lines += ["## Per held-out group (logo): Kendall τ", "",
                  "| method | " + " | ".join(pivot.columns) + " |",
                  "|---|" + "---|" * len(pivot.columns),
                  "| *noise ceiling* | " + " | ".join(f"{ceilings[g]:.3f}"
                                                     for g in pivot.columns) + " |"]
        for other in ("gt_gain", "gt_loss_gain"):
            column = f"noise_ceiling_{other}"
            if other != target and column in logo:
                values = logo.drop_duplicates("group").set_index("group")[column]
                lines.append(f"| *noise ceiling of {other}* | " + " | ".join(
                    f"{values[g]:.3f}" for g in pivot.columns) + " |")
        for method, row in pivot.iterrows():
            lines.append(f"| {method} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
        lines.append("")
    return "\n".join(lines)


def _sorted_pivot(results: pd.DataFrame, column: str) -> pd.DataFrame:
    """Kendall τ per method (rows, best mean first) and ``column`` value (columns)."""
    pivot = results.pivot_table(index="method", columns=column, values="kendall")
    return pivot.loc[pivot.mean(axis=1).sort_values(ascending=False).index]


def where_beaten(results: pd.DataFrame, scheme: str) -> str:
    """One sentence naming, per held-out group, the methods (peer selectors first) whose
    Kendall τ beats the predictor's, or saying that none does."""
    predictor = results[results["method"] == "predictor"].set_index("group")["kendall"]
    peers = {name for name in PEER_SELECTORS} | {f"{name} (paper direction)"
                                                 for name in PEER_SELECTORS}
    beaten = []
    for group, own in predictor.items():
        others = results[(results["group"] == group) & (results["method"] != "predictor")
                         & (results["kendall"] > own)]
        if others.empty:
            continue
        others = others.sort_values("kendall", ascending=False)
        names = [f"{m} {t:.3f}" for m, t in zip(others["method"], others["kendall"],
                                                strict=True)]
        peer_names = [n for n, m in zip(names, others["method"], strict=True) if m in peers]
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        peer_note = f" (peer selectors among them: {', '.join(peer_names)})" if peer_names \
            else ""
        beaten.append(f"{group}: predictor {own:.3f} < {shown}{peer_note}")
    if not beaten:
        return f"No single metric, peer selector or baseline beats the predictor's Kendall τ on " \
               f"any held-out group ({scheme})."
    return f"Held-out groups where other methods beat the predictor ({scheme}, Kendall τ): " + \
        "; ".join(beaten) + "."


def plot_summary(results: pd.DataFrame, path: str, scheme: str = "logo", top: int = 12) -> None:
    """Bar plot of mean Kendall τ per method for one scheme, with the noise ceiling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    part = summarise(results[results["scheme"] == scheme])
    keep = part.head(top)
    extra = part[part["method"].isin(["random", "first_k", "last_k"])]
    keep = pd.concat([keep, extra]).drop_duplicates("method")
    ceiling = results.loc[results["scheme"] == scheme].drop_duplicates("group")[
        "noise_ceiling"].mean()
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(keep) + 1.5))
    colors = ["tab:red" if m == "predictor" else "tab:gray" for m in keep["method"]]
    ax.barh(keep["method"], keep["kendall"], color=colors)
    ax.axvline(ceiling, color="k", linestyle="--", label=f"noise ceiling {ceiling:.2f}")
    ax.axvline(0, color="k", linewidth=0.5)
    ax.invert_yaxis()
    ax.set_xlabel(f"mean Kendall τ over held-out groups ({scheme})")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def groundtruth_summary(groundtruth: pd.DataFrame) -> pd.DataFrame:
    """Per group: head-only accuracy, best one-layer gain, spread of gains, seed-to-seed τ of
    ``gt_gain`` and ``gt_loss_gain`` (the noise ceilings), layers, seeds and CPU time."""
    tau_gain = noise_ceiling(groundtruth, "gt_gain")
    tau_loss = noise_ceiling(groundtruth, "gt_loss_gain")
    rows = []
    for group, frame in groundtruth.groupby("group"):
        per_layer = frame.groupby("layer")[["gt_gain", "gt_loss_gain"]].mean()
        rows.append({
            "group": group, "layers": frame["layer"].nunique(), "rows": len(frame),
            "seeds": frame["gt_seed"].nunique(),
            "head_only_accuracy": float(frame.groupby("gt_seed")["gt_baseline"].first().mean()),
            "best_gain": float(per_layer["gt_gain"].max()),
            "best_layer": str(per_layer["gt_gain"].idxmax()),
            "gain_std": float(per_layer["gt_gain"].std()),
            "gain_min": float(per_layer["gt_gain"].min()),
            "tau_gain": tau_gain.get(group, float("nan")),
            "tau_loss_gain": tau_loss.get(group, float("nan")),
            "steps": int(frame["gt_steps"].iloc[0]),
            "train": int(frame["gt_train_size"].iloc[0]), "val": int(frame["gt_val_size"].iloc[0]),
            "cpu_hours": float(frame["gt_seconds"].sum() / 3600),
        })
    return pd.DataFrame(rows)

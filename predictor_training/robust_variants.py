"""Issue 33: which predictor degrades gracefully on an unseen family or modality? Measured.

Each variant is a ranker recipe, evaluated by :func:`zest.evaluation.evaluate` leave-one-group-out
(logo), leave-one-family-out (lofo) and across modalities, beside the best single metric (sign
fitted on the training folds). ``nested`` variants choose the weight of a robust prior
(``ZestRanker.prior_blend``) on each training split's own leave-one-family-out
(:class:`zest.training.BlendChoosingRanker`), so no held-out number picks it. Variants that lose
are reported too.

    python predictor_training/robust_variants.py            # all variants
    python predictor_training/robust_variants.py NAME ...   # only these (results merged)

Writes robust_variants.json (merged, per variant) and robust_variants.md here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import kendalltau

from zest.evaluation import evaluate, noise_ceiling, predictor_metrics
from zest.models import model_family
from zest.predictor import ZestRanker
from zest.training import BlendChoosingRanker, load_corpus

HERE = Path(__file__).parent
SCHEMES = ("logo", "lofo", "cross_modality")
TARGET = "gt_loss_gain"
#: The 16th group, collected after the 15 the shipped predictor was trained on.
SIXTEENTH = "smollm2__lm-rotten_tomatoes"
NOT_SINGLE = ("predictor", "random", "first_k", "last_k")

class TypeBlindRanker:
    """A ranker that does not see the layer type (conv/linear/embedding one-hots): an image
    family's types never occur in a text family, so a split on them sends every layer of the
    other modality down one branch."""

    def __init__(self, **params) -> None:
        self.ranker = ZestRanker(**params)

    def fit(self, table: pd.DataFrame, y, metrics) -> TypeBlindRanker:
        self.ranker.fit(table.assign(layer_type="Linear"), y, metrics)
        return self

    def predict(self, table: pd.DataFrame) -> np.ndarray:
        return self.ranker.predict(table.assign(layer_type="Linear"))


class SignConsistentRanker:
    """A ranker on the metrics whose direction (mean within-group Kendall τ with the target)
    is the same on every training family, ``|τ| ≥ min_tau`` on each: a metric whose direction
    flips between the families it has seen has no direction to carry to an unseen one."""

    def __init__(self, min_tau: float = 0.0, blend: bool = False, **params) -> None:
        self.min_tau, self.blend, self.params = min_tau, blend, params

    def fit(self, table: pd.DataFrame, y, metrics):
        y = np.asarray(y, dtype=float)
        families = table["model"].map(model_family)
        kept = []
        for column in metrics:
            means = []
            for family in families.unique():
                taus = []
                for group in table.loc[families == family, "group"].unique():
                    rows = (table["group"] == group).to_numpy()
                    values = table.loc[rows, column].to_numpy(dtype=float)
                    if np.isnan(values).all() or np.nanstd(values) == 0:
                        continue
                    taus.append(kendalltau(np.nan_to_num(values, nan=np.nanmin(values)),
                                           y[rows]).statistic)
                means.append(np.nanmean(taus) if taus else np.nan)
            means = np.asarray(means)
            if np.isnan(means).any():
                continue
            if (means >= self.min_tau).all() or (means <= -self.min_tau).all():
                kept.append(column)
        if "m_n_params" in metrics and "m_n_params" not in kept:
            kept.append("m_n_params")
        self.kept_ = kept
        maker = BlendChoosingRanker(**self.params) if self.blend else ZestRanker(**self.params)
        return maker.fit(table, y, kept)


def weight_only_metrics(metrics) -> list[str]:
    """The metrics read from the weights alone (``needs == {'weight'}``: size, shape, depth,
    norms): they mean the same whatever the loss, data or modality of the probe."""
    from zest.metrics import get_metric

    return [c for c in metrics if get_metric(c[2:]).needs == frozenset({"weight"})]


class WeightOnlyRanker:
    """A ranker fitted on :func:`weight_only_metrics` only."""

    def __init__(self, **params) -> None:
        self.params = params

    def fit(self, table: pd.DataFrame, y, metrics):
        return ZestRanker(**self.params).fit(table, y, weight_only_metrics(metrics))


class ModalityGate:
    """The full ranker on a group of a modality it was trained on; on a modality it has never
    seen, the fallback (``n_params`` alone, or a ranker on weight-only metrics)."""

    def __init__(self, fallback: str, **params) -> None:
        self.fallback, self.params = fallback, params

    def fit(self, table: pd.DataFrame, y, metrics) -> ModalityGate:
        self.seen_ = set(table["modality"])
        self.full_ = ZestRanker(**self.params).fit(table, y, metrics)
        if self.fallback == "weight_only":
            self.other_ = WeightOnlyRanker(**self.params).fit(table, y, metrics)
        return self

    def predict(self, table: pd.DataFrame) -> np.ndarray:
        if set(table["modality"]) <= self.seen_:
            return self.full_.predict(table)
        if self.fallback == "weight_only":
            return self.other_.predict(table)
        return table["m_n_params"].to_numpy(dtype=float)


class ColumnSampledRanker:
    """A ZestRanker whose LightGBM trees each see a random share of the features
    (``colsample_bytree``), averaged over ``seeds`` fits by within-group rank: no tree leans
    on a single feature that an unseen family may turn around."""

    def __init__(self, share: float = 0.5, seeds: int = 5, **params) -> None:
        self.share, self.seeds, self.params = share, seeds, params

    def fit(self, table: pd.DataFrame, y, metrics) -> ColumnSampledRanker:
        import functools

        import lightgbm

        original = lightgbm.LGBMRanker
        self.rankers_ = []
        try:
            for seed in range(self.seeds):
                lightgbm.LGBMRanker = functools.partial(original, colsample_bytree=self.share)
                self.rankers_.append(ZestRanker(**{**self.params, "random_state": seed}).fit(
                    table, y, metrics))
        finally:
            lightgbm.LGBMRanker = original
        return self

    def predict(self, table: pd.DataFrame) -> np.ndarray:
        scores = pd.DataFrame({i: r.predict(table) for i, r in enumerate(self.rankers_)})
        return scores.rank(pct=True).mean(axis=1).to_numpy()


#: name -> (recipe, use the 16th group)
VARIANTS = {
    "A roles (shipped recipe), 15 groups": (lambda: ZestRanker(use_roles=True), False),
    "B roles, 16 groups": (lambda: ZestRanker(use_roles=True), True),
    "C roles + n_params prior 0.3 (fixed)": (
        lambda: ZestRanker(use_roles=True, prior_blend=0.3), True),
    "D roles + n_params prior 0.5 (fixed)": (
        lambda: ZestRanker(use_roles=True, prior_blend=0.5), True),
    "E roles + n_params prior, nested-lofo weight": (
        lambda: BlendChoosingRanker(use_roles=True), True),
    "F roles + snip prior, nested-lofo weight": (
        lambda: BlendChoosingRanker(use_roles=True, prior_metric="snip"), True),
    "G roles, no modality + n_params prior, nested-lofo weight": (
        lambda: BlendChoosingRanker(use_roles=True, use_modality=False), True),
    "H roles + n_params prior, nested-lofo weight, 15 groups": (
        lambda: BlendChoosingRanker(use_roles=True), False),
    "I no context + n_params prior, nested-lofo weight": (
        lambda: BlendChoosingRanker(use_context=False), True),
    "J roles + n_params prior 0.7 (fixed)": (
        lambda: ZestRanker(use_roles=True, prior_blend=0.7), True),
    "K roles, no layer-type one-hots, 15 groups": (
        lambda: TypeBlindRanker(use_roles=True), False),
    "L depth + parameter share only (no type, role, modality), 15 groups": (
        lambda: TypeBlindRanker(use_modality=False), False),
    "M roles, regularised (60 trees, 3 leaves, 20 per leaf), 15 groups": (
        lambda: ZestRanker(use_roles=True, n_estimators=60, num_leaves=3,
                           min_child_samples=20), False),
    "N roles, sign-consistent metrics, 15 groups": (
        lambda: SignConsistentRanker(use_roles=True), False),
    "O roles, sign-consistent metrics + nested n_params prior, 15 groups": (
        lambda: SignConsistentRanker(blend=True, use_roles=True), False),
    "P roles, sign-consistent metrics (|τ| ≥ 0.05), 15 groups": (
        lambda: SignConsistentRanker(min_tau=0.05, use_roles=True), False),
    "Q roles, weight-only metrics, 15 groups": (
        lambda: WeightOnlyRanker(use_roles=True), False),
    "R roles; unseen modality -> n_params, 15 groups": (
        lambda: ModalityGate("n_params", use_roles=True), False),
    "S roles; unseen modality -> weight-only ranker, 15 groups": (
        lambda: ModalityGate("weight_only", use_roles=True), False),
    "T weight-only metrics, depth + share context, 15 groups": (
        lambda: WeightOnlyRanker(use_roles=False, use_modality=False), False),
    "U pairwise logistic, weight-only metrics, no context, 15 groups": (
        lambda: WeightOnlyRanker(backend="pairwise_logistic", use_context=False), False),
    "V roles; unseen modality -> n_params, 16 groups": (
        lambda: ModalityGate("n_params", use_roles=True), True),
    "W roles + unseen_modality_blend 1 (ZestRanker, the candidate), 15 groups": (
        lambda: ZestRanker(use_roles=True, unseen_modality_blend=1.0), False),
    "X roles + gate, trees on half the features (5 seeds averaged), 15 groups": (
        lambda: ColumnSampledRanker(use_roles=True, unseen_modality_blend=1.0), False),
    "Y roles + gate, trees on a quarter of the features (5 seeds), 15 groups": (
        lambda: ColumnSampledRanker(share=0.25, use_roles=True, unseen_modality_blend=1.0),
        False),
    "Z roles + gate, trees on half the features (one seed), 15 groups": (
        lambda: ColumnSampledRanker(seeds=1, use_roles=True, unseen_modality_blend=1.0), False),
    "ZZ roles + gate + feature_fraction 0.5 (ZestRanker, the candidate), 15 groups": (
        lambda: ZestRanker(use_roles=True, unseen_modality_blend=1.0, feature_fraction=0.5),
        False),
    "ZZ16 roles + gate + feature_fraction 0.5, 16 groups": (
        lambda: ZestRanker(use_roles=True, unseen_modality_blend=1.0, feature_fraction=0.5),
        True),
    "ZA roles + gate + feature_fraction 0.7, 15 groups": (
        lambda: ZestRanker(use_roles=True, unseen_modality_blend=1.0, feature_fraction=0.7),
        False),
    "ZB roles + gate + feature_fraction 0.3, 15 groups": (
        lambda: ZestRanker(use_roles=True, unseen_modality_blend=1.0, feature_fraction=0.3),
        False),
    "ZC no modality flag + gate + feature_fraction 0.5, 15 groups": (
        lambda: ZestRanker(use_roles=True, use_modality=False, unseen_modality_blend=1.0,
                           feature_fraction=0.5), False),
}


def measure(name: str, metrics: pd.DataFrame, groundtruth: pd.DataFrame) -> dict:
    """One variant on the three schemes: mean τ, per held-out family / modality against the
    best single metric there, and the held-out groups and families below ``n_params``."""
    make, sixteenth = VARIANTS[name]
    if not sixteenth:
        metrics = metrics[metrics["group"] != SIXTEENTH]
        groundtruth = groundtruth[groundtruth["group"] != SIXTEENTH]
    results = evaluate(metrics, groundtruth, target=TARGET, schemes=SCHEMES, make_ranker=make,
                       features=predictor_metrics())
    results = results[~results["method"].str.contains("paper direction")]
    row: dict = {"variant": name, "groups": int(metrics["group"].nunique())}
    for scheme in SCHEMES:
        part = results[results["scheme"] == scheme]
        per_group = part.pivot_table(index="group", columns="method", values="kendall")
        row[scheme] = float(per_group["predictor"].mean())
        row[f"{scheme}_n_params"] = float(per_group["n_params"].mean())
        row[f"{scheme}_groups_below_n_params"] = int(
            (per_group["predictor"] < per_group["n_params"]).sum())
        folds = part.pivot_table(index="fold", columns="method", values="kendall")
        singles = folds.drop(columns=[c for c in folds.columns if c in NOT_SINGLE])
        row[f"{scheme}_per_fold"] = {
            fold: {"predictor": float(folds.loc[fold, "predictor"]),
                   "n_params": float(folds.loc[fold, "n_params"]),
                   "best_metric": str(singles.loc[fold].idxmax()),
                   "best_metric_tau": float(singles.loc[fold].max())}
            for fold in folds.index} if scheme != "logo" else None
        if scheme != "logo":
            row[f"{scheme}_folds_below_n_params"] = int(
                (folds["predictor"] < folds["n_params"]).sum())
    return row


def markdown(rows: list[dict], ceiling: float) -> str:
    lines = ["# Robust predictor variants (issue 33)", "",
             f"Target `{TARGET}`; mean Kendall τ over held-out groups. Noise ceiling (16 groups, "
             f"mean seed-to-seed τ) {ceiling:.3f}; 0.8 × ceiling = {0.8 * ceiling:.3f}. "
             "`nested-lofo weight`: the prior weight is chosen on each training split's own "
             "leave-one-family-out (grid 0–0.8), never on the held-out groups. `< n_params`: "
             "held-out groups (families, modality directions) where the predictor's τ is below "
             "ranking by parameter count. Regenerate with "
             "`python predictor_training/robust_variants.py`.", "",
             "| variant | groups | logo | lofo | cross-modality | lofo groups < n_params | "
             "lofo families < n_params | cross-mod. groups < n_params | cross-mod. directions "
             "< n_params |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['groups']} | {r['logo']:.3f} | {r['lofo']:.3f} | "
            f"{r['cross_modality']:.3f} | {r['lofo_groups_below_n_params']} | "
            f"{r['lofo_folds_below_n_params']} | {r['cross_modality_groups_below_n_params']} | "
            f"{r['cross_modality_folds_below_n_params']} |")
    if rows:
        r = rows[0]
        lines += ["", f"n_params alone: logo {r['logo_n_params']:.3f}, lofo "
                  f"{r['lofo_n_params']:.3f}, cross-modality {r['cross_modality_n_params']:.3f}."]
    for scheme, title in (("lofo", "held-out family"), ("cross_modality", "held-out modality")):
        folds = sorted({f for r in rows for f in r[f"{scheme}_per_fold"]})
        lines += ["", f"## Per {title} ({scheme}): predictor vs best single metric there "
                  "(margin)", "", "| variant | " + " | ".join(folds) + " |",
                  "|---|" + "---|" * len(folds)]
        for r in rows:
            cells = []
            for f in folds:
                v = r[f"{scheme}_per_fold"].get(f)
                margin = None if v is None else v["predictor"] - v["best_metric_tau"]
                cells.append("—" if v is None else
                             f"{v['predictor']:.3f} vs {v['best_metric']} "
                             f"{v['best_metric_tau']:.3f} ({margin:+.3f})")
            lines.append(f"| {r['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(names: list[str]) -> None:
    metrics, groundtruth = load_corpus("data/records", min_seeds=2)
    store = HERE / "robust_variants.json"
    ceiling = float(np.nanmean(list(noise_ceiling(groundtruth, TARGET).values())))
    for name in names or list(VARIANTS):
        r = measure(name, metrics, groundtruth)
        saved = json.loads(store.read_text()) if store.exists() else {}
        saved[name] = r
        print(f"{name}: logo {r['logo']:.3f} lofo {r['lofo']:.3f} cross "
              f"{r['cross_modality']:.3f}", flush=True)
        store.write_text(json.dumps(saved, indent=1))
        rows = [saved[n] for n in VARIANTS if n in saved]
        (HERE / "robust_variants.md").write_text(markdown(rows, ceiling))


if __name__ == "__main__":
    main(sys.argv[1:])

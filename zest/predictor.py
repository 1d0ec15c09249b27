"""The universal predictor: a pairwise ranker over per-layer zero-shot metrics (ARCHITECTURE.md
§3b).

ZEST (project page): "each iteration, we sample two layers and feed the pre-collected zero-shot
metrics into the predictor"; trained across many (model, data set) groups, it ranks the layers of
an unseen group from one minibatch. :class:`ZestRanker` follows scikit-learn conventions: ``fit``
returns ``self``, fitted attributes end in ``_``, nothing happens in ``__init__``.

Features are normalised *within each group* (rank percentile or robust z-score) so that metric
scales of different models do not leak in; context features (layer type, modality, relative
depth, share of the model's parameters) go in beside them so the ranker can learn direction
flips between families. Saved as one JSON file, never pickle.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from zest.errors import InvalidInputError, RecordError
from zest.families import LAYER_KINDS, layer_kind
from zest.outputs import check_output_file
from zest.records import METRIC_PREFIX

FORMAT_VERSION = 1
TARGETS = ("gt_loss_gain", "gt_gain")
BACKENDS = ("lightgbm", "pairwise_logistic")
NORMALIZATIONS = ("rank", "robust_z")
CONTEXT_FEATURES = ["ctx_depth", "ctx_param_share", "ctx_modality_text"] + \
    [f"ctx_type_{kind}" for kind in LAYER_KINDS]

#: What a layer does in its block, named the same way in every family, from its module name
#: (first match wins): an inverted-residual block's pointwise expansion, depthwise mixing and
#: linear projection line up with a transformer's MLP input, token mixing and MLP output.
ROLE_PATTERNS: tuple[tuple[str, str], ...] = (
    ("embedding", r"embed(ding)?s?(\.|_|$)|(^|\.)wte$|(^|\.)wpe$"),
    ("stem", r"^(conv_stem|conv1|stem(\.\w+)*)$|patch_embed"),
    ("attention_in", r"(query|key|value|q_proj|k_proj|v_proj|qkv|c_attn|in_proj\w*)$"),
    ("attention_out", r"(attention\.output\.dense|o_proj|out_proj|attn\.proj|attn\.c_proj)$"),
    ("mixing", r"conv_dw$"),
    ("mlp_in", r"(intermediate\.dense|up_proj|gate_proj|fc1|c_fc|conv_pw)$"),
    ("mlp_out", r"(output\.dense|down_proj|fc2|mlp\.c_proj|conv_pwl)$"),
    ("pre_head", r"(conv_head|pooler\.dense|pre_logits\.\w+)$"),
)
LAYER_ROLES = tuple(role for role, _ in ROLE_PATTERNS) + ("other",)


def layer_role(name: str) -> str:
    """The role of a layer from its module name (:data:`ROLE_PATTERNS`), ``other`` if none."""
    for role, pattern in ROLE_PATTERNS:
        if re.search(pattern, name):
            return role
    return "other"


def metric_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """One row per (group, layer): metric columns averaged over minibatches, identity columns
    kept."""
    if metrics.empty:
        raise RecordError("no metric records; run `zest collect metrics` first")
    keys = ["group", "layer"]
    metric_cols = [c for c in metrics.columns if c.startswith(METRIC_PREFIX)]
    first = {c: "first" for c in ("model", "dataset", "layer_type", "depth", "n_params",
                                  "modality", "block", "probe_loss", "batch_size")
             if c in metrics.columns}
    table = metrics.groupby(keys, sort=False).agg({**{c: "mean" for c in metric_cols}, **first})
    return table.reset_index()


def target_table(groundtruth: pd.DataFrame, target: str) -> pd.DataFrame:
    """One row per (group, layer): the target averaged over ground-truth seeds."""
    if target not in TARGETS:
        raise InvalidInputError(f"unknown target {target!r}; use one of {', '.join(TARGETS)}")
    if target not in groundtruth:
        raise RecordError(f"ground-truth records lack the column {target!r}")
    return groundtruth.groupby(["group", "layer"], sort=False)[target].mean().reset_index()


def join_records(metrics: pd.DataFrame, groundtruth: pd.DataFrame, target: str) -> pd.DataFrame:
    """Metric table joined with the seed-averaged target, only groups present in both."""
    table = metric_table(metrics).merge(target_table(groundtruth, target), on=["group", "layer"],
                                        how="inner")
    if table.empty:
        raise RecordError("metric and ground-truth records share no (group, layer); collect "
                          "both kinds for the same groups")
    return table


def context_features(table: pd.DataFrame, modality: bool = True, roles: bool = False
                     ) -> pd.DataFrame:
    """Layer type, relative depth and parameter share, per row; with ``modality`` a text flag,
    with ``roles`` the layer's role one-hot (:func:`layer_role`) and its relative position
    inside its block (0 = first layer of the block, 1 = last)."""
    out = pd.DataFrame(index=table.index)
    out["ctx_depth"] = table["depth"].astype(float)
    totals = table.groupby("group")["n_params"].transform("sum").astype(float)
    out["ctx_param_share"] = table["n_params"].astype(float) / totals
    if modality:
        kind = table["modality"] if "modality" in table else pd.Series("image", index=table.index)
        out["ctx_modality_text"] = (kind == "text").astype(float)
    kinds = table["layer_type"].map(layer_kind)
    for kind in LAYER_KINDS:
        out[f"ctx_type_{kind}"] = (kinds == kind).astype(float)
    if roles:
        names = table["layer"].map(layer_role)
        for role in LAYER_ROLES:
            out[f"ctx_role_{role}"] = (names == role).astype(float)
        block = table["block"] if "block" in table else table["layer"]
        within = table.groupby([table["group"], block])["depth"]
        count = within.transform("count").astype(float)
        position = (within.rank(method="first") - 1) / (count - 1).where(count > 1, 1.0)
        out["ctx_block_position"] = position.where(count > 1, 0.5)
    return out


def require_metric_columns(table: pd.DataFrame, columns: Sequence[str], fix: str) -> None:
    """Raises :class:`RecordError` naming the metric columns ``table`` lacks, and ``fix``."""
    missing = sorted(set(columns) - set(table.columns))
    if missing:
        raise RecordError(f"the records lack the metrics {missing[:8]}; {fix}")


def normalize_within_groups(values: pd.DataFrame, groups: Sequence, method: str) -> pd.DataFrame:
    """Per-group normalisation of every column: ``rank`` → percentile in [0, 1] (ties averaged),
    ``robust_z`` → (x − median) / IQR. NaN stays NaN (a metric that does not apply)."""
    if method not in NORMALIZATIONS:
        raise InvalidInputError(f"unknown normalisation {method!r}; use one of "
                                f"{', '.join(NORMALIZATIONS)}")
    grouped = values.groupby(np.asarray(groups), sort=False)
    if method == "rank":
        ranks = grouped.rank(method="average")
        counts = grouped.transform("count")
        percentile = (ranks - 1) / (counts - 1)
        return percentile.where(counts > 1, 0.5).where(values.notna())
    median = grouped.transform("median")
    iqr = grouped.transform(lambda s: s.quantile(0.75) - s.quantile(0.25))
    scale = iqr.where(iqr > 0, 1.0)
    return ((values - median) / scale).clip(-10, 10)


@dataclass
class ZestRanker:
    """Pairwise layer ranker over zero-shot metrics (ARCHITECTURE.md §3b).

    Args:
        backend: ``lightgbm`` (LGBMRanker, lambdarank on per-group relevance grades) or
            ``pairwise_logistic`` (logistic regression on within-group feature differences).
        normalization: ``rank`` or ``robust_z``, applied within each group.
        use_context: Add context features (layer type, depth, parameter share).
        use_modality: With the context, a text/image flag (lets the ranker flip a metric's
            direction by modality; does not transfer to a family of the other modality).
        use_roles: With the context, the layer's role in its block and its position there
            (:func:`layer_role`), named alike in every family.
        n_grades: Relevance grades per group for lambdarank (quantiles of the target).
        pairs_per_group: Pairs sampled per group for ``pairwise_logistic``.
        n_estimators, learning_rate, num_leaves, min_child_samples: LightGBM settings.
        C: Inverse regularisation of the logistic regression.
        random_state: Seed of pair sampling and LightGBM.
    """

    backend: str = "lightgbm"
    normalization: str = "rank"
    use_context: bool = True
    use_modality: bool = True
    use_roles: bool = False
    n_grades: int = 5
    pairs_per_group: int = 2000
    n_estimators: int = 200
    learning_rate: float = 0.05
    num_leaves: int = 7
    min_child_samples: int = 5
    C: float = 1.0
    random_state: int = 0

    # -- features ----------------------------------------------------------------------------
    def _design(self, table: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
        require_metric_columns(table, metrics, "collect metrics with --metrics all")
        normalized = normalize_within_groups(table[list(metrics)].astype(float), table["group"],
                                             self.normalization)
        if self.use_context:
            normalized = pd.concat([normalized, context_features(
                table, modality=self.use_modality, roles=self.use_roles)], axis=1)
        return normalized

    def _validate(self) -> None:
        if self.backend not in BACKENDS:
            raise InvalidInputError(f"unknown backend {self.backend!r}; use one of "
                                    f"{', '.join(BACKENDS)}")
        if self.normalization not in NORMALIZATIONS:
            raise InvalidInputError(f"unknown normalisation {self.normalization!r}; use one of "
                                    f"{', '.join(NORMALIZATIONS)}")

    def get_params(self) -> dict[str, Any]:
        """The constructor parameters (read from the dataclass fields, sklearn-style)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    # -- estimator API -----------------------------------------------------------------------
    def fit(self, table: pd.DataFrame, y: Sequence[float], metrics: Sequence[str] | None = None
            ) -> ZestRanker:
        """Fits on a joined table (see :func:`join_records`) and its target ``y``.

        Args:
            table: One row per (group, layer) with ``m_<metric>`` and identity columns.
            y: Target per row (larger = fine-tuning this layer helps more).
            metrics: Metric columns to use (default: every ``m_`` column).

        Returns:
            ``self``.
        """
        self._validate()
        metrics = list(metrics) if metrics is not None else \
            [c for c in table.columns if c.startswith(METRIC_PREFIX)]
        y = np.asarray(y, dtype=float)
        if len(y) != len(table):
            raise InvalidInputError(f"y has {len(y)} values for {len(table)} rows")
        groups = table["group"].to_numpy()
        if len(set(groups)) < 1:
            raise InvalidInputError("no group to train on")
        design = self._design(table, metrics)
        self.metrics_ = metrics
        self.features_ = list(design.columns)
        self.groups_ = sorted(set(groups))
        if self.backend == "lightgbm":
            self._fit_lightgbm(design, y, groups)
        else:
            self._fit_logistic(design, y, groups)
        return self

    def _fit_lightgbm(self, design: pd.DataFrame, y: np.ndarray, groups: np.ndarray) -> None:
        import lightgbm

        order = np.argsort(pd.factorize(groups)[0], kind="stable")
        design, y, groups = design.iloc[order], y[order], groups[order]
        grades = np.zeros(len(y), dtype=int)
        for g in pd.unique(groups):
            idx = np.where(groups == g)[0]
            pct = pd.Series(y[idx]).rank(pct=True, method="average").to_numpy()
            grades[idx] = np.minimum((pct * self.n_grades).astype(int), self.n_grades - 1)
        sizes = pd.Series(groups).value_counts(sort=False).reindex(pd.unique(groups)).to_numpy()
        model = lightgbm.LGBMRanker(objective="lambdarank", n_estimators=self.n_estimators,
                                    learning_rate=self.learning_rate, num_leaves=self.num_leaves,
                                    min_child_samples=self.min_child_samples,
                                    random_state=self.random_state, verbose=-1,
                                    label_gain=list(range(self.n_grades)), n_jobs=1)
        model.fit(design.to_numpy(dtype=float), grades, group=sizes)
        self.model_string_ = model.booster_.model_to_string()
        self.coefficients_ = None
        self._booster = model.booster_

    def _fit_logistic(self, design: pd.DataFrame, y: np.ndarray, groups: np.ndarray) -> None:
        from sklearn.linear_model import LogisticRegression

        rng = np.random.default_rng(self.random_state)
        values = design.to_numpy(dtype=float)
        self.fill_ = np.nan_to_num(np.nanmedian(values, axis=0), nan=0.5)
        values = np.where(np.isnan(values), self.fill_, values)
        diffs, labels = [], []
        for g in pd.unique(groups):
            idx = np.where(groups == g)[0]
            if len(idx) < 2:
                continue
            i = rng.choice(idx, self.pairs_per_group)
            j = rng.choice(idx, self.pairs_per_group)
            keep = y[i] != y[j]
            i, j = i[keep], j[keep]
            diffs.append(values[i] - values[j])
            labels.append((y[i] > y[j]).astype(int))
        if not diffs:
            raise InvalidInputError("no pair of layers with different targets to learn from")
        x = np.concatenate(diffs + [-d for d in diffs])
        t = np.concatenate(labels + [1 - lab for lab in labels])
        model = LogisticRegression(C=self.C, fit_intercept=False, max_iter=2000)
        model.fit(x, t)
        self.coefficients_ = model.coef_[0].tolist()
        self.model_string_ = None

    def predict(self, table: pd.DataFrame) -> np.ndarray:
        """Scores per row (higher = tune first); rows are normalised within their group."""
        self._check_fitted()
        if "group" not in table:
            table = table.assign(group="__inference__")
        design = self._design(table, self.metrics_)[self.features_].to_numpy(dtype=float)
        if self.backend == "lightgbm":
            return np.asarray(self._get_booster().predict(design), dtype=float)
        design = np.where(np.isnan(design), np.asarray(self.fill_), design)
        return design @ np.asarray(self.coefficients_)

    def _check_fitted(self) -> None:
        if not hasattr(self, "features_"):
            raise InvalidInputError("this ZestRanker is not fitted; call fit() or load() first")

    def _get_booster(self) -> Any:
        if getattr(self, "_booster", None) is None:
            import lightgbm

            with _native_stderr_silenced():  # LightGBM logs "[Fatal]" before raising
                self._booster = lightgbm.Booster(model_str=self.model_string_)
        return self._booster

    # -- persistence -------------------------------------------------------------------------
    def to_dict(self, **info: Any) -> dict[str, Any]:
        """The fitted ranker as a JSON-ready dict (plus any ``info`` such as CV results)."""
        self._check_fitted()
        params = self.get_params()
        return {"format": "zest-predictor", "format_version": FORMAT_VERSION, "params": params,
                "metrics": self.metrics_, "features": self.features_,
                "normalization": self.normalization, "training_groups": self.groups_,
                "model": {"lightgbm": self.model_string_, "coefficients": self.coefficients_,
                          "fill": np.asarray(self.fill_).tolist()
                          if self.backend == "pairwise_logistic" else None},
                **info}

    def save(self, path: str | os.PathLike, **info: Any) -> Path:
        """Writes the ranker to one JSON file (atomically: a temporary file, then
        ``os.replace``); an existing file is replaced only if it is a zest predictor."""
        path = check_predictor_out(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_dict(**info), indent=1, default=_json_default)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ZestRanker:
        """Reads a ranker saved by :meth:`save`; corrupt files and other format versions raise
        a one-line error."""
        path = Path(path)
        if not path.is_file():
            raise InvalidInputError(f"predictor file {str(path)!r} does not exist")
        try:
            spec = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RecordError(f"predictor file {str(path)!r} is corrupt (not valid JSON: "
                              f"{exc.__class__.__name__}); train it again with "
                              "`zest train-predictor`") from None
        return cls.from_dict(spec, source=str(path))

    @classmethod
    def from_dict(cls, spec: dict[str, Any], source: str = "predictor") -> ZestRanker:
        """Rebuilds a ranker from :meth:`to_dict` output."""
        if not isinstance(spec, dict) or spec.get("format") != "zest-predictor":
            raise RecordError(f"{source} is not a zest predictor file; train one with "
                              "`zest train-predictor`")
        version = spec.get("format_version")
        if version != FORMAT_VERSION:
            raise RecordError(f"{source} has predictor format version {version}, this zest "
                              f"reads {FORMAT_VERSION}; retrain it with `zest train-predictor`")
        try:
            ranker = cls(**spec["params"])
            ranker.metrics_ = list(spec["metrics"])
            ranker.features_ = list(spec["features"])
            ranker.groups_ = list(spec["training_groups"])
            model = spec["model"]
            ranker.model_string_ = model.get("lightgbm")
            ranker.coefficients_ = model.get("coefficients")
            if ranker.backend == "pairwise_logistic":
                ranker.fill_ = np.asarray(model.get("fill") or [0.5] * len(ranker.features_))
                if len(ranker.coefficients_ or []) != len(ranker.features_):
                    raise ValueError("coefficients do not match the features")
            elif not ranker.model_string_:
                raise ValueError("no LightGBM model")
            ranker.info_ = {k: v for k, v in spec.items()
                            if k not in ("params", "metrics", "features", "model")}
            ranker._validate()
            if len(ranker.features_) < len(ranker.metrics_) or not ranker.metrics_:
                raise ValueError(f"{len(ranker.features_)} features for "
                                 f"{len(ranker.metrics_)} metrics")
            if ranker.backend == "lightgbm":
                booster = ranker._get_booster()
                if booster.num_feature() != len(ranker.features_):
                    raise ValueError(f"its LightGBM model reads {booster.num_feature()} "
                                     f"features, the file lists {len(ranker.features_)}")
        except (KeyError, TypeError, ValueError, InvalidInputError) as exc:
            raise RecordError(f"{source} is corrupt ({str(exc).splitlines()[0][:200]}); train "
                              "it again with `zest train-predictor`") from None
        except Exception as exc:  # noqa: BLE001 - LightGBM's own error for a bad model string
            raise RecordError(f"{source} is corrupt (its LightGBM model cannot be read: "
                              f"{type(exc).__name__}); train it again with "
                              "`zest train-predictor`") from None
        return ranker


@contextlib.contextmanager
def _native_stderr_silenced():
    """Silences what native code writes to file descriptor 2 (Python errors still raise)."""
    try:
        saved = os.dup(2)
    except OSError:  # no real stderr (embedded interpreter)
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def check_predictor_out(path: str | os.PathLike) -> Path:
    """Fails early, before any training, when ``path`` cannot take a predictor file: a folder,
    an unwritable place, or an existing file that is not a zest predictor (never replaced;
    :func:`zest.outputs.path_kind`)."""
    return check_output_file(path, "--out", kind="predictor")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")

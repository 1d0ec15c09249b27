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
import hashlib
import json
import math
import numbers
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from zest.architectures import LAYER_KINDS, layer_kind
from zest.errors import InvalidInputError, RecordError
from zest.lightgbm_model import check_lightgbm_model
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
    metrics = metrics.assign(**{column: numeric_column(
        metrics, column, "metric", "recollect it with `zest collect metrics`")
        for column in metric_cols})
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
    fix = "recollect it with `zest collect groundtruth`"
    groundtruth = groundtruth.assign(**{target: numeric_column(groundtruth, target,
                                                               "ground-truth", fix)})
    missing = groundtruth[groundtruth[target].isna()]
    if not missing.empty:
        group = missing["group"].iloc[0]
        raise RecordError(f"group {group!r} has no value (NaN) in the ground-truth column "
                          f"{target!r} for {int((missing['group'] == group).sum())} rows; {fix}")
    return groundtruth.groupby(["group", "layer"], sort=False)[target].mean().reset_index()


def numeric_column(records: pd.DataFrame, column: str, kind: str, fix: str) -> pd.Series:
    """``records[column]`` as floats; raises :class:`RecordError` naming the first group whose
    ``column`` holds something that is not a number (a string, a list, a flag), and ``fix``."""
    values = records[column]
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        return values
    for index, value in values.items():
        if (isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)) or \
                value is None or value is pd.NA:
            continue
        group = records.at[index, "group"] if "group" in records else "?"
        raise RecordError(f"the {kind} column {column!r} of group {group!r} holds "
                          f"{type(value).__name__} values such as {str(value)[:40]!r}, not "
                          f"numbers; {fix}")
    return pd.to_numeric(values).astype(float)


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
        prior_blend: Weight ``w`` of a robust prior in the score: ``predict`` returns
            ``(1 − w) · rank(ranker) + w · rank(prior)``, both rank percentiles within the
            group (0 = the ranker alone). Chosen by nested leave-one-family-out
            (:func:`zest.training.choose_prior_blend`, issue 33).
        prior_metric: The prior's metric (one of the ranker's metrics, larger = tune first),
            ``n_params`` by default: the best single metric across families.
        unseen_modality_blend: The prior's weight on a group of a modality no training group
            had (the larger of it and ``prior_blend``): 1 falls back to the prior alone, the
            out-of-distribution gate of issue 33 (trained on one modality and tested on the
            other, the ranker alone scored Kendall τ 0.117 and ``n_params`` 0.420;
            predictor_training/robust_variants.md).
        feature_fraction: Share of the features each LightGBM tree may split on
            (``colsample_bytree``); below 1 no tree leans on one feature alone, which an unseen
            family may turn around (issue 33: 0.5 raised leave-one-family-out τ from 0.566 to
            0.579, predictor_training/robust_variants.md).
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
    prior_blend: float = 0.0
    prior_metric: str = "n_params"
    unseen_modality_blend: float = 0.0
    feature_fraction: float = 1.0

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
        for name in ("prior_blend", "unseen_modality_blend"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InvalidInputError(f"{name} is {getattr(self, name)!r}; use a weight "
                                        "between 0 (the ranker alone) and 1 (the prior alone)")
        if not 0.0 < self.feature_fraction <= 1.0:
            raise InvalidInputError(f"feature_fraction is {self.feature_fraction!r}; use a "
                                    "share above 0 and at most 1")

    def _check_prior(self, metrics: Sequence[str]) -> None:
        weighted = max(self.prior_blend, self.unseen_modality_blend) > 0
        if weighted and METRIC_PREFIX + self.prior_metric not in metrics:
            raise InvalidInputError(f"prior_metric {self.prior_metric!r} is not among the "
                                    "ranker's metrics; add it to the features or pick one of "
                                    f"{', '.join(m[len(METRIC_PREFIX):] for m in metrics)[:200]}")

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
        self._check_prior(metrics)
        groups = table["group"].to_numpy()
        if len(set(groups)) < 1:
            raise InvalidInputError("no group to train on")
        design = self._design(table, metrics)
        self.metrics_ = metrics
        self.features_ = list(design.columns)
        self.groups_ = sorted(set(groups))
        self.modalities_ = sorted(set(_modalities(table)))
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
                                    label_gain=list(range(self.n_grades)), n_jobs=1,
                                    colsample_bytree=self.feature_fraction)
        model.fit(design.to_numpy(dtype=float), grades, group=sizes,
                  feature_name=list(design.columns))  # declared in the model string
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
        scores = self.predict_ranker(table)
        weights = np.full(len(table), self.prior_blend)
        if self.modalities_ is not None and self.unseen_modality_blend > 0:
            unseen = ~_modalities(table).isin(self.modalities_).to_numpy()
            weights[unseen] = max(self.prior_blend, self.unseen_modality_blend)
        if not weights.any():
            return scores
        groups = table["group"] if "group" in table else pd.Series("g", index=table.index)
        return blend_with_prior(scores, table[METRIC_PREFIX + self.prior_metric], groups,
                                weights)

    def predict_ranker(self, table: pd.DataFrame) -> np.ndarray:
        """The ranker's own scores per row, without the prior (see ``prior_blend``)."""
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
                "training_modalities": self.modalities_,
                "model": {"lightgbm": self.model_string_, "coefficients": self.coefficients_,
                          "fill": np.asarray(self.fill_).tolist()
                          if self.backend == "pairwise_logistic" else None},
                **info}

    def save(self, path: str | os.PathLike, **info: Any) -> Path:
        """Writes the ranker to one JSON file (atomically: a temporary file, then
        ``os.replace``), stamped with the SHA-256 of its content (:func:`content_checksum`),
        which :meth:`load` verifies; an existing file is replaced only if it is a zest
        predictor."""
        path = check_predictor_out(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        content = json.loads(json.dumps(self.to_dict(**info), default=_json_default))
        stamped = {key: content[key] for key in ("format", "format_version")}
        stamped[CHECKSUM_KEY] = content_checksum(content)
        stamped.update(content)
        text = json.dumps(stamped, indent=1)
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
        source = f"predictor file {str(path)!r}"
        try:
            spec = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise RecordError(f"{source} is corrupt (not valid JSON: "
                              f"{exc.__class__.__name__}); train it again with "
                              "`zest train-predictor`") from None
        check_format(spec, source)
        claimed = spec.pop(CHECKSUM_KEY, None)
        if not isinstance(claimed, str):
            raise RecordError(f"{source} has no {CHECKSUM_KEY} checksum (written before zest "
                              "verified its predictors, or edited); train it again with "
                              "`zest train-predictor`")
        if claimed != content_checksum(spec):
            raise RecordError(f"{source} is corrupt (its content does not match its "
                              f"{CHECKSUM_KEY} checksum: damaged or edited); train it again "
                              "with `zest train-predictor`")
        return cls.from_dict(spec, source=source)

    @classmethod
    def from_dict(cls, spec: dict[str, Any], source: str = "predictor") -> ZestRanker:
        """Rebuilds a ranker from :meth:`to_dict` output, validated first (keys and types, the
        feature list against the metrics, the context settings and what the LightGBM model
        string declares, the model string's whole structure:
        :func:`zest.lightgbm_model.check_lightgbm_model`), so nothing malformed reaches
        LightGBM; any fault is one :class:`RecordError` line."""
        check_format(spec, source)
        try:
            params = _checked_params(spec.get("params"))
            metrics = _string_list(spec.get("metrics"), "metrics")
            features = _string_list(spec.get("features"), "features")
            groups = _string_list(spec.get("training_groups"), "training_groups", empty=True)
            modalities = spec.get("training_modalities")  # absent: saved before the gate
            modalities = None if modalities is None else _string_list(
                modalities, "training_modalities")
            model = spec.get("model")
            if not isinstance(model, dict):
                raise ValueError("'model' is not an object")
            ranker = cls(**params)
            ranker._validate()
            _check_feature_order(ranker, metrics, features)
            ranker._check_prior(metrics)
            ranker.metrics_, ranker.features_, ranker.groups_ = metrics, features, groups
            ranker.modalities_ = modalities
            if ranker.backend == "pairwise_logistic":
                ranker.model_string_ = None
                ranker.coefficients_ = _number_list(model.get("coefficients"), "coefficients",
                                                    len(features))
                fill = model.get("fill")
                ranker.fill_ = np.asarray(_number_list(fill, "fill", len(features))
                                          if fill is not None else [0.5] * len(features))
            else:
                declared = check_lightgbm_model(model.get("lightgbm"), len(features))
                if not all(re.fullmatch(r"Column_\d+", name) for name in declared) and \
                        declared != features:
                    raise ValueError("its feature list differs from the one its LightGBM model "
                                     "was trained on (reordered or edited)")
                ranker.model_string_ = model["lightgbm"]
                ranker.coefficients_ = None
            ranker.info_ = {k: v for k, v in spec.items()
                            if k not in ("params", "metrics", "features", "model",
                                         "training_modalities")}
        except (KeyError, TypeError, ValueError, InvalidInputError) as exc:
            raise RecordError(f"{source} is corrupt ({str(exc).splitlines()[0][:200]}); train "
                              "it again with `zest train-predictor`") from None
        if ranker.backend == "lightgbm":
            try:
                booster = ranker._get_booster()
            except Exception as exc:  # noqa: BLE001 - LightGBM's own error for a bad model
                raise RecordError(f"{source} is corrupt (its LightGBM model cannot be read: "
                                  f"{type(exc).__name__}); train it again with "
                                  "`zest train-predictor`") from None
            if booster.num_feature() != len(ranker.features_):
                raise RecordError(f"{source} is corrupt (its LightGBM model reads "
                                  f"{booster.num_feature()} features, the file lists "
                                  f"{len(ranker.features_)}); train it again with "
                                  "`zest train-predictor`")
        return ranker


def _modalities(table: pd.DataFrame) -> pd.Series:
    """Each row's modality (``image`` where the records name none, as
    :func:`context_features` reads them)."""
    return table["modality"] if "modality" in table else pd.Series("image", index=table.index)


def blend_with_prior(scores: Sequence[float], prior: Sequence[float], groups: Sequence,
                     weight: float | np.ndarray) -> np.ndarray:
    """``(1 − weight) · rank(scores) + weight · rank(prior)``, rank percentiles within each
    group (:func:`normalize_within_groups`), ``weight`` one number or one per row; a layer
    without a prior value (NaN) keeps the ranker's percentile alone."""
    frame = pd.DataFrame({"ranker": np.asarray(scores, dtype=float),
                          "prior": np.asarray(prior, dtype=float)})
    ranks = normalize_within_groups(frame, np.asarray(groups), "rank")
    weight = np.broadcast_to(np.asarray(weight, dtype=float), len(frame))
    blended = (1 - weight) * ranks["ranker"] + weight * ranks["prior"]
    return blended.fillna(ranks["ranker"]).to_numpy(dtype=float)


#: The field of a saved predictor that holds the SHA-256 of the rest of the file.
CHECKSUM_KEY = "sha256"


def content_checksum(spec: dict[str, Any]) -> str:
    """SHA-256 of a predictor file's content without its checksum field: the canonical JSON
    (sorted keys, no spaces) of everything else, so any change of any value, the order of the
    features included, changes it."""
    content = {k: v for k, v in spec.items() if k != CHECKSUM_KEY}
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def check_format(spec: Any, source: str) -> None:
    """Raises :class:`RecordError` unless ``spec`` is a zest predictor of this format version."""
    if not isinstance(spec, dict) or spec.get("format") != "zest-predictor":
        raise RecordError(f"{source} is not a zest predictor file; train one with "
                          "`zest train-predictor`")
    version = spec.get("format_version")
    if version != FORMAT_VERSION:
        raise RecordError(f"{source} has predictor format version {version!r}, this zest "
                          f"reads {FORMAT_VERSION}; retrain it with `zest train-predictor`")


#: Ranker parameters added after format version 1 was first written: a file without them was
#: saved before they existed and loads with their defaults (the ranker it was).
LATER_PARAMS = ("prior_blend", "prior_metric", "unseen_modality_blend", "feature_fraction")


def _checked_params(params: Any) -> dict[str, Any]:
    """The ranker parameters of a file, each of its field's type (bool, int, finite float,
    string); unknown or missing names and other types raise ``ValueError``."""
    if not isinstance(params, dict):
        raise ValueError("'params' is not an object")
    defaults = ZestRanker().get_params()
    params = {**{name: defaults[name] for name in LATER_PARAMS if name not in params}, **params}
    if set(params) != set(defaults):
        odd = sorted(set(params) ^ set(defaults))
        raise ValueError(f"'params' names {odd[:4]} differ from a ZestRanker's")
    for name, default in defaults.items():
        value = params[name]
        if isinstance(default, bool):
            fits = isinstance(value, bool)
        elif isinstance(default, int):
            fits = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            fits = isinstance(value, int | float) and not isinstance(value, bool) and \
                math.isfinite(value)
        else:
            fits = isinstance(value, str)
        if not fits:
            raise ValueError(f"parameter {name} is {value!r}, not a {type(default).__name__}")
    return params


def _string_list(value: Any, what: str, empty: bool = False) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"'{what}' is not a list of names")
    if not value and not empty:
        raise ValueError(f"'{what}' is empty")
    if len(set(value)) != len(value):
        raise ValueError(f"'{what}' names one entry twice")
    return list(value)


def _number_list(value: Any, what: str, length: int) -> list[float]:
    if not isinstance(value, list) or len(value) != length or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            for v in value):
        raise ValueError(f"'{what}' is not a list of {length} finite numbers")
    return [float(v) for v in value]


def _check_feature_order(ranker: ZestRanker, metrics: list[str], features: list[str]) -> None:
    """Features are the metrics, in order, then (with ``use_context``) context features in
    the order :func:`context_features` makes them; anything else was reordered or edited."""
    if not all(m.startswith(METRIC_PREFIX) for m in metrics):
        raise ValueError(f"a metric name lacks the {METRIC_PREFIX!r} prefix")
    if features[:len(metrics)] != metrics:
        raise ValueError("its features do not start with its metrics in order (reordered or "
                         "edited)")
    context = features[len(metrics):]
    if context and not ranker.use_context:
        raise ValueError("context features without use_context")
    one_layer = pd.DataFrame({"group": ["g"], "layer": ["x"], "depth": [0.0], "n_params": [1],
                              "modality": ["image"], "layer_type": ["Linear"], "block": ["b"]})
    known = list(context_features(one_layer, modality=ranker.use_modality,
                                  roles=ranker.use_roles).columns)
    positions = [known.index(name) if name in known else -1 for name in context]
    if -1 in positions or positions != sorted(positions):
        raise ValueError("its context features are unknown or out of order (reordered or "
                         "edited)")


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

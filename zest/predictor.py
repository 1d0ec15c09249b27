"""The universal predictor: a pairwise ranker over per-layer zero-shot metrics (ARCHITECTURE.md
§3b).

ZEST (project page): "each iteration, we sample two layers and feed the pre-collected zero-shot
metrics into the predictor"; trained across many (model, data set) groups, it ranks the layers of
an unseen group from one minibatch. :class:`ZestRanker` follows scikit-learn conventions: ``fit``
returns ``self``, fitted attributes end in ``_``, nothing happens in ``__init__``.

Its features (metrics normalised within each group, context features beside them) are
:mod:`zest.predictor_features`; its file (one JSON file with a checksum, never pickle, checked
completely on loading) is :mod:`zest.predictor_file`. The names of both that callers use are
importable from here too.
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from zest.errors import InvalidInputError, RecordError
from zest.lightgbm_model import check_lightgbm_model
from zest.predictor_features import (
    NORMALIZATIONS,
    TARGETS,
    blend_with_prior,
    context_features,
    join_records,
    metric_table,
    normalize_within_groups,
    numeric_column,
    require_metric_columns,
    row_modalities,
    target_table,
)
from zest.predictor_file import (
    CHECKSUM_KEY,
    FORMAT_VERSION,
    check_feature_order,
    check_format,
    check_predictor_out,
    checked_params,
    content_checksum,
    name_list,
    native_stderr_silenced,
    number_list,
    read_predictor,
    write_predictor,
)
from zest.records import METRIC_PREFIX, metric_columns

BACKENDS = ("lightgbm", "pairwise_logistic")

__all__ = ["BACKENDS", "CHECKSUM_KEY", "TARGETS", "ZestRanker", "blend_with_prior",
           "check_predictor_out", "content_checksum", "context_features", "join_records",
           "metric_table", "normalize_within_groups", "numeric_column", "require_metric_columns",
           "target_table"]


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
            (:func:`zest.predictor_features.block_role`), named alike in every family.
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
        require_metric_columns(table, metrics, "collect metrics with metrics='all'")
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
        metrics = list(metrics) if metrics is not None else metric_columns(table)
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
        self.modalities_ = sorted(set(row_modalities(table)))
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
            unseen = ~row_modalities(table).isin(self.modalities_).to_numpy()
            weights[unseen] = max(self.prior_blend, self.unseen_modality_blend)
        if not weights.any():
            return scores
        return blend_with_prior(scores, table[METRIC_PREFIX + self.prior_metric], table["group"],
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

            with native_stderr_silenced():  # LightGBM logs "[Fatal]" before raising
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
        """Writes the ranker to one JSON file (:func:`zest.predictor_file.write_predictor`:
        atomic, stamped with the SHA-256 of its content, which :meth:`load` verifies); an
        existing file is replaced only if it is a zest predictor."""
        return write_predictor(path, self.to_dict(**info))

    @classmethod
    def load(cls, path: str | os.PathLike) -> ZestRanker:
        """Reads a ranker saved by :meth:`save`; corrupt files and other format versions raise
        a one-line error. A file whose bytes were loaded and validated before in this process
        is not read again (:data:`LOADED`, keyed by the SHA-256 of the bytes, so an edited file
        is validated again): every ``zest.rank`` call loads its predictor, and the checks cost
        about a tenth of a small CNN's forward+backward pass."""
        content = Path(path).read_bytes() if Path(path).is_file() else None
        key = hashlib.sha256(content).hexdigest() if content is not None else None
        if key in LOADED:
            return copy.copy(LOADED[key])
        spec, source = read_predictor(path)
        ranker = cls.from_dict(spec, source=source)
        if key is not None:
            while len(LOADED) >= LOADED_LIMIT:
                LOADED.pop(next(iter(LOADED)))
            LOADED[key] = ranker
        return copy.copy(ranker)

    @classmethod
    def from_dict(cls, spec: dict[str, Any], source: str = "predictor") -> ZestRanker:
        """Rebuilds a ranker from :meth:`to_dict` output, validated first (keys and types, the
        feature list against the metrics, the context settings and what the LightGBM model
        string declares, the model string's whole structure:
        :func:`zest.lightgbm_model.check_lightgbm_model`), so nothing malformed reaches
        LightGBM; any fault is one :class:`RecordError` line."""
        check_format(spec, source)
        try:
            params = checked_params(spec.get("params"), ZestRanker().get_params())
            metrics = name_list(spec.get("metrics"), "metrics")
            features = name_list(spec.get("features"), "features")
            groups = name_list(spec.get("training_groups"), "training_groups", empty=True)
            modalities = spec.get("training_modalities")  # absent: saved before the gate
            modalities = None if modalities is None else name_list(
                modalities, "training_modalities")
            model = spec.get("model")
            if not isinstance(model, dict):
                raise ValueError("'model' is not an object")
            ranker = cls(**params)
            ranker._validate()
            check_feature_order(metrics, features, use_context=ranker.use_context,
                                use_modality=ranker.use_modality, use_roles=ranker.use_roles)
            ranker._check_prior(metrics)
            ranker.metrics_, ranker.features_, ranker.groups_ = metrics, features, groups
            ranker.modalities_ = modalities
            if ranker.backend == "pairwise_logistic":
                ranker.model_string_ = None
                ranker.coefficients_ = number_list(model.get("coefficients"), "coefficients",
                                                   len(features))
                fill = model.get("fill")
                ranker.fill_ = np.asarray(number_list(fill, "fill", len(features))
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


#: Rankers loaded (and validated) in this process, by the SHA-256 of their file's bytes.
LOADED: dict[str, ZestRanker] = {}
#: The most rankers :data:`LOADED` keeps (the oldest is dropped first).
LOADED_LIMIT = 8

"""The predictor's features: records joined into one row per (group, layer), each metric
normalised within its group, and the context features beside them (ARCHITECTURE.md §3b).

Features are normalised *within each group* (rank percentile or robust z-score) so that metric
scales of different models do not leak in; context features (layer type, modality, relative
depth, share of the model's parameters, optionally the layer's role in its block) go in beside
them so the ranker can learn direction flips between families. The prior the ranker may be
blended with (:func:`blend_with_prior`) is a rank percentile within the group too.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Sequence

import numpy as np
import pandas as pd

from zest.architectures import LAYER_KINDS, layer_kind
from zest.errors import InvalidInputError, RecordError
from zest.records import metric_columns

TARGETS = ("gt_loss_gain", "gt_gain")
NORMALIZATIONS = ("rank", "robust_z")

#: What a layer does in its block, named the same way in every family, from its module name
#: (first match wins): an inverted-residual block's pointwise expansion, depthwise mixing and
#: linear projection line up with a transformer's MLP input, token mixing and MLP output.
BLOCK_ROLE_PATTERNS: tuple[tuple[str, str], ...] = (
    ("embedding", r"embed(ding)?s?(\.|_|$)|(^|\.)wte$|(^|\.)wpe$"),
    ("stem", r"^(conv_stem|conv1|stem(\.\w+)*)$|patch_embed"),
    ("attention_in", r"(query|key|value|q_proj|k_proj|v_proj|qkv|c_attn|in_proj\w*)$"),
    ("attention_out", r"(attention\.output\.dense|o_proj|out_proj|attn\.proj|attn\.c_proj)$"),
    ("mixing", r"conv_dw$"),
    ("mlp_in", r"(intermediate\.dense|up_proj|gate_proj|fc1|c_fc|conv_pw)$"),
    ("mlp_out", r"(output\.dense|down_proj|fc2|mlp\.c_proj|conv_pwl)$"),
    ("pre_head", r"(conv_head|pooler\.dense|pre_logits\.\w+)$"),
)
BLOCK_ROLES = tuple(role for role, _ in BLOCK_ROLE_PATTERNS) + ("other",)


def block_role(name: str) -> str:
    """The role of a layer in its block from its module name (:data:`BLOCK_ROLE_PATTERNS`),
    ``other`` if none. (The name a layer has in every block is
    :func:`zest.layers.layer_leaf_name`.)"""
    for role, pattern in BLOCK_ROLE_PATTERNS:
        if re.search(pattern, name):
            return role
    return "other"


def metric_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """One row per (group, layer): metric columns averaged over minibatches, identity columns
    kept."""
    if metrics.empty:
        raise RecordError("no metric records; run `zest collect metrics` first")
    keys = ["group", "layer"]
    metric_cols = metric_columns(metrics)
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
    with ``roles`` the layer's role one-hot (:func:`block_role`) and its relative position
    inside its block (0 = first layer of the block, 1 = last)."""
    out = pd.DataFrame(index=table.index)
    out["ctx_depth"] = table["depth"].astype(float)
    totals = table.groupby("group")["n_params"].transform("sum").astype(float)
    out["ctx_param_share"] = table["n_params"].astype(float) / totals
    if modality:
        out["ctx_modality_text"] = (row_modalities(table) == "text").astype(float)
    kinds = table["layer_type"].map(layer_kind)
    for kind in LAYER_KINDS:
        out[f"ctx_type_{kind}"] = (kinds == kind).astype(float)
    if roles:
        names = table["layer"].map(block_role)
        for role in BLOCK_ROLES:
            out[f"ctx_role_{role}"] = (names == role).astype(float)
        block = table["block"] if "block" in table else table["layer"]
        within = table.groupby([table["group"], block])["depth"]
        count = within.transform("count").astype(float)
        position = (within.rank(method="first") - 1) / (count - 1).where(count > 1, 1.0)
        out["ctx_block_position"] = position.where(count > 1, 0.5)
    return out


def require_metric_columns(table: pd.DataFrame, columns: Sequence[str], fix: str,
                           parameter: str | Sequence[str] = ()) -> None:
    """Raises :class:`RecordError` naming the metric columns ``table`` lacks, and ``fix`` (which
    may name the Python ``parameter`` to change)."""
    missing = sorted(set(columns) - set(table.columns))
    if missing:
        raise RecordError(f"the records lack the metrics {missing[:8]}; {fix}",
                          parameter=parameter)


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


def row_modalities(table: pd.DataFrame) -> pd.Series:
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

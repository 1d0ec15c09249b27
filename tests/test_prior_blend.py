"""The predictor's blend with a robust prior (issue 33): ``ZestRanker.prior_blend`` and its
weight chosen by nested leave-one-family-out (``zest.training.choose_prior_blend``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import kendalltau

from tests.test_predictor import synthetic_records
from zest.errors import InvalidInputError
from zest.predictor import ZestRanker
from zest.predictor_features import join_records
from zest.predictor_file import CHECKSUM_KEY, content_checksum
from zest.training import BlendChoosingRanker, choose_prior_blend


def table_with_prior(target_is_prior: bool, seed: int = 0):
    """Synthetic groups with an ``m_n_params`` column unrelated to depth; the target is either
    that prior plus a little noise (the metrics say nothing) or the metric-driven gain."""
    metrics, gt = synthetic_records(n_groups=6, flip=False, seed=seed)
    rng = np.random.default_rng(seed + 1)
    prior = {key: rng.uniform(1, 1e6) for key in metrics[["group", "layer"]].itertuples(
        index=False)}
    metrics["m_n_params"] = [prior[key] for key in metrics[["group", "layer"]].itertuples(
        index=False)]
    if target_is_prior:
        noisy = [np.log(prior[key]) + rng.normal(scale=0.1)
                 for key in gt[["group", "layer"]].itertuples(index=False)]
        gt["gt_loss_gain"] = noisy
        gt["gt_gain"] = noisy
    return join_records(metrics, gt, "gt_loss_gain")


def test_blend_weights_zero_and_one_give_the_ranker_and_the_prior():
    table = table_with_prior(target_is_prior=False)
    metrics = ["m_a", "m_b", "m_c", "m_n_params"]
    alone = ZestRanker(n_estimators=30).fit(table, table["gt_loss_gain"], metrics)
    prior_only = ZestRanker(n_estimators=30, prior_blend=1.0).fit(
        table, table["gt_loss_gain"], metrics)
    half = ZestRanker(n_estimators=30, prior_blend=0.5).fit(table, table["gt_loss_gain"], metrics)
    group = table[table["group"] == table["group"].iloc[0]]
    np.testing.assert_allclose(alone.predict(group), half.predict_ranker(group))
    assert kendalltau(prior_only.predict(group), group["m_n_params"]).statistic == pytest.approx(1)
    between = half.predict(group)
    assert 0 < kendalltau(between, group["m_n_params"]).statistic < 1
    assert 0 < kendalltau(between, alone.predict(group)).statistic < 1


def test_prior_blend_is_validated():
    table = table_with_prior(target_is_prior=False)
    with pytest.raises(InvalidInputError, match="prior_blend is 1.5"):
        ZestRanker(prior_blend=1.5).fit(table, table["gt_loss_gain"], ["m_a", "m_n_params"])
    with pytest.raises(InvalidInputError, match="prior_metric 'snip'"):
        ZestRanker(prior_blend=0.3, prior_metric="snip").fit(table, table["gt_loss_gain"],
                                                             ["m_a", "m_n_params"])


def test_blend_is_saved_and_files_written_before_it_load_as_the_ranker_alone(tmp_path):
    table = table_with_prior(target_is_prior=False)
    metrics = ["m_a", "m_b", "m_c", "m_n_params"]
    blended = ZestRanker(n_estimators=30, prior_blend=0.4).fit(table, table["gt_loss_gain"],
                                                               metrics)
    loaded = ZestRanker.load(blended.save(tmp_path / "blend.json"))
    assert loaded.prior_blend == 0.4 and loaded.prior_metric == "n_params"
    np.testing.assert_allclose(loaded.predict(table), blended.predict(table))
    spec = json.loads((tmp_path / "blend.json").read_text())
    for name in ("prior_blend", "prior_metric", "unseen_modality_blend",
                 "feature_fraction"):  # a file from before issue 33
        del spec["params"][name]
    del spec["training_modalities"]
    spec.pop(CHECKSUM_KEY)
    spec[CHECKSUM_KEY] = content_checksum(spec)
    (tmp_path / "old.json").write_text(json.dumps(spec))
    old = ZestRanker.load(tmp_path / "old.json")
    assert old.prior_blend == 0.0
    np.testing.assert_allclose(old.predict(table), blended.predict_ranker(table))


def test_nested_choice_leans_on_the_prior_only_when_held_out_families_need_it():
    metrics = ["m_a", "m_b", "m_c", "m_n_params"]
    params = {"n_estimators": 30, "use_context": False}
    informative = table_with_prior(target_is_prior=False)
    assert choose_prior_blend(informative, informative["gt_loss_gain"], metrics, params,
                              grid=(0.0, 1.0)) == 0.0
    # a ranker too small to order the layers (one split): the prior alone ranks better
    weak = {"n_estimators": 1, "num_leaves": 2, "use_context": False}
    prior_driven = table_with_prior(target_is_prior=True)
    assert choose_prior_blend(prior_driven, prior_driven["gt_loss_gain"], metrics, weak,
                              grid=(0.0, 1.0)) == 1.0
    chosen = BlendChoosingRanker(grid=(0.0, 1.0), **weak).fit(
        prior_driven, prior_driven["gt_loss_gain"], metrics)
    assert isinstance(chosen, ZestRanker) and chosen.prior_blend == 1.0


def test_a_modality_the_ranker_never_saw_falls_back_to_the_prior(tmp_path):
    table = table_with_prior(target_is_prior=False)
    metrics = ["m_a", "m_b", "m_c", "m_n_params"]
    image = table[table["modality"] == "image"]
    gated = ZestRanker(n_estimators=30, unseen_modality_blend=1.0).fit(
        image, image["gt_loss_gain"], metrics)
    assert gated.modalities_ == ["image"]
    text_group = table[table["group"] == table.loc[table["modality"] == "text", "group"].iloc[0]]
    image_group = image[image["group"] == image["group"].iloc[0]]
    assert kendalltau(gated.predict(text_group),
                      text_group["m_n_params"]).statistic == pytest.approx(1)
    np.testing.assert_allclose(gated.predict(image_group), gated.predict_ranker(image_group))
    loaded = ZestRanker.load(gated.save(tmp_path / "gated.json"))
    assert loaded.modalities_ == ["image"]
    np.testing.assert_allclose(loaded.predict(text_group), gated.predict(text_group))


def test_feature_fraction_reaches_lightgbm_and_is_validated(tmp_path):
    table = table_with_prior(target_is_prior=False)
    metrics = ["m_a", "m_b", "m_c", "m_n_params"]
    whole = ZestRanker(n_estimators=30).fit(table, table["gt_loss_gain"], metrics)
    half = ZestRanker(n_estimators=30, feature_fraction=0.5).fit(table, table["gt_loss_gain"],
                                                                 metrics)
    assert "feature_fraction: 0.5" in half.model_string_
    assert not np.allclose(whole.predict(table), half.predict(table))
    loaded = ZestRanker.load(half.save(tmp_path / "half.json"))
    assert loaded.feature_fraction == 0.5
    np.testing.assert_allclose(loaded.predict(table), half.predict(table))
    with pytest.raises(InvalidInputError, match="feature_fraction is 0"):
        ZestRanker(feature_fraction=0.0).fit(table, table["gt_loss_gain"], metrics)

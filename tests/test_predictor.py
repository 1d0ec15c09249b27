"""ZestRanker on synthetic groups with a known ordering, persistence, evaluation."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from zest.errors import InvalidInputError, RecordError
from zest.evaluation import evaluate, markdown_report, ndcg_at_k, top_k_recall
from zest.predictor import ZestRanker
from zest.predictor_features import join_records


def synthetic_records(n_groups: int = 6, n_layers: int = 30, seed: int = 0, flip: bool = True):
    """Groups whose true gain is a known function of the metrics: +a on 'image' groups and
    −a on 'text' groups when ``flip`` (a direction flip the ranker must learn via context),
    plus +b everywhere; c is pure noise. Scales differ wildly between groups."""
    rng = np.random.default_rng(seed)
    metric_rows, gt_rows = [], []
    for g in range(n_groups):
        modality = "image" if g % 2 == 0 else "text"
        scale = 10.0 ** rng.uniform(-3, 3)
        a, b, c = rng.normal(size=(3, n_layers))
        gain = (a if (modality == "image" or not flip) else -a) + 2 * b
        group = f"model{g % 3}__data{g}"
        for i in range(n_layers):
            base = {"model": f"model{g % 3}", "dataset": f"data{g}", "group": group,
                    "layer": f"layer.{i}", "layer_type": "Linear" if i % 2 else "Conv2d",
                    "block": f"layer.{i}", "depth": i / (n_layers - 1), "n_params": 100 + i}
            metric_rows.append({**base, "modality": modality, "batch": 0,
                                "m_a": a[i] * scale, "m_b": b[i] * scale + 5,
                                "m_c": c[i]})
            for s in (0, 1):
                noisy = gain[i] + rng.normal(scale=0.05)
                gt_rows.append({**base, "gt_seed": s, "gt_loss_gain": noisy,
                                "gt_gain": noisy})
    return pd.DataFrame(metric_rows), pd.DataFrame(gt_rows)


@pytest.mark.parametrize("backend", ["lightgbm", "pairwise_logistic"])
def test_both_backends_recover_a_known_ordering(backend):
    metrics, gt = synthetic_records(flip=False)
    table = join_records(metrics, gt, "gt_loss_gain")
    train = table[table["group"] != "model2__data5"]
    test = table[table["group"] == "model2__data5"]
    ranker = ZestRanker(backend=backend).fit(train, train["gt_loss_gain"])
    assert ranker is not None and ranker.features_
    from scipy.stats import kendalltau

    tau = kendalltau(ranker.predict(test), test["gt_loss_gain"]).statistic
    assert tau > 0.6, tau


def test_lightgbm_learns_a_direction_flip_by_modality():
    metrics, gt = synthetic_records(n_groups=8, flip=True)
    table = join_records(metrics, gt, "gt_loss_gain")
    held_out = ["model0__data6", "model1__data7"]
    train = table[~table["group"].isin(held_out)]
    ranker = ZestRanker(backend="lightgbm", n_estimators=300).fit(train, train["gt_loss_gain"])
    from scipy.stats import kendalltau

    for group in held_out:
        test = table[table["group"] == group]
        assert kendalltau(ranker.predict(test), test["gt_loss_gain"]).statistic > 0.5, group


@pytest.mark.parametrize("backend", ["lightgbm", "pairwise_logistic"])
def test_save_load_roundtrip_is_json_and_predicts_the_same(tmp_path, backend):
    metrics, gt = synthetic_records()
    table = join_records(metrics, gt, "gt_loss_gain")
    ranker = ZestRanker(backend=backend).fit(table, table["gt_loss_gain"])
    path = ranker.save(tmp_path / "p.json", cv={"logo": {"kendall": 0.5}})
    spec = json.loads(path.read_text())
    assert spec["format_version"] == 1 and spec["features"] and spec["training_groups"]
    loaded = ZestRanker.load(path)
    np.testing.assert_allclose(loaded.predict(table), ranker.predict(table), rtol=1e-9)
    assert loaded.info_["cv"]["logo"]["kendall"] == 0.5


def test_load_errors_are_one_line(tmp_path):
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text("{not json")
    with pytest.raises(RecordError, match="corrupt"):
        ZestRanker.load(corrupt)
    metrics, gt = synthetic_records(n_groups=2)
    table = join_records(metrics, gt, "gt_loss_gain")
    path = ZestRanker().fit(table, table["gt_loss_gain"]).save(tmp_path / "p.json")
    spec = json.loads(path.read_text())
    spec["format_version"] = 99
    (tmp_path / "v99.json").write_text(json.dumps(spec))
    with pytest.raises(RecordError, match="format version 99"):
        ZestRanker.load(tmp_path / "v99.json")
    ranker = ZestRanker.load(path)
    with pytest.raises(RecordError, match="m_b"):
        ranker.predict(table.drop(columns=["m_b"]))


def test_ranking_quality_helpers():
    truth = np.array([5.0, 4, 3, 2, 1, 0])
    assert ndcg_at_k(truth, truth, 3) == pytest.approx(1.0)
    assert ndcg_at_k(-truth, truth, 3) < 0.5
    assert top_k_recall(truth, truth, 2) == 1.0
    assert top_k_recall(-truth, truth, 2) == 0.0


def test_evaluate_all_schemes_and_report():
    metrics, gt = synthetic_records(n_groups=6, flip=False)
    results = evaluate(metrics, gt, schemes=("logo", "lomo", "cross_modality"),
                       make_ranker=lambda: ZestRanker(n_estimators=50))
    methods = set(results["method"])
    assert {"predictor", "a", "b", "c", "random", "first_k", "last_k",
            "noise_ceiling"} - methods == {"noise_ceiling"}
    logo = results[results["scheme"] == "logo"]
    assert logo["group"].nunique() == 6
    mean = logo.groupby("method")["kendall"].mean()
    assert mean["predictor"] > mean["c"] and mean["predictor"] > mean["random"]
    assert (results["noise_ceiling"] > 0.9).all()
    report = markdown_report(results, "gt_loss_gain")
    assert "| predictor |" in report and "noise ceiling" in report


def test_groups_still_being_collected_are_left_out():
    """A group where one layer lacks its second seed is incomplete at min_seeds=2, complete at
    1; groups without any ground truth for a layer are incomplete either way."""
    from zest.training import incomplete_groups

    metrics, groundtruth = synthetic_records(n_groups=3, n_layers=5)
    groups = sorted(metrics["group"].unique())
    drop = (groundtruth["group"] == groups[0]) & (groundtruth["layer"] == "layer.3") & \
        (groundtruth["gt_seed"] == 1)
    groundtruth = groundtruth[~drop]
    assert incomplete_groups(metrics, groundtruth, min_seeds=2) == [groups[0]]
    assert incomplete_groups(metrics, groundtruth, min_seeds=1) == []
    missing = groundtruth[~((groundtruth["group"] == groups[1]) &
                            (groundtruth["layer"] == "layer.0"))]
    assert incomplete_groups(metrics, missing, min_seeds=1) == [groups[1]]
    with pytest.raises(InvalidInputError, match="min_seeds"):
        incomplete_groups(metrics, groundtruth, min_seeds=0)


def test_a_sampled_group_is_complete_when_every_sampled_layer_has_its_seeds():
    """Ground truth on a layer sample (``gt_layer_sample``) needs only the sampled layers; a
    sampled layer with no row yet keeps the group out."""
    from zest.training import incomplete_groups

    metrics, groundtruth = synthetic_records(n_groups=2, n_layers=6)
    groups = sorted(metrics["group"].unique())
    sampled = (groundtruth["group"] == groups[0]) & groundtruth["layer"].isin(
        ["layer.0", "layer.2", "layer.4"])
    groundtruth = groundtruth[sampled | (groundtruth["group"] != groups[0])].copy()
    groundtruth["gt_layer_sample"] = groundtruth["group"].map({groups[0]: 3})
    assert incomplete_groups(metrics, groundtruth, min_seeds=2) == []
    one_seed = groundtruth[~((groundtruth["layer"] == "layer.2") & (groundtruth["gt_seed"] == 1)
                             & (groundtruth["group"] == groups[0]))]
    assert incomplete_groups(metrics, one_seed, min_seeds=2) == [groups[0]]
    not_started = groundtruth[~((groundtruth["layer"] == "layer.4")
                                & (groundtruth["group"] == groups[0]))]
    assert incomplete_groups(metrics, not_started, min_seeds=1) == [groups[0]]


def test_report_names_the_groups_where_a_peer_selector_beats_the_predictor():
    from zest.evaluation import where_beaten

    results = pd.DataFrame({
        "scheme": "logo", "group": ["g1"] * 3 + ["g2"] * 3,
        "method": ["predictor", "kappa (paper direction)", "random"] * 2,
        "kendall": [0.2, 0.5, 0.0, 0.6, 0.1, 0.0]})
    sentence = where_beaten(results, "logo")
    assert "g1: predictor 0.200 < kappa (paper direction) 0.500" in sentence
    assert "peer selectors among them" in sentence and "g2" not in sentence
    assert "No single metric" in where_beaten(results[results["group"] == "g2"], "logo")


def test_default_predictor_features_leave_the_peer_only_selectors_out(tmp_path):
    """The shipped predictor must not make `zest rank` pay for fim_score's per-example
    gradients: by default it learns from every metric but the peer-only selectors."""
    from zest.evaluation import PEER_SELECTORS, predictor_metrics
    from zest.records import write_records
    from zest.training import train_predictor

    metrics, gt = synthetic_records(n_groups=3, n_layers=8)
    rng = np.random.default_rng(0)
    for name in predictor_metrics() + ["kappa", "fim_score"]:
        metrics[f"m_{name}"] = rng.normal(size=len(metrics))
    for kind, frame in (("metrics", metrics), ("groundtruth", gt)):
        for group, part in frame.groupby("group"):
            write_records(part, tmp_path / kind / f"{group}.parquet")
    ranker, _ = train_predictor(tmp_path, tmp_path / "p.json")
    used = {m[2:] for m in ranker.metrics_}
    assert used == set(predictor_metrics()) and "rgn" in used
    assert not used & (set(PEER_SELECTORS) - {"rgn"})
    with pytest.raises(RecordError, match="lack the metrics"):
        train_predictor(tmp_path, tmp_path / "q.json", features=["a", "no_such_metric"])


def test_shipped_predictor_needs_no_hessian_vector_pass():
    """`zest rank` with the shipped predictor must skip the Hessian-vector pass (the one extra
    pass of the probe): neither the default features nor the shipped model ask for it."""
    from zest.evaluation import COSTLY_METRICS, predictor_metrics
    from zest.metrics import needs_of
    from zest.ranking import load_predictor

    assert "hvp" in needs_of(list(COSTLY_METRICS))
    assert "hvp" not in needs_of(predictor_metrics())
    shipped = [m[2:] for m in load_predictor("universal").metrics_]
    assert "hvp" not in needs_of(shipped)


def test_leave_one_family_out_holds_out_every_model_of_a_family():
    metrics, gt = synthetic_records(n_groups=6, flip=False)
    names = {"model0": "efficientnet_lite0", "model1": "efficientnet_lite2",
             "model2": "mobilenetv2"}
    for frame in (metrics, gt):
        frame["model"] = frame["model"].map(names)
        frame["group"] = frame["model"] + "__" + frame["dataset"]
    results = evaluate(metrics, gt, schemes=("lofo", "lomo"),
                       make_ranker=lambda: ZestRanker(n_estimators=30))
    lofo = results[results["scheme"] == "lofo"]
    assert set(lofo["fold"]) == {"efficientnet", "mobilenetv2"}
    held = lofo[lofo["fold"] == "efficientnet"]["group"].unique()
    assert all(g.startswith("efficientnet_lite") for g in held) and len(held) == 4
    assert results[results["scheme"] == "lomo"]["fold"].nunique() == 3
    report = markdown_report(results, "gt_loss_gain")
    assert "Per held-out family (lofo)" in report
    assert "| method | efficientnet | mobilenetv2 | mean |" in report


def test_ranking_says_when_the_model_family_is_unseen():
    from types import SimpleNamespace

    from zest.ranking import unseen_family_note

    ranker = ZestRanker()
    ranker.info_ = {"families": ["bert", "efficientnet"],
                    "cv": {"lofo_per_family": {"bert": 0.2, "efficientnet": 0.4}}}
    note = unseen_family_note(ranker, SimpleNamespace(spec="smollm2"))
    assert "llama" in note and "bert, efficientnet" in note and "0.30" in note
    assert unseen_family_note(ranker, SimpleNamespace(spec="minilm")) is None
    ranker.info_ = {}
    assert unseen_family_note(ranker, SimpleNamespace(spec="smollm2")) is None


def test_a_predictor_file_is_validated_once_per_content(tmp_path, monkeypatch):
    """``ZestRanker.load`` keeps what it validated, by the bytes' SHA-256: the same file again
    is not re-checked, an edited one is (and a damaged edit is still refused)."""
    import json as _json

    import zest.predictor as predictor_module
    from zest.predictor import ZestRanker
    from zest.predictor_file import CHECKSUM_KEY, content_checksum
    from zest.ranking import shipped_predictor_path

    path = tmp_path / "p.json"
    path.write_bytes(shipped_predictor_path().read_bytes())
    first = ZestRanker.load(path)
    calls = []
    real = predictor_module.check_lightgbm_model
    monkeypatch.setattr(predictor_module, "check_lightgbm_model",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    again = ZestRanker.load(path)
    assert calls == [] and again is not first and again.features_ == first.features_
    spec = _json.loads(path.read_text())
    spec.pop(CHECKSUM_KEY)
    spec["groups"] = ["edited"]
    spec[CHECKSUM_KEY] = content_checksum(spec)
    path.write_text(_json.dumps(spec))
    ZestRanker.load(path)
    assert calls == [1]
    path.write_text(path.read_text().replace('"edited"', '"damaged"'))
    with pytest.raises(RecordError, match="checksum"):
        ZestRanker.load(path)

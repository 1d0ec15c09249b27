"""The accuracy benchmark's resumable results: a run of some groups keeps every other group's rows.

A run of ``benchmarks/accuracy_budget.py --groups G`` once dropped the ZEST rows of every other
group (their held-out predictors were not fingerprinted, so the rows looked stale): 162 finished
results were lost from the committed JSON before anyone noticed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

accuracy_budget = pytest.importorskip("accuracy_budget")

from zest.planning import spread_rule  # noqa: E402


def row(group: str, method: str, predictor_sha: str | None = "abc", **extra) -> dict:
    base = {"group": group, "budget": 0.01, "method": method, "seed": 0, "lr": 1e-3,
            "val_accuracy": 0.5, "test_accuracy": 0.5, "trainable_share": 0.01,
            accuracy_budget.HEAD_IN_BUDGET: True}
    if method.startswith("zest"):
        base.update(predictor_sha=predictor_sha, planned_by=accuracy_budget.PLANNED_BY,
                    spread=spread_rule(method.split()[2], base["budget"]).spread
                    if method.startswith(("zest + gps", "zest + spsft")) else None)
    return {**base, **extra}


@pytest.mark.parametrize("kind", ["trials", "results"])
def test_rows_of_groups_not_run_are_kept_whatever_their_predictor(kind):
    rows = [row("other", "zest + gps", predictor_sha="old"), row("other", "random-k + dense"),
            row("run", "zest + gps", predictor_sha="abc"),
            row("run", "zest + spsft", predictor_sha="stale")]
    kept = accuracy_budget._kept_rows(kind, rows, {"run": "abc"}, redo=set())
    assert [(r["group"], r["method"]) for r in kept] == [
        ("other", "zest + gps"), ("other", "random-k + dense"), ("run", "zest + gps")]


def test_redo_drops_the_method_only_in_the_groups_run():
    rows = [row("other", "kappatune + dense"), row("run", "kappatune + dense"),
            row("run", "fim + dense")]
    kept = accuracy_budget._kept_rows("results", rows, {"run": "abc"},
                                      redo={"kappatune + dense"})
    assert [(r["group"], r["method"]) for r in kept] == [
        ("other", "kappatune + dense"), ("run", "fim + dense")]


def test_results_without_a_chosen_rate_and_over_budget_rows_are_redone():
    rows = [row("run", "fim + dense", lr=None), row("run", "last-k + dense"),
            row("run", "random-k + dense", trainable_share=0.02,
                **{accuracy_budget.HEAD_IN_BUDGET: False})]
    del rows[0]["lr"]
    kept = accuracy_budget._kept_rows("results", rows, {"run": "abc"}, redo=set())
    assert [r["method"] for r in kept] == ["last-k + dense"]


def test_a_results_file_keeps_its_settings_and_refuses_a_run_with_others(tmp_path):
    import _results

    path = tmp_path / "accuracy.json"
    data = _results.load(path, {"epochs": 2})
    data["results"].append(row("run", "full"))
    _results.save(path, data, "test machine")
    assert _results.load(path, {"epochs": 2})["results"] == data["results"]
    with pytest.raises(SystemExit, match="--epochs 2, not 3: pass --out NEW.json to keep "
                                         "both, or --epochs 2 to resume it"):
        _results.load(path, {"epochs": 3})


def test_a_file_from_before_settings_were_kept_takes_the_runs(tmp_path):
    import _results

    path = tmp_path / "old.json"
    _results.save(path, {"results": [row("run", "full")]}, "test machine")
    assert _results.load(path, {"batches": 8})["settings"] == {"batches": 8}


def test_the_shipped_plan_rules_are_what_the_committed_benchmark_measured(monkeypatch):
    """Issue 22: the plan's rules are chosen by measurement. Each spread of SPREAD_RULES and
    each method of METHOD_RULES is the best on val of its budget in the committed accuracy
    benchmark (as the README's "The plan's rules, measured" reads it), and each reason quotes
    the figure it rests on: rerun ``benchmarks/report.py`` and update ``zest/planning.py``
    when new results change a winner."""
    import report

    from zest.planning import choose_method

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # report reads benchmarks/results
    data = report.load_accuracy()
    assert data is not None, "no committed accuracy_budget.json results"
    budgets = sorted({r["budget"] for r in data["results"] if r["budget"] is not None},
                     reverse=True)
    measured = report.measured_rules(report.whole_grid_results(data), budgets)
    assert measured["spread"] and measured["method"]
    for (budget, tuner), (groups, means) in measured["spread"].items():
        rule, best = spread_rule(tuner, budget), max(means)
        winner = measured["spreads"][means.index(best)]
        assert rule.spread == winner, f"{tuner} at ~{budget:.0%}: spread {winner:g} led"
        assert f"val {100 * best:.1f} %" in rule.reason and f"{len(groups)} groups" in \
            rule.reason, f"{tuner} at ~{budget:.0%}: {100 * best:.1f} over {len(groups)}"
    for budget, (groups, means) in measured["method"].items():
        (tuner, _), best = max(means.items(), key=lambda item: item[1])
        rule = choose_method(budget)
        assert rule.method == tuner, f"~{budget:.0%}: {tuner} led"
        assert f"val {100 * best:.1f} %" in rule.reason and f"{len(groups)} groups" in \
            rule.reason, f"~{budget:.0%}: {100 * best:.1f} over {len(groups)} groups"


def test_the_shipped_rates_are_the_measured_best():
    """Issue 35: every ``zest.rates.RATE_RULES`` row the benchmark measures is the rate of the
    best mean val accuracy there, and its reason quotes the number of cases it rests on."""
    report = pytest.importorskip("report")
    from zest.rates import RATE_RULES

    data = report.load_accuracy()
    measured = report.measured_rates(data["trials"])
    assert measured, "the committed benchmark measured no rate"
    for cell, m in measured.items():
        rule = RATE_RULES[cell]
        assert rule.lr == m["best"], (cell, rule.lr, m["best"])
        assert f"{m['cases']} cases" in rule.reason, (cell, rule.reason)
        assert ("at the grid's" in rule.reason) == m["edge"], (cell, rule.reason)

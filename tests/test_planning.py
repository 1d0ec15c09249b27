"""Budget plans (``Ranking.finetune_plan``): what they train, that they fill the budget, ``--method
auto``, what ``config.json`` records, and what is refused."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from tests.conftest import TINY_MODELS
from zest.cli import app
from zest.errors import InvalidInputError
from zest.finetune import METHODS
from zest.finetune.registry import LayerShape, tuner_defaults
from zest.layers import candidate_layers
from zest.loading import DataOptions, load_pair
from zest.models import load_model
from zest.planning import (
    AUTO,
    DEFAULT_SPREAD,
    FILL_TOLERANCE,
    METHOD_RULES,
    SPREAD_RULES,
    PlanRule,
    choose_method,
    plan_finetune,
    spread_rule,
)

runner = CliRunner()
IMAGE_OPTIONS = DataOptions(image_size=16, max_train=32, max_val=16, max_test=16)
TEXT_OPTIONS = DataOptions(max_length=16, max_train=32, max_val=16, max_test=16)
PLANNED = ("layers", "gps", "spsft", "lora")
#: A budget each tiny model's tunable layers can fill (the text ones are 97 % word embeddings,
#: which the sparse plans leave to budgets of their size)
BUDGETS = {"tiny_cnn": 0.1, "tiny_resnet": 0.05, "tiny_vit": 0.1, "tiny_bert": 0.01,
           "tiny_llama": 0.01}


def _pair(spec: str):
    if spec in ("tiny_bert", "tiny_llama"):
        return load_pair(spec, "rotten_tomatoes", options=TEXT_OPTIONS)
    return load_pair(spec, "digits", options=IMAGE_OPTIONS)


def _worst_first(model, task) -> list[str]:
    """A ranking for the plan to read: the candidates from the last to the first."""
    return [layer.name for layer in candidate_layers(model, task.head_name)][::-1]


@pytest.mark.parametrize("method", PLANNED)
@pytest.mark.parametrize("spec", TINY_MODELS)
def test_the_tuner_trains_exactly_what_the_plan_counts(spec, method):
    """The plan's count (head included) equals the tuner's measured count, fills the budget
    within FILL_TOLERANCE without exceeding it, and holds only layers the method can tune."""
    model, task, data = _pair(spec)
    budget = BUDGETS[spec]
    plan = plan_finetune(_worst_first(model, task), model, task, method, budget)
    tuner_class = METHODS.get(plan.method)
    assert plan.layers and all(tuner_class.can_tune(n, model.get_submodule(n))
                               for n in plan.layers)
    assert (1 - FILL_TOLERANCE) * budget <= plan.trainable_share <= budget and not plan.notes
    tuner = tuner_class(model, task, layers=plan.layers, **plan.options)
    tuner.fit(data, epochs=1, batch_size=16, max_steps=1)
    assert tuner.trainable_params_ == plan.trainable_params
    if method != "layers":
        assert plan.spread == spread_rule(method, budget).spread
        assert plan.options[tuner_class.options_class.density_options[0]] is not None


@pytest.fixture(scope="module")
def tiny_models():
    return {spec: load_model(spec, 3, seed=0) for spec in TINY_MODELS}


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=st.sampled_from(TINY_MODELS), method=st.sampled_from(PLANNED),
       budget=st.floats(min_value=0.002, max_value=1.0),
       spread=st.floats(min_value=1.0, max_value=16.0), seed=st.integers(0, 2 ** 16))
def test_generated_plans_never_exceed_the_budget_and_say_when_they_fall_short(
        tiny_models, spec, method, budget, spread, seed):
    model, task = tiny_models[spec]
    names = _worst_first(model, task)
    order = [names[i] for i in torch.randperm(len(names),
                                              generator=torch.Generator().manual_seed(seed))]
    try:
        plan = plan_finetune(order, model, task, method, budget, spread=spread)
    except InvalidInputError as error:  # only a budget below the head and the smallest layer
        assert "param_budget" in str(error) and "raise" in str(error)
        return
    tuner_class = METHODS.get(method)
    assert plan.trainable_share <= budget
    assert plan.trainable_share >= (1 - FILL_TOLERANCE) * budget or plan.notes
    assert plan.layers == [n for n in order if n in set(plan.layers)]  # best first
    assert all(tuner_class.can_tune(n, model.get_submodule(n)) for n in plan.layers)
    for name, entry in plan.per_layer.items():
        options = {**tuner_defaults(method), **plan.options}
        expected = tuner_class.layer_trainable(LayerShape.of(model.get_submodule(name)),
                                               options)
        assert entry == {"params": entry["params"], **expected}


def test_a_given_density_is_kept_and_only_the_layers_are_planned(tiny_models):
    model, task = tiny_models["tiny_vit"]
    plan = plan_finetune(_worst_first(model, task), model, task, "gps", 0.1,
                         options={"k": 4})
    assert plan.options == {"k": 4} and plan.spread is None
    assert {entry["k"] for entry in plan.per_layer.values()} == {4}
    assert plan.trainable_share <= 0.1


def test_spread_trades_layers_for_density(tiny_models):
    """A larger spread holds more layers, each more sparsely."""
    model, task = tiny_models["tiny_vit"]
    names = _worst_first(model, task)
    plans = [plan_finetune(names, model, task, "spsft", 0.1, spread=s) for s in (1, 2, 4, 8)]
    held = [sum(e["params"] for e in p.per_layer.values()) for p in plans]
    ratios = [p.options["ratio"] for p in plans]
    assert held == sorted(held) and held[0] < held[-1]
    assert ratios == sorted(ratios, reverse=True) and ratios[0] > ratios[-1]


def test_without_a_budget_the_plan_takes_the_top_layers_at_the_method_density(tiny_models):
    model, task = tiny_models["tiny_bert"]
    names = _worst_first(model, task)
    plan = plan_finetune(names, model, task, "spsft", top_k=3)
    tunable = [n for n in names if METHODS.get("spsft").can_tune(n, model.get_submodule(n))]
    assert plan.layers == tunable[:3] and plan.options == {}
    assert len(plan_finetune(names, model, task, "gps").layers) == 5  # DEFAULT_TOP_K


def test_method_auto_follows_the_declared_rules(tiny_models):
    assert [rule.min_budget for rule in METHOD_RULES] == sorted(
        (rule.min_budget for rule in METHOD_RULES), reverse=True)
    assert METHOD_RULES[-1].min_budget == 0
    assert all(METHODS.get(rule.method).uses_layers for rule in METHOD_RULES)
    for rule in METHOD_RULES:  # each rule holds from its own budget up to the next one's
        assert choose_method(max(rule.min_budget, 1e-6)) == rule
    model, task = tiny_models["tiny_cnn"]
    plan = plan_finetune(_worst_first(model, task), model, task, AUTO, 0.01)
    assert (plan.method, plan.method_rule) == (choose_method(0.01).method,
                                               choose_method(0.01).reason)
    assert plan.spread == spread_rule(plan.method, 0.01).spread


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="gps", param_budget=0.0), "^param_budget"),
    (dict(method="gps", param_budget=1.5), "^param_budget"),
    (dict(method="gps", param_budget=True), "^param_budget"),
    (dict(method="gps", param_budget=0.1, top_k=3), "either"),
    (dict(method="gps", param_budget=0.1, spread=0.5), "^spread"),
    (dict(method="gps", param_budget=0.1, spread=math.nan), "^spread"),
    (dict(method="auto"), "pass param_budget"),
    (dict(method="auto", param_budget=0.1, options={"k": 2}), "drop k"),
    (dict(method="spsft", param_budget=0.1, options={"k": 2}), "takes no option k"),
    (dict(method="full", param_budget=0.1), "fixed set"),
    (dict(method="gps", param_budget=0.001), "head alone"),
    (dict(method="layers", param_budget=0.012), "smallest layer"),
    (dict(method="spsft", top_k=99), "smaller top_k"),
])
def test_bad_plan_requests_are_refused(tiny_models, kwargs, message):
    model, task = tiny_models["tiny_cnn"]
    kwargs = dict(kwargs)
    method = kwargs.pop("method")
    with pytest.raises(InvalidInputError, match=message):
        plan_finetune(_worst_first(model, task), model, task, method, **kwargs)


def test_plan_rule_validates_its_spread_and_budget():
    assert PlanRule().spread == DEFAULT_SPREAD
    for bad in (0.99, -1, math.inf, "4", True):
        with pytest.raises(InvalidInputError, match="^spread"):
            PlanRule(spread=bad)
    for bad in (-0.1, 1.0):
        with pytest.raises(InvalidInputError, match="min_budget"):
            PlanRule(2.0, min_budget=bad)


def test_spread_rules_cover_every_budget_of_their_method():
    """Each method's rules run from the largest min_budget down to 0 (every budget has one),
    each holds from its own budget up to the next one's, and each says why; LoRA (unmeasured)
    takes DEFAULT_SPREAD without a reason."""
    assert set(SPREAD_RULES) <= set(METHODS.names())
    for method, rules in SPREAD_RULES.items():
        minima = [rule.min_budget for rule in rules]
        assert minima == sorted(minima, reverse=True) and minima[-1] == 0
        for rule in rules:
            assert rule.reason and spread_rule(method, max(rule.min_budget, 1e-6)) == rule
        assert spread_rule(method, None) == rules[-1]
    assert spread_rule("lora", 0.05) == PlanRule() and not PlanRule().reason


@pytest.mark.parametrize("budget", [0.05, 0.1])
def test_each_sparse_method_plans_with_its_measured_spread_unless_given_one(budget):
    """Without a spread the plan takes the method's SPREAD_RULES entry for the budget (LoRA,
    unmeasured: DEFAULT_SPREAD) and records it with its reason; a spread from the caller wins
    and carries no rule."""
    model, task, _ = _pair("tiny_cnn")
    ranked = _worst_first(model, task)
    for method in ("gps", "spsft", "lora"):
        rule = spread_rule(method, budget)
        plan = plan_finetune(ranked, model, task, method, budget)
        assert (plan.spread, plan.spread_rule) == (rule.spread, rule.reason or None)
        assert plan.to_dict()["spread_rule"] == plan.spread_rule
        for spread in (1.0, 8.0):
            given = plan_finetune(ranked, model, task, method, budget, spread=spread)
            assert (given.spread, given.spread_rule) == (spread, None)
            if spread == plan.spread:
                assert given.layers == plan.layers and given.options == plan.options
    wide = plan_finetune(ranked, model, task, "gps", budget, spread=8.0)
    narrow = plan_finetune(ranked, model, task, "gps", budget, spread=1.0)
    assert len(wide.layers) >= len(narrow.layers)


def test_cli_plan_line_says_which_spread_rule_it_followed(tmp_path):
    result = runner.invoke(app, ["finetune", "--model", "tiny_cnn", "--dataset", "digits",
                                 "--image-size", "16", "--max-train", "32", "--max-val", "16",
                                 "--method", "gps", "--param-budget", "0.1", "--epochs", "1",
                                 "--batch-size", "16", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    rule = spread_rule("gps", 0.1)
    assert f"spread {rule.spread:g}: the chosen layers hold up to" in result.output
    assert rule.reason in result.output
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["plan"]["spread_rule"] == rule.reason


def test_cli_method_auto_reports_its_choice_and_checks_the_budget_once(tmp_path,
                                                                        monkeypatch):
    import zest.planning

    checked = []
    check = zest.planning.check_param_budget
    monkeypatch.setattr(zest.planning, "check_param_budget",
                        lambda budget: (checked.append(budget), check(budget))[1])
    result = runner.invoke(app, ["finetune", "--model", "tiny_cnn", "--dataset", "digits",
                                 "--image-size", "16", "--max-train", "32", "--max-val", "16",
                                 "--method", "auto", "--param-budget", "0.028", "--epochs", "1",
                                 "--batch-size", "16", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert checked == [0.028]  # once, at the request; the plan reads the validated value
    rule = choose_method(0.028)
    assert f"--method auto chose {rule.method}" in result.output
    assert rule.reason in result.output
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["method"] == rule.method and config["plan"]["method_rule"] == rule.reason


@pytest.mark.slow
@pytest.mark.parametrize("spec, dataset", [("minilm", "rotten_tomatoes"),
                                           ("efficientnet_lite0", "digits"),
                                           ("efficientnet_lite2", "digits"),
                                           ("mobilenetv2", "digits")])
def test_the_default_finetune_runs_on_the_packaged_models(spec, dataset, tmp_path):
    """``zest finetune --model M --dataset D`` with its defaults, one short epoch (SmolLM2 too
    ran so, in 6.5 minutes on a busy 2-core machine: too long for the suite)."""
    from zest.pipeline import run_finetune

    result = run_finetune(spec, dataset, tmp_path / "run", epochs=1, batch_size=8,
                          options=DataOptions(max_length=32, image_size=64, max_train=16,
                                              max_val=8, max_test=8))
    assert result["plan"]["layers"] and \
        result["trainable_params"] == result["plan"]["planned_trainable_params"]
    assert (tmp_path / "run" / "delta.safetensors").exists()


def test_library_errors_name_the_parameter_and_the_cli_its_flag(tmp_path):
    from zest.finetune import LoRAOptions
    from zest.pipeline import FinetuneRequest

    with pytest.raises(InvalidInputError, match=r"^param_budget must be in \(0, 1\], got 0$"):
        FinetuneRequest("tiny_cnn", "digits", tmp_path / "run", param_budget=0)
    with pytest.raises(InvalidInputError, match="^rank must be a positive integer, got 0$"):
        LoRAOptions(rank=0)
    base = ["--model", "tiny_cnn", "--dataset", "digits"]
    for args, line in (
            (["finetune", *base, "--out", str(tmp_path / "run"), "--param-budget", "0"],
             "error: --param-budget must be in (0, 1], got 0.0"),
            (["finetune", *base, "--out", str(tmp_path / "run"), "--method", "lora",
              "--lora-rank", "0"], "error: --lora-rank must be a positive integer, got 0"),
            (["finetune", *base, "--out", str(tmp_path / "run"), "--layers", "top:3",
              "--param-budget", "0.1"], "error: --layers top:3 and --param-budget 0.1 "
             "contradict each other; pass one (a budget goes with --layers auto)"),
            (["rank", *base, "--top-k", "0"], "error: --top-k must be a positive integer, got 0")):
        result = runner.invoke(app, args)
        assert result.exit_code == 1 and result.output.strip() == line, result.output
    assert not (tmp_path / "run").exists()


def test_message_for_renames_only_the_parameters_an_error_names():
    from zest.errors import message_for

    error = InvalidInputError("method='gps' needs k=2 (ranking.top(k) takes its own k); pass "
                              "check_base=False or a layer_k", parameter=("method", "k",
                                                                          "check_base"))
    flags = {"method": "--method", "k": "--top-k", "check_base": "--check-base",
             "check_base=False": "--no-check-base", "layer_k": "--layer-k"}
    assert message_for(error, flags) == ("--method gps needs --top-k 2 (ranking.top(k) takes "
                                         "its own --top-k); pass --no-check-base or a layer_k")
    assert message_for(InvalidInputError("k must be positive"), flags) == "k must be positive"

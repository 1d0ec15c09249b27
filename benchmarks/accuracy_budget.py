"""Test accuracy at a parameter budget (issues 7, 9 and 22): every method, 3 seeds, ~5 % and ~1 %.

For each group and budget: full fine-tuning and head only (budget-free references), LoRA (on
every linear layer, and on peft's default targets of the model type: BERT's query/value,
LLaMA's q_proj/v_proj), GPS and SPSFT on all layers, and layer choices of the same budget —
ZEST, random-k, last-k, KappaTune (lowest κ) and FIM (highest share of the empirical Fisher) —
each trained densely (``layers``); ZEST's choice also with GPS and SPSFT updates.

Every budget counts the head, for every method (issue 22). "All layers" is the shared plan
(``zest.planning.plan_finetune``) over the layers in network order with a spread so wide that
every layer fits densely: the densest setting (LoRA rank, GPS's K, SPSFT's ratio) at which they
fit the budget, or, where even the sparsest setting on every layer exceeds it (at ~1 % on the
CNNs), as many layers as fit. Rows from before the head counted (it came on top of the
budget) that trained more than their budget are redone.

The ZEST rows are the call a user makes, ``zest.pipeline.run_finetune(model, dataset, out,
method=M, param_budget=B, spread=S, predictor=P, ...)`` (``zest finetune --method M
--param-budget B --spread S --predictor P``): it ranks one training minibatch and trains what
``Ranking.plan`` chooses (the layers M can tune, and GPS's K / SPSFT's ratio filling the budget,
head included). ``--spread 1,2,4,8`` adds ZEST + GPS/SPSFT rows at other spreads (labelled
``zest + gps (spread 2)``; the spread each method ships for the budget unlabelled), the
measurement that chooses the defaults (``zest.planning.SPREAD_RULES``). ZEST rows recorded
before the plan existed (no ``planned_by``) were planned by this script's own rule, and are
redone.

ZEST ranks each group with a predictor that has not seen it: trained with the shipped one's
recipe (ranker parameters, metrics, target) on every complete corpus group but the
benchmarked one, kept under ``benchmarks/results/held_out_predictors/``; trained again when the
recipe changes, or with ``--refresh-predictors`` after the corpus has grown. The shipped
predictor has seen every benchmarked group's ground truth, so ranking with it would test
recall, not prediction.

Every method gets its own Adam learning rate, chosen on the val split: at the first seed each
(group, budget, method) is trained with every rate of ``--lrs`` (the trials are kept in the
JSON), the one with the best val accuracy is reported and used for the other seeds. One rate
for all would favour some methods (full fine-tuning of BERT at 1e-3 loses to head-sized ones).
The grid brackets every method's optimum (3e-3, 1e-3, 3e-4, 1e-4 by default: with 1e-3 at its
top most methods chose 1e-3, and a sparse plan at ~1 % lost up to 10 points to full fine-tuning
that a rate of 3e-3 recovers; full fine-tuning of BERT chose the bottom, 1e-4). A rate added to
``--lrs`` reopens every case: its trial runs, and the later seeds of the cases whose choice
changes are trained again.
Resumable: every finished trial and (group, budget, method, seed) is kept in the output JSON.
Usage: python benchmarks/accuracy_budget.py [--seeds 0,1,2] [--lrs 3e-3,1e-3,3e-4,1e-4]
[--epochs 2] [--spread default|1,2,4,8] [--groups G,...] [--device cuda] [--refresh-predictors]
[--smoke] [--redo METHOD,...]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import tempfile
import time
from functools import partial
from pathlib import Path

import _results
import numpy as np

from zest.errors import InvalidInputError
from zest.finetune import METHODS
from zest.layers import candidate_layers
from zest.loading import DataOptions, load_pair
from zest.models import model_family
from zest.pipeline import run_finetune
from zest.planning import PlanRule, fill_budget, plan_finetune, spread_rule
from zest.ranking import rank, shipped_predictor_path
from zest.records import METRIC_PREFIX, group_key
from zest.training import load_corpus, train_predictor

GROUPS = [("minilm", "r8", DataOptions(max_length=64, max_train=600, max_val=200,
                                       max_test=500)),
          ("minilm", "rotten_tomatoes", DataOptions(max_length=48, max_train=600, max_val=200,
                                                    max_test=500)),
          ("efficientnet_lite0", "digits", DataOptions(image_size=64, max_train=600,
                                                       max_val=200, max_test=500)),
          ("efficientnet_lite2", "mnist5k", DataOptions(image_size=64, max_train=600,
                                                        max_val=200, max_test=500)),
          ("efficientnet_lite0", "mnist5k", DataOptions(image_size=64, max_train=600,
                                                        max_val=200, max_test=500)),
          ("mobilenetv2", "digits", DataOptions(image_size=64, max_train=600, max_val=200,
                                                max_test=500)),
          ("mobilenetv2", "mnist5k", DataOptions(image_size=64, max_train=600, max_val=200,
                                                 max_test=500)),
          # the decoder (issue 17): each run costs minutes of CPU, hours for the group; run
          # by default only with --device cuda (DECODERS)
          ("smollm2", "r8", DataOptions(max_length=64, max_train=600, max_val=200,
                                        max_test=500)),
          ("smollm2", "rotten_tomatoes", DataOptions(max_length=48, max_train=600, max_val=200,
                                                     max_test=500))]
#: The converged regime (issue 32): about 1,000 training examples a group (a VTAB-1k-like split),
#: each trial trained until val has not improved for ``--patience`` epochs (at most
#: ``--epochs``), scored at its best val epoch. The decoder groups are smaller (a smollm2 epoch
#: of 1,000 texts is ~20 CPU-minutes); ``lm:`` groups are scored by next-token loss.
CONVERGED_GROUPS = [
    ("efficientnet_lite0", "digits", DataOptions(image_size=64, max_train=1000, max_val=200,
                                                 max_test=500)),
    ("minilm", "rotten_tomatoes", DataOptions(max_length=48, max_train=1000, max_val=200,
                                              max_test=500)),
    ("efficientnet_lite0", "mnist5k", DataOptions(image_size=64, max_train=1000, max_val=200,
                                                  max_test=500)),
    ("minilm", "r8", DataOptions(max_length=64, max_train=1000, max_val=200, max_test=500)),
    ("mobilenetv2", "mnist5k", DataOptions(image_size=64, max_train=1000, max_val=200,
                                           max_test=500)),
    ("efficientnet_lite2", "mnist5k", DataOptions(image_size=64, max_train=1000, max_val=200,
                                                  max_test=500)),
    ("mobilenetv2", "digits", DataOptions(image_size=64, max_train=1000, max_val=200,
                                          max_test=500)),
    ("smollm2", "r8", DataOptions(max_length=48, max_train=400, max_val=100, max_test=300)),
    ("smollm2", "lm:r8", DataOptions(max_length=48, max_train=400, max_val=100, max_test=300)),
]
#: The converged regime's methods (issue 32's reduced set): full, head, the best LoRA, ZEST
#: with each update, last-k.
CONVERGED_METHODS = ("lora (linear / dense convs)", "lora (peft default targets)",
                     "last-k + dense")
#: The rates a grid extends to at its edges (``--extend-edges``).
RATE_LADDER = _results.RATE_LADDER
#: models whose groups the default run leaves out on a CPU
DECODERS = ("smollm2",)
SMOKE = [("tiny_cnn", "digits", DataOptions(image_size=16, max_train=64, max_val=32,
                                            max_test=32)),
         ("tiny_bert", "rotten_tomatoes", DataOptions(max_length=24, max_train=64, max_val=32,
                                                      max_test=32)),
         ("tiny_llama", "lm:rotten_tomatoes", DataOptions(max_length=24, max_train=64,
                                                          max_val=32, max_test=32))]
BUDGETS = (0.05, 0.01)
#: the tiny CNN's 10-class head alone is 2.5 % of its parameters
SMOKE_BUDGETS = (0.1, 0.05)
#: LoRA on peft's default target modules of the model type (BERT: query, value; LLaMA: q_proj,
#: v_proj), for the models peft has defaults for
LORA_PEFT_DEFAULT = "lora (peft default targets)"
#: the methods of one budget (:func:`plans` and :func:`zest_methods`); full and head only are
#: budget-free references
PLAN_METHODS = ("lora (linear / dense convs)", LORA_PEFT_DEFAULT, "gps (all layers)",
                "spsft (all layers)",
                "zest + dense", "zest + gps", "zest + spsft", "random-k + dense",
                "last-k + dense", "kappatune + dense", "fim + dense")
#: what ZEST rows record, so that rows planned otherwise (before ``Ranking.plan``) are redone
PLANNED_BY = "Ranking.plan"
#: what the other budget rows record: their plan counted the head in the budget (rows without
#: it that trained more than their budget are redone)
HEAD_IN_BUDGET = "head_in_budget"
RECORDS = Path("data/records")
HELD_OUT = Path("benchmarks/results/held_out_predictors")


def peft_default_targets(model_spec: str) -> list[str] | None:
    """peft's default LoRA target modules for the model's family (None without a default)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    return TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_family(model_spec))


def group_methods(model_spec: str, methods: list[str]) -> list[str]:
    """The methods that apply to a group's model."""
    return [m for m in methods
            if m != LORA_PEFT_DEFAULT or peft_default_targets(model_spec) is not None]


@functools.cache
def complete_groups() -> list[str]:
    """The corpus groups a predictor learns from (read once per run)."""
    metrics, _ = load_corpus(RECORDS, min_seeds=2)
    return sorted(set(metrics["group"]))


def held_out_predictor(group_name: str, refresh: bool = False) -> str:
    """The predictor that ranks ``group_name``: trained with the shipped predictor's recipe
    (its ranker parameters, metrics and target) on every group the shipped one learnt from but
    this one, and cached in :data:`HELD_OUT`. A cached one is trained again when its recipe is
    not the shipped one's, or with ``refresh`` when the corpus has grown since (its
    ``training_groups`` say what it saw; the ZEST rows it ranked are then redone). Groups
    the shipped one did not learn from get the shipped one, which never saw them."""
    shipped = json.loads(shipped_predictor_path().read_text())
    groups = [g for g in complete_groups() if g in shipped["training_groups"]]
    if group_name not in groups:
        return "universal"
    path = HELD_OUT / f"{group_name}.json"
    if path.exists():
        cached = json.loads(path.read_text())
        seen = cached.get("training_groups", [])
        if (group_name not in seen
                and (not refresh or seen == [g for g in groups if g != group_name])
                and all(cached.get(key) == shipped.get(key)
                        for key in ("params", "metrics", "target"))):
            return str(path)
    params = dict(shipped["params"])
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("metrics", "groundtruth"):
            (Path(tmp) / kind).mkdir()
            for file in (RECORDS / kind).glob("*.parquet"):
                if file.stem != group_name and file.stem in groups:
                    os.symlink(file.resolve(), Path(tmp) / kind / file.name)
        path.unlink(missing_ok=True)
        train_predictor(tmp, path, backend=params.pop("backend"),
                        normalization=params.pop("normalization"),
                        seed=params.pop("random_state"), target=shipped["target"],
                        features=[f.removeprefix(METRIC_PREFIX) for f in shipped["metrics"]],
                        **params)
    return str(path)


def pick(order: list[str], cost: dict[str, int], budget: int) -> list[str]:
    """Layers of ``order`` filling ``budget`` as ``Ranking.select`` does (at least one)."""
    return fill_budget(order, [cost[n] for n in order], budget) or \
        [min(order, key=lambda n: cost[n])]


def layer_orders(model, task, data, seed: int) -> dict[str, list[str]]:
    """Layers best first by KappaTune and FIM, from one train minibatch of the seed; every
    budget's plan reads them (ZEST ranks inside ``run_finetune``, as a user's run does)."""
    batch = data.batches("train", 32, 1, seed=seed)[0]
    return {by: rank(model, task, batch, by=by).table["layer"].tolist()
            for by in ("kappa", "fim_score")}


def zest_methods(spreads: list[float] | None, budget: float
                 ) -> dict[str, tuple[str, float | None]]:
    """ZEST's method labels at ``budget`` → (tuning method, spread): dense layers, and GPS and
    SPSFT at each of ``spreads`` (``None``: at the spread each method ships for the budget)."""
    methods: dict[str, tuple[str, float | None]] = {"zest + dense": ("layers", None)}
    for tuner in ("gps", "spsft"):
        for spread in spreads or [spread_rule(tuner, budget).spread]:
            methods[_results.zest_label(tuner, spread, budget)] = (tuner, spread)
    return methods


def plans(model, task, orders: dict[str, list[str]], budget_share: float, seed: int,
          targets: list[str] | None = None) -> dict[str, tuple[str, dict]]:
    """method label → (tuner name, keyword arguments) for one budget, ZEST's rows excepted
    (:func:`run_zest` trains what ``Ranking.plan`` chooses)."""
    layers = candidate_layers(model, task.head_name)
    names = [layer.name for layer in layers]
    total = sum(p.numel() for p in model.parameters())
    # the head trains in every method and counts in the budget, as in Ranking.plan (a
    # causal-LM task keeps its pretrained LM head: nothing to count)
    head = sum(p.numel() for p in task.head(model).parameters()) if task.tunes_head else 0
    budget = int(budget_share * total) - head
    dense = {layer.name: layer.n_params for layer in layers}
    modules = {n: model.get_submodule(n) for n in names}
    scores, fim = orders["kappa"], orders["fim_score"]
    rng = np.random.default_rng(seed)
    random_order = list(rng.permutation(names))
    last = names[::-1]
    linear = [n for n in names if type(modules[n]).__name__ == "Linear"] or \
        [n for n in names if getattr(modules[n], "groups", 1) == 1 and
         type(modules[n]).__name__ != "Embedding"]

    def everywhere(method: str, layers: list[str]) -> tuple[str, dict]:
        """``method`` on every layer of ``layers`` it can tune, at the density filling the
        budget: the shared plan with a spread so wide that every layer fits densely."""
        plan = plan_finetune(layers, model, task, method, budget_share,
                             spread=max(1.0, 1 / budget_share))
        return method, {"layers": plan.layers, **plan.options}

    defaults = {}
    if targets:
        wrapped = [n for n in linear if n.rsplit(".", 1)[-1] in targets]
        defaults = {LORA_PEFT_DEFAULT: everywhere("lora", wrapped)}
    return {
        "lora (linear / dense convs)": everywhere("lora", linear),
        **defaults,
        "gps (all layers)": everywhere("gps", [n for n in names if "position" not in n]),
        "spsft (all layers)": everywhere("spsft", names),
        "random-k + dense": ("layers", {"layers": pick(random_order, dense, budget)}),
        "last-k + dense": ("layers", {"layers": pick(last, dense, budget)}),
        "kappatune + dense": ("layers", {"layers": pick(scores, dense, budget)}),
        "fim + dense": ("layers", {"layers": pick(fim, dense, budget)}),
    }


def run(group, tuner_name: str, kwargs: dict, seed: int, epochs: int, device: str,
        lr: float, patience: int | None = None) -> dict:
    """One trial of a non-ZEST method, scored at its best val epoch (``Tuner.fit`` keeps it)."""
    model_spec, dataset, options = group
    model, task, data = load_pair(model_spec, dataset, options=options, seed=seed,
                                  device=device)
    start = time.perf_counter()
    tuner = METHODS.get(tuner_name)(model, task, lr=lr, seed=seed, **kwargs)
    tuner.fit(data, epochs=epochs, batch_size=32, patience=patience)
    val_loss, val_accuracy = tuner.evaluate(data, "val")
    test_loss, test_accuracy = tuner.evaluate(data, "test")
    total = sum(p.numel() for p in model.parameters())
    return {"lr": lr, "val_accuracy": val_accuracy, "test_accuracy": test_accuracy,
            "val_loss": val_loss, "test_loss": test_loss, "best_epoch": tuner.best_epoch_,
            "epochs_trained": len(tuner.history_),
            "trainable_params": int(tuner.trainable_params_),
            "trainable_share": tuner.trainable_params_ / total,
            "layers": len(tuner.layer_names), "layer_names": list(tuner.layer_names),
            "seconds": time.perf_counter() - start}


def run_pretrained(group, seed: int, device: str) -> dict:
    """The untouched model's val and test scores: an ``lm:`` group's reference (its pretrained
    LM head has nothing to train alone)."""
    model_spec, dataset, options = group
    model, task, data = load_pair(model_spec, dataset, options=options, seed=seed,
                                  device=device)
    start = time.perf_counter()
    scorer = METHODS.get("full")(model, task, lr=1e-3, seed=seed)  # evaluates, never fits
    val_loss, val_accuracy = scorer.evaluate(data, "val")
    test_loss, test_accuracy = scorer.evaluate(data, "test")
    return {"lr": None, "val_accuracy": val_accuracy, "test_accuracy": test_accuracy,
            "val_loss": val_loss, "test_loss": test_loss, "trainable_params": 0,
            "trainable_share": 0.0, "layers": 0, "seconds": time.perf_counter() - start}


def run_zest(group, tuner_name: str, budget: float, spread: float | None, predictor: str,
             seed: int, epochs: int, device: str, lr: float, patience: int | None = None
             ) -> dict:
    """A ZEST row: the user's call, ``run_finetune`` with ``--layers auto`` and the budget,
    scored at its best val epoch."""
    model_spec, dataset, options = group
    with tempfile.TemporaryDirectory() as out:
        result = run_finetune(model_spec, dataset, Path(out) / "run", method=tuner_name,
                              layers="auto", param_budget=budget, epochs=epochs, lr=lr,
                              patience=patience, batch_size=32, seed=seed, options=options,
                              predictor=predictor, device=device, spread=spread)
    plan = result["plan"]
    return {"lr": lr, "val_accuracy": result["val_accuracy"],
            "test_accuracy": result["test_accuracy"], "val_loss": result["val_loss"],
            "test_loss": result["test_loss"], "best_epoch": result["best_epoch"],
            "epochs_trained": len(result["epochs"]),
            "trainable_params": result["trainable_params"],
            "trainable_share": result["trainable_share"], "layers": len(plan["layers"]),
            "layer_names": plan["layers"], "options": plan["options"], "spread": plan["spread"],
            "plan_notes": plan["notes"], "planned_by": PLANNED_BY,
            "seconds": result["wall_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--lrs", default=None,
                        help="Adam learning rates to choose from on val, or 'centred': each "
                        "case starts from zest.rates' default for its method and model kind "
                        "and its neighbours on RATE_LADDER (default: 3e-3,1e-3,3e-4,1e-4; "
                        "centred in the converged regime)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs (quick: 2); in the converged regime the most epochs "
                        "(default 30; decoders 5)")
    parser.add_argument("--regime", choices=("quick", "converged"), default="quick",
                        help="quick: 2 epochs x 600 examples, every method (the committed "
                        "accuracy_budget.json); converged: ~1,000 examples, trained until val "
                        "stops improving (--patience), the reduced method set, rate grids "
                        "extended at their edges (accuracy_converged.json)")
    parser.add_argument("--patience", type=int, default=None,
                        help="converged regime: stop a trial after this many epochs without a "
                        "better val epoch (default 4; decoders 2)")
    parser.add_argument("--extend-edges", action=argparse.BooleanOptionalAction, default=None,
                        help="when a case's best rate is the lowest or highest it tried, try "
                        "the next rate of RATE_LADDER beyond it, until the best is inside "
                        "(default: on in the converged regime)")
    parser.add_argument("--spread", default="default",
                        help="comma-separated spreads of the ZEST + GPS/SPSFT plans (the "
                        "chosen layers hold this many times the budget), e.g. 1,2,4,8 "
                        "(default: each method's zest.planning.spread_rule for the budget)")
    parser.add_argument("--groups", default="default", help="comma-separated groups to run, "
                        "e.g. minilm__r8,smollm2__r8, or all (default: every group, the "
                        "decoders' only with --device cuda: they take hours of CPU each)")
    parser.add_argument("--device", default="cpu", help="where to train (cpu, cuda)")
    parser.add_argument("--refresh-predictors", action="store_true", help="train the held-out "
                        "predictors again on the corpus as it is now (after new groups); "
                        "their ZEST rows are redone")
    parser.add_argument("--smoke", action="store_true", help="tiny models, for a quick check")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--redo", default="", help="comma-separated method labels whose "
                        "trials and results are dropped and run again (after a change to how "
                        "that method chooses or trains, e.g. 'kappatune + dense'); it acts "
                        "once: resume an interrupted redo without it")
    args = parser.parse_args()
    converged = args.regime == "converged"
    out = args.out or Path("benchmarks/results/" + (
        "accuracy_smoke.json" if args.smoke else "accuracy_converged.json" if converged
        else "accuracy_budget.json"))
    seeds = _numbers(args.seeds, "--seeds", int, "0,1,2")
    lrs_text = args.lrs or ("centred" if converged else "3e-3,1e-3,3e-4,1e-4")
    lrs = None if lrs_text == "centred" else _numbers(lrs_text, "--lrs", float,
                                                      "3e-3,1e-3,3e-4,1e-4")
    extend = converged if args.extend_edges is None else args.extend_edges
    epochs_of, patience_of = _regime_limits(args, converged)
    spreads = (None if args.spread == "default"
               else _numbers(args.spread, "--spread", float, "1,2,4,8"))
    try:
        for spread in spreads or []:
            PlanRule(spread)
    except InvalidInputError as error:
        raise SystemExit(str(error)) from None
    settings = {"epochs": args.epochs or 2} if not converged else {
        "regime": "converged", "epochs": epochs_of("cnn"), "patience": patience_of("cnn"),
        "decoder-epochs": epochs_of(DECODERS[0]), "decoder-patience": patience_of(DECODERS[0]),
        "extend-edges": extend, "lrs": lrs_text}
    machine = (f"{platform.machine()} CPU, {args.epochs or 2} epochs, lr chosen from {lrs} on "
               "val" if not converged else
               f"{platform.machine()} CPU, converged regime (at most {epochs_of('cnn')} epochs, "
               f"patience {patience_of('cnn')}; decoders {epochs_of(DECODERS[0])} / "
               f"{patience_of(DECODERS[0])}), lr chosen on val from {lrs_text}"
               + (" extended at the edges" if extend else ""))
    done = _results.load(out, settings)
    groups, budgets = (SMOKE, SMOKE_BUDGETS) if args.smoke else (
        CONVERGED_GROUPS if converged else GROUPS, BUDGETS)
    others = [m for m in (CONVERGED_METHODS if converged else PLAN_METHODS)
              if not m.startswith("zest")]
    zest = {budget: zest_methods(spreads, budget) for budget in budgets}
    methods = {budget: others + list(zest[budget]) for budget in budgets}
    if args.groups == "default" and args.device == "cpu":
        groups = [g for g in groups if g[0] not in DECODERS]
    elif args.groups not in ("all", "default"):
        wanted = [g.strip() for g in args.groups.split(",") if g.strip()]
        known = {group_key(m, d): (m, d, o) for m, d, o in groups}
        if set(wanted) - set(known):
            raise SystemExit(f"--groups: unknown groups {sorted(set(wanted) - set(known))}; "
                             f"known: {', '.join(known)}")
        groups = [known[g] for g in wanted]
    redo = {m.strip() for m in args.redo.split(",") if m.strip()}
    known = {m for budget in methods.values() for m in budget} | {"full", "head"}
    if redo - known:
        raise SystemExit(f"--redo: unknown methods {sorted(redo - known)}; known: "
                         f"{sorted(known)}")
    predictors = {group_key(m, d): held_out_predictor(group_key(m, d), args.refresh_predictors)
                  for m, d, _ in groups}
    fingerprints = {name: _results.predictor_fingerprint(p) for name, p in predictors.items()}
    for kind in ("trials", "results"):
        done[kind] = _kept_rows(kind, done.get(kind, []), fingerprints, redo)
    results = {(r["group"], r["budget"], r["method"], r["seed"]): r for r in done["results"]}

    def settled(key: tuple) -> bool:
        """A result stands while its learning rate is the best of its case's grid at the first
        seed (a rate added to ``--lrs`` reopens every case: its trial runs, and the later seeds
        of the cases whose choice it changes are trained again)."""
        group_name, budget, method, _ = key
        return key in results and results[key]["lr"] == _chosen_lr(
            done["trials"], {"group": group_name, "budget": budget, "method": method}, lrs,
            extend)

    # seed-major, so that a partial run already covers every group
    for seed in seeds:
        for group in groups:
            name = group_key(group[0], group[1])
            epochs, patience = epochs_of(group[0]), patience_of(group[0])
            if not _tunes_head(group) and (name, None, "pretrained", seed) not in results:
                results[name, None, "pretrained", seed] = {
                    "group": name, "budget": None, "method": "pretrained", "seed": seed,
                    **run_pretrained(group, seed, args.device)}
                done["results"] = list(results.values())
                _results.save(out, done, machine)
            todo = [(m, None, partial(run, group, m, {}, seed, epochs, args.device,
                                      patience=patience))
                    for m in ("full", "head") if m != "head" or _tunes_head(group)]
            pending = [budget for budget in budgets if not all(
                settled((name, budget, m, seed))
                for m in group_methods(group[0], methods[budget]))]
            if pending:
                model, task, data = load_pair(group[0], group[1], options=group[2], seed=seed,
                                              device=args.device)
                orders = layer_orders(model, task, data, seed)
                for budget in pending:
                    for method, (tuner, kwargs) in plans(
                            model, task, orders, budget, seed,
                            peft_default_targets(group[0])).items():
                        if method in methods[budget]:
                            todo.append((method, budget, partial(
                                run, group, tuner, kwargs, seed, epochs, args.device,
                                patience=patience)))
                    for method, (tuner, spread) in zest[budget].items():
                        todo.append((method, budget, partial(
                            run_zest, group, tuner, budget, spread, predictors[name], seed,
                            epochs, args.device, patience=patience)))
            for method, budget, train in todo:
                if settled((name, budget, method, seed)):
                    continue
                case = {"group": name, "budget": budget, "method": method}
                if method.startswith("zest"):
                    case["predictor_sha"] = fingerprints[name]
                elif budget is not None:
                    case[HEAD_IN_BUDGET] = True
                if seed == seeds[0]:
                    while True:  # the trials that choose this method's learning rate
                        missing = [lr for lr in _case_rates(done["trials"], case, lrs, extend)
                                   if not any(_same_case(t, case) and t["lr"] == lr
                                              for t in done["trials"])]
                        if not missing:
                            break
                        done["trials"].append({**case, "seed": seed, **train(lr=missing[0])})
                        _results.save(out, done, machine)
                    result = _best_trial(done["trials"], case, lrs, extend)
                else:
                    lr = _best_trial(done["trials"], case, lrs, extend)["lr"]
                    result = {**case, "seed": seed, **train(lr=lr)}
                results[name, budget, method, seed] = result
                done["results"] = list(results.values())
                _results.save(out, done, machine)
    for r in done["results"]:
        print(f"{r['group']:32s} {str(r['budget']):5s} {r['method']:28s} seed {r['seed']}: "
              f"test acc {r['test_accuracy']:.3f} (lr {r['lr'] or 0:g}, "
              f"{r['trainable_share']:.2%} trainable)")


def _numbers(text: str, option: str, kind: type, example: str) -> list:
    """The comma-separated numbers of ``option``, or one line naming the bad value."""
    try:
        return [kind(value) for value in text.split(",")]
    except ValueError:
        raise SystemExit(f"{option}: {text!r} is not a comma-separated list of "
                         f"{kind.__name__}s; pass e.g. {example}") from None


def _kept_rows(kind: str, rows: list[dict], fingerprints: dict[str, str],
               redo: set[str]) -> list[dict]:
    """The ``kind`` rows ("trials" or "results") that stand, labelled by their spread.

    Rows of the groups being run (the keys of ``fingerprints``) are redone when they are ZEST
    rows ranked by another predictor or planned before ``Ranking.plan``, results from before the
    learning rate was chosen per method (no "lr"), rows of the earlier budget rule (the head on
    top of the budget) that trained more than the budget, or rows of a ``--redo`` method. Rows
    of the other groups are kept as they are: a run of some groups never drops another's.
    """
    def stands(row: dict) -> bool:
        if row["group"] not in fingerprints:
            return True
        return (_current(row, fingerprints[row["group"]]) and (kind == "trials" or "lr" in row)
                and not _over_old_budget(row) and row["method"] not in redo)

    kept = [row for row in rows if stands(row)]
    _results.relabel_spreads(kept)
    return kept


def _current(row: dict, fingerprint: str) -> bool:
    """False for a ZEST row ranked by another predictor than its group's (``fingerprint``),
    or planned other than by ``Ranking.plan``."""
    return not row["method"].startswith("zest") or (
        row.get("predictor_sha") == fingerprint and row.get("planned_by") == PLANNED_BY)


def _over_old_budget(row: dict) -> bool:
    """True for a budget row planned with the head on top of the budget that trained more than
    the budget (``Ranking.plan`` and :func:`plans` count the head in it)."""
    return (row.get("budget") is not None and not row["method"].startswith("zest")
            and not row.get(HEAD_IN_BUDGET) and row["trainable_share"] > row["budget"])


def _same_case(row: dict, case: dict) -> bool:
    return all(row.get(k) == v for k, v in case.items()
               if k not in ("predictor_sha", HEAD_IN_BUDGET))


def val_score(trial: dict) -> float:
    """What chooses a rate on val: accuracy, or minus the next-token loss for an ``lm:``
    group (scored by perplexity)."""
    if "__lm-" in trial["group"]:
        return -trial["val_loss"]
    return trial["val_accuracy"]


def _case_rates(trials: list[dict], case: dict, lrs: list[float] | None, extend: bool
                ) -> list[float]:
    """The rates ``case`` chooses from: ``lrs`` (``None``: the case's
    ``_results.centred_rates``), and with ``extend`` the next rate of :data:`RATE_LADDER`
    beyond an edge while the best trial so far sits at that edge."""
    grid = sorted(lrs if lrs is not None else
                  _results.centred_rates(case["group"], case["method"]))
    scores = {t["lr"]: val_score(t) for t in trials if _same_case(t, case)}
    while extend and all(rate in scores for rate in grid):
        best = max(grid, key=scores.get)
        lower = [r for r in RATE_LADDER if r < grid[0] * 0.99]
        higher = [r for r in RATE_LADDER if r > grid[-1] * 1.01]
        if best == grid[0] and lower:
            grid.insert(0, lower[-1])
        elif best == grid[-1] and higher:
            grid.append(higher[0])
        else:
            break
    return grid


def _best_trial(trials: list[dict], case: dict, lrs: list[float] | None, extend: bool = False
                ) -> dict:
    """The first-seed trial of ``case`` with the best val score (:func:`val_score`) over its
    grid (:func:`_case_rates`): its learning rate is the method's."""
    grid = _case_rates(trials, case, lrs, extend)
    candidates = [t for t in trials if _same_case(t, case) and t["lr"] in grid]
    if {t["lr"] for t in candidates} != set(grid):
        raise SystemExit(f"the learning rate of {case} is not chosen yet: run the first seed "
                         "(--seeds starting with it) before the others")
    return max(candidates, key=val_score)


def _chosen_lr(trials: list[dict], case: dict, lrs: list[float] | None, extend: bool = False
               ) -> float | None:
    """The learning rate of :func:`_best_trial`, or ``None`` while a rate of the case's grid
    has no first-seed trial of ``case``."""
    if {t["lr"] for t in trials if _same_case(t, case)} >= set(
            _case_rates(trials, case, lrs, extend)):
        return _best_trial(trials, case, lrs, extend)["lr"]
    return None


def _regime_limits(args: argparse.Namespace, converged: bool):
    """(model → most epochs, model → patience) of the run: ``--epochs`` / ``--patience``, or
    the converged regime's defaults (30 / 4; decoders 5 / 2: a smollm2 epoch of 400 texts
    costs about as much as 20 CNN epochs of 1,000 images, and a decoder group is sized to ~6
    CPU-hours)."""
    def epochs_of(model: str) -> int:
        if args.epochs:
            return args.epochs
        return (5 if model in DECODERS else 30) if converged else 2

    def patience_of(model: str) -> int | None:
        if not converged:
            return args.patience
        return args.patience or (2 if model in DECODERS else 4)

    return epochs_of, patience_of


def _tunes_head(group) -> bool:
    """Whether the group trains a fresh head (not an ``lm:`` group, which keeps its LM head:
    no head-only reference there)."""
    return not group[1].startswith("lm:")


if __name__ == "__main__":
    main()

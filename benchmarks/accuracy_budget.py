"""Test accuracy at a parameter budget (issues 7 and 9): every method, 3 seeds, ~5 % and ~1 %.

For each group and budget: full fine-tuning and head only (budget-free references), LoRA, GPS
and SPSFT on all layers (sized to the budget), and layer choices of the same budget — ZEST,
random-k, last-k, KappaTune (lowest κ) and FIM (highest share of the empirical Fisher) — each
trained densely (``layers``); ZEST's choice also with GPS and SPSFT updates, where the budget
counts the sparse entries.

ZEST ranks each group with a predictor that has not seen it: trained exactly like the shipped
one (``zest train-predictor`` defaults) on every corpus group but the benchmarked one, and
kept under ``benchmarks/results/held_out_predictors/``. The shipped predictor has seen all
four groups' ground truth, so ranking with it would test recall, not prediction.

Every method gets its own Adam learning rate, chosen on the val split: at the first seed each
(group, budget, method) is trained with every rate of ``--lrs`` (the trials are kept in the
JSON), the one with the best val accuracy is reported and used for the other seeds. One rate
for all would favour some methods (full fine-tuning of BERT at 1e-3 loses to head-sized ones).
Resumable: every finished trial and (group, budget, method, seed) is kept in the output JSON.
Usage: python benchmarks/accuracy_budget.py [--seeds 0,1,2] [--lrs 1e-3,1e-4] [--epochs 2]
[--smoke] [--redo METHOD,...]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import _results
import numpy as np

from zest.finetune import METHODS
from zest.layers import candidate_layers
from zest.loading import DataOptions, load_pair
from zest.ranking import fill_budget, rank
from zest.training import load_corpus, train_predictor

GROUPS = [("minilm", "r8", DataOptions(max_length=64, max_train=600, max_val=200,
                                       max_test=500)),
          ("minilm", "rotten_tomatoes", DataOptions(max_length=48, max_train=600, max_val=200,
                                                    max_test=500)),
          ("efficientnet_lite0", "digits", DataOptions(image_size=64, max_train=600,
                                                       max_val=200, max_test=500)),
          ("efficientnet_lite2", "mnist5k", DataOptions(image_size=64, max_train=600,
                                                        max_val=200, max_test=500))]
SMOKE = [("tiny_cnn", "digits", DataOptions(image_size=16, max_train=64, max_val=32,
                                            max_test=32)),
         ("tiny_bert", "rotten_tomatoes", DataOptions(max_length=24, max_train=64, max_val=32,
                                                      max_test=32))]
BUDGETS = (0.05, 0.01)
#: the methods of one budget (:func:`plans`); full and head only are budget-free references
PLAN_METHODS = ("lora (linear / dense convs)", "gps (all layers)", "spsft (all layers)",
                "zest + dense", "zest + gps", "zest + spsft", "random-k + dense",
                "last-k + dense", "kappatune + dense", "fim + dense")
RECORDS = Path("data/records")
HELD_OUT = Path("benchmarks/results/held_out_predictors")


def held_out_predictor(group_name: str) -> str:
    """The predictor that ranks ``group_name``: trained like the shipped one on every corpus
    group but this one (cached in :data:`HELD_OUT`); the shipped one for groups outside the
    corpus, which it has never seen."""
    path = HELD_OUT / f"{group_name}.json"
    if path.exists():
        return str(path)
    metrics, _ = load_corpus(RECORDS, min_seeds=2)
    if group_name not in set(metrics["group"]):
        return "universal"
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("metrics", "groundtruth"):
            (Path(tmp) / kind).mkdir()
            for file in (RECORDS / kind).glob("*.parquet"):
                if file.stem != group_name:
                    os.symlink(file.resolve(), Path(tmp) / kind / file.name)
        train_predictor(tmp, path)
    return str(path)


def pick(order: list[str], cost: dict[str, int], budget: int) -> list[str]:
    """Layers of ``order`` filling ``budget`` as ``Ranking.select`` does (at least one)."""
    return fill_budget(order, [cost[n] for n in order], budget) or \
        [min(order, key=lambda n: cost[n])]


def gps_k(layers: list[str], rows: dict[str, int], width: dict[str, int], budget: int) -> int:
    """The largest K whose GPS entries, Σ rows · min(K, fan-in), fit in ``budget`` (at least 1);
    neurons with fewer inputs keep all of them, as GPS on all layers does."""
    k = 1
    while k < max(width[n] for n in layers) and \
            sum(rows[n] * min(k + 1, width[n]) for n in layers) <= budget:
        k += 1
    return k


def layer_orders(model, task, data, seed: int, predictor: str) -> dict[str, list[str]]:
    """Layers best first by ZEST (``predictor``), KappaTune and FIM, from one train minibatch
    of the seed; every budget's plan reads them."""
    batch = data.batches("train", 32, 1, seed=seed)[0]
    return {by: rank(model, task, batch, **({"predictor": predictor} if by == "zest"
                                            else {"by": by}))
            .table["layer"].tolist() for by in ("zest", "kappa", "fim_score")}


def plans(model, task, orders: dict[str, list[str]], budget_share: float, seed: int
          ) -> dict[str, tuple[str, dict]]:
    """method label → (tuner name, keyword arguments) for one budget."""
    layers = candidate_layers(model, task.head_name)
    names = [layer.name for layer in layers]
    total = sum(p.numel() for p in model.parameters())
    budget = int(budget_share * total)
    dense = {layer.name: layer.n_params for layer in layers}
    modules = {n: model.get_submodule(n) for n in names}
    zest, scores, fim = orders["zest"], orders["kappa"], orders["fim_score"]
    rng = np.random.default_rng(seed)
    random_order = list(rng.permutation(names))
    last = names[::-1]
    spsft_ok = [n for n in names if getattr(modules[n], "groups", 1) in
                (1, getattr(modules[n], "in_channels", 1)) and
                type(modules[n]).__name__ != "Embedding"]
    width = {n: modules[n].weight[0].numel() for n in names}
    out_rows = {n: modules[n].weight.shape[0] for n in names}
    gps_all = [n for n in names if "position" not in n]
    k = gps_k(gps_all, out_rows, width, budget)
    ratio = min(1.0, budget / sum(modules[n].weight.numel() for n in spsft_ok))
    # ZEST + sparse: ZEST's top layers holding about 4× the budget densely, updated at about
    # 25 % density (GPS's K / SPSFT's neuron ratio sized so the entries fill the budget);
    # GPS needs K ≤ every chosen layer's fan-in, so layers narrower than 16 inputs are skipped
    zest_gps = pick([n for n in zest if n in gps_all and width[n] >= 16], dense, 4 * budget)
    zest_gps_k = min(gps_k(zest_gps, out_rows, width, budget), min(width[n] for n in zest_gps))
    zest_spsft = pick([n for n in zest if n in spsft_ok], dense, 4 * budget)
    zest_ratio = min(1.0, budget / sum(dense[n] for n in zest_spsft))
    linear = [n for n in names if type(modules[n]).__name__ == "Linear"] or \
        [n for n in names if getattr(modules[n], "groups", 1) == 1 and
         type(modules[n]).__name__ != "Embedding"]
    lora_rank = max(1, round(budget / sum(modules[n].weight.shape[0]
                                          + modules[n].weight[0].numel() for n in linear)))
    plan = {
        "lora (linear / dense convs)": ("lora", {"layers": linear, "rank": lora_rank}),
        "gps (all layers)": ("gps", {"layers": "all", "k": k}),  # K ≤ fan-in per neuron
        "spsft (all layers)": ("spsft", {"layers": spsft_ok, "ratio": ratio}),
        "zest + dense": ("layers", {"layers": pick(zest, dense, budget)}),
        "zest + gps": ("gps", {"layers": zest_gps, "k": zest_gps_k}),
        "zest + spsft": ("spsft", {"layers": zest_spsft, "ratio": zest_ratio}),
        "random-k + dense": ("layers", {"layers": pick(random_order, dense, budget)}),
        "last-k + dense": ("layers", {"layers": pick(last, dense, budget)}),
        "kappatune + dense": ("layers", {"layers": pick(scores, dense, budget)}),
        "fim + dense": ("layers", {"layers": pick(fim, dense, budget)}),
    }
    assert tuple(plan) == PLAN_METHODS
    return plan


def run(group, tuner_name: str, kwargs: dict, seed: int, epochs: int, lr: float) -> dict:
    model_spec, dataset, options = group
    model, task, data = load_pair(model_spec, dataset, options=options, seed=seed)
    start = time.perf_counter()
    tuner = METHODS.get(tuner_name)(model, task, lr=lr, seed=seed, **kwargs)
    tuner.fit(data, epochs=epochs, batch_size=32)
    _, val_accuracy = tuner.evaluate(data, "val")
    _, test_accuracy = tuner.evaluate(data, "test")
    total = sum(p.numel() for p in model.parameters())
    return {"lr": lr, "val_accuracy": val_accuracy, "test_accuracy": test_accuracy,
            "trainable_params": int(tuner.trainable_params_),
            "trainable_share": tuner.trainable_params_ / total,
            "layers": len(tuner.layer_names), "layer_names": list(tuner.layer_names),
            "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--lrs", default="1e-3,1e-4", help="Adam learning rates to choose from")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny models, for a quick check")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--redo", default="", help="comma-separated method labels whose "
                        "trials and results are dropped and run again (after a change to how "
                        "that method chooses or trains, e.g. 'kappatune + dense'); it acts "
                        "once: resume an interrupted redo without it")
    args = parser.parse_args()
    out = args.out or Path("benchmarks/results/" + ("accuracy_smoke.json" if args.smoke
                                                    else "accuracy_budget.json"))
    seeds = [int(s) for s in args.seeds.split(",")]
    lrs = [float(lr) for lr in args.lrs.split(",")]
    machine = f"{platform.machine()} CPU, {args.epochs} epochs, lr chosen from {lrs} on val"
    done = _results.load(out)
    groups = SMOKE if args.smoke else GROUPS
    predictors = {f"{m}__{d}": held_out_predictor(f"{m}__{d}") for m, d, _ in groups}
    fingerprints = {name: _results.predictor_fingerprint(p) for name, p in predictors.items()}
    # ZEST's choices depend on the predictor: those of another one are redone; so are results
    # from before the learning rate was chosen per method (they carry no "lr")
    done["trials"] = [r for r in done.get("trials", []) if _current(r, fingerprints)]
    done["results"] = [r for r in done["results"] if _current(r, fingerprints) and "lr" in r]
    redo = {m.strip() for m in args.redo.split(",") if m.strip()}
    known = set(PLAN_METHODS) | {"full", "head"}
    if redo - known:
        raise SystemExit(f"--redo: unknown methods {sorted(redo - known)}; known: "
                         f"{sorted(known)}")
    for kind in ("trials", "results"):
        done[kind] = [r for r in done[kind] if r["method"] not in redo]
    keys = {(r["group"], r["budget"], r["method"], r["seed"]) for r in done["results"]}
    # seed-major, so that a partial run already covers every group
    for seed in seeds:
        for group in groups:
            name = f"{group[0]}__{group[1]}"
            todo = [("full", "full", {}, None), ("head", "head", {}, None)]
            pending = [budget for budget in BUDGETS if not all(
                (name, budget, m, seed) in keys for m in PLAN_METHODS)]
            if pending:
                model, task, data = load_pair(group[0], group[1], options=group[2], seed=seed)
                orders = layer_orders(model, task, data, seed, predictors[name])
                for budget in pending:
                    for method, (tuner, kwargs) in plans(model, task, orders, budget,
                                                         seed).items():
                        todo.append((method, tuner, kwargs, budget))
            for method, tuner, kwargs, budget in todo:
                if (name, budget, method, seed) in keys:
                    continue
                case = {"group": name, "budget": budget, "method": method}
                if method.startswith("zest"):
                    case["predictor_sha"] = fingerprints[name]
                if seed == seeds[0]:
                    for lr in lrs:  # the trials that choose this method's learning rate
                        if not any(_same_case(t, case) and t["lr"] == lr
                                   for t in done["trials"]):
                            done["trials"].append({**case, "seed": seed, **run(
                                group, tuner, kwargs, seed, args.epochs, lr)})
                            _results.save(out, done, machine)
                    result = _best_trial(done["trials"], case, lrs)
                else:
                    lr = _best_trial(done["trials"], case, lrs)["lr"]
                    result = {**case, "seed": seed, **run(group, tuner, kwargs, seed,
                                                          args.epochs, lr)}
                done["results"].append(result)
                keys.add((name, budget, method, seed))
                _results.save(out, done, machine)
    for r in done["results"]:
        print(f"{r['group']:32s} {str(r['budget']):5s} {r['method']:28s} seed {r['seed']}: "
              f"test acc {r['test_accuracy']:.3f} (lr {r['lr']:g}, "
              f"{r['trainable_share']:.2%} trainable)")


def _current(row: dict, fingerprints: dict[str, str]) -> bool:
    """False for a ZEST row ranked by another predictor than its group's."""
    return not row["method"].startswith("zest") or \
        row.get("predictor_sha") == fingerprints.get(row["group"])


def _same_case(row: dict, case: dict) -> bool:
    return all(row.get(k) == v for k, v in case.items() if k != "predictor_sha")


def _best_trial(trials: list[dict], case: dict, lrs: list[float]) -> dict:
    """The first-seed trial of ``case`` with the best val accuracy: its learning rate is the
    method's."""
    candidates = [t for t in trials if _same_case(t, case) and t["lr"] in lrs]
    if len(candidates) < len(lrs):
        raise SystemExit(f"the learning rate of {case} is not chosen yet: run the first seed "
                         "(--seeds starting with it) before the others")
    return max(candidates, key=lambda t: t["val_accuracy"])


if __name__ == "__main__":
    main()

"""The converged benchmark's report (issue 32 item 3), on a synthetic ``accuracy_converged.json``.

Three groups, two seeds: efficientnet_lite0 × digits, where full fine-tuning ends below the head
(reported as such); minilm × r8, where the best ZEST plan misses full by 4 points; and the
``lm:`` group smollm2 × lm-r8, scored by test perplexity. Every number asserted was worked out
by hand from the rows below (the arithmetic is in the comments).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

report = pytest.importorskip("report")

CNN, ENCODER, LM = "efficientnet_lite0__digits", "minilm__r8", "smollm2__lm-r8"
LORA, PEFT = "lora (linear / dense convs)", "lora (peft default targets)"


def row(group: str, method: str, seed: int, budget: float | None = None, *, val: float = 0.5,
        test: float = 0.5, val_loss: float = 1.0, perplexity: float | None = None,
        lr: float = 1e-3, share: float | None = None, best: int = 3, trained: int = 7) -> dict:
    return {"group": group, "budget": budget, "method": method, "seed": seed, "lr": lr,
            "val_accuracy": val, "test_accuracy": test, "val_loss": val_loss,
            "test_loss": math.log(perplexity) if perplexity else 1.0, "best_epoch": best,
            "epochs_trained": trained,
            "trainable_share": share or (1.0 if method == "full" else budget or 0.002),
            "seconds": 1.0}


def toy_results() -> list[dict]:
    rows = []
    for seed, (full, head) in enumerate([(0.80, 0.84), (0.82, 0.84)]):
        # seed 1's full trained all 30 epochs, best at 29: not converged; seed 0 stopped at 30
        # with its best at 26 (patience 4 ran out): converged
        rows.append(row(CNN, "full", seed, val=0.81, test=full, lr=1e-4, best=(26, 29)[seed],
                        trained=30))
        rows.append(row(CNN, "head", seed, val=0.80, test=head))
    for seed in (0, 1):
        rows += [
            # ~1 %: SPSFT's val 0.76 beats GPS's 0.71 (mean of 0.70, 0.72)
            row(CNN, "zest + gps", seed, 0.01, val=(0.70, 0.72)[seed], test=(0.70, 0.74)[seed]),
            row(CNN, "zest + spsft", seed, 0.01, val=0.76, test=(0.796, 0.812)[seed]),
            row(CNN, LORA, seed, 0.01, val=0.74, test=(0.78, 0.80)[seed]),
            # ~5 %: the spread-2 GPS plan leads on val (0.82 against 0.80)
            row(CNN, "zest + dense", seed, 0.05, val=0.80, test=(0.79, 0.80)[seed]),
            row(CNN, "zest + gps (spread 2)", seed, 0.05, val=0.82, test=(0.81, 0.83)[seed]),
            row(CNN, LORA, seed, 0.05, val=0.83, test=(0.84, 0.85)[seed]),
            row(ENCODER, "full", seed, val=0.9, test=(0.90, 0.92)[seed], best=5, trained=9),
            row(ENCODER, "head", seed, val=0.6, test=(0.60, 0.64)[seed]),
            row(ENCODER, "zest + dense", seed, 0.01, val=0.85, test=(0.86, 0.88)[seed]),
            # the best LoRA on val is peft's default targets (0.84 against 0.80)
            row(ENCODER, LORA, seed, 0.01, val=0.80, test=0.80),
            row(ENCODER, PEFT, seed, 0.01, val=0.84, test=(0.83, 0.85)[seed]),
            # lm: perplexities 10 and 12 for full, 20 untouched; seed 0 still improving at 8
            row(LM, "full", seed, perplexity=(10.0, 12.0)[seed], val_loss=1.5,
                best=(7, 6)[seed], trained=8),
            row(LM, report.PRETRAINED, seed, perplexity=20.0, val_loss=3.0, share=1e-9),
            # chosen on val loss (1.9 < 2.0) although GPS has the higher val token accuracy
            row(LM, "zest + gps", seed, 0.01, val_loss=2.0, val=0.5, perplexity=(10.0, 12.0)[seed]),
            row(LM, "zest + spsft", seed, 0.01, val_loss=1.9, val=0.3,
                perplexity=(10.1, 12.12)[seed]),
            row(LM, LORA, seed, 0.01, val_loss=2.1, perplexity=(10.4, 12.48)[seed]),
        ]
    return rows


def toy_file(tmp_path: Path, results: list[dict]) -> None:
    trials = [row(CNN, "full", 0, val=0.81, test=0.80, lr=1e-4),
              row(CNN, "full", 0, val=0.79, test=0.80, lr=3e-4),
              *(row(CNN, "zest + spsft", 0, 0.01, val=val, lr=lr)
                for lr, val in ((3e-4, 0.72), (1e-3, 0.76), (3e-3, 0.70)))]
    (tmp_path / "accuracy_converged.json").write_text(json.dumps({
        "results": results, "trials": trials, "machine": "test machine",
        "settings": {"regime": "converged", "epochs": None, "patience": None,
                     "extend-edges": True}}))


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> tuple[list[str], Path]:
    """The section rendered once for the module (it draws a plot per group)."""
    folder = tmp_path_factory.mktemp("results")
    toy_file(folder, toy_results())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(report, "RESULTS", folder)
        return report.converged_section(), folder


def test_full_against_the_head_and_a_group_where_full_does_not_beat_it(rendered):
    lines, _ = rendered
    # digits: full 80, 82 → 81.0 ± 1.4; head 84, 84; paired full − head −4, −2 → −3.0 ± 1.4
    assert f"| {CNN} | test accuracy % | 81.0 ± 1.4 | 84.0 ± 0.0 | -3.0 ± 1.4 ✗ |" in lines
    # r8: full 90, 92; head 60, 64 → 62.0 ± 2.8; paired +30, +28 → +29.0 ± 1.4
    assert f"| {ENCODER} | test accuracy % | 91.0 ± 1.4 | 62.0 ± 2.8 | +29.0 ± 1.4 ✓ |" in lines
    assert (f"Full fine-tuning beats its reference on 2 of 3 groups; it does NOT on {CNN} "
            "(full − head: -3.0 ± 1.4 points).") in lines


def test_an_lm_group_is_scored_by_perplexity(rendered):
    lines, _ = rendered
    # full's perplexity 10, 12 → 11.0 ± 1.4; pretrained 20; 10/20 − 1 = −50 %, 12/20 − 1 = −40 %
    assert f"| {LM} | test perplexity | 11.0 ± 1.4 | 20.0 ± 0.0 | -45.0 % ± 7.1 ✓ |" in lines
    # SPSFT chosen on val loss 1.9; its perplexity (10.1 + 12.12) / 2 = 11.11; 1 % above full's
    # at both seeds; against LoRA 10.1 / 10.4 − 1 = 12.12 / 12.48 − 1 = −2.88 %
    assert (f"| {LM} | ~1% | zest + spsft (val loss 1.900, lr 0.001) | 11.1 | +1.0 % ± 0.0 ✓ | "
            f"{LORA} (val loss 2.100, lr 0.001) | 11.4 | -2.9 % ± 0.0 ✓ |") in lines


def test_the_best_plan_against_full_and_the_best_lora_paired_by_seed(rendered):
    lines, _ = rendered
    # SPSFT (val 76) − full: 79.6 − 80, 81.2 − 82 → −0.6 ± 0.28 (within 1 point); − LoRA:
    # +1.6, +1.2 → +1.4 ± 0.28; test (79.6 + 81.2) / 2 = 80.4, LoRA's 79.0
    assert (f"| {CNN} | ~1% | zest + spsft (val 76.0, lr 0.001) | 80.4 | -0.6 ± 0.3 ✓ | "
            f"{LORA} (val 74.0, lr 0.001) | 79.0 | +1.4 ± 0.3 ✓ |") in lines
    # spread 2 − full: +1, +1; − LoRA: 81 − 84, 83 − 85 → −2.5 ± 0.7 (behind)
    assert (f"| {CNN} | ~5% | zest + gps (spread 2) (val 82.0, lr 0.001) | 82.0 | +1.0 ± 0.0 ✓ "
            f"| {LORA} (val 83.0, lr 0.001) | 84.5 | -2.5 ± 0.7 ✗ |") in lines
    # r8: 86 − 90, 88 − 92 → −4 (a miss); against peft's targets 86 − 83, 88 − 85 → +3
    assert (f"| {ENCODER} | ~1% | zest + dense (val 85.0, lr 0.001) | 87.0 | -4.0 ± 0.0 ✗ | "
            f"{PEFT} (val 84.0, lr 0.001) | 84.0 | +3.0 ± 0.0 ✓ |") in lines


def test_the_targets_are_counted_and_the_misses_listed(rendered):
    lines, _ = rendered
    target = "(target: at least 6) ✗"
    assert f"- ~5%: best ZEST plan at or above full fine-tuning on 1 of 1 groups {target}" in lines
    assert f"- ~5%: best ZEST plan ahead of the best LoRA on 0 of 1 groups {target}" in lines
    assert ("- ~1%: best ZEST plan within 1 point of full fine-tuning (`lm:` 2 % perplexity) "
            f"on 2 of 3 groups {target}") in lines
    assert f"- ~1%: best ZEST plan ahead of the best LoRA on 3 of 3 groups {target}" in lines
    assert (f"- {ENCODER} at ~1%: zest + dense is 4.0 ± 0.0 points below full over 2 seeds "
            "(target: within 1 point).") in lines
    assert (f"- {CNN} at ~5%: zest + gps (spread 2) is 2.5 ± 0.7 points below {LORA} over 2 "
            "seeds (target: ahead).") in lines


def test_epochs_and_the_trials_not_converged(rendered):
    lines, _ = rendered
    # full: best epochs 26, 29, 5, 5, 7, 6 → 13.0; trained 30, 30, 9, 9, 8, 8 → 15.7; not
    # converged: digits seed 1 (29 of 30, patience 4) and lm seed 0 (7 of 8, patience 2)
    assert "| full | 6 | 13.0 | 15.7 | 2 |" in lines
    assert (f"Trials that reached the epoch maximum still improving (not converged): 2: {CNN} "
            f"full seed 1 (best epoch 29 of 30); {LM} full seed 0 (best epoch 7 of 8).") in lines


def test_a_plot_per_group_and_the_rates(rendered):
    lines, folder = rendered
    for group in (CNN, ENCODER, LM):
        path = folder / f"accuracy_converged_{group}.png"
        assert path.stat().st_size > 0
        assert f"![{group}: test score against trainable share](/{path.as_posix()})" in lines
    # full chose 1e-4, the lowest of 1e-4, 3e-4; SPSFT chose 1e-3 inside 3e-4 .. 3e-3
    assert "| full | 1 | 1 | 0 | 0 |" in lines
    assert "| zest + spsft | 1 | 0 | 0 | 0 |" in lines
    # the rate table counts each case's choice (a vote) and marks it open: still at an edge
    assert any(line.startswith("| full | image | 1 | **0.0001: 1** | 0.0001 | 1 |")
               for line in lines)


def test_an_lm_group_without_the_pretrained_model_shows_full_alone():
    results = [r for r in toy_results() if r["method"] != report.PRETRAINED]
    lines = report._converged_references(results, [CNN, ENCODER, LM])
    assert f"| {LM} | test perplexity | 11.0 ± 1.4 | — | — |" in lines
    assert any(line.startswith("Full fine-tuning beats its reference on 1 of 2 groups")
               for line in lines)


def test_no_file_or_no_results_gives_no_section(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    assert report.converged_section() == []
    toy_file(tmp_path, [])
    assert report.converged_section() == []


def test_a_pretrained_reference_row_without_epochs_is_left_out_of_the_epoch_table():
    """An lm: group's untouched-model row (``pretrained``: nothing trained, no epochs) is a
    reference for perplexity, not a trial: the epoch table must not read its epochs."""
    lines = report._converged_epochs(
        [{"group": "smollm2__lm-r8", "budget": None, "method": "pretrained", "seed": 0,
          "val_loss": 6.3, "test_loss": 6.3},
         {"group": "smollm2__lm-r8", "budget": None, "method": "full", "seed": 0,
          "val_loss": 3.6, "test_loss": 3.5, "best_epoch": 3, "epochs_trained": 5}],
        {"decoder-epochs": 5, "decoder-patience": 2})
    text = "\n".join(lines)
    assert "| full | 1 | 3.0 | 5.0 |" in text and "pretrained" not in text

"""Writes the per-group table of metric_collection/README.md from the committed records.

Usage: python metric_collection/summarize.py [--records data/records] [--readme FILE]
The table goes between the markers ``<!-- summary:start -->`` and ``<!-- summary:end -->``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from zest.evaluation import groundtruth_summary
from zest.records import read_records

START, END = "<!-- summary:start -->", "<!-- summary:end -->"


def table(records: Path) -> str:
    summary = groundtruth_summary(read_records(records / "groundtruth"))
    lines = ["| group | layers × seeds (rows) | steps | train / val | head-only acc | best gain "
             "(layer) | gain std | worst gain | seed τ (acc gain) | seed τ (loss gain) | "
             "CPU h |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in summary.iterrows():
        lines.append(f"| {r['group']} | {r['layers']} × {r['seeds']} ({r['rows']}) | "
                     f"{r['steps']} | "
                     f"{r['train']} / {r['val']} | {r['head_only_accuracy']:.3f} | "
                     f"{r['best_gain']:+.3f} (`{r['best_layer']}`) | {r['gain_std']:.3f} | "
                     f"{r['gain_min']:+.3f} | {r['tau_gain']:.2f} | {r['tau_loss_gain']:.2f} | "
                     f"{r['cpu_hours']:.2f} |")
    total = summary["cpu_hours"].sum()
    lines.append("")
    lines.append(f"{len(summary)} groups collected, {total:.1f} CPU-hours of ground truth.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=Path, default=Path("data/records"))
    parser.add_argument("--readme", type=Path, default=Path("metric_collection/README.md"))
    args = parser.parse_args()
    text = args.readme.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    args.readme.write_text(f"{head}{START}\n{table(args.records)}\n{END}{tail}")
    print(table(args.records))


if __name__ == "__main__":
    main()

"""``zest train-predictor`` and ``zest evaluate-predictor``: the predictor from the corpus
(ARCHITECTURE.md §3b)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from zest.cli.common import (
    SeedOption,
    app,
    comma_names,
    user_errors,
)

RecordsOption = Annotated[Path, typer.Option(help="Folder with metrics/ and groundtruth/ "
                                             "record files.")]
TargetOption = Annotated[str, typer.Option(help="gt_loss_gain (steadier) or gt_gain.")]
MinSeedsOption = Annotated[int, typer.Option(
    help="Use only groups whose every layer has ground truth from this many seeds (groups "
         "still being collected are left out).")]


@app.command("train-predictor")
def train_predictor_command(
    records: RecordsOption = Path("data/records"),
    out: Annotated[Path, typer.Option(help="Predictor JSON file.")] = Path(
        "zest/predictors/universal.json"),
    backend: Annotated[str, typer.Option(help="lightgbm or pairwise_logistic.")] = "lightgbm",
    target: TargetOption = "gt_loss_gain",
    normalization: Annotated[str, typer.Option(help="rank or robust_z (within group).")]
    = "rank",
    seed: SeedOption = 0,
    context: Annotated[bool, typer.Option(
        "--context/--no-context", help="Context features beside the metrics (layer type, "
        "depth, parameter share).")] = True,
    roles: Annotated[bool, typer.Option(
        "--roles/--no-roles", help="Context: each layer's role in its block and its position "
        "there (named alike in every family).")] = False,
    modality: Annotated[bool, typer.Option(
        "--modality/--no-modality", help="Context: a text/image flag.")] = True,
    unseen_modality_blend: Annotated[float, typer.Option(
        help="Weight of the n_params prior on a model of a modality no training group had "
             "(1 = the prior alone; issue 33, predictor_training/robust_variants.md).")] = 0.0,
    feature_fraction: Annotated[float, typer.Option(
        help="Share of the features each LightGBM tree may split on (issue 33).")] = 1.0,
    min_seeds: MinSeedsOption = 2,
    features: Annotated[str | None, typer.Option(
        help="Comma-separated metrics to learn from (default: every metric but the peer-only "
             "selectors kappa, fim_score, repr_shift, class_separation).")] = None,
) -> None:
    """Train the universal predictor on every complete group of the records (with a LOGO CV
    summary)."""
    from zest.training import train_predictor

    with user_errors():
        ranker, summary = train_predictor(records, out, backend=backend, target=target,
                                          normalization=normalization, seed=seed,
                                          min_seeds=min_seeds, features=comma_names(features),
                                          use_context=context, use_roles=roles,
                                          use_modality=modality,
                                          unseen_modality_blend=unseen_modality_blend,
                                          feature_fraction=feature_fraction)
        typer.echo(f"trained {backend} on {len(ranker.groups_)} groups "
                   f"({len(ranker.features_)} features); leave-one-group-out mean Kendall τ "
                   f"{summary['kendall']:.3f}, top-5 recall {summary['recall']:.3f} -> {out}")


@app.command("evaluate-predictor")
def evaluate_predictor_command(
    predictor: Annotated[str, typer.Option(help="Predictor JSON file or 'universal'.")]
    = "universal",
    records: RecordsOption = Path("data/records"),
    out_dir: Annotated[Path, typer.Option(help="Folder for report.md, results.json, "
                                          "plot PNGs.")] = Path("predictor_training"),
    report: Annotated[Path | None, typer.Option(help="Also write the markdown report here.")]
    = Path("data/predictors/universal.report.md"),
    schemes: Annotated[str, typer.Option(help="Comma-separated: logo, lodo, lomo, lofo "
                                         "(leave one family out), cross_modality.")]
    = "logo,lodo,lomo,lofo,cross_modality",
    target: Annotated[str | None, typer.Option(help="Default: the predictor's target.")] = None,
    min_seeds: MinSeedsOption = 2,
) -> None:
    """Held-out evaluation of the predictor next to every single metric and the baselines."""
    from zest.training import evaluate_predictor

    with user_errors():
        summary = evaluate_predictor(predictor, records, out_dir, report=report,
                                     schemes=comma_names(schemes) or [], target=target,
                                     min_seeds=min_seeds)
        for line in summary:
            typer.echo(line)



"""The settings of a ground-truth collection, declared and validated once (ARCHITECTURE.md §3a).

:class:`GroundTruthConfig` holds what changes the training of a layer (steps, learning rate,
batch sizes, the prefix cache); :class:`GroundTruthRequest` holds one whole collection: the
(model, data set) pair, the record file, the config, the seeds, the layers and where the jobs
run. Both check every value in ``__post_init__`` and name the Python parameter in their errors
(``steps must be an integer ≥ 1, got 0``); the command line's ``zest collect groundtruth``
options are generated from the fields that carry a help text
(:func:`zest.command_line.cli_fields`), and the CLI turns the parameter names of an error into
its flags.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zest.command_line import CommandLine, setting
from zest.errors import InvalidInputError
from zest.loading import DataOptions

BACKENDS = ("loky", "dask")


def seed_list(text: str | Iterable[int]) -> list[int]:
    """Parses comma-separated seeds (``"0,1,2"``) into a sorted list without repeats; a
    sequence of integers is taken as it is."""
    if not isinstance(text, str):
        return [int(s) for s in text]
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise InvalidInputError(f"seeds must be comma-separated integers, got {text!r}") \
            from None
    if not seeds:
        raise InvalidInputError("seeds is empty; give at least one seed, e.g. 0,1")
    return sorted(set(seeds))


def _not(value: bool) -> bool:
    return not value


@dataclass(frozen=True)
class GroundTruthConfig:
    """What changes the training of one layer in a ground-truth collection.

    Attributes:
        steps: Optimisation steps per layer (and for the head-only baseline).
        lr: Adam learning rate, shared by the layer and the head.
        batch_size: Training minibatch size.
        eval_batch_size: Batch size of the cache pass and of validation.
        use_cache: Reuse the frozen prefix's outputs (disable only to measure or debug).
    """

    steps: int = setting(100, "Training steps per layer and for the baseline.")
    lr: float = setting(1e-3, "Adam learning rate (layer and head).")
    batch_size: int = setting(32, "Training batch size.")
    eval_batch_size: int = setting(128)
    use_cache: bool = setting(True, "Disable the frozen-prefix cache.",
                              command_line=CommandLine("no_cache", bool, False, _not))

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps <= 0:
            raise InvalidInputError(f"steps must be an integer ≥ 1, got {self.steps!r}")
        if not (isinstance(self.lr, int | float) and self.lr > 0 and math.isfinite(self.lr)):
            raise InvalidInputError(f"lr must be a positive number, got {self.lr!r}")
        for name in ("batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"{name} must be ≥ 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class GroundTruthRequest:
    """One ground-truth collection: which pair, into which file, with which settings.

    Attributes:
        model: Model spec.
        dataset: Data set spec.
        out: Parquet record file; rows already there are kept and not recomputed.
        config: Steps, learning rate, batch sizes, prefix cache.
        seeds: Ground-truth seeds (head initialisation and batch order), in run order; a
            string is parsed with :func:`seed_list` (``"0,1"``).
        options: Data loading options (image size, caps, ...).
        layer_names: Restrict to these layers or blocks.
        layer_sample: Collect only a stratified sample of this many candidate layers
            (:func:`~zest.layers.stratified_layers`: every role, spread over depth), for models
            with hundreds of candidates; recorded as ``gt_layer_sample`` (see
            metric_collection/README.md, fidelity study).
        data_seed: Seed of the train/val/test split.
        device: ``cpu``/``cuda``/``auto``.
        checkpoint: Weights for ``timm:<arch>`` or ``tv:<arch>``.
        n_jobs: Parallel joblib workers (torch threads are split between them).
        backend: ``loky`` (joblib) or ``dask``.
        scheduler: dask.distributed scheduler address for ``backend="dask"``.
    """

    model: str
    dataset: str
    out: Path
    config: GroundTruthConfig = setting(default_factory=GroundTruthConfig)
    seeds: tuple[int, ...] = setting(
        (0, 1), "Comma-separated ground-truth seeds.",
        command_line=CommandLine("seeds", str, "0,1"))
    options: DataOptions = setting(default_factory=DataOptions)
    layer_names: tuple[str, ...] | None = None
    n_jobs: int = setting(1, "Parallel workers (joblib).")
    backend: str = setting("loky", "loky (joblib) or dask.")
    scheduler: str | None = setting(None, "dask.distributed scheduler address.")
    layer_sample: int | None = setting(
        None, "Only a stratified sample of this many candidate layers (every role, spread "
              "over depth), for models with hundreds of candidates.",
        command_line=CommandLine("sample_layers"))
    data_seed: int = 0
    device: str = "cpu"
    checkpoint: str | None = None

    def __post_init__(self) -> None:
        fix = object.__setattr__  # frozen: normalised once, here
        fix(self, "out", Path(os.fspath(self.out)))
        fix(self, "config", self.config if self.config is not None else GroundTruthConfig())
        fix(self, "options", self.options if self.options is not None else DataOptions())
        fix(self, "seeds", tuple(seed_list(self.seeds)) if isinstance(self.seeds, str)
            else tuple(int(s) for s in self.seeds))
        if self.layer_names is not None:
            fix(self, "layer_names", tuple(self.layer_names))
        if not self.seeds:
            raise InvalidInputError("seeds is empty; give at least one seed, e.g. 0,1")
        if self.layer_sample is not None and self.layer_names:
            raise InvalidInputError("layer_sample and layer_names both choose the layers; "
                                    "pass one")
        if self.layer_sample is not None and (not isinstance(self.layer_sample, int)
                                              or self.layer_sample < 1):
            raise InvalidInputError(f"layer_sample must be an integer ≥ 1, got "
                                    f"{self.layer_sample!r}")
        if not isinstance(self.n_jobs, int) or self.n_jobs < 1:
            raise InvalidInputError(f"n_jobs must be ≥ 1, got {self.n_jobs}")
        if self.backend not in BACKENDS:
            raise InvalidInputError(f"backend must be one of {', '.join(BACKENDS)}, got "
                                    f"{self.backend!r}")
        if self.backend == "dask" and not self.scheduler:
            raise InvalidInputError("scheduler is needed with backend dask: the address of a "
                                    "dask scheduler (e.g. tcp://127.0.0.1:8786)")


def groundtruth_settings(config: GroundTruthConfig, options: DataOptions, data_seed: int,
                         checkpoint: str | None) -> dict[str, Any]:
    """Every setting that changes the data or the training of a ground-truth collection, as
    stamped into its record file (a resume must match them all)."""
    return {"gt_steps": config.steps, "gt_lr": float(config.lr),
            "gt_batch_size": config.batch_size, "data_seed": int(data_seed),
            **options.settings(), "checkpoint": checkpoint}

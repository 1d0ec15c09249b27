"""Running one ground-truth job in the current process: the layers of one block (or the
head-only baseline) for one seed (ARCHITECTURE.md §5)."""

from __future__ import annotations

from typing import Any

import torch

from zest.groundtruth.batches import batch_of, split_inputs
from zest.groundtruth.caches import cached_pair
from zest.groundtruth.jobs import BASELINE, Job
from zest.groundtruth.trainer import LayerTrainer
from zest.models import preserved_training_state
from zest.stages import stage_plan


def run_job(job: Job) -> list[dict[str, Any]]:
    """Runs one job and returns one result dict per layer (or one for the baseline).

    The model is restored to its loaded state before returning, also when training fails.
    """
    if job.threads:
        torch.set_num_threads(job.threads)
    model, task, data = cached_pair(job.pair)
    sample = batch_of(task, *split_inputs(task, data, "train"), torch.arange(2))
    plan = stage_plan(model, task, sample) if job.config.use_cache else None
    trainer = LayerTrainer(model, task, data, job.config, plan,
                           pair_key=(job.pair.key(), job.config.eval_batch_size))
    # a causal-LM task keeps its pretrained LM head: it neither trains nor needs restoring
    head_params = list(trainer.head.parameters()) if task.tunes_head else []
    saved_head = {k: v.detach().clone() for k, v in trainer.head.state_dict().items()} \
        if task.tunes_head else None
    results = []
    with preserved_training_state(model):
        try:
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            if job.block == BASELINE and not task.tunes_head:
                results.append({"layer": BASELINE, **trainer.score_untouched(), "cached": False})
                return results
            if job.block == BASELINE:
                stop = len(plan.names) if plan is not None else 0
                train_cache, val_cache = (trainer.prefix_states(stop, job.seed)
                                          if plan is not None else (None, None))
                for p in head_params:
                    p.requires_grad_(True)
                out = trainer.fit_and_score(head_params, job.seed, stop, train_cache, val_cache,
                                            f"the head-only baseline (seed {job.seed})")
                results.append({"layer": BASELINE, **out, "cached": plan is not None})
                return results
            stages = [plan.stage_of(name) for name in job.layers] if plan is not None else [None]
            first = None if None in stages else min(stages)
            if plan is not None and first is not None:
                train_cache, val_cache = trainer.prefix_states(first, job.seed)
            else:
                train_cache = val_cache = None
                first = 0
            for name in job.layers:
                module = model.get_submodule(name)
                own = [p for p in module._parameters.values() if p is not None]  # noqa: SLF001
                saved = [p.detach().clone() for p in own]
                try:
                    for p in own + head_params:
                        p.requires_grad_(True)
                    out = trainer.fit_and_score(own + head_params, job.seed, first, train_cache,
                                                val_cache, f"layer {name} (seed {job.seed})")
                finally:
                    with torch.no_grad():
                        for p, value in zip(own, saved, strict=True):
                            p.copy_(value)
                            p.requires_grad_(False)
                results.append({"layer": name, **out, "cached": train_cache is not None})
            return results
        finally:
            if saved_head is not None:
                with torch.no_grad():
                    trainer.head.load_state_dict(saved_head)

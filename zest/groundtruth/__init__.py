"""Ground truth: how much fine-tuning one layer (plus a fresh head) helps (ZEST, ARCHITECTURE.md
§5).

For every candidate layer and seed, the layer's weight and bias are trained together with a
freshly initialised head for ``steps`` steps on the train split, then accuracy and cross-entropy
are measured on the val split. The head-only baseline uses the same steps, learning rate, head
initialisation and batch order, so ``gt_gain = gt_score − gt_baseline`` isolates the layer.
For a causal-LM task (``lm:<text data set>``) the layer trains alone (the pretrained LM head is
kept), accuracy and cross-entropy are over the val split's next tokens, and the baseline is the
untouched pretrained model (ARCHITECTURE.md §3c).

Speed: everything before the tuned layer's block is frozen, so its output is computed once per
example (eval mode, no augmentation) and reused for every step and every layer of that block
(:mod:`zest.stages`); only the suffix runs forward and backward. The prefix runs only over the
train examples the seed's batch order draws (and every val example), in chunks of texts of
similar length, each trimmed to its longest text. The whole model stays in eval mode (frozen
normalisation statistics, no dropout) so cached and uncached runs compute the same thing.

Jobs are (block, seed) pairs, run serially, with joblib (``n_jobs``) or on a dask.distributed
cluster; the driver alone appends finished rows to the record file (atomically, under a lock),
so a killed collector resumes where it stopped.

The package, one concept a file: :mod:`~zest.groundtruth.settings` (the validated
:class:`GroundTruthConfig` and :class:`GroundTruthRequest`, from which the CLI's options are
generated), :mod:`~zest.groundtruth.jobs` (the jobs still to run for a record file),
:mod:`~zest.groundtruth.run` (one job), :mod:`~zest.groundtruth.trainer` (the training loop),
:mod:`~zest.groundtruth.batches` (batches and the seeded batch order),
:mod:`~zest.groundtruth.executors` (serial, loky, dask), :mod:`~zest.groundtruth.caches` (the
process-level pair and prefix caches; the cached prefix outputs are
:class:`zest.stages.PrefixCache`) and :mod:`~zest.groundtruth.collection` (the driver,
:func:`collect_groundtruth`).

Why the ground truth has its own training loop, beside :class:`zest.finetune.Tuner`'s: the two
answer different questions, and every difference below is part of what a ground-truth record
means (records must reproduce bit for bit, so none can change):

* It measures one layer in isolation, so every layer of a seed sees the same fixed number of
  steps, the same batch order (:func:`batch_order`) and the same head initialisation; the
  tuner trains epochs over a loader reshuffled per epoch and may stop early.
* Plain Adam, no weight decay (``gt_lr`` is an Adam rate in every record); the tuner uses AdamW
  with its weight decay.
* The model stays in eval mode (no dropout, frozen normalisation statistics) and only the
  suffix after the cached frozen prefix runs (:class:`~zest.groundtruth.trainer.LayerTrainer`);
  the tuner trains the whole model in train mode with full forward passes.
* Val is scored once, after the last step; the tuner validates every epoch and keeps the best
  epoch, which would select on the split the ground truth reports.
* The gradients are cleared before each backward pass: the head's gradients left by the
  previous layer's run must not reach the next run's first step (the tuner clears them after
  the step). A non-finite loss stops the job; the tuner restores its last good state.

What the two loops do compute alike, the val score (accuracy and mean cross-entropy over a
task's predictions), is one shared piece: :class:`zest.prediction_scores.PredictionScore`.
"""

from zest.groundtruth.batches import batch_order
from zest.groundtruth.caches import PairSpec
from zest.groundtruth.collection import collect_groundtruth, recorded_baselines, run_groundtruth
from zest.groundtruth.jobs import BASELINE, GroundTruthJobs, Job, list_jobs
from zest.groundtruth.run import run_job
from zest.groundtruth.settings import (
    GroundTruthConfig,
    GroundTruthRequest,
    groundtruth_settings,
    seed_list,
)

__all__ = ["BASELINE", "GroundTruthConfig", "GroundTruthJobs", "GroundTruthRequest", "Job",
           "PairSpec", "batch_order", "collect_groundtruth", "groundtruth_settings", "list_jobs",
           "recorded_baselines", "run_groundtruth", "run_job", "seed_list"]

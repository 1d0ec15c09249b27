"""zest: pick the layers worth fine-tuning from one minibatch, then fine-tune them sparsely."""

from __future__ import annotations

from zest import finetune
from zest._version import __version__
from zest.data import (
    DATASETS,
    FILE_READERS,
    Dataset,
    RawData,
    known_datasets,
    load_dataset,
    register_file_reader,
)
from zest.errors import ZestError
from zest.finetune import METHODS, apply_delta, delta_of, prepare, unprepare
from zest.layers import Layer, candidate_layers
from zest.loading import DataOptions, load_pair
from zest.metrics import METRICS, register_metric
from zest.models import MODELS, Task, infer_task, known_models, load_model
from zest.ranking import Ranking, rank

#: The extension points (ARCHITECTURE.md §6): ``MODELS``, ``DATASETS``, ``FILE_READERS`` /
#: ``register_file_reader``, ``METRICS`` / ``register_metric`` and the tuners' ``METHODS``.
__all__ = ["DATASETS", "FILE_READERS", "METHODS", "METRICS", "MODELS", "DataOptions", "Dataset",
           "Layer", "RawData", "Ranking", "Task", "ZestError", "__version__", "apply_delta",
           "candidate_layers", "delta_of", "finetune", "infer_task", "known_datasets",
           "known_models", "load_dataset", "load_model", "load_pair", "prepare", "rank",
           "register_file_reader", "register_metric", "unprepare"]

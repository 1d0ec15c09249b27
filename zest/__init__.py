"""zest: pick the layers worth fine-tuning from one minibatch, then fine-tune them sparsely."""

from __future__ import annotations

__version__ = "0.1.0"

from zest import finetune  # noqa: E402
from zest.data import (  # noqa: E402
    DATASETS,
    FILE_READERS,
    Dataset,
    RawData,
    known_datasets,
    load_dataset,
    register_file_reader,
)
from zest.errors import ZestError  # noqa: E402
from zest.finetune import METHODS, apply_delta, delta_of, prepare, unprepare  # noqa: E402
from zest.layers import Layer, candidate_layers  # noqa: E402
from zest.loading import DataOptions, load_pair  # noqa: E402
from zest.metrics import METRICS, register_metric  # noqa: E402
from zest.models import MODELS, Task, infer_task, known_models, load_model  # noqa: E402
from zest.ranking import Ranking, rank  # noqa: E402

#: The extension points (ARCHITECTURE.md §6): ``MODELS``, ``DATASETS``, ``FILE_READERS`` /
#: ``register_file_reader``, ``METRICS`` / ``register_metric`` and the tuners' ``METHODS``.
__all__ = ["DATASETS", "FILE_READERS", "METHODS", "METRICS", "MODELS", "DataOptions", "Dataset",
           "Layer", "RawData", "Ranking", "Task", "ZestError", "__version__", "apply_delta",
           "candidate_layers", "delta_of", "finetune", "infer_task", "known_datasets",
           "known_models", "load_dataset", "load_model", "load_pair", "prepare", "rank",
           "register_file_reader", "register_metric", "unprepare"]

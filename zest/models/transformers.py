"""Transformers models: the ``hf:<local dir>`` spec scheme (ARCHITECTURE.md §2).

An ``hf:`` folder is data only: :func:`check_hf_folder` refuses, before transformers reads it,
a folder that would run code, and every load passes :data:`HF_LOAD_SAFELY`. A folder loads as a
``*ForSequenceClassification`` model with a fresh head, or (the causal-LM task, §3c) as its
``*ForCausalLM`` with the pretrained LM head; its task's pooling is traced, not assumed.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zest.architectures import architecture_for
from zest.errors import InvalidInputError, ZestError
from zest.models.heads import head_of
from zest.models.specs import ModelScheme, not_a_decoder_message
from zest.models.task import Task, TaskKind, preserved_training_state
from zest.models.weights import minilm_path

#: What every transformers load from a folder passes: never run code shipped with the folder
#: (``auto_map`` classes), even if stdin would answer yes to transformers' prompt.
HF_LOAD_SAFELY: dict[str, Any] = {"trust_remote_code": False}
#: Weight files of a transformers folder that unpickle (and so can run code); never loaded.
PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def check_hf_folder(path: Path) -> None:
    """Refuses, before transformers reads anything, a model folder that would run code or
    cannot be loaded as data alone: no ``config.json``, a configuration that is not a JSON
    object or lacks ``model_type``, an ``auto_map`` in ``config.json`` or
    ``tokenizer_config.json`` (the files transformers reads it from: custom classes
    shipped as Python files), or no ``.safetensors`` weights (pickled ``pytorch_model.bin``
    weights are not loaded: unpickling can run code). One line naming the folder and the fix."""
    folder = str(path)
    if not path.is_dir():
        raise InvalidInputError(f"model folder {folder!r} does not exist; pass hf:<dir> with a "
                                "transformers model folder")
    if not (path / "config.json").is_file():
        raise InvalidInputError(f"{folder!r} is not a transformers model directory (no "
                                "config.json); pass hf:<dir> with config.json, weights and "
                                "tokenizer files")
    for config_file in (path / "config.json", path / "tokenizer_config.json"):
        if not config_file.is_file():
            continue
        try:
            settings = json.loads(config_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidInputError(f"{str(config_file)!r} in model folder {folder!r} is not "
                                    f"readable JSON ({type(exc).__name__}); save the model "
                                    "again with save_pretrained") from None
        if not isinstance(settings, dict):
            raise InvalidInputError(f"{str(config_file)!r} in model folder {folder!r} is not a "
                                    "JSON object; save the model again with save_pretrained")
        if "auto_map" in settings:
            raise InvalidInputError(f"model folder {folder!r} asks to run its own Python code "
                                    f"(auto_map in {config_file.name}); zest never runs code "
                                    "from a model folder: use a model whose classes ship with "
                                    "transformers")
        if config_file.name == "config.json" and not (
                isinstance(settings.get("model_type"), str) and settings["model_type"]):
            raise InvalidInputError(f"config.json of model folder {folder!r} has no model_type; "
                                    "save the model with a transformers version that writes "
                                    "it (save_pretrained) or add the model_type field")
    if not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for pattern in PICKLED_WEIGHTS for p in path.glob(pattern))
        if pickled:
            raise InvalidInputError(f"model folder {folder!r} holds only pickled weights "
                                    f"({', '.join(pickled[:3])}), which zest does not load "
                                    "(unpickling can run code); convert them to .safetensors "
                                    "(model.save_pretrained(dir, safe_serialization=True))")
        raise InvalidInputError(f"model folder {folder!r} has no .safetensors weights; save "
                                "the model with save_pretrained")


@contextlib.contextmanager
def quiet_transformers():
    """Silences transformers' logging and progress bars for the body (restored after)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def write_random_hf_model(folder: str | os.PathLike, model_type: str, *, num_labels: int = 2,
                          seed: int = 0, **config: Any) -> str:
    """Writes a randomly initialised transformers sequence classifier and the packaged MiniLM
    tokenizer to ``folder``, for trying an architecture offline without its weights (the
    conformance tests' tiny models; the cache benchmark's models of real sizes, whose timing
    does not depend on the weights).

    Args:
        folder: Output folder (created if missing).
        model_type: A transformers model type (``bert``, ``deberta-v2``, ``gpt2``, ``llama``...).
        num_labels: Classes of the head (:func:`load_model` gives it the data set's).
        seed: Seed of the initialisation.
        **config: Configuration settings (sizes, special token ids...); the vocabulary is the
            tokenizer's.

    Returns:
        The model spec, ``hf:<folder>``.
    """
    import warnings

    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    with quiet_transformers(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()), **HF_LOAD_SAFELY)
        settings = AutoConfig.for_model(model_type, vocab_size=tokenizer.vocab_size,
                                        num_labels=num_labels, **config)
        torch.manual_seed(seed)
        AutoModelForSequenceClassification.from_config(settings).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return HF.spec_of(str(folder))


def hf_text_task(spec: str, model: nn.Module, tokenizer: Any, num_classes: int,
                  trace_batch: Mapping[str, Any] | None = None, head: str | None = None
                  ) -> Task:
    """The task of a transformers sequence classifier: its architecture
    (:func:`~zest.architectures.architecture_for`) and the architecture's head
    (:data:`~zest.architectures.HF_HEAD_NAMES` for every transformers architecture). How the
    head pools is found by tracing: the model's logits on a padded batch are compared with the
    head applied to the first token and to the last non-padding token (causal decoders read
    the last, as their ``*ForSequenceClassification`` do); an architecture that declares the
    other pooling does not adapt the model, which then runs on the generic adapter. A model
    loaded without zest (:func:`~zest.models.infer.infer_task`) is traced on the user's
    ``trace_batch`` and may name its ``head``."""
    architecture = architecture_for(model, modality="text")
    head_name = head or head_of(spec, model, architecture)
    _pad_right(model, tokenizer)
    task = Task(spec=spec, modality="text", num_classes=num_classes, head_name=head_name,
                architecture=architecture.name, tokenizer=tokenizer,
                pooling=architecture.pooling or "first")
    if tokenizer is not None or trace_batch is not None:
        task.pooling = traced_pooling(model, task, trace_batch)
        task.architecture = architecture_for(model, modality="text", pooling=task.pooling).name
    return task


def _pad_right(model: nn.Module, tokenizer: Any) -> None:
    """Gives the tokenizer (and the model's config) a padding token and right padding: pooling,
    next-token targets and padding trims read the real tokens from the left."""
    if tokenizer is None:
        return
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    tokenizer.padding_side = "right"


def hf_lm_task(spec: str, model: nn.Module, tokenizer: Any, num_classes: int) -> Task:
    """The causal-LM task of a transformers language model (ARCHITECTURE.md §3c): its head is
    the pretrained LM head (the output embeddings, found by identity, so a head tied to the
    input embeddings is still named once, as the head), never reset; features are the last
    non-padding token's final hidden state. A model whose logits at a position depend on later
    tokens (an encoder such as BERT with an LM head) is refused (:func:`traced_causal`)."""
    architecture = architecture_for(model, modality="text", kind="causal_lm", pooling="last")
    head_name = head_of(spec, model, architecture, kind="causal_lm")
    _pad_right(model, tokenizer)
    task = Task(spec=spec, modality="text", num_classes=num_classes, head_name=head_name,
                architecture=architecture.name, tokenizer=tokenizer, pooling="last",
                kind="causal_lm")
    if not traced_causal(model, task):
        raise InvalidInputError(not_a_decoder_message(spec))
    return task


def traced_causal(model: nn.Module, task: Task, ids: torch.Tensor | None = None) -> bool:
    """Whether the model is causal: changing the last token of a text (``ids``, one row of
    token ids; default: a short text from the task's tokenizer) leaves the logits at every
    earlier position as they were."""
    if ids is None:
        ids = task.tokenizer(["one two three four five six"], return_tensors="pt")["input_ids"]
    try:
        with preserved_training_state(model), torch.no_grad():
            model.eval()
            before = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            changed = ids.clone()
            changed[0, -1] = (changed[0, -1] + 1) % before.shape[-1]
            after = model(input_ids=changed, attention_mask=torch.ones_like(ids)).logits
    except (RuntimeError, TypeError, ValueError, KeyError, IndexError, AttributeError):
        return False
    return before.ndim == 3 and bool(torch.allclose(before[:, :-1], after[:, :-1], atol=1e-5,
                                                    rtol=1e-4))


def traced_pooling(model: nn.Module, task: Task, batch: Mapping[str, Any] | None = None) -> str:
    """``"last"`` when the model's logits are its head applied to the last non-padding token of
    the head input, else ``"first"`` (also for heads that see an already pooled vector). Traced
    on ``batch`` (token ids and attention mask), by default a padded pair of texts from the
    task's tokenizer."""
    if batch is None:
        encoded = task.tokenizer(["one two three four five six", "one"], padding=True,
                                 return_tensors="pt")
        batch = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids) if mask is None else mask}
    head = task.head(model)
    captured: dict[str, torch.Tensor] = {}

    def grab(_module: nn.Module, args: tuple) -> None:  # returns None: the input stays as it is
        captured["x"] = args[0]

    try:
        with preserved_training_state(model), torch.no_grad():
            model.eval()
            handle = head.register_forward_pre_hook(grab)
            try:
                out = model(**task.model_inputs(batch))
            finally:
                handle.remove()
            logits = out.logits if hasattr(out, "logits") else out
            hidden = captured["x"]
            if hidden.ndim != 3:
                return "first"
            last = batch["attention_mask"].sum(dim=1) - 1
            pooled = hidden[torch.arange(hidden.shape[0]), last]
            if torch.allclose(head(pooled), logits, atol=1e-4, rtol=1e-4):
                return "last"
            return "first"
    except (RuntimeError, TypeError, ValueError, KeyError, IndexError):
        return "first"


def build_hf_dir(spec: str, path: Path, num_classes: int,
                 kind: TaskKind = "classification") -> tuple[nn.Module, Task]:
    """A transformers directory as a ``*ForSequenceClassification`` model with a fresh head, or
    (``kind="causal_lm"``) as its ``AutoModelForCausalLM`` with the pretrained LM head."""
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    check_hf_folder(path)
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(path), **HF_LOAD_SAFELY)
            if kind == "causal_lm":
                try:
                    model = AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=True,
                                                                 **HF_LOAD_SAFELY)
                except ValueError:  # a configuration without a causal-LM class
                    raise InvalidInputError(not_a_decoder_message(spec)) from None
            else:
                model = AutoModelForSequenceClassification.from_pretrained(
                    str(path), num_labels=num_classes, ignore_mismatched_sizes=True,
                    use_safetensors=True, **HF_LOAD_SAFELY)
    except ZestError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise InvalidInputError(f"transformers cannot load the model folder {str(path)!r} "
                                f"({type(exc).__name__}: {first}); pass hf:<dir> with a "
                                "config.json, .safetensors weights and tokenizer files that "
                                "this transformers reads") from None
    if kind == "causal_lm":
        return model, hf_lm_task(spec, model, tokenizer, num_classes)
    return model, hf_text_task(spec, model, tokenizer, num_classes)


def folder_model_type(folder: str) -> str:
    """The ``model_type`` of a transformers folder's ``config.json`` (the model family of an
    ``hf:`` spec), ``hf`` where it cannot be read."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
        return str(config.get("model_type") or "hf")
    except (OSError, ValueError, AttributeError):  # unreadable, or not a JSON object
        return "hf"


def _build_hf_spec(spec: str, name: str, num_classes: int, *, checkpoint: Any = None,
                   image_size: int | None = None, kind: TaskKind = "classification"
                   ) -> tuple[nn.Module, Task]:
    return build_hf_dir(spec, Path(name), num_classes, kind=kind)


#: The ``hf:<dir>`` scheme (registered by :mod:`zest.models`).
HF = ModelScheme(prefix="hf", usage="hf:<dir>", build=_build_hf_spec,
                 family=folder_model_type, causal_lm=True, local_path=True)

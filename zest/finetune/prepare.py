"""Fine-tuning inside any training loop: the second door to the tuners (ARCHITECTURE.md §3a).

Like peft's ``get_peft_model``, :func:`prepare` changes the model in place so that only the
planned values train (GPS's values, SPSFT's ``W_f``, LoRA's factors, dense layers, the head),
then any loop trains it: a plain torch loop, transformers' ``Trainer``, DistributedDataParallel.
It is the preparation :meth:`Tuner.fit <zest.finetune.base.Tuner.fit>` runs too
(:meth:`Tuner.prepare <zest.finetune.base.Tuner.prepare>`), so both doors train the same values.

```python
model = zest.prepare(model, ranking.top(3), method="gps", batches=[batch], k=4)
...                                  # train it with any loop
zest.delta_of(model).save("run/delta.safetensors")
zest.unprepare(model, merge=True)    # a plain model again, the update in its weights
```

The trained values are parameters and the selections buffers of the model, so ``state_dict``
checkpoints hold them, ``copy.deepcopy`` copies them, and DDP (wrapped around the prepared model)
synchronises them; the model keeps its tuner under
:data:`~zest.finetune.base.PREPARED_ATTRIBUTE` for :func:`delta_of` and :func:`unprepare`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from zest.errors import InvalidInputError
from zest.finetune.base import Tuner, prepared_tuner
from zest.finetune.delta import Delta
from zest.finetune.registry import METHODS, method_options
from zest.models import Batch, Task, infer_task
from zest.planning import FinetunePlan


def prepare(model: nn.Module, layers_or_plan: Sequence[str] | str | FinetunePlan | None,
            method: str | None = None, batches: Iterable[Batch] | None = None,
            task: Task | None = None, **options: Any) -> nn.Module:
    """Prepares ``model`` in place for fine-tuning in any training loop: only the planned
    values are trainable afterwards.

    Args:
        model: The model (not yet wrapped: prepare the inner model, then wrap it in DDP).
        layers_or_plan: Layer names (``ranking.top(k)``, or ``"all"``), or a
            :class:`~zest.planning.FinetunePlan` (``ranking.finetune_plan(...)``), which then
            gives the
            method and its options. ``None`` for methods without layers (``full``, ``head``,
            ``bitfit``).
        method: ``gps``, ``spsft``, ``lora``, ``layers``, ... (:data:`zest.finetune.METHODS`).
        batches: What GPS and SPSFT select from: an iterable of ``(x, y)`` tensors or of dicts
            as transformers' collators make them (``input_ids``, ``attention_mask``,
            ``labels``); the method's ``selection_batches`` of them (8 by default) are read.
        task: The model's :class:`~zest.models.Task` (from :func:`zest.load_model`); when
            ``None`` it is inferred (:func:`zest.models.infer_task`, from the first batch).
        **options: The method's options (GPS ``k``, SPSFT ``ratio``/``r``/``importance``,
            LoRA ``rank``, ``seed``...); a plan's options are the defaults.

    Returns:
        The same model, prepared.

    Raises:
        InvalidInputError: A wrapped or already prepared model, no method, an option the
            method does not take, a layer it cannot tune, batches it cannot read, or a task
            that cannot be inferred.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        raise InvalidInputError("prepare the model inside the wrapper: zest.prepare(model, ...) "
                                "first, then wrap it in DistributedDataParallel")
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"model must be a torch nn.Module, got {type(model).__name__}")
    if isinstance(layers_or_plan, FinetunePlan):
        plan = layers_or_plan
        if method is not None and method != plan.method:
            raise InvalidInputError(f"the plan is for method={plan.method!r}, not {method!r}; "
                                    "leave method out or plan for it", parameter="method")
        method, layers, options = plan.method, plan.layers, {**plan.options, **options}
    else:
        layers = layers_or_plan
    if method is None:
        raise InvalidInputError("pass method= (gps, spsft, lora, layers, ...) or a plan from "
                                "ranking.finetune_plan(...)")
    tuner_class = METHODS.get(method)
    tuner_options = method_options(method, options)
    if task is None:
        first, batches = _peek(batches)
        try:
            task = infer_task(model, first)
        except InvalidInputError as error:
            raise InvalidInputError(f"{error}; or pass task= (the Task zest.load_model returns "
                                    "with the model)") from None
    layer_options = {"layers": layers} if tuner_class.uses_layers else {}
    tuner: Tuner = tuner_class(model, task, **layer_options, options=tuner_options)
    return tuner.prepare(batches)


def delta_of(model: nn.Module) -> Delta:
    """The :class:`~zest.finetune.delta.Delta` of a prepared model as it is now (the format
    ``Tuner.delta()`` saves; its base fingerprint taken at :func:`prepare`), for
    ``delta.save(path)`` and :func:`zest.apply_delta`. A DDP wrapper is looked through."""
    return _tuner_of(model).delta()


def unprepare(model: nn.Module, merge: bool = True) -> nn.Module:
    """Takes the preparation off ``model`` in place: hooks, sparse forwards, parametrizations
    and adapters removed, ``requires_grad`` as before :func:`prepare`.

    Args:
        model: A prepared model (a DDP wrapper is looked through).
        merge: ``True``: the weights then include the trained update (the model computes as
            the prepared one did); ``False``: the model is the base again, exactly.

    Returns:
        The unwrapped model.
    """
    return _tuner_of(model).unwrap(merge=merge)


def _tuner_of(model: nn.Module) -> Tuner:
    tuner = prepared_tuner(model)
    if tuner is None:
        raise InvalidInputError("this model is not prepared; call zest.prepare(model, layers, "
                                "method=...) first")
    return tuner


def _peek(batches: Iterable[Batch] | None) -> tuple[Batch | None, Iterable[Batch] | None]:
    """The first batch, and the batches to read from then (a one-pass iterator gets its first
    batch put back in front)."""
    if batches is None or isinstance(batches, Mapping | torch.Tensor) or \
            not isinstance(batches, Iterable):
        return None, batches
    iterator = iter(batches)
    first = next(iterator, None)
    if iterator is batches:
        return first, itertools.chain([] if first is None else [first], iterator)
    return first, batches

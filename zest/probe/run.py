"""One forward and one backward pass with hooks → a :class:`LayerContext` per layer
(ARCHITECTURE.md §2).

The probe is the only place that runs the model for zero-shot metrics. It runs

1. one forward pass with forward hooks on the candidate layers (activation summaries) and tensor
   hooks on their outputs (output-gradient summaries), then one backward pass with
   ``torch.autograd.grad`` (``.grad`` of the model is never touched). For Linear and Conv2d
   layers the probe forms ``∇W`` itself from the recorded input and output gradient, one half
   of the batch at a time, so the two half-batch gradients (``grad_snr``) come at no extra cost;
   autograd only propagates input gradients through them;
2. at most one extra pass on the batch, only when a requested metric needs a Hessian-vector
   product (GraSP): a finite-difference ``H g ≈ (∇L(θ + εg) − ∇L(θ)) / ε``;
3. a data-free SynFlow pass on a single all-ones input, only when ``synflow`` is requested
   (Tanaka et al. 2020 use exactly such an input; one example suffices because the score is
   linear in the batch size), in the model's dtype with a float64 retry on overflow; a model
   whose forward refuses that input (T5's classifier pools at end-of-text tokens) gets none.

Everything it changes is restored in ``finally``: ``requires_grad``, train/eval flags, parameter
values and dtypes; every hook is removed, also when a metric raises.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from zest.errors import InvalidInputError
from zest.layers import Layer, candidate_layers, select_layers
from zest.models import Batch, Task, check_finite, preserved_training_state, probe_loss_for
from zest.probe import gradients
from zest.probe import passes as extra_passes
from zest.probe.context import BACKWARD_NEEDS, LABEL_NEEDS, NEEDS, LayerContext, ProbeResult
from zest.probe.recorder import Recorder


def probe(model: nn.Module, task: Task, batch: Batch, *, layers: Sequence[Layer] | None = None,
          layer_names: Sequence[str] | None = None, needs: Iterable[str] = ("weight", "grad"),
          loss: str | None = None, device: torch.device | str | None = None,
          batch_label: str = "probe batch") -> ProbeResult:
    """Runs the probe on one batch and returns a context per candidate layer.

    Args:
        model: The model (left exactly as it was).
        task: Its task adapter.
        batch: One minibatch.
        layers: Candidate layers (default: all of :func:`~zest.layers.candidate_layers`).
        layer_names: Restrict the candidates to these names or block names.
        needs: Quantities to compute (a subset of :data:`NEEDS`), usually the union of the
            requested metrics' ``needs``.
        loss: ``supcon`` (supervised contrastive on the head input, τ = 0.07) or ``ce``;
            default: the task's (:func:`~zest.models.probe_loss_for`: ``supcon``, and a
            causal-LM task's next-token ``ce``).
        device: Where to run (default: where the model is).
        batch_label: How error messages name the batch (e.g. ``"batch 3"``).

    Returns:
        A :class:`ProbeResult`.
    """
    loss = probe_loss_for(task.kind, loss)
    needs = set(needs) | {"weight"}
    unknown = needs - NEEDS
    if unknown:
        raise InvalidInputError(f"unknown probe needs {sorted(unknown)}; known: {sorted(NEEDS)}")
    if loss not in ("supcon", "ce"):
        raise InvalidInputError(f"unknown probe loss {loss!r}; use 'supcon' or 'ce'")
    batch_size = task.batch_size(batch)
    labelled = task.has_labels(batch)
    if not labelled and needs & LABEL_NEEDS:
        raise InvalidInputError(f"{batch_label} has no labels, but the probe needs them for "
                                f"{sorted(needs & LABEL_NEEDS)}; pass a labelled batch or only "
                                "label-free metrics")
    if labelled and loss == "supcon" and batch_size < 2:
        raise InvalidInputError(f"batch_size={batch_size} is too small for the supcon probe "
                                "loss; use a batch_size of 2 or more (32 recommended)",
                                parameter="batch_size")
    if layers is None:
        layers = candidate_layers(model, task.head_name)
    layers = select_layers(layers, layer_names)
    if not layers:
        raise InvalidInputError("no candidate layer to probe; check layers", parameter="layers")
    if device is None:
        device = next(model.parameters()).device
    modules = {layer.name: model.get_submodule(layer.name) for layer in layers}
    weights = [modules[layer.name].weight for layer in layers]
    needs_backward = bool(needs & BACKWARD_NEEDS)

    start = time.perf_counter()
    passes: list[str] = []
    recorder = Recorder(layers, modules, needs, batch, batch_size, model)
    saved_storages: dict[torch.Tensor, torch.Tensor] = {}
    grads: list[torch.Tensor] | None = None
    hvps: list[torch.Tensor] | None = None
    synflow_grads: list[torch.Tensor] | None = None
    halves: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    fisher_diagonal: dict[str, float] = {}
    with preserved_training_state(model):
        try:
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            for w in weights:
                w.requires_grad_(True)
            recorder.attach()
            with torch.enable_grad():
                output = task.forward(model, batch, device)
                if labelled:  # an unlabelled batch gets the forward pass alone (label-free needs)
                    loss_value = task.loss(output, loss)
                    check_finite(loss_value, batch_label)
                passes.append("forward")
                if needs_backward:
                    grads, halves = gradients.weight_gradients(loss_value, recorder, layers,
                                                                modules)
                    passes.append("backward")
                recorder.detach()  # the passes below must not re-fire the output hooks
                for w in weights:
                    w.requires_grad_(True)
                if "per_example_fisher" in needs:
                    fisher_diagonal = gradients.per_example_fisher(recorder, modules)
                recorder.output_grads.clear()
                recorder.outputs.clear()
                recorder.inputs.clear()
            recorder.detach()
            del output
            if "hvp" in needs and grads is not None:
                hvps = extra_passes.finite_difference_hvp(
                    model, task, batch, device, loss, layers, modules, grads, saved_storages,
                    batch_label)
                extra_passes.swap_back(saved_storages)
                for w in weights:
                    w.requires_grad_(True)
                passes.append("hvp")
            if "synflow" in needs:
                synflow_grads = extra_passes.synflow_gradients(model, task, batch, device, weights,
                                                      saved_storages)
                extra_passes.swap_back(saved_storages)
                if synflow_grads is not None:
                    passes.append("synflow")
        finally:
            recorder.detach()
            extra_passes.swap_back(saved_storages)

    labels = task.labels(batch).detach().cpu() if "labels" in needs else None
    contexts: dict[str, LayerContext] = {}
    skipped: dict[str, str] = {}
    for i, layer in enumerate(layers):
        if layer.name not in recorder.recorded:
            skipped[layer.name] = (
                "the forward pass does not call it as a module (it reads the weight directly)"
                if layer.name not in recorder.called else
                "its output is not one tensor per example, so it gives no per-layer signal")
            continue
        module = modules[layer.name]
        bias = module._parameters.get("bias")  # noqa: SLF001
        contexts[layer.name] = LayerContext(
            layer=layer,
            weight=module.weight.detach(),
            bias=bias.detach() if bias is not None else None,
            grad=grads[i].detach() if grads is not None else None,
            grad_halves=halves.get(layer.name),
            hvp=hvps[i] if hvps is not None else None,
            synflow_grad=synflow_grads[i] if synflow_grads is not None else None,
            activation_stats=recorder.activation_stats.get(layer.name),
            binary_kernel=recorder.binary_kernels.get(layer.name),
            features=recorder.features.get(layer.name),
            fisher_channels=recorder.fisher.get(layer.name),
            labels=labels,
            pooled=recorder.pooled.get(layer.name),
            fisher_diagonal=fisher_diagonal.get(layer.name),
            fisher_diagonal_total=sum(fisher_diagonal.values()) if fisher_diagonal else None,
            block_shift=recorder.block_shifts.get(layer.block),
        )
    if not contexts:
        raise InvalidInputError(f"none of the {len(layers)} candidate layers is called as a "
                                f"module by the forward pass on {batch_label}; this "
                                "architecture needs an adapter (see ARCHITECTURE.md §6)")
    return ProbeResult(contexts=contexts,
                       loss=float(loss_value.detach()) if labelled else math.nan,
                       seconds=time.perf_counter() - start, passes=passes, skipped=skipped)

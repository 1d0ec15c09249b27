"""SPSFT: structured-pruning-based sparse fine-tuning (spsft-paper §3).

§3.1: score every output neuron of a chosen layer, keep the top-r, and train a dense
``W_f ∈ R^{r×d_in}`` initialised to zero, added to those rows only. The forward uses additivity,
``f(W + M W_f, x) = f(W, x) + scatter_rows(f(W_f, x))`` (Eq. 5): the frozen ``W`` receives no
gradient and ``W_f x`` is not cached (``M`` is a fixed row scatter). Normalisation layers get the
per-row (per-channel) variant: ``r`` trainable scale offsets on the normalised input.
§3.2 / Appendix A: importance by the L2 norm of the neuron's weight vector, by Taylor importance
``η_i = Σ_j |ḡ_j w_j|`` (``ḡ`` the mean gradient over the selection data), or by the
quantile-mean Taylor importance (class-wise ``η_i^t`` on each class's data, averaged over the
0 %, 10 %, …, 100 % quantiles over classes; Eq. 6–7).

The extra output is added by a forward hook on the layer, so module names stay as they were;
the rows and ``W_f`` live in a :class:`RowUpdate` child of the layer (a buffer and a parameter:
``state_dict``, ``copy.deepcopy`` and DDP see them), which the hook reads at every call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from zest.architectures import conv_forward
from zest.errors import InvalidInputError
from zest.finetune.base import Tuner
from zest.finetune.delta import DeltaEntry
from zest.finetune.options import SPSFTOptions
from zest.finetune.registry import LayerShape, method_aware_choice, register_tuner
from zest.finetune.sparse import add_rows
from zest.layers import neuron_rows, output_dim, transforms_weight
from zest.models import Batch, preserved_training_state

QUANTILES = torch.linspace(0, 1, 11)
NORM_TYPES = (nn.LayerNorm, nn.modules.batchnorm._BatchNorm)  # noqa: SLF001
#: The child-module name under which a layer keeps its :class:`RowUpdate`.
ROW_UPDATE = "row_update"


class RowUpdate(nn.Module):
    """SPSFT's trained rows of one layer: ``rows`` (the chosen output neurons, a buffer) and
    ``delta`` (``W_f``, one row of the layer's weight per chosen neuron; a scale offset per
    row for normalisation layers), zero at the start."""

    def __init__(self, rows: torch.Tensor, inner: tuple[int, ...], dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("rows", rows)
        self.delta = nn.Parameter(torch.zeros((len(rows),) + inner, dtype=dtype,
                                              device=rows.device))


def row_update_of(module: nn.Module) -> RowUpdate | None:
    """The layer's :class:`RowUpdate`, if it has one."""
    update = module._modules.get(ROW_UPDATE)  # noqa: SLF001 - own child only
    return update if isinstance(update, RowUpdate) else None


def _add_row_update(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    """The forward hook: ``out + scatter_rows(f(W_f, x))`` (Eq. 5), from the layer's own
    :class:`RowUpdate` (so a copy of the model computes with its own copy)."""
    update = row_update_of(module)
    extra, dim = _row_output(module, update.rows, update.delta, args[0])
    return add_rows(out, dim % out.ndim, update.rows, extra.to(out.dtype))


def _remove_row_update(module: nn.Module) -> None:
    """Removes the hook and the :class:`RowUpdate` (the weight was never changed)."""
    hooks = module._forward_hooks  # noqa: SLF001 - hooks found by their function, not a handle
    for key in [key for key, hook in hooks.items() if hook is _add_row_update]:
        del hooks[key]
        module._forward_hooks_with_kwargs.pop(key, None)  # noqa: SLF001
        module._forward_hooks_always_called.pop(key, None)  # noqa: SLF001
    module._modules.pop(ROW_UPDATE, None)  # noqa: SLF001


def _row_output(module: nn.Module, rows: torch.Tensor, weight_rows: torch.Tensor,
                x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``f(W_f, x)`` for the selected rows, and the output dimension to scatter into."""
    if isinstance(module, nn.Linear) or output_dim(module) == 1:  # Linear, GPT-2's Conv1D
        return F.linear(x, weight_rows), -1
    if isinstance(module, nn.Conv2d):
        groups = module.groups
        if groups == 1:
            inputs, conv_groups = x, 1
        else:  # grouped or depthwise: each selected row reads the input channels of its group
            per_group_in = module.in_channels // groups
            group_of_row = rows // (module.out_channels // groups)
            channels = (group_of_row[:, None] * per_group_in
                        + torch.arange(per_group_in, device=rows.device)).reshape(-1)
            inputs, conv_groups = x[:, channels], len(rows)
        padding = module.padding
        if conv_forward(module) == "dynamic_same":
            from timm.layers import pad_same

            inputs = pad_same(inputs, module.weight.shape[-2:], module.stride, module.dilation)
            padding = 0
        return F.conv2d(inputs, weight_rows, None, module.stride, padding, module.dilation,
                        conv_groups), 1
    if isinstance(module, nn.LayerNorm):
        normalized = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
        return normalized[..., rows] * weight_rows, -1
    if isinstance(module, nn.modules.batchnorm._BatchNorm):  # noqa: SLF001
        use_batch = module.training or module.running_mean is None
        normalized = F.batch_norm(x, None if use_batch else module.running_mean,
                                  None if use_batch else module.running_var, None, None,
                                  use_batch, 0.0, module.eps)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return normalized[:, rows] * weight_rows.view(shape), 1
    raise InvalidInputError(f"SPSFT cannot handle {type(module).__name__} layers; train them "
                            "with the 'gps' or 'layers' method")


@register_tuner
class SPSFT(Tuner):
    """SPSFT on the chosen layers; its options (``ratio`` or ``r``, ``importance``,
    ``selection_batches``): :class:`SPSFTOptions`."""

    method: ClassVar[str] = "spsft"
    options_class: ClassVar[type[SPSFTOptions]] = SPSFTOptions

    @classmethod
    def can_tune(cls, name: str, module: nn.Module) -> bool:
        """Linear (GPT-2's Conv1D too), Conv2d and normalisation layers whose forward uses the
        stored weight as it is."""
        return (isinstance(module, (nn.Linear, nn.Conv2d, *NORM_TYPES))
                or output_dim(module) == 1) and not transforms_weight(module)

    @classmethod
    def density_values(cls, shapes: Sequence[LayerShape]) -> list[Any]:
        """Every ratio ``r / rows`` at which some layer's neuron count changes."""
        return sorted({r / rows for rows in {shape.rows for shape in shapes}
                       for r in range(1, rows + 1)})

    @classmethod
    def layer_trainable(cls, shape: LayerShape, options: Mapping[str, Any]
                        ) -> dict[str, int] | None:
        """``r`` rows of ``W_f`` (each as wide as a neuron's weights); ``None`` when ``r``
        exceeds the layer's neurons."""
        r = cls.neuron_count(shape.rows, options["ratio"], options["r"])
        if r > shape.rows:
            return None
        return {"trainable": r * shape.width, "r": r}

    @staticmethod
    def neuron_count(out_features: int, ratio: float | None, r: int | None) -> int:
        """Neurons tuned in a layer with ``out_features`` outputs: ``r`` when given, else the
        ``ratio`` share of them (at least one)."""
        if r is not None:
            return r
        return max(1, round(ratio * out_features))

    def _allows_any_module(self) -> bool:
        return True  # normalisation layers may be named explicitly (per-row variant)

    def _check_layers(self) -> None:
        for name in self.layer_names:
            module = self.model.get_submodule(name)
            if transforms_weight(module):
                raise InvalidInputError(f"SPSFT cannot tune {name!r} ({type(module).__name__}): "
                                        "its forward standardises the weight, so an update "
                                        "added to its output is not a weight update; train "
                                        "it with the 'gps' or 'layers' method")
            if not self.can_tune(name, module):
                raise InvalidInputError(f"SPSFT cannot handle {name!r} ({type(module).__name__}); "
                                        "it tunes Linear (and GPT-2's Conv1D), Conv2d, LayerNorm "
                                        f"and BatchNorm rows — {method_aware_choice('spsft')}, "
                                        "or train this layer with the 'gps' or 'layers' method")
            rows = module.weight.shape[output_dim(module)]
            if self.rows_for(rows) > rows:
                raise InvalidInputError(f"r={self.r} is larger than the {rows} output neurons of "
                                        f"{name!r}; use r ≤ {rows} or a ratio", parameter="r")

    def rows_for(self, out_features: int) -> int:
        """Neurons tuned in a layer with ``out_features`` outputs (:meth:`neuron_count`)."""
        return self.neuron_count(out_features, self.ratio, self.r)

    # -- importance ------------------------------------------------------------------------------
    def selection_batch_count(self) -> int:
        """The Taylor importances read ``selection_batches`` batches; ``l2`` reads none."""
        return 0 if self.importance == "l2" else self.selection_batches

    def neuron_importance(self, batches: Sequence[Batch]) -> dict[str, torch.Tensor]:
        """Importance per output neuron of each chosen layer (§3.2, Appendix A), from
        ``batches`` (unused by ``l2``)."""
        weights = {n: self.model.get_submodule(n).weight for n in self.layer_names}
        dims = {n: output_dim(self.model.get_submodule(n)) for n in self.layer_names}
        if self.importance == "l2":
            return {n: neuron_rows(w.detach(), dims[n]).norm(dim=1) for n, w in weights.items()}
        grads = self._mean_gradients(batches, weights, by_class=(
            self.importance == "qm_taylor"))
        scores = {}
        for name, w in weights.items():
            flat_w = neuron_rows(w.detach(), dims[name])
            if self.importance == "taylor":
                scores[name] = (neuron_rows(grads[name], dims[name]) * flat_w).abs().sum(dim=1)
            else:
                per_class = torch.stack([(neuron_rows(g, dims[name]) * flat_w).abs().sum(dim=1)
                                         for g in grads[name]])  # (classes, rows)
                scores[name] = torch.quantile(per_class.double(), QUANTILES.double(),
                                              dim=0).mean(dim=0).float()
        return scores

    def _mean_gradients(self, batches: Sequence[Batch], weights: dict[str, nn.Parameter],
                        by_class: bool) -> dict[str, Any]:
        """Mean gradient of the cross-entropy over the selection data (per class if asked)."""
        names = list(weights)
        classes = self.task.num_classes
        sums = {n: torch.zeros((classes,) + tuple(w.shape) if by_class else w.shape)
                for n, w in weights.items()}
        counts = torch.zeros(classes if by_class else 1)
        with preserved_training_state(self.model):
            self._freeze_all()
            for w in weights.values():
                w.requires_grad_(True)
            self.model.eval()
            for batch in batches:
                output = self.task.forward(self.model, batch, self.device_)
                losses = self.task.example_losses(output)
                if not by_class:
                    grads = torch.autograd.grad(losses.sum(), list(weights.values()))
                    for n, g in zip(names, grads, strict=True):
                        sums[n] += g.cpu()
                    counts[0] += len(losses)
                    continue
                if output.labels is None or output.labels.ndim != 1:
                    raise InvalidInputError("importance='qm_taylor' averages over classes and "
                                            "needs one class label per example; these batches "
                                            "have token labels, use importance='taylor'",
                                            parameter="importance")
                present = output.labels.unique().tolist()
                for i, t in enumerate(present):
                    selected = output.labels == t
                    grads = torch.autograd.grad(losses[selected].sum(), list(weights.values()),
                                                retain_graph=i < len(present) - 1)
                    for n, g in zip(names, grads, strict=True):
                        sums[n][t] += g.cpu()
                    counts[t] += int(selected.sum())
        if not by_class:
            return {n: s / counts[0] for n, s in sums.items()}
        seen = counts > 0
        return {n: [s[t] / counts[t] for t in range(classes) if seen[t]]
                for n, s in sums.items()}

    # -- wrapping --------------------------------------------------------------------------------
    def _prepare(self, batches: list[Batch]) -> None:
        scores = self.neuron_importance(batches)
        self._freeze_all()
        for name in self.layer_names:
            module = self.model.get_submodule(name)
            weight = module.weight
            dim = output_dim(module)
            r = self.rows_for(weight.shape[dim])
            rows = scores[name].topk(r).indices.sort().values.to(weight.device)
            # W_f ∈ R^{r × d_in} (r scale offsets for normalisation layers), zero at the start
            inner = tuple(weight.movedim(dim, 0).shape[1:])
            module.add_module(ROW_UPDATE, RowUpdate(rows, inner, weight.dtype))
            module.register_forward_hook(_add_row_update)
        for p in self._head_parameters():
            p.requires_grad_(True)

    def _updates(self) -> dict[str, RowUpdate]:
        updates = {name: row_update_of(self.model.get_submodule(name))
                   for name in self.layer_names}
        return {name: u for name, u in updates.items() if u is not None}

    @property
    def rows_(self) -> dict[str, torch.Tensor]:
        """The chosen output neurons of each chosen layer (the model's buffers)."""
        return {name: update.rows for name, update in self._updates().items()}

    @property
    def deltas_(self) -> dict[str, nn.Parameter]:
        """``W_f`` of each chosen layer (the model's parameters)."""
        return {name: update.delta for name, update in self._updates().items()}

    def _unwrap(self) -> None:
        for name in self.layer_names:
            _remove_row_update(self.model.get_submodule(name))

    def trainable_parameters(self) -> list[nn.Parameter]:
        deltas = list(self.deltas_.values())
        return deltas + self._head_parameters() if deltas else []

    def _delta_entries(self) -> list[DeltaEntry]:
        entries = []
        for name in self.layer_names:
            module = self.model.get_submodule(name)
            weight = module.weight
            entries.append(DeltaEntry(name=f"{name}.weight", kind="rows_add",
                                      tensors={"indices": self.rows_[name].cpu(),
                                               "rows": self.deltas_[name].detach().cpu()},
                                      shape=list(weight.shape),
                                      extra={"transposed": True} if output_dim(module) else {}))
        entries += self._head_entries()
        return entries

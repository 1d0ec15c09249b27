"""GPS: gradient-based parameter selection (Zhang et al., CVPR 2024; gps-paper §3).

§3.1: the importance of a weight is the modulus of the gradient of the *supervised contrastive*
loss (τ = 0.07, on the head input, no classification head) accumulated over selection batches;
two views per example (augmented images; dropout noise for text). For every output neuron of a
chosen layer, its top-K input connections are selected ("at least one" per neuron).
§3.2: only the selected entries train; the head and the biases train; normalisation layers and
position embeddings stay frozen (as in the reference implementation).

Implementation: the selected entries are values at fixed indices. Linear layers (and
transformers' ``Conv1D``) and embeddings add them in their forward pass without a dense gradient
or a dense copy of the weight (:mod:`zest.finetune.sparse`); other layers (convolutions) add them
through a ``torch.nn.utils.parametrize`` parametrization (``W + scatter(values)``), whose dense
gradient exists for one layer at a time in the backward pass. Either way the frozen weight has
no gradient and the optimizer state covers only the values. The reference dense-masked
implementation (a full-size gradient masked by a hook, dense optimizer state) is available as
``implementation="dense_mask"`` for comparison.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn.utils import parametrize

from zest.architectures import gps_keeps_frozen
from zest.errors import InvalidInputError
from zest.finetune.base import Tuner
from zest.finetune.delta import DeltaEntry
from zest.finetune.options import GPSOptions
from zest.finetune.registry import LayerShape, method_aware_choice, register_tuner
from zest.finetune.sparse import (
    SparseUpdate,
    attach_sparse_update,
    detach_sparse_update,
    sparse_update_of,
)
from zest.layers import neuron_rows, output_dim
from zest.models import Batch, Task, preserved_training_state, supervised_contrastive_loss


class SparseDelta(SparseUpdate):
    """Parametrization ``W ↦ W + scatter(values at indices)`` over the rows (output neurons) of
    W viewed 2-D, for the layer types without a sparse forward (convolutions); the same entries
    and storage as :class:`~zest.finetune.sparse.SparseUpdate`."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.transposed:
            return weight.T.scatter_add(1, self.indices, self.values).T
        flat = weight.reshape(weight.shape[0], -1)
        return flat.scatter_add(1, self.indices, self.values).view_as(weight)


def two_views(task: Task, model: nn.Module, batch, device, generator: torch.Generator
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features of two views of a batch: augmented images, or two dropout passes."""
    if task.modality == "image":
        x, y = batch
        views = [augment_images(x, generator) for _ in range(2)]
        features = [task.forward(model, (v, y), device).features for v in views]
    else:
        features = [task.forward(model, batch, device).features for _ in range(2)]
    labels = task.labels(batch).to(features[0].device)
    return torch.cat(features), torch.cat([labels, labels])


def augment_images(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """SupCon-style view: random resized crop (scale 0.6–1) and brightness/contrast jitter,
    per image, seeded (no flips: digits and text-like images are not mirror-symmetric)."""
    n, _, h, w = x.shape
    out = torch.empty_like(x)
    for i in range(n):
        scale = 0.6 + 0.4 * float(torch.rand(1, generator=generator))
        ch, cw = max(2, int(round(h * scale ** 0.5))), max(2, int(round(w * scale ** 0.5)))
        top = int(torch.randint(0, h - ch + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - cw + 1, (1,), generator=generator))
        crop = x[i:i + 1, :, top:top + ch, left:left + cw]
        crop = nn.functional.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)
        brightness = 0.8 + 0.4 * float(torch.rand(1, generator=generator))
        contrast = 0.8 + 0.4 * float(torch.rand(1, generator=generator))
        mean = crop.mean()
        out[i] = ((crop - mean) * contrast + mean) * brightness
    return out.clamp(0, 1)


def _attach_values(module: nn.Module, indices: torch.Tensor, transposed: bool) -> nn.Parameter:
    """The trainable values at ``indices`` of the layer's rows: through the layer's sparse forward
    (:func:`zest.finetune.sparse.attach_sparse_update`) where it has one, else through the
    :class:`SparseDelta` parametrization."""
    update = attach_sparse_update(module, indices)
    if update is not None:
        return update.values
    parametrize.register_parametrization(
        module, "weight", SparseDelta(indices, module.weight.dtype, transposed))
    return module.parametrizations.weight[0].values


@register_tuner
class GPS(Tuner):
    """GPS on the chosen layers (ZEST) or on every layer (``layers="all"``, the paper's default);
    its options (``k``, ``selection_batches``, ``implementation``): :class:`GPSOptions`."""

    method: ClassVar[str] = "gps"
    options_class: ClassVar[type[GPSOptions]] = GPSOptions

    @classmethod
    def can_tune(cls, name: str, module: nn.Module) -> bool:
        """Not normalisation layers and position embeddings (kept frozen, as in the paper;
        each architecture names them: :func:`zest.architectures.gps_keeps_frozen`)."""
        return not gps_keeps_frozen(name)

    @classmethod
    def density_values(cls, shapes: Sequence[LayerShape]) -> list[Any]:
        """K from 1 to the widest layer's input connections per neuron."""
        return list(range(1, max(shape.width for shape in shapes) + 1))

    @classmethod
    def layer_trainable(cls, shape: LayerShape, options: Mapping[str, Any]
                        ) -> dict[str, int] | None:
        """K values per output neuron plus the bias; ``None`` when the layer's neurons have
        fewer than K inputs (a named layer must have at least K)."""
        k = options["k"]
        if k > shape.width:
            return None
        return {"trainable": shape.rows * k + shape.bias, "k": k}

    def _check_layers(self) -> None:
        if self.layers == "all":
            self.layer_names = [n for n in self.layer_names
                                if self.can_tune(n, self.model.get_submodule(n))]
        for name in self.layer_names:
            if not self.can_tune(name, self.model.get_submodule(name)):
                raise InvalidInputError(f"GPS keeps {name!r} frozen (normalisation layers and "
                                        "position embeddings stay frozen, as in the paper); "
                                        f"{method_aware_choice('gps')}, or train it with the "
                                        "'layers' method")
            module = self.model.get_submodule(name)
            width = neuron_rows(module.weight, output_dim(module)).shape[1]
            if self.k > width and self.layers != "all":
                raise InvalidInputError(f"k={self.k} is larger than the {width} input connections "
                                        f"per neuron of {name!r}; use k ≤ {width}",
                                        parameter="k")

    def selection_batch_count(self) -> int:
        """GPS selects from the gradients of ``selection_batches`` batches."""
        return self.selection_batches

    def importance(self, batches: Sequence[Batch]) -> dict[str, torch.Tensor]:
        """|Σ ∇W L_supcon| over ``batches``, per chosen layer (§3.1); for a causal-LM task,
        whose texts have no classes to contrast, ``L`` is its next-token loss."""
        weights = {name: self.model.get_submodule(name).weight for name in self.layer_names}
        total = {name: torch.zeros_like(w) for name, w in weights.items()}
        generator = torch.Generator().manual_seed(self.seed)
        with preserved_training_state(self.model):
            self._freeze_all()
            for w in weights.values():
                w.requires_grad_(True)
            # dropout noise makes the two text views; images keep frozen BatchNorm statistics
            self.model.train(self.task.modality == "text")
            for batch in batches:
                if self.task.kind == "causal_lm":
                    loss = self.task.loss(self.task.forward(self.model, batch, self.device_))
                else:
                    features, labels = two_views(self.task, self.model, batch, self.device_,
                                                 generator)
                    loss = supervised_contrastive_loss(features, labels)
                grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
                for name, g in zip(weights, grads, strict=True):
                    if g is not None:
                        total[name] += g.detach()
        return {name: t.abs() for name, t in total.items()}

    def _prepare(self, batches: list[Batch]) -> None:
        scores = self.importance(batches)
        self._freeze_all()
        self._mask_indices: dict[str, torch.Tensor] = {}
        self._originals: dict[str, torch.Tensor] = {}
        self._mask_hooks = []
        for name in self.layer_names:
            module = self.model.get_submodule(name)
            transposed = output_dim(module) == 1
            flat = neuron_rows(scores[name], output_dim(module))
            indices = flat.topk(min(self.k, flat.shape[1]), dim=1).indices.sort(dim=1).values
            if self.implementation == "sparse":
                _attach_values(module, indices, transposed)
            else:
                weight = module.weight
                self._mask_indices[name] = indices
                # the selected entries' starting values, for the delta (not a dense copy)
                self._originals[name] = neuron_rows(weight.detach(), output_dim(module)).gather(
                    1, indices)
                mask = torch.zeros_like(flat)
                mask.scatter_(1, indices, 1.0)
                mask = mask.T.contiguous() if transposed else mask.view_as(weight)
                weight.requires_grad_(True)
                self._mask_hooks.append(weight.register_hook(lambda g, m=mask: g * m))
            bias = module._parameters.get("bias")  # noqa: SLF001
            if bias is not None:
                bias.requires_grad_(True)
        for p in self._head_parameters():
            p.requires_grad_(True)

    def _update(self, name: str) -> SparseUpdate | None:
        """The values of a chosen layer (sparse implementation): its sparse forward's, or its
        parametrization's; ``None`` before :meth:`prepare`."""
        module = self.model.get_submodule(name)
        update = sparse_update_of(module)
        if update is None and parametrize.is_parametrized(module, "weight"):
            update = module.parametrizations.weight[0]
        return update

    @property
    def indices_(self) -> dict[str, torch.Tensor]:
        """The selected input connections of each chosen layer's neurons (the model's
        buffers), ``(rows, k)``."""
        if self.implementation == "sparse":
            return {name: self._update(name).indices for name in self.layer_names}
        return dict(getattr(self, "_mask_indices", {}))

    def _unwrap(self) -> None:
        for name in self.layer_names:
            module = self.model.get_submodule(name)
            detach_sparse_update(module, fold=False)
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        for hook in getattr(self, "_mask_hooks", []):
            hook.remove()
        self._mask_hooks = []

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The selected values (or, for ``dense_mask``, the masked weights), the chosen
        layers' biases and the head, read from the model; none before :meth:`prepare`."""
        params = []
        for name in self.layer_names:
            module = self.model.get_submodule(name)
            if self.implementation == "sparse":
                update = self._update(name)
                if update is None:
                    return []
                params.append(update.values)
            elif name in getattr(self, "_mask_indices", {}):
                params.append(module.weight)
            else:
                return []
            bias = module._parameters.get("bias")  # noqa: SLF001
            if bias is not None:
                params.append(bias)
        return params + self._head_parameters()

    def count_trainable(self) -> int:
        """Selected weight entries + biases + head."""
        count = sum(int(i.numel()) for i in self.indices_.values())
        for name in self.layer_names:
            bias = self.model.get_submodule(name)._parameters.get("bias")  # noqa: SLF001
            count += bias.numel() if bias is not None else 0
        return count + sum(p.numel() for p in self._head_parameters())

    def _delta_entries(self) -> list[DeltaEntry]:
        entries = []
        for name in self.layer_names:
            module = self.model.get_submodule(name)
            indices = self.indices_[name]
            if self.implementation == "sparse":
                update = self._update(name)
                values = update.values.detach()
                shape = list(module.parametrizations.weight.original.shape
                             if parametrize.is_parametrized(module, "weight")
                             else module.weight.shape)
            else:
                values = neuron_rows(module.weight.detach(), output_dim(module)).gather(
                    1, indices) - self._originals[name]
                shape = list(module.weight.shape)
            entries.append(DeltaEntry(name=f"{name}.weight", kind="sparse_add",
                                      tensors={"indices": indices.cpu(),
                                               "values": values.cpu()}, shape=shape,
                                      extra={"transposed": True} if output_dim(module) else {}))
            bias = module._parameters.get("bias")  # noqa: SLF001
            if bias is not None:
                entries += self._dense_entries({f"{name}.bias": bias})
        entries += self._head_entries()
        return entries

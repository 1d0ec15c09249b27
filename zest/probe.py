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
   linear in the batch size), in the model's dtype with a float64 retry on overflow.

Everything it changes is restored in ``finally``: ``requires_grad``, train/eval flags, parameter
values and dtypes; every hook is removed, also when a metric raises.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from zest.errors import InvalidInputError
from zest.layers import Layer, candidate_layers, select_layers
from zest.models import Batch, Task, check_finite, preserved_training_state

#: The quantities a metric may declare it needs (``needs=`` of ``register_metric``).
NEEDS = frozenset({
    "weight",        # the weight and bias (always present)
    "grad",          # ∇W of the probe loss
    "grad_halves",   # the two half-batch contributions to ∇W
    "hvp",           # Hessian-vector product H·∇W (restricted to the candidate weights)
    "synflow",       # ∂R/∂|W| of the data-free SynFlow objective
    "activations",   # mean / std / sparsity of the layer's output
    "binary_codes",  # B×B kernel of the output's binary codes (NASWOT)
    "features",      # a row sample of the output features (channels last)
    "fisher",        # per-channel (Σ_spatial a·δ)² summaries of output × output gradient
    "labels",        # the labels of the batch
    "pooled",        # per-example pooled output features (spatial / token mean), (B, C)
    "per_example_fisher",  # mean over examples of ‖per-example ∇(W, b)‖² (empirical Fisher)
    "block_shift",   # 1 − cos(block input, block output) of the enclosing block
})

#: The needs that take the backward pass.
BACKWARD_NEEDS = frozenset({"grad", "grad_halves", "hvp", "fisher", "per_example_fisher"})

#: The needs that read the batch's labels (through the probe loss or directly); the others
#: (weights, activation summaries, the data-free SynFlow pass) work on unlabelled data too.
LABEL_NEEDS = BACKWARD_NEEDS | {"labels"}

MAX_FEATURE_ROWS = 256
HVP_EPSILON = 1e-2


SUM64_CHUNK = 1024


def sum64(x: torch.Tensor) -> float:
    """``Σ x`` with float64 accumulation at about float32 speed: float32 sums of chunks of
    1024 consecutive entries (error ≈ ε₃₂·log₂1024 of each chunk's magnitude), added in
    float64. Converting a whole float32 tensor to float64 first is 10–20× slower on CPU, which
    matters for 10⁷-entry embedding matrices."""
    flat = x.reshape(-1)
    if flat.dtype == torch.float64 or flat.numel() <= SUM64_CHUNK:
        return float(flat.sum(dtype=torch.float64))
    cut = flat.numel() - flat.numel() % SUM64_CHUNK
    chunks = flat[:cut].view(-1, SUM64_CHUNK).sum(dim=1)
    return float(chunks.sum(dtype=torch.float64)) + float(flat[cut:].sum(dtype=torch.float64))


_HALF = (torch.float16, torch.bfloat16)


@dataclass
class LayerContext:
    """Everything the metrics may read about one layer, from one probe.

    Tensors are detached; a metric must not modify them. Optional fields are ``None`` unless a
    requested metric declared that it needs them.
    """

    layer: Layer
    weight: torch.Tensor
    bias: torch.Tensor | None
    grad: torch.Tensor | None = None
    grad_halves: tuple[torch.Tensor, torch.Tensor] | None = None
    hvp: torch.Tensor | None = None
    synflow_grad: torch.Tensor | None = None
    activation_stats: dict[str, float] | None = None
    binary_kernel: torch.Tensor | None = None
    features: torch.Tensor | None = None
    fisher_channels: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    fisher_diagonal: float | None = None
    fisher_diagonal_total: float | None = None
    block_shift: float | None = None
    cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        # metrics run in float32 whatever the model's dtype: half-precision linear algebra
        # (eigh, SVD) is missing on CPU, and float16 sums overflow
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor) and value.dtype in _HALF:
                setattr(self, name, value.float())
            elif isinstance(value, tuple) and any(isinstance(v, torch.Tensor)
                                                  and v.dtype in _HALF for v in value):
                setattr(self, name, tuple(v.float() if isinstance(v, torch.Tensor)
                                          and v.dtype in _HALF else v for v in value))

    def weight_matrix(self) -> torch.Tensor:
        """The weight reshaped to (out, in·k·k) (rows = output neurons)."""
        return self.weight.reshape(self.weight.shape[0], -1)

    def singular_values(self) -> torch.Tensor:
        """Singular values of :meth:`weight_matrix`, descending, by a float64 SVD (memoised).

        Not through a Gram matrix: squaring the matrix squares its condition number, and a
        float32 Gram drowns ``σ_min`` in rounding once κ passes about 10³ (on MiniLM's
        ``encoder.layer.1.attention.self.key`` it gave κ = 6.0e8 for the true 2.9e4); the SVD
        keeps every singular value to about ``1e-16 · σ_max``.
        """
        if "singular_values" not in self.cache:
            self.cache["singular_values"] = torch.linalg.svdvals(self.weight_matrix().double())
        return self.cache["singular_values"]

    def largest_singular_value(self) -> float:
        """``σ_max`` of :meth:`weight_matrix`: the largest eigenvalue of the smaller Gram matrix,
        all in the weight's dtype (the top of the spectrum is well conditioned there, unlike
        the bottom that :meth:`singular_values` needs an SVD for); reuses the full spectrum when
        another metric already computed it."""
        if "singular_values" in self.cache:
            return float(self.cache["singular_values"][0])
        w = self.weight_matrix()
        gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
        return float(torch.linalg.eigvalsh(gram)[-1].clamp(min=0).double().sqrt())

    def reduction(self, name: str) -> float:
        """Memoised :func:`sum64` reductions shared by several metrics: ``weight_norm``,
        ``grad_norm``, ``weight_dot_grad`` (Σ W⊙g) and ``abs_weight_dot_grad`` (Σ |W⊙g|)."""
        if name not in self.cache:
            if name == "weight_norm":
                value = math.sqrt(sum64(self.weight * self.weight))
            elif name == "grad_norm":
                value = math.sqrt(sum64(self.grad * self.grad))
            elif name == "weight_dot_grad":
                value = sum64(self.weight * self.grad)
            elif name == "abs_weight_dot_grad":
                value = sum64((self.weight * self.grad).abs_())
            else:
                raise KeyError(name)
            self.cache[name] = value
        return self.cache[name]


@dataclass
class ProbeResult:
    """The contexts of one probe, in forward order, with the loss and timings."""

    contexts: dict[str, LayerContext]
    loss: float  # NaN for an unlabelled batch (no probe loss)
    seconds: float
    passes: list[str]
    #: Candidate layers left out, with the reason (e.g. the forward pass never calls them as
    #: modules, it reads their weight directly).
    skipped: dict[str, str] = field(default_factory=dict)


def _valid_mask(out: torch.Tensor, batch: Batch) -> torch.Tensor | None:
    """Token mask (B, T) when ``out`` is a (B, T, ...) token tensor of a text batch."""
    if not isinstance(batch, Mapping) or "attention_mask" not in batch or out.ndim < 3:
        return None
    mask = batch["attention_mask"]
    if mask.shape[0] == out.shape[0] and mask.shape[1] == out.shape[1]:
        return mask.to(out.device).bool()
    return None


def _channels_last_rows(out: torch.Tensor, mask: torch.Tensor | None, channel_dim: int
                        ) -> torch.Tensor:
    """Output as (positions, channels), padding positions dropped."""
    if channel_dim == 1 and out.ndim > 2:
        out = out.movedim(1, -1)
    if mask is not None:
        return out[mask]
    return out.reshape(-1, out.shape[-1])


def _channel_dim(module: nn.Module) -> int:
    return 1 if isinstance(module, nn.modules.conv._ConvNd) else -1  # noqa: SLF001


def _activation_stats(values: torch.Tensor, positive: torch.Tensor) -> dict[str, float]:
    """Mean, standard deviation (n − 1) and fraction ``≤ 0`` of ``values``.

    One pass of two float32 sums (Σx, Σx²) combined in float64, which is several times faster
    than ``torch.std_mean``; where the variance is small against the squared mean (|mean| > std),
    so that the two sums would cancel, the two-pass ``torch.std_mean`` is used instead.
    """
    n = values.numel()
    flat = values.reshape(-1)
    mean = float(flat.sum()) / n
    variance = (float(torch.dot(flat, flat)) - n * mean * mean) / (n - 1) if n > 1 else 0.0
    if n > 1 and variance < mean * mean:
        std_t, mean_t = torch.std_mean(flat)
        mean, variance = float(mean_t), float(std_t) ** 2
    return {"mean": mean, "std": math.sqrt(max(variance, 0.0)),
            "sparsity": 1.0 - float(torch.count_nonzero(positive)) / n}


def _binary_code_kernel(positive: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``K = c cᵀ + (1−c)(1−c)ᵀ`` of the binary codes ``c = 1[out > 0]`` (``positive``) per
    example, padding positions counting in neither term. Float32 is exact here (integer counts
    < 2²⁴)."""
    n = positive.shape[0]
    codes = positive.reshape(n, -1).float()
    if mask is None:
        width = codes.shape[1]
        agree = codes @ codes.T
        ones = codes.sum(dim=1)
        # (1−c)(1−c)ᵀ = width − s_i − s_j + c cᵀ
        return (2 * agree + width - ones[:, None] - ones[None, :]).double()
    # with v the valid-position indicator (mask ⊗ 1 over the other dims) and c ≤ v:
    # (v−c)(v−c)ᵀ = v vᵀ − c vᵀ − v cᵀ + c cᵀ, where v vᵀ and c vᵀ reduce to token-level
    # products, so only c cᵀ needs the full width
    per_token = positive[0].numel() // positive.shape[1]  # entries per token position
    m = mask.float()  # (B, T)
    codes = codes * mask.view(mask.shape + (1,) * (positive.ndim - 2)).expand_as(
        positive).reshape(n, -1)
    counts = codes.view(n, mask.shape[1], -1).sum(dim=2)  # (B, T): positives per token
    agree = codes @ codes.T
    cross = counts @ m.T  # c_i · v_j
    return (2 * agree + per_token * (m @ m.T) - cross - cross.T).double()


def _pooled(out: torch.Tensor, mask: torch.Tensor | None, channel_dim: int) -> torch.Tensor:
    """Per-example features: mean over spatial positions or (valid) tokens, (B, C)."""
    out = out.detach()
    if out.ndim == 2:
        return out
    if channel_dim == 1:
        return out.flatten(2).mean(dim=2)
    if mask is not None:
        weights = mask.to(out.dtype).view(mask.shape + (1,) * (out.ndim - 2))
        return (out * weights).sum(dim=1).flatten(1) / weights.sum(dim=1).flatten(1).clamp(min=1)
    return out.flatten(1, -2).mean(dim=1)


def _representation_shift(x: Any, y: Any, batch_size: int) -> float:
    """Mean over examples of 1 − cos between a block's input and output representative
    vectors: the first token for (B, T, H) tensors, the globally pooled features for (B, C, H, W).
    NaN when input and output are not comparable (different shapes, not float tensors)."""
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)) or \
            not x.is_floating_point() or x.shape != y.shape or x.shape[0] != batch_size:
        return float("nan")
    if x.ndim == 3:
        a, b = x[:, 0], y[:, 0]
    elif x.ndim == 4:
        a, b = x.mean(dim=(2, 3)), y.mean(dim=(2, 3))
    elif x.ndim == 2:
        a, b = x, y
    else:
        return float("nan")
    cos = torch.nn.functional.cosine_similarity(a.detach().double(), b.detach().double(), dim=1)
    return float((1 - cos).mean())


class _Recorder:
    """Forward and tensor hooks of one probe; summarises what the metrics need."""

    def __init__(self, layers: Sequence[Layer], modules: dict[str, nn.Module], needs: set[str],
                 batch: Batch, batch_size: int, model: nn.Module) -> None:
        self.model_root = model
        self.layers = layers
        self.modules = modules
        self.needs = needs
        self.batch = batch
        self.batch_size = batch_size
        self.outputs: dict[str, torch.Tensor] = {}
        self.inputs: dict[str, tuple[tuple, dict]] = {}
        self.output_grads: dict[str, torch.Tensor] = {}
        self.activation_stats: dict[str, dict[str, float]] = {}
        self.binary_kernels: dict[str, torch.Tensor] = {}
        self.features: dict[str, torch.Tensor] = {}
        self.fisher: dict[str, torch.Tensor] = {}
        self.pooled: dict[str, torch.Tensor] = {}
        self.block_shifts: dict[str, float] = {}
        self.handles: list[Any] = []
        self.keeps_inputs = bool(needs & {"grad_halves", "per_example_fisher"})
        self.needs_backward = bool(needs & BACKWARD_NEEDS)
        #: layers whose ∇W the probe forms itself from the recorded input and output gradient
        self.direct: set[str] = set()
        self._called: set[str] = set()
        self.called: set[str] = set()  # every candidate whose forward ran
        self.recorded: set[str] = set()  # candidates whose output was summarised
        self._generator = torch.Generator().manual_seed(0)

    def attach(self) -> None:
        for layer in self.layers:
            module = self.modules[layer.name]
            if self.needs_backward:
                self.handles.append(module.register_forward_pre_hook(
                    self._pre_hook(layer.name), with_kwargs=True))
            self.handles.append(module.register_forward_hook(self._forward_hook(layer.name),
                                                             with_kwargs=True))
        if "block_shift" in self.needs:
            for block in dict.fromkeys(layer.block for layer in self.layers):
                module = self.model_root.get_submodule(block)
                self.handles.append(module.register_forward_hook(self._block_hook(block)))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _pre_hook(self, name: str):
        """Decides, per call, who forms the layer's ∇W: the probe itself (first call of a
        Linear/Conv2d whose input carries a gradient: its weight is frozen for this call, so
        autograd only propagates the input gradient, and the probe gets each half-batch's ∇W
        from the recorded input and output gradient at no extra cost), or autograd (every
        other case, e.g. the first layer, whose input needs no gradient)."""
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if len(args) == 1 and not kwargs else None
            direct = (name not in self._called and isinstance(x, torch.Tensor)
                      and x.requires_grad and x.ndim > 0 and x.shape[0] == self.batch_size
                      and _supports_direct_gradient(module))
            self._called.add(name)
            module.weight.requires_grad_(not direct)
            if direct:
                self.direct.add(name)

        return hook

    def _keeps(self, name: str) -> bool:
        return self.keeps_inputs or name in self.direct

    def _forward_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            self.called.add(name)
            if not isinstance(out, torch.Tensor) or name in self.outputs or out.ndim == 0:
                return  # a module called twice keeps the summaries of its first call
            per_example = out.shape[0] == self.batch_size
            tokens = self._token_shape()
            if not per_example and tokens is not None and out.shape[0] == tokens[0] * tokens[1]:
                # tokens flattened to (batch·tokens, ...) (OPT's MLP): summarised per example;
                # no per-example gradient split for them
                self.outputs[name] = out
                self.recorded.add(name)
                self._summarise_forward(name, module, out.detach().reshape(
                    *tokens, *out.shape[1:]))
                return
            if not per_example and out.shape[0] != 1:
                return
            # outputs broadcast over the batch (position embeddings) are summarised as such;
            # they have no per-example gradient, so no half-batch split
            self.outputs[name] = out
            self.recorded.add(name)
            if self._keeps(name) and per_example:
                self.inputs[name] = (args, kwargs)
            summary = out.detach() if per_example else \
                out.detach().expand(self.batch_size, *out.shape[1:])
            self._summarise_forward(name, module, summary)
            if out.requires_grad and (name in self.direct or self.needs & {
                    "fisher", "grad_halves", "per_example_fisher"}):
                self.handles.append(out.register_hook(
                    self._grad_hook(name, module, out, per_example)))

        return hook

    def _token_shape(self) -> tuple[int, int] | None:
        """(batch, tokens) of a text batch, else ``None``."""
        ids = self.batch.get("input_ids") if isinstance(self.batch, Mapping) else None
        return (int(ids.shape[0]), int(ids.shape[1])) if isinstance(ids, torch.Tensor) and \
            ids.ndim == 2 else None

    def _summarise_forward(self, name: str, module: nn.Module, out: torch.Tensor) -> None:
        mask = _valid_mask(out, self.batch)
        positive = out > 0 if self.needs & {"activations", "binary_codes"} else None
        if "activations" in self.needs:
            values = out[mask] if mask is not None else out  # layout does not matter here
            self.activation_stats[name] = _activation_stats(
                values, positive[mask] if mask is not None else positive)
        if "features" in self.needs:
            rows = _channels_last_rows(out, mask, _channel_dim(module))
            if rows.shape[0] > MAX_FEATURE_ROWS:
                pick = torch.randperm(rows.shape[0], generator=self._generator)
                rows = rows[pick[:MAX_FEATURE_ROWS].to(rows.device)]
            self.features[name] = rows.float().detach().cpu()
        if "binary_codes" in self.needs:
            self.binary_kernels[name] = _binary_code_kernel(positive, mask).cpu()
        if "pooled" in self.needs:
            self.pooled[name] = _pooled(out, mask, _channel_dim(module)).float().cpu()

    def _block_hook(self, block: str):
        def hook(_module: nn.Module, args: tuple, out: Any) -> None:
            if block in self.block_shifts:
                return
            x = args[0] if args else None
            y = out[0] if isinstance(out, tuple) else out
            self.block_shifts[block] = _representation_shift(x, y, self.batch_size)

        return hook

    def _grad_hook(self, name: str, module: nn.Module, out: torch.Tensor, per_example: bool):
        def hook(grad: torch.Tensor) -> None:
            if self._keeps(name) and per_example:
                self.output_grads[name] = grad.detach()
            if "fisher" in self.needs:
                act = out.detach()
                channel_dim = _channel_dim(module) % act.ndim
                reduce = [d for d in range(1, act.ndim) if d != channel_dim]
                g_nk = (act * grad).sum(dim=reduce) if reduce else act * grad
                self.fisher[name] = 0.5 * g_nk.double().pow(2).mean(dim=0).cpu()

        return hook


def probe(model: nn.Module, task: Task, batch: Batch, *, layers: Sequence[Layer] | None = None,
          layer_names: Sequence[str] | None = None, needs: Iterable[str] = ("weight", "grad"),
          loss: str = "supcon", device: torch.device | str | None = None,
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
        loss: ``supcon`` (supervised contrastive on the head input, τ = 0.07) or ``ce``.
        device: Where to run (default: where the model is).
        batch_label: How error messages name the batch (e.g. ``"batch 3"``).

    Returns:
        A :class:`ProbeResult`.
    """
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
        raise InvalidInputError(f"--batch-size {batch_size} is too small for the supcon probe "
                                "loss; use --batch-size 2 or more (32 recommended)")
    if layers is None:
        layers = candidate_layers(model, task.head_name)
    layers = select_layers(layers, layer_names)
    if not layers:
        raise InvalidInputError("no candidate layer to probe; check --layers")
    if device is None:
        device = next(model.parameters()).device
    modules = {layer.name: model.get_submodule(layer.name) for layer in layers}
    weights = [modules[layer.name].weight for layer in layers]
    needs_backward = bool(needs & BACKWARD_NEEDS)

    start = time.perf_counter()
    passes: list[str] = []
    recorder = _Recorder(layers, modules, needs, batch, batch_size, model)
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
                    grads, halves = _weight_gradients(loss_value, recorder, layers, modules,
                                                      split="grad_halves" in needs)
                    passes.append("backward")
                recorder.detach()  # the passes below must not re-fire the output hooks
                for w in weights:
                    w.requires_grad_(True)
                if "per_example_fisher" in needs:
                    fisher_diagonal = _per_example_fisher(recorder, modules, batch)
                recorder.output_grads.clear()
                recorder.outputs.clear()
                recorder.inputs.clear()
            recorder.detach()
            del output
            if "hvp" in needs and grads is not None:
                hvps = _finite_difference_hvp(model, task, batch, device, loss, layers, modules,
                                              grads, saved_storages, batch_label)
                _swap_back(saved_storages)
                for w in weights:
                    w.requires_grad_(True)
                passes.append("hvp")
            if "synflow" in needs:
                synflow_grads = _synflow(model, task, batch, device, weights, saved_storages)
                _swap_back(saved_storages)
                passes.append("synflow")
        finally:
            recorder.detach()
            _swap_back(saved_storages)

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


def _swap_back(saved: dict[torch.Tensor, torch.Tensor]) -> None:
    """Puts the original storages back into parameters and buffers."""
    for tensor, original in saved.items():
        tensor.data = original
    saved.clear()


def _weight_gradients(loss: torch.Tensor, recorder: _Recorder, layers: Sequence[Layer],
                      modules: dict[str, nn.Module], split: bool
                      ) -> tuple[list[torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """∇W of every candidate layer from the one backward pass, and with ``split`` the
    contributions of the two halves of the batch.

    ``∇W = Σ_n J_W,nᵀ δ_n`` is a sum over examples. Layers the probe forms itself (see
    ``_Recorder._pre_hook``) get each half's sum straight from the recorded input and output
    gradient δ, and ∇W as their total: the same work autograd would have done, split in two.
    For the other layers autograd returns ∇W; the first half's part is computed directly for
    Linear and Conv2d, by re-running the layer alone on the first half otherwise, and the second
    half's part is the rest.
    """
    autograd_layers = [layer for layer in layers if modules[layer.name].weight.requires_grad]
    direct_outputs = [recorder.outputs[name] for name in recorder.direct
                      if recorder.outputs[name].requires_grad]
    # the direct layers' outputs are asked for only so that the pass reaches them when no
    # weight needs autograd; their tensor hooks record δ either way
    targets = [modules[layer.name].weight for layer in autograd_layers] + \
        ([] if autograd_layers else direct_outputs)
    autograd_grads = dict(zip((layer.name for layer in autograd_layers),
                              torch.autograd.grad(loss, targets, allow_unused=True)
                              if targets else (), strict=False))
    half = recorder.batch_size // 2
    grads: list[torch.Tensor] = []
    halves: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for layer in layers:
        module = modules[layer.name]
        delta = recorder.output_grads.get(layer.name)
        from_autograd = autograd_grads.get(layer.name)
        if layer.name in recorder.direct:
            x = recorder.inputs[layer.name][0][0].detach()
            if delta is None:  # the output does not reach the loss
                parts = (torch.zeros_like(module.weight),) * 2
            elif split:
                parts = (_direct_weight_gradient(module, x[:half], delta[:half]),
                         _direct_weight_gradient(module, x[half:], delta[half:]))
            else:
                parts = (_direct_weight_gradient(module, x, delta),
                         torch.zeros_like(module.weight))
            if from_autograd is not None:  # further calls of a module called more than once
                parts = (parts[0], parts[1] + from_autograd)
            grad = parts[0] + parts[1]
            if split:
                halves[layer.name] = (parts[0], parts[1])
        else:
            grad = from_autograd if from_autograd is not None else torch.zeros_like(module.weight)
            if split and delta is not None:
                first = _first_half_gradient(module, *recorder.inputs[layer.name], delta, half,
                                             recorder.batch_size)
                halves[layer.name] = (first, grad - first)
        grads.append(grad.detach())
    return grads, halves


def _first_half_gradient(module: nn.Module, args: tuple, kwargs: dict, delta: torch.Tensor,
                         half: int, batch_size: int) -> torch.Tensor:
    """∇W of the first ``half`` examples of a layer autograd differentiated."""
    if not kwargs and len(args) == 1 and isinstance(args[0], torch.Tensor) and \
            _supports_direct_gradient(module):
        return _direct_weight_gradient(module, args[0][:half].detach(), delta[:half])
    with torch.enable_grad():  # any other module type: re-run it alone on the first half
        first_args = tuple(_first_rows(a, half, batch_size) for a in args)
        first_kwargs = {k: _first_rows(v, half, batch_size) for k, v in kwargs.items()}
        out = module(*first_args, **first_kwargs)
        return torch.autograd.grad(out, module.weight, grad_outputs=delta[:half])[0].detach()


def _supports_direct_gradient(module: nn.Module) -> bool:
    """Whether :func:`_direct_weight_gradient` handles the module: Linear, and Conv2d with
    numeric padding (timm's dynamic "same" padding ``Conv2dSame`` included)."""
    if type(module) is nn.Linear:
        return True
    return type(module).__name__ in ("Conv2d", "Conv2dSame") and \
        isinstance(module, nn.Conv2d) and not isinstance(module.padding, str)


def _direct_weight_gradient(module: nn.Module, x: torch.Tensor, delta: torch.Tensor
                            ) -> torch.Tensor:
    """``∇W = J_Wᵀ δ`` of the examples in ``x`` from the layer's input and output gradient."""
    if type(module) is nn.Linear:
        return (delta.reshape(-1, delta.shape[-1]).T @ x.reshape(-1, x.shape[-1])).detach()
    padding = module.padding
    if type(module).__name__ == "Conv2dSame":
        from timm.layers import pad_same

        x = pad_same(x, module.weight.shape[-2:], module.stride, module.dilation)
        padding = (0, 0)
    weight = module.weight.detach()
    if module.groups > 1:
        # oneDNN's grouped (depthwise) weight-gradient kernel is several times faster on
        # channels-last tensors, conversion included (98 → 30 ms for efficientnet_lite0's 16
        # depthwise convolutions at batch 32, measured on this project's 2-core machine)
        x, delta, weight = (t.contiguous(memory_format=torch.channels_last)
                            for t in (x, delta, weight))
    # the real weight (not conv2d_weight's expanded placeholder) lets oneDNN pick its layout
    grad = torch.ops.aten.convolution_backward(
        delta, x, weight, None, module.stride, padding, module.dilation, False, (0, 0),
        module.groups, (False, True, False))[1]
    return grad.detach().contiguous()


def _per_example_fisher(recorder: _Recorder, modules: dict[str, nn.Module], batch: Batch
                        ) -> dict[str, float]:
    """``mean_n ‖g_n‖²`` per layer, ``g_n`` the contribution of example n to ∇(W, b) (the
    layer's part of the diagonal empirical Fisher; Lodha et al. 2023)."""
    result = {}
    for name, delta in recorder.output_grads.items():
        args, kwargs = recorder.inputs[name]
        norms = _per_example_squared_norms(modules[name], args, kwargs, delta)
        result[name] = float(norms.mean())
    return result


def _per_example_squared_norms(module: nn.Module, args: tuple, kwargs: dict,
                               delta: torch.Tensor) -> torch.Tensor:
    """‖∂/∂(W, b) of example n's part‖² for every n, from the recorded input and δ: Gram-matrix
    identities for Linear and Embedding, unfolding for Conv2d, a per-example loop otherwise."""
    x = args[0].detach() if args and isinstance(args[0], torch.Tensor) else None
    d = delta.double()
    n = d.shape[0]
    bias = module._parameters.get("bias")  # noqa: SLF001
    if x is not None and not kwargs and type(module) is nn.Linear:
        xs, ds = x.double().reshape(n, -1, x.shape[-1]), d.reshape(n, -1, d.shape[-1])
        norms = ((ds @ ds.transpose(1, 2)) * (xs @ xs.transpose(1, 2))).sum(dim=(1, 2))
        return norms + (ds.sum(dim=1).pow(2).sum(dim=1) if bias is not None else 0)
    if x is not None and not kwargs and isinstance(module, nn.Embedding):
        ids = x.reshape(n, -1)
        ds = d.reshape(n, ids.shape[1], -1)
        same = (ids[:, :, None] == ids[:, None, :]).double()
        if module.padding_idx is not None:
            keep = (ids != module.padding_idx).double()
            same = same * keep[:, :, None] * keep[:, None, :]
        return ((ds @ ds.transpose(1, 2)) * same).sum(dim=(1, 2))
    if x is not None and not kwargs and isinstance(module, nn.Conv2d) and \
            type(module).__name__ in ("Conv2d", "Conv2dSame") and \
            module.groups in (1, module.in_channels) and not isinstance(module.padding, str):
        padding = module.padding
        if type(module).__name__ == "Conv2dSame":
            from timm.layers import pad_same

            x = pad_same(x, module.weight.shape[-2:], module.stride, module.dilation)
            padding = (0, 0)
        cols = torch.nn.functional.unfold(x.double(), module.kernel_size, module.dilation,
                                          padding, module.stride)
        ds = d.flatten(2)  # (B, C_out, L)
        if module.groups == 1:
            grads = ds @ cols.transpose(1, 2)
        else:
            k = module.kernel_size[0] * module.kernel_size[1]
            cols = cols.view(n, module.in_channels, k, -1)
            grads = torch.einsum("bcl,bckl->bck", ds, cols)
        norms = grads.pow(2).flatten(1).sum(dim=1)
        return norms + (ds.sum(dim=2).pow(2).sum(dim=1) if bias is not None else 0)
    norms = []
    params = [p for p in (module.weight, bias) if p is not None]
    with torch.enable_grad():
        for i in range(n):
            item_args = tuple(_rows(a, i, n) for a in args)
            item_kwargs = {k: _rows(v, i, n) for k, v in kwargs.items()}
            out = module(*item_args, **item_kwargs)
            grads = torch.autograd.grad(out, params, grad_outputs=delta[i:i + 1],
                                        allow_unused=True)
            norms.append(sum(float(g.double().pow(2).sum()) for g in grads if g is not None))
    return torch.tensor(norms, dtype=torch.float64)


def _rows(value: Any, i: int, batch_size: int) -> Any:
    if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == batch_size:
        return value[i:i + 1].detach()
    return value


def _first_rows(value: Any, half: int, batch_size: int) -> Any:
    if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == batch_size:
        return value[:half].detach()
    return value


def _finite_difference_hvp(model: nn.Module, task: Task, batch: Batch, device: Any, loss: str,
                           layers: Sequence[Layer], modules: dict[str, nn.Module],
                           grads: list[torch.Tensor], saved: dict[torch.Tensor, torch.Tensor],
                           batch_label: str) -> list[torch.Tensor]:
    """``H g ≈ (∇L(θ + εĝ) − ∇L(θ)) · ‖g‖ / ε`` over the candidate weights (one extra pass,
    whose weight gradients are formed like the main pass's, see :func:`_weight_gradients`).

    The original weight storages are kept in ``saved`` and swapped back by the caller, so the
    model returns bit-for-bit to its state even if this pass raises.
    """
    norm = math.sqrt(sum(sum64(g * g) for g in grads))
    if norm == 0.0:
        return [torch.zeros_like(g) for g in grads]
    step = HVP_EPSILON / norm
    with torch.no_grad():
        for layer, g in zip(layers, grads, strict=True):
            w = modules[layer.name].weight
            saved[w] = w.data
            w.data = w.data + step * g
    recorder = _Recorder(layers, modules, {"grad"}, batch, task.batch_size(batch), model)
    try:
        recorder.attach()
        with torch.enable_grad():
            output = task.forward(model, batch, device)
            value = task.loss(output, loss)
            check_finite(value, f"{batch_label} (Hessian-vector pass)")
            shifted, _ = _weight_gradients(value, recorder, layers, modules, split=False)
    finally:
        recorder.detach()
    return [s.sub_(g).div_(step) for s, g in zip(shifted, grads, strict=True)]


def _synflow(model: nn.Module, task: Task, batch: Batch, device: Any,
             weights: list[nn.Parameter], saved: dict[torch.Tensor, torch.Tensor]
             ) -> list[torch.Tensor]:
    """∂R/∂|θ| for R = 1ᵀ f(1; |θ|) on a single all-ones input (Tanaka et al. 2020).

    Parameters are replaced by their absolute values (original storages go to ``saved`` and are
    swapped back by the caller). The pass runs in the model's dtype and is repeated in float64
    only when that overflows (SynFlow's products over depth can exceed float32's range).
    """
    grads = _synflow_pass(model, task, batch, device, weights, saved, None)
    if all(bool(torch.isfinite(g).all()) for g in grads):
        return grads
    _swap_back(saved)
    return _synflow_pass(model, task, batch, device, weights, saved, torch.float64)


def _synflow_pass(model: nn.Module, task: Task, batch: Batch, device: Any,
                  weights: list[nn.Parameter], saved: dict[torch.Tensor, torch.Tensor],
                  dtype: torch.dtype | None) -> list[torch.Tensor]:
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            if tensor.is_floating_point():
                saved[tensor] = tensor.data
                value = tensor.data.to(dtype) if dtype is not None else tensor.data
                tensor.data = value.abs() if isinstance(tensor, nn.Parameter) else value
    if task.modality == "image":
        x = task.model_inputs(batch, device)
        inputs: Any = torch.ones((1,) + tuple(x.shape[1:]),
                                 dtype=dtype or weights[0].dtype, device=x.device)
    else:
        ids = batch["input_ids"][:1].to(device)
        inputs = {"input_ids": torch.ones_like(ids), "attention_mask": torch.ones_like(ids)}
    with torch.enable_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
        logits = out.logits if hasattr(out, "logits") else out
        grads = torch.autograd.grad(logits.sum(), weights, allow_unused=True)
    return [(g if g is not None else torch.zeros_like(w)).detach()
            for g, w in zip(grads, weights, strict=True)]

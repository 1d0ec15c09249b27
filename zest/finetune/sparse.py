"""Sparse updates of frozen weights that cost memory only for what they train (ARCHITECTURE.md
§3a): GPS's values at fixed indices (gps-paper §3.2) and SPSFT's rows (spsft-paper Eq. 5).

GPS: :func:`attach_sparse_update` gives a Linear (or transformers' ``Conv1D``) or an Embedding a
:class:`SparseUpdate` child (``values`` at ``indices`` of the weight's rows) and a forward that
computes the layer with ``W + scatter(values)`` in row chunks of at most
:data:`CHUNK_ELEMENTS` weight entries. The backward pass computes the gradient of the input and of
the values chunk by chunk, so no dense gradient of the weight, and no dense copy of it, ever
exists: autograd keeps only the layer input (which the values' gradient needs) and the optimizer
sees only the values. An embedding adds ``values[ids]`` scattered into the looked-up rows, plain
autograd ops whose gradient has the values' size.

SPSFT: :func:`add_rows` is ``out.index_add(dim, rows, extra)`` whose backward keeps only the row
indices; ``index_add`` itself would keep ``extra = f(W_f, x)`` (Eq. 5: the fixed scatter ``M``
needs no cache).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from zest.layers import output_dim

#: Largest dense block of a weight (entries) that a sparse layer builds at a time, in the forward
#: pass (the rows of ``W + scatter(values)``) or the backward pass (the rows' gradient, gathered
#: at the indices at once): 4 MiB in float32.
CHUNK_ELEMENTS = 2**20

#: The child-module name under which a layer keeps its :class:`SparseUpdate`.
SPARSE_UPDATE = "sparse_update"


class SparseUpdate(nn.Module):
    """``values[i, k]`` added at column ``indices[i, k]`` of row ``i`` of a frozen weight viewed
    as (output neurons, inputs); ``transposed`` for weights that keep their outputs on dimension 1
    (transformers' ``Conv1D``)."""

    def __init__(self, indices: torch.Tensor, dtype: torch.dtype, transposed: bool = False
                 ) -> None:
        super().__init__()
        self.transposed = transposed
        self.register_buffer("indices", indices)
        self.values = nn.Parameter(torch.zeros(indices.shape, dtype=dtype,
                                               device=indices.device))

    def rows_of(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` viewed as (output neurons, inputs), a view of the same storage."""
        return weight.T if self.transposed else weight.view(weight.shape[0], -1)


def sparse_kind(module: nn.Module) -> str | None:
    """``"linear"`` or ``"embedding"`` when :func:`attach_sparse_update` has a sparse forward for
    the module; ``None`` for others (convolutions, layers with their own forward, embeddings
    with ``max_norm``, frequency-scaled or sparse gradients)."""
    forward = type(module).forward
    if forward is nn.Linear.forward or (type(module).__name__ == "Conv1D"
                                        and output_dim(module) == 1):
        return "linear"
    if forward is nn.Embedding.forward and module.max_norm is None and not (
            module.scale_grad_by_freq or module.sparse):
        return "embedding"
    return None


def attach_sparse_update(module: nn.Module, indices: torch.Tensor) -> SparseUpdate | None:
    """Adds trainable values at ``indices`` (rows: output neurons) to the layer's frozen weight
    through its forward; ``None`` (the module unchanged) when :func:`sparse_kind` has none."""
    kind = sparse_kind(module)
    if kind is None:
        return None
    update = SparseUpdate(indices, module.weight.dtype, transposed=output_dim(module) == 1)
    module.add_module(SPARSE_UPDATE, update)
    forward = _linear_forward if kind == "linear" else _embedding_forward
    module.forward = functools.partial(forward, module, update)
    return update


def sparse_update_of(module: nn.Module) -> SparseUpdate | None:
    """The module's :class:`SparseUpdate`, if it has one."""
    update = module._modules.get(SPARSE_UPDATE)  # noqa: SLF001 - own child only
    return update if isinstance(update, SparseUpdate) else None


def detach_sparse_update(module: nn.Module, fold: bool = True) -> None:
    """Gives the module back its own forward; with ``fold``, the values are first added into
    the weight (else the weight is the frozen base, untouched)."""
    update = sparse_update_of(module)
    if update is None:
        return
    if fold:
        with torch.no_grad():
            update.rows_of(module.weight).scatter_add_(1, update.indices,
                                                       update.values.to(module.weight.dtype))
    del module._modules[SPARSE_UPDATE]  # noqa: SLF001
    del module.forward


def row_chunks(rows: int, width: int) -> list[tuple[int, int]]:
    """``[start, stop)`` row ranges of at most :data:`CHUNK_ELEMENTS` entries (one row at least)."""
    step = max(1, min(rows, CHUNK_ELEMENTS // max(width, 1)))
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


def _updated_rows(weight_rows: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                  start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of ``W + scatter(values)``, a fresh block (the weight is untouched)."""
    block = weight_rows[start:stop].clone(memory_format=torch.contiguous_format)
    return block.scatter_add_(1, indices[start:stop], values[start:stop].to(block.dtype))


class _SparseLinear(torch.autograd.Function):
    """``x (W + scatter(values))ᵀ + bias`` in row chunks; saves only ``x`` (for the values'
    gradient) besides the frozen weight, the indices and the values themselves."""

    @staticmethod
    def forward(ctx, x, values, weight_rows, indices, bias):
        flat = x.reshape(-1, x.shape[-1])
        chunks = row_chunks(*weight_rows.shape)
        if len(chunks) == 1:
            out = flat @ _updated_rows(weight_rows, indices, values, 0, weight_rows.shape[0]).T
        else:
            out = flat.new_empty(flat.shape[0], weight_rows.shape[0])
            for start, stop in chunks:
                out[:, start:stop] = flat @ _updated_rows(weight_rows, indices, values, start,
                                                          stop).T
        if bias is not None:
            out += bias
        ctx.x_shape = x.shape
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, values, weight_rows,
                              indices)
        return out.view(*x.shape[:-1], weight_rows.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x, values, weight_rows, indices = ctx.saved_tensors
        need_x, need_values, _, _, need_bias = ctx.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1])
        flat = x.reshape(-1, x.shape[-1]) if x is not None else None
        grad_x = grad_values = grad_bias = None
        if need_values:
            grad_values = torch.empty_like(values)
        for start, stop in row_chunks(*weight_rows.shape):
            g_rows = g[:, start:stop]
            if need_x:
                rows = _updated_rows(weight_rows, indices, values, start, stop)
                grad_x = g_rows @ rows if grad_x is None else grad_x.addmm_(g_rows, rows)
            if need_values:
                grad_values[start:stop] = (g_rows.T @ flat).gather(1, indices[start:stop])
        if need_bias:
            grad_bias = g.sum(0)
        if grad_x is not None:
            grad_x = grad_x.view(ctx.x_shape)
        return grad_x, grad_values, None, None, grad_bias


def _linear_forward(module: nn.Module, update: SparseUpdate, x: torch.Tensor) -> torch.Tensor:
    return _SparseLinear.apply(x, update.values, update.rows_of(module.weight), update.indices,
                               module.bias)


def _embedding_forward(module: nn.Embedding, update: SparseUpdate, ids: torch.Tensor
                       ) -> torch.Tensor:
    out = F.embedding(ids, module.weight, module.padding_idx, None, module.norm_type)
    values = update.values[ids]
    if module.padding_idx is not None:  # like F.embedding: no gradient for the padding row
        values = torch.where((ids == module.padding_idx).unsqueeze(-1), values.detach(), values)
    return out + torch.zeros_like(out).scatter_add(-1, update.indices[ids], values)


class _AddRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, dim, rows, extra):
        ctx.dim = dim
        ctx.save_for_backward(rows)
        return out.index_add(dim, rows, extra)

    @staticmethod
    def backward(ctx, grad):
        (rows,) = ctx.saved_tensors
        grad_extra = grad.index_select(ctx.dim, rows) if ctx.needs_input_grad[3] else None
        return (grad if ctx.needs_input_grad[0] else None), None, None, grad_extra


def add_rows(out: torch.Tensor, dim: int, rows: torch.Tensor, extra: torch.Tensor
             ) -> torch.Tensor:
    """``out.index_add(dim, rows, extra)`` whose backward keeps only ``rows`` (``extra``'s
    gradient is ``out``'s gradient at those rows), so ``extra`` is not cached."""
    return _AddRows.apply(out, dim, rows, extra)

"""A fingerprint of a model's weights: a short hash that changes whenever any weight does.

Deltas record the fingerprint of the base they were trained on (``apply_delta`` refuses another
base), and the metrics of the weights alone are cached under it (``zest.metrics.weight_memos``).
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def model_fingerprint(model: nn.Module, head_name: str | None = None) -> str:
    """A short hash of every parameter and floating buffer of ``model`` outside its head (names,
    dtypes, shapes and bytes). The head is left out because deltas replace it whole and no
    metric is computed for it.

    One blake2b pass over the bytes, read in place (about 1 s per 500 MB of weights on one
    core); the digest is part of saved deltas, so the hashed bytes and their order never
    change.
    """
    digest = hashlib.blake2b(digest_size=12)
    tensors = {**dict(model.named_buffers()), **dict(model.named_parameters())}
    for name in sorted(tensors):
        if head_name and (name == head_name or name.startswith(head_name + ".")):
            continue
        tensor = tensors[name]
        if not tensor.is_floating_point():
            continue
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().data)
    return digest.hexdigest()

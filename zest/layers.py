"""Candidate-layer discovery and block grouping (ARCHITECTURE.md §2, "Layer").

A candidate layer is a module, named by its ``named_modules()`` name, that directly owns a weight
of ndim ≥ 2 (Conv, Linear, Embedding, ...). The classification head and everything inside it is
never a candidate, nor is a module whose weight another candidate holds too (tied weights).
Layers are identified by name only; ``depth`` (0..1) is the position in module
order, which is the forward order for the supported architectures.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from zest.architectures import module_type
from zest.errors import InvalidInputError, UnknownNameError, closest_names

_INDEX = re.compile(r"^\d+$")


@dataclass(frozen=True)
class Layer:
    """A candidate layer.

    Attributes:
        name: ``named_modules()`` name.
        type: Class name of the module (``Conv2d``, ``Linear``, ``Embedding``, ...).
        depth: Position among the candidates in forward order, scaled to [0, 1].
        n_params: Parameters the module owns directly (weight and bias).
        block: Name of the enclosing block (see :func:`block_of`).
    """

    name: str
    type: str
    depth: float
    n_params: int
    block: str

    def to_dict(self) -> dict:
        """The layer as a plain dict."""
        return asdict(self)


def block_of(name: str) -> str:
    """The enclosing block of a layer: the prefix up to the last integer path component
    (``encoder.layer.3.attention.self.query`` → ``encoder.layer.3``, ``blocks.2.1.conv_pw`` →
    ``blocks.2.1``); for layers outside an indexed container, their parent module
    (``bert.embeddings.word_embeddings`` → ``bert.embeddings``) or, at top level, themselves."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if _INDEX.match(parts[i]):
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) if len(parts) > 1 else name


def output_dim(module: nn.Module) -> int:
    """The weight dimension that indexes the module's output neurons: 0 for Linear, Conv and
    Embedding, 1 for GPT-2's ``Conv1D`` (a Linear with a transposed ``(in, out)`` weight); the
    module-type table of :mod:`zest.architectures` declares it (``ModuleType.output_dim``)."""
    facts = module_type(module)
    return facts.output_dim if facts is not None else 0


def transforms_weight(module: nn.Module) -> bool:
    """Whether the module's forward transforms its weight before using it (weight
    standardisation in NFNets and BiT ResNets; ``ModuleType.transforms_weight``): an update
    added to the layer's output (SPSFT's rows, LoRA's BA) is not an update of the stored weight
    there, so those methods leave it alone."""
    facts = module_type(module)
    return facts is not None and facts.transforms_weight


def neuron_rows(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """The weight as (output neurons, everything else): rows are output neurons."""
    return weight.movedim(dim, 0).reshape(weight.shape[dim], -1)


def repeated_blocks(layers: Sequence[Layer]) -> list[str]:
    """The blocks that are items of an indexed container (``model.layers.3``, ``blocks.2.1``;
    not ``bert.embeddings``), in forward order: the units that activation checkpointing
    recomputes (``Tuner(gradient_checkpointing=True)``)."""
    blocks = dict.fromkeys(layer.block for layer in layers)
    return [block for block in blocks if _INDEX.match(block.rsplit(".", 1)[-1])]


def owns_matrix_weight(module: nn.Module) -> bool:
    """True when the module directly owns a parameter ``weight`` with ndim ≥ 2."""
    weight = module._parameters.get("weight")  # noqa: SLF001 - direct ownership only
    return isinstance(weight, nn.Parameter) and weight.ndim >= 2


def candidate_layers(model: nn.Module, head_name: str) -> list[Layer]:
    """Every candidate layer of ``model`` in forward order, the head excluded.

    A weight that several of these modules hold (tied weights: T5's token embedding is its
    ``shared``, encoder ``embed_tokens`` and decoder ``embed_tokens``) is no one module's, so
    none of its holders is a candidate: a method that tunes a module changes that module's
    forward (GPS's sparse values, SPSFT's rows, a LoRA wrapper) and so one use of the weight,
    while its delta merges into the weight that every holder reads. A weight tied to the head
    alone (a causal LM's input embedding and LM head) stays a candidate.
    """
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not name or name == head_name or name.startswith(head_name + "."):
            continue
        if owns_matrix_weight(module):
            found.append((name, module))
    holders = Counter(id(module._parameters["weight"]) for _, module in found)  # noqa: SLF001
    found = [(name, module) for name, module in found
             if holders[id(module._parameters["weight"])] == 1]  # noqa: SLF001
    n = len(found)
    layers = []
    for i, (name, module) in enumerate(found):
        n_params = sum(p.numel() for p in module._parameters.values() if p is not None)  # noqa: SLF001
        layers.append(Layer(name=name, type=type(module).__name__,
                            depth=i / (n - 1) if n > 1 else 0.0, n_params=int(n_params),
                            block=block_of(name)))
    return layers


def select_layers(layers: Sequence[Layer], names: Sequence[str] | None) -> list[Layer]:
    """Restricts ``layers`` to ``names`` (in model order); an unknown name raises with the
    closest candidate names suggested."""
    if not names:
        return list(layers)
    by_name = {layer.name: layer for layer in layers}
    blocks = {layer.block for layer in layers}
    wanted: set[str] = set()
    for name in names:
        if name in by_name:
            wanted.add(name)
        elif name in blocks:
            wanted.update(layer.name for layer in layers if layer.block == name)
        else:
            close = closest_names(name, list(by_name) + sorted(blocks))
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else \
                "; run `zest rank` or list candidates with zest.candidate_layers(model, task)"
            raise UnknownNameError(f"no candidate layer named {name!r}{hint}")
    return [layer for layer in layers if layer.name in wanted]


def layer_leaf_name(layer: Layer) -> str:
    """The layer's name as every block spells it: its last part without indices
    (``model.layers.3.mlp.down_proj`` → ``down_proj``, ``blocks.2.1.conv_pw`` → ``conv_pw``);
    the strata of :func:`stratified_layers`. (The predictor's role of a layer, named alike
    across families, is :func:`zest.predictor_features.block_role`.)"""
    parts = [p for p in layer.name.split(".") if not _INDEX.match(p)]
    return parts[-1] if parts else layer.type


def stratified_layers(layers: Sequence[Layer], n: int) -> list[Layer]:
    """A sample of ``n`` layers spread over leaf names (:func:`layer_leaf_name`, the "roles"
    here) and depth, for ground truth on models with hundreds of candidates: every role gets a
    share proportional to its size (at least one when ``n`` covers every role),
    and within a role the layers are evenly spaced in forward order. Deterministic; returned in
    model order."""
    if n < 1:
        raise InvalidInputError(f"layer_sample must be ≥ 1, got {n}", parameter="layer_sample")
    if n >= len(layers):
        return list(layers)
    roles: dict[str, list[Layer]] = {}
    for layer in layers:
        roles.setdefault(layer_leaf_name(layer), []).append(layer)
    exact = {role: n * len(members) / len(layers) for role, members in roles.items()}
    floor = 1 if n >= len(roles) else 0  # every role, when the sample has room for them all
    quota = {role: max(floor, int(share)) for role, share in exact.items()}
    by_remainder = sorted(roles, key=lambda r: (quota[r] - exact[r], r))
    for role in by_remainder:  # largest remainders first, until the sample has n layers
        if sum(quota.values()) >= n:
            break
        if quota[role] < len(roles[role]):
            quota[role] += 1
    chosen: set[str] = set()
    for offset, (role, members) in enumerate(roles.items()):
        k = min(quota[role], len(members))
        if k == 0:
            continue
        step = len(members) / k
        shift = step * ((offset + 0.5) / len(roles))  # stagger roles so depths differ
        chosen.update(members[min(len(members) - 1, int(step * i + shift))].name
                      for i in range(k))
    return [layer for layer in layers if layer.name in chosen]


def group_by_block(layers: Sequence[Layer]) -> dict[str, list[Layer]]:
    """Layers grouped by enclosing block, blocks in forward order."""
    groups: dict[str, list[Layer]] = {}
    for layer in layers:
        groups.setdefault(layer.block, []).append(layer)
    return groups


def check_granularity(granularity: str) -> str:
    """Validates ``--granularity``."""
    if granularity not in ("module", "block"):
        raise InvalidInputError(f"unknown granularity {granularity!r}; use 'module' or 'block'")
    return granularity

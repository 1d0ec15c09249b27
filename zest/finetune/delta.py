"""Deltas: only the trained entries of a fine-tuned model, as safetensors + a JSON sidecar.

Entry kinds (each targets one parameter of the base model by name):

- ``replace``: a dense tensor that replaces the parameter (heads, biases, dense layers);
- ``sparse_add``: GPS entries, ``values[i, k]`` added at column ``indices[i, k]`` of row ``i`` of
  the weight viewed as (out, in·k·k);
- ``rows_add``: SPSFT, ``rows`` added to the weight rows ``indices`` (viewed as (out, -1));
- ``lora``: LoRA factors, ``ΔW = scaling · B A`` (reshaped to the weight; transposed for
  embeddings).

Applying a delta validates every entry against the model first and changes nothing when one
does not fit.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zest.errors import InvalidInputError, RecordError

FORMAT_VERSION = 1
KINDS = ("replace", "sparse_add", "rows_add", "lora")


@dataclass
class DeltaEntry:
    """The trained values of one parameter."""

    name: str
    kind: str
    tensors: dict[str, torch.Tensor]
    shape: list[int]
    extra: dict[str, Any] = field(default_factory=dict)

    def numel(self) -> int:
        """Stored values (indices excluded)."""
        return sum(t.numel() for k, t in self.tensors.items() if k != "indices")

    def weight_delta(self, target: torch.Tensor) -> torch.Tensor | None:
        """The value to add to ``target`` (``None`` for ``replace``)."""
        if self.kind == "replace":
            return None
        if self.kind == "sparse_add":
            flat = torch.zeros(target.shape[0], target[0].numel(), dtype=target.dtype)
            flat.scatter_add_(1, self.tensors["indices"].long(),
                              self.tensors["values"].to(target.dtype))
            return flat.view(target.shape)
        if self.kind == "rows_add":
            flat = torch.zeros(target.shape[0], target[0].numel() if target.ndim > 1 else 1,
                               dtype=target.dtype)
            rows = self.tensors["rows"].to(target.dtype).reshape(len(self.tensors["indices"]),
                                                                 -1)
            flat[self.tensors["indices"].long()] = rows
            return flat.view(target.shape)
        if self.kind == "lora":
            a = self.tensors["A"].to(target.dtype)
            b = self.tensors["B"].to(target.dtype)
            scaling = float(self.extra.get("scaling", 1.0))
            if self.extra.get("embedding"):
                return (b @ a).T.reshape(target.shape) * scaling
            return (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)).reshape(
                target.shape) * scaling
        raise RecordError(f"unknown delta entry kind {self.kind!r}")


@dataclass
class Delta:
    """A set of :class:`DeltaEntry` plus metadata (model spec, method, layers, num_classes)."""

    entries: list[DeltaEntry]
    meta: dict[str, Any]

    def numel(self) -> int:
        """Number of stored trained values."""
        return sum(entry.numel() for entry in self.entries)

    def save(self, path: str | os.PathLike) -> Path:
        """Writes ``<path>`` (safetensors) and ``<path stem>.json`` (sidecar)."""
        from safetensors.torch import save_file

        from zest import __version__

        path = Path(path)
        if path.suffix != ".safetensors":
            raise InvalidInputError(f"delta path {str(path)!r} must end in .safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors, entries = {}, []
        for i, entry in enumerate(self.entries):
            keys = {}
            for key, tensor in entry.tensors.items():
                stored = f"{i}.{key}"
                tensors[stored] = tensor.detach().cpu().contiguous()
                keys[key] = stored
            entries.append({"name": entry.name, "kind": entry.kind, "shape": entry.shape,
                            "tensors": keys, "extra": entry.extra})
        save_file(tensors, str(path))
        sidecar = {"format": "zest-delta", "format_version": FORMAT_VERSION,
                   "zest_version": __version__, **self.meta, "entries": entries,
                   "stored_values": self.numel()}
        sidecar_path(path).write_text(json.dumps(sidecar, indent=1))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Delta:
        """Reads a delta written by :meth:`save`."""
        from safetensors.torch import load_file

        path = Path(path)
        side = sidecar_path(path)
        if not path.is_file() or not side.is_file():
            raise InvalidInputError(f"delta {str(path)!r} needs both the .safetensors file and "
                                    f"its sidecar {side.name}; one of them is missing")
        try:
            spec = json.loads(side.read_text())
            tensors = load_file(str(path))
        except (json.JSONDecodeError, OSError, RuntimeError, ValueError) as exc:
            raise RecordError(f"delta {str(path)!r} is corrupt ({type(exc).__name__}); "
                              "export it again") from None
        if spec.get("format") != "zest-delta" or spec.get("format_version") != FORMAT_VERSION:
            raise RecordError(f"{side.name} is not a zest delta of format version "
                              f"{FORMAT_VERSION}; export it again with this zest")
        entries = []
        try:
            for item in spec["entries"]:
                entries.append(DeltaEntry(name=item["name"], kind=item["kind"],
                                          shape=list(item["shape"]),
                                          tensors={k: tensors[v] for k, v in
                                                   item["tensors"].items()},
                                          extra=item.get("extra", {})))
        except KeyError as exc:
            raise RecordError(f"delta {str(path)!r} is corrupt: missing {exc}") from None
        meta = {k: v for k, v in spec.items() if k not in ("entries", "format",
                                                           "format_version")}
        return cls(entries=entries, meta=meta)


def sidecar_path(path: str | os.PathLike) -> Path:
    """``run/delta.safetensors`` → ``run/delta.json``."""
    return Path(path).with_suffix(".json")


def apply_delta(model: nn.Module, delta: Delta | str | os.PathLike, *,
                model_spec: str | None = None) -> nn.Module:
    """Merges a delta into ``model`` in place (and returns it).

    Every entry is checked first (parameter exists, shape matches, indices in range, model spec
    matches when given); on any mismatch an error names it and the model is left untouched.
    """
    if not isinstance(delta, Delta):
        delta = Delta.load(delta)
    expected = delta.meta.get("model")
    if model_spec is not None and expected is not None and model_spec != expected:
        raise InvalidInputError(f"this delta was trained on model {expected!r}, not "
                                f"{model_spec!r}; apply it to a fresh {expected!r}")
    params = {**dict(model.named_buffers()), **dict(model.named_parameters())}
    planned: list[tuple[torch.Tensor, DeltaEntry]] = []
    for entry in delta.entries:
        if entry.kind not in KINDS:
            raise RecordError(f"delta entry {entry.name!r} has unknown kind {entry.kind!r}")
        target = params.get(entry.name)
        if target is None:
            raise InvalidInputError(f"delta entry {entry.name!r} has no parameter of that name in "
                                    f"this model; was it trained on {expected!r} with "
                                    f"{delta.meta.get('num_classes')} classes?")
        if list(target.shape) != list(entry.shape):
            raise InvalidInputError(f"delta entry {entry.name!r} has shape {entry.shape} but the "
                                    f"model's parameter is {list(target.shape)}; load the model "
                                    f"with num_classes={delta.meta.get('num_classes')}")
        _check_entry(entry, target)
        planned.append((target, entry))
    with torch.no_grad():
        for target, entry in planned:
            if entry.kind == "replace":
                target.copy_(entry.tensors["value"].to(target.dtype))
            else:
                target.add_(entry.weight_delta(target.detach().cpu()).to(target.device))
    return model


def _check_entry(entry: DeltaEntry, target: torch.Tensor) -> None:
    rows = target.shape[0]
    width = target[0].numel() if target.ndim > 1 else 1
    if entry.kind == "replace" and list(entry.tensors["value"].shape) != list(target.shape):
        raise InvalidInputError(f"delta entry {entry.name!r}: stored value has shape "
                                f"{list(entry.tensors['value'].shape)}, expected "
                                f"{list(target.shape)}")
    if entry.kind == "sparse_add":
        indices = entry.tensors["indices"]
        if indices.shape[0] != rows or int(indices.max()) >= width or int(indices.min()) < 0:
            raise InvalidInputError(f"delta entry {entry.name!r}: sparse indices do not fit a "
                                    f"weight of {rows} rows × {width} columns")
    if entry.kind == "rows_add":
        indices = entry.tensors["indices"]
        if int(indices.max()) >= rows or entry.tensors["rows"][0].numel() != width:
            raise InvalidInputError(f"delta entry {entry.name!r}: row update does not fit a "
                                    f"weight of {rows} rows × {width} columns")

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
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zest._version import __version__
from zest.errors import InvalidInputError, RecordError, ZestError
from zest.fingerprint import model_fingerprint

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
        """The value to add to ``target`` (``None`` for ``replace``). Entries marked
        ``transposed`` index the weight's output neurons on dimension 1 (GPT-2's ``Conv1D``)."""
        if self.kind == "replace":
            return None
        if self.extra.get("transposed") and target.ndim == 2:
            plain = DeltaEntry(self.name, self.kind, self.tensors, self.shape[::-1],
                               {k: v for k, v in self.extra.items() if k != "transposed"})
            return plain.weight_delta(target.T.contiguous()).T
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
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type
            raise RecordError(f"delta {str(path)!r} is corrupt ({type(exc).__name__}); "
                              "export it again") from None
        if not isinstance(spec, dict):
            raise RecordError(f"{side.name} is not a zest delta sidecar; export it again")
        if spec.get("format") != "zest-delta" or spec.get("format_version") != FORMAT_VERSION:
            raise RecordError(f"{side.name} is not a zest delta of format version "
                              f"{FORMAT_VERSION}; export it again with this zest")
        entries = []
        items = spec.get("entries")
        if not isinstance(items, list):
            raise RecordError(f"{side.name} lists no entries; export the delta again")
        for item in items:
            stored = item.get("tensors") if isinstance(item, dict) else None
            if not isinstance(stored, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) and v in tensors
                    for k, v in stored.items()):
                raise RecordError(f"delta {str(path)!r} is corrupt: an entry's tensors are "
                                  f"missing from the .safetensors file or malformed "
                                  f"({str(stored)[:60]}); export it again")
            shape = item.get("shape")
            entries.append(DeltaEntry(name=item.get("name"), kind=item.get("kind"),
                                      shape=list(shape) if isinstance(shape, list) else shape,
                                      tensors={k: tensors[v] for k, v in stored.items()},
                                      extra=item.get("extra", {})))
        meta = {k: v for k, v in spec.items() if k not in ("entries", "format",
                                                           "format_version")}
        delta = cls(entries=entries, meta=meta)
        delta.check(f"delta {str(path)!r}")
        return delta

    def check(self, source: str = "the delta") -> None:
        """Raises :class:`RecordError` for a sidecar field of the wrong type: the metadata
        (``model``, ``head``, ``base_fingerprint``, ``task_kind`` strings, ``num_classes`` and
        ``seed`` integers, ``layers`` names; each may be absent) and every entry's name, kind,
        shape and ``extra`` settings (LoRA ``scaling`` a finite number, ``transposed`` and
        ``embedding`` flags)."""
        meta_types = {"model": str, "head": str, "base_fingerprint": str, "task_kind": str,
                      "method": str, "num_classes": int, "seed": int}
        for key, kind in meta_types.items():
            value = self.meta.get(key)
            if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
                raise RecordError(f"{source} is corrupt: {key} is {value!r}, not "
                                  f"{'an integer' if kind is int else 'a string'}; export it "
                                  "again")
        if self.meta.get("num_classes") is not None and self.meta["num_classes"] < 1:
            raise RecordError(f"{source} is corrupt: num_classes is {self.meta['num_classes']}; "
                              "export it again")
        layers = self.meta.get("layers")
        if layers is not None and not (isinstance(layers, list)
                                       and all(isinstance(n, str) for n in layers)):
            raise RecordError(f"{source} is corrupt: layers is not a list of names; export it "
                              "again")
        for entry in self.entries:
            if not isinstance(entry.name, str) or not entry.name:
                raise RecordError(f"{source} is corrupt: an entry has the name {entry.name!r}; "
                                  "export it again")
            where = f"{source} is corrupt: entry {entry.name!r}"
            if entry.kind not in KINDS:
                raise RecordError(f"{where} has unknown kind {entry.kind!r}; export it again")
            if not isinstance(entry.shape, list) or not all(
                    isinstance(n, int) and not isinstance(n, bool) and n >= 0
                    for n in entry.shape):
                raise RecordError(f"{where} has the shape {entry.shape!r}; export it again")
            if not isinstance(entry.extra, dict) or not isinstance(entry.tensors, dict) or \
                    not all(isinstance(t, torch.Tensor) for t in entry.tensors.values()):
                raise RecordError(f"{where} has malformed tensors or settings; export it again")
            scaling = entry.extra.get("scaling", 1.0)
            if not isinstance(scaling, numbers.Real) or isinstance(scaling, bool) or \
                    not math.isfinite(scaling):
                raise RecordError(f"{where} has the LoRA scaling {scaling!r}, not a finite "
                                  "number; export it again")
            for flag in ("transposed", "embedding"):
                if not isinstance(entry.extra.get(flag, False), bool):
                    raise RecordError(f"{where} has {flag}={entry.extra[flag]!r}, not true or "
                                      "false; export it again")


def sidecar_path(path: str | os.PathLike) -> Path:
    """``run/delta.safetensors`` → ``run/delta.json``."""
    return Path(path).with_suffix(".json")


def apply_delta(model: nn.Module, delta: Delta | str | os.PathLike, *,
                model_spec: str | None = None, check_base: bool = True) -> nn.Module:
    """Merges a delta into ``model`` in place (and returns it), all or nothing.

    The whole delta is validated first: the base model (spec, and the fingerprint of its
    weights), every entry's parameter name, shape, kind, tensor shapes, index types, ranges,
    duplicates and counts, and finite values; every new parameter value is then computed, and
    only when all of that succeeded is any parameter changed. On any mismatch a one-line
    :class:`~zest.errors.ZestError` names it and the model is left untouched; no other
    exception leaves this function (issue 30).

    Args:
        model: A freshly loaded base model with a head of the delta's ``num_classes``.
        delta: A :class:`Delta` or the path of its ``.safetensors`` file.
        model_spec: The spec ``model`` was loaded from, checked against the delta's.
        check_base: Refuse a base whose weights differ from the one the delta was trained on,
            and a delta that does not record its base (no ``base_fingerprint`` or ``model``).
            ``False`` applies it to whatever base it fits (``zest apply-delta
            --no-check-base``): only for a base you know is the right one.
    """
    try:
        return _apply_delta(model, delta, model_spec=model_spec, check_base=check_base)
    except ZestError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError, KeyError, AttributeError,
            OverflowError) as exc:  # a fault the checks did not foresee is still one line
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise RecordError(f"the delta cannot be applied ({type(exc).__name__}: {first}); "
                          "export it again") from None


def _apply_delta(model: nn.Module, delta: Delta | str | os.PathLike, *,
                 model_spec: str | None, check_base: bool) -> nn.Module:
    if not isinstance(delta, Delta):
        delta = Delta.load(delta)
    delta.check()
    expected = delta.meta.get("model")
    fingerprint = delta.meta.get("base_fingerprint")
    if check_base and not (expected and fingerprint):
        missing = "base_fingerprint" if not fingerprint else "model"
        raise InvalidInputError(f"this delta does not record its base ({missing} is missing "
                                "from its sidecar), so it cannot be checked against this "
                                "model; export it again with this zest, or pass "
                                "check_base=False for a base you know is the one it was "
                                "trained on", parameter="check_base")
    if model_spec is not None and expected is not None and model_spec != expected:
        raise InvalidInputError(f"this delta was trained on model {expected!r}, not "
                                f"{model_spec!r}; apply it to a fresh {expected!r}")
    params = {**dict(model.named_buffers()), **dict(model.named_parameters())}
    planned: list[tuple[torch.Tensor, DeltaEntry]] = []
    seen: set[str] = set()
    for entry in delta.entries:
        if entry.name in seen:
            raise RecordError(f"delta entry {entry.name!r} appears twice; export the delta "
                              "again")
        seen.add(entry.name)
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
    if check_base:
        head = delta.meta.get("head")
        found = model_fingerprint(model, head)
        if found != fingerprint:
            seed = delta.meta.get("seed")
            raise InvalidInputError(
                f"this delta was trained on another base (weights fingerprint {fingerprint}, "
                f"this model's is {found}); load the base it was trained on ({expected!r}"
                f"{f', seed={seed}' if seed is not None else ''}, the same checkpoint)",
                parameter=("seed", "checkpoint"))
    updates: list[tuple[torch.Tensor, torch.Tensor]] = []
    for target, entry in planned:
        base = target.detach().cpu()
        if entry.kind == "replace":
            new = entry.tensors["value"].to(base.dtype)
        else:
            new = base + entry.weight_delta(base)
        if target.is_floating_point() and not bool(torch.isfinite(new).all()):
            raise InvalidInputError(f"delta entry {entry.name!r} would make the parameter "
                                    "non-finite; export the delta again")
        updates.append((target, new))
    with torch.no_grad():
        for target, new in updates:
            target.copy_(new.to(target.device))
    return model


def _check_index_range(name: str, what: str, indices: torch.Tensor, limit: int, unit: str
                       ) -> None:
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= limit):
        raise InvalidInputError(f"delta entry {name}: {what} {int(indices.min())}.."
                                f"{int(indices.max())} are outside the weight's {limit} {unit}")


#: The tensors each entry kind must have.
_ENTRY_TENSORS = {"replace": ("value",), "sparse_add": ("indices", "values"),
                  "rows_add": ("indices", "rows"), "lora": ("A", "B")}
#: The fewest dimensions of the tensor each entry kind changes (rows of a weight matrix; a
#: 1-D normalisation weight for SPSFT's per-row variant).
_SMALLEST_NDIM = {"replace": 0, "sparse_add": 2, "rows_add": 1, "lora": 2}


def _check_entry(entry: DeltaEntry, target: torch.Tensor) -> None:
    """Raises :class:`InvalidInputError` naming what does not fit, before anything changes."""
    name = repr(entry.name)
    missing = [k for k in _ENTRY_TENSORS[entry.kind] if k not in entry.tensors]
    if missing:
        raise InvalidInputError(f"delta entry {name} ({entry.kind}) lacks its {missing[0]!r} "
                                "tensor; export the delta again")
    if not target.is_floating_point():
        raise InvalidInputError(f"delta entry {name} names a {target.dtype} tensor of the "
                                "model (a counter, not a weight); export the delta again")
    if target.ndim < _SMALLEST_NDIM[entry.kind]:
        raise InvalidInputError(f"delta entry {name} ({entry.kind}) names a tensor of shape "
                                f"{list(target.shape)}, which that kind cannot change; export "
                                "the delta again")
    for key in _ENTRY_TENSORS[entry.kind]:
        tensor = entry.tensors[key]
        if key == "indices":
            if tensor.dtype.is_floating_point or tensor.dtype.is_complex or \
                    tensor.dtype == torch.bool:
                raise InvalidInputError(f"delta entry {name}: indices must be integers, got "
                                        f"{tensor.dtype}")
        elif not tensor.is_floating_point():
            raise InvalidInputError(f"delta entry {name}: {key!r} holds {tensor.dtype} values, "
                                    "not floating-point ones; export the delta again")
        elif not bool(torch.isfinite(tensor).all()):
            raise InvalidInputError(f"delta entry {name} has non-finite values in {key!r} "
                                    "(NaN or inf); export the delta again")
    if entry.extra.get("transposed") and target.ndim == 2 and entry.kind != "replace":
        target = target.T
    rows = target.shape[0]
    width = target[0].numel() if target.ndim > 1 else 1
    if entry.kind == "replace" and list(entry.tensors["value"].shape) != list(target.shape):
        raise InvalidInputError(f"delta entry {name}: stored value has shape "
                                f"{list(entry.tensors['value'].shape)}, expected "
                                f"{list(target.shape)}")
    if entry.kind == "sparse_add":
        indices, values = entry.tensors["indices"], entry.tensors["values"]
        if indices.ndim != 2 or indices.shape[0] != rows or tuple(values.shape) != tuple(
                indices.shape):
            raise InvalidInputError(f"delta entry {name}: {tuple(values.shape)} values at "
                                    f"{tuple(indices.shape)} indices do not fit a weight of "
                                    f"{rows} rows (one row of indices and values per row)")
        _check_index_range(name, "sparse indices", indices, width, "columns")
        ordered = indices.sort(dim=1).values
        if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
            raise InvalidInputError(f"delta entry {name}: a column index appears twice in one "
                                    "row; export the delta again")
    if entry.kind == "rows_add":
        indices, values = entry.tensors["indices"], entry.tensors["rows"]
        per_row = values[0].numel() if len(values) else 0
        if indices.ndim != 1 or values.shape[0] != indices.shape[0] or (
                len(values) and per_row != width):
            raise InvalidInputError(f"delta entry {name}: {values.shape[0]} rows of "
                                    f"{per_row} values for "
                                    f"{indices.numel()} row indices do not fit a weight of "
                                    f"{rows} rows × {width} columns")
        _check_index_range(name, "row indices", indices, rows, "rows")
        if len(set(indices.tolist())) != indices.numel():
            raise InvalidInputError(f"delta entry {name}: a row index appears twice")
    if entry.kind == "lora":
        a, b = entry.tensors["A"], entry.tensors["B"]
        try:
            entry.weight_delta(target.detach().cpu())
        except RuntimeError:
            raise InvalidInputError(f"delta entry {name}: LoRA factors {tuple(b.shape)} × "
                                    f"{tuple(a.shape)} do not fit a weight of shape "
                                    f"{list(target.shape)}") from None

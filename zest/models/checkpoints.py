"""Loading weights files into a built model: a user's checkpoint (``--checkpoint``, checked
against the architecture) and a packaged model's weights mapped tensor by tensor."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from zest.errors import DataError, InvalidInputError


def load_state_dict_file(model: nn.Module, path: Path, head: str | None = None) -> None:
    """Loads a user's checkpoint (``.safetensors``, or a state dict loaded with
    ``weights_only=True``) into ``model``, leaving out the head (``classifier``, ``head``, ``fc``
    or ``head``'s module): any other tensor missing, unexpected or of another shape is refused
    in one line."""
    if not path.is_file():
        raise InvalidInputError(f"checkpoint {str(path)!r} does not exist; pass a .safetensors or "
                                ".pt/.pth state-dict file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type
            raise InvalidInputError(f"checkpoint {str(path)!r} is not a readable .safetensors "
                                    f"file ({type(exc).__name__}); it may be truncated: save it "
                                    "again") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - re-raised as a user error
            raise InvalidInputError(f"cannot load checkpoint {str(path)!r} with weights_only=True "
                                    f"({type(exc).__name__}); save a plain state dict or use "
                                    ".safetensors") from None
        if isinstance(state, Mapping) and "state_dict" in state:
            state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise InvalidInputError(f"checkpoint {str(path)!r} is not a state dict (a mapping of "
                                f"parameter names to tensors; it holds a "
                                f"{type(state).__name__}); save model.state_dict()")
    model_state = model.state_dict()
    heads = ("classifier", "head", "fc") + ((head,) if head else ())

    def in_head(key: str) -> bool:
        return key.split(".")[0] in heads or any(key.startswith(h + ".") for h in heads)

    is_head = {k: in_head(k) for k in state}
    mismatched = [k for k, v in state.items() if k in model_state and not is_head[k]
                  and tuple(model_state[k].shape) != tuple(v.shape)]
    filtered = {k: v for k, v in state.items()
                if k in model_state and tuple(model_state[k].shape) == tuple(v.shape)}
    missing = [k for k in model_state if k not in filtered and not in_head(k)]
    unexpected = [k for k in state if k not in model_state]
    if mismatched or missing or unexpected:
        raise InvalidInputError(f"checkpoint {str(path)!r} does not fit this architecture: "
                                f"{len(mismatched)} tensors of another shape (e.g. "
                                f"{mismatched[:2]}), {len(missing)} missing (e.g. {missing[:2]}), "
                                f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}); pass the "
                                "checkpoint of this timm architecture")
    model.load_state_dict(filtered, strict=False)


def load_in_order(model: nn.Module, state: Mapping[str, torch.Tensor], source: str,
                   skip: tuple[str, ...] = ()) -> None:
    """Loads a state dict whose tensors map one to one, in order and shape, onto ``model``'s
    (leaving out the model's tensors under the module names in ``skip``, e.g. a classifier the
    file does not have); any mismatch fails loudly, naming both tensors."""
    target = {k: v for k, v in model.state_dict().items()
              if not any(k == s or k.startswith(s + ".") for s in skip)}
    if len(target) != len(state):
        raise DataError(f"{source} has {len(state)} tensors but the model expects {len(target)}; "
                        "reinstall the weights package")
    mapped = {}
    for (name, value), (src_name, src_value) in zip(target.items(), state.items(), strict=True):
        if tuple(value.shape) != tuple(src_value.shape):
            raise DataError(f"{source}: tensor {src_name} {tuple(src_value.shape)} does not fit "
                            f"{name} {tuple(value.shape)}; reinstall the weights package")
        mapped[name] = src_value
    result = model.load_state_dict(mapped, strict=not skip)
    stray = [k for k in getattr(result, "missing_keys", []) if k in target]
    if stray:
        raise DataError(f"{source}: tensors {stray[:3]} were not loaded; reinstall the weights "
                        "package")

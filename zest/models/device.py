"""The torch device a command runs on (``--device``)."""

from __future__ import annotations

import torch

from zest.errors import InvalidInputError


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` → CUDA when present, else CPU; validates the name."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidInputError(f"device={device!r} asked for, but CUDA is not available here; "
                                "use device='cpu' or device='auto'", parameter="device")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise InvalidInputError(f"unknown device {device!r}; use cpu, cuda or auto")
    return torch.device(device)

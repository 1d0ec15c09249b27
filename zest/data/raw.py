"""The raw data a source returns before splitting (:class:`RawData`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np


@dataclass(frozen=True)
class RawData:
    """Raw data of a source before splitting.

    ``x`` holds images as float arrays N×C×H×W in [0, 1] or texts as a tuple of str; ``y``
    holds label names/values. ``x_test``/``y_test`` is the source's official test split.
    """

    modality: Literal["image", "text"]
    x: Any
    y: np.ndarray
    x_test: Any = None
    y_test: np.ndarray | None = None


def frozen_array(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a

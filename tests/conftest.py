"""Shared fixtures: tiny seeded models and batches; no network, no hub."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from zest.models import load_model  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def image_batch(n: int = 8, size: int = 32, classes: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=generator)
    y = torch.arange(n) % classes
    return x, y


def text_batch(task, n: int = 8, classes: int = 3):
    texts = [("a short one" if i % 2 else "a somewhat longer sentence with more words in it")
             + f" number {i}" for i in range(n)]
    encoded = task.tokenizer(texts, padding=True, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
            "labels": torch.arange(n) % classes}


def batch_for(task, n: int = 8):
    return image_batch(n) if task.modality == "image" else text_batch(task, n)


TINY_MODELS = ["tiny_cnn", "tiny_resnet", "tiny_vit", "tiny_bert", "tiny_llama"]


@pytest.fixture(params=TINY_MODELS)
def tiny(request):
    """(spec, model, task, batch) for every tiny architecture family."""
    model, task = load_model(request.param, 3, seed=0)
    return request.param, model, task, batch_for(task)


@pytest.fixture
def no_loading(monkeypatch):
    """Fails the test if a model or data set is loaded: bad options and outputs must be
    refused first."""
    import zest.loading
    import zest.pipeline

    def refuse(*_args, **_kwargs):
        raise AssertionError("loaded before the options and outputs were checked")

    monkeypatch.setattr(zest.loading, "load_pair", refuse)
    monkeypatch.setattr(zest.pipeline, "load_pair", refuse)

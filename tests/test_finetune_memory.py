"""What fine-tuning keeps in memory: no dense gradient or optimizer state for frozen or partly
trained weights, nothing cached for SPSFT's rows, activation checkpointing for every method."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from typer.testing import CliRunner

from zest.cli import app
from zest.finetune import GPS, METHODS, SPSFT, sparse
from zest.finetune.memory import checkpointed_blocks, training_state
from zest.layers import candidate_layers
from zest.loading import DataOptions, load_pair

DECODER = ("tiny_llama", "rotten_tomatoes", DataOptions(max_length=24, max_train=32, max_val=16,
                                                        max_test=16))


def decoder():
    model, task, data = load_pair(*DECODER[:2], options=DECODER[2])
    names = [layer.name for layer in candidate_layers(model, task.head_name)
             if ".layers." in layer.name]
    return model, task, data, names


def saved_bytes(run) -> int:
    """Bytes of the distinct storages autograd saves for the backward pass while ``run()``."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(storages.values())


def trained_and_saved(method, options, checkpointing):
    """The trained values after two steps, and the bytes autograd then saves for one batch."""
    model, task, data, names = decoder()
    layers = {} if method == "full" else {"layers": names}
    tuner = METHODS.get(method)(model, task, lr=1e-2, seed=0, **layers, **options,
                                gradient_checkpointing=checkpointing)
    tuner.fit(data, epochs=1, batch_size=8, max_steps=2)
    assert "forward" not in model.model.layers[0].__dict__  # the block forwards are restored
    batch = data.batches("train", 8, 1, seed=1)[0]
    model.train()
    with training_state(model, task, checkpointing):
        saved = saved_bytes(lambda: task.loss(task.forward(model, batch)))
    return [p.detach().clone() for p in tuner.trainable_parameters()], saved


@pytest.mark.parametrize("method, options", [("spsft", {"r": 2, "importance": "l2"}),
                                             ("gps", {"k": 2, "selection_batches": 1}),
                                             ("lora", {"rank": 2, "dropout": 0.1}),
                                             ("full", {})])
def test_gradient_checkpointing_trains_the_same_and_keeps_fewer_activations(method, options):
    plain, plain_saved = trained_and_saved(method, options, False)
    recomputed, recomputed_saved = trained_and_saved(method, options, True)
    assert recomputed_saved < plain_saved
    for before, after in zip(plain, recomputed, strict=True):
        torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-4)


def test_checkpointed_blocks_are_the_indexed_blocks_and_restore_the_model():
    model, task, _, _ = decoder()
    with checkpointed_blocks(model, task) as names:
        assert names == [f"model.layers.{i}" for i in range(len(model.model.layers))]
        assert all("forward" in model.get_submodule(n).__dict__ for n in names)
    assert not any("forward" in model.get_submodule(n).__dict__ for n in names)


def test_cli_gradient_checkpointing_reaches_the_tuner(tmp_path):
    result = CliRunner().invoke(app, [
        "finetune", "--model", "tiny_llama", "--dataset", "rotten_tomatoes", "--out",
        str(tmp_path / "run"), "--method", "spsft", "--layers", "top:2", "--epochs", "1",
        "--batch-size", "16", "--max-train", "32", "--max-val", "16",
        "--max-length", "16", "--gradient-checkpointing", "--quiet"])
    assert result.exit_code == 0, result.output
    config = (tmp_path / "run" / "config.json").read_text()
    assert '"gradient_checkpointing": true' in config


class _OutputShapes(TorchDispatchMode):
    """Records the shape of every new tensor an operator returns (views of inputs left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = torch.utils._pytree.tree_leaves((args, kwargs))
        storages = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
        for tensor in out if isinstance(out, tuple | list) else (out,):
            if isinstance(tensor, torch.Tensor) and \
                    tensor.untyped_storage().data_ptr() not in storages:
                self.shapes.add(tuple(tensor.shape))
        return out


def _rows_indices(rows: int, width: int, k: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(rows, width, generator=generator).topk(k, dim=1).indices.sort(1).values


@pytest.mark.parametrize("kind", ["linear", "conv1d", "embedding"])
def test_sparse_layers_compute_the_dense_update_and_its_gradients(monkeypatch, kind):
    from transformers.pytorch_utils import Conv1D

    monkeypatch.setattr(sparse, "CHUNK_ELEMENTS", 24)  # several row chunks per layer
    torch.manual_seed(0)
    module = {"linear": nn.Linear(12, 10), "conv1d": Conv1D(10, 12),
              "embedding": nn.Embedding(20, 6, padding_idx=1)}[kind]
    module.weight.requires_grad_(False)
    transposed = kind == "conv1d"
    rows = module.weight.T if transposed else module.weight
    indices = _rows_indices(rows.shape[0], rows.shape[1], 3)
    values = torch.randn(indices.shape)
    if kind == "embedding":
        x = torch.randint(0, 20, (3, 7))
        x[0, :2] = 1  # the padding row
    else:
        x = torch.randn(3, 7, 12, requires_grad=True)
    # the reference: the dense weight W + scatter(values), differentiated by autograd
    reference_values = values.clone().requires_grad_(True)
    dense = rows.scatter_add(1, indices, reference_values)
    dense = dense.T if transposed else dense
    if kind == "embedding":
        expected = F.embedding(x, dense, module.padding_idx)
    elif transposed:
        expected = x @ dense + module.bias
    else:
        expected = F.linear(x, dense, module.bias)
    update = sparse.attach_sparse_update(module, indices)
    with torch.no_grad():
        update.values.copy_(values)
    out = module(x)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    upstream = torch.randn(out.shape)
    inputs = [reference_values] + ([] if kind == "embedding" else [x, module.bias])
    expected_grads = torch.autograd.grad(expected, inputs, upstream)
    inputs = [update.values] + ([] if kind == "embedding" else [x, module.bias])
    for got, want in zip(torch.autograd.grad(out, inputs, upstream), expected_grads,
                         strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    merged_rows = rows.scatter_add(1, indices, values)
    sparse.detach_sparse_update(module)  # folds the values in, the plain forward is back
    torch.testing.assert_close(module.weight.T if transposed else module.weight, merged_rows)
    assert "forward" not in module.__dict__ and not hasattr(module, sparse.SPARSE_UPDATE)


@pytest.mark.parametrize("implementation", ["sparse", "dense_mask"])
def test_gps_builds_no_dense_weight_gradient_or_copy(monkeypatch, implementation):
    monkeypatch.setattr(sparse, "CHUNK_ELEMENTS", 64)
    model, task, data, _ = decoder()
    tuner = GPS(model, task, layers="all", k=2, selection_batches=1,
                implementation=implementation)
    tuner.prepare(tuner.selection_batches_of(data, 8))
    weights = [model.get_submodule(name).weight for name in tuner.layer_names]
    assert any(name.endswith("embed_tokens") for name in tuner.layer_names)
    dense_shapes = {tuple(w.shape) for w in weights} | {tuple(w.shape)[::-1] for w in weights}
    batch = data.batches("train", 8, 1, seed=1)[0]
    model.train()
    with _OutputShapes() as recorded:
        task.loss(task.forward(model, batch)).backward()
    built = recorded.shapes & dense_shapes
    if implementation == "sparse":
        assert not built
        assert all(w.grad is None for w in weights)
    else:  # the reference keeps a dense gradient per weight: the check can fail
        assert built and all(w.grad is not None for w in weights)


@pytest.mark.parametrize("method, options", [
    ("gps", {"layers": "all", "k": 2, "selection_batches": 1}),
    ("spsft", {"r": 3, "importance": "l2"}),
    ("gps", {"layers": "all", "k": 2, "selection_batches": 1, "implementation": "dense_mask"})])
def test_optimizer_state_covers_only_the_trained_values(method, options):
    model, task, data, names = decoder()
    layers = {} if "layers" in options else {"layers": names}
    tuner = METHODS.get(method)(model, task, **layers, **options)
    tuner.fit(data, epochs=1, batch_size=8, max_steps=1)
    state = sum(t.numel() for values in tuner.optimizer_.state.values()
                for key, t in values.items() if key != "step")
    weights = [model.get_submodule(name).weight for name in tuner.layer_names]
    if options.get("implementation") == "dense_mask":  # the reference: dense Adam moments
        assert state > 2 * tuner.count_trainable()
        assert all(w in tuner.optimizer_.state for w in weights)
        return
    assert state == 2 * tuner.count_trainable()  # Adam's two moments, per trained value
    assert all(w.grad is None and not w.requires_grad and w not in tuner.optimizer_.state
               for w in weights)


def test_spsft_caches_nothing_for_its_rows():
    model, task, data, names = decoder()
    r = 5  # no other dimension of tiny_llama's activations is 5
    tuner = SPSFT(model, task, layers=names, r=r, importance="l2")
    tuner.prepare(tuner.selection_batches_of(data, 8))
    batch = data.batches("train", 8, 1, seed=1)[0]
    model.train()
    shapes = []

    def pack(tensor):
        shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = task.loss(task.forward(model, batch))
    assert not [s for s in shapes if len(s) == 3 and s[-1] == r]  # no f(W_f, x) is kept
    loss.backward()
    assert all(tuner.deltas_[name].grad is not None for name in names)

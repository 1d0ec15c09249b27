"""Training memory per fine-tuning method, as the SPSFT paper's appendix D.1 reports it (issue 19).

"mem" is the peak memory of a training step minus the peak of inference on the same batch with
the pretrained model (spsft-paper D.1: mem = mem_TTL − mem_M). Two ways of measuring it:

- counted: every tensor storage that an operator creates is tracked while it lives (a
  ``TorchDispatchMode`` registers each new storage, a weak reference releases it), and the
  peak of live bytes is taken; the storages alive at the peak are split into gradients,
  optimizer state, new trainable values, method state (indices, masks) and saved activations
  (the storages autograd saves for the backward pass, seen by ``saved_tensors_hooks``), the rest
  being transients. Counted runs execute on fake tensors (``FakeTensorMode``: the same
  operators, shapes and autograd graph, no arithmetic), so every setting and the 0.48B model
  take seconds. Buffers that kernels allocate internally are not tensors and are not counted.
- measured: a real run in a fresh subprocess; the kernel's peak resident set size (VmHWM, reset
  through ``/proc/self/clear_refs``) during inference and during training, glibc told to return
  freed memory at once. It includes everything (kernel workspaces, allocator slack), and the
  same run is also counted, which checks the counted method.

Each setting: the model is loaded, inference runs on the batch (its peak is mem_M), the tuner
prepares (the selection itself is not measured, as in the paper: GPS and SPSFT use random
scores, since memory depends on K and r only), Adam's state is allocated by a step with zero
gradients (the update is zero), then one training step runs (forward, backward, step, gradients
dropped). The peak over both steps is mem_TTL: the step of a run whose optimizer state exists.
Settings follow the paper's LLaMA table: every linear layer of the blocks or only the MLP's
("FA", attention frozen), LoRA (peft, alpha 16, dropout 0.05) at r = 8, 16, 64 and SPSFT at
the same r and at 2r (about LoRA's trainable parameters); GPS on all layers (ours, sparse, vs
the reference's dense mask), K matched to LoRA r=8; full fine-tuning; and with activation
checkpointing. Encoders and CNNs keep the earlier matched-parameter comparison. Resumable:
finished rows are kept in the output JSON (``--redo`` drops rows by model).

Usage: python benchmarks/finetune_memory.py [--counted] [--measured] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import functools
import gc
import json
import os
import platform
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import _results

OUT = Path("benchmarks/results/memory.json")
DECODER_RANKS = (8, 16, 64)
LORA_RANK = 8  # the matched-parameter budget for GPS, and for SPSFT on encoders and CNNs
MIB = 2**20


@dataclass(frozen=True)
class Point:
    """A batch: ``batch`` examples of ``tokens`` tokens (or images of ``image_size``)."""

    name: str
    batch: int
    tokens: int | None = None
    image_size: int | None = None


@dataclass(frozen=True)
class Setting:
    """A method on some layers: ``layers`` is ``blocks`` (every linear layer of the blocks),
    ``mlp`` (the blocks' MLP only), ``all`` (every candidate layer) or ``none``."""

    label: str
    method: str
    layers: str = "blocks"
    options: dict = field(default_factory=dict, hash=False)
    checkpointing: bool = False


def decoder_settings() -> list[Setting]:
    settings = [Setting("full", "full", "none")]
    for layers, suffix in (("blocks", ""), ("mlp", " FA")):
        for r in DECODER_RANKS:
            settings.append(Setting(f"lora r{r}{suffix}", "lora", layers,
                                    {"rank": r, "alpha": 16, "dropout": 0.05}))
        for r in sorted({r for rank in DECODER_RANKS for r in (rank, 2 * rank)}):
            settings.append(Setting(f"spsft r{r}{suffix}", "spsft", layers,
                                    {"r": r, "importance": "l2"}))
    settings += [Setting("gps", "gps", "all", {"implementation": "sparse"}),
                 Setting("gps dense-mask", "gps", "all", {"implementation": "dense_mask"})]
    return settings


CHECKPOINTED = ("full", "lora r16", "spsft r16", "spsft r32", "gps", "gps dense-mask")
ACTIVATION_POINT_SETTINGS = ("full", "lora r16", "spsft r16", "spsft r32", "gps",
                             "gps dense-mask")


def settings_for(model: str, point: Point) -> list[Setting]:
    if model in ("minilm", "efficientnet_lite2"):
        return [Setting("full", "full", "none"),
                Setting(f"lora r{LORA_RANK}", "lora", "blocks", {"rank": LORA_RANK}),
                Setting("gps dense-mask", "gps", "blocks", {"implementation": "dense_mask"}),
                Setting("gps", "gps", "blocks", {"implementation": "sparse"}),
                Setting("spsft", "spsft", "blocks")]
    settings = decoder_settings()
    if point.name != "4x512":
        return [s for s in settings if s.label in ACTIVATION_POINT_SETTINGS]
    by_label = {s.label: s for s in settings}
    return settings + [Setting(f"{label} +ckpt", by_label[label].method, by_label[label].layers,
                               by_label[label].options, True) for label in CHECKPOINTED]


MODELS = {
    "minilm": {"dataset": "r8", "points": [Point("32x128", 32, tokens=128)]},
    "efficientnet_lite2": {"dataset": "digits", "points": [Point("64img", 64, image_size=64)]},
    "smollm2": {"dataset": "r8", "points": [Point("4x512", 4, tokens=512),
                                            Point("32x512", 32, tokens=512)]},
    # a randomly initialised LLaMA of 0.48B parameters with SmolLM2's tokenizer (memory does not
    # depend on weight values); counted only: a real step takes minutes on two CPU cores
    "llama_0.5b": {"dataset": "r8", "points": [Point("4x512", 4, tokens=512),
                                               Point("32x512", 32, tokens=512)],
                   "config": {"hidden_size": 1536, "intermediate_size": 4096,
                              "num_hidden_layers": 16, "num_attention_heads": 12,
                              "num_key_value_heads": 4}},
}
#: The settings also measured for real (peak RSS), besides being counted.
MEASURED = {("minilm", "32x128"): None,  # all
            ("efficientnet_lite2", "64img"): None,
            ("smollm2", "4x512"): ("full", "lora r16", "spsft r16", "spsft r32", "gps",
                                   "gps dense-mask")}


# -- counting live tensor storages --------------------------------------------------------------

def _torch_dispatch_mode():
    from torch.utils._python_dispatch import TorchDispatchMode

    return TorchDispatchMode


class StorageCounter(_torch_dispatch_mode()):
    """Live bytes of tensor storages: those registered, and every new one an operator returns
    while the mode is active; each is released when its storage is freed. Storages are named by
    a serial number (an address can be reused once freed); ``peak_sizes`` are the storages alive
    at the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}  # storage address -> serial
        self.by_serial: dict[int, int] = {}  # serial -> bytes, of the live storages
        self.refs: dict[int, weakref.ref] = {}
        self.serials = 0
        self.now = self.peak = 0
        self.peak_sizes: dict[int, int] = {}

    def serial(self, tensor) -> int:
        """The serial number of the tensor's storage (registered if new)."""
        storage = tensor.untyped_storage()
        address = storage._cdata  # noqa: SLF001 - the storage's identity while it lives
        if address not in self.live:
            self.serials += 1
            self.live[address] = self.serials
            self.by_serial[self.serials] = storage.nbytes()
            self.refs[address] = weakref.ref(storage, functools.partial(self._release, address))
            self.now += storage.nbytes()
            if self.now > self.peak:
                self.reset_peak()
        return self.live[address]

    def size(self, serial: int) -> int:
        """Bytes of a live storage (0 once freed)."""
        return self.by_serial.get(serial, 0)

    def _release(self, address: int, _ref) -> None:
        self.now -= self.by_serial.pop(self.live.pop(address), 0)
        self.refs.pop(address, None)

    def reset_peak(self) -> None:
        self.peak, self.peak_sizes = self.now, dict(self.by_serial)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import torch
        from torch.utils._pytree import tree_leaves

        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.serial(tensor)
        return out


# -- one setting -------------------------------------------------------------------------------

def load(model_spec: str, point: Point):
    """The model, task and one training batch of the point."""
    from zest.loading import DataOptions, load_pair

    spec = "smollm2" if model_spec == "llama_0.5b" else model_spec
    options = DataOptions(image_size=point.image_size, max_length=point.tokens or 128,
                          max_train=max(point.batch * 2, 64), max_val=16, max_test=16)
    model, task, data = load_pair(spec, MODELS[model_spec]["dataset"], options=options)
    if model_spec == "llama_0.5b":
        model = random_llama(model, MODELS[model_spec]["config"])
    batch = data.batches("train", point.batch, 1, seed=0)[0]
    if point.tokens:  # every row as long as the point says (padding included)
        assert batch["input_ids"].shape == (point.batch, point.tokens), batch["input_ids"].shape
    return model, task, data, batch


def random_llama(like, dims: dict):
    """A LLaMA sequence classifier shaped by ``dims``, built on the meta device (its parameters
    are made fake or real later), with ``like``'s vocabulary, labels and padding."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    base = like.config
    config = LlamaConfig(vocab_size=base.vocab_size, num_labels=base.num_labels,
                         pad_token_id=base.pad_token_id, max_position_embeddings=2048,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, **dims)
    config._attn_implementation = "sdpa"  # noqa: SLF001 - as the packaged decoder
    with torch.device("meta"):
        return LlamaForSequenceClassification(config)


def to_fake(model, batch, mode):
    """The model's parameters and buffers, and the batch, as fake tensors (on the CPU)."""
    import torch
    from torch import nn

    memo: dict[int, torch.Tensor] = {}

    def fake(tensor):
        if id(tensor) not in memo:
            if tensor.is_meta:
                with mode:
                    memo[id(tensor)] = torch.empty(tensor.shape, dtype=tensor.dtype,
                                                   device="cpu")
            else:
                memo[id(tensor)] = mode.from_tensor(tensor)
        return memo[id(tensor)]

    for module in model.modules():
        for name, p in list(module._parameters.items()):  # noqa: SLF001
            if p is not None:
                module._parameters[name] = nn.Parameter(fake(p), requires_grad=p.requires_grad)  # noqa: SLF001
        for name, b in list(module._buffers.items()):  # noqa: SLF001
            if b is not None:
                module._buffers[name] = fake(b)  # noqa: SLF001
    if isinstance(batch, dict):
        return {k: fake(v) for k, v in batch.items()}
    return tuple(fake(v) for v in batch)


def layer_names(model, task, setting: Setting) -> list[str] | str | None:
    from torch import nn

    from zest.layers import candidate_layers

    if setting.layers == "none":
        return None
    if setting.layers == "all":
        return "all"
    names = []
    for layer in candidate_layers(model, task.head_name):
        module = model.get_submodule(layer.name)
        if not (isinstance(module, nn.Linear | nn.Conv2d) and getattr(module, "groups", 1) == 1):
            continue
        if task.modality == "text" and ".layers." not in layer.name and \
                ".layer." not in layer.name:
            continue  # decoders and encoders: the blocks' layers, not the embeddings
        if setting.layers == "mlp" and ".mlp." not in layer.name:
            continue
        names.append(layer.name)
    return names


def build_tuner(model, task, setting: Setting, names):
    """The setting's tuner. GPS's K and the encoders' SPSFT ratio match LoRA r=8 on the blocks'
    linear layers in trainable parameters."""
    from zest.finetune import GPS, METHODS

    blocks = [model.get_submodule(n) for n in layer_names(model, task, Setting("", "", "blocks"))]
    lora_budget = sum(LORA_RANK * (m.weight[0].numel() + m.weight.shape[0]) for m in blocks)
    options = dict(setting.options)
    if setting.method == "gps":
        targets = GPS(model, task, layers=names).layer_names
        rows = sum(model.get_submodule(n).weight.shape[0] for n in targets)
        options.update(k=max(1, round(lora_budget / rows)), selection_batches=1)
    if setting.method == "spsft" and "r" not in options:
        dense = sum(model.get_submodule(n).weight.numel() for n in names)
        options.update(ratio=min(1.0, lora_budget / dense), importance="l2")
    kwargs = {} if names is None else {"layers": names}
    tuner = METHODS.get(setting.method)(model, task, gradient_checkpointing=setting.checkpointing,
                                        **kwargs, **options)
    if isinstance(tuner, GPS):  # memory depends on K only: random scores skip the selection
        def random_scores(data, batch_size):
            import torch

            return {n: torch.rand_like(model.get_submodule(n).weight) for n in tuner.layer_names}

        tuner.importance = random_scores
    return tuner


def trim() -> None:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def rss_reset() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def rss_peak_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def run_setting(model_spec: str, point: Point, setting: Setting, model, task, data, batch,
                fake: bool) -> dict:
    """Inference peak, then one steady-state training step; counted, and measured unless
    ``fake``."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from zest.finetune.memory import training_state

    mode = FakeTensorMode() if fake else contextlib.nullcontext()
    if fake:
        batch = to_fake(model, batch, mode)
    counter = StorageCounter()
    base = {counter.serial(t) for t in [*model.parameters(), *model.buffers()]}
    initial = base | {counter.serial(t) for t in batch_tensors(batch)}
    weights = sum(p.untyped_storage().nbytes() for p in model.parameters())
    start = time.perf_counter()
    with mode:
        # inference: the pretrained model on the batch (mem_M)
        trim()
        rss_reset()
        counter.reset_peak()
        model.eval()
        with counter, torch.no_grad():
            task.forward(model, batch)
        infer_count = counter.peak
        infer_rss = rss_peak_mb()
        # the method's preparation (not measured), its optimizer state, one step
        names = layer_names(model, task, setting)
        tuner = build_tuner(model, task, setting, names)
        with counter:  # selection on one example, random scores
            tuner.prepare(tuner.selection_batches_of(data, 1))
        params = tuner.trainable_parameters()
        trainable = {counter.serial(p) for p in params}
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        trim()
        before_training = set(counter.by_serial)
        rss_reset()
        counter.reset_peak()
        saved: set[int] = set()

        def pack(tensor):
            saved.add(counter.serial(tensor))
            return tensor

        with counter, training_state(model, task, setting.checkpointing):
            tuner._train_mode()  # noqa: SLF001
            for p in params:  # Adam's state, allocated by a step that changes nothing
                p.grad = torch.zeros_like(p)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                loss = task.loss(task.forward(model, batch))
            saved -= base | trainable
            saved_bytes = sum(counter.size(k) for k in saved)
            loss.backward()
            del loss
            grads = {counter.serial(p.grad) for p in model.parameters() if p.grad is not None}
            grad_bytes = sum(counter.size(k) for k in grads)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state = {counter.serial(t) for values in optimizer.state.values()
                     for t in values.values() if isinstance(t, torch.Tensor)}
            state_bytes = sum(counter.size(k) for k in state)
        train_count = counter.peak
        train_rss = rss_peak_mb()
        kinds = {"weights and batch": initial, "new trainable values": trainable - base,
                 "gradients": grads, "optimizer state": state, "saved activations": saved,
                 "method state": before_training}
        at_peak = dict.fromkeys([*kinds, "transients"], 0)
        for key, size in counter.peak_sizes.items():
            kind = next((k for k, keys in kinds.items() if key in keys), "transients")
            at_peak[kind] += size
    row = {"model": model_spec, "point": point.name, "batch": point.batch,
           "tokens": point.tokens, "image_size": point.image_size, "setting": setting.label,
           "method": setting.method, "layers": setting.layers, "options": setting.options,
           "checkpointing": setting.checkpointing, "mode": "counted" if fake else "measured",
           "trainable_params": int(tuner.count_trainable()),
           "n_layers": len(names) if isinstance(names, list) else names,
           "model_params": int(sum(p.numel() for p in model.parameters()
                                   if counter.serial(p) in base)),
           "weights_mb": weights / MIB, "infer_peak_mb": infer_count / MIB,
           "train_peak_mb": train_count / MIB, "mem_mb": (train_count - infer_count) / MIB,
           "saved_activations_mb": saved_bytes / MIB, "gradients_mb": grad_bytes / MIB,
           "optimizer_state_mb": state_bytes / MIB,
           "trainable_mb": sum(p.untyped_storage().nbytes() for p in params) / MIB,
           "at_peak_mb": {k: v / MIB for k, v in at_peak.items()},
           "seconds": time.perf_counter() - start}
    if not fake:
        row.update(rss_infer_peak_mb=infer_rss, rss_train_peak_mb=train_rss,
                   rss_mem_mb=train_rss - infer_rss)
    return row


def batch_tensors(batch) -> list:
    return list(batch.values()) if isinstance(batch, dict) else list(batch)


# -- driver --------------------------------------------------------------------------------------

def child(model_spec: str, point_name: str, labels: list[str], fake: bool) -> None:
    """Runs the settings, one JSON line each; counted settings share one loaded model."""
    import torch

    torch.manual_seed(0)
    if fake:  # peft moves new adapters to the base layer's device and dtype (the CPU and
        # float32 already), and Module.to cannot swap fake parameters
        from torch import nn

        nn.Module.to = lambda self, *args, **kwargs: self
    point = next(p for p in MODELS[model_spec]["points"] if p.name == point_name)
    settings = {s.label: s for s in settings_for(model_spec, point)}
    loaded = load(model_spec, point)
    for label in labels:
        model, task, data, batch = loaded
        if fake:
            model = copy.deepcopy(model) if not is_meta(model) else rebuild_meta(model)
        row = run_setting(model_spec, point, settings[label], model, task, data, batch, fake)
        print(json.dumps(row), flush=True)
        del model
        trim()


def is_meta(model) -> bool:
    return any(p.is_meta for p in model.parameters())


def rebuild_meta(model):
    import torch

    with torch.device("meta"):
        return type(model)(model.config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counted", action="store_true", help="Count every setting (fast).")
    parser.add_argument("--measured", action="store_true",
                        help="Measure the MEASURED settings for real (slow).")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--redo", default="", help="Comma-separated models whose rows to drop.")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model_spec, point, labels, mode = args.child
        child(model_spec, point, labels.split("|"), mode == "counted")
        return
    done = _results.load(args.out)
    redo = set(filter(None, args.redo.split(",")))
    done["results"] = [r for r in done["results"]
                       if "mode" in r and r["model"] not in redo]  # earlier format dropped
    finished = {(r["model"], r["point"], r["setting"], r["mode"]) for r in done["results"]}
    # a fixed mmap threshold makes glibc return freed tensors to the OS at once, so the
    # resident set follows live memory
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072",
           "HF_HUB_OFFLINE": "1"}
    jobs = []
    for model_spec in args.models.split(","):
        for point in MODELS[model_spec]["points"]:
            labels = [s.label for s in settings_for(model_spec, point)]
            if args.counted:
                todo = [lb for lb in labels
                        if (model_spec, point.name, lb, "counted") not in finished]
                if todo:
                    jobs.append((model_spec, point.name, todo, "counted"))
            if args.measured and (model_spec, point.name) in MEASURED:
                wanted = MEASURED[(model_spec, point.name)] or labels
                jobs += [(model_spec, point.name, [lb], "measured") for lb in wanted
                         if (model_spec, point.name, lb, "measured") not in finished]
    for model_spec, point, labels, mode in jobs:
        # one fresh process per measured setting; counted settings share one per point
        process = subprocess.Popen(
            [sys.executable, __file__, "--child", model_spec, point, "|".join(labels), mode],
            stdout=subprocess.PIPE, text=True, env=env)
        for line in process.stdout:
            if line.startswith("{"):
                row = json.loads(line)
                done["results"].append(row)
                _results.save(args.out, done, f"{platform.machine()} CPU, "
                              f"{os.cpu_count()} cores; {row['mode']} rows: see the docstring")
                print(f"{row['model']:12s} {row['point']:7s} {row['setting']:22s} "
                      f"{row['mode']:8s} mem {row['mem_mb']:8.1f} MB"
                      + (f"  rss {row['rss_mem_mb']:8.1f} MB" if "rss_mem_mb" in row else ""),
                      flush=True)
        if process.wait() != 0:
            print(f"failed: {model_spec} {point} {mode} {labels}", file=sys.stderr)


if __name__ == "__main__":
    main()

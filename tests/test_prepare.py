"""zest.prepare in the loops users run: a plain torch loop (state_dict checkpoints, deepcopy),
transformers' Trainer (checkpoint resume) and DistributedDataParallel on 2 CPU processes; delta_of,
unprepare (merged or not), and the one-line refusals (issue 31 items 2 and 3)."""

from __future__ import annotations

import copy
import json
import os
import socket

import pytest
import torch
import torch.nn.functional as F

import zest
from zest.errors import InvalidInputError
from zest.finetune import apply_delta
from zest.models import load_model

from .conftest import image_batch

TEXT_LAYERS = ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.output.dense",
               "bert.encoder.layer.1.attention.output.dense"]
LLAMA_LAYERS = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
                "model.layers.1.self_attn.v_proj"]
OPTIONS = {"gps": {"k": 2}, "spsft": {"r": 4}, "lora": {"rank": 2}, "layers": {}}


def texts(n: int) -> list[str]:
    return [f"review {i}: " + ("a fine and good film" if i % 2 else "it was bad, really bad")
            for i in range(n)]


def text_examples(task, n: int = 16, causal: bool = False) -> list[dict[str, torch.Tensor]]:
    """One dict per example, as a tokenised ``datasets`` split hands them to a collator;
    causal LM labels are the input ids with padding at -100 (as transformers' LM collator)."""
    encoded = task.tokenizer(texts(n), padding=True, return_tensors="pt")
    examples = []
    for i in range(n):
        ids, mask = encoded["input_ids"][i], encoded["attention_mask"][i]
        labels = ids.masked_fill(mask == 0, -100) if causal else torch.tensor(i % 2)
        examples.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return examples


def collate(examples):
    from transformers import default_data_collator

    return default_data_collator(examples)


def logits(model, batch):
    model.eval()
    with torch.no_grad():
        if isinstance(batch, dict):
            return model(input_ids=batch["input_ids"],
                         attention_mask=batch["attention_mask"]).logits
        return model(batch[0])


def expected_changes(delta, state):
    """Per base tensor, where the delta may change it: its indices (GPS), its rows (SPSFT),
    all of it (LoRA, replaced tensors)."""
    allowed = {}
    for entry in delta.entries:
        target = state[entry.name]
        if entry.kind in ("replace", "lora"):
            allowed[entry.name] = torch.ones_like(target, dtype=torch.bool)
            continue
        ones = copy.copy(entry)
        ones.tensors = {key: t if key == "indices" else torch.ones_like(t)
                        for key, t in entry.tensors.items()}
        allowed[entry.name] = ones.weight_delta(torch.zeros_like(target)) != 0
    return allowed


def assert_only_planned_changes(base_state, model, delta):
    """The model with the delta merged differs from the base only where the delta may
    change it, and somewhere it does."""
    merged = {k: v.detach() for k, v in model.state_dict().items()}
    allowed = expected_changes(delta, base_state)
    changed_any = False
    for name, before in base_state.items():
        changed = merged[name] != before
        if name in allowed:
            assert not (changed & ~allowed[name]).any(), f"{name} changed outside its plan"
        else:
            assert not changed.any(), f"{name} is not planned but changed"
        changed_any |= bool(changed.any())
    assert changed_any


def plain_loop(model, batches, steps: int = 3, lr: float = 1e-2):
    """The loop users write: AdamW over what requires grad, the model's own loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    for step in range(steps):
        batch = batches[step % len(batches)]
        if isinstance(batch, dict):
            loss = model(**batch).loss
        else:
            loss = F.cross_entropy(model(batch[0]), batch[1])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return model


def image_case():
    model, task = load_model("tiny_cnn", 3, seed=0)
    names = [layer.name for layer in zest.candidate_layers(model, task.head_name)][-2:]
    batches = [image_batch(8, size=16, seed=s) for s in range(3)]
    return model, task, names, batches


def text_case():
    model, task = load_model("tiny_bert", 2, seed=0)
    examples = text_examples(task)
    return model, task, TEXT_LAYERS, [collate(examples[i:i + 4]) for i in range(0, 16, 4)]


@pytest.mark.parametrize("case, method", [("image", "gps"), ("image", "spsft"),
                                          ("text", "gps"), ("text", "spsft"), ("text", "lora"),
                                          ("text", "layers")])
def test_plain_loop_state_dict_deepcopy_and_unprepare(case, method):
    model, task, layers, batches = (image_case if case == "image" else text_case)()
    fresh = copy.deepcopy(model)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    base_out = logits(model, batches[0])
    assert zest.prepare(model, layers, method=method, batches=batches[:2], task=task,
                        **OPTIONS[method]) is model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(tuple(layers) + (task.head_name,)) for n in trainable)
    plain_loop(model, batches)
    delta = zest.delta_of(model)
    state = model.state_dict()
    # the trained values are parameters of the model: a checkpoint holds them
    assert {n for n in trainable} <= set(state)
    # resume: a fresh model prepared the same way takes the checkpoint and computes alike
    resumed = zest.prepare(copy.deepcopy(fresh), layers, method=method, batches=batches[:2],
                           task=task, **OPTIONS[method])
    resumed.load_state_dict(state)
    torch.testing.assert_close(logits(resumed, batches[1]), logits(model, batches[1]),
                               atol=0, rtol=0)
    # a deep copy trains on its own
    twin = copy.deepcopy(model)
    plain_loop(twin, batches, steps=1)
    for mine, theirs in zip(zest.delta_of(model).entries, delta.entries, strict=True):
        for key in mine.tensors:
            assert torch.equal(mine.tensors[key], theirs.tensors[key])
    assert any(not torch.equal(a.tensors[k], b.tensors[k]) for a, b in
               zip(zest.delta_of(twin).entries, delta.entries, strict=True) for k in a.tensors)
    # the delta on a fresh base reproduces the trained model
    trained_out = logits(model, batches[1])
    target = apply_delta(copy.deepcopy(fresh), delta)
    torch.testing.assert_close(logits(target, batches[1]), trained_out, atol=1e-5, rtol=1e-5)
    # unprepare: not merged is the base exactly; merged computes as the trained model
    zest.unprepare(resumed, merge=False)
    assert set(resumed.state_dict()) == set(base_state)
    for name, value in resumed.state_dict().items():
        assert torch.equal(value, base_state[name]), name
    torch.testing.assert_close(logits(resumed, batches[0]), base_out, atol=0, rtol=0)
    zest.unprepare(model, merge=True)
    assert set(model.state_dict()) == set(base_state)
    torch.testing.assert_close(logits(model, batches[1]), trained_out, atol=1e-5, rtol=1e-5)
    assert_only_planned_changes(base_state, model, delta)


def test_requires_grad_comes_back_as_it_was():
    model, task, layers, batches = text_case()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    zest.prepare(model, layers, method="spsft", batches=batches, task=task, r=2)
    zest.unprepare(model, merge=False)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_prepare_takes_a_plan_and_a_one_pass_iterator():
    model, task, _, batches = text_case()
    ranking = zest.rank(model, task, batches[0], by="weight_norm")
    plan = ranking.finetune_plan(model, task, "gps", top_k=2)
    zest.prepare(model, plan, batches=iter(batches), task=task)
    delta = zest.delta_of(model)
    assert delta.meta["method"] == "gps" and delta.meta["layers"] == plan.layers
    assert [e.name for e in delta.entries][:1] == [f"{plan.layers[0]}.weight"]


def test_task_is_inferred_for_transformers_models():
    model, task, layers, batches = text_case()
    zest.prepare(model, layers, method="gps", batches=batches, k=1)
    assert zest.delta_of(model).meta["head"] == task.head_name


def prepare_lm(method, **options):
    model, task = load_model("tiny_llama", 2, kind="causal_lm")
    batches = [collate(text_examples(task, 4, causal=True))]
    return zest.prepare(model, LLAMA_LAYERS, method=method, batches=batches, task=task,
                        **options)


@pytest.mark.parametrize("call, message", [
    (lambda m, t, b: zest.prepare(m, TEXT_LAYERS, batches=b, task=t), "method="),
    (lambda m, t, b: zest.prepare(m, TEXT_LAYERS, method="gps", task=t), "batches="),
    (lambda m, t, b: zest.prepare(m, TEXT_LAYERS, method="gps", batches=[], task=t), "empty"),
    (lambda m, t, b: zest.prepare(m, TEXT_LAYERS, method="gps", batches=b, task=t, rank=2),
     "takes no option"),
    (lambda m, t, b: zest.prepare(m, TEXT_LAYERS, method="gps", task=t,
                                  batches=[{"input_ids": b[0]["input_ids"]}]), "no labels"),
    (lambda m, t, b: zest.prepare(torch.nn.Linear(2, 2), ["weight"], method="gps", batches=b),
     "pass task="),
    (lambda m, t, b: prepare_lm("spsft", importance="qm_taylor"), "token labels"),
    (lambda m, t, b: zest.delta_of(m), "not prepared"),
    (lambda m, t, b: zest.unprepare(m), "not prepared"),
])
def test_bad_calls_are_one_line_errors(call, message):
    model, task, _, batches = text_case()
    with pytest.raises(InvalidInputError, match=message) as caught:
        call(model, task, batches)
    assert "\n" not in str(caught.value)


def test_a_prepared_or_wrapped_model_is_refused():
    model, task, layers, batches = text_case()
    zest.prepare(model, layers, method="lora", task=task)
    with pytest.raises(InvalidInputError, match="already prepared"):
        zest.prepare(model, layers, method="lora", task=task)
    with pytest.raises(InvalidInputError, match="inside the wrapper"):
        zest.prepare(torch.nn.DataParallel(model), layers, method="lora", task=task)


# -- transformers' Trainer -------------------------------------------------------------------

def trainer_run(model, examples, out_dir, resume=None, gradient_checkpointing=False):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(out_dir), max_steps=4, per_device_train_batch_size=4,
                             learning_rate=1e-2, use_cpu=True, report_to=[], seed=0,
                             save_strategy="steps", save_steps=2, logging_strategy="no",
                             disable_tqdm=True,
                             **({"gradient_checkpointing": True} if gradient_checkpointing
                                else {}))
    Trainer(model=model, args=args, train_dataset=examples,
            data_collator=collate).train(resume_from_checkpoint=resume)
    return model


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("spec", ["tiny_bert", "tiny_llama"])
@pytest.mark.parametrize("method", ["gps", "spsft", "lora"])
def test_trainer_trains_resumes_and_the_delta_reproduces_it(tmp_path, spec, method):
    causal = spec == "tiny_llama"
    kind = "causal_lm" if causal else "classification"
    model, task = load_model(spec, 2, seed=0, kind=kind)
    layers = LLAMA_LAYERS if causal else TEXT_LAYERS
    # a column the forward does not take, which Trainer drops (remove_unused_columns)
    examples = [{**example, "idx": torch.tensor(i)}
                for i, example in enumerate(text_examples(task, causal=causal))]
    selection = [collate(examples[:8])]
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    # the task is inferred from the transformers class (no task=)
    zest.prepare(model, layers, method=method, batches=selection, **OPTIONS[method])
    trainer_run(model, examples, tmp_path / "run", gradient_checkpointing=causal)
    delta = zest.delta_of(model)
    assert delta.meta["task_kind"] == kind
    check = collate(examples[8:])
    trained_out = logits(model, check)

    # Trainer's checkpoint resumes: a fresh model, prepared alike, trained from step 2 to 4
    again, _ = load_model(spec, 2, seed=0, kind=kind)
    zest.prepare(again, layers, method=method, batches=selection, **OPTIONS[method])
    trainer_run(again, examples, tmp_path / "run", resume=str(tmp_path / "run/checkpoint-2"))
    torch.testing.assert_close(logits(again, check), trained_out, atol=1e-5, rtol=1e-5)

    # the delta applied to a fresh model reproduces the trained one
    path = delta.save(tmp_path / "delta.safetensors")
    fresh, _ = load_model(spec, 2, seed=0, kind=kind)
    assert not torch.allclose(logits(fresh, check), trained_out)
    apply_delta(fresh, path)
    torch.testing.assert_close(logits(fresh, check), trained_out, atol=1e-5, rtol=1e-5)

    # only the planned entries changed
    zest.unprepare(model, merge=True)
    assert_only_planned_changes(base_state, model, delta)


# -- DistributedDataParallel -----------------------------------------------------------------

DDP_STEPS = 3
DDP_METHODS = ("gps", "spsft", "lora")


def ddp_setup():
    """tiny_bert, its examples (the global batches: 8 examples a step) and selection batch."""
    model, task = load_model("tiny_bert", 2, seed=0)
    examples = text_examples(task, n=8 * DDP_STEPS)
    globals_ = [collate(examples[8 * s:8 * (s + 1)]) for s in range(DDP_STEPS)]
    return model, task, globals_, [collate(examples[:8])]


def ddp_train(model, task, batches, method, shard=None):
    """Dropout off (``eval``) so that sharded and whole batches compute the same gradients;
    ``shard`` = (rank, world): this rank's equal part of each global batch."""
    torch.manual_seed(0)
    zest.prepare(model, TEXT_LAYERS, method=method, batches=batches[1], task=task,
                 **OPTIONS[method])
    trained = model
    if shard is not None:
        trained = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=1e-2)
    trained.eval()
    for batch in batches[0]:
        if shard is not None:
            rank, world = shard
            size = batch["input_ids"].shape[0] // world
            batch = {k: v[rank * size:(rank + 1) * size] for k, v in batch.items()}
        trained(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return zest.delta_of(trained)  # looks through the DDP wrapper


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for method in DDP_METHODS:
            model, task, global_batches, selection = ddp_setup()
            delta = ddp_train(model, task, (global_batches, selection), method, (rank, world))
            delta.save(os.path.join(out_dir, f"{method}-rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_one_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    report = {}
    for method in DDP_METHODS:
        model, task, global_batches, selection = ddp_setup()
        single = ddp_train(model, task, (global_batches, selection), method)
        ranks = [zest.finetune.Delta.load(tmp_path / f"{method}-rank{r}.safetensors")
                 for r in range(2)]
        largest = 0.0
        for entries in zip(single.entries, *(d.entries for d in ranks), strict=True):
            alone, first, second = entries
            assert alone.name == first.name == second.name
            for key in alone.tensors:
                assert torch.equal(first.tensors[key], second.tensors[key])  # ranks agree
                if key == "indices":  # the same selection everywhere
                    assert torch.equal(alone.tensors[key], first.tensors[key])
                    continue
                largest = max(largest, float((alone.tensors[key] - first.tensors[key]).abs()
                                             .max()))
        assert largest < 1e-5, (method, largest)
        report[method] = largest
    (tmp_path / "ddp_max_abs_difference.json").write_text(json.dumps(report))
    print(f"DDP vs one process, max abs difference of the delta values: {report}")


# -- the README's example ------------------------------------------------------------------------

README_SECTION = "## Use zest inside your own training"
#: How the fast test runs the README's example on a tiny model: tiny_bert for minilm, a small
#: share of rotten_tomatoes, 3 Trainer steps (the slow test runs it as written).
TINY_SUBSTITUTIONS = (
    ('"minilm"', '"tiny_bert"'),
    ('zest.load_pair("tiny_bert", "rotten_tomatoes")',
     'zest.load_pair("tiny_bert", "rotten_tomatoes", options=zest.DataOptions(max_length=24, '
     'max_train=48, max_val=16, max_test=16))'),
    ("max_steps=100", "max_steps=3"),
)


def readme_example() -> str:
    from pathlib import Path

    text = (Path(__file__).parent.parent / "README.md").read_text()
    section = text[text.index(README_SECTION):]
    start = section.index("```python\n") + len("```python\n")
    return section[start:section.index("```", start)]


def run_readme_example(code: str, folder) -> None:
    namespace: dict = {}
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    finally:
        os.chdir(cwd)
    model, fresh, batch = namespace["model"], namespace["fresh"], namespace["batch"]
    assert (folder / "run" / "delta.safetensors").is_file()
    assert zest.delta_of(model).meta["method"] == "gps"
    trained = logits(model.cpu(), batch)
    assert not torch.allclose(logits(load_model_like(namespace), batch), trained)
    torch.testing.assert_close(logits(fresh, batch), trained, atol=1e-5, rtol=1e-5)


def load_model_like(namespace):
    return zest.load_model(namespace["task"].spec, num_classes=namespace["data"].num_classes)[0]


def test_the_readme_example_runs_on_a_tiny_model(tmp_path):
    code = readme_example()
    for old, new in TINY_SUBSTITUTIONS:
        assert old in code, old
        code = code.replace(old, new)
    run_readme_example(code, tmp_path)


@pytest.mark.slow
def test_the_readme_example_runs_as_written(tmp_path):
    run_readme_example(readme_example(), tmp_path)

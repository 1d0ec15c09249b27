"""Model registry, task adapters and the packaged pretrained weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import TINY_MODELS, batch_for
from zest.errors import InvalidInputError, UnknownNameError
from zest.layers import candidate_layers
from zest.models import (
    MODELS,
    SCHEMES,
    absolute_spec,
    check_model_spec,
    known_models,
    load_model,
    model_family,
    scheme_of,
)


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
    with pytest.raises(InvalidInputError, match="does not exist"):
        load_model(f"hf:{tmp_path / 'missing'}", 3)


def test_known_models_lists_prefixes():
    assert {"minilm", "efficientnet_lite0", "efficientnet_lite2"} <= set(MODELS.names())
    assert "timm:<arch>" in known_models()


#: For every spec scheme (``""``: the packaged names): a good spec, its name, its model family,
#: and a bad spec with a word its one-line error must hold. A new scheme adds its row here.
SCHEME_EXAMPLES = {
    "": ("tiny_resnet", "tiny_resnet", "resnet", "tiny_resnett", "did you mean 'tiny_resnet'"),
    "timm": ("timm:tf_efficientnet_b0", "tf_efficientnet_b0", "efficientnet", "timm:",
             "lacks its name"),
    "tv": ("tv:mobilenet_v3_small", "mobilenet_v3_small", "mobilenet", "tv:", "lacks its name"),
    "hf": ("hf:no/such/folder", "no/such/folder", "hf", "hf:", "lacks its name"),
}


def test_every_spec_scheme_has_an_example():
    assert set(SCHEME_EXAMPLES) == {"", *SCHEMES.names()}


@pytest.mark.parametrize("prefix", list(SCHEME_EXAMPLES))
def test_a_spec_scheme_parses_and_checks_its_specs(prefix):
    good, name, family, bad, message = SCHEME_EXAMPLES[prefix]
    scheme = scheme_of(good)
    assert scheme.prefix == prefix and scheme_of(bad) is scheme
    assert scheme.parse(good) == name and check_model_spec(good) == good
    assert model_family(good) == family
    with pytest.raises((InvalidInputError, UnknownNameError)) as info:
        check_model_spec(bad)
    assert message in str(info.value) and repr(bad) in str(info.value)
    assert "\n" not in str(info.value)
    if scheme.local_path:  # a folder is made absolute for workers in another folder
        assert absolute_spec(good) == scheme.spec_of(str(Path(name).resolve()))
    else:
        assert absolute_spec(good) == good


def test_a_spec_of_an_unknown_prefix_is_an_unknown_model():
    assert scheme_of("nope:x") is scheme_of("tiny_cnn")
    with pytest.raises(UnknownNameError, match="unknown model 'nope:x'"):
        check_model_spec("nope:x")


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


def test_in_order_weights_fail_loudly_on_a_mismatch():
    from zest.errors import DataError
    from zest.models.checkpoints import load_in_order

    model, _ = load_model("tiny_cnn", 3)
    state = {f"old.{i}": v.clone() for i, (k, v) in enumerate(model.state_dict().items())
             if not k.startswith("classifier")}
    load_in_order(model, state, "test weights", skip=("classifier",))
    first = next(iter(state))
    wrong = dict(state)
    wrong[first] = torch.zeros(1, 2, 3)
    with pytest.raises(DataError, match="old.0 .* does not fit"):
        load_in_order(model, wrong, "test weights", skip=("classifier",))
    with pytest.raises(DataError, match="tensors but the model expects"):
        load_in_order(model, dict(list(state.items())[:-1]), "test weights",
                       skip=("classifier",))


def _frozen_probe_accuracy(spec: str, data) -> float:
    from sklearn.linear_model import LogisticRegression

    model, task = load_model(spec, data.num_classes)

    def features(x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return torch.cat([model.forward_head(model.forward_features(
                task.model_inputs((x[i:i + 100], None))), pre_logits=True)
                for i in range(0, len(x), 100)]).numpy()

    train, test = data.splits["train"], data.splits["test"]
    probe = LogisticRegression(max_iter=3000).fit(features(train.x), train.y.numpy())
    return float(probe.score(features(test.x), test.y.numpy()))


@pytest.mark.slow
def test_mobilenetv2_features_are_the_pretrained_ones():
    import zest

    model, task = load_model("mobilenetv2", 10)
    assert task.mean == (0.485, 0.456, 0.406) and task.head_name == "classifier"
    assert model.classifier.out_features == 10
    data = zest.load_dataset("mnist5k", image_size=64, max_train=600, max_test=400)
    pretrained = _frozen_probe_accuracy("mobilenetv2", data)
    random_init = _frozen_probe_accuracy("timm:mobilenetv2_100", data)
    # measured: 0.87 against 0.62 (a linear probe on frozen pooled features)
    assert pretrained > 0.8 and pretrained > random_init + 0.15, (pretrained, random_init)


@pytest.mark.slow
def test_smollm2_is_the_pretrained_decoder_and_classifies_on_the_last_token():
    from transformers import AutoTokenizer, LlamaForCausalLM

    from zest.models import smollm2_path

    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    lm = LlamaForCausalLM.from_pretrained(str(path))
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = lm.generate(**prompt, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])
    model, task = load_model("smollm2", 4)
    assert task.architecture == "llama" and task.pooling == "last" and task.head_name == "score"
    assert task.tokenizer.padding_side == "right"
    assert sum(p.numel() for n, p in model.named_parameters() if not n.startswith("score")) \
        == 134_515_008


@pytest.mark.parametrize("arch, head", [("resnet18", "fc"), ("mobilenet_v3_small", "classifier.3"),
                                        ("efficientnet_b0", "classifier.1")])
def test_torchvision_models_with_a_checkpoint(tmp_path, arch, head):
    import torchvision

    import zest

    reference = torchvision.models.get_model(arch, weights=None)
    torch.save(reference.state_dict(), tmp_path / "weights.pt")  # ImageNet-shaped head included
    model, task = load_model(f"tv:{arch}", 3, checkpoint=tmp_path / "weights.pt")
    assert task.head_name == head and model.get_submodule(head).out_features == 3
    first = next(n for n, _ in reference.named_parameters())
    assert torch.equal(dict(model.named_parameters())[first],
                       dict(reference.named_parameters())[first])
    ranking = zest.rank(model, task, (torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])))
    assert head not in set(ranking.table["layer"]) and len(ranking.table) > 5


def test_unknown_torchvision_model_lists_known_names():
    with pytest.raises(UnknownNameError, match="resnet18"):
        load_model("tv:resnet19", 3)

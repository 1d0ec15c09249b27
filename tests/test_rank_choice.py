"""Method-aware choice (``Ranking.top/select(..., method=...)``, ``zest rank --method``) and
``zest.rank(model, batch)`` with the task inferred from the model and the batch (issue 31)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import zest
from tests.conftest import image_batch, text_batch
from zest.cli import app
from zest.errors import InvalidInputError, UnknownNameError
from zest.finetune import GPS, METHODS, SPSFT, LoRA
from zest.models import IGNORED_TARGET, Task, infer_task, load_model
from zest.planning import tunable_layers

runner = CliRunner()
LAYER_METHODS = [name for name in METHODS.names() if METHODS.get(name).uses_layers]


@pytest.fixture(scope="module")
def bert_ranking():
    """tiny_bert ranked by parameter count: its word embeddings, which SPSFT cannot tune and
    GPS can, come first; its position embeddings, which GPS keeps frozen, come early."""
    model, task = load_model("tiny_bert", 3)
    return model, task, zest.rank(model, task, text_batch(task), by="n_params")


def test_every_layer_method_has_a_column_filled_by_the_plans_test(bert_ranking):
    model, _, ranking = bert_ranking
    layers = ranking.table["layer"].tolist()
    for method in LAYER_METHODS:
        assert ranking.table[method].tolist() == [
            name in tunable_layers(method, model, layers) for name in layers]
    assert not ranking.table["spsft"].all() and not ranking.table["gps"].all()
    assert ranking.table["layers"].all()


@pytest.mark.parametrize("method", ["spsft", "gps", "lora", "layers"])
def test_top_and_select_with_a_method_take_the_best_layers_it_can_tune(bert_ranking, method):
    model, task, ranking = bert_ranking
    tunable = tunable_layers(method, model, ranking.table["layer"])
    assert ranking.top(4, method=method) == tunable[:4]
    chosen = ranking.select(0.05, method=method)
    assert chosen and set(chosen) <= set(tunable)
    params = ranking.table.set_index("layer")["params"]
    assert params[chosen].sum() <= 0.05 * ranking.total_params
    assert ranking.default_choice(method=method) == tunable[:5]
    # the plan without a budget chooses the same layers: one way of deciding
    assert ranking.finetune_plan(model, task, method, top_k=3).layers == tunable[:3]
    METHODS.get(method)(model, task, layers=ranking.top(4, method=method))  # accepted


def test_without_a_method_every_ranked_layer_counts(bert_ranking):
    _, _, ranking = bert_ranking
    assert ranking.top(2) == ranking.table["layer"].head(2).tolist()
    assert ranking.top(1) == ["bert.embeddings.word_embeddings"]
    assert ranking.top(1, method="spsft") != ranking.top(1)


def test_a_tuner_handed_a_layer_it_cannot_tune_names_the_method_aware_call(bert_ranking):
    model, task, ranking = bert_ranking
    with pytest.raises(InvalidInputError, match=r"ranking\.top\(k, method='spsft'\)") as error:
        SPSFT(model, task, layers=ranking.top(1))
    assert "\n" not in str(error.value)
    with pytest.raises(InvalidInputError, match=r"ranking\.top\(k, method='gps'\)"):
        GPS(model, task, layers=["bert.embeddings.position_embeddings"])
    cnn, cnn_task = load_model("tiny_cnn", 3)
    with pytest.raises(InvalidInputError, match=r"ranking\.top\(k, method='lora'\)"):
        LoRA(cnn, cnn_task, layers=["blocks.3.0.conv_dw"])  # depthwise


def test_method_aware_requests_that_cannot_be_met_say_so_in_one_line(bert_ranking):
    model, task, ranking = bert_ranking
    with pytest.raises(InvalidInputError, match="no layers to choose"):
        ranking.top(2, method="full")
    with pytest.raises(UnknownNameError, match="spsft"):
        ranking.top(2, method="spsf")
    count = int(ranking.table["spsft"].sum())
    with pytest.raises(InvalidInputError, match=f"exceeds the {count} ranked layers method="
                       "'spsft' can tune"):
        ranking.top(count + 1, method="spsft")
    with pytest.raises(InvalidInputError, match="smallest layer method='spsft' can tune"):
        ranking.select(1e-6, method="spsft")
    blocks = zest.rank(model, task, text_batch(task), by="n_params", granularity="block")
    with pytest.raises(InvalidInputError, match="granularity='module'"):
        blocks.top(1, method="gps")


def test_rank_cli_method_chooses_only_layers_it_can_tune(tmp_path):
    common = ["rank", "--model", "tiny_bert", "--dataset", "rotten_tomatoes", "--max-train", "16",
              "--batch-size", "8", "--by", "n_params", "--top-k", "2"]
    result = runner.invoke(app, [*common, "--method", "spsft", "--out", str(tmp_path / "r.csv")])
    assert result.exit_code == 0, result.output
    assert "among the" in result.output and "--method spsft can tune" in result.output
    import pandas as pd

    table = pd.read_csv(tmp_path / "r.csv")
    chosen = table[table["chosen"]]
    assert len(chosen) == 2 and chosen["spsft"].all()
    assert chosen["layer"].tolist() == table[table["spsft"]]["layer"].head(2).tolist()
    for extra, message in ((["--method", "full"], "no layers to choose"),
                           (["--method", "gps", "--format", "peft"], "--format peft lists")):
        result = runner.invoke(app, [*common, *extra])
        assert result.exit_code == 1 and message in result.output
        assert "Traceback" not in result.output


# -- zest.rank(model, batch): the task inferred ---------------------------------------------------

def _scores(ranking):
    return ranking.table.set_index("layer")["score"].sort_index()


def test_an_hf_sequence_classifier_ranks_without_a_task():
    model, task = load_model("tiny_bert", 3)
    batch = text_batch(task)
    inferred = zest.rank(model, batch)
    assert inferred.task.kind == "classification" and inferred.task.head_name == "classifier"
    assert inferred.task.num_classes == 3 and inferred.task.architecture == "bert"
    torch.testing.assert_close(torch.tensor(_scores(inferred).to_numpy()),
                               torch.tensor(_scores(zest.rank(model, task, batch)).to_numpy()))


def test_an_hf_causal_lm_ranks_on_labels_of_input_ids():
    model, task = load_model("tiny_llama", 3, kind="causal_lm")
    encoded = task.tokenizer(["a somewhat longer text with words", "short"], padding=True,
                             return_tensors="pt")
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    batch = {"input_ids": ids, "attention_mask": mask,
             "labels": ids.masked_fill(mask == 0, IGNORED_TARGET)}
    inferred = zest.rank(model, batch)
    assert inferred.task.kind == "causal_lm" and inferred.task.head_name == "lm_head"
    # the same next tokens as zest's own causal-LM task on that batch: the same ranking
    own = zest.rank(model, task, {"input_ids": ids, "attention_mask": mask,
                                  "labels": torch.tensor([0, 1])})
    torch.testing.assert_close(torch.tensor(_scores(inferred).to_numpy()),
                               torch.tensor(_scores(own).to_numpy()))
    assert inferred.top(2, method="spsft")
    task.check_batch(batch)  # token labels of the shape of input_ids pass
    with pytest.raises(InvalidInputError, match=r"use labels=input_ids"):
        task.check_batch({**batch, "labels": batch["labels"][:, :-1]})


def test_token_labels_of_minus_100_predict_nothing():
    ids = torch.tensor([[5, 6, 7, 8]])
    plain = Task.next_tokens({"input_ids": ids})
    assert plain.tolist() == [[6, 7, 8, IGNORED_TARGET]]
    masked = Task.next_tokens({"input_ids": ids, "labels": torch.tensor([[-100, -100, 7, 8]])})
    assert masked.tolist() == [[IGNORED_TARGET, 7, 8, IGNORED_TARGET]]


def test_a_timm_classifier_ranks_on_the_images_it_takes():
    model, task = load_model("timm:test_resnet", 3, image_size=32)
    x, y = image_batch(8, 32)
    mean = torch.tensor(task.mean).view(1, -1, 1, 1)
    std = torch.tensor(task.std).view(1, -1, 1, 1)
    inferred = zest.rank(model, ((x - mean) / std, y))  # the user's batch is normalised already
    assert inferred.task.spec == "timm:test_resnet" and inferred.task.num_classes == 3
    assert inferred.task.head_name == task.head_name
    assert inferred.task.architecture == task.architecture
    torch.testing.assert_close(torch.tensor(_scores(inferred).to_numpy()),
                               torch.tensor(_scores(zest.rank(model, task, (x, y))).to_numpy()),
                               rtol=1e-3, atol=1e-3)


def test_a_torchvision_classifier_ranks_without_a_task():
    import torchvision

    model = torchvision.models.resnet18(num_classes=4)
    ranking = zest.rank(model, image_batch(8, 32, classes=4))
    assert ranking.task.head_name == "fc" and ranking.task.num_classes == 4
    assert ranking.task.architecture == "torchvision" and "fc" not in set(ranking.table["layer"])
    assert set(ranking.top(3, method="lora")) <= set(ranking.table.loc[ranking.table["lora"],
                                                                       "layer"])


class _ConvHead(nn.Module):
    """A classifier whose head is a 1x1 convolution: no Linear for a family to find."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.out = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        return self.out(self.body(x)).mean(dim=(2, 3))


@pytest.mark.filterwarnings("ignore::zest.architectures.ArchitectureFallbackWarning")
def test_a_head_that_cannot_be_found_is_named_with_head():
    model = _ConvHead()
    with pytest.raises(InvalidInputError, match=r"head='<its module name>'") as error:
        zest.rank(model, image_batch(8, 16))
    assert "\n" not in str(error.value)
    ranking = zest.rank(model, image_batch(8, 16), head="out", by="n_params")
    assert ranking.task.head_name == "out" and "out" not in set(ranking.table["layer"])
    with pytest.raises(InvalidInputError, match="is no module"):
        zest.rank(model, image_batch(8, 16), head="nope")


def test_what_is_missing_is_named_in_one_line():
    from transformers import BertConfig, BertModel

    bert, task = load_model("tiny_bert", 3)
    batch = text_batch(task)
    cases = [
        (lambda: zest.rank(bert, image_batch()), "tokenised batch"),
        (lambda: zest.rank(bert, {k: v for k, v in batch.items() if k != "labels"}),
         "has no labels"),
        (lambda: zest.rank(bert, task), "no minibatch"),
        (lambda: zest.rank(bert, batch, batch), "must be a zest Task"),
        (lambda: zest.rank(bert, task, batch, head="classifier"), "names its own"),
        (lambda: zest.rank(BertModel(BertConfig(vocab_size=100, hidden_size=8,
                                                num_hidden_layers=1, num_attention_heads=2,
                                                intermediate_size=8)), batch),
         "cannot tell the task of BertModel"),
        (lambda: zest.rank(load_model("tiny_cnn", 3)[0], batch), "needs a transformers model"),
        (lambda: zest.rank(_llama_classifier_without_padding(), batch), "fails on this batch"),
    ]
    for call, message in cases:
        with pytest.raises(InvalidInputError, match=message) as error:
            call()
        assert "\n" not in str(error.value)
    llama, lm_task = load_model("tiny_llama", 3, kind="causal_lm")
    tokens = {k: v for k, v in text_batch(lm_task).items() if k != "labels"}
    with pytest.raises(InvalidInputError, match=r"batch\['labels'\] = batch\['input_ids'\]"):
        zest.rank(llama, tokens)


def _llama_classifier_without_padding():
    """A LLaMA sequence classifier with no pad_token_id: transformers refuses batches of more
    than one text."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    return LlamaForSequenceClassification(LlamaConfig(
        vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, intermediate_size=16, num_labels=3, pad_token_id=None))


def test_infer_task_is_the_task_rank_uses():
    model, task = load_model("tiny_bert", 3)
    inferred = infer_task(model, text_batch(task))
    assert inferred.pooling == task.pooling and inferred.head_name == task.head_name

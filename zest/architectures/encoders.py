"""The transformers encoder architectures (ARCHITECTURE.md §6): BERT-style, DistilBERT, ALBERT,
MPNet and DeBERTa-v2. Their stage plans are in :mod:`zest.stages.encoders`."""

from __future__ import annotations

from zest.architectures.base import (
    Architecture,
    attribute_at,
    has_attributes,
    transformers_base,
    transformers_head,
)
from zest.stages.encoders import (
    albert_plan,
    bert_plan,
    deberta_plan,
    distilbert_plan,
    mpnet_plan,
)

BERT = Architecture(
    name="bert", modality="text",
    recognise=lambda m: has_attributes(transformers_base(m), "embeddings", "encoder",
                                       "_create_attention_masks"),
    head=transformers_head, pooling="first", stage_plan=bert_plan,
    model_families=("bert", "roberta", "xlm-roberta", "electra"),
    frozen_name_parts=("position_embeddings",),
    description="BERT-style encoders (BERT, RoBERTa, XLM-R, ELECTRA: embeddings, "
                "encoder.layer.i)")

DISTILBERT = Architecture(
    name="distilbert", modality="text",
    recognise=lambda m: has_attributes(
        attribute_at(transformers_base(m), "transformer"), "layer") and
    has_attributes(transformers_base(m), "embeddings"),
    head=transformers_head, pooling="first", stage_plan=distilbert_plan,
    model_families=("distilbert",), frozen_name_parts=("position_embeddings",),
    description="DistilBERT (embeddings, transformer.layer.i, pre_classifier)")

ALBERT = Architecture(
    name="albert", modality="text",
    recognise=lambda m: has_attributes(attribute_at(transformers_base(m), "encoder"),
                                       "albert_layer_groups", "embedding_hidden_mapping_in"),
    head=transformers_head, pooling="first", stage_plan=albert_plan,
    model_families=("albert",), frozen_name_parts=("position_embeddings",),
    description="ALBERT (embeddings, encoder.albert_layer_groups.g shared by its passes, "
                "pooler)")

MPNET = Architecture(
    name="mpnet", modality="text",
    recognise=lambda m: has_attributes(attribute_at(transformers_base(m), "encoder"), "layer",
                                       "relative_attention_bias", "compute_position_bias"),
    head=transformers_head, pooling="first", stage_plan=mpnet_plan,
    model_families=("mpnet",), frozen_name_parts=("position_embeddings",),
    description="MPNet (embeddings, encoder.relative_attention_bias, encoder.layer.i)")

DEBERTA_V2 = Architecture(
    name="deberta_v2", modality="text",
    recognise=lambda m: has_attributes(attribute_at(transformers_base(m), "encoder"), "layer",
                                       "get_rel_embedding", "get_rel_pos", "get_attention_mask"),
    head=transformers_head, pooling="first", stage_plan=deberta_plan,
    model_families=("deberta-v2",), frozen_name_parts=("position_embeddings",),
    description="DeBERTa-v2/v3 (embeddings, encoder.rel_embeddings, encoder.layer.i, pooler)")

#: The entries of this module, in recognition order (registered by :mod:`zest.architectures`).
ENTRIES = (BERT, DISTILBERT, ALBERT, MPNET, DEBERTA_V2)

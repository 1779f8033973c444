"""DistilBERT encoders (msmarco-distilbert, multi-qa-distilbert; opensearch's distilled SPLADE models).

DistilBERT is BERT's post-LayerNorm block without token types, saved under other names
(`transformer.layer.N.attention.q_lin`, `sa_layer_norm`, `ffn.lin1`, ...) and other config keys
(`dim`, `n_layers`, `hidden_dim`). It runs on models/bert.py's modules: `from_hf` reads its keys and
`rename_weight` maps each checkpoint name to the BERT module it is (the masked-LM head's
`vocab_transform` / `vocab_layer_norm` / `vocab_projector` to BERT's `cls.predictions`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from models.bert import _ACTIVATIONS, BertConfig, BertModel
from models.bert_splade import BertForSparseEmbedding
from models.weights import ModelLoadError


@dataclass(frozen=True)
class DistilBertConfig(BertConfig):
    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> DistilBertConfig:
        if cfg.get("sinusoidal_pos_embds"):
            raise ModelLoadError("DistilBERT with sinusoidal position embeddings is not supported")
        act = cfg.get("activation", "gelu")
        if act not in _ACTIVATIONS:
            raise ModelLoadError(f"activation {act!r} is not supported; known: {sorted(_ACTIVATIONS)}")
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["dim"],
            num_hidden_layers=cfg["n_layers"],
            num_attention_heads=cfg["n_heads"],
            intermediate_size=cfg["hidden_dim"],
            max_position_embeddings=cfg["max_position_embeddings"],
            type_vocab_size=0,  # no token types
            hidden_act=act,
            layer_norm_eps=1e-12,  # fixed in DistilBERT's code
            pad_token_id=cfg.get("pad_token_id") or 0,
        )


_LAYER = re.compile(r"transformer\.layer\.(\d+)\.(.+)")
_LAYER_PARTS = {
    "attention.q_lin.": "attention.self.query.",
    "attention.k_lin.": "attention.self.key.",
    "attention.v_lin.": "attention.self.value.",
    "attention.out_lin.": "attention.output.dense.",
    "sa_layer_norm.": "attention.output.LayerNorm.",
    "ffn.lin1.": "intermediate.dense.",
    "ffn.lin2.": "output.dense.",
    "output_layer_norm.": "output.LayerNorm.",
}
_HEAD = {
    "vocab_transform.": "cls.predictions.transform.dense.",
    "vocab_layer_norm.": "cls.predictions.transform.LayerNorm.",
    "vocab_projector.bias": "cls.predictions.bias",
}


def bert_name(name: str) -> str | None:
    """A DistilBERT checkpoint key as the BERT module key it is; None for keys not used (the tied
    projector's weight, classifier heads)."""
    name = name.removeprefix("distilbert.")
    found = _LAYER.fullmatch(name)
    if found is not None:
        for part, bert in _LAYER_PARTS.items():
            if found[2].startswith(part):
                return f"encoder.layer.{found[1]}.{bert}{found[2][len(part):]}"
    for part, bert in _HEAD.items():
        if name.startswith(part):
            return bert + name[len(part):]
    if name.startswith(("vocab_projector.", "pre_classifier.", "classifier.", "qa_outputs.")):
        return None
    return name


class DistilBertModel(BertModel):
    config_class = DistilBertConfig

    @classmethod
    def rename_weight(cls, name: str) -> str | None:
        name = bert_name(name)
        if name is None or name.startswith("cls."):
            return None  # an embedding model uses no masked-LM head
        return super().rename_weight(name)


class DistilBertForSparseEmbedding(BertForSparseEmbedding):
    config_class = DistilBertConfig

    @classmethod
    def rename_weight(cls, name: str) -> str | None:
        name = bert_name(name)
        return None if name is None else super().rename_weight(name)

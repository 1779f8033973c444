"""BERT with its masked-LM head as a SPLADE sparse embedding model (naver/splade-*, opensearch's
neural sparse encoders): sentence-transformers' SparseEncoder of MLMTransformer + SpladePooling.

Each input's vector has one weight per vocabulary entry: the MLM logits of every token, through
log(1 + relu(.)) (twice for `log1p_relu`), pooled by max (or sum) over the input's tokens. Most
entries are zero, so the server answers TEI's `/embed_sparse` with the non-zero ones.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.bert import _ACTIVATIONS, BertConfig, BertModel
from models.weights import ModelLoadError

SPLADE_POOLING = ("max", "sum")
SPLADE_ACTIVATIONS = ("relu", "log1p_relu")


def splade_config(folder: Path) -> tuple[str, str] | None:
    """(pooling, activation) of the folder's SpladePooling module; None if it lists none."""
    modules_file = folder / "modules.json"
    if not modules_file.exists():
        return None
    for module in json.loads(modules_file.read_text(encoding="utf-8")):
        if module.get("type", "").endswith("SpladePooling"):
            path = folder / module.get("path", "") / "config.json"
            cfg = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
            pooling, act = cfg.get("pooling_strategy", "max"), cfg.get("activation_function", "relu")
            if pooling not in SPLADE_POOLING or act not in SPLADE_ACTIVATIONS:
                raise ModelLoadError(f"SpladePooling {pooling!r} / {act!r} is not supported; "
                                     f"pooling {SPLADE_POOLING}, activation {SPLADE_ACTIVATIONS}")
            return pooling, act
    return None


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = _ACTIVATIONS[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    """HF's `cls.predictions`: transform, then the word embeddings (tied) plus a vocabulary bias."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder: nn.Linear | None = None  # the tied embedding, set after loading


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.predictions = BertLMPredictionHead(config)


class BertForSparseEmbedding(BertModel):
    """`forward` returns hidden states as the dense encoders do; `sparse` pools them into (B, vocab)."""

    _unused = ("pooler.", "lm_head.", "classifier.", "qa_outputs.", "cls.predictions.decoder.")  # decoder: tied

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.cls = BertOnlyMLMHead(config)

    def after_load(self) -> None:
        super().after_load()
        head = self.cls.predictions
        head.decoder = nn.Linear(self.config.hidden_size, self.config.vocab_size, device="meta")
        head.decoder.weight = self.embeddings.word_embeddings.weight
        head.decoder.bias = head.bias

    def sparse(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor, pooling: str = "max",
               activation: str = "relu") -> torch.Tensor:
        """(T, H) hidden states of B concatenated sequences -> (B, vocab) float32 SPLADE weights,
        pooled and activated as the folder's SpladePooling says (`splade_config`)."""
        head = self.cls.predictions
        assert head.decoder is not None, "after_load() ties the decoder"
        weights = torch.log1p(torch.relu(head.decoder(head.transform(hidden)).float()))
        if activation == "log1p_relu":
            weights = torch.log1p(weights)
        cu = cu_seqlens.to(device=hidden.device, dtype=torch.long)
        lens = cu[1:] - cu[:-1]
        seg = torch.repeat_interleave(torch.arange(lens.shape[0], device=hidden.device), lens)
        out = weights.new_zeros(lens.shape[0], weights.shape[1])  # every weight is >= 0, so 0 starts a max too
        if pooling == "max":
            return out.scatter_reduce(0, seg[:, None].expand_as(weights), weights, "amax")
        return out.index_add_(0, seg, weights)

    @classmethod
    def extra_info(cls, folder: str | Path, config: dict[str, Any]) -> dict[str, Any]:
        if config.get("tie_word_embeddings") is False:
            raise ModelLoadError("SPLADE models with an untied MLM decoder are not supported")
        pooling, activation = splade_config(Path(folder)) or ("max", "relu")
        return {"pooling": f"splade-{pooling}", "normalize": False,
                "max_model_len": cls.folder_max_model_len(Path(folder), config)}

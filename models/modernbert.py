"""ModernBERT encoders (answerdotai/ModernBERT, gte-modernbert, modernbert-embed): rotary positions, GeGLU,
bias-free LayerNorms, and local attention (keys within a radius) on two layers of three; and its
sequence classifiers (gte-reranker-modernbert): HF's `head` (dense, activation, norm) over the CLS
token or the mean of the tokens, then `classifier`.

Module names equal HF's (`embeddings.tok_embeddings`, `layers.N.attn.Wqkv`, `final_norm`); a task
checkpoint's `model.` prefix is dropped, and a masked-LM's head skipped, so it loads as an embedding model.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine import fused
from engine.attention.metadata import AttentionVariant
from engine.forward_context import ForwardContext
from models.bert import BertModel
from models.bert_classification import classifier_info, config_labels
from models.layers import RopeConfig, RotaryEmbedding, activation
from models.pooling import pool


@dataclass(frozen=True)
class ModernBertConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    norm_eps: float
    norm_bias: bool
    attention_bias: bool
    mlp_bias: bool
    hidden_activation: str
    local_layers: tuple[int, ...]  # layers whose queries see keys within `local_radius` only
    local_radius: int  # HF's sliding_window: local_attention // 2
    global_rope: RopeConfig
    local_rope: RopeConfig
    # sequence classifiers only
    labels: tuple[str, ...] = ("LABEL_0", "LABEL_1")
    classifier_pooling: str = "cls"  # "cls" | "mean"
    classifier_activation: str = "gelu"
    classifier_bias: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_model_len(self) -> int:
        return self.max_position_embeddings

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> ModernBertConfig:
        n = config["num_hidden_layers"]
        types = config.get("layer_types")
        if types is None:  # older configs: every global_attn_every_n_layers-th layer is global, from 0
            every = config.get("global_attn_every_n_layers") or 3
            types = ["sliding_attention" if i % every else "full_attention" for i in range(n)]
        nested = config.get("rope_parameters") or {}

        def rope(kind: str, legacy_key: str, default: float) -> RopeConfig:
            if kind in nested:
                return RopeConfig.from_hf({"rope_parameters": nested[kind]})
            return RopeConfig(theta=float(config.get(legacy_key) or default))

        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_hidden_layers=n,
            num_attention_heads=config["num_attention_heads"],
            max_position_embeddings=config.get("max_position_embeddings", 8192),
            norm_eps=config.get("norm_eps", 1e-5),
            norm_bias=bool(config.get("norm_bias", False)),
            attention_bias=bool(config.get("attention_bias", False)),
            mlp_bias=bool(config.get("mlp_bias", False)),
            hidden_activation=config.get("hidden_activation", "gelu"),
            local_layers=tuple(i for i, t in enumerate(types) if t == "sliding_attention"),
            local_radius=config.get("local_attention", 128) // 2,
            global_rope=rope("full_attention", "global_rope_theta", 160_000.0),
            local_rope=rope("sliding_attention", "local_rope_theta", 10_000.0),
            labels=config_labels(config),
            classifier_pooling=config.get("classifier_pooling", "cls"),
            classifier_activation=config.get("classifier_activation", "gelu"),
            classifier_bias=bool(config.get("classifier_bias", False)),
        )


class ModernBertEmbeddings(nn.Module):
    def __init__(self, config: ModernBertConfig) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)


class ModernBertAttention(nn.Module):
    def __init__(self, config: ModernBertConfig, layer_idx: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.Wqkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.attention_bias)
        self.Wo = nn.Linear(config.hidden_size, config.hidden_size, bias=config.attention_bias)
        local = layer_idx in config.local_layers
        self.variant = AttentionVariant(radius=config.local_radius) if local else None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], ctx: ForwardContext,
                layer_idx: int) -> torch.Tensor:
        q, k, v = self.Wqkv(x).view(x.shape[0], 3, self.num_heads, self.head_dim).unbind(1)
        q, k = fused.rotary(q, k, *rope)
        out = ctx.attend(layer_idx, q, k, v, self.head_dim**-0.5, variant=self.variant)
        return self.Wo(out.reshape(x.shape[0], -1))


class ModernBertMLP(nn.Module):
    """GeGLU: Wo(act(input) * gate) with [input | gate] = Wi(x)."""

    def __init__(self, config: ModernBertConfig) -> None:
        super().__init__()
        self.Wi = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.Wo = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act = activation(config.hidden_activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inp, gate = self.Wi(x).chunk(2, dim=-1)
        return self.Wo(self.act(inp) * gate)


class ModernBertEncoderLayer(nn.Module):
    """Pre-LN: x + attn(norm(x)), then x + mlp(norm(x)); layer 0 has no attention norm (the
    embeddings' norm comes right before it), as in HF."""

    def __init__(self, config: ModernBertConfig, layer_idx: int) -> None:
        super().__init__()
        d = config.hidden_size
        self.attn_norm = nn.LayerNorm(d, eps=config.norm_eps, bias=config.norm_bias) if layer_idx else nn.Identity()
        self.attn = ModernBertAttention(config, layer_idx)
        self.mlp_norm = nn.LayerNorm(d, eps=config.norm_eps, bias=config.norm_bias)
        self.mlp = ModernBertMLP(config)
        self.layer_idx = layer_idx

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], ctx: ForwardContext) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, ctx, self.layer_idx)
        return x + self.mlp(self.mlp_norm(x))


class ModernBertModel(BertModel):
    """Flat token ids in, final-norm hidden states out (HF's last_hidden_state); pooled by the
    embedding engine as the folder's sentence-transformers modules say."""

    config_class = ModernBertConfig  # type: ignore[assignment]
    _prefixes = ("model.",)  # ModernBertForMaskedLM and friends
    _unused = ("head.", "decoder.", "classifier.")

    def __init__(self, config: ModernBertConfig) -> None:  # type: ignore[override]
        nn.Module.__init__(self)
        self.config = config
        self.embeddings = ModernBertEmbeddings(config)
        self.layers = nn.ModuleList(ModernBertEncoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)
        d, n = config.head_dim, config.max_position_embeddings
        self.global_rotary = RotaryEmbedding(d, n, config.global_rope)
        self.local_rotary = RotaryEmbedding(d, n, config.local_rope)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.embeddings.norm(self.embeddings.tok_embeddings(input_ids))
        ropes = self.global_rotary(positions), self.local_rotary(positions)
        for layer in self.layers:
            x = layer(x, ropes[layer.attn.variant is not None], ctx)
        return self.final_norm(x)

    def after_load(self) -> None:
        """Nothing to merge: q/k/v and the GeGLU halves are saved as one Linear each."""


class ModernBertPredictionHead(nn.Module):
    def __init__(self, config: ModernBertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=config.classifier_bias)
        self.act = activation(config.classifier_activation)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(x)))


class ModernBertForSequenceClassification(ModernBertModel):
    """Encoder + HF's head + classifier; `classify` turns hidden states into per-sequence logits."""

    _unused = ("decoder.",)  # the head and classifier are ours now

    def __init__(self, config: ModernBertConfig) -> None:
        if config.classifier_pooling not in ("cls", "mean"):
            raise ValueError(f"unsupported classifier_pooling {config.classifier_pooling!r}; supported: cls, mean")
        super().__init__(config)
        self.head = ModernBertPredictionHead(config)
        self.classifier = nn.Linear(config.hidden_size, len(config.labels))

    def classify(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """(T, H) hidden states of B concatenated sequences -> (B, num_labels) float32 logits, from
        the CLS token or the tokens' mean (`classifier_pooling`, an embedding pooling mode too)."""
        pooled = pool(hidden, cu_seqlens, (self.config.classifier_pooling,)).to(hidden.dtype)
        return self.classifier(self.head(pooled)).float()

    @classmethod
    def extra_info(cls, folder: str | Path, config: dict[str, Any]) -> dict[str, Any]:
        return classifier_info(cls, folder, config)

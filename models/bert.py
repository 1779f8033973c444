"""BERT-family encoders (BERT, MiniLM, RoBERTa, XLM-R; DistilBERT in models/distilbert.py) over a flat,
unpadded batch.

Attribute names follow HF's `BertModel` / `RobertaModel`, so checkpoint keys load unchanged
(after `rename_weight` strips a task prefix). Post-LayerNorm blocks: x = LN(x + sublayer(x)).
The model returns final hidden states; pooling and normalisation live in models/pooling.py.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.forward_context import ForwardContext
from models.layers import merged_linear
from models.pooling import PoolingConfig, PoolingConfigError
from models.spec import KVCacheSpec
from models.weights import ModelLoadError

# HF's ACT2FN names for the activations BERT-family checkpoints use, as in-place ops: they run on
# the fresh up-projection (T, 4H), the largest activation, so in place saves an allocation and
# a pass over memory (~20% of the activation's time on CPU).
_ACTIVATIONS = {
    "gelu": lambda x: torch.ops.aten.gelu_(x),  # exact (erf) GELU, what "gelu" means in HF
    "gelu_new": lambda x: torch.ops.aten.gelu_(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: torch.ops.aten.gelu_(x, approximate="tanh"),
    "relu": torch.relu_,
}


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    # RoBERTa numbers positions from padding_idx + 1; BERT from 0.
    position_offset: int = 0

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> BertConfig:
        kind = cfg.get("position_embedding_type", "absolute")
        if kind != "absolute":
            raise ModelLoadError(f"position_embedding_type {kind!r} is not supported (only 'absolute')")
        act = cfg.get("hidden_act", "gelu")
        if act not in _ACTIVATIONS:
            raise ModelLoadError(f"hidden_act {act!r} is not supported; known: {sorted(_ACTIVATIONS)}")
        pad = cfg.get("pad_token_id")
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"],
            intermediate_size=cfg["intermediate_size"],
            max_position_embeddings=cfg["max_position_embeddings"],
            type_vocab_size=cfg.get("type_vocab_size", 2),
            hidden_act=act,
            layer_norm_eps=cfg.get("layer_norm_eps", 1e-12),
            pad_token_id=0 if pad is None else pad,
            position_offset=cls._position_offset(0 if pad is None else pad),
        )

    @staticmethod
    def _position_offset(pad_token_id: int) -> int:
        return 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_model_len(self) -> int:
        return self.max_position_embeddings - self.position_offset


@dataclass(frozen=True)
class RobertaConfig(BertConfig):
    """RoBERTa / XLM-R: positions start at padding_idx + 1 (HF create_position_ids_from_input_ids)."""

    @staticmethod
    def _position_offset(pad_token_id: int) -> int:
        return pad_token_id + 1


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        # DistilBERT has no token types (type_vocab_size 0)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size) \
            if config.type_vocab_size else None
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.position_offset = config.position_offset

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, token_type_ids: torch.Tensor | None
    ) -> torch.Tensor:
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions + self.position_offset)
        if self.token_type_embeddings is not None:  # without token types, HF's default: every token is type 0
            types = self.token_type_embeddings
            x = x + (types.weight[0] if token_type_ids is None else types(token_type_ids))
        return self.LayerNorm(x)  # (T, H)


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.query = nn.Linear(h, h)
        self.key = nn.Linear(h, h)
        self.value = nn.Linear(h, h)
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.qkv: nn.Linear | None = None  # set by merge_projections after loading

    def merge_projections(self) -> None:
        """HF's checkpoint keeps query/key/value apart; one GEMM for all three reads x once and
        runs one bias pass."""
        self.qkv = merged_linear(self.query, self.key, self.value)
        del self.query, self.key, self.value

    def forward(self, x: torch.Tensor, ctx: ForwardContext, layer_idx: int) -> torch.Tensor:
        t = x.shape[0]
        assert self.qkv is not None, "merge_projections() runs after loading"
        qkv = self.qkv(x).view(t, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(1)  # (T, nh, hs) strided views, no copies
        return ctx.attend(layer_idx, q, k, v, self.scale).reshape(t, -1)  # (T, H)


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, attn: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(attn).add_(residual))  # in place: the GEMM output is fresh


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(config)  # HF's name: keys are attention.self.query...
        self.output = BertSelfOutput(config)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, layer_idx: int) -> torch.Tensor:
        return self.output(self.self(x, ctx, layer_idx), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = _ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dense(x)
        # autograd needs GELU's input for its backward: in place only when nothing records
        return self.act(h) if not h.requires_grad else self.act(h.clone())


class BertOutput(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x).add_(residual))  # in place: the GEMM output is fresh


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, layer_idx: int) -> torch.Tensor:
        x = self.attention(x, ctx, layer_idx)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))


class BertModel(nn.Module):
    """BERT / MiniLM encoder: flat token ids in, final hidden states out (no pooler)."""

    config_class: type[BertConfig] = BertConfig
    # prefixes of task checkpoints (BertForMaskedLM, RobertaForSequenceClassification, ...)
    _prefixes = ("bert.", "roberta.")
    # heads and poolers that an embedding model does not use
    _unused = ("pooler.", "cls.", "lm_head.", "classifier.", "qa_outputs.")

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)

    def forward(
        self,
        input_ids: torch.Tensor,  # (T,)
        positions: torch.Tensor,  # (T,) 0-based position within each sequence
        ctx: ForwardContext,
        token_type_ids: torch.Tensor | None = None,  # (T,)
    ) -> torch.Tensor:
        x = self.embeddings(input_ids, positions, token_type_ids)
        for i, layer in enumerate(self.encoder.layer):
            x = layer(x, ctx, i)
        return x  # (T, H)

    def after_load(self) -> None:
        for layer in self.encoder.layer:
            layer.attention.self.merge_projections()

    @property
    def kv_cache_spec(self) -> KVCacheSpec:
        # Encoders attend within the batch and write no cache: zero layers, so nothing is allocated.
        return KVCacheSpec(num_layers=0, num_kv_heads=self.config.num_attention_heads, head_dim=self.config.head_dim)

    @classmethod
    def rename_weight(cls, name: str) -> str | None:
        """Checkpoint key -> module key; None for keys an embedding model ignores."""
        for prefix in cls._prefixes:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        if name.startswith(cls._unused) or name.endswith(("position_ids", "token_type_ids")):
            return None  # old checkpoints save these buffers; they are arange/zeros
        return name

    @classmethod
    def optional_weight(cls, name: str) -> bool:
        return False

    @classmethod
    def extra_info(cls, folder: str | Path, config: dict[str, Any]) -> dict[str, Any]:
        """ModelInfo fields from sentence-transformers files: pooling, normalize, max_model_len."""
        folder = Path(folder)
        try:
            pooling = PoolingConfig.from_folder(folder)
        except PoolingConfigError as e:
            raise ModelLoadError(str(e)) from e
        return {"pooling": pooling.name, "normalize": pooling.normalize,
                "max_model_len": cls.folder_max_model_len(folder, config)}

    @classmethod
    def folder_max_model_len(cls, folder: Path, config: dict[str, Any]) -> int:
        """The position table's length, or sentence-transformers' max_seq_length where it is lower."""
        max_len = cls.config_class.from_hf(config).max_model_len
        st_config = folder / "sentence_bert_config.json"
        if st_config.exists():  # sentence-transformers truncates here, often below the position table
            max_seq = json.loads(st_config.read_text(encoding="utf-8")).get("max_seq_length")
            if max_seq:
                max_len = min(max_len, int(max_seq))
        return max_len


class RobertaModel(BertModel):
    """RoBERTa / XLM-R: BERT blocks with positions offset by padding_idx + 1."""

    config_class = RobertaConfig


"""T5 / T5 v1.1 / FLAN-T5 encoder-decoder, with HF attribute names so checkpoint keys load unchanged.

Same encoder-decoder interface as models/marian.py (encode / cross_kv / decode / compute_logits;
see its module docstring). T5 has no position embeddings: a learned relative-position bias, owned
by the first block of each stack and shared by all its blocks, is handed to the attention backend
as a `RelativePositionBias` (bidirectional in the encoder, causal in decoder self-attention; the
backend derives positions from the metadata, so `positions` is unused). Attention is unscaled.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention.metadata import RelativePositionBias
from engine.forward_context import ForwardContext
from engine.greedy_screen import GreedyScreen
from engine.workspace import Workspace
from models.encdec_tokenizer import JsonTokenizer, T5Tokenizer, translation_info
from models.layers import tied_head, vocab_logits
from models.spec import KVCacheSpec

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
}


@dataclass(frozen=True)
class T5Config:
    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_decoder_layers: int
    num_heads: int
    relative_attention_num_buckets: int
    relative_attention_max_distance: int
    layer_norm_epsilon: float
    is_gated_act: bool
    dense_act_fn: str
    tie_word_embeddings: bool  # lm_head shares `shared.weight`
    scale_decoder_outputs: bool  # multiply decoder output by d_model**-0.5 before the head
    pad_token_id: int
    eos_token_id: int
    decoder_start_token_id: int
    max_model_len: int

    @classmethod
    def from_hf(cls, cfg: dict) -> T5Config:
        proj = cfg.get("feed_forward_proj", "relu")
        parts = proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(f"unsupported T5 feed_forward_proj {proj!r}")
        act = "gelu_new" if proj == "gated-gelu" else parts[-1]  # HF's backward-compatible mapping
        if act not in ACTIVATIONS:
            raise ValueError(f"unsupported T5 activation {act!r}")
        tie = cfg.get("tie_word_embeddings", True)
        eos = cfg.get("eos_token_id", 1)
        pad = cfg.get("pad_token_id", 0)
        return cls(
            vocab_size=cfg["vocab_size"],
            d_model=cfg["d_model"],
            d_kv=cfg["d_kv"],
            d_ff=cfg["d_ff"],
            num_layers=cfg["num_layers"],
            num_decoder_layers=cfg.get("num_decoder_layers") or cfg["num_layers"],
            num_heads=cfg["num_heads"],
            relative_attention_num_buckets=cfg.get("relative_attention_num_buckets", 32),
            relative_attention_max_distance=cfg.get("relative_attention_max_distance", 128),
            layer_norm_epsilon=cfg.get("layer_norm_epsilon", 1e-6),
            is_gated_act=parts[0] == "gated",
            dense_act_fn=act,
            tie_word_embeddings=tie,
            # transformers >= 5 writes scale_decoder_outputs (and always tie=True); older configs
            # signal v1.1 (no rescale, separate head) with tie_word_embeddings=False
            scale_decoder_outputs=cfg.get("scale_decoder_outputs", tie),
            pad_token_id=pad,
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
            decoder_start_token_id=cfg.get("decoder_start_token_id", pad),
            max_model_len=cfg.get("n_positions", 512),
        )


class T5LayerNorm(nn.Module):
    """RMS norm without mean subtraction or bias; statistics in float32."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x32.to(self.weight.dtype)


class T5Attention(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool) -> None:
        super().__init__()
        self.n_heads, self.d_kv = config.num_heads, config.d_kv
        inner = config.num_heads * config.d_kv
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], self.n_heads, self.d_kv)  # (T, H, D)

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._heads(self.k(x)), self._heads(self.v(x))

    def forward(
        self, x: torch.Tensor, ctx: ForwardContext, layer_idx: int, bias: RelativePositionBias
    ) -> torch.Tensor:
        k, v = self.project_kv(x)
        # T5 folds 1/sqrt(d) into its initialisation: scale 1.0
        return self.o(ctx.attend(layer_idx, self._heads(self.q(x)), k, v, 1.0, bias).flatten(1))

    def cross(self, x: torch.Tensor, ctx: ForwardContext, layer_idx: int) -> torch.Tensor:
        return self.o(ctx.attend_cross(layer_idx, self._heads(self.q(x)), 1.0).flatten(1))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool) -> None:
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def forward(
        self, x: torch.Tensor, ctx: ForwardContext, layer_idx: int, bias: RelativePositionBias
    ) -> torch.Tensor:
        return x + self.SelfAttention(self.layer_norm(x), ctx, layer_idx, bias)


class T5LayerCrossAttention(nn.Module):
    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.EncDecAttention = T5Attention(config, has_relative_attention_bias=False)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, layer_idx: int) -> torch.Tensor:
        return x + self.EncDecAttention.cross(self.layer_norm(x), ctx, layer_idx)


class T5DenseActDense(nn.Module):
    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.act = ACTIVATIONS[config.dense_act_fn]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(self.act(self.wi(x)))


class T5DenseGatedActDense(nn.Module):
    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.act = ACTIVATIONS[config.dense_act_fn]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(self.act(self.wi_0(x)) * self.wi_1(x))


class T5LayerFF(nn.Module):
    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(config) if config.is_gated_act else T5DenseActDense(config)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    """layer[0] self-attention, (decoder) layer[1] cross-attention, layer[-1] feed-forward; pre-norm."""

    def __init__(self, config: T5Config, is_decoder: bool, has_relative_attention_bias: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = [T5LayerSelfAttention(config, has_relative_attention_bias)]
        if is_decoder:
            layers.append(T5LayerCrossAttention(config))
        layers.append(T5LayerFF(config))
        self.layer = nn.ModuleList(layers)


class T5Stack(nn.Module):
    def __init__(self, config: T5Config, is_decoder: bool) -> None:
        super().__init__()
        n = config.num_decoder_layers if is_decoder else config.num_layers
        self.block = nn.ModuleList(T5Block(config, is_decoder, i == 0) for i in range(n))
        self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.bidirectional = not is_decoder
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance

    def position_bias(self) -> RelativePositionBias:
        weight = self.block[0].layer[0].SelfAttention.relative_attention_bias.weight
        return RelativePositionBias(weight, self.bidirectional, self.num_buckets, self.max_distance)


class T5ForConditionalGeneration(nn.Module):
    """T5 translation/seq2seq model. `shared` embeds both stacks; the head is `shared` (tied,
    v1.0: output rescaled by d_model**-0.5) or its own `lm_head` (v1.1 / FLAN). See module docstring.
    """

    config_class = T5Config

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, is_decoder=False)
        self.decoder = T5Stack(config, is_decoder=True)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.greedy_screen: GreedyScreen | None = None  # compute_logits' argmax, set by after_load where it pays

    # ---- encoder-decoder API ----
    def encode(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = self.shared(input_ids)
        bias = self.encoder.position_bias()
        for i, block in enumerate(self.encoder.block):
            x = block.layer[0](x, ctx, i, bias)
            x = block.layer[-1](x)
        return self.encoder.final_layer_norm(x)

    def cross_kv(self, encoder_hidden: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [b.layer[1].EncDecAttention.project_kv(encoder_hidden) for b in self.decoder.block]

    def decode(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        self_ctx: ForwardContext,
        cross_ctx: ForwardContext,
    ) -> torch.Tensor:
        x = self.shared(input_ids)
        bias = self.decoder.position_bias()
        for i, block in enumerate(self.decoder.block):
            x = block.layer[0](x, self_ctx, i, bias)
            x = block.layer[1](x, cross_ctx, i)
            x = block.layer[2](x)
        return self.decoder.final_layer_norm(x)

    @property
    def output_scale(self) -> float | None:
        """What the decoder output is multiplied by before the head (T5 v1.0), or None."""
        return self.config.d_model**-0.5 if self.config.scale_decoder_outputs else None

    def compute_logits(self, hidden: torch.Tensor, workspace: Workspace | None = None) -> torch.Tensor:
        if self.output_scale is not None:
            hidden = hidden * self.output_scale
        return vocab_logits(hidden, self.lm_head, workspace=workspace)

    def after_load(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head = tied_head(self.shared)
        self.greedy_screen = GreedyScreen.build(self.lm_head.weight, input_scale=self.output_scale)

    @property
    def num_decoder_layers(self) -> int:
        return self.config.num_decoder_layers

    @property
    def kv_cache_spec(self) -> KVCacheSpec:
        return KVCacheSpec(self.config.num_decoder_layers, self.config.num_heads, self.config.d_kv)

    # ---- loader hooks ----
    def rename_weight(self, name: str) -> str | None:
        """Checkpoint key -> module key; None for keys we know and do not load."""
        if name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            return "shared.weight"  # aliases of the shared table in older checkpoints
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            return None
        if name == "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight":
            return None  # present in some checkpoints, never used (HF ignores it too)
        return name

    def optional_weight(self, name: str) -> bool:
        return False

    # ---- folder metadata ----
    @classmethod
    def load_tokenizer(cls, folder: str | Path) -> T5Tokenizer | JsonTokenizer:
        return T5Tokenizer.from_folder(folder)

    @classmethod
    def extra_info(cls, folder: str | Path, config: dict | T5Config) -> dict:
        """ModelInfo fields read from config.json (raw dict or parsed) and generation_config.json."""
        cfg = config if isinstance(config, T5Config) else T5Config.from_hf(config)
        return translation_info(folder, config, cfg, cfg.max_model_len)

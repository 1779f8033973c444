"""MarianMT (Helsinki-NLP opus-mt), M2M100 / NLLB-200, mBART-50, BART and Pegasus encoder-decoders, with
HF attribute names so checkpoint keys load unchanged. M2M100 (NLLB's architecture) is Marian's blocks with
the norms first (pre-LN, plus a final norm after each stack), fairseq's sinusoidal positions and no logits
bias; mBART is pre-LN too, with learned positions (offset by 2) and a LayerNorm over the embeddings;
BART (bart-large-cnn, distilbart) is Marian's post-LN blocks with mBART's positions and embedding norm;
Pegasus (pegasus-xsum, pegasus-cnn_dailymail) is pre-LN with Marian's own sinusoids.

Encoder-decoder interface (shared with models/t5.py; the engine drives it, flat batches, no batch dim):
  encode(input_ids (T,), positions (T,), ctx) -> encoder hidden (T, d_model)
      bidirectional self-attention, `ctx.meta.causal == False`, `ctx.kv_caches is None`.
  cross_kv(encoder_hidden (T, d_model)) -> [(k (T, H, D), v (T, H, D))] per decoder layer
      computed once per request; the engine writes them into the request's cross-attention blocks.
  decode(input_ids (T,), positions (T,), self_ctx, cross_ctx) -> hidden (T, d_model)
      self-attention through `self_ctx.attend` (causal; paged self-attention cache in the engine);
      cross-attention through `cross_ctx.attend_cross`, which reads the cross K/V already in
      `cross_ctx.kv_caches[layer]` and writes nothing (`cross_ctx.meta`: same query_lens as
      self_ctx, seq_lens = encoder lengths, causal=False).
  compute_logits(hidden (N, d_model), workspace=None) -> (N, vocab) float32.
  greedy_screen: GreedyScreen | None; where set, greedy_screen.argmax(hidden, bans) -> (N,) int64 is
      the argmax of compute_logits with each row's banned tokens excluded (engine/greedy_screen.py).
`positions` are 0-based within each sequence (decoder: the token's index in the target prefix).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.forward_context import ForwardContext
from engine.greedy_screen import GreedyScreen
from engine.workspace import Workspace
from models.encdec_tokenizer import JsonTokenizer, LanguageCodeTokenizer, MarianTokenizer, translation_info
from models.layers import merged_linear, tied_head, vocab_logits
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
class MarianConfig:
    vocab_size: int
    decoder_vocab_size: int
    d_model: int
    encoder_layers: int
    decoder_layers: int
    encoder_attention_heads: int
    decoder_attention_heads: int
    encoder_ffn_dim: int
    decoder_ffn_dim: int
    max_position_embeddings: int
    activation_function: str
    scale_embedding: bool
    share_encoder_decoder_embeddings: bool
    tie_word_embeddings: bool
    pad_token_id: int
    decoder_start_token_id: int
    eos_token_id: int
    pre_norm: bool = False  # M2M100, mBART, Pegasus: x + f(LN(x)), a LayerNorm after each stack; Marian, BART: LN(x + f(x))
    # "sinusoidal": Marian's [sin | cos] table (Marian, Pegasus); "fairseq": M2M100's, offset past the
    # pad row; "learned": embed_positions rows 2.. (HF's offset) and an embedding LayerNorm (mBART, BART)
    positions: str = "sinusoidal"

    @classmethod
    def from_hf(cls, cfg: dict) -> MarianConfig:
        if cfg.get("activation_function", "gelu") not in ACTIVATIONS:
            raise ValueError(f"unsupported Marian activation_function {cfg['activation_function']!r}")
        archs = cfg.get("architectures") or []
        m2m = cfg.get("model_type") == "m2m_100" or "M2M100ForConditionalGeneration" in archs
        mbart = cfg.get("model_type") == "mbart" or "MBartForConditionalGeneration" in archs
        bart = cfg.get("model_type") == "bart" or "BartForConditionalGeneration" in archs
        pegasus = cfg.get("model_type") == "pegasus" or "PegasusForConditionalGeneration" in archs
        pad = cfg.get("pad_token_id", 58100)
        eos = cfg.get("eos_token_id", 0)
        return cls(
            vocab_size=cfg["vocab_size"],
            decoder_vocab_size=cfg.get("decoder_vocab_size") or cfg["vocab_size"],
            d_model=cfg["d_model"],
            encoder_layers=cfg["encoder_layers"],
            decoder_layers=cfg["decoder_layers"],
            encoder_attention_heads=cfg["encoder_attention_heads"],
            decoder_attention_heads=cfg["decoder_attention_heads"],
            encoder_ffn_dim=cfg["encoder_ffn_dim"],
            decoder_ffn_dim=cfg["decoder_ffn_dim"],
            max_position_embeddings=cfg.get("max_position_embeddings", 1024),
            activation_function=cfg.get("activation_function", "gelu"),
            scale_embedding=cfg.get("scale_embedding", False),
            share_encoder_decoder_embeddings=cfg.get("share_encoder_decoder_embeddings", True),
            tie_word_embeddings=cfg.get("tie_word_embeddings", True),
            pad_token_id=pad,
            decoder_start_token_id=cfg.get("decoder_start_token_id", pad),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
            pre_norm=m2m or mbart or pegasus,
            positions="learned" if mbart or bart else "fairseq" if m2m else "sinusoidal",
        )

    @property
    def learned_positions(self) -> bool:
        return self.positions == "learned"

    @property
    def target_vocab_size(self) -> int:
        return self.vocab_size if self.share_encoder_decoder_embeddings else self.decoder_vocab_size

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.d_model) if self.scale_embedding else 1.0


def sinusoidal_positions(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """HF MarianSinusoidalPositionalEmbedding rows for `positions`: sin features first, cos second.

    Computed on the fly in float64 (HF builds its table in numpy float64), so there is no buffer
    to load, and any position works.
    """
    j = torch.arange(dim, device=positions.device, dtype=torch.float64)
    angles = positions.to(torch.float64)[:, None] / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / dim)
    return torch.cat([angles[:, 0::2].sin(), angles[:, 1::2].cos()], dim=-1)


def fairseq_positions(positions: torch.Tensor, dim: int, padding_idx: int) -> torch.Tensor:
    """HF M2M100SinusoidalPositionalEmbedding rows: token i of a sequence without padding sits at
    row padding_idx + 1 + i of a [sin | cos] table with frequencies 10000^(-j / (dim/2 - 1)), built
    with the same fp32 ops as HF's table, on the fly (any position works, nothing to load)."""
    half = dim // 2
    step = math.log(10000) / (half - 1)
    freq = torch.exp(torch.arange(half, dtype=torch.int64, device=positions.device).float() * -step)
    angles = (positions + padding_idx + 1).float()[:, None] * freq[None, :]
    rows = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return torch.cat([rows, rows.new_zeros(rows.shape[0], 1)], dim=1) if dim % 2 else rows


class MarianAttention(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scaling = self.head_dim**-0.5
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.qkv_proj: nn.Linear | None = None  # set by merge_projections() after loading
        self.kv_proj: nn.Linear | None = None

    def merge_projections(self, with_query: bool) -> None:
        """Checkpoints keep HF's separate k/v (and q) weights; one wider matmul runs faster (on CPU
        three 512-wide GEMMs cost ~20 % more than one 1536-wide). Cross-attention keeps q apart:
        its k/v read the encoder output, its q the decoder's."""
        if with_query:
            self.qkv_proj = merged_linear(self.q_proj, self.k_proj, self.v_proj)
            del self.q_proj
        else:
            self.kv_proj = merged_linear(self.k_proj, self.v_proj)
        del self.k_proj, self.v_proj

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], self.num_heads, self.head_dim)  # (T, H, D)

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kv_proj is not None:
            k, v = self.kv_proj(x).chunk(2, dim=-1)
            return self._heads(k), self._heads(v)
        return self._heads(self.k_proj(x)), self._heads(self.v_proj(x))

    def forward(self, x: torch.Tensor, ctx: ForwardContext, layer_idx: int) -> torch.Tensor:
        if self.qkv_proj is not None:
            q, k, v = (self._heads(t) for t in self.qkv_proj(x).chunk(3, dim=-1))
        else:
            q, k, v = self._heads(self.q_proj(x)), *self.project_kv(x)
        out = ctx.attend(layer_idx, q, k, v, self.scaling)
        return self.out_proj(out.flatten(1))

    def cross(self, x: torch.Tensor, ctx: ForwardContext, layer_idx: int) -> torch.Tensor:
        out = ctx.attend_cross(layer_idx, self._heads(self.q_proj(x)), self.scaling)
        return self.out_proj(out.flatten(1))


class MarianEncoderLayer(nn.Module):
    """Post-LN block: x = LN(x + attn(x)); x = LN(x + ffn(x)). Pre-LN (M2M100): x + attn(LN(x)), ..."""

    def __init__(self, config: MarianConfig) -> None:
        super().__init__()
        d = config.d_model
        self.self_attn = MarianAttention(d, config.encoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, config.encoder_ffn_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.act = ACTIVATIONS[config.activation_function]
        self.pre_norm = config.pre_norm

    def forward(self, x: torch.Tensor, ctx: ForwardContext, layer_idx: int) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.self_attn(self.self_attn_layer_norm(x), ctx, layer_idx)
            return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))
        x = self.self_attn_layer_norm(x + self.self_attn(x, ctx, layer_idx))
        return self.final_layer_norm(x + self.fc2(self.act(self.fc1(x))))


class MarianDecoderLayer(nn.Module):
    def __init__(self, config: MarianConfig) -> None:
        super().__init__()
        d = config.d_model
        self.self_attn = MarianAttention(d, config.decoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.encoder_attn = MarianAttention(d, config.decoder_attention_heads)
        self.encoder_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, config.decoder_ffn_dim)
        self.fc2 = nn.Linear(config.decoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.act = ACTIVATIONS[config.activation_function]
        self.pre_norm = config.pre_norm

    def forward(
        self, x: torch.Tensor, self_ctx: ForwardContext, cross_ctx: ForwardContext, layer_idx: int
    ) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.self_attn(self.self_attn_layer_norm(x), self_ctx, layer_idx)
            x = x + self.encoder_attn.cross(self.encoder_attn_layer_norm(x), cross_ctx, layer_idx)
            return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))
        x = self.self_attn_layer_norm(x + self.self_attn(x, self_ctx, layer_idx))
        x = self.encoder_attn_layer_norm(x + self.encoder_attn.cross(x, cross_ctx, layer_idx))
        return self.final_layer_norm(x + self.fc2(self.act(self.fc1(x))))


def add_stack_extras(stack: nn.Module, config: MarianConfig) -> None:
    """What an encoder or decoder stack holds beside its layers: the final `layer_norm` of pre-LN
    models (M2M100, mBART), and (m)BART's position table (2 rows of offset first, as HF keeps them)
    and embedding norm."""
    stack.layer_norm = nn.LayerNorm(config.d_model) if config.pre_norm else None
    stack.embed_positions = stack.layernorm_embedding = None
    if config.learned_positions:
        stack.embed_positions = nn.Embedding(config.max_position_embeddings + 2, config.d_model)
        stack.layernorm_embedding = nn.LayerNorm(config.d_model)


class MarianEncoder(nn.Module):
    def __init__(self, config: MarianConfig) -> None:
        super().__init__()
        if not config.share_encoder_decoder_embeddings:
            self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(MarianEncoderLayer(config) for _ in range(config.encoder_layers))
        add_stack_extras(self, config)


class MarianDecoder(nn.Module):
    def __init__(self, config: MarianConfig) -> None:
        super().__init__()
        if not config.share_encoder_decoder_embeddings:
            self.embed_tokens = nn.Embedding(config.decoder_vocab_size, config.d_model)
        self.layers = nn.ModuleList(MarianDecoderLayer(config) for _ in range(config.decoder_layers))
        add_stack_extras(self, config)


class MarianModel(nn.Module):
    def __init__(self, config: MarianConfig) -> None:
        super().__init__()
        if config.share_encoder_decoder_embeddings:
            self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = MarianEncoder(config)
        self.decoder = MarianDecoder(config)


class MarianMTModel(nn.Module):
    """Marian translation model: post-LN transformer, sinusoidal positions, `final_logits_bias`.

    Embeddings are registered once: `model.shared` when encoder and decoder share them, else
    `model.{encoder,decoder}.embed_tokens`; the tied LM head reuses the decoder embedding
    (checkpoint aliases are mapped by `rename_weight`). See the module docstring for the API.
    """

    config_class = MarianConfig

    def __init__(self, config: MarianConfig) -> None:
        super().__init__()
        self.config = config
        self.model = MarianModel(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.d_model, config.target_vocab_size, bias=False)
        self.register_buffer("final_logits_bias", torch.zeros(1, config.target_vocab_size))
        self.greedy_screen: GreedyScreen | None = None  # compute_logits' argmax, set by after_load where it pays

    # ---- embeddings ----
    @property
    def encoder_embed(self) -> nn.Embedding:
        m = self.model
        return m.shared if self.config.share_encoder_decoder_embeddings else m.encoder.embed_tokens

    @property
    def decoder_embed(self) -> nn.Embedding:
        m = self.model
        return m.shared if self.config.share_encoder_decoder_embeddings else m.decoder.embed_tokens

    def _embed(self, stack: nn.Module, embed: nn.Embedding, input_ids: torch.Tensor,
               positions: torch.Tensor) -> torch.Tensor:
        c = self.config
        x = embed(input_ids) * c.embed_scale
        if stack.embed_positions is not None:  # (m)BART
            return stack.layernorm_embedding(x + stack.embed_positions(positions + 2))
        if c.positions == "fairseq":  # M2M100's table; a pad token inside a sequence gets HF's zero row only there
            return x + fairseq_positions(positions, c.d_model, c.pad_token_id).to(x.dtype)
        return x + sinusoidal_positions(positions, c.d_model).to(x.dtype)

    # ---- encoder-decoder API ----
    def encode(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = self._embed(self.model.encoder, self.encoder_embed, input_ids, positions)
        for i, layer in enumerate(self.model.encoder.layers):
            x = layer(x, ctx, i)
        norm = self.model.encoder.layer_norm
        return x if norm is None else norm(x)

    def after_load(self) -> None:
        for layer in self.model.encoder.layers:
            layer.self_attn.merge_projections(with_query=True)
        for layer in self.model.decoder.layers:
            layer.self_attn.merge_projections(with_query=True)
            layer.encoder_attn.merge_projections(with_query=False)
        if self.config.tie_word_embeddings:
            self.lm_head = tied_head(self.decoder_embed)
        self.greedy_screen = GreedyScreen.build(self.lm_head.weight, self.final_logits_bias)

    def cross_kv(self, encoder_hidden: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [layer.encoder_attn.project_kv(encoder_hidden) for layer in self.model.decoder.layers]

    def decode(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        self_ctx: ForwardContext,
        cross_ctx: ForwardContext,
    ) -> torch.Tensor:
        x = self._embed(self.model.decoder, self.decoder_embed, input_ids, positions)
        for i, layer in enumerate(self.model.decoder.layers):
            x = layer(x, self_ctx, cross_ctx, i)
        norm = self.model.decoder.layer_norm
        return x if norm is None else norm(x)

    def compute_logits(self, hidden: torch.Tensor, workspace: Workspace | None = None) -> torch.Tensor:
        return vocab_logits(hidden, self.lm_head, self.final_logits_bias.reshape(-1), workspace=workspace)

    @property
    def num_decoder_layers(self) -> int:
        return self.config.decoder_layers

    @property
    def kv_cache_spec(self) -> KVCacheSpec:
        heads = self.config.decoder_attention_heads
        return KVCacheSpec(self.config.decoder_layers, heads, self.config.d_model // heads)

    # ---- loader hooks ----
    def rename_weight(self, name: str) -> str | None:
        """Checkpoint key -> module key; None for keys we know and do not load."""
        if ".embed_positions." in name and not self.config.learned_positions:
            return None  # old checkpoints store the sinusoid table; we compute it
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            return None  # tied to the decoder embedding
        if self.config.share_encoder_decoder_embeddings and name in (
            "model.encoder.embed_tokens.weight",
            "model.decoder.embed_tokens.weight",
        ):
            return "model.shared.weight"  # aliases of the shared table in older checkpoints
        return name

    def optional_weight(self, name: str) -> bool:
        return name == "final_logits_bias"  # HF treats a missing bias as zeros

    # ---- folder metadata ----
    @classmethod
    def load_tokenizer(cls, folder: str | Path) -> MarianTokenizer | JsonTokenizer:
        """Marian's SentencePiece pair; M2M100 / NLLB / mBART-50's tokenizer.json with its language
        codes; BART's (byte-level BPE, `<s> ... </s>`) and Pegasus's (unigram, `... </s>`) as they are."""
        if (Path(folder) / "source.spm").exists():
            return MarianTokenizer.from_folder(folder)
        if not (Path(folder) / "tokenizer.json").exists():
            raise ValueError(f"{folder} has neither Marian's source.spm nor a tokenizer.json (M2M100 or Pegasus "
                             "folders with only SentencePiece files, as facebook/m2m100_418M ships, are not "
                             "supported; HF's fast tokenizer writes tokenizer.json with save_pretrained)")
        return LanguageCodeTokenizer.from_folder(folder)

    @classmethod
    def extra_info(cls, folder: str | Path, config: dict | MarianConfig) -> dict:
        """ModelInfo fields read from config.json (raw dict or parsed) and generation_config.json."""
        cfg = config if isinstance(config, MarianConfig) else MarianConfig.from_hf(config)
        return translation_info(folder, config, cfg, cfg.max_position_embeddings)

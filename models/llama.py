"""LLaMA-family decoder (LLaMA, Mistral, Qwen2, Qwen3, SmolLM2, Gemma, Gemma 2 and 3, Phi-3, Granite, OLMo 2, and the MoE ones:
Mixtral, Qwen2-MoE, Qwen3-MoE): GQA, RMSNorm, gated MLP (dense or routed experts, models/moe.py), rotary
positions; per layer, full or sliding-window attention (engine.attention.metadata.AttentionVariant).

Module names equal HF's (`model.layers.N.self_attn.q_proj`, `lm_head`) so checkpoints load unchanged.
Forward runs over a flat batch of sequences; attention and the KV cache live behind `ctx.attend`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from engine.attention.metadata import AttentionVariant
from engine.forward_context import ForwardContext
from engine.greedy_screen import GreedyScreen
from engine.lora_batch import LoRABatch
from engine import fused
from engine.workspace import Workspace
from models.layers import (ResidualAdd, RMSNorm, RopeConfig, RotaryEmbedding, activation, merged_linear,
                           partial_rotary_permutation, tied_head, vocab_logits)
from models.lora import LoRATarget
from models.moe import MoeConfig, SparseMoeBlock, mixtral_name
from models.spec import KVCacheSpec


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig
    hidden_act: str = "silu"
    local_rope: RopeConfig | None = None  # Gemma 3: the sliding layers' own rotary (rope_local_base_freq)
    rotary_dim: int | None = None  # partial rotary (Phi-4-mini): dims of each head that rotate; None: all
    qkv_bias: bool = False  # Qwen2 always; LLaMA with attention_bias
    o_bias: bool = False  # LLaMA attention_bias covers o_proj too, Qwen2's does not
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # a query sees its last `sliding_window` keys, in `sliding_layers`
    sliding_layers: tuple[int, ...] | None = None  # None: every layer (Mistral, Phi-3)
    qk_norm: bool = False  # Qwen3: RMSNorm over each q and k head before rotary
    moe: MoeConfig | None = None  # routed experts in place of the dense MLP (Mixtral, Qwen2-MoE, Qwen3-MoE)
    merged_checkpoint: bool = False  # Phi-3 saves qkv_proj and gate_up_proj already merged
    embed_scale: float | None = None  # Gemma scales the embeddings by sqrt(hidden_size)
    norm_plus_one: bool = False  # Gemma's RMSNorm multiplies by (1 + weight); folded into the weight on load
    sandwich_norms: bool = False  # Gemma 2: norms after attention and the MLP too (pre/post_feedforward_layernorm)
    post_norms_only: bool = False  # OLMo 2: attention and MLP read the raw stream; their outputs are normed
    qk_norm_full: bool = False  # OLMo 2: q_norm / k_norm over all heads' dims at once, not per head
    # EmbeddingGemma: attention without causality; a sliding layer then sees sliding_window // 2 keys either side
    bidirectional: bool = False
    query_scale: float | None = None  # Gemma 2's query_pre_attn_scalar ** -0.5 in place of head_dim ** -0.5
    attn_softcap: float | None = None  # Gemma 2: attention scores soft-capped (attn_logit_softcapping)
    final_softcap: float | None = None  # Gemma 2: logits soft-capped (final_logit_softcapping)
    # Granite's scalars: embeddings times embedding_multiplier (a Python float, unlike Gemma's cast scale),
    # attention and MLP outputs times residual_multiplier before they join the residual, logits / logits_scaling
    embedding_multiplier: float | None = None
    residual_multiplier: float | None = None
    logits_scaling: float | None = None

    def window(self, layer_idx: int) -> int | None:
        """The layer's sliding window, or None for full attention."""
        if self.sliding_layers is not None and layer_idx not in self.sliding_layers:
            return None
        return self.sliding_window

    @classmethod
    def from_hf(cls, config: dict) -> LlamaConfig:
        heads = config["num_attention_heads"]
        archs = config.get("architectures") or []
        model_type = config.get("model_type")
        is_qwen2 = model_type == "qwen2" or "Qwen2ForCausalLM" in archs
        is_qwen2_moe = model_type == "qwen2_moe" or "Qwen2MoeForCausalLM" in archs
        is_qwen3 = model_type in ("qwen3", "qwen3_moe") or bool({"Qwen3ForCausalLM", "Qwen3MoeForCausalLM"} & set(archs))
        is_gemma3 = model_type == "gemma3_text" or "Gemma3ForCausalLM" in archs
        is_gemma2 = is_gemma3 or model_type == "gemma2" or "Gemma2ForCausalLM" in archs  # Gemma 3 builds on 2
        is_gemma = is_gemma2 or model_type == "gemma" or "GemmaForCausalLM" in archs
        is_phi3 = model_type == "phi3" or "Phi3ForCausalLM" in archs
        is_granite = model_type == "granite" or "GraniteForCausalLM" in archs
        is_olmo2 = model_type == "olmo2" or "Olmo2ForCausalLM" in archs
        # Gemma names its activation hidden_activation; its older configs say "gelu" and mean the tanh form
        act = (config.get("hidden_activation") or "gelu_pytorch_tanh") if is_gemma else config.get("hidden_act", "silu")
        attention_bias = bool(config.get("attention_bias", False))
        sliding = config.get("sliding_window")
        if (is_qwen2 or is_qwen2_moe or is_qwen3) and not config.get("use_sliding_window", False):
            sliding = None  # Qwen configs carry a window they do not use
        sliding_layers = None
        if sliding is not None:
            sliding_layers = _sliding_layers(config, is_gemma2, is_gemma3, is_qwen2 or is_qwen2_moe or is_qwen3)
        pre_attn = config.get("query_pre_attn_scalar") if is_gemma2 else None
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            max_position_embeddings=config.get("max_position_embeddings", 2048),
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope=_gemma3_rope(config, "full_attention") if is_gemma3 else RopeConfig.from_hf(config),
            local_rope=_gemma3_rope(config, "sliding_attention") if is_gemma3 else None,
            rotary_dim=_rotary_dim(config, heads),
            hidden_act=act,
            qkv_bias=is_qwen2 or (is_qwen2_moe and bool(config.get("qkv_bias", True))) or attention_bias,
            o_bias=attention_bias and not (is_qwen2 or is_qwen2_moe),
            mlp_bias=bool(config.get("mlp_bias", False)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", is_gemma)),  # Gemma's configs tie by default
            sliding_window=sliding,
            sliding_layers=sliding_layers,
            qk_norm=is_qwen3 or is_gemma3 or is_olmo2,
            qk_norm_full=is_olmo2,
            post_norms_only=is_olmo2,
            bidirectional=bool(config.get("use_bidirectional_attention")),
            moe=MoeConfig.from_hf(config),
            merged_checkpoint=is_phi3,
            embed_scale=config["hidden_size"] ** 0.5 if is_gemma else None,
            norm_plus_one=is_gemma,
            sandwich_norms=is_gemma2,
            query_scale=pre_attn**-0.5 if pre_attn else (config.get("attention_multiplier") if is_granite else None),
            attn_softcap=config.get("attn_logit_softcapping") if is_gemma2 else None,
            final_softcap=config.get("final_logit_softcapping") if is_gemma2 else None,
            embedding_multiplier=_granite(config, "embedding_multiplier", is_granite),
            residual_multiplier=_granite(config, "residual_multiplier", is_granite),
            logits_scaling=_granite(config, "logits_scaling", is_granite),
        )


def _rotary_dim(config: dict, heads: int) -> int | None:
    """int(head_dim * partial_rotary_factor), as HF's rope init takes it (top-level or in rope_parameters)."""
    factor = config.get("partial_rotary_factor") or (config.get("rope_parameters") or {}).get("partial_rotary_factor")
    if not factor or factor == 1.0:
        return None
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    dim = int(head_dim * factor)
    if dim % 2 or not 0 < dim <= head_dim:
        raise ValueError(f"partial_rotary_factor {factor} gives {dim} rotary dims of {head_dim}: need an even count")
    return None if dim == head_dim else dim


def _granite(config: dict, key: str, is_granite: bool) -> float | None:
    """One of Granite's scalars, None where it is 1 (or the model is no Granite): nothing to do."""
    value = config.get(key, 1.0) if is_granite else 1.0
    return None if value == 1.0 else float(value)


def _gemma3_rope(config: dict, layer_type: str) -> RopeConfig:
    """Gemma 3's rotary for one layer type: v5 configs nest rope_parameters by type; older ones give
    the full layers rope_theta and rope_scaling, the sliding layers rope_local_base_freq alone."""
    nested = config.get("rope_parameters") or {}
    if layer_type in nested:
        return RopeConfig.from_hf({"rope_parameters": nested[layer_type]})
    if layer_type == "full_attention":
        return RopeConfig.from_hf({"rope_theta": config.get("rope_theta", 1_000_000.0),
                                   "rope_scaling": config.get("rope_scaling")})
    return RopeConfig(theta=float(config.get("rope_local_base_freq", 10_000.0)))


def _sliding_layers(config: dict, is_gemma2: bool, is_gemma3: bool, is_qwen: bool) -> tuple[int, ...] | None:
    """Which layers slide, as transformers decides: its `layer_types` where the config lists them;
    else Gemma 3's all but every sliding_window_pattern-th, Gemma 2's even layers, Qwen's layers
    from max_window_layers on, every layer otherwise."""
    n = config["num_hidden_layers"]
    types = config.get("layer_types")
    if types is not None:
        unknown = set(types) - {"sliding_attention", "full_attention"}
        if unknown:
            raise ValueError(f"unsupported layer_types {sorted(unknown)}")
        return tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    if is_gemma3:
        pattern = config.get("sliding_window_pattern") or 6
        return tuple(i for i in range(n) if (i + 1) % pattern)
    if is_gemma2:
        return tuple(range(0, n, 2))
    if is_qwen:
        return tuple(range(config.get("max_window_layers", n), n))
    return None


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = d = config.head_dim
        self.scale = config.query_scale or d**-0.5
        window = config.window(layer_idx)
        if config.bidirectional and window is not None:  # HF's bidirectional overlay: |q - k| < window // 2 + 1
            self.variant: AttentionVariant | None = AttentionVariant(softcap=config.attn_softcap, radius=window // 2)
        elif window is not None or config.attn_softcap is not None:
            self.variant = AttentionVariant(window, config.attn_softcap)
        else:
            self.variant = None
        h = config.hidden_size
        self.qkv_proj: nn.Linear | None = None  # set by merge_projections() after loading
        if config.merged_checkpoint:
            self.qkv_proj = nn.Linear(h, (self.num_heads + 2 * self.num_kv_heads) * d, bias=config.qkv_bias)
        else:
            self.q_proj = nn.Linear(h, self.num_heads * d, bias=config.qkv_bias)
            self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=config.qkv_bias)
            self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=config.o_bias)
        width_q, width_k = (self.num_heads * d, self.num_kv_heads * d) if config.qk_norm_full else (d, d)
        self.q_norm = RMSNorm(width_q, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(width_k, config.rms_norm_eps) if config.qk_norm else None
        self.qk_norm_full = config.qk_norm_full

    def merge_projections(self) -> None:
        """q/k/v as one matmul: a third of the launches, and a wider one that uses the GPU better."""
        if self.qkv_proj is not None:  # saved merged
            return
        self.qkv_proj = merged_linear(self.q_proj, self.k_proj, self.v_proj)
        del self.q_proj, self.k_proj, self.v_proj

    @torch.no_grad()
    def permute_heads(self, perm: torch.Tensor) -> None:
        """Reorder the dims of every q and k head (rows of the merged projection, per-head norms) by
        `perm`; v keeps its order, so attention outputs are unchanged."""
        assert self.qkv_proj is not None
        d, hq, hk = self.head_dim, self.num_heads, self.num_kv_heads
        rows = torch.arange(self.qkv_proj.out_features)
        qk = torch.arange(hq + hk)[:, None] * d + perm[None, :]
        rows[: (hq + hk) * d] = qk.flatten()
        self.qkv_proj.weight.copy_(self.qkv_proj.weight[rows])
        if self.qkv_proj.bias is not None:
            self.qkv_proj.bias.copy_(self.qkv_proj.bias[rows])
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                norm.weight.copy_(norm.weight[perm])

    def heads(
        self, qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (T, Hq, D), k, v (T, Hkv, D) from the merged projection's output, q and k normed
        per head (Qwen3) and rotated."""
        q, k, v = fused.split_heads(qkv, self.num_heads, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            if self.qk_norm_full:  # OLMo 2: over each token's whole q (and k) projection
                q = self.q_norm(q.reshape(q.shape[0], -1))[0].view(q.shape)
                k = self.k_norm(k.reshape(k.shape[0], -1))[0].view(k.shape)
            else:
                q, k = self.q_norm(q)[0], self.k_norm(k)[0]
        q, k = fused.rotary(q, k, *rope)
        return q, k, v

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm,
        rope: tuple[torch.Tensor, torch.Tensor], ctx: ForwardContext,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(o_proj(attention), x + residual) with the layer's input norm: norm, merged q/k/v, rotary
        on q and k, attention. Where the step writes the cache, rotary and the K/V write go with
        the q/k/v matmul (on a GPU one launch with the norm too, where that matmul is a GEMV)."""
        t = x.shape[0]
        if ctx.lora is not None:
            return self.forward_lora(x, residual, norm, rope, ctx, ctx.lora)
        # the fused rotary + K/V write has no per-head norm inside, so Qwen3 takes the unfused path
        target = None if self.q_norm is not None else ctx.write_target(self.layer_idx)
        if target is None:
            qkv, residual = norm.then(self.qkv_proj, x, residual)
            q, k, v = self.heads(qkv, rope)
            out = ctx.attend(self.layer_idx, q, k, v, self.scale, variant=self.variant)
        else:
            q, residual = fused.norm_qkv_rotary_store(
                x, residual, norm.weight, norm.variance_epsilon, self.qkv_proj, self.num_heads, self.num_kv_heads,
                *rope, *target,
            )
            out = ctx.attend_stored(self.layer_idx, q, self.scale, self.variant)  # (T, Hq, D)
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim)), residual

    def forward_lora(
        self, x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm,
        rope: tuple[torch.Tensor, torch.Tensor], ctx: ForwardContext, lora: LoRABatch,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` with LoRA deltas on q/k/v and o_proj: unfused, as the deltas need the normed
        input that the fused kernels keep to themselves."""
        h, residual = norm(x, residual)
        qkv = lora.apply(self.layer_idx, "qkv_proj", h, self.qkv_proj(h))
        q, k, v = self.heads(qkv, rope)
        out = ctx.attend(self.layer_idx, q, k, v, self.scale, variant=self.variant)
        out = out.reshape(x.shape[0], self.num_heads * self.head_dim)
        return lora.apply(self.layer_idx, "o_proj", out, self.o_proj(out)), residual


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_up_proj: nn.Linear | None = None  # set by merge_projections() after loading
        if config.merged_checkpoint:
            self.gate_up_proj = nn.Linear(h, 2 * i, bias=config.mlp_bias)
        else:
            self.gate_proj = nn.Linear(h, i, bias=config.mlp_bias)
            self.up_proj = nn.Linear(h, i, bias=config.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=config.mlp_bias)
        self.act = activation(config.hidden_act)
        self.is_silu = config.hidden_act == "silu"
        self.intermediate_size = i

    def merge_projections(self) -> None:
        if self.gate_up_proj is not None:  # saved merged
            return
        self.gate_up_proj = merged_linear(self.gate_proj, self.up_proj)
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """(mlp(norm(x + residual)), x + residual); the norm goes with the merged gate/up matmul,
        which may take it into its own launch."""
        assert self.gate_up_proj is not None, "after_load() merges the projections"
        gate_up, residual = norm.then(self.gate_up_proj, x, residual)
        return self.down(gate_up), residual

    def down(self, gate_up: torch.Tensor) -> torch.Tensor:
        """down_proj(act(gate) * up) from the merged projection's output [gate | up] (T, 2I)."""
        if self.is_silu:
            return fused.silu_mul_linear(gate_up, self.down_proj)
        gate, up = gate_up.split(self.intermediate_size, -1)
        return self.down_proj(self.act(gate) * up)

    def forward_lora(self, x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm, layer_idx: int,
                     lora: LoRABatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(mlp(norm(x + residual)), x + residual) with LoRA deltas on gate/up and down_proj."""
        h, residual = norm(x, residual)
        gate_up = lora.apply(layer_idx, "gate_up_proj", h, self.gate_up_proj(h))
        gate, up = gate_up.split(self.intermediate_size, -1)
        act = self.act(gate) * up
        return lora.apply(layer_idx, "down_proj", act, self.down_proj(act)), residual


_ADD = ResidualAdd()  # stateless (no weights): one serves every OLMo 2 layer


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        moe = config.moe if config.moe is not None and layer_idx not in config.moe.dense_layers else None
        self.mlp = LlamaMLP(config) if moe is None else SparseMoeBlock(config.hidden_size, moe)
        # OLMo 2 norms no input: attention and the MLP read the stream itself (ResidualAdd adds it up)
        self.input_layernorm: RMSNorm | None = None if config.post_norms_only else RMSNorm(config.hidden_size,
                                                                                           config.rms_norm_eps)
        # Gemma 2's and OLMo 2's post_attention_layernorm norms the attention output; Gemma 2's
        # pre_feedforward_layernorm is then the MLP's input norm, which LLaMA calls post_attention_layernorm
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.pre_feedforward_layernorm: RMSNorm | None = None
        self.post_feedforward_layernorm: RMSNorm | None = None
        if config.sandwich_norms:
            self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.sandwich_norms or config.post_norms_only:
            self.post_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_norms_only = config.post_norms_only
        self.residual_multiplier = config.residual_multiplier

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, rope: tuple[torch.Tensor, torch.Tensor], ctx: ForwardContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """HF's `h = x + attn(norm(x)); h + mlp(norm(h))` with the residual stream carried apart,
        so each add fuses into the next norm: returns (mlp output, residual before it). Each norm
        goes with the merged matmul after it, which may take it into its own launch. Gemma 2
        norms the attention and MLP outputs too, Granite scales them, before they join the residual
        (scaled as outputs, not folded into o_proj and down_proj, so LoRA deltas are scaled too)."""
        attn, mlp = self.self_attn, self.mlp
        assert attn.qkv_proj is not None, "after_load() merges the projections"
        h, residual = attn(x, residual, self.input_layernorm or _ADD, rope, ctx)
        if self.residual_multiplier is not None:
            h = h * self.residual_multiplier
        mlp_norm = self.post_attention_layernorm
        if self.pre_feedforward_layernorm is not None or self.post_norms_only:
            h = self.post_attention_layernorm(h)[0]
            mlp_norm = self.pre_feedforward_layernorm or _ADD
        if ctx.lora is not None:
            h, residual = mlp.forward_lora(h, residual, mlp_norm, attn.layer_idx, ctx.lora)
        else:
            h, residual = mlp(h, residual, mlp_norm)
        if self.post_feedforward_layernorm is not None:
            h = self.post_feedforward_layernorm(h)[0]
        if self.residual_multiplier is not None:
            h = h * self.residual_multiplier
        return h, residual


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope, config.rotary_dim)
        self.rotary_dim = config.rotary_dim
        self.rotary_emb_local: RotaryEmbedding | None = None  # Gemma 3's sliding layers
        if config.local_rope is not None:
            self.rotary_emb_local = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.local_rope)
        # the layers that rotate with the local table: a sliding layer, where there is one
        self.local_layers = frozenset(i for i in range(config.num_hidden_layers)
                                      if config.local_rope is not None and config.window(i) is not None)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.embed_scale = config.embed_scale
        self.embedding_multiplier = config.embedding_multiplier
        self.norm_plus_one = config.norm_plus_one

    def after_load(self) -> None:
        """Checkpoints keep HF's separate q/k/v and gate/up weights; serving runs them merged. Gemma's
        (1 + weight) norms become plain ones (HF's product in fp32, exactly, in fp32). Partial rotary
        heads are reordered so whole-head rotary kernels serve them (`partial_rotary_permutation`)."""
        for layer in self.layers:
            layer.self_attn.merge_projections()
            layer.mlp.merge_projections()
            if self.rotary_dim is not None:
                layer.self_attn.permute_heads(partial_rotary_permutation(layer.self_attn.head_dim, self.rotary_dim))
        if self.norm_plus_one:
            with torch.no_grad():
                for norm in self.modules():
                    if isinstance(norm, RMSNorm):
                        norm.weight.add_(1.0)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # (T, H)
        if self.embed_scale is not None:  # HF multiplies by the scale cast to the activations' dtype
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        if self.embedding_multiplier is not None:  # Granite multiplies by the Python float
            x = x * self.embedding_multiplier
        rope = self.rotary_emb(positions)
        local = self.rotary_emb_local(positions) if self.rotary_emb_local is not None else rope
        residual = None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, local if i in self.local_layers else rope, ctx)
        return self.norm(x, residual)[0]


class LlamaForCausalLM(nn.Module):
    """Decoder-only LM over a flat batch: `forward(input_ids (T,), positions (T,), ctx) -> (T, hidden)`.

    With tied embeddings there is no `lm_head` parameter: logits use `embed_tokens.weight`, and a
    checkpoint's redundant `lm_head.weight` is skipped by `rename_weight`.
    """

    config_class = LlamaConfig

    def __init__(self, config: LlamaConfig) -> None:
        if config.bidirectional:  # EmbeddingGemma's body: an embedding model, not a generator
            raise ValueError("a bidirectional config (use_bidirectional_attention) cannot generate; serve its body "
                             "as an embedding model")
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(
            config.hidden_size, config.vocab_size, bias=False
        )
        self.greedy_screen: GreedyScreen | None = None  # compute_logits' argmax, set by after_load where it pays

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.model(input_ids, positions, ctx)

    def after_load(self) -> None:
        self.model.after_load()
        if self.lm_head is None:
            self.lm_head = tied_head(self.model.embed_tokens)
        # a soft-capped or scaled head keeps the argmax, yet rounding can tie two logits that HF then
        # breaks by index: greedy tokens come from the final logits, as HF's do
        if self.config.final_softcap is None and self.config.logits_scaling is None:
            self.greedy_screen = GreedyScreen.build(self.lm_head.weight)

    def compute_logits(self, hidden: torch.Tensor, workspace: Workspace | None = None) -> torch.Tensor:
        logits = vocab_logits(hidden, self.lm_head, workspace=workspace)
        c = self.config  # in place below: the logits may be a workspace
        if c.logits_scaling is not None:  # Granite
            logits.div_(c.logits_scaling)
        if c.final_softcap is not None:  # Gemma 2: cap * tanh(logits / cap)
            logits.div_(c.final_softcap).tanh_().mul_(c.final_softcap)
        return logits

    def lora_targets(self) -> dict[str, LoRATarget]:
        """HF projection name -> where it runs here, for PEFT adapters (models/lora.py)."""
        targets = self._lora_targets()
        if self.config.rotary_dim is not None:  # q/k rows are reordered at load: no deltas on them
            targets = {k: v for k, v in targets.items() if k not in ("q_proj", "k_proj", "qkv_proj")}
        return targets

    def _lora_targets(self) -> dict[str, LoRATarget]:
        c = self.config
        q, kv, h, i = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.hidden_size, \
            c.intermediate_size
        o, down = LoRATarget("o_proj", h, 0, h, q), LoRATarget("down_proj", h, 0, h, i)
        if c.merged_checkpoint:  # Phi-3's adapters target its own merged modules
            return {"qkv_proj": LoRATarget("qkv_proj", q + 2 * kv, 0, q + 2 * kv, h), "o_proj": o,
                    "gate_up_proj": LoRATarget("gate_up_proj", 2 * i, 0, 2 * i, h), "down_proj": down}
        attention = {
            "q_proj": LoRATarget("qkv_proj", q + 2 * kv, 0, q, h),
            "k_proj": LoRATarget("qkv_proj", q + 2 * kv, q, kv, h),
            "v_proj": LoRATarget("qkv_proj", q + 2 * kv, q + kv, kv, h),
            "o_proj": o,
        }
        if c.moe is not None:  # no deltas on routed experts: adapters of MoE models reach attention only
            return attention
        return attention | {
            "gate_proj": LoRATarget("gate_up_proj", 2 * i, 0, i, h),
            "up_proj": LoRATarget("gate_up_proj", 2 * i, i, i, h),
            "down_proj": down,
        }

    @property
    def capturable(self) -> bool:
        """Whether a CUDA graph can hold a decode step: MoE layers bring their expert counts to the
        host to group tokens (engine/fused/moe.py), so MoE models decode eagerly."""
        return self.config.moe is None

    @property
    def kv_cache_spec(self) -> KVCacheSpec:
        c = self.config
        windows = {c.window(i) for i in range(c.num_hidden_layers)}
        shared = next(iter(windows)) if len(windows) == 1 and not c.bidirectional else None
        return KVCacheSpec(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, sliding_window=shared)

    def rename_weight(self, name: str) -> str | None:
        if name.endswith("rotary_emb.inv_freq"):  # older checkpoints saved this buffer
            return None
        if name == "lm_head.weight" and self.lm_head is None:
            return None
        return mixtral_name(name)


# transformers' Gemma3TextConfig defaults: the text_config of Gemma 3's multimodal checkpoints lists only
# what differs from them (gemma-3-4b-it's names its size, layers, window and rope scaling, little else)
_GEMMA3_TEXT_DEFAULTS = {
    "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131_072, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
    "query_pre_attn_scalar": 256, "sliding_window": 4096, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
}


def gemma3_text_config(config: dict) -> dict:
    """The language model's config of a Gemma3ForConditionalGeneration folder, defaults filled in."""
    text = _GEMMA3_TEXT_DEFAULTS | dict(config.get("text_config") or {})
    return text | {"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"]}


@dataclass(frozen=True)
class _TextConfigOf:
    """`config_class` of a multimodal checkpoint served as text: its language model's LlamaConfig,
    from the text part of its config.json that `text_config` picks out."""

    text_config: Callable[[dict], dict]

    def from_hf(self, config: dict) -> LlamaConfig:
        return LlamaConfig.from_hf(self.text_config(config))


class _TextOfMultimodal(LlamaForCausalLM):
    """A multimodal checkpoint served as a text model: its language model's weights load from under
    `_language` prefixes (renamed to `model.`), its vision tower's and projector's (`_vision`) are
    skipped, so requests are text only."""

    config_class: _TextConfigOf
    _vision: tuple[str, ...] = ()
    _language: tuple[str, ...] = ()

    def rename_weight(self, name: str) -> str | None:
        if name.startswith(self._vision):
            return None
        for prefix in self._language:
            if name.startswith(prefix):
                name = "model." + name[len(prefix):]
                break
        return super().rename_weight(name)

    @classmethod
    def extra_info(cls, folder: Path, config: dict) -> dict:
        text = cls.config_class.text_config(config)
        return {"max_model_len": text.get("max_position_embeddings", 32768), "vocab_size": text["vocab_size"]}


class Gemma3ForConditionalGeneration(_TextOfMultimodal):
    """Gemma 3's multimodal checkpoints (4B, 12B, 27B) as text models: the language model under v4's
    `language_model.model.` or v5's `model.language_model.` (v4's head: `language_model.lm_head`)."""

    config_class = _TextConfigOf(gemma3_text_config)
    _vision = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")
    _language = ("model.language_model.", "language_model.model.")

    def rename_weight(self, name: str) -> str | None:
        return super().rename_weight("lm_head.weight" if name == "language_model.lm_head.weight" else name)


def qwen_vl_text_config(config: dict) -> dict:
    """The language model's config of a Qwen2-VL / Qwen2.5-VL folder: transformers 5 nests it in
    `text_config`, older folders keep it at the top level beside `vision_config`. Its "mrope" rotary
    is plain rotary for text: with no image, all three position rows are the token index."""
    text = {k: v for k, v in config.items() if k not in ("vision_config", "text_config", "architectures")}
    text |= dict(config.get("text_config") or {})
    for key in ("rope_scaling", "rope_parameters"):
        rope = text.get(key)
        if isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) == "mrope":
            text[key] = {k: v for k, v in rope.items() if k not in ("type", "rope_type", "mrope_section")} | \
                {"rope_type": "default"}
    return text | {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}


class QwenVLForConditionalGeneration(_TextOfMultimodal):
    """Qwen2-VL and Qwen2.5-VL checkpoints as text models: the Qwen2 language model under `model.`
    (hub folders) or transformers 5's `model.language_model.`."""

    config_class = _TextConfigOf(qwen_vl_text_config)
    _vision = ("visual.", "model.visual.")
    _language = ("model.language_model.",)


class LlamaEmbeddingModel(nn.Module):
    """A LLaMA-family decoder as an embedding model (Qwen3-Embedding, e5-mistral, gte-Qwen2): causal
    attention within each input, the final norm's hidden states out; the embedding engine pools them
    as the folder's sentence-transformers modules say (last token, for these models). EmbeddingGemma
    (a Gemma 3 body with `use_bidirectional_attention`) attends both ways, its sliding layers within a
    radius, and is mean-pooled and projected by its folder's Dense modules.

    Such folders keep the bare body (`embed_tokens.weight`, as HF's `Qwen3Model` saves) or a whole
    causal LM (`model.embed_tokens.weight`, `lm_head.weight`): both load, the head is skipped.
    """

    config_class = LlamaConfig

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        # the engine builds causal attention metadata for it, unless the config says otherwise (EmbeddingGemma)
        self.causal = not config.bidirectional

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, ctx)

    def after_load(self) -> None:
        self.model.after_load()

    def rename_weight(self, name: str) -> str | None:
        if name.startswith("lm_head.") or name.endswith("rotary_emb.inv_freq"):
            return None
        return mixtral_name(name if name.startswith("model.") else f"model.{name}")


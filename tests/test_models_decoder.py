"""Decoder-only models vs transformers: tiny random checkpoints saved by HF, loaded by load_model.

A flat batch of three sequences of different lengths must give HF's logits per sequence, both
whole (no cache) and in two chunks through a real paged KV cache (prefix, then the rest).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from engine.attention.metadata import AttentionMetadata
from engine.attention.ref import TorchAttentionBackend
from engine.forward_context import ForwardContext, metadata_for_sequences
from models.loader import load_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LENS = [5, 11, 3]
SPLITS = [2, 7, 2]  # tokens computed in the first (cached) step; the rest follow in a second step
VOCAB = 97


def hf_config(kind: str):
    from transformers import (Gemma2Config, Gemma3TextConfig, GemmaConfig, GraniteConfig, Olmo2Config, GPT2Config, LlamaConfig, MistralConfig, MixtralConfig, Phi3Config,
                              Qwen2Config, Qwen2MoeConfig, Qwen3Config, Qwen3MoeConfig)

    llama = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if kind == "llama_gqa":
        return LlamaConfig(**llama, rope_theta=500.0)
    if kind == "llama_tied":
        return LlamaConfig(**llama, tie_word_embeddings=True)
    if kind == "llama_bias_mha":
        return LlamaConfig(**{**llama, "num_key_value_heads": 4}, attention_bias=True, mlp_bias=True)
    if kind == "llama3_rope":
        scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 16}
        return LlamaConfig(**llama, rope_scaling=scaling, rope_theta=10000.0)
    if kind == "llama_linear_rope":
        return LlamaConfig(**llama, rope_scaling={"rope_type": "linear", "factor": 3.0})
    if kind == "mistral":
        return MistralConfig(**{**llama, "num_key_value_heads": 1}, sliding_window=None)
    if kind == "qwen2":
        return Qwen2Config(**llama, tie_word_embeddings=False)
    if kind == "qwen3":  # q/k norms; heads wider than hidden / heads, as Qwen3-0.6B's 16 x 128 on 1024
        return Qwen3Config(**llama, head_dim=24, tie_word_embeddings=True)
    if kind == "qwen3_bias":
        return Qwen3Config(**llama, head_dim=8, attention_bias=True, tie_word_embeddings=False)
    if kind == "gemma":  # (1 + weight) norms, embeddings scaled by sqrt(hidden), tanh GELU, tied, wide heads
        return GemmaConfig(**llama, head_dim=32)
    if kind == "gemma2":  # sandwich norms, soft-capped scores and logits, a 4-key window on layers 0 and 2
        return Gemma2Config(**{**llama, "num_hidden_layers": 3}, head_dim=32, sliding_window=4,
                            query_pre_attn_scalar=20, attn_logit_softcapping=0.5, final_logit_softcapping=2.0)
    if kind == "gemma3":  # q/k norms (1 + weight), local and global rotary tables, windows on layers 0 and 2
        rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}
        return Gemma3TextConfig(**{**llama, "num_hidden_layers": 3}, head_dim=24, sliding_window=5,
                                query_pre_attn_scalar=24, rope_parameters=rope,
                                layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    if kind == "granite":  # embedding, attention and residual multipliers, scaled logits
        return GraniteConfig(**llama, embedding_multiplier=3.0, attention_multiplier=0.05, residual_multiplier=0.4,
                             logits_scaling=2.5, tie_word_embeddings=True)
    if kind == "olmo2":  # no input norms, normed outputs, q/k norms over whole projections
        return Olmo2Config(**llama, tie_word_embeddings=False)
    if kind == "phi4_partial":  # partial rotary: 12 of each head's 16 dims rotate (Phi-4-mini's 3/4)
        return Phi3Config(**llama, pad_token_id=0, tie_word_embeddings=True, partial_rotary_factor=0.75)
    if kind == "mistral_window":  # a 3-key window on every layer
        return MistralConfig(**{**llama, "num_key_value_heads": 1}, sliding_window=3)
    if kind == "qwen2_window":  # Qwen2's window from max_window_layers on: layer 1 only
        return Qwen2Config(**llama, use_sliding_window=True, sliding_window=5, max_window_layers=1)
    if kind == "phi3":  # q/k/v and gate/up saved merged
        return Phi3Config(**llama, pad_token_id=0, tie_word_embeddings=False)
    if kind == "mixtral":  # every layer routed; the weights saved as block_sparse_moe.experts.N.w1/w2/w3
        return MixtralConfig(**{**llama, "num_hidden_layers": 3}, num_local_experts=4, num_experts_per_tok=2,
                             sliding_window=None)
    if kind == "qwen2_moe":  # a shared expert with a sigmoid gate; top-k weights not renormalised; layer 1 dense
        return Qwen2MoeConfig(**{**llama, "num_hidden_layers": 3}, num_experts=6, num_experts_per_tok=2,
                              moe_intermediate_size=32, shared_expert_intermediate_size=48, mlp_only_layers=[1])
    if kind == "qwen3_moe":  # q/k norms; 8 experts, top 3 renormalised; every other layer routed
        return Qwen3MoeConfig(**{**llama, "num_hidden_layers": 3}, head_dim=24, num_experts=8,
                              num_experts_per_tok=3, norm_topk_prob=True, moe_intermediate_size=32,
                              decoder_sparse_step=2)
    if kind == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    raise ValueError(kind)


KINDS = ["llama_gqa", "llama_tied", "llama_bias_mha", "llama3_rope", "llama_linear_rope", "mistral", "qwen2", "qwen3",
         "qwen3_bias", "gemma", "gemma2", "gemma3", "granite", "olmo2", "phi4_partial", "mistral_window", "qwen2_window", "phi3", "mixtral", "qwen2_moe", "qwen3_moe", "gpt2"]


def save_hf(kind: str, folder: Path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(KINDS.index(kind))
    model = AutoModelForCausalLM.from_config(hf_config(kind), torch_dtype=torch.float32).eval()
    with torch.no_grad():  # HF zero-inits biases and ones-inits norms: randomise so they are exercised
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith("gate.weight"):  # MoE routers: decisive, input-dependent choices
                p.normal_(0.0, 0.5)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module", params=KINDS)
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = save_hf(request.param, folder)
    return hf, load_model(str(folder))


def hf_logits(hf, seqs: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [hf(s[None]).logits[0].float() for s in seqs]


def random_seqs(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in LENS]


def test_config_architecture_and_spec(pair):
    hf, ours = pair
    spec = ours.model.kv_cache_spec
    cfg = hf.config
    assert spec.num_layers == cfg.num_hidden_layers
    assert spec.num_kv_heads == getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    assert spec.head_dim == (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    assert ours.info.vocab_size == VOCAB and ours.info.max_model_len == 128


def flat_batch_matches_hf(model, hf, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`model` over a flat batch of LENS random sequences, no cache: its logits per sequence equal
    transformers' on each alone. Returns (hidden, logits)."""
    seqs = random_seqs(seed)
    ctx = ForwardContext(meta=metadata_for_sequences(LENS), backend=TorchAttentionBackend())
    with torch.no_grad():
        hidden = model(torch.cat(seqs), torch.cat([torch.arange(n) for n in LENS]), ctx)
        logits = model.compute_logits(hidden)
    for got, ref in zip(logits.split(LENS), hf_logits(hf, seqs)):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    return hidden, logits


def test_flat_batch_matches_hf(pair):
    hf, ours = pair
    hidden, logits = flat_batch_matches_hf(ours.model, hf, seed=1)
    assert hidden.shape == (sum(LENS), hf.config.hidden_size) and logits.dtype == torch.float32


def paged_meta(chunks: list[tuple[int, int]], tables: list[list[int]], block_size: int) -> AttentionMetadata:
    """Metadata for sequence i computing tokens [lo, hi) with its KV in blocks tables[i]."""
    q_lens = [hi - lo for lo, hi in chunks]
    k_lens = [hi for _, hi in chunks]
    cu = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    pos = torch.cat([torch.arange(lo, hi) for lo, hi in chunks])
    seq = torch.repeat_interleave(torch.arange(len(chunks)), torch.tensor(q_lens))
    table = torch.zeros(len(tables), max(map(len, tables)), dtype=torch.int32)
    for i, t in enumerate(tables):
        table[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
    slots = table[seq, pos // block_size].long() * block_size + pos % block_size
    return AttentionMetadata(
        cu_seqlens_q=cu, seq_lens=torch.tensor(k_lens, dtype=torch.int32), slot_mapping=slots,
        block_tables=table, max_seqlen_q=max(q_lens), max_seqlen_k=max(k_lens),
        query_lens=tuple(q_lens), seq_lens_host=tuple(k_lens),
    )


def test_paged_prefix_then_rest_matches_hf(pair):
    hf, ours = pair
    seqs = random_seqs(2)
    spec = ours.model.kv_cache_spec
    block_size, num_blocks = 4, 16
    caches = [
        (torch.randn(num_blocks, block_size, spec.num_kv_heads, spec.head_dim),  # garbage must not leak in
         torch.randn(num_blocks, block_size, spec.num_kv_heads, spec.head_dim))
        for _ in range(spec.num_layers)
    ]
    perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(3)).tolist()
    tables, used = [], 0
    for n in LENS:
        tables.append(perm[used : used + -(-n // block_size)])
        used += len(tables[-1])
    refs = hf_logits(hf, seqs)
    for phase in (0, 1):
        chunks = [(0, s) if phase == 0 else (s, n) for n, s in zip(LENS, SPLITS)]
        meta = paged_meta(chunks, tables, block_size)
        ctx = ForwardContext(meta=meta, backend=TorchAttentionBackend(), kv_caches=caches)
        ids = torch.cat([s[lo:hi] for s, (lo, hi) in zip(seqs, chunks)])
        positions = torch.cat([torch.arange(lo, hi) for lo, hi in chunks])
        with torch.no_grad():
            logits = ours.model.compute_logits(ours.model(ids, positions, ctx))
        for got, ref, (lo, hi) in zip(logits.split(meta.query_lens), refs, chunks):
            torch.testing.assert_close(got, ref[lo:hi], atol=1e-4, rtol=0)


def test_unsupported_rope_type_is_refused():
    from models.layers import RopeConfig

    with pytest.raises(ValueError, match="dynamic"):
        RopeConfig.from_hf({"rope_scaling": {"type": "dynamic", "factor": 2.0}})


def test_family_config_rules():
    """What the configs leave implicit: Gemma's older configs say hidden_act "gelu" and mean the tanh
    form, and tie the head without saying so; Phi-3's variants that need what is not here are refused."""
    from models.llama import LlamaConfig

    gemma = {"architectures": ["GemmaForCausalLM"], "model_type": "gemma", "vocab_size": 256000, "hidden_size": 2048,
             "intermediate_size": 16384, "num_hidden_layers": 18, "num_attention_heads": 8, "num_key_value_heads": 1,
             "head_dim": 256, "hidden_act": "gelu"}
    cfg = LlamaConfig.from_hf(gemma)
    assert cfg.hidden_act == "gelu_pytorch_tanh" and cfg.tie_word_embeddings and cfg.norm_plus_one
    assert cfg.embed_scale == 2048**0.5 and not cfg.merged_checkpoint
    assert LlamaConfig.from_hf(gemma | {"hidden_activation": "gelu_pytorch_tanh"}).hidden_act == "gelu_pytorch_tanh"
    phi3 = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "vocab_size": 32064, "hidden_size": 3072,
            "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 32, "sliding_window": 2047}
    cfg = LlamaConfig.from_hf(phi3)
    assert cfg.merged_checkpoint and not cfg.tie_word_embeddings and cfg.hidden_act == "silu"
    assert LlamaConfig.from_hf(phi3 | {"partial_rotary_factor": 0.75}).rotary_dim == 72  # Phi-4-mini's rule
    with pytest.raises(ValueError, match="even count"):
        LlamaConfig.from_hf(phi3 | {"partial_rotary_factor": 0.99})  # int(95.04): an odd count cannot pair up

    # Phi-3-128k / Phi-3.5: longrope, with original_max_position_embeddings at the top level
    long = LlamaConfig.from_hf(phi3 | {"max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
                                       "rope_scaling": {"type": "longrope", "long_factor": [2.0], "short_factor": [1.0]}})
    assert long.rope.rope_type == "longrope" and long.rope.original_max_position_embeddings == 4096
    assert long.rope.attention_factor == pytest.approx((1 + math.log(32) / math.log(4096)) ** 0.5)


def test_sliding_window_config_rules():
    """Which layers slide, from configs as the hub has them: Gemma 2's older configs list no
    layer_types (even layers slide), Mistral 7B v0.1 and Phi-3 slide everywhere, Qwen2 only with
    use_sliding_window and only from max_window_layers on; an explicit layer_types list wins."""
    from models.llama import LlamaConfig

    gemma2 = {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "vocab_size": 256000,
              "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26, "num_attention_heads": 8,
              "num_key_value_heads": 4, "head_dim": 256, "sliding_window": 4096, "query_pre_attn_scalar": 256,
              "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "hidden_activation": "gelu_pytorch_tanh"}
    cfg = LlamaConfig.from_hf(gemma2)
    assert [cfg.window(i) for i in range(4)] == [4096, None, 4096, None]
    assert cfg.sandwich_norms and cfg.norm_plus_one and cfg.tie_word_embeddings and cfg.query_scale == 256**-0.5
    assert (cfg.attn_softcap, cfg.final_softcap) == (50.0, 30.0)
    types = ["full_attention", "sliding_attention", "full_attention"]
    cfg = LlamaConfig.from_hf(gemma2 | {"num_hidden_layers": 3, "layer_types": types})
    assert [cfg.window(i) for i in range(3)] == [None, 4096, None]
    with pytest.raises(ValueError, match="chunked_attention"):
        LlamaConfig.from_hf(gemma2 | {"layer_types": ["chunked_attention"] * 26})
    mistral = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": 32000,
               "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
               "num_key_value_heads": 8, "sliding_window": 4096}
    cfg = LlamaConfig.from_hf(mistral)
    assert {cfg.window(i) for i in range(32)} == {4096} and cfg.attn_softcap is None and not cfg.sandwich_norms
    assert LlamaConfig.from_hf(mistral | {"sliding_window": None}).window(0) is None
    qwen2 = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896,
             "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
             "sliding_window": 32768, "max_window_layers": 21, "use_sliding_window": False}
    assert {LlamaConfig.from_hf(qwen2).window(i) for i in range(24)} == {None}
    cfg = LlamaConfig.from_hf(qwen2 | {"use_sliding_window": True})
    assert [cfg.window(i) for i in (0, 20, 21, 23)] == [None, None, 32768, 32768]



def test_gemma3_config_rules():
    """Gemma 3 1B's config as the hub has it (no layer_types, no nested rope_parameters): every 6th
    layer global with rope_theta, the rest a 512-key window with rope_local_base_freq; a v5 config's
    nested rope_parameters; EmbeddingGemma's bidirectional attention cannot generate."""
    from models.layers import RopeConfig
    from models.llama import LlamaConfig, LlamaForCausalLM

    gemma3 = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 262144,
              "hidden_size": 1152, "intermediate_size": 6912, "num_hidden_layers": 26, "num_attention_heads": 4,
              "num_key_value_heads": 1, "head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 512,
              "sliding_window_pattern": 6, "rope_theta": 1000000, "rope_local_base_freq": 10000,
              "rope_scaling": None, "final_logit_softcapping": None, "attn_logit_softcapping": None,
              "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 32768}
    cfg = LlamaConfig.from_hf(gemma3)
    assert [i for i in range(26) if cfg.window(i) is None] == [5, 11, 17, 23]
    assert cfg.window(0) == 512 and cfg.qk_norm and cfg.sandwich_norms and cfg.norm_plus_one
    assert cfg.rope == RopeConfig(theta=1e6) and cfg.local_rope == RopeConfig(theta=1e4)
    assert cfg.attn_softcap is None and cfg.final_softcap is None and cfg.query_scale == 256**-0.5
    scaled = LlamaConfig.from_hf(gemma3 | {"rope_scaling": {"rope_type": "linear", "factor": 8.0}})  # 4B and up
    assert scaled.rope == RopeConfig(theta=1e6, rope_type="linear", factor=8.0) and scaled.local_rope.factor == 1.0
    nested = {"full_attention": {"rope_type": "default", "rope_theta": 5e5},
              "sliding_attention": {"rope_type": "default", "rope_theta": 2e3}}
    cfg = LlamaConfig.from_hf(gemma3 | {"rope_parameters": nested, "sliding_window_pattern": None})
    assert (cfg.rope.theta, cfg.local_rope.theta) == (5e5, 2e3) and cfg.window(5) is None and cfg.window(6) == 512
    bidirectional = LlamaConfig.from_hf(gemma3 | {"use_bidirectional_attention": True, "num_hidden_layers": 1,
                                                  "hidden_size": 64, "intermediate_size": 64, "vocab_size": 64})
    assert bidirectional.bidirectional
    with pytest.raises(ValueError, match="use_bidirectional_attention"):  # EmbeddingGemma serves embeddings only
        LlamaForCausalLM(bidirectional)


def test_gemma3_multimodal_checkpoint_serves_text(tmp_path):
    """A Gemma3ForConditionalGeneration folder (a tiny SigLIP tower beside the language model) loads
    as a text model whose logits equal transformers' on text-only inputs (a ragged flat batch); its
    text_config keeps only what differs from Gemma3TextConfig's defaults, as the hub's do."""
    import json

    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    torch.manual_seed(5)
    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=24, sliding_window=4, max_position_embeddings=128,
                rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                                 "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
                layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=16, patch_size=8)
    hf = Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision.to_dict(),
                                                     mm_tokens_per_image=4, image_token_index=VOCAB - 1)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == ["Gemma3ForConditionalGeneration"] and "vocab_size" not in saved
    saved["text_config"].pop("rms_norm_eps", None)  # left to the defaults, as hub configs leave it
    (tmp_path / "config.json").write_text(json.dumps(saved))
    ours = load_model(str(tmp_path))
    assert type(ours.model).__name__ == "Gemma3ForConditionalGeneration"
    assert ours.info.vocab_size == VOCAB and ours.info.max_model_len == 128
    flat_batch_matches_hf(ours.model, hf, seed=7)


def test_phi3_longrope_matches_hf_up_to_the_original_context(tmp_path):
    """Phi-3.5's longrope: within original_max_position_embeddings (16 here) logits equal transformers'
    (short factors, cos/sin scaled by the attention factor); rows from 16 on are transformers' long-factor
    rows, which it uses for every position once a forward call passes 16 (kvserve keeps the short rows
    below 16: cached keys are never rotated again)."""
    from transformers import AutoModelForCausalLM, Phi3Config

    half = 8  # head_dim 16
    scaling = {"rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(half)],
               "long_factor": [1.5 + 0.5 * i for i in range(half)]}
    cfg = Phi3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=128, original_max_position_embeddings=16,
                     rope_scaling=scaling, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(9)
    hf = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32).eval()
    hf.save_pretrained(tmp_path)
    ours = load_model(str(tmp_path))
    rope = ours.model.config.rope
    assert rope.rope_type == "longrope" and rope.attention_factor == pytest.approx((1 + math.log(8) / math.log(16)) ** 0.5)
    flat_batch_matches_hf(ours.model, hf, seed=4)
    with torch.no_grad():
        cos, sin = hf.model.rotary_emb(torch.zeros(1, 40, 64), torch.arange(40)[None])  # past 16: long factors
    table = ours.model.model.rotary_emb.cos_sin_cache
    torch.testing.assert_close(table[16:40], torch.cat([cos[0, 16:, :half], sin[0, 16:, :half]], -1), atol=1e-6, rtol=0)


def test_partial_rotary_permutation_and_lora_targets(tmp_path):
    """The head reorder pairs HF's rotated dims (i, i + r/2) as (j, j + D/2) and keeps the others in the
    zero-frequency pairs; LoRA adapters may not touch the reordered q/k rows."""
    from models.layers import partial_rotary_permutation

    perm = partial_rotary_permutation(16, 12)
    assert sorted(perm.tolist()) == list(range(16))
    assert [(int(perm[j]), int(perm[j + 8])) for j in range(6)] == [(i, i + 6) for i in range(6)]
    assert set(perm[6:8].tolist()) | set(perm[14:].tolist()) == set(range(12, 16))
    folder = tmp_path / "phi4"
    save_hf("phi4_partial", folder)
    targets = load_model(str(folder)).model.lora_targets()
    assert "qkv_proj" not in targets and {"o_proj", "gate_up_proj", "down_proj"} <= set(targets)


@pytest.mark.parametrize("flat", [False, True], ids=["v5-text_config", "hub-flat"])
def test_qwen2_5_vl_checkpoint_serves_text(flat, tmp_path):
    """A Qwen2_5_VLForConditionalGeneration folder (a tiny vision tower beside a Qwen2 language model,
    mrope) loads as a text model whose logits equal transformers' on text-only inputs; also with the
    config written flat, as the hub's Qwen2.5-VL folders are (text keys at the top, mrope scaling)."""
    import json

    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(6)
    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128,
                rope_parameters={"rope_type": "mrope", "mrope_section": [2, 3, 3], "rope_theta": 1e4})
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=64, patch_size=2,
                  spatial_merge_size=1, temporal_patch_size=1, window_size=4, fullatt_block_indexes=[0])
    hf = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                                                             image_token_id=VOCAB - 1, video_token_id=VOCAB - 2)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path)
    if flat:  # the hub's layout: text keys at the top level, rope_scaling {"type": "mrope"}
        saved = json.loads((tmp_path / "config.json").read_text())
        body = saved.pop("text_config")
        rope = body.pop("rope_parameters")
        saved |= body | {"rope_theta": rope["rope_theta"],
                         "rope_scaling": {"type": "mrope", "mrope_section": rope["mrope_section"]}}
        (tmp_path / "config.json").write_text(json.dumps(saved))
    ours = load_model(str(tmp_path))
    assert type(ours.model).__name__ == "QwenVLForConditionalGeneration" and ours.info.vocab_size == VOCAB
    assert ours.model.config.qkv_bias  # Qwen2's q/k/v biases
    flat_batch_matches_hf(ours.model, hf, seed=8)

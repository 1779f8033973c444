"""A LLaMA of a real model's shape with random weights, saved as an HF folder that kvserve and
transformers both load. Decode speed does not depend on the values, so the GPU benchmarks time
shapes no package ships (Llama-3.2-1B's: weights that dominate a decode step) this way.

The CPU generation benchmark times a mixture-of-experts model the same way ("qwen3moe": Qwen3-MoE
blocks, 32 experts of which 4 run per token, about SmolLM2's active size), and Gemma 3 270M's shape
("gemma3": 512-key windows on five layers of six, a second rotary table, a 262k vocabulary).

    python benchmarks/random_llama.py FOLDER {smollm2,llama1b,tiny,qwen3moe,gemma3}
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.tiny_models import byte_level_tokenizer_json  # noqa: E402

SHAPES = {
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0, rms_norm_eps=1e-5),
    "llama1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, rms_norm_eps=1e-5),
    # the dry run's (tests/test_bench_gpu.py): GQA, tied embeddings, like the two above
    "tiny": dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
}
MOE_SHAPES = {
    "qwen3moe": dict(vocab_size=49152, hidden_size=512, intermediate_size=1536, moe_intermediate_size=256,
                     num_experts=32, num_experts_per_tok=4, norm_topk_prob=True, num_hidden_layers=16,
                     num_attention_heads=8, num_key_value_heads=4, head_dim=64, rms_norm_eps=1e-6),
}

GEMMA3_SHAPES = {  # gemma-3-270m's config.json
    "gemma3": dict(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                   num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                   sliding_window=512, rms_norm_eps=1e-6, rope_parameters={
                       "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                       "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}),
}


def save_random_llama(folder: Path, shape: str) -> Path:
    """Saved in bf16, what the benchmarks serve: half the bytes to write and read back of fp32."""
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, Qwen3MoeConfig,
                              Qwen3MoeForCausalLM)

    if shape in GEMMA3_SHAPES:
        cfg = Gemma3TextConfig(max_position_embeddings=8192, **GEMMA3_SHAPES[shape])
        model = Gemma3ForCausalLM(cfg)
    elif shape in MOE_SHAPES:
        cfg = Qwen3MoeConfig(max_position_embeddings=8192, tie_word_embeddings=True, **MOE_SHAPES[shape])
        model = Qwen3MoeForCausalLM(cfg)
    else:
        cfg = LlamaConfig(max_position_embeddings=8192, tie_word_embeddings=True, **SHAPES[shape])
        model = LlamaForCausalLM(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(folder)
    byte_level_tokenizer_json(folder, cfg.vocab_size)
    return folder


if __name__ == "__main__":
    save_random_llama(Path(sys.argv[1]), sys.argv[2])

"""The compiled CPU decode-attention kernel (paged_decode_cpu.c), built and loaded by engine.native."""
from __future__ import annotations

import ctypes
from functools import lru_cache
from pathlib import Path

import torch

from engine import native
from engine.attention.metadata import AttentionVariant

SOURCE = Path(__file__).with_name("paged_decode_cpu.c")
DISABLE_ENV = native.DISABLE_ENV


def build(compiler: str | None = None) -> Path | None:
    """Path of the compiled kernel, compiling it first if no cached build matches the source."""
    return native.build(SOURCE, compiler)


@lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (disabled, no compiler, failed build)."""
    i32, i64, ptr = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p
    return native.load(SOURCE, {"paged_decode_attention": [ptr, i64, ptr, i64, ptr, ptr, ptr, ptr, i64, ptr,
                                                           i32, i32, i32, i32, i32, ctypes.c_float, i32,
                                                           ctypes.c_float, i32]})


MAX_GROUP = 8  # query heads per kv head (the kernel's register budget, MAX_GROUP in the C file)


def supports(query: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """fp32 on CPU, heads contiguous within a token row (any row stride), a dense cache, head_dim
    a multiple of 8 and at most MAX_GROUP query heads per kv head."""
    num_heads, head_dim = query.shape[1:]
    num_kv_heads = k_cache.shape[2]
    return (
        num_heads % num_kv_heads == 0
        and num_heads // num_kv_heads <= MAX_GROUP
        and head_dim % 8 == 0
        and query.device.type == "cpu"
        and query.dtype == torch.float32
        and k_cache.dtype == torch.float32
        and query.stride(2) == 1
        and query.stride(1) == query.shape[2]
        and k_cache.is_contiguous()
    )


def paged_decode_attention(
    lib: ctypes.CDLL,
    out: torch.Tensor,  # (T, num_heads, head_dim), rows written: `rows`
    query: torch.Tensor,  # (T, num_heads, head_dim)
    k_cache: torch.Tensor,  # (num_blocks, block_size, num_kv_heads, head_dim), contiguous
    v_cache: torch.Tensor,
    rows: torch.Tensor,  # (B,) int64: the query row of each decoding sequence
    block_tables: torch.Tensor,  # (B, max_blocks) int32, contiguous
    seq_lens: torch.Tensor,  # (B,) int32: keys per sequence, the new one included
    scale: float,
    variant: AttentionVariant | None = None,
) -> torch.Tensor:
    """Attention of one query token per sequence over its paged K/V, written into `out`; with a
    `variant`, over its sliding window's keys only and with its scores soft-capped."""
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    assert block_tables.dtype == torch.int32 and seq_lens.dtype == torch.int32 and rows.dtype == torch.int64
    assert block_tables.is_contiguous() and out.stride(2) == 1 and out.stride(1) == head_dim
    lib.paged_decode_attention(
        out.data_ptr(), out.stride(0), query.data_ptr(), query.stride(0), rows.data_ptr(),
        k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(), block_tables.stride(0),
        seq_lens.data_ptr(), rows.numel(), query.shape[1], num_kv_heads, head_dim, block_size,
        scale, (variant and variant.window) or 0, (variant and variant.softcap) or 0.0, torch.get_num_threads(),
    )
    return out

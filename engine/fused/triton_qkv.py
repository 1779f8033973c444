"""A decode step's q/k/v GEMV with the rotary positions and the K/V cache write as its epilogue.

After engine.fused.triton_gemv folds the RMSNorm into the merged q/k/v matmul, the next launch
(engine.fused.triton_ops.rotary_store_kv) still only moves that matmul's few KB of output. Here
the GEMV finishes the job: rotary position i of a head pairs output rows i and i + D/2, so a
program computes weight rows in those pairs (a permutation of the same reads), rotates them in
registers and stores q to its buffer and k and v into their cache slots. A layer's decode is
then 5 launches: this, attention, o_proj, norm + gate/up, SwiGLU + down.

Arithmetic equals norm_linear followed by rotary_store_kv: the matmul's result (bias added)
rounded to the weight dtype, rotated in fp32, rounded to the model dtype, then the cache's.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.fused.pdl import launch_options
from engine.fused.triton_gemv import _gemv_rows, tiles


@triton.jit
def _norm_qkv_rotary_kernel(
    x_ptr, res_ptr, nw_ptr, w_ptr, b_ptr, q_ptr, res_out_ptr, cos_ptr, sin_ptr,
    k_cache_ptr, v_cache_ptr, slot_ptr,
    M, K, eps, num_q_heads, num_kv_heads, half, block_size,
    stride_x, stride_r, stride_w, stride_qt, stride_qh, stride_ro, stride_ct, stride_st,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):
    # Program (m, block): input row m and BLOCK_P rotary pairs. Pair p is position j of head h
    # among the q, k and v heads side by side (v "pairs" are only stored, not rotated); it is
    # made of the merged weight's rows h*D + j and h*D + j + D/2, taken as one tile of 2 * BLOCK_P
    # rows (all first rows, then all second ones) by the GEMV.
    pid = tl.program_id(0)
    m = (pid % M).to(tl.int64)
    block = pid // M
    p = block * BLOCK_P + tl.arange(0, BLOCK_P)
    num_rot = num_q_heads + num_kv_heads
    num_pairs = (num_rot + num_kv_heads) * half
    p_mask = p < num_pairs
    head = p // half
    j = p % half
    r = tl.arange(0, 2 * BLOCK_P)
    pr = block * BLOCK_P + r % BLOCK_P  # the pair of tile row r
    n = (pr // half) * 2 * half + pr % half + (r // BLOCK_P) * half
    n_mask = pr < num_pairs
    out = _gemv_rows(x_ptr + m * stride_x, res_ptr + m * stride_r, res_out_ptr + m * stride_ro, nw_ptr, w_ptr, b_ptr,
                     n, n_mask, K, eps, stride_w, block == 0, 1, HAS_RES, HAS_BIAS, BLOCK_K, PDL)
    x1, x2 = tl.split(tl.trans(tl.reshape(out, (2, BLOCK_P))))  # the merged matmul's output, paired
    w_dtype = w_ptr.dtype.element_ty
    cos = tl.load(cos_ptr + m * stride_ct + j, mask=p_mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + m * stride_st + j, mask=p_mask, other=0.0).to(tl.float32)
    rot = head < num_rot
    y1 = tl.where(rot, x1 * cos - x2 * sin, x1).to(w_dtype)
    y2 = tl.where(rot, x2 * cos + x1 * sin, x2).to(w_dtype)

    is_q = p_mask & (head < num_q_heads)
    dst = q_ptr + m * stride_qt + head * stride_qh + j
    tl.store(dst, y1.to(q_ptr.dtype.element_ty), mask=is_q)
    tl.store(dst + half, y2.to(q_ptr.dtype.element_ty), mask=is_q)
    slot = tl.load(slot_ptr + m).to(tl.int64)
    blk = slot // block_size
    off = slot % block_size
    is_k = p_mask & rot & (head >= num_q_heads)
    dst = k_cache_ptr + blk * stride_kcb + off * stride_kcs + (head - num_q_heads) * stride_kch + j
    tl.store(dst, y1.to(k_cache_ptr.dtype.element_ty), mask=is_k)
    tl.store(dst + half, y2.to(k_cache_ptr.dtype.element_ty), mask=is_k)
    is_v = p_mask & (head >= num_rot)
    dst = v_cache_ptr + blk * stride_vcb + off * stride_vcs + (head - num_rot) * stride_vch + j
    tl.store(dst, y1.to(v_cache_ptr.dtype.element_ty), mask=is_v)
    tl.store(dst + half, y2.to(v_cache_ptr.dtype.element_ty), mask=is_v)


def norm_qkv_rotary_store(
    x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
    weight: torch.Tensor, bias: torch.Tensor | None, num_q_heads: int, num_kv_heads: int,
    cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    block_p: int | None = None, block_k: int | None = None, num_warps: int = 4, pdl: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rotated q (T, Hq, D), x + residual): see engine.fused.norm_qkv_rotary_store."""
    rows, k = x.shape
    d = k_cache.shape[-1]
    n = (num_q_heads + 2 * num_kv_heads) * d
    assert weight.shape == (n, k) and x.stride(-1) == 1 and weight.stride(-1) == 1 and d % 2 == 0
    assert residual is None or residual.stride(-1) == 1
    assert cos.stride(-1) == 1 and sin.stride(-1) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1
    q = torch.empty((rows, num_q_heads, d), dtype=weight.dtype, device=x.device)
    res_out = torch.empty_like(x) if residual is not None else x
    if rows:
        auto_n, auto_k = tiles(rows, n, k, x.device)
        block_p, block_k = block_p or max(1, auto_n // 2), block_k or auto_k  # a pair is two weight rows
        res = residual if residual is not None else x
        _norm_qkv_rotary_kernel[(rows * triton.cdiv(n // 2, block_p),)](
            x, res, norm_weight, weight, bias if bias is not None else weight, q, res_out, cos, sin,
            k_cache, v_cache, slot_mapping,
            rows, k, eps, num_q_heads, num_kv_heads, d // 2, k_cache.shape[1],
            x.stride(0), res.stride(0), weight.stride(0), q.stride(0), q.stride(1), res_out.stride(0),
            cos.stride(0), sin.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            HAS_RES=residual is not None, HAS_BIAS=bias is not None, BLOCK_P=block_p, BLOCK_K=block_k,
            PDL=pdl, **launch_options(pdl), num_warps=num_warps,
        )
    return q, res_out

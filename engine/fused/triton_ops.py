"""Triton versions of engine.fused.ref: one program per token row, fp32 arithmetic inside."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_cols, eps,
    stride_x, stride_r, stride_o, stride_ro,
    HAS_RES: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RES:
        # the sum is rounded to the model dtype first: it is the residual stream HF keeps
        x = (x.to(tl.float32) + tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=mask)
    h = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(h * h, 0) / n_cols + eps)
    y = (h * inv).to(x.dtype).to(tl.float32)  # cast back before the weight, as HF
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (w * y).to(out_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    rows = x2.shape[0]
    out = torch.empty((rows, n), dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if residual is None:
        res_in, res_out = x2, x2  # unused: HAS_RES is off
    else:
        res_in = residual.reshape(-1, n)
        res_out = torch.empty_like(x2)
    if rows:
        _add_rms_norm_kernel[(rows,)](
            x2, res_in, weight, out, res_out, n, eps,
            x2.stride(0), res_in.stride(0), out.stride(0), res_out.stride(0),
            HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(n), num_warps=4,
        )
    return out.view(x.shape), (x if residual is None else res_out.view(x.shape))


@triton.jit
def _cos_sin(cos_ptr, sin_ptr, t, stride_ct, stride_st, d, d_mask):
    """Token t's half-width cos and sin rows (fp32), broadcastable over heads."""
    cos = tl.load(cos_ptr + t * stride_ct + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + t * stride_st + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    return cos, sin


@triton.jit
def _rotated_halves(x_ptr, t, stride_xt, stride_xh, h, d, half, mask, cos, sin):
    """The two rotated halves (fp32) of heads h of token t: HF's x*cos + rotate_half(x)*sin."""
    src = x_ptr + t * stride_xt + h[:, None] * stride_xh + d[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def _rotary_kernel(
    x_ptr, out_ptr, cos_ptr, sin_ptr, num_heads, half,
    stride_xt, stride_xh, stride_ot, stride_oh, stride_ct, stride_st,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < half
    mask = (h[:, None] < num_heads) & d_mask[None, :]
    cos, sin = _cos_sin(cos_ptr, sin_ptr, t, stride_ct, stride_st, d, d_mask)
    y1, y2 = _rotated_halves(x_ptr, t, stride_xt, stride_xh, h, d, half, mask, cos, sin)
    dst = out_ptr + t * stride_ot + h[:, None] * stride_oh + d[None, :]
    tl.store(dst, y1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + half, y2.to(out_ptr.dtype.element_ty), mask=mask)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    t, heads, d = x.shape
    out = torch.empty((t, heads, d), dtype=x.dtype, device=x.device)
    assert x.stride(2) == 1 and cos.stride(-1) == 1 and sin.stride(-1) == 1
    if t:
        _rotary_kernel[(t,)](
            x, out, cos, sin, heads, d // 2,
            x.stride(0), x.stride(1), out.stride(0), out.stride(1), cos.stride(0), sin.stride(0),
            BLOCK_H=triton.next_power_of_2(heads), BLOCK_D=triton.next_power_of_2(d // 2), num_warps=1,
        )
    return out


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


@triton.jit
def _rotary_store_kv_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    num_q_heads, num_kv_heads, half, block_size,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_ct, stride_st, stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per token: its q heads rotated to q_out, its k heads rotated and its v heads
    # copied into the token's cache slot. Three launches (rotary q, rotary k, store) become one.
    t = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < half
    cos, sin = _cos_sin(cos_ptr, sin_ptr, t, stride_ct, stride_st, d, d_mask)
    hq = tl.arange(0, BLOCK_HQ)
    mask = (hq[:, None] < num_q_heads) & d_mask[None, :]
    y1, y2 = _rotated_halves(q_ptr, t, stride_qt, stride_qh, hq, d, half, mask, cos, sin)
    dst = q_out_ptr + t * stride_ot + hq[:, None] * stride_oh + d[None, :]
    tl.store(dst, y1.to(q_out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + half, y2.to(q_out_ptr.dtype.element_ty), mask=mask)

    slot = tl.load(slot_ptr + t).to(tl.int64)
    blk = slot // block_size
    off = slot % block_size
    hk = tl.arange(0, BLOCK_HK)
    mask = (hk[:, None] < num_kv_heads) & d_mask[None, :]
    y1, y2 = _rotated_halves(k_ptr, t, stride_kt, stride_kh, hk, d, half, mask, cos, sin)
    # the reference rounds the rotated k to the model dtype before the cache's: do the same
    dst = k_cache_ptr + blk * stride_kcb + off * stride_kcs + hk[:, None] * stride_kch + d[None, :]
    tl.store(dst, y1.to(k_ptr.dtype.element_ty).to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + half, y2.to(k_ptr.dtype.element_ty).to(k_cache_ptr.dtype.element_ty), mask=mask)
    src = v_ptr + t * stride_vt + hk[:, None] * stride_vh + d[None, :]
    dst = v_cache_ptr + blk * stride_vcb + off * stride_vcs + hk[:, None] * stride_vch + d[None, :]
    tl.store(dst, tl.load(src, mask=mask).to(v_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + half, tl.load(src + half, mask=mask).to(v_cache_ptr.dtype.element_ty), mask=mask)


def rotary_store_kv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
) -> torch.Tensor:
    t, hq, d = q.shape
    hk = k.shape[1]
    assert q.stride(2) == 1 and k.stride(2) == 1 and v.stride(2) == 1 and d % 2 == 0
    assert cos.stride(-1) == 1 and sin.stride(-1) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1
    out = torch.empty((t, hq, d), dtype=q.dtype, device=q.device)
    if t:
        _rotary_store_kv_kernel[(t,)](
            q, k, v, cos, sin, out, k_cache, v_cache, slot_mapping,
            hq, hk, d // 2, k_cache.shape[1],
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
            cos.stride(0), sin.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            BLOCK_HQ=triton.next_power_of_2(hq), BLOCK_HK=triton.next_power_of_2(hk),
            BLOCK_D=triton.next_power_of_2(d // 2), num_warps=1,
        )
    return out


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, n_cols, stride_g, stride_u, stride_o, BLOCK: tl.constexpr):
    # rows may be strided: gate and up are usually the two halves of one merged matmul's output
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (g * tl.sigmoid(g) * u).to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    n = gate.shape[-1]
    g2, u2 = gate.reshape(-1, n), up.reshape(-1, n)
    if g2.stride(-1) != 1 or u2.stride(-1) != 1:
        g2, u2 = g2.contiguous(), u2.contiguous()
    out = torch.empty(g2.shape, dtype=gate.dtype, device=gate.device)
    rows = g2.shape[0]
    if rows and n:
        block = min(1024, triton.next_power_of_2(n))
        _silu_mul_kernel[(rows, triton.cdiv(n, block))](
            g2, u2, out, n, g2.stride(0), u2.stride(0), out.stride(0), BLOCK=block, num_warps=4,
        )
    return out.view(gate.shape)

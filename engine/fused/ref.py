"""Pure-torch references of the fused ops: HF's arithmetic, op for op (the CPU path)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if residual is not None:
        x = x + residual
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        # one fused kernel; in fp32 HF's casts are no-ops and the result is bit-identical
        return F.rms_norm(x, (x.shape[-1],), weight, eps), x
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype), x  # cast back before the weight, as HF's LlamaRMSNorm


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # HF's x*cos + rotate_half(x)*sin per half: x1*cos - x2*sin and x2*cos + x1*sin
    x1, x2 = x.chunk(2, dim=-1)
    out = torch.empty_like(x)
    o1, o2 = out.chunk(2, dim=-1)
    torch.mul(x1, cos, out=o1)
    o1.addcmul_(x2, sin, value=-1.0)
    torch.mul(x2, cos, out=o2)
    o2.addcmul_(x1, sin)
    return out


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def rotary_store_kv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """`rotary`, then rotated k and v into flat cache slots (the attention reference's store_kv);
    returns the rotated q."""
    q, k = rotary(q, k, cos, sin)
    heads, dim = k_cache.shape[-2:]
    slots = slot_mapping.long()  # int32 where the decode graphs' static buffers hold them
    k_cache.view(-1, heads, dim).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, heads, dim).index_copy_(0, slots, v.to(v_cache.dtype))
    return q


def split_heads(
    qkv: torch.Tensor, num_q_heads: int, num_kv_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (T, Hq, D), k and v (T, Hkv, D): views of a merged q/k/v matmul's output (T, (Hq + 2 Hkv) D)."""
    t, d = qkv.shape[0], head_dim
    q, k, v = qkv.split([num_q_heads * d, num_kv_heads * d, num_kv_heads * d], -1)
    return q.view(t, num_q_heads, d), k.view(t, num_kv_heads, d), v.view(t, num_kv_heads, d)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           out_dtype: torch.dtype | None = None) -> torch.Tensor:
    out = F.linear(x, weight, bias)
    return out if out_dtype is None else out.to(out_dtype)


def norm_linear(
    x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
    weight: torch.Tensor, bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(linear(add_rms_norm(x, residual)), x + residual)."""
    h, residual = add_rms_norm(x, residual, norm_weight, eps)
    return F.linear(h, weight, bias), residual


def silu_mul_linear(gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """linear(silu(gate) * up) where gate_up holds [gate | up] (a merged gate/up matmul's output)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.linear(silu_mul(gate, up), weight, bias)


def norm_qkv_rotary_store(
    x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
    weight: torch.Tensor, bias: torch.Tensor | None, num_q_heads: int, num_kv_heads: int,
    cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rotary_store_kv of the merged q/k/v matmul of norm(x + residual), x + residual)."""
    qkv, residual = norm_linear(x, residual, norm_weight, eps, weight, bias)
    q, k, v = split_heads(qkv, num_q_heads, num_kv_heads, k_cache.shape[-1])
    return rotary_store_kv(q, k, v, cos, sin, k_cache, v_cache, slot_mapping), residual

"""Fused elementwise ops of the decoder layers: one kernel where eager torch launches several.

On a GPU a decode step of a small model is bound by kernel count, not bytes (an HF-exact
RMSNorm alone is seven launches). Each op has a pure-torch reference in `ref` with the same
signature, which is the CPU path and the oracle of the Triton version in `triton_ops`; the
dispatch below picks Triton for CUDA tensors, the reference elsewhere. `norm_linear` and
`silu_mul_linear` fold the op into the next Linear's launch where that Linear is a `GemvLinear`
taking the batch (engine/fused/gemv.py; its kernels in `triton_gemv`), and
`norm_qkv_rotary_store` folds rotary and the K/V cache write into the q/k/v GEMV too (`triton_qkv`).
"""
from __future__ import annotations

import torch
from torch import nn

from engine.fused import ref
from engine.fused.gemv import GemvLinear
from engine.fused.ref import split_heads


def _on_gpu(x: torch.Tensor) -> bool:
    return x.is_cuda


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual) * weight, x + residual); residual None means zero."""
    if _on_gpu(x):
        from engine.fused import triton_ops

        return triton_ops.add_rms_norm(x, residual, weight, eps)
    return ref.add_rms_norm(x, residual, weight, eps)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q (T, Hq, D) and k (T, Hk, D) rotated by half-width cos/sin (T, 1, D/2), HF's layout."""
    if _on_gpu(q):
        from engine.fused import triton_ops

        return triton_ops.rotary(q, k, cos, sin)
    return ref.rotary(q, k, cos, sin)


def rotary_store_kv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """`rotary` on q and k, rotated k and v written to flat cache slots `slot_mapping` (T,) of
    caches (num_blocks, block_size, Hk, D); returns the rotated q."""
    if _on_gpu(q):
        from engine.fused import triton_ops

        return triton_ops.rotary_store_kv(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)
    return ref.rotary_store_kv(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up: the SwiGLU product."""
    if _on_gpu(gate):
        from engine.fused import triton_ops

        return triton_ops.silu_mul(gate, up)
    return ref.silu_mul(gate, up)


def norm_linear(
    x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float, linear: nn.Module
) -> tuple[torch.Tensor, torch.Tensor]:
    """(linear(add_rms_norm(x, residual, norm_weight, eps)), x + residual)."""
    if isinstance(linear, GemvLinear) and linear.takes(x):
        from engine.fused import triton_gemv

        return triton_gemv.norm_linear(x.contiguous(), residual, norm_weight, eps, linear.weight, linear.bias,
                                       pdl=linear.pdl)
    h, residual = add_rms_norm(x, residual, norm_weight, eps)
    return linear(h), residual


def silu_mul_linear(gate_up: torch.Tensor, linear: nn.Module) -> torch.Tensor:
    """linear(silu(gate) * up) where gate_up (T, 2I) holds [gate | up]."""
    if isinstance(linear, GemvLinear) and linear.takes(gate_up):
        from engine.fused import triton_gemv

        return triton_gemv.silu_mul_linear(gate_up.contiguous(), linear.weight, linear.bias, pdl=linear.pdl)
    gate, up = gate_up.chunk(2, dim=-1)
    return linear(silu_mul(gate, up))


def norm_qkv_rotary_store(
    x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float, linear: nn.Module,
    num_q_heads: int, num_kv_heads: int, cos: torch.Tensor, sin: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rotated q, x + residual) where `linear` is the merged q/k/v projection of norm(x + residual):
    its k rotated and its v are written to their cache slots as `rotary_store_kv` does."""
    if isinstance(linear, GemvLinear) and linear.takes(x):
        from engine.fused import triton_qkv

        return triton_qkv.norm_qkv_rotary_store(
            x.contiguous(), residual, norm_weight, eps, linear.weight, linear.bias, num_q_heads, num_kv_heads,
            cos, sin, k_cache, v_cache, slot_mapping, pdl=linear.pdl,
        )
    qkv, residual = norm_linear(x, residual, norm_weight, eps, linear)
    q, k, v = split_heads(qkv, num_q_heads, num_kv_heads, k_cache.shape[-1])
    return rotary_store_kv(q, k, v, cos, sin, k_cache, v_cache, slot_mapping), residual

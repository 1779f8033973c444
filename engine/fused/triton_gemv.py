"""Small-batch matmuls (GEMV) with the preceding elementwise op fused into their input load.

A batch-1 decode step reads every weight once and does little else, so on a GPU it should run at
memory bandwidth. Through cuBLAS each Linear is one launch, and each RMSNorm and SwiGLU product
in front of one is another: per LLaMA layer, 3 of its 9 launches only move a row of a few KB.
Here the norm (with its residual add) or the SwiGLU product is computed while the matmul loads
its input, so a layer is 6 launches (5 where engine.fused.triton_qkv also folds rotary and the
K/V write into the q/k/v GEMV). A program multiplies one input row by a block of weight rows, and
recomputes the norm of its input row: a few KB, read from L2.

Arithmetic follows engine.fused.ref: fp32 inside, the norm's and SwiGLU's results rounded to the
model dtype before the matmul (as their own kernels would store them), the output rounded to the
weight dtype (as F.linear returns it) before it is stored, in `out_dtype` if one is given.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.fused.pdl import launch_options, wait_for_previous

PLAIN, NORM, SILU_MUL = 0, 1, 2  # the prologue applied to the input rows


@triton.jit
def _norm_input(x_ptr, res_ptr, k, mask, HAS_RES: tl.constexpr):
    """x + residual at k, rounded to x's dtype (the residual stream HF keeps)."""
    x = tl.load(x_ptr + k, mask=mask, other=0.0)
    if HAS_RES:
        x = (x.to(tl.float32) + tl.load(res_ptr + k, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
    return x


@triton.jit
def _inv_rms(x_row, res_row, res_out_row, K, eps, store_sum, HAS_RES: tl.constexpr, BLOCK_K: tl.constexpr):
    """1 / rms of the input row x + res, in fp32 (a first pass over the row); where `store_sum`,
    x + res is also stored to res_out_row (one program per row does it)."""
    offs_k = tl.arange(0, BLOCK_K)
    squares = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        h = _norm_input(x_row, res_row, k, k < K, HAS_RES)
        if HAS_RES:
            if store_sum:
                tl.store(res_out_row + k, h, mask=k < K)
        h = h.to(tl.float32)
        squares += h * h
    return tl.rsqrt(tl.sum(squares, 0) / K + eps)


@triton.jit
def _input_tile(x_row, res_row, nw_ptr, kk, mask, inv, K, PROLOGUE: tl.constexpr, HAS_RES: tl.constexpr):
    """The matmul's input at offsets kk, in fp32: x, norm(x + res) * nw (`inv` from `_inv_rms`),
    or silu(gate) * up where the row holds [gate | up]; each op's result rounded to x's dtype."""
    x_dtype = x_row.dtype.element_ty
    if PROLOGUE == 1:
        h = _norm_input(x_row, res_row, kk, mask, HAS_RES).to(tl.float32)
        y = (h * inv).to(x_dtype).to(tl.float32)  # cast back before the weight, as HF
        nw = tl.load(nw_ptr + kk, mask=mask, other=0.0).to(tl.float32)
        a = (nw * y).to(x_dtype).to(tl.float32)
    elif PROLOGUE == 2:
        g = tl.load(x_row + kk, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(x_row + K + kk, mask=mask, other=0.0).to(tl.float32)
        a = (g * tl.sigmoid(g) * u).to(x_dtype).to(tl.float32)
    else:
        a = tl.load(x_row + kk, mask=mask, other=0.0).to(tl.float32)
    return a


@triton.jit
def _weight_tile(w_rows, n_mask, k, K):
    """Weight rows `w_rows` (pointers, (BLOCK_N, 1)) at columns k; past K nothing is read."""
    return tl.load(w_rows + k[None, :], mask=n_mask[:, None] & (k < K)[None, :], other=0.0)


@triton.jit
def _gemv_rows(
    x_row, res_row, res_out_row, nw_ptr, w_ptr, b_ptr, n, n_mask, K, eps, stride_w, store_sum,
    PROLOGUE: tl.constexpr, HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):
    """sum_k a[k] * w[n, k] (+ b[n]) for one input row and the weight rows n, in fp32 after
    rounding to the weight dtype (as F.linear returns it); a is x, norm(x + res) * nw (x + res
    stored to res_out_row where `store_sum`), or silu(gate) * up where x holds [gate | up]."""
    # int64 row offsets: a large vocabulary projection passes 2**31 elements
    w_rows = w_ptr + n.to(tl.int64)[:, None] * stride_w
    offs_k = tl.arange(0, BLOCK_K)
    if PDL:
        # No kernel writes weights: with PDL the first tile's load is issued before the wait, so
        # it is in flight while the previous kernel finishes. Each step then loads the next.
        w = _weight_tile(w_rows, n_mask, offs_k, K)
    wait_for_previous(PDL)
    inv = 0.0
    if PROLOGUE == 1:
        inv = _inv_rms(x_row, res_row, res_out_row, K, eps, store_sum, HAS_RES, BLOCK_K)
    # one product per weight element, summed over K once after the loop. The input row is loaded
    # broadcast to the weight tile's shape (each weight row's copy from L1): the tile and the
    # input then share one register layout, with no shuffle through shared memory in the loop.
    acc = tl.zeros((n.shape[0], BLOCK_K), dtype=tl.float32)
    rows0 = 0 * n[:, None]  # (BLOCK_N, 1) zeros
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        kk = k[None, :] + rows0  # (BLOCK_N, BLOCK_K) input offsets, equal down the rows
        mask = n_mask[:, None] & (k < K)[None, :]
        a = _input_tile(x_row, res_row, nw_ptr, kk, mask, inv, K, PROLOGUE, HAS_RES)
        if not PDL:
            w = _weight_tile(w_rows, n_mask, k, K)
        acc += a * w.to(tl.float32)
        if PDL:
            w = _weight_tile(w_rows, n_mask, k + BLOCK_K, K)  # past K on the last step: no load
    out = tl.sum(acc, 1)
    if HAS_BIAS:
        out += tl.load(b_ptr + n, mask=n_mask, other=0.0).to(tl.float32)
    return out.to(w_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _gemv_kernel(
    x_ptr, res_ptr, nw_ptr, w_ptr, b_ptr, out_ptr, res_out_ptr,
    M, N, K, eps,
    stride_x, stride_r, stride_w, stride_o, stride_ro,
    PROLOGUE: tl.constexpr, HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):
    # Program (m, block): input row m and BLOCK_N weight rows. The rows of a batch are adjacent
    # programs, so they read a weight block together (the second from L2); the first block also
    # stores x + res.
    pid = tl.program_id(0)
    m = (pid % M).to(tl.int64)
    block = pid // M
    n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    out = _gemv_rows(x_ptr + m * stride_x, res_ptr + m * stride_r, res_out_ptr + m * stride_ro, nw_ptr, w_ptr, b_ptr,
                     n, n_mask, K, eps, stride_w, block == 0, PROLOGUE, HAS_RES, HAS_BIAS, BLOCK_K, PDL)
    tl.store(out_ptr + m * stride_o + n, out.to(out_ptr.dtype.element_ty), mask=n_mask)


def _num_sms(device: torch.device) -> int:
    # the interpreter (CPU tensors) runs programs one after another: there, fewer is faster
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0


def tiles(rows: int, n: int, k: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K). A K tile of 256-1,024 (the one padding K least: each thread loads 16
    contiguous bytes of a weight row), ~4K weights per step of the K loop, and weight-row blocks
    halved down to 2 until there are ~4 programs per SM: bandwidth needs loads in flight."""
    block_k = min((1024, 512, 256), key=lambda b: triton.cdiv(k, b) * b - k)  # ties: the largest
    block_k = min(block_k, max(32, triton.next_power_of_2(k)))
    block_n = max(2, min(16, 4096 // block_k))
    programs = 4 * _num_sms(device)
    while block_n > 2 and rows * triton.cdiv(n, block_n) < programs:
        block_n //= 2
    return block_n, block_k


def _launch(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, prologue: int,
    k: int, residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
    res_out: torch.Tensor | None = None, eps: float = 0.0,
    block_n: int | None = None, block_k: int | None = None, num_warps: int = 4, pdl: bool = False,
) -> None:
    rows, n = x.shape[0], weight.shape[0]
    assert x.stride(-1) == 1 and weight.stride(-1) == 1 and weight.shape[1] == k
    if not rows or not n:
        return
    auto_n, auto_k = tiles(rows, n, k, x.device)
    block_n, block_k = block_n or auto_n, block_k or auto_k
    res = residual if residual is not None else x
    res_out = res_out if res_out is not None else out
    _gemv_kernel[(rows * triton.cdiv(n, block_n),)](
        x, res, norm_weight if norm_weight is not None else weight, weight,
        bias if bias is not None else weight, out, res_out,
        rows, n, k, eps,
        x.stride(0), res.stride(0), weight.stride(0), out.stride(0), res_out.stride(0),
        PROLOGUE=prologue, HAS_RES=residual is not None, HAS_BIAS=bias is not None,
        BLOCK_N=block_n, BLOCK_K=block_k, PDL=pdl, **launch_options(pdl), num_warps=num_warps,
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           out_dtype: torch.dtype | None = None, **tile) -> torch.Tensor:
    out = torch.empty((x.shape[0], weight.shape[0]), dtype=out_dtype or weight.dtype, device=x.device)
    _launch(x, weight, bias, out, PLAIN, x.shape[1], **tile)
    return out


def norm_linear(
    x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
    weight: torch.Tensor, bias: torch.Tensor | None = None, **tile,
) -> tuple[torch.Tensor, torch.Tensor]:
    assert residual is None or residual.stride(-1) == 1
    out = torch.empty((x.shape[0], weight.shape[0]), dtype=weight.dtype, device=x.device)
    res_out = torch.empty_like(x) if residual is not None else None
    _launch(x, weight, bias, out, NORM, x.shape[1], residual, norm_weight, res_out, eps, **tile)
    return out, (x if res_out is None else res_out)


def silu_mul_linear(gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    **tile) -> torch.Tensor:
    out = torch.empty((gate_up.shape[0], weight.shape[0]), dtype=weight.dtype, device=gate_up.device)
    _launch(gate_up, weight, bias, out, SILU_MUL, gate_up.shape[1] // 2, **tile)
    return out

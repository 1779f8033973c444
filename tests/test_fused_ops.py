"""Fused Triton ops (engine.fused.triton_ops) against their torch references, on CPU under
TRITON_INTERPRET=1 in fp32 and, when CUDA is there, compiled in bf16 at a real model's sizes."""
from __future__ import annotations

import os
import sys

import pytest
import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from engine.fused import ref, triton_ops  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE, TOL = (torch.bfloat16, 1e-2) if DEVICE == "cuda" else (torch.float32, 1e-5)
skip_interp = pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="triton imported uninterpreted earlier in this process")


def rel(out: torch.Tensor, want: torch.Tensor) -> float:
    return float((out.float() - want.float()).norm() / want.float().norm())


def rand(*shape: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(DEVICE, DTYPE)


def cos_sin(tokens: int, d: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Half-width cos and sin rows (tokens, 1, d / 2) looked up by random positions in a table of
    [cos | sin] halves, as the model does."""
    table = rand(64, d, gen=gen)
    pos = torch.randint(0, 64, (tokens,), generator=gen).to(DEVICE)
    cos, sin = table[pos].chunk(2, dim=-1)
    return cos[:, None, :], sin[:, None, :]


def assert_cache_writes(caches: list[torch.Tensor], want_caches: list[torch.Tensor], slots: torch.Tensor) -> None:
    """The written slots equal the reference's, and every other slot is untouched."""
    for got_cache, want_cache in zip(caches, want_caches):
        flat_got, flat_want = got_cache.flatten(0, 1), want_cache.flatten(0, 1)
        others = torch.ones(flat_got.shape[0], dtype=torch.bool, device=DEVICE)
        others[slots.long()] = False
        assert torch.equal(flat_got[others], flat_want[others])
        assert rel(flat_got[slots.long()], flat_want[slots.long()]) <= TOL


@skip_interp
@pytest.mark.parametrize("rows,hidden,with_res", [(1, 64, True), (7, 96, False), (33, 576, True)])
def test_add_rms_norm(rows, hidden, with_res):
    gen = torch.Generator().manual_seed(rows * hidden)
    x, w = rand(rows, hidden, gen=gen), rand(hidden, gen=gen)
    res = rand(rows, hidden, gen=gen) if with_res else None
    out, new_res = triton_ops.add_rms_norm(x, res, w, 1e-5)
    want, want_res = ref.add_rms_norm(x, res, w, 1e-5)
    assert rel(out, want) <= TOL and rel(new_res, want_res) <= TOL
    assert new_res.shape == x.shape and out.dtype == want.dtype


@skip_interp
@pytest.mark.parametrize("tokens,hq,hk,d", [(1, 4, 2, 16), (5, 9, 3, 64), (17, 8, 8, 128)])
def test_rotary(tokens, hq, hk, d):
    gen = torch.Generator().manual_seed(tokens + d)
    cos, sin = cos_sin(tokens, d, gen)
    qkv = rand(tokens, (hq + 2 * hk) * d, gen=gen)  # q and k as views of a merged q/k/v matmul
    q, k, _ = qkv.split([hq * d, hk * d, hk * d], -1)
    q, k = q.view(tokens, hq, d), k.view(tokens, hk, d)
    for out, want in zip(triton_ops.rotary(q, k, cos, sin), ref.rotary(q, k, cos, sin)):
        assert rel(out, want) <= TOL


@skip_interp
@pytest.mark.parametrize("tokens,hq,hk,d,block_size", [(1, 4, 2, 16, 4), (6, 9, 3, 64, 16), (13, 8, 8, 128, 8)])
def test_rotary_store_kv(tokens, hq, hk, d, block_size):
    """Rotated q out, rotated k and v in their cache slots (scattered, some blocks partly
    filled), every other slot untouched: one launch equals rotary + the reference store."""
    gen = torch.Generator().manual_seed(tokens * d + hk)
    cos, sin = cos_sin(tokens, d, gen)
    qkv = rand(tokens, (hq + 2 * hk) * d, gen=gen)  # q, k, v as views of a merged matmul
    q, k, v = (x.view(tokens, -1, d) for x in qkv.split([hq * d, hk * d, hk * d], -1))
    num_blocks = 2 * tokens // block_size + 2
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens].to(DEVICE)
    if block_size == 8:
        slots = slots.int()  # as the decode graphs' static buffers hold them
    caches = [rand(num_blocks, block_size, hk, d, gen=gen) for _ in range(2)]
    want_caches = [c.clone() for c in caches]
    out = triton_ops.rotary_store_kv(q, k, v, cos, sin, *caches, slots)
    want = ref.rotary_store_kv(q, k, v, cos, sin, *want_caches, slots)
    assert rel(out, want) <= TOL
    for got_cache, want_cache in zip(caches, want_caches):
        assert rel(got_cache, want_cache) <= TOL
    assert_cache_writes(caches, want_caches, slots)


@skip_interp
@pytest.mark.parametrize("shape", [(1, 128), (9, 1536), (3, 1000)])
def test_silu_mul(shape):
    gen = torch.Generator().manual_seed(shape[1])
    g, u = rand(*shape, gen=gen), rand(*shape, gen=gen)
    assert rel(triton_ops.silu_mul(g, u), ref.silu_mul(g, u)) <= TOL
    g, u = rand(shape[0], 2 * shape[1], gen=gen).split(shape[1], -1)  # halves of a merged matmul
    assert rel(triton_ops.silu_mul(g, u), ref.silu_mul(g, u)) <= TOL


# GEMV shapes (rows, out N, in K): on CPU small and ragged (K not a multiple of the tile); on the
# GPU the merged matmuls of SmolLM2-135M and of Llama-3.2-1B, vocabulary projections included.
GEMV_SHAPES = [(1, 37, 72), (3, 64, 96), (4, 130, 200), (2, 5, 33)] if DEVICE == "cpu" else [
    (1, 960, 576), (4, 3072, 576), (1, 576, 1536), (1, 49152, 576),
    (1, 3072, 2048), (2, 16384, 2048), (1, 2048, 8192), (1, 128256, 2048),
]
SMALL_TILES = dict(block_n=4, block_k=32) if DEVICE == "cpu" else {}  # several K steps on CPU shapes
# With programmatic dependent launch a GEMV loads each next weight tile a step ahead (the first one
# before its wait): checked interpreted on CPU, and compiled where the GPU has PDL (sm_90+).
PDL_MODES = [False, True] if DEVICE == "cpu" or torch.cuda.get_device_capability()[0] >= 9 else [False]


def gemv_inputs(rows: int, n: int, k: int, gen: torch.Generator):
    # unit-scale outputs whatever K: the tolerance then means the same thing at every size
    return rand(rows, k, gen=gen), rand(n, k, gen=gen) * k**-0.5, rand(n, gen=gen)


@skip_interp
@pytest.mark.parametrize("rows,n,k", GEMV_SHAPES)
@pytest.mark.parametrize("pdl", PDL_MODES)
def test_gemv_linear(pdl, rows, n, k):
    from engine.fused import triton_gemv

    gen = torch.Generator().manual_seed(rows * n + k)
    x, w, b = gemv_inputs(rows, n, k, gen)
    assert rel(triton_gemv.linear(x, w, b, pdl=pdl), ref.linear(x, w, b)) <= TOL
    out = triton_gemv.linear(x, w, None, torch.float32, pdl=pdl, **SMALL_TILES)  # a vocabulary projection's fp32 logits
    want = ref.linear(x, w, None, torch.float32)
    assert out.dtype == torch.float32 and rel(out, want) <= TOL


@skip_interp
@pytest.mark.parametrize("rows,n,k", GEMV_SHAPES)
@pytest.mark.parametrize("pdl", PDL_MODES)
def test_norm_linear(pdl, rows, n, k):
    """RMSNorm (with and without a residual to add first) folded into the matmul's input load;
    the residual sum is stored once, by the first program, whole."""
    from engine.fused import triton_gemv

    gen = torch.Generator().manual_seed(rows + n * k)
    x, w, b = gemv_inputs(rows, n, k, gen)
    res, norm_w = rand(rows, k, gen=gen), rand(k, gen=gen)
    for residual, bias, tile in ((res, b, {}), (None, None, SMALL_TILES), (res, None, SMALL_TILES)):
        out, new_res = triton_gemv.norm_linear(x, residual, norm_w, 1e-5, w, bias, pdl=pdl, **tile)
        want, want_res = ref.norm_linear(x, residual, norm_w, 1e-5, w, bias)
        assert rel(out, want) <= TOL and rel(new_res, want_res) <= TOL
        assert out.shape == (rows, n) and new_res.shape == x.shape


@skip_interp
@pytest.mark.parametrize("rows,n,k", GEMV_SHAPES)
@pytest.mark.parametrize("pdl", PDL_MODES)
def test_silu_mul_linear(pdl, rows, n, k):
    from engine.fused import triton_gemv

    gen = torch.Generator().manual_seed(n + k)
    gate_up, w, b = rand(rows, 2 * k, gen=gen), rand(n, k, gen=gen) * k**-0.5, rand(n, gen=gen)
    assert rel(triton_gemv.silu_mul_linear(gate_up, w, b, pdl=pdl), ref.silu_mul_linear(gate_up, w, b)) <= TOL
    out = triton_gemv.silu_mul_linear(gate_up, w, None, pdl=pdl, **SMALL_TILES)
    assert rel(out, ref.silu_mul_linear(gate_up, w)) <= TOL


# (rows, q heads, kv heads, head dim, hidden K): ragged on CPU (K not a multiple of the tile, a
# head dim whose pairs straddle tiles); on the GPU SmolLM2-135M's, Llama-3.2-1B's and Qwen2-0.5B's.
QKV_SHAPES = [(1, 4, 2, 16, 40), (3, 6, 2, 8, 72), (2, 4, 4, 32, 33)] if DEVICE == "cpu" else [
    (1, 9, 3, 64, 576), (1, 32, 8, 64, 2048), (4, 14, 2, 64, 896),
]


@skip_interp
@pytest.mark.parametrize("rows,hq,hk,d,k", QKV_SHAPES)
@pytest.mark.parametrize("pdl", PDL_MODES)
def test_norm_qkv_rotary_store(pdl, rows, hq, hk, d, k):
    """The q/k/v GEMV with rotary and the K/V write as its epilogue equals norm_linear followed by
    rotary_store_kv: rotated q out, x + residual out, rotated k and v in their (scattered) cache
    slots and every other slot untouched; with and without residual and bias, int32 and int64
    slots, and tiles down to one rotary pair per program."""
    from engine.fused import triton_qkv

    gen = torch.Generator().manual_seed(rows * k + hq)
    n = (hq + 2 * hk) * d
    x, w, b = gemv_inputs(rows, n, k, gen)
    res, norm_w = rand(rows, k, gen=gen), rand(k, gen=gen)
    cos, sin = cos_sin(rows, d, gen)
    block_size = 4
    num_blocks = rows + 3
    tiles = ({}, dict(block_p=1, block_k=32), dict(block_p=2, block_k=16)) if DEVICE == "cpu" else ({},)
    for i, ((residual, bias), tile) in enumerate(zip(((res, b), (None, None), (res, None)), tiles * 3)):
        slots = torch.randperm(num_blocks * block_size, generator=gen)[:rows].to(DEVICE)
        slots = slots.int() if i == 1 else slots
        caches = [rand(num_blocks, block_size, hk, d, gen=gen) for _ in range(2)]
        want_caches = [c.clone() for c in caches]
        q, new_res = triton_qkv.norm_qkv_rotary_store(x, residual, norm_w, 1e-5, w, bias, hq, hk, cos, sin,
                                                      *caches, slots, pdl=pdl, **tile)
        want_q, want_res = ref.norm_qkv_rotary_store(x, residual, norm_w, 1e-5, w, bias, hq, hk, cos, sin,
                                                     *want_caches, slots)
        assert q.shape == (rows, hq, d) and rel(q, want_q) <= TOL and rel(new_res, want_res) <= TOL
        assert_cache_writes(caches, want_caches, slots)


@skip_interp
def test_gemv_linear_takes_only_small_batches(monkeypatch):
    """A swapped Linear keeps its parameters (a tied head stays the embedding's weight); batches up
    to max_rows take the GEMV, with the norm or SwiGLU in front folded in; larger ones F.linear."""
    from torch import nn

    from engine import fused
    from engine.fused import triton_gemv
    from engine.fused.gemv import GemvLinear, swap_gemv_linears

    gen = torch.Generator().manual_seed(5)
    model = nn.Sequential(nn.Linear(24, 40), nn.Linear(20, 24, bias=False)).to(DEVICE, DTYPE).requires_grad_(False)
    weight = model[0].weight
    assert swap_gemv_linears(model, max_rows=2) == 2
    first, second = model
    assert isinstance(first, GemvLinear) and first.weight is weight
    calls = []
    for name in ("linear", "norm_linear", "silu_mul_linear"):
        fn = getattr(triton_gemv, name)
        monkeypatch.setattr(triton_gemv, name, lambda *a, fn=fn, name=name, **kw: calls.append(name) or fn(*a, **kw))
    norm_w = rand(24, gen=gen)
    for rows in (1, 2, 3):
        x, res = rand(rows, 24, gen=gen), rand(rows, 24, gen=gen)
        calls.clear()
        out, new_res = fused.norm_linear(x, res, norm_w, 1e-6, first)
        want, want_res = ref.norm_linear(x, res, norm_w, 1e-6, weight, first.bias)
        assert rel(out, want) <= TOL and rel(new_res, want_res) <= TOL
        down = fused.silu_mul_linear(out, second)
        assert rel(down, ref.silu_mul_linear(out, second.weight)) <= TOL
        assert rel(first(x), ref.linear(x, weight, first.bias)) <= TOL
        assert calls == (["norm_linear", "silu_mul_linear", "linear"] if rows <= 2 else [])


def test_gemv_tiles(monkeypatch):
    """K tiles that pad K least (16-byte loads per thread), ~4K weights per K step, and weight-row
    blocks halved until an H100 (132 SMs) gets ~4 programs per SM; no halving when interpreted."""
    from engine.fused import triton_gemv

    cpu = torch.device("cpu")
    assert triton_gemv.tiles(1, 960, 576, cpu) == (16, 256)
    monkeypatch.setattr(triton_gemv, "_num_sms", lambda device: 132)
    assert triton_gemv.tiles(1, 16384, 2048, cpu) == (4, 1024)  # Llama-1B gate/up: 4,096 programs
    assert triton_gemv.tiles(1, 2048, 8192, cpu) == (2, 1024)  # its down_proj: 1,024 programs, not 512
    assert triton_gemv.tiles(1, 960, 576, cpu) == (2, 256)  # SmolLM2 q/k/v: few rows, the smallest block
    assert triton_gemv.tiles(4, 3072, 1536, cpu) == (8, 512)
    assert triton_gemv.tiles(1, 40, 24, cpu) == (2, 32)  # K under the smallest tile: one masked step

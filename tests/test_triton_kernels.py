"""Triton attention kernels against the torch reference backend, on fresh random inputs.

Without a GPU the kernels run on CPU tensors under TRITON_INTERPRET=1. Triton reads that
variable when a kernel is decorated (and when triton itself is imported), so it is set here,
before anything below imports triton, and stays set for the rest of the pytest process (nothing
else uses triton on CPU). If this process already holds compiled kernels — triton imported
earlier by another module, or a GPU present — the CPU checks rerun in a subprocess that sets the
variable first, and the GPU checks run here at real sizes in bf16. Without a GPU, one more test
compiles the kernels for sm_90 with triton's bundled ptxas and reads the SASS.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # "0" from outside: the compile check below

import triton.language.standard  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from engine.attention import TorchAttentionBackend, triton_kernels  # noqa: E402
from engine.attention.metadata import AttentionMetadata, RelativePositionBias  # noqa: E402
from engine.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from engine.forward_context import ForwardContext, metadata_for_sequences  # noqa: E402
from engine.input_prep import prepare_inputs  # noqa: E402

# Interpreted kernels need triton's own helpers interpreted too: both decorated under the variable.
INTERPRETED = not torch.cuda.is_available() and all(
    isinstance(f, InterpretedFunction) for f in (triton_kernels._prefill_kernel, triton.language.standard.max)
)
interpreted = pytest.mark.skipif(not INTERPRETED, reason="kernels compiled in this process: see the subprocess test")

# Small tiles so tiny shapes still cover several tiles, partitions and masked tails.
SMALL = dict(block_m=16, block_n=16)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max())


def paged_step(
    totals: list[int], news: list[int], hq: int, hk: int, d: int, block_size: int, causal: bool,
    seed: int, dtype: torch.dtype = torch.float32, device: str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Sequence i has totals[i] keys after this step, the last news[i] of them new.

    Blocks are a random permutation and the caches start as random garbage, so reading a slot
    past seq_len or through the wrong table entry changes the result.
    """
    gen = torch.Generator().manual_seed(seed)
    counts = [-(-n // block_size) for n in totals]
    num_blocks = sum(counts) + 3
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables = [perm[sum(counts[:i]) : sum(counts[: i + 1])] for i in range(len(totals))]
    inp = prepare_inputs(
        [list(range(n)) for n in news], [t - n for t, n in zip(totals, news)], tables,
        [True] * len(totals), block_size, device=device, causal=causal,
    )

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    kc, vc = rand(num_blocks, block_size, hk, d), rand(num_blocks, block_size, hk, d)
    num_new = sum(news)
    q, k, v = rand(num_new, hq, d), rand(num_new, hk, d), rand(num_new, hk, d)
    TorchAttentionBackend().store_kv(k, v, kc, vc, inp.meta.slot_mapping)  # earlier context + this step
    return q, k, v, kc, vc, inp.meta


def t5_bias(num_heads: int, bidirectional: bool, seed: int, device: str = "cpu") -> RelativePositionBias:
    weight = torch.randn(32, num_heads, generator=torch.Generator().manual_seed(seed)).to(device)
    return RelativePositionBias(weight, bidirectional=bidirectional, num_buckets=32, max_distance=20)


def no_prefill_kernel(*args, **kwargs):
    raise AssertionError("a decode-only step must not run the prefill kernel")


# ----------------------------------------------------------------------------- CPU, interpreted


@interpreted
def test_store_kv_writes_the_reference_slots():
    torch.manual_seed(0)
    hk, d, bs, nb = 2, 16, 4, 6
    qkv = torch.randn(7, 3, hk, d)  # k, v as strided views of a fused projection, as models pass them
    k, v = qkv[:, 1], qkv[:, 2]
    slots = torch.randperm(nb * bs)[:7]
    kc, vc = torch.randn(nb, bs, hk, d), torch.randn(nb, bs, hk, d)
    kr, vr = kc.clone(), vc.clone()
    TritonAttentionBackend().store_kv(k, v, kc, vc, slots)
    TorchAttentionBackend().store_kv(k, v, kr, vr, slots)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)
    assert not torch.equal(kc, torch.zeros_like(kc))


@contextmanager
def engine_backend_split(split_k: bool | None, partition_size: int) -> Iterator[None]:
    """Engines built inside take a TritonAttentionBackend with these split-K settings (the
    engine builds its own backend): small partitions let tiny contexts take the split-K path."""
    defaults = TritonAttentionBackend.__init__.__defaults__
    TritonAttentionBackend.__init__.__defaults__ = (split_k, partition_size) + defaults[2:]
    try:
        yield
    finally:
        TritonAttentionBackend.__init__.__defaults__ = defaults


def count_launches(monkeypatch) -> dict[str, int]:
    """Count calls of the decode/prefill launch wrappers (they still run)."""
    calls = {"decode_attention": 0, "prefill_attention": 0}
    for name in calls:
        original = getattr(triton_kernels, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(triton_kernels, name, counted)
    return calls


@interpreted
@pytest.mark.parametrize(
    "block_size, hq, hk, causal, split",
    [(4, 4, 2, True, True), (16, 4, 1, False, False), (4, 2, 2, True, True)],
)
def test_paged_prefill_chunks_mixed_with_decodes(block_size, hq, hk, causal, split, monkeypatch):
    # a chunk over earlier context, a decode, a fresh prompt, a one-key decode, a chunk ending
    # mid-block, a decode over 3 partitions of 16 keys
    totals, news = [9, 6, 23, 1, 18, 40], [4, 1, 23, 1, 11, 1]
    q, _, _, kc, vc, meta = paged_step(totals, news, hq, hk, 16, block_size, causal, seed=block_size + hq)
    calls = count_launches(monkeypatch)
    out = TritonAttentionBackend(split_k=split, partition_size=16, **SMALL).paged_attention(q, kc, vc, meta, 0.3)
    ref = TorchAttentionBackend().paged_attention(q, kc, vc, meta, 0.3)
    assert rel_err(out, ref) < 1e-3
    assert calls == {"decode_attention": 1, "prefill_attention": 1}  # each on its own sequences


@interpreted
@pytest.mark.parametrize(
    "block_size, hq, hk, split",
    [(4, 2, 2, True), (16, 8, 2, False), (16, 4, 2, True)],
)
def test_paged_decode_with_and_without_split_k(block_size, hq, hk, split, monkeypatch):
    monkeypatch.setattr(triton_kernels, "prefill_attention", no_prefill_kernel)
    totals = [37, 5, 64, 70]  # 32-key partitions: 2, 1, 2 and 3 of them; last blocks partly filled
    q, _, _, kc, vc, meta = paged_step(totals, [1] * 4, hq, hk, 16, block_size, True, seed=hq)
    backend = TritonAttentionBackend(split_k=split, partition_size=32, **SMALL)
    assert backend._use_split(4, max(totals), hk, q.device) == split
    out = backend.paged_attention(q, kc, vc, meta, 0.25)
    ref = TorchAttentionBackend().paged_attention(q, kc, vc, meta, 0.25)
    assert rel_err(out, ref) < 1e-3


@interpreted
@pytest.mark.parametrize("causal, hq, hk", [(True, 4, 1), (False, 4, 2)])
def test_varlen_attention(causal, hq, hk):
    torch.manual_seed(3)
    lens = [5, 19, 1]
    q, k, v = torch.randn(25, hq, 16), torch.randn(25, hk, 16), torch.randn(25, hk, 16)
    meta = metadata_for_sequences(lens, causal=causal)
    out = TritonAttentionBackend(**SMALL).varlen_attention(q, k, v, meta, 0.3)
    ref = TorchAttentionBackend().varlen_attention(q, k, v, meta, 0.3)
    assert rel_err(out, ref) < 1e-3


@interpreted
@pytest.mark.parametrize("block_m, block_n, hq, hk, d", [(16, 8, 4, 1, 16), (32, 16, 2, 2, 24), (16, 32, 6, 2, 16)])
@pytest.mark.parametrize("causal", [True, False])
def test_prefill_tiles_every_row_sees_then_the_masked_rest(block_m, block_n, hq, hk, d, causal, monkeypatch):
    # The prefill kernel runs whole key tiles that every row of its row tile sees without masks,
    # then the rest masked. Chunks starting deep in earlier context, a fresh prompt of several row
    # tiles, two new tokens, lengths off the tile grid; 3 query heads per KV head (hq 6, hk 2)
    # split tokens across row tiles; head_dim 24 leaves part of a 32-wide tile masked.
    totals, news = [75, 40, 33, 19], [37, 40, 2, 13]
    q, k, v, kc, vc, meta = paged_step(totals, news, hq, hk, d, 4, causal, seed=block_m + block_n + hq)
    calls = count_launches(monkeypatch)
    triton_backend, ref_backend = TritonAttentionBackend(block_m=block_m, block_n=block_n), TorchAttentionBackend()
    out = triton_backend.paged_attention(q, kc, vc, meta, 0.3)
    assert rel_err(out, ref_backend.paged_attention(q, kc, vc, meta, 0.3)) < 1e-3
    assert calls == {"decode_attention": 0, "prefill_attention": 1}
    # the same tokens attending only among themselves (flat K/V), with and without a T5 bias
    flat = metadata_for_sequences(news, causal=causal)
    for bias in (None, t5_bias(hq, bidirectional=not causal, seed=block_n)):
        out = triton_backend.varlen_attention(q, k, v, flat, 0.3, bias)
        assert rel_err(out, ref_backend.varlen_attention(q, k, v, flat, 0.3, bias)) < 1e-3


@interpreted
def test_t5_bias_in_encoder_prefill_and_decode():
    torch.manual_seed(4)
    hq, hk, d = 4, 4, 16
    triton_backend, ref_backend = TritonAttentionBackend(split_k=True, partition_size=16, **SMALL), TorchAttentionBackend()
    # encoder: bidirectional bias, within the new tokens
    lens = [7, 26]
    q, k, v = torch.randn(33, hq, d), torch.randn(33, hk, d), torch.randn(33, hk, d)
    meta = metadata_for_sequences(lens, causal=False)
    bias = t5_bias(hq, bidirectional=True, seed=5)
    out = triton_backend.varlen_attention(q, k, v, meta, 1.0, bias)
    assert rel_err(out, ref_backend.varlen_attention(q, k, v, meta, 1.0, bias)) < 1e-3
    # decoder self-attention: unidirectional bias, a prefill chunk then split-K decodes
    bias = t5_bias(hq, bidirectional=False, seed=6)
    for news in ([3, 12], [1, 1]):
        q, _, _, kc, vc, meta = paged_step([30, 12], news, hq, hk, d, 4, True, seed=len(news) + news[0])
        out = triton_backend.paged_attention(q, kc, vc, meta, 1.0, bias)
        assert rel_err(out, ref_backend.paged_attention(q, kc, vc, meta, 1.0, bias)) < 1e-3


@interpreted
def test_cross_attention_through_forward_context():
    torch.manual_seed(7)
    hq, hk, d, bs = 4, 2, 16, 4
    enc_lens = [3, 13]
    # encoder K/V stored once; decoder queries see all of them (non-causal), 6 > 3 queries included
    _, _, _, kc, vc, enc_meta = paged_step(enc_lens, enc_lens, hq, hk, d, bs, False, seed=8)
    for query_lens in ([6, 2], [1, 1]):
        cu = torch.tensor([0, query_lens[0], sum(query_lens)], dtype=torch.int32)
        meta = AttentionMetadata(
            cu_seqlens_q=cu, seq_lens=enc_meta.seq_lens, slot_mapping=None, block_tables=enc_meta.block_tables,
            max_seqlen_q=max(query_lens), max_seqlen_k=max(enc_lens), query_lens=tuple(query_lens),
            seq_lens_host=tuple(enc_lens), causal=False,
        )
        q = torch.randn(sum(query_lens), hq, d)
        out = ForwardContext(meta, TritonAttentionBackend(**SMALL), [(kc, vc)]).attend_cross(0, q, 0.3)
        ref = ForwardContext(meta, TorchAttentionBackend(), [(kc, vc)]).attend_cross(0, q, 0.3)
        assert rel_err(out, ref) < 1e-3


@pytest.mark.skipif(INTERPRETED, reason="kernels are interpreted in this process")
def test_interpreted_kernels_in_a_subprocess():
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
    root = Path(__file__).resolve().parents[1]
    cmd = [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
        "-m", "not gpu", "-k", "not subprocess and not hopper", __file__,
    ]
    run = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "skipped" not in run.stdout.splitlines()[-1]  # the interpreted checks really ran


def test_the_engine_and_server_import_no_triton():
    """Triton reads TRITON_INTERPRET when imported: if the engine or the server imported it, a
    test module importing them first would compile the kernels, and every interpreted check here
    and in test_fused_ops would skip. Triton is imported only where a kernel runs."""
    code = "import sys, engine.engine, engine.llm, server.app, server.cli; print('triton' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["False"]


def compile_for_hopper() -> dict[str, dict[str, int]]:
    """Compile the kernels' main variants for sm_90 with triton's bundled ptxas (no GPU needed).

    Returns SASS op counts per variant: HGMMA (Hopper tensor cores), LDL/STL (register spills).
    Needs this module imported with TRITON_INTERPRET=0 so the kernels are JIT functions.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from engine.fused import triton_gemv, triton_ops, triton_qkv

    nvdisasm = Path(triton.__file__).parent / "backends/nvidia/bin/nvdisasm"
    pointers = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "out_ptr": "*bf16", "key_ptr": "*bf16",
                "value_ptr": "*bf16", "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16", "bias_ptr": "*fp32",
                "part_acc_ptr": "*fp32", "part_ml_ptr": "*fp32", "slot_ptr": "*i64", "cos_ptr": "*bf16",
                "sin_ptr": "*bf16", "q_out_ptr": "*bf16", "x_ptr": "*bf16", "res_ptr": "*bf16", "nw_ptr": "*bf16",
                "w_ptr": "*bf16", "b_ptr": "*bf16", "res_out_ptr": "*bf16"}
    prefill = dict(GROUP=4, HAS_SEQ_IDS=False, BLOCK_M=64, BLOCK_N=64, BLOCK_D=128, PRECISION="tf32",
                   HAS_WINDOW=False, SOFTCAP=0.0)
    gemv = dict(HAS_BIAS=False, PDL=False)
    decode = dict(GROUP=4, SPLIT=True, HAS_SEQ_IDS=True, BLOCK_G=16, BLOCK_N=64, BLOCK_D=128, PRECISION="tf32",
                  PDL=False, HAS_WINDOW=False, SOFTCAP=0.0)
    reduce = dict(HAS_SEQ_IDS=False, BLOCK_P=64, CHUNK_P=16, BLOCK_D=128, PDL=False, HAS_WINDOW=False)
    gemma2 = dict(HAS_WINDOW=True, SOFTCAP=50.0)  # a sliding layer of Gemma 2
    variants = {
        "store_kv": (triton_kernels._store_kv_kernel, dict(BLOCK_H=8, BLOCK_D=128)),
        "prefill_paged_causal": (triton_kernels._prefill_kernel, dict(prefill, PAGED=True, CAUSAL=True, HAS_BIAS=False)),
        "prefill_varlen_bias": (triton_kernels._prefill_kernel, dict(prefill, PAGED=False, CAUSAL=False, HAS_BIAS=True)),
        "decode_split_bias": (triton_kernels._decode_kernel, dict(decode, HAS_BIAS=True)),
        "decode_reduce": (triton_kernels._decode_reduce_kernel, reduce),
        "prefill_window_softcap": (triton_kernels._prefill_kernel, dict(prefill, PAGED=True, CAUSAL=True,
                                                                        HAS_BIAS=False, **gemma2)),
        "decode_window_softcap": (triton_kernels._decode_kernel, dict(decode, HAS_BIAS=False, **gemma2)),
        "prefill_varlen_radius": (triton_kernels._prefill_kernel, dict(prefill, PAGED=False, CAUSAL=False,
                                                                       HAS_BIAS=False, HAS_WINDOW=True)),
        "decode_reduce_window": (triton_kernels._decode_reduce_kernel, dict(reduce, HAS_WINDOW=True)),
        "rotary_store_kv": (triton_ops._rotary_store_kv_kernel, dict(BLOCK_HQ=32, BLOCK_HK=8, BLOCK_D=64)),
        # the GEMV's largest tiles: 16 x 256 (SmolLM2's K) and 4 x 1,024 (Llama-1B's)
        "gemv_norm": (triton_gemv._gemv_kernel, dict(gemv, PROLOGUE=1, HAS_RES=True, BLOCK_N=16, BLOCK_K=256)),
        "gemv_silu_mul": (triton_gemv._gemv_kernel, dict(gemv, PROLOGUE=2, HAS_RES=False, BLOCK_N=4, BLOCK_K=1024)),
        # q/k/v with the rotary epilogue: SmolLM2's largest pair block, Llama-1B's on an H100
        "gemv_qkv_rotary": (triton_qkv._norm_qkv_rotary_kernel, dict(gemv, HAS_RES=True, BLOCK_P=8, BLOCK_K=256)),
        "gemv_qkv_rotary_1b": (triton_qkv._norm_qkv_rotary_kernel, dict(gemv, HAS_BIAS=True, HAS_RES=True, BLOCK_P=2,
                                                                         BLOCK_K=1024)),
        # programmatic dependent launch: every decoder-layer kernel that takes it
        "pdl_gemv": (triton_gemv._gemv_kernel, dict(gemv, PDL=True, PROLOGUE=1, HAS_RES=True, BLOCK_N=16, BLOCK_K=256)),
        "pdl_qkv": (triton_qkv._norm_qkv_rotary_kernel, dict(gemv, PDL=True, HAS_RES=True, BLOCK_P=8, BLOCK_K=256)),
        "pdl_decode": (triton_kernels._decode_kernel, dict(decode, PDL=True, SPLIT=False, HAS_BIAS=False)),
        "pdl_decode_reduce": (triton_kernels._decode_reduce_kernel, dict(reduce, PDL=True)),
    }
    report = {}
    for name, (fn, consts) in variants.items():
        # the rest: int32 metadata pointers, int32 sizes and strides, the float scale
        types = dict(pointers, scale_log2="fp32", eps="fp32")
        signature = {
            arg: "constexpr" if arg in consts else types.get(arg, "*i32" if arg.endswith("_ptr") else "i32")
            for arg in fn.arg_names
        }
        # the launch wrappers' defaults
        is_gemv = "gemv" in name or "qkv" in name
        num_warps = 4 if is_gemv else {
            "store_kv": 4, "decode_reduce": 4, "decode_reduce_window": 4, "pdl_decode_reduce": 4,
            "rotary_store_kv": 1}.get(name, 8)
        # a launch specializes pointers, strides, K and head_dim divisible by 16 (as real tensors' are)
        aligned = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(fn.arg_names)
                   if arg.endswith("_ptr") or arg.startswith("stride") or arg in ("K", "head_dim")}
        kernel = triton.compile(ASTSource(fn, signature, constexprs=consts, attrs=aligned), target=GPUTarget("cuda", 90, 32),
                                options=dict(num_warps=num_warps, num_stages=2))
        with open(Path(os.environ.get("TMPDIR", "/tmp")) / f"kvserve_{name}_{os.getpid()}.cubin", "wb") as f:
            f.write(kernel.asm["cubin"])
        sass = subprocess.run([str(nvdisasm), "-c", f.name], capture_output=True, text=True, check=True).stdout
        os.unlink(f.name)
        report[name] = {op: sass.count(op) for op in ("HGMMA", "LDL", "STL", "LDG.E.128", "LDGSTS.E.BYPASS.128")}
        ptx = kernel.asm["ptx"]
        report[name]["griddepcontrol"] = ptx.count("griddepcontrol.")
        report[name]["loads_before_wait"] = ptx[:ptx.find("griddepcontrol.wait")].count("ld.global")
    return report


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests run the compiled kernels")
def test_kernels_compile_for_hopper_without_register_spills():
    import triton

    if not (Path(triton.__file__).parent / "backends/nvidia/bin/ptxas").exists():
        pytest.skip("triton ships no ptxas here")
    env = dict(os.environ, TRITON_INTERPRET="0", CUDA_VISIBLE_DEVICES="", TRITON_DEFAULT_FP_FUSION="1")
    code = "import json, tests.test_triton_kernels as t; print(json.dumps(t.compile_for_hopper()))"
    run = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.splitlines()[-1])
    assert report["prefill_paged_causal"]["HGMMA"] > 0  # wgmma, not the pre-Hopper mma path
    for name in ("gemv_norm", "gemv_silu_mul", "gemv_qkv_rotary", "gemv_qkv_rotary_1b", "pdl_gemv", "pdl_qkv"):
        assert report[name]["LDG.E.128"] > 0, name  # 16-byte weight loads
    assert report["prefill_window_softcap"]["HGMMA"] > 0 and report["prefill_varlen_radius"]["HGMMA"] > 0
    for name in ("prefill_paged_causal", "prefill_varlen_bias", "decode_split_bias", "pdl_decode",
                 "prefill_window_softcap", "decode_window_softcap"):
        assert report[name]["LDGSTS.E.BYPASS.128"] > 0, name  # K/V tiles copied 16 bytes at a time, pipelined
    for name, ops in report.items():  # the wait and the early launch of the next kernel, only where asked
        assert ops["griddepcontrol"] == (2 if name.startswith("pdl") else 0), (name, ops)
    # nothing another kernel writes is read before the wait: attention reads nothing before it,
    # GEMVs only their first weight tile (16 x 256 bf16, or two of 8 x 256: 8 KiB over 128 threads,
    # four 16-byte loads each), a read the wait must not hold back
    assert report["pdl_decode"]["loads_before_wait"] == report["pdl_decode_reduce"]["loads_before_wait"] == 0
    assert report["pdl_gemv"]["loads_before_wait"] == report["pdl_qkv"]["loads_before_wait"] == 4
    for name, ops in report.items():
        assert ops["LDL"] + ops["STL"] <= 16, f"{name} spills registers: {ops}"


# ----------------------------------------------------------------------------- GPU, real sizes


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_paged_prefill_bf16(causal):
    totals, news = [1500, 700, 2048, 333, 4000], [1500, 64, 1, 333, 1]
    q, _, _, kc, vc, meta = paged_step(totals, news, 32, 8, 128, 16, causal, seed=1, dtype=torch.bfloat16, device="cuda")
    out = TritonAttentionBackend().paged_attention(q, kc, vc, meta, 128**-0.5)
    ref = TorchAttentionBackend().paged_attention(q.float(), kc.float(), vc.float(), meta, 128**-0.5)
    assert rel_err(out, ref) <= 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("split_k,pdl", [(True, False), (False, False), (True, True)])
def test_gpu_paged_decode_bf16(split_k, pdl):
    """At real sizes; with PDL where the GPU has it, decode and reduce then launch early and wait."""
    from engine.fused import pdl as gdc

    if pdl and not gdc.supported("cuda"):
        pytest.skip("programmatic dependent launch needs sm_90+")
    totals = [8192, 17, 3000, 32768, 511, 1024, 4097, 100]
    q, _, _, kc, vc, meta = paged_step(totals, [1] * 8, 32, 8, 128, 16, True, seed=2, dtype=torch.bfloat16, device="cuda")
    out = TritonAttentionBackend(split_k=split_k, pdl=pdl).paged_attention(q, kc, vc, meta, 128**-0.5)
    ref = TorchAttentionBackend().paged_attention(q.float(), kc.float(), vc.float(), meta, 128**-0.5)
    assert rel_err(out, ref) <= 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_varlen_with_t5_bias_bf16():
    torch.manual_seed(9)
    lens, hq, d = [300, 77, 1024], 8, 64
    n = sum(lens)
    q, k, v = (torch.randn(n, hq, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    meta = metadata_for_sequences(lens, causal=False, device="cuda")
    bias = t5_bias(hq, bidirectional=True, seed=10, device="cuda")
    out = TritonAttentionBackend().varlen_attention(q, k, v, meta, 1.0, bias)
    ref = TorchAttentionBackend().varlen_attention(q.float(), k.float(), v.float(), meta, 1.0, bias)
    assert rel_err(out, ref) <= 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_tiny_llama_greedy_equals_cpu_reference(tmp_path):
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams
    from tests.tiny_models import save_tiny

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = save_tiny("llama", tmp_path / "llama")
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, 320, (n,), generator=gen).tolist() for n in (3, 40, 17, 90)]
    prompts.append(prompts[3][:50] + [7, 8])  # shares 3 blocks with the 90-token prompt
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    # a small step budget forces chunked prefill next to decodes
    kwargs = dict(num_kv_blocks=64, block_size=16, max_num_batched_tokens=32)
    gpu = LLM(str(folder), device="cuda", **kwargs)
    cpu_outs = LLM(str(folder), device="cpu", enable_prefix_caching=False, **kwargs).generate(prompts, params)
    for _ in range(2):  # the second round prefills every prompt from cached blocks
        gpu_outs = gpu.generate(prompts, params)
        assert [o.outputs[0].token_ids for o in gpu_outs] == [o.outputs[0].token_ids for o in cpu_outs]
    assert gpu.engine.stats().num_prefix_hit_tokens >= 48 + 32 + 16 + 80 + 48


@interpreted
@pytest.mark.parametrize("kind", ["llama", "gemma2", "phi4_partial", "olmo2"])
def test_engine_greedy_with_interpreted_kernels_equals_reference(kind, tmp_path):
    """The whole engine on CPU with the Triton backend: chunked prefills mixed with decodes; for
    Gemma 2, an 8-key window on layer 0 and soft-capped scores through the fused path."""
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams
    from tests.tiny_models import save_tiny

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = save_tiny(kind, tmp_path / kind)
    gen = torch.Generator().manual_seed(12)
    prompts = [torch.randint(0, 320, (n,), generator=gen).tolist() for n in (3, 21, 9)]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    kwargs = dict(num_kv_blocks=32, block_size=4, max_num_batched_tokens=12)
    llm = LLM(str(folder), attention_backend="triton", **kwargs)
    assert isinstance(llm.engine.runner.backend, TritonAttentionBackend)
    triton_outs = llm.generate(prompts, params)
    torch_outs = LLM(str(folder), attention_backend="torch", **kwargs).generate(prompts, params)
    assert [o.outputs[0].token_ids for o in triton_outs] == [o.outputs[0].token_ids for o in torch_outs]
    # prefix-cache hits: the 21-token prompt's first 4 blocks are context the prefill kernel reads
    again = llm.generate([prompts[1]], params)[0]
    assert again.num_cached_tokens == 20 and again.outputs[0].token_ids == torch_outs[1].outputs[0].token_ids


@interpreted
def test_decoder_embedding_model_with_interpreted_kernels_equals_reference(tmp_path):
    """A decoder body serving embeddings (Qwen3-Embedding's shape): the causal varlen kernel over a
    flat batch of whole inputs, no cache, last-token pooling, equal to the torch backend."""
    import json

    from engine.config import EngineConfig
    from engine.embedding_engine import EmbeddingEngine
    from tests.tiny_models import save_tiny

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = save_tiny("qwen3", tmp_path / "qwen3")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["Qwen3Model"]}))
    gen = torch.Generator().manual_seed(14)
    ids = [torch.randint(3, 300, (n,), generator=gen).tolist() for n in (3, 9, 17)]
    outs = {}
    for backend in ("triton", "torch"):
        engine = EmbeddingEngine.from_config(EngineConfig(model=str(folder), attention_backend=backend))
        assert engine.backend.name == backend and engine.causal
        outs[backend] = engine.embed(ids)
    assert rel_err(outs["triton"], outs["torch"]) < 1e-3


@interpreted
def test_decode_graph_buffers_with_interpreted_kernels_equal_reference(tmp_path):
    """The CUDA-graph decode path without capture: padded batches (3 -> 4, 5 -> 8), a scratch
    block for padding rows, static buffers refilled every step, and eager fallback above the
    largest size, all under the interpreted kernels, give the reference's greedy tokens."""
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams
    from tests.tiny_models import save_tiny

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = save_tiny("llama", tmp_path / "llama")
    gen = torch.Generator().manual_seed(13)
    prompts = [torch.randint(0, 320, (n,), generator=gen).tolist() for n in (3, 21, 9, 6, 14, 30)]
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (2, 9, 4, 7, 3, 5)]
    kwargs = dict(num_kv_blocks=40, block_size=4, max_num_batched_tokens=64)
    llm = LLM(str(folder), attention_backend="triton", decode_graphs=True, max_graph_batch=5, **kwargs)
    graphs = llm.engine.runner.graphs
    assert graphs is not None and graphs.sizes == [1, 2, 4, 5]
    assert llm.engine.block_manager.num_blocks == 40 and graphs.scratch_slot == 40 * 4
    replays = []
    run = graphs.run
    graphs.run = lambda *a: replays.append(len(a[0])) or run(*a)
    graph_outs = llm.generate(prompts, params)
    assert set(replays) >= {1, 3, 5}  # batches 6 ran eagerly; others padded or exact
    assert llm.engine.block_manager.num_free_blocks == 40
    torch_outs = LLM(str(folder), attention_backend="torch", **kwargs).generate(prompts, params)
    assert [o.outputs[0].token_ids for o in graph_outs] == [o.outputs[0].token_ids for o in torch_outs]
    # run ahead: decode inputs still in flight are copied into the static token buffer on the
    # device; with 32-key partitions, short contexts take the single-pass graphs, longer ones the
    # split-K graphs (max_model_len bound)
    with engine_backend_split(None, 32):
        ahead = LLM(str(folder), attention_backend="triton", decode_graphs=True, max_graph_batch=5, run_ahead=True,
                    **kwargs)
    assert ahead.engine.runner.graphs.bounds == [32, 160]
    carried, longest = [], []
    run = ahead.engine.runner.graphs.run
    ahead.engine.runner.graphs.run = lambda *a: carried.append(a[3] is not None) or longest.append(max(a[1]) + 1) or run(*a)
    ahead_outs = ahead.generate(prompts, params)
    assert any(carried) and ahead.engine.block_manager.num_free_blocks == 40
    assert min(longest) <= 32 < max(longest)
    assert [o.outputs[0].token_ids for o in ahead_outs] == [o.outputs[0].token_ids for o in torch_outs]


@interpreted
def test_ngram_drafts_between_graph_decodes_with_interpreted_kernels_equal_reference(tmp_path):
    """Drafted steps (1 + k query tokens over the paged context: the prefill kernel) between decodes
    replayed through the graph buffers give the reference's greedy tokens without drafts."""
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams
    from tests.test_speculative import _repetitive_prompts
    from tests.tiny_models import save_tiny

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = save_tiny("llama", tmp_path / "llama")
    prompts = _repetitive_prompts(3, seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    kwargs = dict(num_kv_blocks=40, block_size=4, max_num_batched_tokens=64)
    llm = LLM(str(folder), attention_backend="triton", decode_graphs=True, max_graph_batch=4,
              speculative_config={"num_speculative_tokens": 3, "prompt_lookup_min": 1}, **kwargs)
    replays = []
    run = llm.engine.runner.graphs.run
    llm.engine.runner.graphs.run = lambda *a: replays.append(len(a[0])) or run(*a)
    outs = llm.generate(prompts, params)
    torch_outs = LLM(str(folder), attention_backend="torch", **kwargs).generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in torch_outs]
    assert replays and llm.engine.stats().num_accepted_tokens > 0
    assert llm.engine.block_manager.num_free_blocks == 40


@interpreted
def test_lora_rows_run_eagerly_beside_graph_decodes(tmp_path):
    """LoRA adapter rows (engine/lora_batch.py) never replay the decode graphs, which hold no
    deltas: steps with adapter rows run the interpreted kernels eagerly, base-only steps replay,
    and every request gets the torch reference's tokens for its adapter."""
    from engine.llm import LLM
    from engine.lora import LoRARequest
    from engine.sampling_params import SamplingParams
    from tests.test_lora import ALL, make_adapter
    from tests.tiny_models import save_tiny

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = save_tiny("llama", tmp_path / "llama")
    adapter = LoRARequest("a", 0, str(make_adapter(folder, tmp_path / "a", seed=1, r=4, target_modules=ALL)))
    gen = torch.Generator().manual_seed(17)
    prompts = [torch.randint(0, 320, (n,), generator=gen).tolist() for n in (5, 9, 4, 12)]
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (9, 3, 6, 4)]
    loras = [None, adapter, None, adapter]  # the adapter rows finish first: base-only steps follow
    kwargs = dict(num_kv_blocks=40, block_size=4, max_num_batched_tokens=64, enable_lora=True)
    llm = LLM(str(folder), attention_backend="triton", decode_graphs=True, max_graph_batch=4, **kwargs)
    replays = []
    run = llm.engine.runner.graphs.run
    llm.engine.runner.graphs.run = lambda *a: replays.append(len(a[0])) or run(*a)
    outs = llm.generate(prompts, params, lora_request=loras)
    torch_outs = LLM(str(folder), attention_backend="torch", **kwargs).generate(prompts, params, lora_request=loras)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in torch_outs]
    assert replays and max(replays) <= 2  # only steps without the adapter's rows replayed
    assert llm.engine.block_manager.num_free_blocks == 40


@interpreted
@pytest.mark.parametrize("kind", ["marian", "t5"])
def test_translation_graph_buffers_with_interpreted_kernels_equal_reference(kind, tmp_path):
    """The encoder-decoder graph path without capture: decoder steps of padded batches (3 -> 4)
    through static buffers for both attentions (the target's own blocks, the source's), 8-key
    partitions so short and long contexts take different bounds, T5's bias, beams forking
    blocks, and eager steps above the largest size, give the torch reference's tokens."""
    pytest.importorskip("sentencepiece")
    from engine.config import CacheConfig, EngineConfig
    from engine.translation_engine import TranslationEngine
    from tests.encdec_fixtures import reversal_inputs, tiny_translation_folder

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = tiny_translation_folder(kind, tmp_path, steps=60)

    def engine(**kwargs) -> TranslationEngine:
        cache = CacheConfig(block_size=4, num_blocks=160)
        return TranslationEngine.from_config(EngineConfig(model=str(folder), cache=cache, **kwargs))

    with engine_backend_split(None, 8):
        graphed = engine(attention_backend="triton", decode_graphs=True, max_graph_batch=5)
    reference = engine(attention_backend="torch")
    graphs = graphed.runner.graphs
    assert graphs is not None and graphs.sizes == [1, 2, 4, 5] and graphs.bounds[0] == 8
    assert graphs.scratch_slot == 160 * 4
    replays: list[tuple[int, int, int]] = []
    run = graphs.run
    graphs.run = lambda *a: replays.append((len(a[0]), max(a[1]) + 1, max(a[3]))) or run(*a)
    srcs = reversal_inputs((3, 5, 11, 14, 7, 4), reference.eos_token_ids[0], seed=5)
    for batch, beams in ((srcs[:3], 1), (srcs[:2], 2), (srcs, 1)):
        tokens = [[o.outputs[0].token_ids for o in e.translate(batch, e.default_params(max_tokens=10, num_beams=beams))]
                  for e in (graphed, reference)]
        assert tokens[0] == tokens[1], (len(batch), beams)
    sizes = {n for n, _, _ in replays}
    assert 3 in sizes and 4 in sizes and max(sizes) <= 5  # padded and exact; the batch of 6 ran eagerly
    assert any(t <= 8 for _, t, _ in replays) and any(t > 8 for _, t, _ in replays)  # both target bounds
    assert any(s <= 8 for _, _, s in replays) and any(s > 8 for _, _, s in replays)  # both source bounds
    assert graphed.block_manager.num_free_blocks == 160


@interpreted
def test_nllb_forced_language_with_graph_buffers_equals_reference(tmp_path):
    """NLLB's first decoder step holds two tokens (start, forced target code) and runs eagerly; the
    single-token steps after it replay the graph path; greedy and beams equal the torch reference."""
    from engine.config import CacheConfig, EngineConfig
    from engine.translation_engine import TranslationEngine
    from tests.encdec_fixtures import make_nllb_folder

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = make_nllb_folder(tmp_path / "nllb")

    def engine(**kwargs) -> TranslationEngine:
        return TranslationEngine.from_config(EngineConfig(model=str(folder), cache=CacheConfig(block_size=4, num_blocks=96),
                                                          **kwargs))

    graphed, reference = engine(attention_backend="triton", decode_graphs=True, max_graph_batch=4), \
        engine(attention_backend="torch")
    replays: list[int] = []
    run = graphed.runner.graphs.run
    graphed.runner.graphs.run = lambda *a: replays.append(len(a[0])) or run(*a)
    tok = reference.tokenizer
    srcs = [tok.encode_source(" ".join(tok.id_to_token(i) for i in ids), "eng_Latn") for ids in ((5, 9), (20, 7, 31, 8))]
    forced = (tok.language_codes["fra_Latn"],)
    for beams in (1, 2):
        tokens = [[o.outputs[0].token_ids for o in e.translate(srcs, e.default_params(max_tokens=8, num_beams=beams),
                                                                forced_prefix=forced)] for e in (graphed, reference)]
        assert tokens[0] == tokens[1] and all(t[0] == forced[0] for t in tokens[0]), beams
    assert replays  # the steps after the first went through the graph buffers
    assert graphed.block_manager.num_free_blocks == 96


def generate_counting_gemv_rows(llm, prompts, params, monkeypatch) -> tuple[list, set[int]]:
    """The outputs, and the row counts the Triton GEMV was launched with meanwhile."""
    from engine.fused import triton_gemv

    rows: set[int] = set()
    launch = triton_gemv._launch
    with monkeypatch.context() as patch:
        patch.setattr(triton_gemv, "_launch", lambda x, *a, **kw: rows.add(x.shape[0]) or launch(x, *a, **kw))
        return llm.generate(prompts, params), rows


@interpreted
def test_engine_with_gemv_linears_equals_reference(tmp_path, monkeypatch):
    """Decode batches of up to 2 rows run every Linear of the model as the Triton GEMV, with the
    RMSNorms and SwiGLU products folded in, and the vocabulary projection storing fp32 itself;
    larger batches and prefills keep F.linear. Greedy tokens equal the reference's."""
    from engine.fused import gemv
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams
    from tests.tiny_models import save_tiny

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = save_tiny("llama", tmp_path / "llama")
    gen = torch.Generator().manual_seed(14)
    prompts = [torch.randint(0, 320, (n,), generator=gen).tolist() for n in (5, 17, 11)]
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (3, 8, 5)]
    kwargs = dict(num_kv_blocks=40, block_size=4, max_num_batched_tokens=64)
    llm = LLM(str(folder), attention_backend="triton", decode_graphs=True, max_graph_batch=4, gemv_max_rows=2, **kwargs)
    model = llm.engine.runner.model
    layer = model.model.layers[0]
    assert isinstance(model.lm_head, gemv.GemvLinear)
    assert all(isinstance(m, gemv.GemvLinear) for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                                       layer.mlp.gate_up_proj, layer.mlp.down_proj))
    outs, rows = generate_counting_gemv_rows(llm, prompts, params, monkeypatch)
    assert rows == {1, 2}  # batches of 3 and prefills took F.linear
    assert llm.engine.block_manager.num_free_blocks == 40
    torch_outs = LLM(str(folder), attention_backend="torch", **kwargs).generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in torch_outs]


@interpreted
@pytest.mark.parametrize("kind", ["llama_tied", "qwen2", "qwen3", "gpt2"])
def test_gemv_linears_in_every_decoder_family(kind, tmp_path, monkeypatch):
    """A tied head (the GEMV reads the embedding), q/k/v biases, GPT-2's LayerNorm and GELU
    (no fold: plain GEMVs), with the reference attention backend so only the GEMV is interpreted."""
    from engine.fused import gemv
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams
    from tests.tiny_models import save_tiny

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = save_tiny(kind, tmp_path / kind)
    gen = torch.Generator().manual_seed(15)
    prompts = [torch.randint(0, 320, (n,), generator=gen).tolist() for n in (4, 13)]
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (6, 3)]
    kwargs = dict(num_kv_blocks=16, block_size=4, attention_backend="torch")
    llm = LLM(str(folder), gemv_max_rows=2, **kwargs)
    head = llm.engine.runner.model.lm_head
    assert isinstance(head, gemv.GemvLinear)
    if kind != "qwen2":  # tied: the head's weight is the embedding's, not a copy
        embed = next(m for m in llm.engine.runner.model.modules() if isinstance(m, torch.nn.Embedding)
                     and m.num_embeddings == 320)
        assert head.weight is embed.weight
    outs, rows = generate_counting_gemv_rows(llm, prompts, params, monkeypatch)
    assert rows == {1, 2}
    want = LLM(str(folder), **kwargs).generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in want]


@interpreted
@pytest.mark.parametrize("gemv_rows", [2, 0])
def test_pdl_reaches_every_decoder_layer_kernel_launch(gemv_rows, tmp_path, monkeypatch):
    """With enable_pdl, each GEMV, fused q/k/v and decode-attention launch (split-K and its reduce
    too) of the decoder layers asks for programmatic dependent launch (PDL=True, launch_pdl=True);
    the vocabulary projection, which follows the graph's replay, does not; without GEMV Linears
    only attention takes it. Interpreted, the wait is a no-op and the rest of the PDL variants
    runs (GEMVs loading each weight tile a step ahead): the tokens equal the reference's."""
    from engine.attention import triton_kernels
    from engine.errors import InvalidRequestError
    from engine.fused import pdl, triton_gemv, triton_qkv
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams
    from tests.tiny_models import save_tiny

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = save_tiny("llama", tmp_path / "llama")
    kwargs = dict(num_kv_blocks=24, block_size=4, max_num_batched_tokens=64)
    with pytest.raises(InvalidRequestError, match="compute capability 9.0"):
        LLM(str(folder), attention_backend="triton", gemv_max_rows=2, enable_pdl=True, **kwargs)

    launches: list[tuple[str, int, bool, bool]] = []  # (kernel, N for a GEMV, PDL, launch_pdl)

    class Spy:
        def __init__(self, kernel) -> None:
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kw):
                n = args[8] if self.kernel.fn.__name__ == "_gemv_kernel" else 0
                launches.append((self.kernel.fn.__name__, n, kw["PDL"], kw.get("launch_pdl", False)))
                return self.kernel[grid](*args, **kw)
            return launch

    monkeypatch.setattr(pdl, "supported", lambda device: True)
    for module, names in ((triton_gemv, ["_gemv_kernel"]), (triton_qkv, ["_norm_qkv_rotary_kernel"]),
                          (triton_kernels, ["_decode_kernel", "_decode_reduce_kernel"])):
        for name in names:
            monkeypatch.setattr(module, name, Spy(getattr(module, name)))
    with engine_backend_split(True, 16):  # split-K past 16 keys
        llm = LLM(str(folder), attention_backend="triton", decode_graphs=True, max_graph_batch=2,
                  gemv_max_rows=gemv_rows, enable_pdl=True, **kwargs)
    llm.engine.runner.model.greedy_screen = None  # the CPU's bf16 screen would pick greedy tokens without the head
    gen = torch.Generator().manual_seed(16)
    prompts = [torch.randint(0, 320, (n,), generator=gen).tolist() for n in (6, 19)]
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    outs = llm.generate(prompts, params)
    kinds = {name for name, *_ in launches}
    attention = {"_decode_kernel", "_decode_reduce_kernel"}
    assert kinds == (attention | {"_gemv_kernel", "_norm_qkv_rotary_kernel"} if gemv_rows else attention), kinds
    head = [launch for launch in launches if launch[1] == 320]
    assert bool(head) == bool(gemv_rows)
    assert all(not pdl_on and not launch_pdl for *_, pdl_on, launch_pdl in head)
    layers = [launch for launch in launches if launch[1] != 320]
    assert all(pdl_on and launch_pdl for *_, pdl_on, launch_pdl in layers)
    want = LLM(str(folder), attention_backend="torch", **kwargs).generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in want]
    assert llm.engine.block_manager.num_free_blocks == 24


# aten ops that launch no kernel: views, allocations, metadata
_NO_KERNEL = {"view", "_unsafe_view", "reshape", "split", "split_with_sizes", "slice", "select", "as_strided", "t",
              "transpose", "expand", "unsqueeze", "squeeze", "detach", "alias", "empty", "empty_like", "empty_strided",
              "chunk", "contiguous", "lift_fresh", "sym_size", "sym_stride", "sym_numel", "is_same_size", "dim", "size",
              "detach_", "promote_types", "to"}  # `to` that reaches dispatch returns self; a conversion is _to_copy
_MATMULS = {"mm", "addmm", "_linear_pointwise"}  # cuBLAS on a GPU; oneDNN's packed Linear on CPU


def decode_launches(llm, monkeypatch) -> tuple[list[str], list[str]]:
    """(Triton kernels, aten ops that launch a kernel) of one batch-1 decode forward, with the
    fused ops dispatched as on a GPU (interpreted here): what a CUDA graph of it would hold."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from triton.runtime import interpreter

    from engine import fused

    monkeypatch.setattr(fused, "_on_gpu", lambda x: True)
    triton_calls: list[str] = []
    aten_calls: list[str] = []
    grid_call = interpreter.GridExecutor.__call__

    inside: list[bool] = []  # the interpreter's own torch ops, while it runs a kernel, do not count

    def record(self, *args, **kwargs):
        triton_calls.append(self.fn.__name__)
        inside.append(True)
        try:
            return grid_call(self, *args, **kwargs)
        finally:
            inside.pop()

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name not in _NO_KERNEL and not inside:
                aten_calls.append("matmul" if name in _MATMULS else name)
            return func(*args, **(kwargs or {}))

    graphs = llm.engine.runner.graphs
    graphs._pad_all()  # batch 1 of the padding row: token 0 at position 0 into the scratch block
    monkeypatch.setattr(interpreter.GridExecutor, "__call__", record)
    with torch.inference_mode(), Ops():
        graphs._forward((1, graphs.bounds[0]))
    return triton_calls, aten_calls


@interpreted
@pytest.mark.parametrize("gemv_rows,per_layer", [(0, 9), (1, 5)])
def test_decode_step_launch_count(gemv_rows, per_layer, tmp_path, monkeypatch):
    """A LLaMA layer's batch-1 decode is 9 launches with cuBLAS matmuls (norm, q/k/v, rotary + K/V
    write, single-pass attention, o_proj, norm, gate/up, SiLU-mul, down) and 5 with GEMV Linears
    (the norms and SiLU-mul folded in, and rotary + K/V write in the q/k/v GEMV's epilogue);
    around the layers only the embedding, the rotary table lookup and the final norm. Launches
    are a small model's decode time on a GPU: this pins them."""
    from engine.llm import LLM
    from tests.tiny_models import save_tiny

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = save_tiny("llama", tmp_path / "llama")
    llm = LLM(str(folder), attention_backend="triton", decode_graphs=True, max_graph_batch=2, num_kv_blocks=8,
              block_size=4, gemv_max_rows=gemv_rows)
    layers = len(llm.engine.runner.model.model.layers)
    triton_calls, aten_calls = decode_launches(llm, monkeypatch)
    assert sorted(aten_calls) == sorted(["embedding", "index"] + ["matmul"] * (4 * layers if not gemv_rows else 0))
    assert len(triton_calls) + len(aten_calls) == per_layer * layers + 3, (triton_calls, aten_calls)
    fused_qkv = triton_calls.count("_norm_qkv_rotary_kernel")
    assert fused_qkv == (layers if gemv_rows else 0)
    assert triton_calls.count("_rotary_store_kv_kernel") == layers - fused_qkv


@interpreted
@pytest.mark.parametrize("window, softcap, split", [(5, None, True), (13, 2.0, False), (None, 1.5, True), (40, None, True)])
def test_sliding_window_and_softcap_equal_reference(window, softcap, split):
    """Gemma 2's layers: prefill chunks over earlier context (windows starting mid-tile and rows
    whose window begins after a whole tile), decodes whose windows skip whole split-K partitions,
    and varlen prompts, against the reference."""
    from engine.attention.metadata import AttentionVariant

    variant = AttentionVariant(window=window, softcap=softcap)
    totals, news = [9, 6, 45, 1, 40, 70], [4, 1, 37, 1, 19, 1]
    q, k, v, kc, vc, meta = paged_step(totals, news, 4, 2, 16, 4, True, seed=window or 7)
    q = q * 3  # large scores, so the cap bites
    backend, ref_backend = TritonAttentionBackend(split_k=split, partition_size=16, **SMALL), TorchAttentionBackend()
    out = backend.paged_attention(q, kc, vc, meta, 0.4, variant=variant)
    ref = ref_backend.paged_attention(q, kc, vc, meta, 0.4, variant=variant)
    assert rel_err(out, ref) < 1e-3
    assert rel_err(ref_backend.paged_attention(q, kc, vc, meta, 0.4), ref) > 1e-2  # the variant matters
    flat = metadata_for_sequences(news)
    out = backend.varlen_attention(q, k, v, flat, 0.4, variant=variant)
    assert rel_err(out, ref_backend.varlen_attention(q, k, v, flat, 0.4, variant=variant)) < 1e-3


@interpreted
@pytest.mark.parametrize("radius", [1, 4, 20])
def test_bidirectional_local_radius_equals_reference(radius):
    """ModernBERT's local layers: each token sees the keys within `radius` on either side, over row
    tiles whose first and last rows bound different key ranges (and a tile no row of which sees)."""
    from engine.attention.metadata import AttentionVariant

    torch.manual_seed(4)
    lens = [5, 37, 1, 22]
    t = sum(lens)
    q, k, v = torch.randn(t, 4, 16) * 3, torch.randn(t, 2, 16), torch.randn(t, 2, 16)
    meta = metadata_for_sequences(lens, causal=False)
    variant = AttentionVariant(radius=radius)
    out = TritonAttentionBackend(**SMALL).varlen_attention(q, k, v, meta, 0.3, variant=variant)
    ref = TorchAttentionBackend().varlen_attention(q, k, v, meta, 0.3, variant=variant)
    assert rel_err(out, ref) < 1e-3
    assert rel_err(TorchAttentionBackend().varlen_attention(q, k, v, meta, 0.3), ref) > 1e-2

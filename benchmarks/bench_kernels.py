"""Triton attention and GEMV kernels against the GPU's own limits (GPU only).

Measures the device first (HBM bandwidth from a large copy, bf16 matmul TFLOP/s), then:
- decode: paged attention, one new token per sequence, at several batch x context sizes;
  achieved GB/s of K/V read vs the measured copy bandwidth (decode is memory-bound);
- prefill: causal varlen FlashAttention and a chunked prefill over paged context; achieved
  TFLOP/s vs the matmul rate, with torch SDPA (cuDNN/flash) on the same shapes for scale;
- decode matmuls (batch 1 and 4) of SmolLM2 and Llama-1B: the fused Triton GEMV against the
  add+RMSNorm / SiLU-mul kernel followed by cuBLAS, and weight bytes over time vs the copy bandwidth;
- decode attention of one layer at batch 1 and 4 over short contexts, with SmolLM2's and Llama-1B's
  heads, timed inside a CUDA graph (as a decode step runs it; the tables above time eager
  launches, which at these sizes mostly measures the host): what one layer's attention costs a
  small batch, by key tile and partition size.
Prints markdown tables headed by the GPU name.

    python benchmarks/bench_kernels.py            # Llama-3-8B-like heads: 32 q / 8 kv, head_dim 128
    python benchmarks/bench_kernels.py --sweep    # also try tile configs, report the best of each row
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, table  # noqa: E402

DECODE_SHAPES = [(1, 4096), (1, 32768), (8, 4096), (8, 32768), (32, 2048), (32, 8192), (64, 4096), (128, 1024), (128, 4096)]
PREFILL_SHAPES = [(1, 1024), (1, 4096), (1, 16384), (8, 2048), (16, 1024)]  # (sequences, tokens each)
CHUNK_SHAPES = [(1, 2048, 8192), (4, 512, 4096)]  # (sequences, new tokens, total keys)


def bench(fn) -> float:
    """Median milliseconds of fn, caches flushed between runs."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def hbm_gbps() -> float:
    x = torch.empty(2**28, dtype=torch.float32, device="cuda")  # 1 GiB, far past L2
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    return 2 * x.numel() * 4 / ms / 1e6  # read + write


def matmul_tflops() -> float:
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    ms = bench(lambda: a @ b)
    return 2 * 8192**3 / ms / 1e9


def paged_cache(num_seqs: int, total: int, num_kv_heads: int, head_dim: int, block_size: int):
    """Caches holding num_seqs contexts of `total` keys in shuffled blocks, and their tables."""
    blocks_per_seq = -(-total // block_size)
    num_blocks = num_seqs * blocks_per_seq
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    kc = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    vc = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    tables = torch.randperm(num_blocks, device="cuda").view(num_seqs, blocks_per_seq).int()
    return kc, vc, tables


def meta_for(query_lens: list[int], seq_lens: list[int], tables: torch.Tensor | None, causal: bool):
    from engine.attention.metadata import AttentionMetadata

    cu = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(query_lens).cumsum(0)
    return AttentionMetadata(
        cu_seqlens_q=cu.cuda(), seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device="cuda"),
        slot_mapping=None, block_tables=tables, max_seqlen_q=max(query_lens), max_seqlen_k=max(seq_lens),
        query_lens=tuple(query_lens), seq_lens_host=tuple(seq_lens), causal=causal,
    )


def decode_rows(args, bandwidth: float) -> list[list]:
    from engine.attention import triton_kernels as K
    from engine.attention.triton_backend import TritonAttentionBackend

    rows = []
    hq, hk, d = args.num_heads, args.num_kv_heads, args.head_dim
    for num_seqs, ctx in DECODE_SHAPES:
        kc, vc, tables = paged_cache(num_seqs, ctx, hk, d, args.block_size)
        meta = meta_for([1] * num_seqs, [ctx] * num_seqs, tables, causal=True)
        q = torch.randn(num_seqs, hq, d, dtype=torch.bfloat16, device="cuda")
        kv_bytes = 2 * num_seqs * ctx * hk * d * kc.element_size()
        times = {}
        for split in (False, True):
            backend = TritonAttentionBackend(split_k=split)
            times[split] = bench(lambda: backend.paged_attention(q, kc, vc, meta, d**-0.5))
        auto = TritonAttentionBackend()
        auto_split = auto._use_split(num_seqs, ctx, hk, q.device)
        best_cfg = "default"
        if args.sweep:
            out = torch.empty_like(q)
            for block_n in (32, 64, 128):
                for part in (128, 256, 512, 1024, 2048):
                    for warps in (4, 8):
                        ms = bench(lambda: K.decode_attention(
                            q, kc, vc, out, meta.cu_seqlens_q, meta.seq_lens, tables, num_seqs, ctx, d**-0.5,
                            split=True, partition_size=part, block_n=block_n, num_warps=warps))
                        if ms < min(times.values()):
                            times["sweep"], best_cfg = ms, f"n{block_n} p{part} w{warps}"
        best = min(times.values())
        rows.append([
            num_seqs, ctx, f"{kv_bytes / 2**20:.0f}", f"{times[False] * 1e3:.1f}", f"{times[True] * 1e3:.1f}",
            "split" if auto_split else "single", f"{kv_bytes / best / 1e6:.0f}", f"{100 * kv_bytes / best / 1e6 / bandwidth:.0f}%",
            best_cfg,
        ])
        del kc, vc
    return rows


def prefill_row(shape: str, flops: float, ms: float, best_ms: float, cfg: str, peak: float, sdpa: str) -> list:
    tflops, best = flops / ms / 1e9, flops / best_ms / 1e9
    return [shape, f"{ms:.3f}", f"{tflops:.0f}", f"{100 * tflops / peak:.0f}%", cfg, f"{best:.0f}", sdpa]


def prefill_rows(args, peak: float) -> list[list]:
    import torch.nn.functional as F

    from engine.attention import triton_kernels as K

    rows = []
    hq, hk, d = args.num_heads, args.num_kv_heads, args.head_dim
    # (block_m, block_n, warps, stages): the default first, then larger row tiles, which issue
    # fewer instructions per score on sm_90 (one warpgroup per 64 rows) but hold more shared
    # memory; always timed, so one run says whether the default should change
    configs = [(64, 64, 8, 2), (128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 8, 3)]
    if args.sweep:
        configs += [(64, 64, 4, 2), (64, 32, 4, 2), (64, 128, 8, 2)]

    def run_best(call) -> tuple[float, float, str]:
        """(default ms, best ms, best tiles)."""
        results = [(bench(lambda: call(*cfg)), cfg) for cfg in configs]
        ms, cfg = min(results)
        return results[0][0], ms, "m{} n{} w{} s{}".format(*cfg)

    for num_seqs, length in PREFILL_SHAPES:
        n = num_seqs * length
        q = torch.randn(n, hq, d, dtype=torch.bfloat16, device="cuda")
        k = torch.randn(n, hk, d, dtype=torch.bfloat16, device="cuda")
        v = torch.randn(n, hk, d, dtype=torch.bfloat16, device="cuda")
        out = torch.empty_like(q)
        meta = meta_for([length] * num_seqs, [length] * num_seqs, None, causal=True)
        flops = 4 * num_seqs * hq * d * length * (length + 1) / 2  # QK^T and PV over the causal half
        ms, best_ms, cfg = run_best(lambda bm, bn, w, s: K.prefill_attention(
            q, k, v, out, meta.cu_seqlens_q, None, None, num_seqs, length, d**-0.5, True,
            block_m=bm, block_n=bn, num_warps=w, num_stages=s))
        qb, kb, vb = (x.view(num_seqs, length, -1, d).transpose(1, 2) for x in (q, k, v))
        sdpa_ms = bench(lambda: F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, enable_gqa=True))
        rows.append(prefill_row(f"varlen causal {num_seqs}x{length}", flops, ms, best_ms, cfg, peak,
                                f"{flops / sdpa_ms / 1e9:.0f}"))
    for num_seqs, new, total in CHUNK_SHAPES:
        kc, vc, tables = paged_cache(num_seqs, total, hk, d, args.block_size)
        q = torch.randn(num_seqs * new, hq, d, dtype=torch.bfloat16, device="cuda")
        out = torch.empty_like(q)
        meta = meta_for([new] * num_seqs, [total] * num_seqs, tables, causal=True)
        # each new token j sees total - new + j + 1 keys
        keys_seen = num_seqs * (new * (total - new) + new * (new + 1) / 2)
        flops = 4 * hq * d * keys_seen
        ms, best_ms, cfg = run_best(lambda bm, bn, w, s: K.prefill_attention(
            q, kc, vc, out, meta.cu_seqlens_q, meta.seq_lens, tables, num_seqs, new, d**-0.5, True,
            block_m=bm, block_n=bn, num_warps=w, num_stages=s))
        rows.append(prefill_row(f"paged chunk {num_seqs}x{new} over {total}", flops, ms, best_ms, cfg, peak, "-"))
        del kc, vc
    return rows


# (model, layer, out N, in K, what runs before it): a decoder layer's merged matmuls and the head
GEMV_SHAPES = [
    ("SmolLM2-135M", "q/k/v", 960, 576, "norm"), ("SmolLM2-135M", "q/k/v", 960, 576, "norm+rope"),
    ("SmolLM2-135M", "o_proj", 576, 576, None),
    ("SmolLM2-135M", "gate/up", 3072, 576, "norm"), ("SmolLM2-135M", "down", 576, 1536, "silu"),
    ("SmolLM2-135M", "lm_head", 49152, 576, None),
    ("Llama-3.2-1B", "q/k/v", 3072, 2048, "norm"), ("Llama-3.2-1B", "q/k/v", 3072, 2048, "norm+rope"),
    ("Llama-3.2-1B", "o_proj", 2048, 2048, None),
    ("Llama-3.2-1B", "gate/up", 16384, 2048, "norm"), ("Llama-3.2-1B", "down", 2048, 8192, "silu"),
    ("Llama-3.2-1B", "lm_head", 128256, 2048, None),
]
HEADS = {"SmolLM2-135M": (9, 3, 64), "Llama-3.2-1B": (32, 8, 64)}  # q heads, kv heads, head dim


def gemv_rows(args, bandwidth: float) -> list[list]:
    """Each decode matmul with the op before it, at batch 1 and 4: add+RMSNorm or SiLU-mul kernel
    then cuBLAS (what runs without GEMV Linears), against the fused Triton GEMV; for q/k/v also with
    the rotary + K/V write after it (norm+rope: 3 launches against the GEMV with its epilogue).
    Timed inside a CUDA graph over enough weight copies to exceed L2, as a step streams one layer
    after another."""
    import triton.testing
    import torch.nn.functional as F

    from engine import fused
    from engine.fused import triton_gemv, triton_qkv

    rows = []
    for model, layer, n, k, before in GEMV_SHAPES:
        nbytes = n * k * 2
        copies = max(1, min(64, -(-(256 << 20) // nbytes)))  # 256 MiB of weights streamed
        weights = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * k**-0.5 for _ in range(copies)]
        norm_w = torch.randn(k, dtype=torch.bfloat16, device="cuda")
        for batch in (1, 4):
            width = 2 * k if before == "silu" else k
            x = torch.randn(batch, width, dtype=torch.bfloat16, device="cuda")
            res = torch.randn(batch, k, dtype=torch.bfloat16, device="cuda")
            out_dtype = torch.float32 if layer == "lm_head" else None
            hq, hk, d = HEADS[model]
            cos, sin = (c[:, None, :] for c in torch.randn(batch, d, device="cuda").bfloat16().chunk(2, -1))
            caches = [torch.zeros(64, 16, hk, d, dtype=torch.bfloat16, device="cuda") for _ in range(2)]
            slots = torch.arange(batch, device="cuda") * 16 + 3

            def cublas(w):
                if before == "norm+rope":
                    qkv = F.linear(fused.add_rms_norm(x, res, norm_w, 1e-5)[0], w)
                    return fused.rotary_store_kv(*fused.split_heads(qkv, hq, hk, d), cos, sin, *caches, slots)
                if before == "norm":
                    return F.linear(fused.add_rms_norm(x, res, norm_w, 1e-5)[0], w)
                if before == "silu":
                    return F.linear(fused.silu_mul(*x.chunk(2, -1)), w)
                return F.linear(x, w).float() if out_dtype else F.linear(x, w)

            def gemv(w, **tile):
                if before == "norm+rope":
                    tile = dict(tile, block_p=max(1, tile.pop("block_n", 2) // 2)) if tile else tile
                    return triton_qkv.norm_qkv_rotary_store(x, res, norm_w, 1e-5, w, None, hq, hk, cos, sin,
                                                            *caches, slots, **tile)
                if before == "norm":
                    return triton_gemv.norm_linear(x, res, norm_w, 1e-5, w, **tile)
                if before == "silu":
                    return triton_gemv.silu_mul_linear(x, w, **tile)
                return triton_gemv.linear(x, w, out_dtype=out_dtype, **tile)

            def per_matmul(op) -> float:
                op(weights[0])  # compile outside the graph
                return triton.testing.do_bench_cudagraph(lambda: [op(w) for w in weights], rep=50) / copies

            base_ms, fused_ms = per_matmul(cublas), per_matmul(gemv)
            best, cfg = fused_ms, "auto " + "n{} k{}".format(*triton_gemv.tiles(batch, n, k, x.device))
            if args.sweep:
                for block_n in (1, 2, 4, 8, 16):
                    for block_k in (256, 512, 1024, 2048):
                        for warps in (2, 4, 8):
                            if block_n * block_k > 16384:
                                continue
                            ms = per_matmul(lambda w: gemv(w, block_n=block_n, block_k=block_k, num_warps=warps))
                            if ms < best:
                                best, cfg = ms, f"n{block_n} k{block_k} w{warps}"
            rows.append([model, layer, before or "-", batch, f"{nbytes / 2**20:.1f}", f"{base_ms * 1e3:.1f}",
                         f"{fused_ms * 1e3:.1f}", f"{100 * nbytes / fused_ms / 1e6 / bandwidth:.0f}%",
                         f"{best * 1e3:.1f}", cfg])
        del weights
    return rows


def small_decode_rows(args) -> list[list]:
    """Single-pass decode by key tile, and split-K by partition (+ the reduce launch), in µs of
    GPU time per call (replayed in a graph); the backend's own pick first."""
    import triton.testing

    from engine.attention import triton_kernels as K
    from engine.attention.triton_backend import TritonAttentionBackend

    rows = []
    for model, (hq, hk, d) in HEADS.items():
        for num_seqs in (1, 4):
            for ctx in (128, 384, 1024):
                kc, vc, tables = paged_cache(num_seqs, ctx, hk, d, args.block_size)
                meta = meta_for([1] * num_seqs, [ctx] * num_seqs, tables, causal=True)
                q = torch.randn(num_seqs, hq, d, dtype=torch.bfloat16, device="cuda")
                out = torch.empty_like(q)
                backend = TritonAttentionBackend()

                def us(fn) -> float:
                    fn()  # compile outside the graph
                    return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=20)

                def decode(split: bool, **kw):
                    return lambda: K.decode_attention(q, kc, vc, out, meta.cu_seqlens_q, meta.seq_lens, tables,
                                                      num_seqs, ctx, d**-0.5, split=split, **kw)

                picked = us(lambda: backend.paged_attention(q, kc, vc, meta, d**-0.5))
                # 8 warps (the default) split a tile's keys, so each tile's row max and sum cross
                # warps through shared memory; 4 warps cross fewer, which may pay at short contexts
                single = {f"n{n}": us(decode(False, block_n=n)) for n in (32, 64, 128, 256)}
                single |= {f"n{n} w4": us(decode(False, block_n=n, num_warps=4)) for n in (64, 128)}
                split = {p: us(decode(True, partition_size=p, block_n=min(p, 64))) for p in (64, 128, 256)
                         if p < ctx}
                rows.append([model, num_seqs, ctx, f"{picked:.1f}", " ".join(f"{n}: {t:.1f}" for n, t in single.items()),
                             " ".join(f"p{p}: {t:.1f}" for p, t in split.items()) or "-"])
                del kc, vc
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-heads", type=int, default=32)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--sweep", action="store_true", help="try several tile configs per row")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_kernels.py measures the Triton kernels on a GPU; no CUDA device here. "
              "(On CPU the kernels only run under TRITON_INTERPRET=1, far too slow to time: "
              "see tests/test_triton_kernels.py.)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    name = torch.cuda.get_device_name()
    bandwidth, peak = hbm_gbps(), matmul_tflops()
    print(f"## Attention kernels on {name}\n\n{machine()}\n")
    print(f"Measured: copy bandwidth {bandwidth:.0f} GB/s, bf16 matmul {peak:.0f} TFLOP/s (8192^3). "
          f"Heads {args.num_heads} q / {args.num_kv_heads} kv, head_dim {args.head_dim}, block {args.block_size}, bf16.\n")
    print("### Decode (one token per sequence, paged)\n")
    print(table(
        ["seqs", "context", "K/V MiB", "single us", "split-K us", "auto picks", "best GB/s", "of copy BW", "sweep best"],
        decode_rows(args, bandwidth),
    ))
    print("\n### Prefill (causal)\n")
    print(table(["shape", "default ms", "TFLOP/s", "of matmul", "best tiles", "best TFLOP/s", "torch SDPA TFLOP/s"],
                prefill_rows(args, peak)))
    print("\n### Decode matmuls: the op before them + cuBLAS vs the fused GEMV (weights over L2, in a graph)\n")
    print(table(["model", "matmul", "fused op", "rows", "weights MiB", "op + cuBLAS us", "GEMV us",
                 "GEMV of copy BW", "sweep best us", "tiles"], gemv_rows(args, bandwidth)))
    print("\n### Decode attention of one layer, small batches, in a CUDA graph (µs of GPU time)\n")
    print(table(["model", "seqs", "context", "backend's pick", "single-pass by keys per tile",
                 "split-K by partition (+ reduce)"], small_decode_rows(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

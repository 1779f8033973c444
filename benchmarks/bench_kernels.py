"""Triton attention and GEMV kernels against the GPU's own limits (GPU only).

Measures the device first (HBM bandwidth from a large copy, bf16 matmul TFLOP/s), then:
- decode matmuls (batch 1 and 4) of SmolLM2 and Llama-1B: the fused Triton GEMV against the
  add+RMSNorm / SiLU-mul kernel followed by cuBLAS, and weight bytes over time vs the copy bandwidth;
- decode attention of one layer at batch 1 and 4 over short contexts, with SmolLM2's and Llama-1B's
  heads, by key tile and partition size: what one layer's attention costs a small batch;
- decode: paged attention, one new token per sequence, at several batch x context sizes;
  achieved GB/s of K/V read vs the measured copy bandwidth (decode is memory-bound);
- prefill: causal varlen FlashAttention and a chunked prefill over paged context; achieved
  TFLOP/s vs the matmul rate, with torch SDPA (cuDNN/flash) on the same shapes for scale.
Kernels are timed replayed in a CUDA graph, as a decode step runs them: a launch from Python
costs tens of µs on the host, more than many of these kernels take on the GPU. Each replay cycles
through enough copies of its inputs to exceed L2, so bytes come from HBM as they do in a step
that streams one layer after another. The decode table also gives one eager call (host included).
Prints markdown tables headed by the GPU name; a table that fails prints its error and the run
goes on (a lent GPU's minutes are scarce).

    python benchmarks/bench_kernels.py            # Llama-3-8B-like heads: 32 q / 8 kv, head_dim 128
    python benchmarks/bench_kernels.py --sweep    # also try tile configs, report the best of each row
    TRITON_INTERPRET=1 python benchmarks/bench_kernels.py --dry-run
        # every table once on tiny shapes, kernels interpreted on CPU: checks the script, times nothing
"""
from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, table  # noqa: E402

STREAM_BYTES = 128 << 20  # what a graph replay cycles through: well past an H100's 50 MiB of L2


@dataclass(frozen=True)
class ModelDims:
    """A decoder's sizes: what its decode matmuls and attention read."""

    hidden: int
    intermediate: int
    vocab: int
    q_heads: int
    kv_heads: int
    head_dim: int

    def matmuls(self) -> list[tuple[str, int, int, str | None]]:
        """(matmul, out N, in K, what runs before it): a layer's merged matmuls, then the head."""
        qkv = (self.q_heads + 2 * self.kv_heads) * self.head_dim
        return [
            ("q/k/v", qkv, self.hidden, "norm"), ("q/k/v", qkv, self.hidden, "norm+rope"),
            ("o_proj", self.hidden, self.q_heads * self.head_dim, None),
            ("gate/up", 2 * self.intermediate, self.hidden, "norm"), ("down", self.hidden, self.intermediate, "silu"),
            ("lm_head", self.vocab, self.hidden, None),
        ]


@dataclass(frozen=True)
class Plan:
    """What one run measures: real sizes on a GPU, tiny ones for a dry run."""

    device: str
    dtype: torch.dtype
    heads: tuple[int, int, int]  # q heads, kv heads, head_dim of the decode and prefill tables
    block_size: int
    decode: tuple[tuple[int, int], ...]  # (sequences, context)
    prefill: tuple[tuple[int, int], ...]  # (sequences, tokens each)
    chunks: tuple[tuple[int, int, int], ...]  # (sequences, new tokens, total keys)
    models: tuple[tuple[str, ModelDims], ...]  # the GEMV and small-decode tables
    small_contexts: tuple[int, ...]
    partitions: tuple[int, ...]  # split-K partitions tried at small batch


MODELS = (
    ("SmolLM2-135M", ModelDims(576, 1536, 49152, 9, 3, 64)),
    ("Llama-3.2-1B", ModelDims(2048, 8192, 128256, 32, 8, 64)),
)


def gpu_plan(args: argparse.Namespace) -> Plan:
    return Plan(
        device="cuda", dtype=torch.bfloat16, heads=(args.num_heads, args.num_kv_heads, args.head_dim),
        block_size=args.block_size,
        decode=((1, 4096), (1, 32768), (8, 4096), (8, 32768), (32, 2048), (32, 8192), (64, 4096), (128, 1024),
                (128, 4096)),
        prefill=((1, 1024), (1, 4096), (1, 16384), (8, 2048), (16, 1024)),
        chunks=((1, 2048, 8192), (4, 512, 4096)),
        models=MODELS, small_contexts=(128, 384, 1024), partitions=(64, 128, 256),
    )


def dry_plan() -> Plan:
    """Shapes small enough for interpreted kernels that still take every path: split-K, GQA, a
    partial last block, a chunk over paged context, a GEMV K tile that pads."""
    return Plan(
        device="cpu", dtype=torch.float32, heads=(4, 2, 32), block_size=16,
        decode=((1, 40), (2, 600)), prefill=((2, 40),), chunks=((1, 24, 72),),
        models=(("tiny", ModelDims(96, 160, 200, 4, 2, 16)),), small_contexts=(72,), partitions=(32,),
    )


@dataclass(frozen=True)
class Timer:
    """Milliseconds on the GPU; a dry run calls everything once and reports 1.0."""

    dry: bool = False

    def copies(self, nbytes: int, most: int = 1024) -> int:
        """How many copies of an input a graph replay cycles through to read it from HBM."""
        return 2 if self.dry else max(1, min(most, -(-STREAM_BYTES // nbytes)))

    def eager(self, fn: Callable[[], Any]) -> float:
        """Median ms of fn launched from the host (L2 flushed before each run): host time included."""
        if self.dry:
            fn()
            return 1.0
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    def graph(self, op: Callable[[Any], Any], inputs: Sequence[Any], rep: int = 50) -> float:
        """Median ms of GPU time per op(x), replayed in a CUDA graph over `inputs` in turn."""
        op(inputs[0])  # compile outside the graph
        if self.dry:
            for x in inputs[1:]:
                op(x)
            return 1.0
        import triton.testing

        ms = triton.testing.do_bench_cudagraph(lambda: [op(x) for x in inputs], rep=rep, return_mode="median")
        return ms / len(inputs)


def hbm_gbps(timer: Timer) -> float:
    x = torch.empty(2**28, dtype=torch.float32, device="cuda")  # 1 GiB, far past L2
    y = torch.empty_like(x)
    ms = timer.eager(lambda: y.copy_(x))
    return 2 * x.numel() * 4 / ms / 1e6  # read + write


def matmul_tflops(timer: Timer) -> float:
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    ms = timer.eager(lambda: a @ b)
    return 2 * 8192**3 / ms / 1e9


def device_limits(timer: Timer) -> tuple[float, float]:
    """(copy GB/s, bf16 matmul TFLOP/s) measured on the GPU; a dry run has none and reports 1.0."""
    return (1.0, 1.0) if timer.dry else (hbm_gbps(timer), matmul_tflops(timer))


def paged_cache(plan: Plan, num_seqs: int, total: int, num_kv_heads: int, head_dim: int, copies: int = 1):
    """Caches holding `copies` x num_seqs contexts of `total` keys in shuffled blocks, and one
    (num_seqs, blocks) table per copy: the same batch over different cache bytes."""
    blocks_per_seq = -(-total // plan.block_size)
    num_blocks = copies * num_seqs * blocks_per_seq
    shape = (num_blocks, plan.block_size, num_kv_heads, head_dim)
    kc = torch.randn(shape, dtype=plan.dtype, device=plan.device)
    vc = torch.randn(shape, dtype=plan.dtype, device=plan.device)
    tables = torch.randperm(num_blocks, device=plan.device).view(copies, num_seqs, blocks_per_seq).int()
    return kc, vc, list(tables)


def meta_for(plan: Plan, query_lens: list[int], seq_lens: list[int], tables: torch.Tensor | None, causal: bool):
    from engine.attention.metadata import AttentionMetadata

    cu = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(query_lens).cumsum(0)
    return AttentionMetadata(
        cu_seqlens_q=cu.to(plan.device), seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=plan.device),
        slot_mapping=None, block_tables=tables, max_seqlen_q=max(query_lens), max_seqlen_k=max(seq_lens),
        query_lens=tuple(query_lens), seq_lens_host=tuple(seq_lens), causal=causal,
    )


def decode_rows(plan: Plan, timer: Timer, bandwidth: float, sweep: bool) -> list[list]:
    from engine.attention import triton_kernels as K
    from engine.attention.triton_backend import TritonAttentionBackend

    rows = []
    hq, hk, d = plan.heads
    for num_seqs, ctx in plan.decode:
        kv_bytes = 2 * num_seqs * ctx * hk * d * plan.dtype.itemsize
        kc, vc, tables = paged_cache(plan, num_seqs, ctx, hk, d, timer.copies(kv_bytes))
        meta = meta_for(plan, [1] * num_seqs, [ctx] * num_seqs, tables[0], causal=True)
        q = torch.randn(num_seqs, hq, d, dtype=plan.dtype, device=plan.device)
        out = torch.empty_like(q)
        auto = TritonAttentionBackend()
        eager = timer.eager(lambda: auto.paged_attention(q, kc, vc, meta, d**-0.5))

        def attend(**kw):
            return lambda t: K.decode_attention(q, kc, vc, out, meta.cu_seqlens_q, meta.seq_lens, t, num_seqs, ctx,
                                                d**-0.5, **kw)

        times = {"single": timer.graph(attend(split=False), tables), "split": timer.graph(attend(split=True), tables)}
        if sweep:
            for block_n in (32, 64, 128):
                for part in (128, 256, 512, 1024, 2048):
                    for warps in (4, 8):
                        cfg = f"n{block_n} p{part} w{warps}"
                        times[cfg] = timer.graph(attend(split=True, partition_size=part, block_n=block_n,
                                                        num_warps=warps), tables)
        best_cfg, best = min(times.items(), key=lambda kv: kv[1])
        rows.append([
            num_seqs, ctx, f"{kv_bytes / 2**20:.0f}", f"{eager * 1e3:.1f}", f"{times['single'] * 1e3:.1f}",
            f"{times['split'] * 1e3:.1f}", "split" if auto._use_split(num_seqs, ctx, hk, q.device) else "single",
            f"{kv_bytes / best / 1e6:.0f}", f"{100 * kv_bytes / best / 1e6 / bandwidth:.0f}%", best_cfg,
        ])
        del kc, vc
    return rows


def prefill_row(shape: str, flops: float, ms: float, best_ms: float, cfg: str, peak: float, sdpa: str) -> list:
    tflops, best = flops / ms / 1e9, flops / best_ms / 1e9
    return [shape, f"{ms:.3f}", f"{tflops:.0f}", f"{100 * tflops / peak:.0f}%", cfg, f"{best:.0f}", sdpa]


def prefill_rows(plan: Plan, timer: Timer, peak: float, sweep: bool) -> list[list]:
    import torch.nn.functional as F

    from engine.attention import triton_kernels as K

    rows = []
    hq, hk, d = plan.heads
    # (block_m, block_n, warps, stages): the default first, then larger row tiles, which issue
    # fewer instructions per score on sm_90 (one warpgroup per 64 rows) but hold more shared
    # memory; always timed, so one run says whether the default should change
    configs = [(64, 64, 8, 2), (128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 8, 3)]
    if sweep:
        configs += [(64, 64, 4, 2), (64, 32, 4, 2), (64, 128, 8, 2)]
    if plan.device == "cpu":
        configs = [(16, 16, 4, 2), (32, 16, 4, 2)]  # interpreted: tiles that split the tiny shapes

    def run_best(call: Callable[..., None]) -> tuple[float, float, str]:
        """(default ms, best ms, best tiles), each config timed in a graph (the small shapes
        take tens of µs: an eager launch's host time would show in them)."""
        results = [(timer.graph(lambda _: call(*cfg), [None]), cfg) for cfg in configs]
        ms, cfg = min(results)
        return results[0][0], ms, "m{} n{} w{} s{}".format(*cfg)

    for num_seqs, length in plan.prefill:
        n = num_seqs * length
        q = torch.randn(n, hq, d, dtype=plan.dtype, device=plan.device)
        k = torch.randn(n, hk, d, dtype=plan.dtype, device=plan.device)
        v = torch.randn(n, hk, d, dtype=plan.dtype, device=plan.device)
        out = torch.empty_like(q)
        meta = meta_for(plan, [length] * num_seqs, [length] * num_seqs, None, causal=True)
        flops = 4 * num_seqs * hq * d * length * (length + 1) / 2  # QK^T and PV over the causal half
        ms, best_ms, cfg = run_best(lambda bm, bn, w, s: K.prefill_attention(
            q, k, v, out, meta.cu_seqlens_q, None, None, num_seqs, length, d**-0.5, True,
            block_m=bm, block_n=bn, num_warps=w, num_stages=s))
        qb, kb, vb = (x.view(num_seqs, length, -1, d).transpose(1, 2) for x in (q, k, v))
        sdpa_ms = timer.graph(lambda _: F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, enable_gqa=True),
                              [None])
        rows.append(prefill_row(f"varlen causal {num_seqs}x{length}", flops, ms, best_ms, cfg, peak,
                                f"{flops / sdpa_ms / 1e9:.0f}"))
    for num_seqs, new, total in plan.chunks:
        kc, vc, (tables,) = paged_cache(plan, num_seqs, total, hk, d)
        q = torch.randn(num_seqs * new, hq, d, dtype=plan.dtype, device=plan.device)
        out = torch.empty_like(q)
        meta = meta_for(plan, [new] * num_seqs, [total] * num_seqs, tables, causal=True)
        # each new token j sees total - new + j + 1 keys
        keys_seen = num_seqs * (new * (total - new) + new * (new + 1) / 2)
        flops = 4 * hq * d * keys_seen
        ms, best_ms, cfg = run_best(lambda bm, bn, w, s: K.prefill_attention(
            q, kc, vc, out, meta.cu_seqlens_q, meta.seq_lens, tables, num_seqs, new, d**-0.5, True,
            block_m=bm, block_n=bn, num_warps=w, num_stages=s))
        rows.append(prefill_row(f"paged chunk {num_seqs}x{new} over {total}", flops, ms, best_ms, cfg, peak, "-"))
        del kc, vc
    return rows


def gemv_rows(plan: Plan, timer: Timer, bandwidth: float, sweep: bool) -> list[list]:
    """Each decode matmul with the op before it, at batch 1 and 4: add+RMSNorm or SiLU-mul kernel
    then cuBLAS (what runs without GEMV Linears), against the fused Triton GEMV; for q/k/v also with
    the rotary + K/V write after it (norm+rope: 3 launches against the GEMV with its epilogue)."""
    import torch.nn.functional as F

    from engine import fused
    from engine.fused import triton_gemv, triton_qkv

    rows = []
    dev, dtype = plan.device, plan.dtype
    for model, dims in plan.models:
        hq, hk, d = dims.q_heads, dims.kv_heads, dims.head_dim
        for layer, n, k, before in dims.matmuls():
            nbytes = n * k * dtype.itemsize
            weights = [torch.randn(n, k, dtype=dtype, device=dev) * k**-0.5 for _ in range(timer.copies(nbytes))]
            norm_w = torch.randn(k, dtype=dtype, device=dev)
            for batch in (1, 4):
                width = 2 * k if before == "silu" else k
                x = torch.randn(batch, width, dtype=dtype, device=dev)
                res = torch.randn(batch, k, dtype=dtype, device=dev)
                out_dtype = torch.float32 if layer == "lm_head" else None
                cos, sin = (c[:, None, :] for c in torch.randn(batch, d, device=dev).to(dtype).chunk(2, -1))
                caches = [torch.zeros(64, 16, hk, d, dtype=dtype, device=dev) for _ in range(2)]
                slots = torch.arange(batch, device=dev) * 16 + 3

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

                base_ms, fused_ms = timer.graph(cublas, weights), timer.graph(gemv, weights)
                best, cfg = fused_ms, "auto " + "n{} k{}".format(*triton_gemv.tiles(batch, n, k, x.device))
                if sweep:
                    for block_n in (1, 2, 4, 8, 16):
                        for block_k in (256, 512, 1024, 2048):
                            for warps in (2, 4, 8):
                                if block_n * block_k > 16384:
                                    continue
                                ms = timer.graph(lambda w: gemv(w, block_n=block_n, block_k=block_k, num_warps=warps),
                                                 weights)
                                if ms < best:
                                    best, cfg = ms, f"n{block_n} k{block_k} w{warps}"
                rows.append([model, layer, before or "-", batch, f"{nbytes / 2**20:.1f}", f"{base_ms * 1e3:.1f}",
                             f"{fused_ms * 1e3:.1f}", f"{100 * nbytes / fused_ms / 1e6 / bandwidth:.0f}%",
                             f"{best * 1e3:.1f}", cfg])
            del weights
    return rows


def small_decode_rows(plan: Plan, timer: Timer) -> list[list]:
    """Single-pass decode by key tile, and split-K by partition (+ the reduce launch), in µs of
    GPU time per call; the backend's own pick first."""
    from engine.attention import triton_kernels as K
    from engine.attention.triton_backend import TritonAttentionBackend

    rows = []
    for model, dims in plan.models:
        hq, hk, d = dims.q_heads, dims.kv_heads, dims.head_dim
        for num_seqs in (1, 4):
            for ctx in plan.small_contexts:
                kv_bytes = 2 * num_seqs * ctx * hk * d * plan.dtype.itemsize
                kc, vc, tables = paged_cache(plan, num_seqs, ctx, hk, d, timer.copies(kv_bytes))
                metas = [meta_for(plan, [1] * num_seqs, [ctx] * num_seqs, t, causal=True) for t in tables]
                cu_seqlens_q, seq_lens = metas[0].cu_seqlens_q, metas[0].seq_lens
                q = torch.randn(num_seqs, hq, d, dtype=plan.dtype, device=plan.device)
                out = torch.empty_like(q)
                backend = TritonAttentionBackend()

                def us(op, inputs) -> float:
                    return 1e3 * timer.graph(op, inputs, rep=20)

                def decode(split: bool, **kw):
                    return lambda t: K.decode_attention(q, kc, vc, out, cu_seqlens_q, seq_lens, t, num_seqs, ctx,
                                                        d**-0.5, split=split, **kw)

                picked = us(lambda m: backend.paged_attention(q, kc, vc, m, d**-0.5), metas)
                # 8 warps (the default) split a tile's keys, so each tile's row max and sum cross
                # warps through shared memory; 4 warps cross fewer, which may pay at short contexts
                single = {f"n{n}": us(decode(False, block_n=n), tables) for n in (32, 64, 128, 256)}
                single |= {f"n{n} w4": us(decode(False, block_n=n, num_warps=4), tables) for n in (64, 128)}
                split = {p: us(decode(True, partition_size=p, block_n=min(p, 64)), tables) for p in plan.partitions
                         if p < ctx}
                rows.append([model, num_seqs, ctx, f"{picked:.1f}",
                             " ".join(f"{n}: {t:.1f}" for n, t in single.items()),
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
    parser.add_argument("--dry-run", action="store_true",
                        help="every table once on tiny shapes on CPU (run under TRITON_INTERPRET=1); times nothing")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        print("bench_kernels.py measures the Triton kernels on a GPU; no CUDA device here. "
              "(On CPU the kernels only run under TRITON_INTERPRET=1, far too slow to time: "
              "--dry-run checks the script that way.)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    plan, timer = (dry_plan(), Timer(dry=True)) if args.dry_run else (gpu_plan(args), Timer())
    bandwidth, peak = device_limits(timer)
    hq, hk, d = plan.heads
    name = "CPU (dry run)" if timer.dry else torch.cuda.get_device_name()
    print(f"## Attention kernels on {name}\n\n{machine()}\n")
    print(f"Measured: copy bandwidth {bandwidth:.0f} GB/s, bf16 matmul {peak:.0f} TFLOP/s (8192^3). "
          f"Heads {hq} q / {hk} kv, head_dim {d}, block {plan.block_size}, {str(plan.dtype).removeprefix('torch.')}. "
          "GPU time from CUDA graph replays, inputs streamed past L2.\n")
    # the tables the batch-1 decode target needs first, in case a time limit cuts the run short
    sections: list[tuple[str, list[str], Callable[[], list[list]]]] = [
        ("Decode matmuls: the op before them + cuBLAS vs the fused GEMV",
         ["model", "matmul", "fused op", "rows", "weights MiB", "op + cuBLAS us", "GEMV us", "GEMV of copy BW",
          "sweep best us", "tiles"],
         lambda: gemv_rows(plan, timer, bandwidth, args.sweep)),
        ("Decode attention of one layer, small batches (µs of GPU time)",
         ["model", "seqs", "context", "backend's pick", "single-pass by keys per tile",
          "split-K by partition (+ reduce)"],
         lambda: small_decode_rows(plan, timer)),
        ("Decode (one token per sequence, paged)",
         ["seqs", "context", "K/V MiB", "eager call us (host incl.)", "single us", "split-K us", "auto picks",
          "best GB/s", "of copy BW", "best"],
         lambda: decode_rows(plan, timer, bandwidth, args.sweep)),
        ("Prefill (causal)",
         ["shape", "default ms", "TFLOP/s", "of matmul", "best tiles", "best TFLOP/s", "torch SDPA TFLOP/s"],
         lambda: prefill_rows(plan, timer, peak, args.sweep)),
    ]
    failed = 0
    for title, headers, rows in sections:
        print(f"\n### {title}\n", flush=True)
        try:
            print(table(headers, rows()), flush=True)
        except Exception:  # one table's failure must not cost a lent GPU's run the others
            failed += 1
            traceback.print_exc(file=sys.stdout)
        if not timer.dry:
            torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

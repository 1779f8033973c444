"""GPU end to end: kvserve (Triton kernels, CUDA graphs, bf16) vs transformers generate().

One process, one GPU, one run:
1. the device's limits: copy bandwidth (bytes read + written) and bf16 matmul rate;
2. offline throughput on a mixed workload (default 1,000 prompts of 32-1,024 tokens, 32-512
   output tokens, EOS ignored) for kvserve and for transformers generate() with requests
   grouped by output length and batched (padding only across prompt lengths);
3. batch-1 decode tokens/s: kvserve with CUDA graphs (running ahead, and landing each step's
   tokens before the next launch; cuBLAS or the fused GEMV Linears, these also with programmatic
   dependent launch on Hopper), kvserve eager, transformers,
   against the limit of reading every weight once per token (weight bytes / copy bandwidth),
   and the GPU time of the graph's forward alone, with its kernels profiled (to stderr).

    python benchmarks/bench_gpu.py [--num-prompts 1000] [--hf-batch 64] [--model smollm2]

`--dry-run` (with TRITON_INTERPRET=1 and a tiny model folder) runs the same code on CPU, with
tiny prompts and the static-buffer path the graphs replay, and reports 1.0 for the device's
limits: a lent GPU's run is checked here before it spends GPU time (tests/test_bench_gpu.py).
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_kernels import Timer, device_limits  # noqa: E402
from benchmarks.common import machine, table  # noqa: E402
from engine.fused import pdl  # noqa: E402

OUTPUT_LENGTHS = (32, 64, 128, 256, 512)


@dataclass(frozen=True)
class Setup:
    """Where one run happens and how big it is: a lent GPU, or the dry run on CPU."""

    device: str
    dtype: str
    max_model_len: int
    prompt_lengths: tuple[int, int]  # the workload's shortest and longest prompt
    output_lengths: tuple[int, ...]
    batch1_prompt: int  # tokens of the batch-1 prompt
    decode_tokens: int  # decode steps batch-1 rates are timed over
    num_kv_blocks: int | None  # None: sized from free GPU memory
    replays: int  # graph replays a forward is timed over
    profiled_replays: int

    @property
    def dry(self) -> bool:
        return self.device == "cpu"

    def sync(self) -> None:
        if not self.dry:
            torch.cuda.synchronize()

    def ms_per_call(self, fn: Callable[[], object]) -> float:
        """Milliseconds per fn() called `replays` times back to back: CUDA events on a GPU (its
        time alone)."""
        reps = self.replays
        fn()
        if self.dry:
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            return 1000 * (time.perf_counter() - t0) / reps
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / reps


GPU = Setup(device="cuda", dtype="bfloat16", max_model_len=2048, prompt_lengths=(32, 1024),
            output_lengths=OUTPUT_LENGTHS, batch1_prompt=128, decode_tokens=256, num_kv_blocks=None,
            replays=100, profiled_replays=20)
# Interpreted kernels take ~10 ms a launch: a few tokens of a 2-layer model still take every path.
DRY = Setup(device="cpu", dtype="float32", max_model_len=64, prompt_lengths=(4, 12), output_lengths=(2, 3),
            batch1_prompt=8, decode_tokens=4, num_kv_blocks=64, replays=1, profiled_replays=1)


def workload(setup: Setup, num_prompts: int, vocab: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    low = min(1000, vocab // 2)  # past the special tokens of a real vocabulary
    return [
        ([rng.randrange(low, vocab) for _ in range(rng.randint(*setup.prompt_lengths))],
         rng.choice(setup.output_lengths))
        for _ in range(num_prompts)
    ]


def decode_rate(setup: Setup, generate, prompt: list[int]) -> float:
    """Tokens/s of decode alone: time(n + 1 tokens) - time(1 token) covers n decode steps."""
    n = setup.decode_tokens
    generate(prompt, 8)
    setup.sync()
    t0 = time.perf_counter()
    generate(prompt, 1)
    setup.sync()
    t1 = time.perf_counter()
    generate(prompt, n + 1)
    setup.sync()
    t2 = time.perf_counter()
    return n / ((t2 - t1) - (t1 - t0))


def graph_forward_ms(setup: Setup, llm, context: int) -> float:
    """Milliseconds of the batch-1 decode graph replayed back to back: the GPU's time for a
    step's forward, with no host work between (logits and sampling run outside the graph)."""
    return setup.ms_per_call(llm.engine.runner.graphs.forward_alone(1, context))


def graph_kernel_profile(setup: Setup, llm, context: int, top: int = 8) -> dict:
    """Where the batch-1 graph's time goes: per kernel, launches and GPU µs per step (CUPTI traces
    kernels inside graph replays). Their sum against graph_forward_ms is the time between kernels.
    A dry run profiles the host's ops instead (there are no kernels to trace)."""
    from torch.profiler import ProfilerActivity, profile

    replay = llm.engine.runner.graphs.forward_alone(1, context)
    replays = setup.profiled_replays
    replay()
    setup.sync()
    with profile(activities=[ProfilerActivity.CPU if setup.dry else ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            replay()
        setup.sync()

    def us(e) -> float:
        return e.self_cpu_time_total if setup.dry else e.device_time_total

    kernels = [e for e in prof.key_averages() if us(e) > 0 and e.count >= replays]
    kernels.sort(key=us, reverse=True)
    return {
        "kernels_per_step": sum(e.count for e in kernels) / replays,
        "kernel_us_per_step": sum(us(e) for e in kernels) / replays,
        "top": [(e.key[:60], e.count / replays, us(e) / replays) for e in kernels[:top]],
    }


def run_kvserve(setup: Setup, model: str, work, prompt: list[int], graphs: bool, throughput: bool,
                run_ahead: bool | None = None, gemv_max_rows: int = 0, enable_pdl: bool = False) -> dict:
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model, device=setup.device, dtype=setup.dtype, attention_backend="triton",
              max_num_seqs=256 if throughput else 8, max_num_batched_tokens=8192, max_model_len=setup.max_model_len,
              num_kv_blocks=setup.num_kv_blocks, decode_graphs=graphs, run_ahead=run_ahead,
              gemv_max_rows=gemv_max_rows, enable_pdl=enable_pdl)
    startup = time.perf_counter() - t0

    def gen(p: list[int], n: int) -> None:
        llm.generate([p], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))

    result = {"startup_s": startup, "decode_tok_s": decode_rate(setup, gen, prompt)}
    if graphs:
        context = len(prompt) + setup.decode_tokens
        result["graph_forward_ms"] = graph_forward_ms(setup, llm, context)
        try:  # a diagnosis, not a result: a profiler that cannot trace graphs must not end the run
            result["profile"] = graph_kernel_profile(setup, llm, context)
        except RuntimeError as err:
            print(f"kernel profile failed: {err}", file=sys.stderr)
    if throughput:
        params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in work]
        setup.sync()
        start = time.perf_counter()
        outs = llm.generate([p for p, _ in work], params)
        result["seconds"] = time.perf_counter() - start
        result["tokens"] = sum(len(o.outputs[0].token_ids) for o in outs)
        result["preemptions"] = llm.engine.scheduler.num_preemptions
    result["weight_bytes"] = sum(p.numel() * p.element_size() for p in llm.engine.runner.model.parameters())
    result["num_blocks"] = llm.engine.block_manager.num_blocks
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return result


def run_hf(setup: Setup, folder: str, work, prompt: list[int], batch_size: int) -> dict:
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, setup.dtype)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(setup.device).eval()

    def generate(prompts: list[list[int]], n: int) -> int:
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=setup.device)  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=setup.device)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0)
        return (out.shape[1] - width) * len(prompts)

    result = {"decode_tok_s": decode_rate(setup, lambda p, n: generate([p], n), prompt)}
    groups: dict[int, list[list[int]]] = {}
    for p, n in work:
        groups.setdefault(n, []).append(p)
    setup.sync()
    start = time.perf_counter()
    tokens = 0
    for n, prompts in sorted(groups.items()):
        prompts.sort(key=len)  # similar lengths together: less padding
        for i in range(0, len(prompts), batch_size):
            tokens += generate(prompts[i : i + batch_size], n)
    setup.sync()
    result.update(seconds=time.perf_counter() - start, tokens=tokens)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--num-prompts", type=int, default=1000)
    ap.add_argument("--hf-batch", type=int, default=64)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--decode-only", action="store_true", help="batch-1 decode of kvserve only (large models)")
    ap.add_argument("--json", help="also write the raw numbers here")
    ap.add_argument("--dry-run", action="store_true",
                    help="on CPU, tiny shapes, with TRITON_INTERPRET=1 and a tiny --model folder: checks the script")
    args = ap.parse_args()
    setup = DRY if args.dry_run else GPU
    if not setup.dry and not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA device (or --dry-run)", file=sys.stderr)
        return 2
    from models.loader import resolve

    _, folder = resolve(args.model)
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    work = workload(setup, args.num_prompts, vocab)
    prompt = workload(setup, 1, vocab, seed=99)[0][0][: setup.batch1_prompt]
    bandwidth, peak = device_limits(Timer(dry=setup.dry))
    res = {"bandwidth_gbps": bandwidth, "matmul_tflops": peak}
    if args.decode_only:
        print(f"Batch-1 decode, {folder.name}, {setup.dtype}, CUDA graphs ({bandwidth:.0f} GB/s copy bandwidth):\n")
        print(table(["Linears", "step", "tokens/s", "% of weights-read limit", "graph forward ms"],
                    batch1_rows(setup, str(folder), work, prompt, bandwidth)))
        return 0
    res["kvserve"] = run_kvserve(setup, str(folder), work, prompt, graphs=True, throughput=True)
    print("kvserve:", res["kvserve"], file=sys.stderr, flush=True)
    res["kvserve_landing"] = run_kvserve(setup, str(folder), work, prompt, graphs=True, throughput=True, run_ahead=False)
    print("kvserve landing each step:", res["kvserve_landing"], file=sys.stderr, flush=True)
    res["kvserve_gemv"] = run_kvserve(setup, str(folder), work, prompt, graphs=True, throughput=False, gemv_max_rows=4)
    print("kvserve GEMV Linears:", res["kvserve_gemv"], file=sys.stderr, flush=True)
    if pdl.supported(setup.device):
        res["kvserve_pdl"] = run_kvserve(setup, str(folder), work, prompt, graphs=True, throughput=False, gemv_max_rows=4,
                                         enable_pdl=True)
        print("kvserve GEMV Linears + PDL:", res["kvserve_pdl"], file=sys.stderr, flush=True)
    res["kvserve_eager"] = run_kvserve(setup, str(folder), work, prompt, graphs=False, throughput=False)
    print("kvserve eager:", res["kvserve_eager"], file=sys.stderr, flush=True)
    if not args.skip_hf:
        res["hf"] = run_hf(setup, str(folder), work, prompt, args.hf_batch)
        print("hf:", res["hf"], file=sys.stderr, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))

    kv = res["kvserve"]
    limit = bandwidth * 1e9 / kv["weight_bytes"]  # tokens/s if each token only read the weights once
    print(f"## GPU end to end on {'a dry run' if setup.dry else torch.cuda.get_device_name()}\n\n{machine()}\n")
    print(f"Measured: copy bandwidth {bandwidth:.0f} GB/s, bf16 matmul {peak:.0f} TFLOP/s. Model {folder.name}, "
          f"{setup.dtype}, {kv['weight_bytes'] / 1e6:.0f} MB of weights, KV cache {kv['num_blocks']} blocks of 16.\n")
    low, high = setup.prompt_lengths
    print(f"Workload: {args.num_prompts} prompts of {low}-{high} tokens, {setup.output_lengths} output tokens, "
          "greedy, EOS ignored.\n")
    landing = res["kvserve_landing"]
    rows = [["kvserve (continuous batching, CUDA graphs, running ahead)", kv["tokens"], kv["seconds"], kv["tokens"] / kv["seconds"]],
            ["kvserve, landing each step", landing["tokens"], landing["seconds"], landing["tokens"] / landing["seconds"]]]
    if "hf" in res:
        hf = res["hf"]
        rows.append([f"transformers generate(), batch {args.hf_batch}", hf["tokens"], hf["seconds"], hf["tokens"] / hf["seconds"]])
    print(table(["engine", "output tokens", "seconds", "output tok/s"], rows))
    if "hf" in res:
        ratio = (kv["tokens"] / kv["seconds"]) / (res["hf"]["tokens"] / res["hf"]["seconds"])
        print(f"\nkvserve / transformers: {ratio:.1f}x output tokens/s (target 10x)\n")
    gemv = res["kvserve_gemv"]
    labels = {"kvserve": "kvserve, CUDA graphs, running ahead", "kvserve_landing": "kvserve, CUDA graphs, landing each step",
              "kvserve_gemv": "kvserve, CUDA graphs, running ahead, GEMV Linears",
              "kvserve_pdl": "kvserve, CUDA graphs, running ahead, GEMV Linears + PDL",
              "kvserve_eager": "kvserve, eager", "hf": "transformers generate()"}
    rows = [[label, res[key]["decode_tok_s"], 100 * res[key]["decode_tok_s"] / limit]
            for key, label in labels.items() if key in res]
    print(f"Batch-1 decode ({len(prompt)}-token prompt, {setup.decode_tokens} tokens); "
          f"weights-read limit {limit:.0f} tokens/s:\n")
    print(table(["engine", "tokens/s", "% of limit"], rows))
    print(f"\nThe batch-1 graph's forward alone, replayed back to back: {kv['graph_forward_ms']:.3f} ms "
          f"(cuBLAS Linears), {gemv['graph_forward_ms']:.3f} ms (GEMV Linears).")
    print_profile("cuBLAS", kv)
    print_profile("GEMV", gemv)
    if "kvserve_pdl" in res:
        print(f"With PDL: {res['kvserve_pdl']['graph_forward_ms']:.3f} ms.")
        print_profile("GEMV + PDL", res["kvserve_pdl"])
    return 0


def batch1_rows(setup: Setup, folder: str, work, prompt: list[int], bandwidth: float) -> list[list]:
    """Batch-1 decode with cuBLAS or GEMV Linears, running ahead or landing each step, and the
    GEMV Linears with programmatic dependent launch where the GPU has it."""
    rows = []
    configs = [(gemv, ahead, False) for gemv in (0, 4) for ahead in (True, False)]
    if pdl.supported(setup.device):
        configs += [(4, True, True), (0, True, True)]
    for gemv, ahead, with_pdl in configs:
        kv = run_kvserve(setup, folder, work, prompt, graphs=True, throughput=False, run_ahead=ahead, gemv_max_rows=gemv,
                         enable_pdl=with_pdl)
        limit = bandwidth * 1e9 / kv["weight_bytes"]
        label = ("GEMV" if gemv else "cuBLAS") + (" + PDL" if with_pdl else "")
        rows.append([label, "running ahead" if ahead else "landing", f"{kv['decode_tok_s']:.0f}",
                     f"{100 * kv['decode_tok_s'] / limit:.0f}% of {limit:.0f}", f"{kv['graph_forward_ms']:.3f}"])
        print(rows[-1], file=sys.stderr, flush=True)
        if ahead:
            print_profile(label, kv)
    return rows


def print_profile(label: str, kv: dict) -> None:
    """The graph's kernels, to stderr: what a step's GPU time is made of, and the gaps between."""
    prof = kv.get("profile")
    if prof is None:
        return
    gaps = 1000 * kv["graph_forward_ms"] - prof["kernel_us_per_step"]
    print(f"{label}: {prof['kernels_per_step']:.0f} kernels/step, {prof['kernel_us_per_step']:.1f} µs in kernels, "
          f"{gaps:.1f} µs between them", file=sys.stderr)
    for name, count, us in prof["top"]:
        print(f"  {us:8.1f} µs  {count:5.0f}x  {name}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())

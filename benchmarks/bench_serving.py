"""Serving latency and throughput: kvserve vs transformers generate() per request, same API shape.

Both servers run as subprocesses on 127.0.0.1 with the same model (SmolLM2-135M-Instruct, fp32).
At each concurrency level, that many clients send streaming `/v1/completions` back to back
(token-id prompts of 32-256 tokens, a fixed number of output tokens, EOS ignored) until the
level's request count is done. Per request: TTFT (send -> first chunk), inter-token latencies
(gaps between chunks, each chunk divided over the tokens it carries); per level: output tokens/s.

    python benchmarks/bench_serving.py [--concurrency 1,8,32] [--requests-per-level 64] [--max-tokens 64]

With `--shared-prefix-tokens N` every prompt starts with the same N tokens (a system prompt);
`--servers kvserve,kvserve-no-prefix-cache` then measures what prefix caching saves.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import free_port, machine, pct, server, table  # noqa: E402


async def one_request(client: httpx.AsyncClient, url: str, model: str | None, prompt: list[int],
                      max_tokens: int) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    if model:
        body["model"] = model
    start = time.perf_counter()
    first = last = None
    gaps: list[float] = []
    tokens = 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if not chunk["choices"]:
                continue
            now = time.perf_counter()
            if first is None:
                first = now
            elif last is not None:
                gaps.append(now - last)
            last = now
    return {"ttft": (first or time.perf_counter()) - start, "gaps": gaps, "tokens": tokens,
            "e2e": time.perf_counter() - start}


async def run_level(url: str, model: str | None, prompts: list[list[int]], concurrency: int,
                    max_tokens: int) -> dict:
    queue = list(prompts)
    results: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800), limits=limits) as client:
        async def worker() -> None:
            while queue:
                results.append(await one_request(client, url, model, queue.pop(), max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    ttft = sorted(r["ttft"] for r in results)
    itl = sorted(g for r in results for g in r["gaps"])
    tokens = sum(r["tokens"] for r in results)
    return {"requests": len(results), "tokens": tokens, "seconds": elapsed, "tok_s": tokens / elapsed,
            "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99), "itl_p50": pct(itl, 50), "itl_p99": pct(itl, 99)}


def workload(n: int, seed: int = 0, shared_prefix: int = 0) -> list[list[int]]:
    """n prompts of 32-256 random tokens, each after the same `shared_prefix` tokens."""
    rng = random.Random("system prompt")
    stem = [rng.randrange(1000, 49152) for _ in range(shared_prefix)]
    rng = random.Random(seed)
    return [stem + [rng.randrange(1000, 49152) for _ in range(rng.randint(32, 256))] for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--requests-per-level", type=int, default=64,
                    help="requests at each level (at least the concurrency; level 1 uses a quarter)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--servers", default="kvserve,hf", help="of kvserve, hf, kvserve-no-prefix-cache")
    ap.add_argument("--shared-prefix-tokens", type=int, default=0, help="tokens every prompt starts with")
    args = ap.parse_args()
    from models.loader import load_model

    folder = load_model("smollm2").info.path  # the converted GGUF: both servers load the same weights
    levels = [int(c) for c in args.concurrency.split(",")]
    def kvserve(port: int, *extra: str) -> list[str]:
        return ["-m", "server.cli", "serve", "--model", folder, "--port", str(port), "--max-num-seqs", "64",
                "--max-num-batched-tokens", "1024", "--kv-cache-memory-gib", "2", "--device", "cpu",
                "--log-level", "warning", *extra]

    commands = {
        "kvserve": kvserve,
        "kvserve-no-prefix-cache": lambda port: kvserve(port, "--no-enable-prefix-caching"),
        "hf": lambda port: ["benchmarks/hf_baseline_server.py", "--folder", folder, "--port", str(port)],
    }
    labels = {"kvserve": "kvserve", "kvserve-no-prefix-cache": "kvserve --no-enable-prefix-caching",
              "hf": "transformers generate() per request"}
    shared = args.shared_prefix_tokens
    rows, by_level = [], {}
    for name in args.servers.split(","):
        port = free_port()
        with server(commands[name](port), port) as url:
            model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"] if name != "hf" else None
            asyncio.run(run_level(url, model, workload(2, seed=10**6, shared_prefix=shared), 1, 4))  # warm-up
            for c in levels:
                n = max(c, args.requests_per_level // 4 if c == 1 else args.requests_per_level)
                r = asyncio.run(run_level(url, model, workload(n, seed=c, shared_prefix=shared), c, args.max_tokens))
                by_level[(name, c)] = r
                print(f"{name} c={c}: {r}", file=sys.stderr)
                rows.append([labels[name], c, r["requests"], r["tok_s"], r["ttft_p50"] * 1e3, r["ttft_p99"] * 1e3,
                             r["itl_p50"] * 1e3, r["itl_p99"] * 1e3])
    print(f"Machine: {machine()}\n")
    stem = f"the same {shared} tokens then " if shared else ""
    print(f"Workload: streaming /v1/completions, prompts of {stem}32-256 tokens, {args.max_tokens} output tokens "
          "(EOS ignored), SmolLM2-135M fp32, greedy\n")
    print(table(["server", "concurrency", "requests", "output tok/s", "TTFT p50 ms", "TTFT p99 ms",
                 "ITL p50 ms", "ITL p99 ms"], rows))
    for c in levels:
        for peer in ("hf", "kvserve-no-prefix-cache"):
            if ("kvserve", c) in by_level and (peer, c) in by_level:
                a, b = by_level[("kvserve", c)], by_level[(peer, c)]
                print(f"\nconcurrency {c}: kvserve / {labels[peer]} = {a['tok_s'] / b['tok_s']:.2f}x output tokens/s, "
                      f"TTFT p50 {a['ttft_p50'] * 1e3:.0f} vs {b['ttft_p50'] * 1e3:.0f} ms, "
                      f"p99 {a['ttft_p99'] * 1e3:.0f} vs {b['ttft_p99'] * 1e3:.0f} ms")


if __name__ == "__main__":
    main()

"""Reranking throughput: kvserve's cross-encoder `score()` vs sentence-transformers `CrossEncoder.predict()`,
plus HTTP /v1/rerank.

No cross-encoder checkpoint ships offline, so the model is ms-marco-MiniLM-L6-v2's shape built from
the shipped all-MiniLM-L6-v2: its real encoder weights and tokenizer, plus a seeded random one-label
head (BertForSequenceClassification), saved once to a temp folder both contenders load. Speed does
not depend on the head's values; the scores are compared between contenders all the same.
Workload: Q queries of 4-16 words, each with D documents of 20-200 tokens, whole-word entries of the
vocabulary (no data set is downloaded). Each contender runs in its own process, gets one warm-up
call and reports the fastest of --repeats runs. The HTTP row starts `kvserve serve` and sends one
query with its D documents per /v1/rerank request from C concurrent clients.

    python benchmarks/bench_rerank.py [--queries 32] [--docs 16] [--engines kvserve,st,http] [--clients 8] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.bench_embeddings import model_folder  # noqa: E402
from benchmarks.common import (  # noqa: E402
    add_child_args, best_of, child_report, machine, pct, run_child, server_peak_rss_mib, table,
)

ROOT = Path(__file__).resolve().parent.parent


def build_cross_encoder(folder: Path) -> None:
    """all-MiniLM-L6-v2's encoder and tokenizer + a seeded random one-label head."""
    import shutil

    import torch
    from transformers import BertConfig, BertForSequenceClassification

    src = Path(model_folder())
    config = BertConfig.from_pretrained(src, num_labels=1)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    from safetensors.torch import load_file

    encoder = {f"bert.{k}": v for k, v in load_file(src / "model.safetensors").items()}
    missing = model.load_state_dict(encoder, strict=False).missing_keys
    assert set(missing) <= {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"}
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / name, folder / name)


def workload(num_queries: int, num_docs: int, seed: int = 0) -> list[tuple[str, list[str]]]:
    words = [w for w in (Path(model_folder()) / "vocab.txt").read_text(encoding="utf-8").split("\n")
             if w.isascii() and w.isalpha() and len(w) >= 3]
    rng = random.Random(seed)
    text = lambda lo, hi: " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    return [(text(4, 16), [text(18, 198) for _ in range(num_docs)]) for _ in range(num_queries)]


def _pairs(queries: list[tuple[str, list[str]]]) -> list[tuple[str, str]]:
    return [(q, d) for q, docs in queries for d in docs]


def run_kvserve(folder: str, queries: list, out: str, args: argparse.Namespace) -> dict:
    from engine.config import EngineConfig
    from engine.embedding_engine import EmbeddingEngine

    engine = EmbeddingEngine.from_config(EngineConfig(model=folder))
    pairs = _pairs(queries)
    first, second = [q for q, _ in pairs], [d for _, d in pairs]
    engine.score(first[:8], second[:8])  # warm-up
    elapsed, scores = best_of(args.repeats, lambda: engine.score(first, second))  # tokenization included
    Path(out).write_text(json.dumps(scores))
    tokens = sum(len(ids) for ids, _ in engine.tokenizer.encode_pairs(pairs))
    return {"seconds": elapsed, "tokens": tokens}


def run_st(folder: str, queries: list, out: str, args: argparse.Namespace) -> dict:
    from sentence_transformers import CrossEncoder

    st = CrossEncoder(folder, device="cpu")
    pairs = _pairs(queries)
    st.predict(pairs[:8])  # warm-up
    elapsed, scores = best_of(args.repeats, lambda: st.predict(pairs))  # defaults: batch 32
    Path(out).write_text(json.dumps([float(s) for s in scores]))
    tokens = sum(len(ids) for ids in st.tokenizer([q for q, _ in pairs], [d for _, d in pairs])["input_ids"])
    return {"seconds": elapsed, "tokens": tokens}


def run_http(folder: str, queries: list, out: str, args: argparse.Namespace) -> dict:
    import httpx

    from tests.server_helpers import free_port, subprocess_server

    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = ["-m", "server.cli", "serve", "--model", folder, "--port", str(port), "--device", "cpu",
           "--log-level", "warning"]
    latencies: list[float] = []
    with tempfile.TemporaryDirectory() as tmp, \
            subprocess_server(cmd, port, Path(tmp) / "server.log", env=env, timeout=300) as (base, server), \
            httpx.Client(timeout=300, limits=httpx.Limits(max_connections=args.clients)) as http:
        def one(item: tuple[str, list[str]]) -> tuple[list[float], int]:
            query, docs = item
            start = time.perf_counter()
            body = http.post(f"{base}/v1/rerank", json={"query": query, "documents": docs,
                                                        "return_documents": False}).raise_for_status().json()
            latencies.append(time.perf_counter() - start)
            scores = [0.0] * len(docs)
            for r in body["results"]:
                scores[r["index"]] = r["relevance_score"]
            return scores, body["usage"]["total_tokens"]

        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(one, queries[:args.clients]))  # warm-up
            latencies.clear()
            elapsed, results = best_of(args.repeats, lambda: list(pool.map(one, queries)))
        rss = server_peak_rss_mib(server.pid)
    Path(out).write_text(json.dumps([s for scores, _ in results for s in scores]))
    latencies.sort()
    return {"seconds": elapsed, "tokens": sum(n for _, n in results), "server_rss_mib": rss,
            "p50_ms": pct(latencies, 50) * 1000, "p99_ms": pct(latencies, 99) * 1000}


RUNNERS = {"kvserve": run_kvserve, "st": run_st, "http": run_http}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--queries", type=int, default=32)
    ap.add_argument("--docs", type=int, default=16, help="documents per query")
    add_child_args(ap, clients=8)
    args = ap.parse_args()
    if args.child:
        print(child_report(RUNNERS[args.child](args.folder, workload(args.queries, args.docs), args.out, args)))
        return
    tmp = Path(tempfile.mkdtemp(prefix="kvserve-bench-rerank-"))
    folder = tmp / "minilm-l6-cross-encoder"
    build_cross_encoder(folder)
    labels = {"kvserve": "kvserve `score()` (length-sorted token-budget batches, no padding)",
              "st": "sentence-transformers `CrossEncoder.predict()` (batch 32)",
              "http": f"kvserve HTTP `/v1/rerank`, {args.clients} clients, 1 query + {args.docs} documents/request"}
    pairs = args.queries * args.docs
    results, rows = {}, []
    for name in args.engines.split(","):
        line = run_child([sys.executable, __file__, "--child", name, "--folder", str(folder),
                          "--out", str(tmp / f"{name}.json"), "--queries", str(args.queries), "--docs", str(args.docs),
                          "--clients", str(args.clients), "--repeats", str(args.repeats)], timeout=3600)
        results[name] = r = json.loads(line)
        latency = f"{r['p50_ms']:.0f} / {r['p99_ms']:.0f}" if "p50_ms" in r else "-"
        rows.append([labels[name], pairs, r["tokens"], r["seconds"], pairs / r["seconds"], r["tokens"] / r["seconds"],
                     latency, r["peak_rss_mib"]])
        print(f"{name}: {r}", file=sys.stderr)
    print(f"Machine: {machine()}\n")
    print(f"Workload: {args.queries} queries x {args.docs} documents (4-16 words; 20-200 tokens), "
          "MiniLM-L6 cross-encoder fp32, CPU\n")
    print(table(["engine", "pairs", "tokens", "seconds", "pairs/s", "tokens/s", "request p50 / p99 ms",
                 "peak RSS MiB"], rows))
    scores = {name: json.loads((tmp / f"{name}.json").read_text()) for name in results}
    if "st" in scores:
        for name, s in scores.items():
            if name != "st":
                diff = max(abs(a - b) for a, b in zip(s, scores["st"]))
                print(f"\n{name} vs sentence-transformers: max |score difference| {diff:.2e}")
        if "kvserve" in results:
            print(f"\nkvserve score() / CrossEncoder.predict(): "
                  f"{results['st']['seconds'] / results['kvserve']['seconds']:.2f}x pairs/s")


if __name__ == "__main__":
    main()

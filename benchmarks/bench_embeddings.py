"""Embedding throughput: kvserve offline `embed()` vs sentence-transformers `encode()`, plus HTTP.

Same machine, same run, same model (the shipped all-MiniLM-L6-v2, fp32) and the same sentences:
N texts of 5-250 tokens (uniform), built deterministically from whole-word entries of the
model's own vocabulary, so no data set is downloaded and token counts are exact.
`--model qwen3-0.6b-shape` times a decoder embedding model instead: Qwen3-Embedding-0.6B's shape
(28 layers, hidden 1024, 16 q / 8 KV heads of 128, MLP 3072; causal attention, last-token pooling,
Normalize) with random weights and SmolLM2's tokenizer (no package ships the real one), saved as a
sentence-transformers folder that both contenders load. `--model splade-bert-base-shape` times SPLADE
sparse embeddings: a random BertForMaskedLM of bert-base's shape (naver/splade-v3's: 12 layers, hidden
768, the 30,522-entry MLM head) with MiniLM's tokenizer, as a SparseEncoder (max pooling) folder,
against sentence-transformers' SparseEncoder.encode(). `--model modernbert-base-shape` times a random
ModernBertModel of ModernBERT-base's shape (22 layers, hidden 768, GeGLU 1152, local attention of 128 on
two layers of three) with MiniLM's tokenizer, mean pooling and Normalize (modernbert-embed's layout).
Each contender
runs in its own process (peak RSS is its own), gets one warm-up call, and reports the fastest
of --repeats timed runs. sentence-transformers
uses its default `encode()` (batch 32, length-sorted). The HTTP row starts `kvserve serve` as a
subprocess on 127.0.0.1 and sends one sentence per request from C concurrent clients.

    python benchmarks/bench_embeddings.py [--num-sentences 2000] [--engines kvserve,st,http] [--clients 16] [--repeats 2]
                                          [--model minilm|qwen3-0.6b-shape|splade-bert-base-shape|modernbert-base-shape]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.common import (  # noqa: E402
    add_child_args, best_of, child_report, machine, run_child, server_peak_rss_mib, table,
)
from tests.tiny_models import copy_minilm_tokenizer, sentence_transformers_folder  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def model_folder() -> str:
    from models.loader import resolve

    return str(resolve("minilm")[1])


QWEN3_EMBEDDING_SHAPE = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                            num_key_value_heads=8, head_dim=128, max_position_embeddings=32768, rope_theta=1000000.0,
                            rms_norm_eps=1e-6, tie_word_embeddings=True)


def decoder_folder(root: Path) -> str:
    """A sentence-transformers folder around a random Qwen3 of Qwen3-Embedding-0.6B's shape (built once)."""
    folder = root / "qwen3-0.6b-shape"
    if (folder / "modules.json").exists():
        return str(folder)
    import shutil

    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from models.loader import resolve

    tokenizer_from = resolve("smollm2")[1]
    lm = root / "qwen3-lm"
    torch.manual_seed(0)
    Qwen3ForCausalLM(Qwen3Config(vocab_size=49152, **QWEN3_EMBEDDING_SHAPE)).save_pretrained(lm)
    shutil.copy(tokenizer_from / "tokenizer.json", lm / "tokenizer.json")
    # without the chat template: sentence-transformers 6 renders every text through a tokenizer's template
    # (its "message" modality), where kvserve, vLLM and TEI embed the text as sent
    config = json.loads((tokenizer_from / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.pop("chat_template", None)
    (lm / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    body = Transformer(str(lm))
    SentenceTransformer(modules=[body, Pooling(body.get_embedding_dimension(), pooling_mode="lasttoken"), Normalize()],
                        device="cpu").save(str(folder))
    shutil.rmtree(lm)
    return str(folder)


def splade_folder(root: Path) -> str:
    """A SparseEncoder folder around a random BertForMaskedLM of bert-base's shape (built once)."""
    folder = root / "splade-bert-base-shape"
    if (folder / "modules.json").exists():
        return str(folder)
    import shutil

    import torch
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.modules import MLMTransformer, SpladePooling
    from transformers import BertConfig, BertForMaskedLM

    mlm = root / "bert-mlm"
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=30522)).save_pretrained(mlm)  # BertConfig's defaults are bert-base's
    copy_minilm_tokenizer(mlm)
    SparseEncoder(modules=[MLMTransformer(str(mlm)), SpladePooling("max")], device="cpu").save_pretrained(str(folder))
    shutil.rmtree(mlm)
    return str(folder)


def modernbert_folder(root: Path) -> str:
    """A sentence-transformers folder around a random ModernBertModel of ModernBERT-base's shape (built once)."""
    folder = root / "modernbert-base-shape"
    if (folder / "modules.json").exists():
        return str(folder)
    import shutil

    import torch
    from transformers import ModernBertConfig, ModernBertModel

    body = root / "modernbert-body"
    torch.manual_seed(0)
    # the config's defaults are ModernBERT-base's; MiniLM's tokenizer and its special token ids
    ModernBertModel(ModernBertConfig(vocab_size=30522, pad_token_id=0, bos_token_id=101, eos_token_id=102,
                                     cls_token_id=101, sep_token_id=102)).save_pretrained(body)
    sentence_transformers_folder(body, folder, max_seq_length=512)
    shutil.rmtree(body)
    return str(folder)


def is_sparse(folder: str) -> bool:
    return "SpladePooling" in (Path(folder) / "modules.json").read_text(encoding="utf-8")


def workload(folder: str, num_sentences: int, seed: int = 0) -> list[str]:
    """Sentences of 5-250 tokens: whole words of the vocabulary, one token each (BERT's [CLS] and
    [SEP] make up the other 2; a byte-level BPE vocabulary's words are those with a leading space)."""
    vocab = Path(folder) / "vocab.txt"
    if vocab.exists():
        words = [w for w in vocab.read_text(encoding="utf-8").split("\n") if w.isascii() and w.isalpha() and len(w) >= 3]
    else:
        model = json.loads((Path(folder) / "tokenizer.json").read_text(encoding="utf-8"))["model"]
        if model["type"] == "WordPiece":  # a BERT tokenizer saved without vocab.txt
            words = [w for w in model["vocab"] if w.isascii() and w.isalpha() and len(w) >= 3]
        else:
            words = [w[1:] for w in model["vocab"] if w.startswith("\u0120") and w[1:].isascii() and w[1:].isalpha()
                     and len(w) >= 4]
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 250) - 2)) for _ in range(num_sentences)]


def run_kvserve(folder: str, texts: list[str], out: str, args: argparse.Namespace) -> dict:
    import numpy as np

    from engine.config import EngineConfig
    from engine.embedding_engine import EmbeddingEngine

    engine = EmbeddingEngine.from_config(EngineConfig(model=folder))
    engine.embed(texts[:8])  # warm-up
    elapsed, vectors = best_of(args.repeats, lambda: engine.embed(texts))  # tokenization included, as in ST
    np.save(out, vectors.numpy())
    return {"seconds": elapsed, "tokens": sum(map(len, engine._tokenize(texts)))}


def run_st(folder: str, texts: list[str], out: str, args: argparse.Namespace) -> dict:
    import numpy as np
    from sentence_transformers import SentenceTransformer, SparseEncoder

    st = (SparseEncoder if is_sparse(folder) else SentenceTransformer)(folder, device="cpu")
    st.encode(texts[:8])  # warm-up
    elapsed, vectors = best_of(args.repeats, lambda: st.encode(texts))  # defaults: batch 32, length-sorted
    np.save(out, vectors.to_dense().numpy() if is_sparse(folder) else vectors)
    tokens = sum(len(ids) for ids in st.tokenizer(texts, truncation=True, max_length=st.max_seq_length)["input_ids"])
    return {"seconds": elapsed, "tokens": tokens}


def run_http(folder: str, texts: list[str], out: str, args: argparse.Namespace) -> dict:
    import httpx
    import numpy as np

    from tests.server_helpers import free_port, subprocess_server

    clients = args.clients
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    # the peer runs on the CPU, so kvserve does too (the server would take a GPU where it sees one)
    cmd = ["-m", "server.cli", "serve", "--model", folder, "--port", str(port), "--device", "cpu",
           "--log-level", "warning"]
    name = Path(folder).name
    with tempfile.TemporaryDirectory() as tmp, \
            subprocess_server(cmd, port, Path(tmp) / "server.log", env=env, timeout=300) as (base, server), \
            httpx.Client(timeout=300, limits=httpx.Limits(max_connections=clients)) as http:
        def one(text: str) -> tuple[list[float], int]:
            body = http.post(f"{base}/v1/embeddings", json={"model": name, "input": text}).raise_for_status().json()
            return body["data"][0]["embedding"], body["usage"]["prompt_tokens"]

        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(one, texts[:clients]))  # warm-up
            elapsed, results = best_of(args.repeats, lambda: list(pool.map(one, texts)))
        rss = server_peak_rss_mib(server.pid)
    np.save(out, np.asarray([v for v, _ in results], dtype=np.float32))
    return {"seconds": elapsed, "tokens": sum(n for _, n in results), "server_rss_mib": rss}


RUNNERS = {"kvserve": run_kvserve, "st": run_st, "http": run_http}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-sentences", type=int, default=2000)
    ap.add_argument("--model", choices=["minilm", "qwen3-0.6b-shape", "splade-bert-base-shape", "modernbert-base-shape"],
                    default="minilm")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "kvserve-bench-emb-models"),
                    help="where the random models' folders are built once")
    add_child_args(ap, clients=16)
    args = ap.parse_args()
    if args.child:
        texts = workload(args.folder, args.num_sentences)
        print(child_report(RUNNERS[args.child](args.folder, texts, args.out, args)))
        return
    import numpy as np

    folder = {"minilm": model_folder, "qwen3-0.6b-shape": lambda: decoder_folder(Path(args.cache)),
              "splade-bert-base-shape": lambda: splade_folder(Path(args.cache)),
              "modernbert-base-shape": lambda: modernbert_folder(Path(args.cache))}[args.model]()
    labels = {"kvserve": "kvserve embed() (length-sorted token-budget batches, no padding)",
              "st": "sentence-transformers encode() (batch 32)",
              "http": f"kvserve HTTP /v1/embeddings, {args.clients} clients, 1 sentence/request"}
    tmp = Path(tempfile.mkdtemp(prefix="kvserve-bench-emb-"))
    results, rows = {}, []
    for name in args.engines.split(","):
        line = run_child([sys.executable, __file__, "--child", name, "--folder", folder, "--out", str(tmp / f"{name}.npy"),
                          "--num-sentences", str(args.num_sentences), "--clients", str(args.clients),
                          "--repeats", str(args.repeats)], timeout=3600)
        results[name] = r = json.loads(line)
        rows.append([labels[name], args.num_sentences, r["tokens"], r["seconds"], args.num_sentences / r["seconds"],
                     r["tokens"] / r["seconds"], r["peak_rss_mib"]])
        print(f"{name}: {r}", file=sys.stderr)
    print(f"Machine: {machine()}\n")
    model = {"minilm": "all-MiniLM-L6-v2",
             "qwen3-0.6b-shape": "a random Qwen3-Embedding-0.6B-shaped decoder (causal, last token), SmolLM2's tokenizer",
             "splade-bert-base-shape": "a random bert-base-shaped SPLADE model (MLM head, max pooling), MiniLM's "
                                       "tokenizer",
             "modernbert-base-shape": "a random ModernBERT-base-shaped encoder (local attention 128, mean pooling, "
                                      "Normalize), MiniLM's tokenizer"}[args.model]
    print(f"Workload: {args.num_sentences} sentences of 5-250 tokens (uniform), {model}, fp32, CPU\n")
    print(table(["engine", "sentences", "tokens", "seconds", "sentences/s", "tokens/s", "peak RSS MiB"], rows))
    vectors = {name: np.load(tmp / f"{name}.npy") for name in results}
    if "st" in vectors:
        for name, v in vectors.items():
            if name != "st":
                cos = (v * vectors["st"]).sum(1) / np.linalg.norm(v, axis=1) / np.linalg.norm(vectors["st"], axis=1)
                print(f"\n{name} vs sentence-transformers: min cosine {cos.min():.6f}")
        if "kvserve" in results:
            speedup = results["st"]["seconds"] / results["kvserve"]["seconds"]
            print(f"\nkvserve embed() / sentence-transformers encode(): {speedup:.2f}x sentences/s")


if __name__ == "__main__":
    main()

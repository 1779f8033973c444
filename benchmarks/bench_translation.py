"""Offline translation (and summarization) throughput: kvserve TranslationEngine vs transformers
generate() vs CTranslate2.

Same machine, same run, same Marian folder (fp32), same sentences, greedy and 4-beam. Baselines
get what a user would give them: sentences sorted by length and batched (padding only within a
batch). Each engine runs in its own process, so the reported peak RSS is its own.

    python benchmarks/bench_translation.py [--model FOLDER] [--num-sentences 500] [--engines kvserve,hf,ct2]
    python benchmarks/bench_translation.py --engines http-kvserve,http-ct2   # concurrent HTTP clients
    python benchmarks/bench_translation.py --shape nllb --num-sentences 64 --max-tokens 32  # NLLB-600M's shape
    python benchmarks/bench_translation.py --shape bart --num-sentences 32 --max-tokens 48  # distilbart-cnn-6-6's

Without --model a random Marian of opus-mt-en-de's shape (with a SentencePiece tokenizer trained in
seconds) is built in a temp dir; a random model rarely emits eos, so it translates up to --max-tokens.
`--shape nllb` builds a random M2M100 of nllb-200-distilled-600M's shape instead, and every engine
forces the target language (fra_Latn) as NLLB is run: kvserve's forced prefix, transformers'
forced_bos_token_id, CTranslate2's target_prefix. `--shape bart` builds a random BART of
distilbart-cnn-6-6's shape and summarizes "articles" of eight sentences each with the folder's
summarization settings (bart-large-cnn's, scaled down: <s> forced first, a minimum length, no repeated
trigram, length penalty 2), which kvserve and transformers read from the folder and CTranslate2 is
given as arguments.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import free_port, machine, pct, peak_rss_mib, run_child, server, table  # noqa: E402

BEAMS = (1, 4)


def sentences(num: int, shape: str = "marian") -> list[str]:
    """`num` inputs: sentences, or for BART articles of eight sentences."""
    from tests.encdec_fixtures import corpus

    if shape == "bart":
        lines = corpus(num_lines=8 * num, seed=1)
        return [" ".join(lines[8 * i : 8 * i + 8]) for i in range(num)]
    return corpus(num_lines=num, seed=1)


TARGET = "fra_Latn"  # the forced target language of NLLB runs


def build_default_model(shape: str = "marian") -> str:
    """A random Marian of opus-mt-en-de's shape (d_model 512, 6+6 layers, 8 heads, FFN 2048, vocab
    58101): the cost per token of the real checkpoint, without a download. "nllb": an M2M100 of
    nllb-200-distilled-600M's (d_model 1024, 12+12 layers, 16 heads, FFN 4096, vocab 256206).
    "bart": a BART of distilbart-cnn-6-6's (d_model 1024, 6+6 layers, 16 heads, FFN 4096, vocab 50264)."""
    from tests.encdec_fixtures import NLLB_CODES, make_bart_folder, make_marian_folder, make_nllb_folder

    if shape == "bart":
        folder = Path(tempfile.mkdtemp(prefix="kvserve-bart-")) / "random-distilbart-cnn-6-6-shape"
        return str(make_bart_folder(
            folder, d_model=1024, extra_vocab=50_264 - 400, encoder_layers=6, decoder_layers=6,
            encoder_attention_heads=16, decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096,
            max_position_embeddings=1024,
        ))

    if shape == "nllb":
        folder = Path(tempfile.mkdtemp(prefix="kvserve-nllb-")) / "random-nllb-600m-shape"
        return str(make_nllb_folder(
            folder, d_model=1024, extra_vocab=256_206 - 154 - len(NLLB_CODES), encoder_layers=12, decoder_layers=12,
            encoder_attention_heads=16, decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096,
            max_position_embeddings=1024,
        ))

    folder = Path(tempfile.mkdtemp(prefix="kvserve-marian-")) / "random-marian-opus-shape"
    return str(make_marian_folder(
        folder, d_model=512, extra_vocab=57_800, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
        decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048, max_position_embeddings=512,
    ))


def run_kvserve(folder: str, texts: list[str], max_tokens: int) -> dict:
    from engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from engine.translation_engine import TranslationEngine

    engine = TranslationEngine.from_config(EngineConfig(
        model=folder, cache=CacheConfig(block_size=16, kv_cache_memory_gib=0.5),
        scheduler=SchedulerConfig(max_num_batched_tokens=4096, max_num_seqs=256),
    ))
    sources = [engine.tokenizer.encode(t) for t in texts]
    codes = getattr(engine.tokenizer, "language_codes", {})
    forced = (codes[TARGET],) if codes else None  # None: the folder's forced_bos_token_id (BART's <s>)
    out = {}
    for beams in BEAMS:
        params = engine.default_params(num_beams=beams, max_tokens=max_tokens)
        engine.translate(sources[:4], params, forced_prefix=forced)  # warm-up
        start = time.perf_counter()
        results = engine.translate(sources, params, forced_prefix=forced)
        out[beams] = {"seconds": time.perf_counter() - start,
                      "tokens": sum(len(r.outputs[0].token_ids) for r in results)}
    return out


def run_hf(folder: str, texts: list[str], max_tokens: int, batch_size: int = 32) -> dict:
    import torch
    from transformers import AutoModelForSeq2SeqLM

    from models.loader import load_model

    tok = load_model(folder).tokenizer  # same ids as kvserve (HF's MarianTokenizer wants sacremoses)
    model = AutoModelForSeq2SeqLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    pad = model.config.pad_token_id
    codes = getattr(tok, "language_codes", {})
    forced = {"forced_bos_token_id": codes[TARGET]} if codes else {}
    sources = sorted((tok.encode(t) for t in texts), key=len)  # similar lengths together: less padding

    def generate(batch: list[list[int]], beams: int) -> int:
        width = max(map(len, batch))
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in batch])
        mask = (ids != pad).long()
        with torch.inference_mode():
            res = model.generate(input_ids=ids, attention_mask=mask, num_beams=beams, do_sample=False,
                                 max_new_tokens=max_tokens, **forced)
        return int((res[:, 1:] != pad).sum())

    out = {}
    for beams in BEAMS:
        generate(sources[:4], beams)
        start = time.perf_counter()
        tokens = sum(generate(sources[i : i + batch_size], beams) for i in range(0, len(sources), batch_size))
        out[beams] = {"seconds": time.perf_counter() - start, "tokens": tokens}
    return out


def run_ct2(folder: str, texts: list[str], max_tokens: int, batch_size: int = 32) -> dict:
    import ctranslate2

    from models.loader import load_model

    out_dir = Path(tempfile.mkdtemp(prefix="kvserve-ct2-"))
    ctranslate2.converters.TransformersConverter(folder).convert(str(out_dir), quantization="float32", force=True)
    translator = ctranslate2.Translator(str(out_dir), device="cpu", compute_type="float32", intra_threads=0)
    tok = load_model(folder).tokenizer
    sources = [[tok.id_to_token(i) for i in tok.encode(t)] for t in texts]
    prefix = {"target_prefix": [[TARGET]] * len(texts)} if getattr(tok, "language_codes", None) else {}
    settings = {}
    gen = json.loads((Path(folder) / "generation_config.json").read_text())
    if gen.get("forced_bos_token_id") is not None:  # BART: what kvserve and transformers read from the folder
        prefix = {"target_prefix": [[tok.id_to_token(gen["forced_bos_token_id"])]] * len(texts)}
        settings = dict(min_decoding_length=gen.get("min_length", 1) - 1, length_penalty=gen.get("length_penalty", 1.0),
                        no_repeat_ngram_size=gen.get("no_repeat_ngram_size", 0))
    out = {}
    for beams in BEAMS:
        kwargs = dict(beam_size=beams, max_decoding_length=max_tokens, max_batch_size=batch_size,
                      batch_type="examples", **settings)
        translator.translate_batch(sources[:4], **kwargs, **{k: v[:4] for k, v in prefix.items()})
        start = time.perf_counter()
        res = translator.translate_batch(sources, **kwargs, **prefix)
        out[beams] = {"seconds": time.perf_counter() - start, "tokens": sum(len(r.hypotheses[0]) for r in res)}
    return out


def _serve_and_load(args: list[str], port: int, model: str, texts: list[str], max_tokens: int,
                    clients: int) -> dict:
    """Start a server, then `clients` concurrent clients send one sentence per request until all
    are translated, for each beam setting: wall time and per-request latency."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    out = {}
    with server(args, port, timeout=300) as base, \
            httpx.Client(timeout=600, limits=httpx.Limits(max_connections=clients)) as http:
        for beams in BEAMS:
            def one(text: str) -> tuple[float, int]:
                start = time.perf_counter()
                body = http.post(f"{base}/v1/translations", json={
                    "model": model, "input": text, "max_tokens": max_tokens, "num_beams": beams,
                }).raise_for_status().json()
                return time.perf_counter() - start, body["usage"]["completion_tokens"]

            with ThreadPoolExecutor(clients) as pool:
                list(pool.map(one, texts[:clients]))  # warm-up
                start = time.perf_counter()
                results = list(pool.map(one, texts))
                elapsed = time.perf_counter() - start
            lat = sorted(t for t, _ in results)
            out[beams] = {"seconds": elapsed, "tokens": sum(n for _, n in results),
                          "p50_ms": 1000 * pct(lat, 50), "p99_ms": 1000 * pct(lat, 99)}
    return out


def run_http_kvserve(folder: str, texts: list[str], max_tokens: int, clients: int = 16) -> dict:
    port = free_port()
    # CTranslate2 runs on the CPU, so kvserve does too (the server would take a GPU where it sees one)
    args = ["-m", "server.cli", "serve", "--model", folder, "--port", str(port), "--device", "cpu",
            "--log-level", "warning"]
    return _serve_and_load(args, port, Path(folder).name, texts, max_tokens, clients)


def run_http_ct2(folder: str, texts: list[str], max_tokens: int, clients: int = 16) -> dict:
    port = free_port()
    args = ["benchmarks/ct2_baseline_server.py", "--folder", folder, "--port", str(port)]
    return _serve_and_load(args, port, Path(folder).name, texts, max_tokens, clients)


RUNNERS = {"kvserve": run_kvserve, "hf": run_hf, "ct2": run_ct2, "http-kvserve": run_http_kvserve,
           "http-ct2": run_http_ct2}
LABELS = {"kvserve": "kvserve TranslationEngine (continuous batching)", "hf": "transformers generate(), batch 32",
          "ct2": "CTranslate2 Translator, batch 32",
          "http-kvserve": "kvserve HTTP /v1/translations, 16 clients, 1 sentence/request",
          "http-ct2": "CTranslate2 behind the same API (dynamic batches of up to 32), 16 clients"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="Marian HF folder (default: a small random one built in a temp dir)")
    ap.add_argument("--shape", default="marian", choices=["marian", "nllb", "bart"], help="the random model's shape")
    ap.add_argument("--num-sentences", type=int, default=500)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--engines", default="kvserve,hf,ct2")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        result = RUNNERS[args.child](args.model, sentences(args.num_sentences, args.shape), args.max_tokens)
        print(json.dumps({"beams": result, "peak_rss_mib": peak_rss_mib()}))
        return
    folder = args.model or build_default_model(args.shape)
    rows, http_rows = [], []
    for name in args.engines.split(","):
        line = run_child([sys.executable, __file__, "--child", name, "--model", folder, "--num-sentences",
                          str(args.num_sentences), "--max-tokens", str(args.max_tokens), "--shape", args.shape],
                         timeout=7200)
        r = json.loads(line)
        print(f"{name}: {r}", file=sys.stderr)
        for beams, res in r["beams"].items():
            if name.startswith("http-"):
                http_rows.append([LABELS[name], beams, args.num_sentences, res["seconds"],
                                  args.num_sentences / res["seconds"], res["p50_ms"], res["p99_ms"]])
                continue
            rows.append([LABELS[name], beams, args.num_sentences, res["tokens"], res["seconds"],
                         args.num_sentences / res["seconds"], r["peak_rss_mib"]])
    print(f"Machine: {machine()}\n")
    what = "articles (8 sentences each)" if args.shape == "bart" else "sentences (3-10 words)"
    print(f"Workload: {args.num_sentences} synthetic {what}, max {args.max_tokens} output tokens, "
          f"model {folder}, fp32\n")
    if rows:
        print(table(["engine", "beams", "sentences", "output tokens", "seconds", "sentences/s", "peak RSS MiB"], rows))
    if http_rows:
        print("\nConcurrent HTTP load, one sentence per request:\n")
        print(table(["server", "beams", "sentences", "seconds", "sentences/s", "latency p50 ms", "latency p99 ms"],
                    http_rows))


if __name__ == "__main__":
    main()

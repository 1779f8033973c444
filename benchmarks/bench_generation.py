"""Offline generation throughput: kvserve vs transformers generate() vs CTranslate2 Generator.

Same machine, same run, same model (SmolLM2-135M-Instruct, fp32), same mixed workload:
prompts of 16-512 tokens with 16-256 output tokens, every request generating exactly its
output length (EOS ignored). Baselines get every advantage a user would give them: requests
grouped by output length and batched (padding only across prompt lengths). Each engine runs in
its own process, so the reported peak RSS is its own. Also measures batch-1 decode latency.

    python benchmarks/bench_generation.py [--num-prompts 64] [--engines kvserve,hf,ct2]
    python benchmarks/bench_generation.py --model qwen3moe --engines kvserve,hf  # a random MoE model
    python benchmarks/bench_generation.py --model gemma3 --engines kvserve,hf  # Gemma 3 270M's shape
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine, peak_rss_mib, run_child, table  # noqa: E402

OUTPUT_LENGTHS = (16, 32, 64, 128, 256)


def workload(num_prompts: int, vocab: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [
        ([rng.randrange(1000, vocab) for _ in range(rng.randint(16, 512))], rng.choice(OUTPUT_LENGTHS))
        for _ in range(num_prompts)
    ]


def model_folder(model: str) -> str:
    """The HF folder kvserve converts the shipped GGUF into (fp32 safetensors + tokenizer), or a
    random model of one of benchmarks/random_llama.py's shapes."""
    if model != "smollm2":
        from benchmarks.random_llama import save_random_llama

        return str(save_random_llama(Path(tempfile.mkdtemp(prefix="kvserve-bench-")) / model, model))
    from models.loader import load_model

    return load_model("smollm2").info.path


def by_length(work):
    groups: dict[int, list[list[int]]] = {}
    for prompt, n in work:
        groups.setdefault(n, []).append(prompt)
    return groups


def run_kvserve(folder: str, work, batch1_prompt) -> dict:
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    llm = LLM(folder, kv_cache_memory_gib=2.0, max_num_batched_tokens=1024, max_num_seqs=64)
    llm.generate([batch1_prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm-up
    start = time.perf_counter()
    outs = llm.generate([p for p, _ in work], [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in work])
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    t0 = time.perf_counter()
    llm.generate([batch1_prompt], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    t1 = time.perf_counter()
    llm.generate([batch1_prompt], SamplingParams(temperature=0, max_tokens=129, ignore_eos=True))
    t2 = time.perf_counter()
    decode_ms = ((t2 - t1) - (t1 - t0)) / 128 * 1000
    return {"tokens": tokens, "seconds": elapsed, "decode_ms": decode_ms}


def run_hf(folder: str, work, batch1_prompt, batch_size: int = 8) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()

    def generate(prompts: list[list[int]], n: int) -> int:
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0)
        return (out.shape[1] - width) * len(prompts)

    generate([batch1_prompt], 4)
    start = time.perf_counter()
    tokens = 0
    for n, prompts in sorted(by_length(work).items()):
        prompts.sort(key=len)  # similar lengths together: less padding
        for i in range(0, len(prompts), batch_size):
            tokens += generate(prompts[i : i + batch_size], n)
    elapsed = time.perf_counter() - start
    t0 = time.perf_counter()
    generate([batch1_prompt], 1)
    t1 = time.perf_counter()
    generate([batch1_prompt], 129)
    t2 = time.perf_counter()
    return {"tokens": tokens, "seconds": elapsed, "decode_ms": ((t2 - t1) - (t1 - t0)) / 128 * 1000}


def run_ct2(folder: str, work, batch1_prompt, batch_size: int = 16) -> dict:
    import ctranslate2
    from tokenizers import Tokenizer

    out_dir = Path(tempfile.mkdtemp(prefix="kvserve-ct2-"))
    ctranslate2.converters.TransformersConverter(folder).convert(str(out_dir), quantization="float32", force=True)
    gen = ctranslate2.Generator(str(out_dir), device="cpu", compute_type="float32", intra_threads=0)
    tok = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))

    def strings(ids: list[int]) -> list[str]:
        return [tok.id_to_token(i) for i in ids]

    def generate(prompts: list[list[int]], n: int) -> int:
        res = gen.generate_batch([strings(p) for p in prompts], max_length=n, min_length=n, sampling_topk=1,
                                 include_prompt_in_result=False, max_batch_size=batch_size)
        return sum(len(r.sequences_ids[0]) for r in res)

    generate([batch1_prompt], 4)
    start = time.perf_counter()
    tokens = sum(generate(prompts, n) for n, prompts in sorted(by_length(work).items()))
    elapsed = time.perf_counter() - start
    t0 = time.perf_counter()
    generate([batch1_prompt], 1)
    t1 = time.perf_counter()
    generate([batch1_prompt], 129)
    t2 = time.perf_counter()
    return {"tokens": tokens, "seconds": elapsed, "decode_ms": ((t2 - t1) - (t1 - t0)) / 128 * 1000}


RUNNERS = {"kvserve": run_kvserve, "hf": run_hf, "ct2": run_ct2}
LABELS = {"kvserve": "kvserve (continuous batching)", "hf": "transformers generate(), batch 8",
          "ct2": "CTranslate2 Generator, batch 16"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--engines", default="kvserve,hf,ct2")
    ap.add_argument("--model", default="smollm2", help="smollm2 (shipped) or a random_llama.py shape, e.g. qwen3moe")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        work = workload(args.num_prompts, 49152)
        batch1 = workload(1, 49152, seed=99)[0][0][:32]
        result = RUNNERS[args.child](args.folder, work, batch1)
        result["peak_rss_mib"] = peak_rss_mib()
        print(json.dumps(result))
        return
    folder = model_folder(args.model)
    rows = []
    results = {}
    for name in args.engines.split(","):
        line = run_child([sys.executable, __file__, "--child", name, "--folder", folder,
                          "--num-prompts", str(args.num_prompts)], timeout=3600)
        results[name] = r = json.loads(line)
        rows.append([LABELS[name], r["tokens"], r["seconds"], r["tokens"] / r["seconds"], r["decode_ms"], r["peak_rss_mib"]])
        print(f"{name}: {r}", file=sys.stderr)
    print(f"Machine: {machine()}\n")
    print(f"Workload: {args.num_prompts} prompts of 16-512 tokens, {OUTPUT_LENGTHS} output tokens, {args.model} fp32, greedy\n")
    print(table(["engine", "output tokens", "seconds", "output tok/s", "batch-1 decode ms/token", "peak RSS MiB"], rows))
    if "kvserve" in results:
        base = results["kvserve"]["tokens"] / results["kvserve"]["seconds"]
        for name in results:
            if name != "kvserve":
                other = results[name]["tokens"] / results[name]["seconds"]
                print(f"\nkvserve / {name}: {base / other:.2f}x output tokens/s")


if __name__ == "__main__":
    main()

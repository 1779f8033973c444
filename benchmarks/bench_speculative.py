"""N-gram speculative decoding: kvserve with and without drafts vs transformers' prompt lookup decoding.

Same machine, same run, the shipped SmolLM2 (fp32), greedy chats of two kinds:
  - copy: answers that quote their prompt (repeat a text, fix one word of code, list the names a
    text gives), where drafts copied from the prompt are mostly right;
  - free: open questions, where drafts are rarely right and each rejected one is wasted work.
Rows: kvserve without drafts, kvserve with `{"method": "ngram", "num_speculative_tokens": k}`, and
transformers `generate()` without and with `prompt_lookup_num_tokens=k` (its own n-gram drafts;
batch 1 only, as transformers' assisted generation is). "same" says whether the tokens equal those
of the same engine without drafts (greedy speculation must not change them).

    python benchmarks/bench_speculative.py [--batch 1,8] [--max-tokens 128] [--k 4] [--engines kvserve,hf]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.common import hf_chat_ids, machine, table  # noqa: E402

PASSAGE = ("Paged attention stores the key and value cache in fixed-size blocks, so sequences of different "
           "lengths share one pool of memory without fragmentation. Continuous batching admits new requests "
           "at every step instead of waiting for the whole batch to finish.")
CODE = ("def mean(values):\n    total = 0\n    for v in values:\n        total += v\n    retrun total / len(values)\n\n"
        "def spread(values):\n    return max(values) - min(values)\n")
WORKLOADS = {
    "copy": [
        f"Repeat this text word for word:\n\n{PASSAGE}",
        f"Fix the typo in this code and print the whole file:\n\n{CODE}",
        f"Rewrite this paragraph with every sentence on its own line:\n\n{PASSAGE}",
        f"Add a docstring to each function and print the whole file:\n\n{CODE}",
    ],
    "free": [
        "Explain why the sky is blue to a ten-year-old.",
        "Write a short story about a lighthouse keeper.",
        "Give three tips for learning a new language.",
        "What are the pros and cons of electric cars?",
    ],
}


def chats(kind: str, batch: int) -> list[list[dict]]:
    prompts = WORKLOADS[kind]
    return [[{"role": "user", "content": prompts[i % len(prompts)]}] for i in range(batch)]


def run_kvserve(kind: str, batch: int, max_tokens: int, k: int) -> list[list]:
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    rows, base = [], None
    for label, spec in (("kvserve", None), (f"kvserve ngram k={k}", {"method": "ngram", "num_speculative_tokens": k})):
        llm = LLM("smollm2", num_kv_blocks=2048, speculative_config=spec)
        llm.chat(chats(kind, 1), SamplingParams(temperature=0.0, max_tokens=8))  # warm-up
        before = llm.engine.stats()
        seconds = 0.0
        outs = []
        # batch 1: the workload's chats one after another; else one batch of `batch` chats
        groups = [[c] for c in chats(kind, len(WORKLOADS[kind]))] if batch == 1 else [chats(kind, batch)]
        for group in groups:
            t0 = time.perf_counter()
            outs += llm.chat(group, params)
            seconds += time.perf_counter() - t0
        after = llm.engine.stats()
        tokens = [o.outputs[0].token_ids for o in outs]
        count = sum(len(t) for t in tokens)
        drafted = after.num_draft_tokens - before.num_draft_tokens
        accepted = after.num_accepted_tokens - before.num_accepted_tokens
        if base is None:
            base = (tokens, count / seconds)
        rows.append([kind, label, batch, count, f"{seconds:.2f}", f"{count / seconds:.1f}",
                     f"{count / seconds / base[1]:.2f}x", f"{accepted}/{drafted}" if drafted else "-",
                     "yes" if tokens == base[0] else "no"])
    return rows


def run_hf(kind: str, max_tokens: int, k: int) -> list[list]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models.loader import resolve

    folder = resolve("smollm2")[1]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    rows, base = [], None
    for label, extra in (("transformers", {}), (f"transformers prompt lookup k={k}", {"prompt_lookup_num_tokens": k})):
        tokens, seconds = [], 0.0
        for chat in chats(kind, len(WORKLOADS[kind])):
            prompt = hf_chat_ids(tok, chat)
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False,
                                     eos_token_id=2, pad_token_id=0, **extra)
            seconds += time.perf_counter() - t0
            tokens.append(out[0, len(prompt):].tolist())
        count = sum(len(t) for t in tokens)
        if base is None:
            base = (tokens, count / seconds)
        rows.append([kind, label, 1, count, f"{seconds:.2f}", f"{count / seconds:.1f}",
                     f"{count / seconds / base[1]:.2f}x", "-", "yes" if tokens == base[0] else "no"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--k", type=int, default=4, help="draft tokens per step")
    ap.add_argument("--workloads", default="copy,free")
    ap.add_argument("--engines", default="kvserve,hf")
    args = ap.parse_args()
    rows = []
    engines = args.engines.split(",")
    for kind in args.workloads.split(","):
        if "kvserve" in engines:
            for b in (int(x) for x in args.batch.split(",")):
                rows += run_kvserve(kind, b, args.max_tokens, args.k)
        if "hf" in engines:
            rows += run_hf(kind, args.max_tokens, args.k)
    print(machine())
    print(table(["workload", "engine", "batch", "tokens", "s", "tokens/s", "vs no drafts", "accepted/drafted",
                 "same"], rows))


if __name__ == "__main__":
    main()

"""Guided decoding cost: kvserve generating JSON under a schema vs free, and vs transformers.

Same machine, same run, the shipped SmolLM2 (fp32): B chats that each ask for a person as JSON,
greedy, up to --max-tokens tokens. Rows:
  - kvserve free, and kvserve with the JSON schema (llguidance masks each step): tokens/s, and the
    time spent filling masks per guided token (the host work guided decoding adds);
  - transformers `generate()` with a logits processor applying the same grammar's masks
    (batch 1: a matcher per row would need its own bookkeeping per beam of HF's batch).
Tokens/s counts the tokens each contender produced (guided answers end at the closing brace).

    python benchmarks/bench_structured.py [--batch 1,16] [--max-tokens 64] [--engines kvserve,hf]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.common import hf_chat_ids, machine, table  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "city": {"type": "string", "maxLength": 40},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 4},
    },
    "required": ["name", "age", "city", "hobbies"],
    "additionalProperties": False,
}
NAMES = ["Alice", "Bob", "Chen", "Dana", "Emil", "Fatima", "Goran", "Hana", "Ivan", "Jo", "Kofi", "Lena",
         "Mateo", "Nia", "Omar", "Priya"]


def chats(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"Describe {NAMES[i % len(NAMES)]}, a person aged {20 + 3 * i}, "
              "as JSON with their name, age, city and hobbies."}] for i in range(n)]


def run_kvserve(batch: int, max_tokens: int) -> list[list]:
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams
    from engine.structured_output import StructuredOutput

    llm = LLM("smollm2", num_kv_blocks=1024)
    guides = llm.engine.guides
    fill, filled = guides.bitmask, [0.0]

    def timed_fill(seq_ids):  # the host time guided decoding adds: building each step's masks
        start = time.perf_counter()
        mask = fill(seq_ids)
        filled[0] += time.perf_counter() - start
        return mask

    guides.bitmask = timed_fill
    constraint = StructuredOutput.json_schema(SCHEMA)
    llm.chat(chats(1), SamplingParams(temperature=0.0, max_tokens=8, structured=constraint))  # warm-up, tokenizer
    rows = []
    for label, structured in (("free", None), ("json schema", constraint)):
        filled[0] = 0.0
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, structured=structured)
        start = time.perf_counter()
        outs = llm.chat(chats(batch), params)
        seconds = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        valid = sum(_valid(o.outputs[0].text) for o in outs)
        per_token = f"{1e6 * filled[0] / tokens:.0f}" if structured is not None else "-"
        rows.append([f"kvserve {label}", batch, tokens, f"{seconds:.2f}", f"{tokens / seconds:.1f}", per_token,
                     f"{valid}/{batch}"])
    return rows


def run_hf(max_tokens: int) -> list[list]:
    import llguidance.hf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList

    from engine.structured_output import StructuredOutput
    from models.loader import resolve
    from tests.hf_grammar import GrammarMask  # the tests' oracle: the same masks

    folder = resolve("smollm2")[1]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    lltok = llguidance.hf.from_tokenizer(tok, n_vocab=model.config.vocab_size, eos_token=2)
    grammar = StructuredOutput.json_schema(SCHEMA).grammar
    rows = []
    for label, guided in (("free", False), ("json schema", True)):
        tokens = valid = 0
        start = time.perf_counter()
        for chat in chats(4):  # batch 1, four prompts
            prompt = hf_chat_ids(tok, chat)
            processors = LogitsProcessorList([GrammarMask(lltok, grammar, len(prompt))] if guided else [])
            with torch.inference_mode():
                out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False,
                                     eos_token_id=2, pad_token_id=0, logits_processor=processors)
            new = out[0, len(prompt):].tolist()
            tokens += len(new)
            valid += _valid(tok.decode(new, skip_special_tokens=True))
        seconds = time.perf_counter() - start
        rows.append([f"transformers {label}", 1, tokens, f"{seconds:.2f}", f"{tokens / seconds:.1f}", "-", f"{valid}/4"])
    return rows


def _valid(text: str) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, dict) and set(value) == set(SCHEMA["properties"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", default="1,16")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--engines", default="kvserve,hf")
    args = ap.parse_args()
    rows = []
    engines = args.engines.split(",")
    if "kvserve" in engines:
        for b in (int(x) for x in args.batch.split(",")):
            rows += run_kvserve(b, args.max_tokens)
    if "hf" in engines:
        rows += run_hf(args.max_tokens)
    print(machine())
    print(table(["engine", "batch", "tokens", "s", "tokens/s", "mask µs/guided token", "valid JSON"], rows))


if __name__ == "__main__":
    main()

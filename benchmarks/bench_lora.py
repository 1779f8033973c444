"""Multi-LoRA serving: kvserve vs PEFT's mixed-adapter batches on transformers, same machine, same run.

The shipped SmolLM2 (fp32) with `--adapters` PEFT adapters made here (rank `--rank` on all seven
projections, random A, small random B). One batch of `--batch` chats, `--max-tokens` greedy tokens
each (EOS ignored, so every row does the same work), under three mixes:
  - base: no adapter (the cost floor);
  - one: every request on the same adapter;
  - mixed: requests round-robin over the base model and every adapter.
kvserve runs each mix as one `generate` call (max_loras = the adapter count). PEFT runs the same
batch with `generate(..., adapter_names=[...])`, its per-row adapter selection, left-padded.
"same" counts the requests whose tokens equal PEFT's.

    python benchmarks/bench_lora.py [--batch 16] [--max-tokens 64] [--adapters 3] [--rank 16]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from benchmarks.common import hf_chat_ids, machine, table  # noqa: E402

QUESTIONS = [
    "Explain why the sky is blue to a ten-year-old.",
    "Write a short story about a lighthouse keeper.",
    "Give three tips for learning a new language.",
    "What are the pros and cons of electric cars?",
    "Describe how a bicycle gear works.",
    "Why do cats purr?",
    "Summarise the water cycle in a few sentences.",
    "What makes a good cup of tea?",
]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(folder: Path, out: Path, count: int, rank: int) -> list[Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    for i in range(count):
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False,
                                                      target_modules=TARGETS))
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.05)  # a changed model that still writes text
        peft_model.save_pretrained(out / f"a{i}")
        paths.append(out / f"a{i}")
    return paths


def mixes(batch: int, count: int) -> dict[str, list[int | None]]:
    """Per request: the adapter index it runs (None: the base model)."""
    return {"base": [None] * batch, "one": [0] * batch,
            "mixed": [None if i % (count + 1) == 0 else i % (count + 1) - 1 for i in range(batch)]}


def run_kvserve(prompts: list[list[int]], adapters: list[Path], max_tokens: int) -> dict[str, tuple[float, list]]:
    from engine.llm import LLM
    from engine.lora import LoRARequest
    from engine.sampling_params import SamplingParams

    llm = LLM("smollm2", num_kv_blocks=2048, enable_lora=True, max_loras=len(adapters), max_lora_rank=64)
    requests = [LoRARequest(f"a{i}", 0, str(p)) for i, p in enumerate(adapters)]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=4), lora_request=requests[:2])  # warm-up, loads
    llm.generate(prompts[2:3], SamplingParams(temperature=0.0, max_tokens=4), lora_request=requests)
    found = {}
    for mix, picks in mixes(len(prompts), len(adapters)).items():
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, lora_request=[None if a is None else requests[a] for a in picks])
        found[mix] = (time.perf_counter() - t0, [o.outputs[0].token_ids for o in outs])
    return found


def run_peft(folder: Path, prompts: list[list[int]], adapters: list[Path], max_tokens: int) -> dict[str, tuple[float, list]]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
                                      adapters[0], adapter_name="a0")
    for i, path in enumerate(adapters[1:], start=1):
        model.load_adapter(path, adapter_name=f"a{i}")
    model.eval()
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # left padding, masked out
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    found = {}
    for mix, picks in mixes(len(prompts), len(adapters)).items():
        names = ["__base__" if a is None else f"a{a}" for a in picks]
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                                 min_new_tokens=max_tokens, do_sample=False, pad_token_id=0, eos_token_id=None,
                                 adapter_names=names)
        found[mix] = (time.perf_counter() - t0, out[:, width:].tolist())
    return found


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=3)
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from models.loader import resolve

    folder = resolve("smollm2")[1]
    tok = AutoTokenizer.from_pretrained(folder)
    prompts = [hf_chat_ids(tok, [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}])
               for i in range(args.batch)]
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(folder, Path(tmp), args.adapters, args.rank)
        ours = run_kvserve(prompts, adapters, args.max_tokens)
        theirs = run_peft(folder, prompts, adapters, args.max_tokens)
    tokens = args.batch * args.max_tokens
    rows = []
    for mix in ours:
        (s_ours, t_ours), (s_peft, t_peft) = ours[mix], theirs[mix]
        same = sum(a == b for a, b in zip(t_ours, t_peft))
        rows.append([mix, args.batch, tokens, f"{tokens / s_ours:.1f}", f"{tokens / s_peft:.1f}",
                     f"{s_peft / s_ours:.2f}x", f"{tokens / s_ours / (tokens / ours['base'][0]):.2f}",
                     f"{same}/{args.batch}"])
    print(machine())
    print(f"{args.adapters} adapters of rank {args.rank} on all seven projections; greedy, EOS ignored")
    print(table(["mix", "batch", "tokens", "kvserve tok/s", "PEFT tok/s", "kvserve vs PEFT", "kvserve vs its base",
                 "same tokens"], rows))


if __name__ == "__main__":
    main()

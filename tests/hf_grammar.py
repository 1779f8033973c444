"""The structured-output oracle: transformers' `generate()` masked by a fresh llguidance matcher.

Its bitmask is unpacked with numpy, not with engine/guided.py's shifts, so the engine's masking is
checked against an independent reading of the same bits. Used by the tests and by
benchmarks/bench_structured.py (the transformers peer).
"""
from __future__ import annotations

import llguidance
import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList


class GrammarMask(LogitsProcessor):
    """Each step: feed the matcher the token sampled last, then give every refused token -inf."""

    def __init__(self, lltok: llguidance.LLTokenizer, grammar: str, prompt_len: int) -> None:
        self.matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
        self.prompt_len = prompt_len
        self.words = np.full((lltok.vocab_size + 31) // 32, -1, dtype=np.int32)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        out = input_ids[0, self.prompt_len :].tolist()
        if out:
            assert self.matcher.consume_token(out[-1]), self.matcher.get_error()
        self.matcher.unsafe_compute_mask_ptr(self.words.ctypes.data, self.words.nbytes)
        allowed = np.unpackbits(self.words.view(np.uint8), bitorder="little")[: scores.shape[1]].astype(bool)
        scores[0, torch.from_numpy(~allowed)] = float("-inf")
        return scores


def hf_guided(hf, lltok: llguidance.LLTokenizer, prompt: list[int], grammar: str, max_tokens: int,
              eos: list[int]) -> list[int]:
    """transformers' greedy tokens under `grammar` (llguidance tokenizer `lltok`)."""
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=eos,
                          pad_token_id=0, logits_processor=LogitsProcessorList([GrammarMask(lltok, grammar, len(prompt))]))
    return ref[0, len(prompt):].tolist()

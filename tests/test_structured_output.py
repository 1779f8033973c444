"""Structured outputs (JSON schema, JSON object, regex, choice, grammar) against transformers.

The oracle is transformers' greedy `generate()` masked by a fresh llguidance matcher
(tests/hf_grammar.py, its bitmask unpacked with numpy, not engine/guided.py's shifts): our
engine, batching constrained and free requests with chunked prefill, preemption, the prefix cache
and running ahead, must give the same tokens, less the EOS that HF samples once the grammar is
complete (kvserve ends the sequence there).
"""
from __future__ import annotations

import json
import re

import llguidance
import numpy as np
import pytest
import torch

from engine.errors import InvalidRequestError
from engine.guided import apply_bitmask
from engine.llm import LLM
from engine.request import GenerationRequest
from engine.sampling_params import SamplingParams
from engine.structured_output import StructuredOutput as SO
from tests.hf_grammar import hf_guided
from tests.test_engine_generation import random_prompts

EOS = 2  # LlamaConfig's default eos_token_id
SCHEMA = {  # compact separators: the random model would otherwise pad with whitespace forever
    "type": "object",
    "properties": {"a": {"enum": ["x", "yz"]}, "b": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["a", "b"],
    "additionalProperties": False,
    "x-guidance": {"whitespace_flexible": False},
}
REGEX = r"[a-e]{2,5}(-[0-9]{1,2})?"
CHOICES = ["alpha", "beta", "gamma delta"]


def test_bad_constraints_are_refused_with_the_param():
    cases = [
        lambda: SO.json_schema({"type": "nonsense"}, param="response_format"),
        lambda: SO.json_schema("{not json", param="response_format"),
        lambda: SO.regex("[a-"),
        lambda: SO.choice([]),
        lambda: SO.lark("start: ??"),
    ]
    for make in cases:
        with pytest.raises(InvalidRequestError) as err:
            make()
        assert err.value.param in ("response_format", "structured_outputs") and "constraint" in str(err.value) or "choice" in str(err.value)
    assert SO.lark('root ::= "yes" | "no"').kind == "grammar"  # GBNF is converted


def test_apply_bitmask_matches_unpacked_bits():
    gen = torch.Generator().manual_seed(0)
    vocab = 77  # not a multiple of 32; 3 words cover 96
    words = torch.randint(-(2**31), 2**31 - 1, (4, 3), dtype=torch.int32, generator=gen)
    logits = torch.randn(4, vocab + 5, generator=gen)  # 5 padding logits past the words: 82 < 96 still
    expect = logits.clone()
    bits = np.unpackbits(words.numpy().view(np.uint8), bitorder="little").reshape(4, 96)[:, : vocab + 5]
    expect[torch.from_numpy(bits == 0)] = float("-inf")
    apply_bitmask(logits, words)
    assert torch.equal(logits, expect)
    wide = torch.randn(2, 100, generator=gen)  # wider than the words cover: the rest is never a token
    apply_bitmask(wide, torch.full((2, 3), -1, dtype=torch.int32))
    assert torch.isinf(wide[:, 96:]).all() and torch.isfinite(wide[:, :96]).all()


def _matches(constraint: SO, text: str) -> bool:
    if constraint.kind == "regex":
        return re.fullmatch(REGEX, text) is not None
    if constraint.kind == "choice":
        return text in CHOICES
    value = json.loads(text)
    return value["a"] in ("x", "yz") and 0 <= value["b"] <= 99 and set(value) == {"a", "b"}


def test_greedy_guided_tokens_equal_transformers_in_a_mixed_batch(tiny_llama, hf_tiny_llama):
    constraints = [SO.json_schema(SCHEMA), SO.regex(REGEX), SO.choice(CHOICES), None] * 3
    prompts = random_prompts(len(constraints), 3, 30, seed=3)
    prompts[4] = prompts[0][:20] + [7]  # shares cached blocks with prompt 0
    requests = [(p, SamplingParams(temperature=0.0, max_tokens=24, structured=c)) for p, c in zip(prompts, constraints)]
    lltok = llguidance.LLTokenizer((tiny_llama / "tokenizer.json").read_text(), n_vocab=320, eos_token=[EOS])
    for run_ahead in (False, True):
        # 12 blocks of 4 tokens for 12 requests: preemption; 16-token steps: chunked prefill
        llm = LLM(str(tiny_llama), num_kv_blocks=14, block_size=4, max_num_batched_tokens=16, max_num_seqs=6,
                  run_ahead=run_ahead)
        outs = llm.generate([p for p, _ in requests], [s for _, s in requests])
        assert llm.engine.scheduler.num_preemptions > 0 and len(llm.engine.guides) == 0
        assert llm.engine.block_manager.num_free_blocks == 14
        for (prompt, params), out in zip(requests, outs):
            got = out.outputs[0]
            if params.structured is None:
                continue
            ref = hf_guided(hf_tiny_llama, lltok, prompt, params.structured.grammar, 24, [EOS])
            if got.finish_reason == "stop":
                # sampled EOS where the grammar could go on, or ended where only EOS could follow
                # (HF samples that EOS; kvserve stops without it)
                assert ref == (got.token_ids if got.token_ids[-1] == EOS else got.token_ids + [EOS])
                # the EOS that ends it ("#" in the tiny vocabulary) is in the tokens, not the text
                assert _matches(params.structured, got.text), got.text
            else:
                assert got.finish_reason == "length" and ref == got.token_ids
        done = [o.outputs[0] for o, c in zip(outs, constraints) if c is not None and o.outputs[0].finish_reason == "stop"]
        assert len(done) >= 6 and any(o.token_ids[-1] != EOS for o in done)  # some ended by the grammar


def test_seeded_guided_sampling_is_valid_and_independent_of_the_batch(tiny_llama):
    params = SamplingParams(temperature=1.0, max_tokens=30, seed=7, n=2, logprobs=8, structured=SO.regex(REGEX))
    alone = LLM(str(tiny_llama), num_kv_blocks=64, block_size=4).generate([[5, 6, 7]], params)[0]
    llm = LLM(str(tiny_llama), num_kv_blocks=64, block_size=4)
    free = SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True)
    batched = llm.generate([[9, 9], [5, 6, 7], [1, 2, 3, 4]], [free, params, free])[1]
    assert [o.token_ids for o in batched.outputs] == [o.token_ids for o in alone.outputs]
    for o in batched.outputs:
        assert o.finish_reason == "stop" and re.fullmatch(REGEX, o.text), o.text
        for lp in o.logprobs:  # the grammar's refused tokens are not listed as candidates
            assert lp.token_id in lp.top and all(np.isfinite(v) for v in lp.top.values())
    # at most 7 tokens are ever allowed (a-e, "-", EOS): never 8 candidates
    assert all(len(lp.top) <= 7 for o in batched.outputs for lp in o.logprobs)


def test_abort_leaves_no_matcher(tiny_llama):
    engine = LLM(str(tiny_llama), num_kv_blocks=32, block_size=4).engine
    engine.add_request("a", GenerationRequest([1, 2, 3], SamplingParams(max_tokens=8, n=3, structured=SO.json_object())))
    engine.step()
    assert len(engine.guides) == 3
    engine.abort_request("a")
    assert len(engine.guides) == 0 and engine.block_manager.usage == 0.0

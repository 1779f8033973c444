"""OpenAI's `logit_bias` and vLLM's `min_tokens` against transformers' own processors
(`sequence_bias`, `min_new_tokens`): greedy tokens equal, batched with free requests, landing each
step and running ahead (where the count of tokens still in flight decides what is held back)."""
from __future__ import annotations

import pytest
import torch

from engine.errors import InvalidRequestError
from engine.llm import LLM
from engine.request import GenerationRequest
from engine.sampling_params import SamplingParams
from tests.test_engine_generation import random_prompts

EOS = 2


def _hf(hf, prompt: list[int], max_tokens: int, **kwargs) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, pad_token_id=0, **kwargs)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("run_ahead", [False, True])
def test_min_tokens_and_logit_bias_equal_transformers(tiny_llama, hf_tiny_llama, run_ahead):
    prompts = random_prompts(6, 4, 20, seed=2)
    eager = ((EOS, 12.0),)  # the random model never picks EOS itself: a bias makes it come at once
    llm = LLM(str(tiny_llama), num_kv_blocks=64, block_size=4, max_num_batched_tokens=16, run_ahead=run_ahead)
    unheld = llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=12, logit_bias=eager))
    assert [o.outputs[0].token_ids for o in unheld] == [[EOS], [EOS]]
    stop_id = llm.generate(prompts[1:2], SamplingParams(temperature=0.0, max_tokens=1))[0].outputs[0].token_ids[0]
    bias = ((65, 8.0), (EOS, -100.0), (70, 3.5))
    requests = [
        (prompts[0], SamplingParams(temperature=0.0, max_tokens=12, min_tokens=6, logit_bias=eager)),
        (prompts[1], SamplingParams(temperature=0.0, max_tokens=12, min_tokens=4, stop_token_ids=(stop_id,))),
        (prompts[2], SamplingParams(temperature=0.0, max_tokens=10, logit_bias=bias)),
        (prompts[3], SamplingParams(temperature=0.0, max_tokens=10, logit_bias=((100, 100.0),))),
    ] + [(p, SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True)) for p in prompts[4:]]
    outs = [o.outputs[0] for o in llm.generate([p for p, _ in requests], [s for _, s in requests])]
    refs = [
        _hf(hf_tiny_llama, prompts[0], 12, eos_token_id=EOS, min_new_tokens=6, sequence_bias={(EOS,): 12.0}),
        _hf(hf_tiny_llama, prompts[1], 12, eos_token_id=[EOS, stop_id], min_new_tokens=4),
        _hf(hf_tiny_llama, prompts[2], 10, eos_token_id=EOS, sequence_bias={(t,): b for t, b in bias}),
        _hf(hf_tiny_llama, prompts[3], 10, eos_token_id=EOS, sequence_bias={(100,): 100.0}),
    ]
    for out, ref in zip(outs, refs):
        assert out.token_ids == ref
    assert outs[0].token_ids[6:] == [EOS]  # held back for exactly 6 tokens
    assert stop_id not in outs[1].token_ids[:4] and outs[1].token_ids[0] != stop_id
    assert EOS not in outs[2].token_ids and len(outs[2].token_ids) == 10  # -100 bans it
    assert set(outs[3].token_ids) == {100}  # +100 forces it
    assert llm.engine.block_manager.usage == 0.0


def test_no_stop_string_before_min_tokens(tiny_llama):
    llm = LLM(str(tiny_llama), num_kv_blocks=64, block_size=4)
    prompt = random_prompts(1, 5, 5, seed=4)[0]
    full = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))[0].outputs[0]
    stop = full.text[1:3]  # occurs early (by its second character)
    short = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, stop=[stop]))
    held = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, stop=[stop],
                                                 min_tokens=16))
    assert len(short[0].outputs[0].token_ids) < 16
    assert held[0].outputs[0].token_ids == full.token_ids and held[0].outputs[0].finish_reason == "length"


def test_bad_values_are_refused(tiny_llama):
    with pytest.raises(InvalidRequestError, match="min_tokens"):
        SamplingParams(max_tokens=4, min_tokens=5)
    with pytest.raises(InvalidRequestError, match="logit_bias"):
        SamplingParams(logit_bias=((3, 100.5),))
    llm = LLM(str(tiny_llama), num_kv_blocks=16, block_size=4)
    with pytest.raises(InvalidRequestError, match=r"\[0, 320\)"):
        llm.engine.add_request("x", GenerationRequest([1, 2], SamplingParams(logit_bias=((320, 1.0),))))
    assert not llm.engine.has_unfinished_requests()

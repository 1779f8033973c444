"""vLLM's `bad_words` (and token-level `bad_words_token_ids`) against transformers' own processor
(`bad_words_ids`): greedy tokens equal with one- and two-token words the model would otherwise
write, landing each step, running ahead, and with n-gram drafts; the words' tokenization (with and
without a leading space); /v1/completions and /v1/chat/completions taking `bad_words`."""
from __future__ import annotations

import httpx
import pytest
import torch

from engine.bad_words import bad_words_token_ids, banned_by_bad_words
from engine.errors import InvalidRequestError
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from tests.test_engine_generation import random_prompts

EOS = 2


def _hf(hf, prompt: list[int], max_tokens: int, **kwargs) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, pad_token_id=0,
                          eos_token_id=EOS, **kwargs)
    return out[0, len(prompt):].tolist()


def test_banned_by_bad_words():
    bad = [(7,), (3, 4), (1, 2, 5)]
    assert banned_by_bad_words(bad, []) == [7]
    assert banned_by_bad_words(bad, [9, 3]) == [7, 4]
    assert banned_by_bad_words(bad, [3, 9]) == [7]  # the head must end the tokens
    assert banned_by_bad_words(bad, [1, 2]) == [7, 5]
    assert banned_by_bad_words(bad, [2]) == [7]


def test_tokenized_with_and_without_a_space():
    vocab = {"new": [10], " new": [11], "york": [12, 13], " york": [14, 13], "x y": [20, 21], " x y": [22, 23, 21]}
    got = bad_words_token_ids(["new", " york", "x y"], lambda text: vocab[text])
    # " york" is stripped first; " x y" splits into a different number of tokens: left out (vLLM's rule)
    assert got == ((10,), (11,), (12, 13), (14, 13), (20, 21))


def test_blank_bad_words_are_refused():
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(bad_words=("ok", "  "))
    assert e.value.param == "bad_words"
    with pytest.raises(InvalidRequestError):
        SamplingParams(bad_words_token_ids=((1,), ()))


@pytest.mark.parametrize("mode", ["land", "run_ahead", "drafts"])
def test_bad_words_equal_transformers(tiny_llama, hf_tiny_llama, mode):
    prompts = random_prompts(4, 4, 16, seed=7)
    kwargs = dict(num_kv_blocks=96, block_size=4, max_num_batched_tokens=32, run_ahead=mode == "run_ahead")
    if mode == "drafts":
        kwargs["speculative_config"] = {"num_speculative_tokens": 3, "prompt_lookup_min": 1}
    llm = LLM(str(tiny_llama), **kwargs)
    free = [o.outputs[0].token_ids for o in llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=14))]
    requests, refs = [], []
    for prompt, out in zip(prompts, free):
        # words the model writes unconstrained: a pair from its output, and one token of it
        pair = tuple(out[3:5])
        assert prompt[-1] != pair[0] or out[0] != pair[1]  # the pair does not straddle the prompt's end
        bad = (pair, (out[8],)) if out[8] not in pair else (pair,)
        requests.append((prompt, SamplingParams(temperature=0.0, max_tokens=14, bad_words_token_ids=bad)))
        refs.append(_hf(hf_tiny_llama, prompt, 14, bad_words_ids=[list(w) for w in bad]))
    requests.append((prompts[0], SamplingParams(temperature=0.0, max_tokens=14)))  # a free row in the batch
    refs.append(free[0])
    outs = [o.outputs[0].token_ids for o in llm.generate([p for p, _ in requests], [s for _, s in requests])]
    assert outs == refs
    for (prompt, params), out, unconstrained in zip(requests, outs, free):
        for word in params.bad_words_token_ids:
            assert not any(tuple(out[i:i + len(word)]) == word for i in range(len(out))), (word, out)
        if params.bad_words_token_ids:
            assert out != unconstrained  # the ban changed what it wrote
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def _written_word(tokenizer, ids: list[int]) -> str:
    """Two tokens of `ids` that are a word of the text: they decode to it, and it encodes back to them."""
    for i in range(len(ids) - 1):
        word = tokenizer.decode(ids[i:i + 2])
        if word and word == word.strip() and tokenizer.encode(word, False) == ids[i:i + 2]:
            return word
    raise AssertionError(f"no two-token word in {ids}")


def test_bad_words_strings_use_the_models_tokenizer(tiny_llama):
    llm = LLM(str(tiny_llama), num_kv_blocks=64, block_size=4)
    prompt = random_prompts(1, 6, 6, seed=3)[0]
    free = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0].outputs[0]
    word = _written_word(llm.engine.tokenizer, free.token_ids)
    banned = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                                    bad_words=(word,)))[0].outputs[0]
    assert word not in banned.text and word in free.text
    ids = bad_words_token_ids([word], lambda t: llm.engine.tokenizer.encode(t, False))
    direct = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                                    bad_words_token_ids=ids))[0].outputs[0]
    assert direct.token_ids == banned.token_ids
    with pytest.raises(InvalidRequestError) as e:
        llm.generate([prompt], SamplingParams(bad_words_token_ids=((10**6,),)))
    assert e.value.param == "bad_words_token_ids"


def test_bad_words_over_http(tiny_llama):
    from engine.config import CacheConfig, EngineConfig
    from engine.engine import LLMEngine
    from tests.server_helpers import serve

    engine = LLMEngine.from_config(EngineConfig(model=str(tiny_llama), cache=CacheConfig(block_size=4,
                                                                                          num_blocks=64)))
    offline = LLM(str(tiny_llama), num_kv_blocks=64, block_size=4)
    prompt = random_prompts(1, 6, 6, seed=3)[0]
    base = {"model": "m", "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    with serve({"m": engine}) as url:
        free = httpx.post(f"{url}/v1/completions", json=base, timeout=30).json()["choices"][0]
        word = _written_word(engine.tokenizer, offline.generate([prompt], SamplingParams(
            temperature=0.0, max_tokens=12, ignore_eos=True))[0].outputs[0].token_ids)
        assert word in free["text"]
        r = httpx.post(f"{url}/v1/completions", json=base | {"bad_words": [word]}, timeout=30)
        assert r.status_code == 200, r.text
        want = offline.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                                          bad_words=(word,)))[0].outputs[0].text
        assert r.json()["choices"][0]["text"] == want and word not in want
        r = httpx.post(f"{url}/v1/chat/completions", timeout=30, json={
            "model": "m", "messages": [{"role": "user", "content": "hi"}], "bad_words": [" "], "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "bad_words", r.text
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks

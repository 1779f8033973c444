"""Generation engine against transformers' generate(): greedy tokens identical, alone or batched.

Each test builds a tiny random checkpoint from an HF config; the continuous-batching test uses
a KV pool so small that sequences are preempted and prompts are prefilled in chunks.
"""
from __future__ import annotations

import random

import pytest
import torch

from engine.errors import InvalidRequestError, PromptTooLongError
from engine.llm import LLM
from engine.request import GenerationRequest
from engine.sampling_params import SamplingParams
from tests.tiny_models import save_tiny

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def hf_greedy(folder, prompt: list[int], max_new_tokens: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = _hf_cache.get(folder)
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
        _hf_cache[folder] = model
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
        do_sample=False, pad_token_id=0, eos_token_id=None,
    )
    return out[0, len(prompt):].tolist()


_hf_cache: dict = {}


def random_prompts(n: int, lo: int, hi: int, seed: int, vocab: int = 320) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


@pytest.fixture(scope="module", params=["llama", "llama_tied", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "granite",
                                        "mistral_window", "phi3", "phi4_partial", "olmo2", "qwen3_moe", "mixtral", "gpt2"])
def tiny(request, tmp_path_factory):
    return save_tiny(request.param, tmp_path_factory.mktemp(request.param))


@pytest.mark.parametrize("screen", ["0", "1"], ids=["fp32-logits", "bf16-screen"])
def test_greedy_tokens_equal_transformers_generate(tiny, screen, monkeypatch):
    monkeypatch.setenv("KVSERVE_GREEDY_SCREEN", screen)  # engine/greedy_screen.py, on or off
    llm = LLM(str(tiny), num_kv_blocks=64, block_size=4)
    config = llm.engine.runner.model.config  # Gemma 2's capped and Granite's scaled logits: no screen
    capped = getattr(config, "final_softcap", None) is not None or getattr(config, "logits_scaling", None) is not None
    assert (llm.engine.runner.model.greedy_screen is not None) == (screen == "1" and not capped)
    prompts = random_prompts(4, 3, 30, seed=1)
    outs = llm.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(tiny, prompt, 12)
        assert out.outputs[0].finish_reason == "length"
    assert llm.engine.block_manager.num_free_blocks == 64


def test_continuous_batching_with_preemption_and_chunked_prefill(tmp_path):
    folder = save_tiny("llama", tmp_path / "m")
    prompts = random_prompts(18, 2, 60, seed=7)
    params = [SamplingParams(temperature=0.0, max_tokens=4 + i % 9, ignore_eos=True) for i in range(18)]
    # reference: each prompt alone, with room to spare
    alone = LLM(str(folder), num_kv_blocks=256, block_size=4)
    expected = [alone.generate([p], sp)[0].outputs[0].token_ids for p, sp in zip(prompts, params)]
    assert expected[0] == hf_greedy(folder, prompts[0], params[0].max_tokens)
    # tight: 40 blocks of 4 tokens for 18 sequences, a 24-token step budget
    llm = LLM(str(folder), num_kv_blocks=40, block_size=4, max_num_batched_tokens=24, max_num_seqs=8)
    engine = llm.engine
    results: dict[str, list[int]] = {}
    pending = list(range(len(prompts)))
    steps = 0
    while pending or engine.has_unfinished_requests():
        for _ in range(2 if steps % 3 == 0 else 0):  # arrivals while others run
            if pending:
                i = pending.pop(0)
                engine.add_request(f"r{i}", GenerationRequest(prompts[i], params[i]))
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.outputs[0].token_ids
        engine.block_manager.check_integrity()
        steps += 1
        assert steps < 5000
    assert [results[f"r{i}"] for i in range(len(prompts))] == expected
    assert engine.scheduler.num_preemptions > 0
    assert engine.block_manager.num_free_blocks == 40


def test_seeded_sampling_is_reproducible_and_n_samples_differ(tmp_path):
    folder = save_tiny("llama", tmp_path / "m")
    llm = LLM(str(folder), num_kv_blocks=128, block_size=4)
    prompt = random_prompts(1, 5, 5, seed=3)[0]
    sp = SamplingParams(temperature=1.0, max_tokens=10, seed=42, n=3, ignore_eos=True)
    a = llm.generate([prompt], sp)[0]
    # the same seeded request inside a batch of other (unseeded) requests
    others = random_prompts(5, 3, 20, seed=4)
    batch = llm.generate(others + [prompt], [SamplingParams(temperature=1.0, max_tokens=10)] * 5 + [sp])
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in batch[-1].outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1


def test_stop_token_ids_and_max_tokens(tmp_path):
    folder = save_tiny("llama", tmp_path / "m")
    llm = LLM(str(folder), num_kv_blocks=64, block_size=4)
    prompt = random_prompts(1, 6, 6, seed=5)[0]
    full = llm.generate([prompt], GREEDY)[0].outputs[0].token_ids
    stop_at = full[4]
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=(stop_at,)))[0]
    first = full.index(stop_at)
    assert out.outputs[0].token_ids == full[: first + 1]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop_at
    # the stop token is in the tokens but not the text, unless asked for (vLLM's rule, as for stop strings):
    # "Z", forced by logit bias, stops the output at once
    z = llm.engine.tokenizer.encode("Z", add_special_tokens=False)[0]
    texts = []
    for include in (False, True):
        forced = SamplingParams(temperature=0.0, max_tokens=8, logit_bias=((z, 100.0),), stop_token_ids=(z,),
                                include_stop_str_in_output=include)
        got = llm.generate([prompt], forced)[0].outputs[0]
        assert got.token_ids == [z] and got.finish_reason == "stop"
        texts.append(got.text)
    assert texts == ["", "Z"]


def test_abort_frees_blocks_at_once(tmp_path):
    folder = save_tiny("llama", tmp_path / "m")
    llm = LLM(str(folder), num_kv_blocks=64, block_size=4)
    engine = llm.engine
    engine.add_request("a", GenerationRequest(random_prompts(1, 20, 20, 1)[0], SamplingParams(max_tokens=50)))
    engine.add_request("b", GenerationRequest(random_prompts(1, 3, 3, 2)[0], SamplingParams(max_tokens=50)))
    engine.step()
    engine.step()
    assert engine.block_manager.num_free_blocks < 64
    engine.abort_request("a")
    engine.abort_request("b")
    assert engine.block_manager.num_free_blocks == 64
    outs = engine.step()
    assert {o.request_id for o in outs} == {"a", "b"} and all(o.finished for o in outs)
    assert all(o.outputs[0].finish_reason == "abort" for o in outs)
    assert not engine.has_unfinished_requests()


def test_bad_requests_raise_clear_errors_and_leave_nothing_allocated(tmp_path):
    folder = save_tiny("llama", tmp_path / "m")
    llm = LLM(str(folder), num_kv_blocks=64, block_size=4, max_model_len=100)
    engine = llm.engine
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request("e", GenerationRequest([], SamplingParams()))
    with pytest.raises(PromptTooLongError, match="maximum context length is 100"):
        engine.add_request("l", GenerationRequest([1] * 100, SamplingParams()))
    with pytest.raises(PromptTooLongError, match="90 in the prompt, 20"):
        engine.add_request("m", GenerationRequest([1] * 90, SamplingParams(max_tokens=20)))
    with pytest.raises(InvalidRequestError, match="token ids"):
        engine.add_request("v", GenerationRequest([10_000], SamplingParams()))
    assert not engine.has_unfinished_requests() and engine.block_manager.num_free_blocks == 64
    # max_tokens=None fills the rest of the context and stops with "length"
    out = llm.generate([[1] * 95], SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 5 and out.outputs[0].finish_reason == "length"


def test_unknown_model_path_raises(tmp_path):
    from models.weights import ModelLoadError

    with pytest.raises(ModelLoadError):
        LLM(str(tmp_path / "nope"))


def test_screened_greedy_rows_beside_sampled_and_logprob_rows(tmp_path, monkeypatch):
    """With the bf16 screen on, a batch mixes screened greedy rows with rows that need whole logits
    (seeded sampling, greedy with logprobs or a penalty); each gets what it gets with the screen off."""
    folder = save_tiny("llama", tmp_path / "m")
    prompts = random_prompts(6, 3, 20, seed=5)
    params = [GREEDY, SamplingParams(temperature=1.0, max_tokens=12, seed=7, ignore_eos=True), GREEDY,
              SamplingParams(temperature=0.0, max_tokens=12, logprobs=2, ignore_eos=True), GREEDY,
              SamplingParams(temperature=0.0, max_tokens=12, repetition_penalty=1.3, ignore_eos=True)]
    results = {}
    for screen in ("1", "0"):
        monkeypatch.setenv("KVSERVE_GREEDY_SCREEN", screen)
        llm = LLM(str(folder), num_kv_blocks=128, block_size=4)
        results[screen] = [o.outputs[0] for o in llm.generate(prompts, params)]
        assert llm.engine.block_manager.num_free_blocks == 128
    assert [o.token_ids for o in results["1"]] == [o.token_ids for o in results["0"]]
    assert results["1"][3].logprobs is not None
    assert len({tuple(o.token_ids) for o in results["1"]}) == 6


def test_prefix_cache_hits_give_the_tokens_of_a_full_prefill(tmp_path):
    """Prompts sharing a system-prompt-like stem, n samples and a preempting pool: with prefix
    caching, the same greedy and seeded tokens as without it, most of the prompt found cached,
    and the cached blocks free (KV usage 0) at the end."""
    folder = save_tiny("llama", tmp_path / "m")
    stem = random_prompts(1, 23, 23, seed=8)[0]
    prompts = [stem + tail for tail in random_prompts(8, 1, 9, seed=9)] + [stem[:13], stem]
    params = [SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)] * 5 + \
             [SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True, seed=i, n=2) for i in range(5)]
    off = LLM(str(folder), num_kv_blocks=40, block_size=4, max_num_batched_tokens=24, enable_prefix_caching=False)
    expected = [[c.token_ids for c in o.outputs] for o in off.generate(prompts, params)]
    assert off.engine.scheduler.num_prefix_hit_tokens == 0
    assert expected[0][0] == hf_greedy(folder, prompts[0], 6)

    on = LLM(str(folder), num_kv_blocks=40, block_size=4, max_num_batched_tokens=24)
    engine = on.engine
    for _ in range(2):  # the second round finds every prompt's full blocks cached
        outs = on.generate(prompts, params)
        assert [[c.token_ids for c in o.outputs] for o in outs] == expected
        engine.block_manager.check_integrity()
        assert engine.block_manager.usage == 0.0
    assert outs[-1].num_cached_tokens == 20  # 23 tokens: 5 full blocks, the last recomputed
    stats = engine.stats()
    assert stats.num_prefix_queried_tokens == 2 * sum(len(p) * sp.n for p, sp in zip(prompts, params))
    assert stats.num_prefix_hit_tokens > stats.num_prefix_queried_tokens // 2


def test_a_step_that_raises_leaves_no_named_blocks_behind(tmp_path, monkeypatch):
    """Blocks are named when scheduled; a launch that raises never wrote them, so every name is
    dropped and a later prompt with the same start computes it again (same tokens as alone)."""
    folder = save_tiny("llama", tmp_path / "m")
    llm = LLM(str(folder), num_kv_blocks=64, block_size=4)
    engine = llm.engine
    prompt = random_prompts(1, 21, 21, seed=6)[0]
    expected = llm.generate([prompt], GREEDY)[0].outputs[0].token_ids
    engine.block_manager.reset_prefix_cache()
    launch = engine.runner.launch
    monkeypatch.setattr(engine.runner, "launch", lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("device lost")))
    engine.add_request("x", GenerationRequest(prompt, GREEDY))
    with pytest.raises(RuntimeError, match="device lost"):
        engine.step()
    engine.abort_request("x")
    engine.step()
    monkeypatch.setattr(engine.runner, "launch", launch)
    out = llm.generate([prompt], GREEDY)[0]
    assert out.num_cached_tokens == 0 and out.outputs[0].token_ids == expected
    assert engine.block_manager.num_free_blocks == 64
    engine.block_manager.check_integrity()


def test_priority_scheduling_serves_the_urgent_request_first_with_the_same_tokens(tmp_path):
    """One seat: a later, more urgent request preempts the running one, finishes first, and both
    outputs equal the ones each gets alone (the preempted one is recomputed)."""
    folder = save_tiny("llama", tmp_path / "m")
    slow, urgent = random_prompts(2, 6, 9, 5)
    alone = LLM(str(folder), num_kv_blocks=64, block_size=4).generate([slow, urgent], GREEDY)
    llm = LLM(str(folder), num_kv_blocks=64, block_size=4, max_num_seqs=1, scheduling_policy="priority")
    engine = llm.engine
    engine.add_request("slow", GenerationRequest(slow, GREEDY, priority=5))
    for _ in range(4):
        engine.step()
    engine.add_request("urgent", GenerationRequest(urgent, GREEDY, priority=-1))
    order, done = [], {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                order.append(out.request_id)
                done[out.request_id] = out
    assert order == ["urgent", "slow"] and engine.scheduler.num_preemptions == 1
    assert [done[r].outputs[0].token_ids for r in ("slow", "urgent")] == [o.outputs[0].token_ids for o in alone]
    assert engine.block_manager.num_free_blocks == 64
    # without the policy, a priority is refused rather than ignored
    with pytest.raises(InvalidRequestError, match="--scheduling-policy priority") as err:
        LLM(str(folder), num_kv_blocks=16, block_size=4).engine.add_request("p", GenerationRequest(slow, GREEDY, priority=1))
    assert err.value.param == "priority"

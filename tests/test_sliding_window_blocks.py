"""KV blocks behind a sliding window are freed while a sequence runs (a Mistral-style model, a 5-key window
on every layer): greedy tokens still equal transformers', landing each step, running ahead, with n-gram
drafts, and with prefix caching under preemption; each running sequence holds about a window's worth of
blocks however long it grows, and every block is back in the pool at the end. A model with full-attention
layers (Gemma 2) keeps every block."""
from __future__ import annotations

import pytest

from engine.block_manager import cdiv
from engine.llm import LLM
from engine.request import GenerationRequest
from engine.sampling_params import SamplingParams
from tests.test_engine_generation import hf_greedy, random_prompts
from tests.tiny_models import save_tiny

WINDOW, BLOCK, NEW = 5, 2, 24


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    return save_tiny("mistral_window", tmp_path_factory.mktemp("mistral_window"))


def _run(llm: LLM, prompts: list[list[int]], max_tokens: int,
         preempt: bool = False) -> tuple[dict[str, list[int]], int]:
    """Every prompt to the end, stepping by hand: (tokens by request, most blocks any running sequence held).
    `preempt`: every few steps the scheduler's own preemption (by recompute) hits a sequence that has
    given blocks back, as a full pool would; it comes back through the prefix cache."""
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", GenerationRequest(p, params))
    done, peak, steps = {}, 0, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        steps += 1
        victims = [s for s in engine.scheduler.running if s.num_freed_blocks and not s.num_inflight]
        if preempt and victims and steps % 4 == 0:
            engine.scheduler.running.remove(victims[-1])
            engine.scheduler._preempt(victims[-1])
        for seq in engine.scheduler.running:
            if seq.num_computed_tokens >= seq.num_prompt_tokens:  # decoding: the prompt's blocks had time to go
                peak = max(peak, len(seq.block_table) - seq.num_freed_blocks)
        engine.block_manager.check_integrity()
    return done, peak


@pytest.mark.parametrize("mode", ["land", "run_ahead", "drafts", "prefix_cache_preemption"])
def test_tokens_equal_transformers_while_old_blocks_go(mistral, mode):
    kwargs = dict(num_kv_blocks=64, block_size=BLOCK, max_num_batched_tokens=16, run_ahead=mode == "run_ahead")
    if mode == "drafts":
        kwargs["speculative_config"] = {"num_speculative_tokens": 3, "prompt_lookup_min": 1}
    if mode == "prefix_cache_preemption":  # shared stems: cache hits, also on blocks freed behind the window
        kwargs.update(enable_prefix_caching=True)
    llm = LLM(str(mistral), **kwargs)
    assert llm.engine.block_manager.sliding_window == WINDOW
    prompts = random_prompts(5, 8, 20, seed=3)
    if mode == "prefix_cache_preemption":
        prompts = [prompts[0][:6] + p for p in prompts]
    done, peak = _run(llm, prompts, NEW, preempt=mode == "prefix_cache_preemption")
    for i, p in enumerate(prompts):
        assert done[f"r{i}"] == hf_greedy(mistral, p, NEW), i
    # the window's keys, the block being written and one more for a step's chunk or drafts
    assert 0 < peak <= cdiv(WINDOW, BLOCK) + 3, peak
    if mode == "prefix_cache_preemption":  # sequences that had freed blocks came back and still match
        assert llm.engine.scheduler.num_preemptions > 0 and llm.engine.stats().num_prefix_hit_tokens > 0
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_full_attention_layers_keep_every_block(tmp_path):
    gemma2 = save_tiny("gemma2", tmp_path / "gemma2")  # sliding and full layers alternate
    llm = LLM(str(gemma2), num_kv_blocks=64, block_size=BLOCK)
    assert llm.engine.block_manager.sliding_window is None
    prompt = random_prompts(1, 12, 12, seed=4)[0]
    _, peak = _run(llm, [prompt], 10)
    assert peak >= cdiv(len(prompt) + 8, BLOCK)  # all its blocks, up to its last decode step

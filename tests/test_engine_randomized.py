"""Randomized workloads against the engine's invariants, on fixed seeds (so a failure reproduces).

Each workload mixes what the targeted tests take one at a time: prompts sharing stems (prefix
cache hits), greedy and seeded sampling with `n` samples, scored prompts (echo), arrivals while
others run, aborts, a pool small enough to preempt, chunked prefill, block sizes 1-8 and running
ahead. Every request that is not aborted must get the tokens (and prompt scores) it gets alone in
a roomy engine without a prefix cache; no output may carry a partly scored prompt; the block
manager must stay consistent after every step and hold nothing at the end. The same on a model with
a sliding window on every layer, whose blocks behind it go back to the pool as it runs.
"""
from __future__ import annotations

import random

import pytest

from engine.llm import LLM
from engine.request import GenerationRequest
from engine.sampling_params import SamplingParams
from tests.tiny_models import save_tiny


@pytest.fixture(scope="module", params=["llama", "mistral_window"])
def folder(request, tmp_path_factory):
    """A Llama, and a model with a 5-key window on every layer, whose blocks behind it are freed while it runs."""
    return save_tiny(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def alone(folder) -> LLM:
    return LLM(str(folder), num_kv_blocks=512, block_size=4, enable_prefix_caching=False)


def _scores(scored: list | None) -> list[tuple[int, float, list[int]]] | None:
    """(token, logprob, top ids) per scored prompt position after the first."""
    return None if scored is None else [(e.token_id, e.logprob, list(e.top)) for e in scored[1:]]


def _workload(rng: random.Random) -> tuple[list[list[int]], list[SamplingParams]]:
    stems = [[rng.randrange(320) for _ in range(rng.randint(1, 40))] for _ in range(3)]
    prompts = [rng.choice(stems)[: rng.randint(1, 40)] + [rng.randrange(320) for _ in range(rng.randint(0, 12))]
               for _ in range(rng.randint(6, 14))]
    params = []
    for _ in prompts:
        scored = rng.choice([None, None, 2])
        if rng.random() < 0.5:
            params.append(SamplingParams(temperature=0.0, max_tokens=rng.randint(1, 16), ignore_eos=True,
                                         prompt_logprobs=scored))
        else:
            params.append(SamplingParams(temperature=1.0, top_k=rng.choice([-1, 5]), max_tokens=rng.randint(1, 16),
                                         ignore_eos=True, n=rng.choice([1, 2, 3]), seed=rng.randrange(1000),
                                         prompt_logprobs=scored))
    return prompts, params


@pytest.mark.parametrize("seed", range(4))
def test_random_workload_gets_the_tokens_each_request_gets_alone(seed, folder, alone):
    rng = random.Random(seed)
    prompts, params = _workload(rng)
    expected, expected_scores = [], []
    for p, sp in zip(prompts, params):
        out = alone.generate([p], sp)[0]
        expected.append([c.token_ids for c in out.outputs])
        expected_scores.append(_scores(out.prompt_logprobs))
    block_size = rng.choice([1, 2, 4, 8])
    num_blocks = 72 // block_size + 2  # one 68-token sequence fits; many do not: preemption
    llm = LLM(str(folder), num_kv_blocks=num_blocks, block_size=block_size, max_model_len=68,
              max_num_batched_tokens=rng.choice([16, 24, 64]), max_num_seqs=rng.choice([2, 4, 8]),
              run_ahead=rng.choice([None, True]))
    engine = llm.engine
    done: dict[str, list[list[int]]] = {}
    scores: dict[str, list | None] = {}
    aborted: set[str] = set()
    pending = list(range(len(prompts)))
    for _ in range(5000):
        if not (pending or engine.has_unfinished_requests()):
            break
        for _ in range(rng.randint(0, 2)):
            if pending:
                i = pending.pop(0)
                engine.add_request(f"r{i}", GenerationRequest(prompts[i], params[i]))
        live = [f"r{i}" for i in range(len(prompts)) if i not in pending and f"r{i}" not in done]
        if live and rng.random() < 0.05:
            victim = rng.choice(live)
            engine.abort_request(victim)
            aborted.add(victim)
        for out in engine.step():
            if out.prompt_logprobs is not None and out.request_id not in aborted:
                assert len(out.prompt_logprobs) == len(out.prompt_token_ids), "a partly scored prompt"
            if out.finished:
                done[out.request_id] = [c.token_ids for c in out.outputs]
                scores[out.request_id] = _scores(out.prompt_logprobs)
        engine.block_manager.check_integrity()
    assert not engine.has_unfinished_requests()
    for i, want in enumerate(expected):
        if f"r{i}" not in aborted:
            assert done[f"r{i}"] == want, (i, params[i])
            got = scores[f"r{i}"]
            assert (got is None) == (expected_scores[i] is None), i
            if got is not None:
                assert [(t, top) for t, _, top in got] == [(t, top) for t, _, top in expected_scores[i]], i
                assert max(abs(a[1] - b[1]) for a, b in zip(got, expected_scores[i])) < 1e-4, i
    assert engine.block_manager.num_free_blocks == num_blocks
    stats = engine.stats()
    assert stats.kv_cache_usage == 0.0 and stats.num_running == stats.num_waiting == 0
    assert stats.num_prefix_hit_tokens > 0  # the stems were found

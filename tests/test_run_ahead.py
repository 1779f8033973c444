"""Running ahead: each step is launched before the previous step's tokens are read on the host.

The host learns a sequence's token one step late, so a sequence that stops (stop token, stop
string) has one more token computed that must be dropped, a sequence whose token in flight is
its last must not be scheduled again, and inputs in flight come from the device. Every output
must equal the engine that lands each step at once, with nothing left allocated.
"""
from __future__ import annotations

from engine.llm import LLM
from engine.request import GenerationRequest
from engine.sampling_params import SamplingParams
from tests.test_engine_generation import random_prompts


def _drive(llm: LLM, requests: list[tuple[list[int], SamplingParams]]) -> tuple[dict, list]:
    """Arrivals two at a time every third step; returns finished outputs and each launch."""
    engine = llm.engine
    launches = []
    launch = engine.runner.launch
    engine.runner.launch = lambda *a, **k: launches.append(launch(*a, **k)) or launches[-1]
    done, pending, steps = {}, list(range(len(requests))), 0
    while pending or engine.has_unfinished_requests():
        for _ in range(2 if steps % 3 == 0 else 0):
            if pending:
                i = pending.pop(0)
                engine.add_request(f"r{i}", GenerationRequest(*requests[i]))
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        engine.block_manager.check_integrity()
        steps += 1
        assert steps < 3000
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    return done, launches


def _summary(out):
    return [(o.token_ids, o.finish_reason, o.stop_reason, o.text,
             [lp.token_id for lp in o.logprobs] if o.logprobs is not None else None) for o in out.outputs]


def test_running_ahead_gives_the_outputs_of_landing_each_step(tiny_llama):
    prompts = random_prompts(14, 2, 40, seed=11)
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    full = LLM(str(tiny_llama), num_kv_blocks=256, block_size=4).generate(prompts[:2], greedy)
    stop_id = full[0].outputs[0].token_ids[5]
    text = full[1].outputs[0].text
    stop_str = text[len(text) // 2 : len(text) // 2 + 2]
    seeded = SamplingParams(temperature=0.9, max_tokens=9, seed=5, n=2, ignore_eos=True)
    first, second = (o.token_ids for o in LLM(str(tiny_llama), num_kv_blocks=256, block_size=4).generate(
        prompts[2:3], seeded)[0].outputs)
    stop_one = next(t for t in first[1:] if t not in second)  # stops one sample while the other runs on
    params = [
        SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=(stop_id,)),  # stops while ahead
        SamplingParams(temperature=0.0, max_tokens=12, stop=[stop_str], ignore_eos=True),
        SamplingParams(temperature=0.9, max_tokens=9, seed=5, n=2, ignore_eos=True, stop_token_ids=(stop_one,)),
        SamplingParams(temperature=0.0, max_tokens=7, logprobs=2, ignore_eos=True),  # tokens needed at once
        SamplingParams(temperature=0.0, max_tokens=8, repetition_penalty=1.3, ignore_eos=True),
    ] + [SamplingParams(temperature=0.0, max_tokens=3 + i % 9, ignore_eos=True) for i in range(9)]
    requests = list(zip(prompts, params))
    kwargs = dict(num_kv_blocks=24, block_size=4, max_num_batched_tokens=20, max_num_seqs=8)
    landing = LLM(str(tiny_llama), run_ahead=False, **kwargs)
    expected, _ = _drive(landing, requests)
    llm = LLM(str(tiny_llama), run_ahead=True, **kwargs)
    preempt, inflight_when_preempted = llm.engine.scheduler._preempt, []
    llm.engine.scheduler._preempt = lambda seq: inflight_when_preempted.append(seq.num_inflight) or preempt(seq)
    got, launches = _drive(llm, requests)
    assert sorted(got) == sorted(expected)
    for rid in expected:
        assert _summary(got[rid]) == _summary(expected[rid]), rid
    assert got["r0"].outputs[0].finish_reason == "stop" and got["r0"].outputs[0].stop_reason == stop_id
    assert got["r1"].outputs[0].finish_reason == "stop" and len(got["r1"].outputs[0].token_ids) < 12
    assert [o.finish_reason for o in got["r2"].outputs] == ["stop", "length"]  # forks share blocks
    assert llm.engine.num_generation_tokens == landing.engine.num_generation_tokens
    assert sum(launch.deferred for launch in launches) > len(launches) // 2
    assert not all(launch.deferred for launch in launches)  # logprob and penalty rows land at once
    assert 1 in inflight_when_preempted  # preempted with its token still on the device
    # more tokens were sampled than kept: the ones computed after a stop the host saw late
    sampled = sum(len(launch.rows) for launch in launches)
    kept = sum(len(o.token_ids) for out in got.values() for o in out.outputs)
    assert sampled > kept


def test_abort_while_a_step_is_in_flight_frees_blocks_at_once(tiny_llama):
    llm = LLM(str(tiny_llama), num_kv_blocks=64, block_size=4, run_ahead=True)
    engine = llm.engine
    a, b = random_prompts(2, 10, 20, seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    engine.add_request("a", GenerationRequest(a, params))
    engine.add_request("b", GenerationRequest(b, params))
    for _ in range(4):
        engine.step()
    assert engine._inflight is not None and engine._inflight.deferred
    held = engine.block_manager.num_free_blocks
    engine.abort_request("a")
    assert engine.block_manager.num_free_blocks > held
    outs = {o.request_id: o for o in engine.step()}
    assert outs["a"].finished and outs["a"].outputs[0].finish_reason == "abort"
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    alone = LLM(str(tiny_llama), num_kv_blocks=64, block_size=4).generate([b], params)[0]
    assert done["b"].outputs[0].token_ids == alone.outputs[0].token_ids
    assert engine.block_manager.num_free_blocks == 64 and engine._inflight is None

"""N-gram speculative decoding: the proposer and the scheduler's bookkeeping (no torch, ms), then
the engine against transformers: greedy tokens equal `generate()` and decoding without drafts,
sampled tokens carry HF's logprobs at their positions, and every stop rule ends where it would
without drafts. Each engine test asserts drafts were accepted, so it exercises verification."""
from __future__ import annotations

import random

import pytest

from engine.block_manager import BlockManager
from engine.config import EngineConfig, SchedulerConfig
from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence
from engine.speculative import SpeculativeConfig, num_accepted, propose_ngram

NGRAM = SpeculativeConfig(num_speculative_tokens=3, prompt_lookup_max=3, prompt_lookup_min=1)


# ---- proposer ------------------------------------------------------------------------
@pytest.mark.parametrize(("tokens", "limit", "want"), [
    ([5, 6, 7, 8, 9, 5, 6, 7], 3, [8, 9, 5]),  # the 3-gram 5 6 7 occurred: what followed it
    ([5, 6, 7, 8, 9, 5, 6, 7], 1, [8]),  # no more than the limit
    ([5, 6, 1, 6, 2, 5, 6], 3, [1, 6, 2]),  # the longer match (5 6) wins over the later 1-gram (6 -> 2)
    ([1, 9, 1, 8, 1], 3, [8, 1]),  # the latest occurrence of the 1-gram, up to the end
    ([1, 2, 3, 4], 3, []),  # nothing repeats
    ([7], 3, []),  # too short to hold a match and its continuation
    ([4, 4], 3, [4]),  # the match may run up to the last token
])
def test_proposer_copies_what_followed_the_longest_latest_match(tokens, limit, want):
    assert propose_ngram(tokens, NGRAM, limit) == want


def test_proposer_skips_byte_matches_across_token_boundaries():
    """256 packs as 00 01 00.., so [1, 0]'s bytes also occur one byte into [256, 0, 0]: not a token match."""
    cfg = SpeculativeConfig(num_speculative_tokens=3, prompt_lookup_max=2, prompt_lookup_min=2)
    assert propose_ngram([256, 0, 0, 7, 1, 0], cfg, 3) == []
    assert propose_ngram([256, 1, 0, 7, 3, 1, 0], cfg, 3) == [7, 3, 1]  # the aligned match still counts


def test_proposer_respects_the_minimum_ngram():
    cfg = SpeculativeConfig(num_speculative_tokens=3, prompt_lookup_max=3, prompt_lookup_min=2)
    assert propose_ngram([1, 9, 2, 9], cfg, 3) == []  # only the 1-gram 9 repeats
    assert propose_ngram([1, 9, 2, 1, 9], cfg, 3) == [2, 1, 9]


def test_packed_ids_follow_appends_and_a_cut():
    from array import array

    from engine.speculative import pack

    tokens, packed = [5, 6, 7], bytearray()
    assert pack(tokens, packed) == array("q", tokens).tobytes()
    tokens += [8, 5, 6]
    assert pack(tokens, packed) == array("q", tokens).tobytes()  # extended, not repacked
    assert propose_ngram(tokens, NGRAM, 3, packed) == propose_ngram(tokens, NGRAM, 3) == [7, 8, 5]
    del tokens[4:]
    assert pack(tokens, packed) == array("q", tokens).tobytes()


def test_acceptance_is_the_prefix_the_samples_agree_with():
    assert num_accepted([4, 5, 6], [4, 5, 6, 7]) == 3
    assert num_accepted([4, 5, 6], [4, 9, 6, 7]) == 1
    assert num_accepted([4, 5, 6], [3, 5, 6, 7]) == 0
    assert num_accepted([], [3]) == 0


@pytest.mark.parametrize("fields", [{"method": "eagle"}, {"num_speculative_tokens": 0},
                                    {"prompt_lookup_min": 3, "prompt_lookup_max": 2}, {"prompt_lookup_min": 0},
                                    {"disable_by_batch_size": 0}])
def test_bad_configs_are_refused(fields):
    with pytest.raises(InvalidRequestError):
        SpeculativeConfig(**fields)


def test_speculation_cannot_run_ahead():
    with pytest.raises(InvalidRequestError, match="run ahead"):
        EngineConfig(model="m", run_ahead=True, speculative=NGRAM)


# ---- scheduler -------------------------------------------------------------------------
def _scheduler(num_blocks: int = 16, budget: int = 32) -> tuple[Scheduler, BlockManager]:
    bm = BlockManager(num_blocks, 4)
    cfg = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=8, max_model_len=64)
    return Scheduler(cfg, bm, frozenset({99}), speculative=NGRAM), bm


def _decoding(sched: Scheduler, prompt: list[int], max_tokens: int = 16, **params) -> Sequence:
    """A sequence whose prompt is computed and whose first output token (the prompt's first) is sampled."""
    seq = Sequence(0, "r0", list(prompt), len(prompt), SamplingParams(**params), max_tokens)
    sched.add(seq)
    while seq.num_output_tokens == 0:  # prefill chunks are never drafted after
        out = sched.schedule()
        assert out.drafts == [[]]
        sched.update(out, [prompt[0] if samples else None for samples in out.sampling])
    return seq


def test_a_decode_computes_its_drafts_and_lands_what_was_accepted():
    sched, bm = _scheduler()
    seq = _decoding(sched, [1, 2, 3, 4, 5, 6])  # then 1: the 1-gram 1 is followed by 2 3 4
    out = sched.schedule()
    assert out.drafts == [[2, 3, 4]] and out.num_new_tokens == [4] and out.sampling == [True]
    assert len(seq.block_table) == 3  # positions 6..9 (the last token and 3 drafts) need a third block
    sched.advance(out)
    assert seq.num_computed_tokens == 10
    sched.land(out, [8], accepted=[[2]])  # draft 3 was refused: 8 was sampled in its place
    assert seq.token_ids[6:] == [1, 2, 8] and seq.num_computed_tokens == 8  # 3 and 4's slots are stale
    assert sched.num_draft_tokens == 3 and sched.num_accepted_tokens == 1
    out = sched.schedule()
    assert out.num_new_tokens[0] == 1 + len(out.drafts[0])  # the next step starts at 8, the new token


def test_drafts_leave_room_for_the_step_token_within_max_tokens_and_budget():
    sched, _ = _scheduler()
    seq = _decoding(sched, [1, 2, 3, 4, 5, 6], max_tokens=3)  # 1 output token: 2 more allowed
    out = sched.schedule()
    assert out.drafts == [[2]]  # one draft and the token after it make the last two
    sched.update(out, [3], accepted=[[2]])
    assert seq.finish_reason == "length" and seq.output_token_ids == [1, 2, 3]

    sched, _ = _scheduler(budget=2)
    _decoding(sched, [1, 2, 3, 4, 5, 6])
    assert sched.schedule().drafts == [[2]]


def test_a_stop_token_among_accepted_drafts_ends_the_sequence_there():
    sched, bm = _scheduler()
    seq = _decoding(sched, [1, 2, 99, 4, 5, 6])
    out = sched.schedule()
    assert out.drafts == [[2, 99, 4]]
    assert sched.update(out, [7], accepted=[[2, 99, 4]]) == [seq]
    assert seq.output_token_ids == [1, 2, 99] and seq.finish_reason == "stop" and bm.num_free_blocks == 16


def test_no_drafts_while_more_sequences_run_than_disable_by_batch_size():
    from dataclasses import replace

    sched, _ = _scheduler()
    sched.speculative = replace(NGRAM, disable_by_batch_size=1)
    first = _decoding(sched, [1, 2, 3, 4, 5, 6])
    assert sched.schedule().drafts == [[2, 3, 4]]  # one running: drafts
    second = Sequence(1, "r1", [1, 2, 3, 4, 5, 6], 6, SamplingParams(), 16)
    sched.add(second)
    out = sched.schedule()  # two in the engine: none for either
    assert out.seqs == [first, second] and out.drafts == [[], []]


def test_a_grammar_gets_no_drafts_and_a_full_pool_drops_them_before_preempting():
    from engine.structured_output import StructuredOutput

    sched, _ = _scheduler()
    _decoding(sched, [1, 2, 3, 4, 5, 6], structured=StructuredOutput.regex("[0-9]+"))
    assert sched.schedule().drafts == [[]]

    sched, bm = _scheduler(num_blocks=2)  # 8 slots: the 7th token fits, drafts past it do not
    seq = _decoding(sched, [1, 2, 3, 4, 5, 6])
    out = sched.schedule()
    assert out.seqs == [seq] and out.drafts == [[]] and out.num_new_tokens == [1] and not out.preempted


# ---- engine, against transformers ----------------------------------------------------------
def _repetitive_prompts(n: int, seed: int) -> list[list[int]]:
    """Patterns repeated: tiny random models fall into loops too, so drafts get accepted."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        pattern = [rng.randrange(3, 320) for _ in range(rng.randint(3, 8))]
        prompts.append(pattern * 3 + pattern[: rng.randint(0, 2)])
    return prompts


def _llm(folder, spec: bool, **kw):
    from engine.llm import LLM

    return LLM(str(folder), num_kv_blocks=kw.pop("num_kv_blocks", 128), block_size=4,
               speculative_config={"num_speculative_tokens": 4, "prompt_lookup_min": 1} if spec else None, **kw)


def _accepted(llm) -> int:
    stats = llm.engine.stats()
    assert stats.num_accepted_tokens <= stats.num_draft_tokens
    return stats.num_accepted_tokens


def _no_leaks(llm) -> None:
    bm = llm.engine.block_manager
    bm.check_integrity()
    assert bm.num_free_blocks == bm.num_blocks


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tiny(request, tmp_path_factory):
    from tests.tiny_models import save_tiny

    return save_tiny(request.param, tmp_path_factory.mktemp(request.param))


def test_greedy_with_drafts_equals_transformers_generate(tiny):
    from tests.test_engine_generation import hf_greedy

    llm = _llm(tiny, spec=True)
    prompts = _repetitive_prompts(5, seed=3)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(tiny, prompt, 24)
    assert _accepted(llm) > 10
    _no_leaks(llm)


def test_sampled_tokens_carry_transformers_logprobs_at_their_positions(tiny):
    """Each token sampled after accepted drafts was drawn from the model's distribution given the
    drafts before it: its reported logprob is HF's at that position of the finished sequence."""
    import torch
    from transformers import AutoModelForCausalLM

    llm = _llm(tiny, spec=True)
    prompts = _repetitive_prompts(4, seed=5)
    params = SamplingParams(temperature=1.0, top_k=2, max_tokens=20, ignore_eos=True, logprobs=2, seed=11)
    outs = llm.generate(prompts, params)
    assert _accepted(llm) > 3
    hf = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    for prompt, out in zip(prompts, outs):
        tokens = out.outputs[0].token_ids
        with torch.no_grad():
            logp = hf(torch.tensor([prompt + tokens])).logits[0].log_softmax(-1)
        want = logp[len(prompt) - 1 : -1].gather(1, torch.tensor(tokens)[:, None])[:, 0]
        got = torch.tensor([lp.logprob for lp in out.outputs[0].logprobs])
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
        top = [sorted(lp.top, key=lp.top.get, reverse=True) for lp in out.outputs[0].logprobs]
        assert top == logp[len(prompt) - 1 : -1].topk(2).indices.tolist()
    again = _llm(tiny, spec=True).generate(prompts, params)  # a seed fixes the drafts' draws too
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in outs]
    _no_leaks(llm)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, repetition_penalty=1.2),
    SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, frequency_penalty=0.1, presence_penalty=0.05),
], ids=["repetition", "frequency-presence"])
def test_rows_after_drafts_see_them_as_output(tiny, params):
    """Penalties count the drafts before a row, and min_tokens holds stop ids back by them: the
    tokens equal decoding without drafts."""
    spec, plain = _llm(tiny, spec=True), _llm(tiny, spec=False)
    prompts = _repetitive_prompts(5, seed=9)
    got = [o.outputs[0] for o in spec.generate(prompts, params)]
    want = [o.outputs[0] for o in plain.generate(prompts, params)]
    assert [(c.token_ids, c.finish_reason) for c in got] == [(c.token_ids, c.finish_reason) for c in want]
    assert _accepted(spec) > 0
    _no_leaks(spec)


def test_min_tokens_counts_the_drafts_before_a_row(tiny):
    """Each prompt's commonest output token is a stop id held back for a few tokens: a row after
    drafts that crosses min_tokens may stop, one before it may not, as without drafts."""
    import collections

    spec, plain = _llm(tiny, spec=True), _llm(tiny, spec=False)
    prompts = _repetitive_prompts(8, seed=9) * 3
    free = plain.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    params = []
    for i, out in enumerate(free):
        common = collections.Counter(out.outputs[0].token_ids).most_common(1)[0][0]
        params.append(SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, min_tokens=3 + i % 8,
                                     stop_token_ids=(common,)))
    got = [o.outputs[0] for o in spec.generate(prompts, params)]
    want = [o.outputs[0] for o in plain.generate(prompts, params)]
    assert [(c.token_ids, c.finish_reason, c.stop_reason) for c in got] == \
           [(c.token_ids, c.finish_reason, c.stop_reason) for c in want]
    assert sum(c.finish_reason == "stop" for c in got) >= 12 and _accepted(spec) > 0
    _no_leaks(spec)


def test_stop_strings_end_where_they_would_without_drafts(tiny):
    """A stop string met at an accepted draft drops the drafts after it, with their tokens."""
    spec, plain = _llm(tiny, spec=True), _llm(tiny, spec=False)
    prompts = _repetitive_prompts(6, seed=13)
    free = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    stops = []
    for out in plain.generate(prompts, free):
        text = out.outputs[0].text
        stops.append(text[len(text) // 2 : len(text) // 2 + 2] or "x")
    for include, min_tokens in ((False, 0), (True, 0), (False, 9)):  # min_tokens: a stop string before it is passed over
        params = [SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop=(s,), min_tokens=min_tokens,
                                 include_stop_str_in_output=include) for s in stops]
        got = [o.outputs[0] for o in spec.generate(prompts, params)]
        want = [o.outputs[0] for o in plain.generate(prompts, params)]
        assert [(c.text, c.token_ids, c.finish_reason, c.stop_reason) for c in got] == \
               [(c.text, c.token_ids, c.finish_reason, c.stop_reason) for c in want]
        assert sum(c.finish_reason == "stop" for c in got) >= 4
    assert _accepted(spec) > 0
    _no_leaks(spec)


def test_preemption_chunked_prefill_and_the_prefix_cache_with_drafts(tiny):
    """A pool so small that sequences are preempted, prompts chunked and drafts often dropped:
    every output equals the one decoded alone without drafts. Then, with room, a second pass
    starts from the blocks the first named (drafted ones included) and gives the same tokens."""
    prompts = _repetitive_prompts(10, seed=21)
    params = [SamplingParams(temperature=0.0, max_tokens=6 + i % 7 * 3, ignore_eos=True) for i in range(10)]
    alone = _llm(tiny, spec=False)
    want = [alone.generate([p], sp)[0].outputs[0].token_ids for p, sp in zip(prompts, params)]
    tight = _llm(tiny, spec=True, num_kv_blocks=36, max_num_batched_tokens=20, max_num_seqs=6)
    assert [o.outputs[0].token_ids for o in tight.generate(prompts, params)] == want
    _no_leaks(tight)
    assert tight.engine.stats().num_preemptions > 0 and _accepted(tight) > 0
    roomy = _llm(tiny, spec=True)
    first = roomy.generate(prompts, params)
    # the outputs as prompts: their blocks were filled by accepted drafts
    again = roomy.generate([p + o.outputs[0].token_ids for p, o in zip(prompts, first)],
                           SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    cached = [o.num_cached_tokens for o in again]
    assert all(c >= len(p) // 4 * 4 for c, p in zip(cached, prompts))
    assert sum(cached) > sum(len(p) // 4 * 4 for p in prompts) + 40  # blocks of the outputs too
    assert [o.outputs[0].token_ids for o in again] == [
        alone.generate([p + o.outputs[0].token_ids], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))[0]
        .outputs[0].token_ids for p, o in zip(prompts, first)]
    _no_leaks(roomy)


def test_sampling_with_drafts_keeps_the_distribution(tiny):
    """Over many requests, the tokens at each output position are distributed as without drafts
    (seeded engines: the check is deterministic). Accepting every draft would not pass it."""
    import collections

    prompts = _repetitive_prompts(1, seed=5) * 400
    params = SamplingParams(temperature=1.0, top_k=3, max_tokens=6, ignore_eos=True)
    spec = _llm(tiny, spec=True, max_num_seqs=200, num_kv_blocks=512)
    plain = _llm(tiny, spec=False, max_num_seqs=200, num_kv_blocks=512, seed=1)
    got = [o.outputs[0].token_ids for o in spec.generate(prompts, params)]
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, params)]
    assert _accepted(spec) > 50
    for pos in range(6):
        a, b = collections.Counter(t[pos] for t in got), collections.Counter(t[pos] for t in want)
        distance = sum(abs(a[k] - b[k]) for k in a.keys() | b.keys()) / (2 * len(prompts))
        # two seeded runs without drafts differ by up to ~0.1 at 400 requests
        assert distance < 0.15, (pos, a.most_common(4), b.most_common(4))
    _no_leaks(spec)


def test_n_samples_and_a_grammar_row_share_a_step_with_drafted_rows(tiny_llama):
    from engine.structured_output import StructuredOutput

    tiny = tiny_llama  # a grammar needs an EOS in the vocabulary: the tiny GPT-2's is not
    llm = _llm(tiny, spec=True)
    prompts = _repetitive_prompts(3, seed=2)
    sampled = SamplingParams(n=3, temperature=1.0, top_k=2, max_tokens=16, ignore_eos=True, seed=4)
    grammar = SamplingParams(temperature=0.0, max_tokens=16, structured=StructuredOutput.regex("[ab]{4}"))
    outs = llm.generate(prompts + prompts[:1], [sampled] * 3 + [grammar])
    for out in outs[:3]:
        assert len(out.outputs) == 3 and all(len(c.token_ids) == 16 for c in out.outputs)
    import re

    assert re.fullmatch("[ab]{4}", outs[3].outputs[0].text)
    assert _accepted(llm) > 0
    _no_leaks(llm)


def test_served_with_drafts_streams_the_same_tokens_and_counts_them(tiny_llama):
    """Over HTTP: a streamed completion (several tokens per step) reassembles to the non-streamed
    one and to decoding without drafts; /metrics counts drafts and accepted ones as vLLM does."""
    import httpx
    import openai

    from engine.config import CacheConfig
    from engine.engine import LLMEngine
    from engine.speculative import SpeculativeConfig
    from tests.server_helpers import metric_value, serve

    engine = LLMEngine.from_config(EngineConfig(
        model=str(tiny_llama), cache=CacheConfig(block_size=4, num_blocks=64),
        speculative=SpeculativeConfig(num_speculative_tokens=4, prompt_lookup_min=1)))
    prompt = "abcabcabcab"
    want = _llm(tiny_llama, spec=False).generate([prompt], SamplingParams(temperature=0.0, max_tokens=30,
                                                                           ignore_eos=True))[0].outputs[0]
    with serve({engine.info.name: engine}) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        name = engine.info.name
        args = dict(model=name, prompt=prompt, max_tokens=30, temperature=0, extra_body={"ignore_eos": True})
        whole = client.completions.create(**args)
        chunks = [c.choices[0].text for c in client.completions.create(stream=True, **args)]
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert whole.choices[0].text == "".join(chunks) == want.text and whole.usage.completion_tokens == 30
    drafts = metric_value(metrics, "kvserve:spec_decode_num_draft_tokens_total", model_name=name)
    accepted = metric_value(metrics, "kvserve:spec_decode_num_accepted_tokens_total", model_name=name)
    assert 0 < accepted <= drafts and accepted == engine.stats().num_accepted_tokens
    assert metric_value(metrics, "kvserve:generation_tokens_total", model_name=name) == 60
    assert engine.block_manager.num_free_blocks == 64

"""TranslationEngine vs transformers generate() (greedy, beams) on tiny Marian / T5 folders;
continuous batching with preemption; beams sharing blocks; streaming deltas; errors."""
from __future__ import annotations

import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

from engine.config import CacheConfig, EngineConfig, SchedulerConfig  # noqa: E402
from engine.errors import InvalidRequestError, PromptTooLongError  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from engine.translation_engine import TranslationEngine  # noqa: E402
from engine.translation_request import TranslationRequest  # noqa: E402
from tests.encdec_fixtures import (  # noqa: E402
    hf_generate, make_marian_folder, make_t5_folder, reversal_inputs, train_reversal,
)

MAX_NEW = 12


def _engine(folder, num_blocks: int = 400, block_size: int = 4, max_tokens: int = 512,
            max_seqs: int = 64) -> TranslationEngine:
    return TranslationEngine.from_config(EngineConfig(
        model=str(folder), cache=CacheConfig(block_size=block_size, num_blocks=num_blocks),
        scheduler=SchedulerConfig(max_num_batched_tokens=max_tokens, max_num_seqs=max_seqs),
    ))


@pytest.fixture(scope="module")
def marian(tmp_path_factory):
    # trained briefly on the reversal task so outputs depend on the input and stop with eos early
    return train_reversal(make_marian_folder(tmp_path_factory.mktemp("marian") / "tiny-marian"), steps=100)


@pytest.fixture(scope="module", params=["marian", "t5-v1.0", "t5-v1.1"])
def model(request, tmp_path_factory, marian):
    if request.param == "marian":
        return request.param, marian
    gated = request.param == "t5-v1.1"  # v1.1: gated-GELU, untied head
    return request.param, make_t5_folder(tmp_path_factory.mktemp("t5") / request.param, gated=gated, tie=not gated)


def _hf(folder):
    from transformers import AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM.from_pretrained(folder).eval()


def _sources(engine: TranslationEngine) -> list[list[int]]:
    eos = engine.eos_token_ids[0]
    texts = ["the quick brown fox", "kamira tosune lope di ba", "a red house on the river!", "city"]
    return [engine.tokenizer.encode(t) for t in texts] + reversal_inputs([3, 6, 5, 8], eos, seed=7)


@pytest.mark.parametrize("beams,screen", [
    (dict(num_beams=1), "0"),
    (dict(num_beams=1), "1"),  # greedy tokens through the bf16 screen (engine/greedy_screen.py)
    (dict(num_beams=1, no_repeat_ngram_size=1), "0"),
    (dict(num_beams=1, no_repeat_ngram_size=1), "1"),  # its bans
    (dict(num_beams=4), "0"),
    (dict(num_beams=4, length_penalty=0.6, early_stopping=True, no_repeat_ngram_size=2), "0"),
], ids=["greedy", "greedy-bf16-screen", "greedy-norepeat", "greedy-bf16-screen-norepeat", "beam4",
        "beam4-lp-early-norepeat"])
def test_matches_hf_generate(model, beams, screen, monkeypatch):
    name, folder = model
    if name != "marian" and beams.get("no_repeat_ngram_size"):
        pytest.skip("variant covered on the trained Marian")
    monkeypatch.setenv("KVSERVE_GREEDY_SCREEN", screen)
    engine = _engine(folder)
    assert (engine.runner.model.greedy_screen is not None) == (screen == "1")
    srcs = _sources(engine)
    outs = engine.translate(srcs, engine.default_params(max_tokens=MAX_NEW, **beams))
    expected = hf_generate(_hf(folder), srcs, engine.eos_token_ids[0], MAX_NEW, **beams)
    got = [o.outputs[0].token_ids for o in outs]
    assert got == expected
    assert len({tuple(g) for g in got}) > 1, "input-independent outputs catch nothing"
    for o in outs:
        c = o.outputs[0]
        assert o.finished and c.text == engine.tokenizer.decode([i for i in c.token_ids if i < engine.tokenizer.vocab_size])
        assert c.finish_reason == ("stop" if c.token_ids[-1] in engine.eos_token_ids else "length")
        assert o.num_prompt_tokens == len(o.prompt_token_ids)
    if name == "marian":  # the generation_config.json defaults: pad banned, eos forced at the cap
        assert engine.constraints.banned_ids == (engine.info.pad_token_id,)
        assert sum(len(g) < MAX_NEW for g in got) >= 3, "trained model should stop early with eos"
    assert engine.block_manager.num_free_blocks == engine.num_blocks


def test_defaults_from_generation_config(marian):
    engine = _engine(marian)
    params = engine.default_params()
    assert params.num_beams == 4 and params.max_tokens == 63 and params.is_greedy  # Marian: beams 4, max_length 64
    assert engine.default_params(temperature=0.8).num_beams == 1  # asking for sampling turns beams off


def test_continuous_batching_with_preemption_equals_alone(marian):
    """18 requests (greedy, 2 and 4 beams) arriving over time in a pool small enough to preempt:
    each gets the tokens it gets alone, beams share blocks, and every block is free at the end."""
    engine = _engine(marian, num_blocks=36, block_size=4, max_tokens=48, max_seqs=24)
    eos = engine.eos_token_ids[0]
    srcs = reversal_inputs([2, 7, 4, 9, 3, 6, 8, 5, 2, 9, 7, 3, 6, 4, 8, 5, 9, 2], eos, seed=11)
    params = [engine.default_params(num_beams=(1, 2, 4)[i % 3], max_tokens=10) for i in range(len(srcs))]
    alone = [engine.translate([s], p)[0].outputs[0].token_ids for s, p in zip(srcs, params)]
    assert engine.scheduler.num_preemptions == 0

    done: dict[str, list[int]] = {}
    shared_seen = False
    arrivals = {0: range(0, 6), 2: range(6, 12), 3: range(12, 18)}
    step = 0
    while step in arrivals or engine.has_unfinished_requests():
        for i in arrivals.get(step, ()):
            engine.add_request(f"r{i}", TranslationRequest(srcs[i], params[i]))
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        bm = engine.block_manager
        bm.check_integrity()
        shared_seen |= any(bm.ref_count(b) > 1 for b in range(bm.num_blocks))
        step += 1
    assert [done[f"r{i}"] for i in range(len(srcs))] == alone
    assert engine.scheduler.num_preemptions > 0, "pool too large to exercise preemption"
    assert shared_seen, "beams never shared a block"
    assert engine.block_manager.num_free_blocks == engine.num_blocks
    stats = engine.stats()
    assert stats.kv_cache_usage == 0.0 and stats.num_running == stats.num_waiting == 0


def test_streaming_deltas_and_abort(marian):
    engine = _engine(marian)
    src = engine.tokenizer.encode("kamira tosune lope di ba the quick brown fox")
    engine.add_request("s", TranslationRequest(src, engine.default_params(num_beams=1, max_tokens=20), stream=True))
    engine.add_request("b", TranslationRequest(src, engine.default_params(num_beams=3, max_tokens=20), stream=True))
    engine.add_request("q", TranslationRequest(src, engine.default_params(num_beams=1, max_tokens=20)))
    pieces, tokens, beam_outputs, quiet = [], 0, [], []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == "s":
                pieces.append(out.outputs[0].new_text)
                tokens += out.outputs[0].num_new_tokens
                final = out
            elif out.request_id == "q":
                quiet.append(out)
            else:
                beam_outputs.append(out)
    assert "".join(pieces) == final.outputs[0].text and tokens == len(final.outputs[0].token_ids) > 1
    assert len(pieces) == tokens  # one output per decode step
    # not streamed: one output, finished, with the same text and tokens
    assert [o.finished for o in quiet] == [True]
    assert quiet[0].outputs[0].text == final.outputs[0].text and quiet[0].outputs[0].new_text == final.outputs[0].text
    assert quiet[0].outputs[0].token_ids == final.outputs[0].token_ids
    assert [o.finished for o in beam_outputs] == [True]  # beams report once, when search ends
    assert beam_outputs[0].outputs[0].num_new_tokens == len(beam_outputs[0].outputs[0].token_ids)

    engine.add_request("a", TranslationRequest(src, engine.default_params(num_beams=4, max_tokens=20)))
    engine.step()
    engine.step()
    assert engine.block_manager.num_free_blocks < engine.num_blocks
    engine.abort_request("a")
    assert engine.block_manager.num_free_blocks == engine.num_blocks
    (out,) = engine.step()
    assert out.finished and out.outputs[0].finish_reason == "abort" and not engine.has_unfinished_requests()

    # an aborted request that does not stream still reports the text of what it generated
    engine.add_request("g", TranslationRequest(src, engine.default_params(num_beams=1, max_tokens=20)))
    assert engine.step() == [] and engine.step() == []
    engine.abort_request("g")
    (out,) = engine.step()
    ids = out.outputs[0].token_ids
    assert out.outputs[0].finish_reason == "abort" and len(ids) == 2
    assert out.outputs[0].text == engine.tokenizer.decode([i for i in ids if i < engine.tokenizer.vocab_size])


def test_seeded_sampling_is_reproducible(marian):
    engine = _engine(marian)
    srcs = reversal_inputs([6, 6, 6], engine.eos_token_ids[0], seed=3)
    params = engine.default_params(temperature=1.5, seed=5, max_tokens=10)
    a = [o.outputs[0].token_ids for o in engine.translate(srcs, params)]
    b = [o.outputs[0].token_ids for o in engine.translate(srcs[:1], params)]
    assert a[0] == b[0]
    greedy = engine.translate(srcs[:1], engine.default_params(num_beams=1, max_tokens=10))[0].outputs[0].token_ids
    other = [o.outputs[0].token_ids for o in engine.translate(srcs, engine.default_params(temperature=1.5, seed=6,
                                                                                           max_tokens=10))]
    assert a[0] != greedy or other[0] != a[0], "sampling looks greedy"


def test_errors(marian):
    engine = _engine(marian, num_blocks=40)
    ok = engine.default_params(num_beams=1, max_tokens=8)
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.validate(TranslationRequest([], ok))
    with pytest.raises(PromptTooLongError) as err:
        engine.validate(TranslationRequest([5] * 129 + [0], ok))
    assert "128" in err.value.message and "130" in err.value.message and err.value.param == "input"
    with pytest.raises(InvalidRequestError) as err:
        engine.validate(TranslationRequest([5, 0], engine.default_params(num_beams=4, temperature=0.7)))
    assert err.value.param == "num_beams"
    with pytest.raises(InvalidRequestError):
        SamplingParams(num_beams=0)
    with pytest.raises(InvalidRequestError, match="n must be 1"):
        engine.validate(TranslationRequest([5, 0], SamplingParams(n=2, temperature=0.0)))
    with pytest.raises(InvalidRequestError):
        engine.validate(TranslationRequest([5, 10**6, 0], ok))
    with pytest.raises(PromptTooLongError, match="KV cache") as err:  # 4 beams x 100 tokens > 40 blocks
        engine.validate(TranslationRequest([5, 0], engine.default_params(num_beams=4, max_tokens=100)))
    assert err.value.param == "max_tokens"
    # an unset max_tokens shrinks to what fits the pool instead
    engine.validate(TranslationRequest([5, 0], SamplingParams(num_beams=4, temperature=0.0, max_tokens=None)))
    assert not engine.has_unfinished_requests()

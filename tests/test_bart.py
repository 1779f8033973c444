"""BART (bart-large-cnn's architecture) vs transformers: a tiny model with a byte-level BPE tokenizer.json.
Encoder states and decoder logits (post-LN blocks, learned positions, embedding norm, logits bias), the
tokenizer against HF's, greedy and beam summaries with the folder's settings (<s> forced first, </s>
forced last, a minimum length, no repeated trigram, length penalty) equal to HF generate's, and
/v1/summarizations: the model's summarization settings as defaults, T5's `summarize: ` prefix, streaming,
and 400s for models that are not summarizers."""
from __future__ import annotations

import os

import httpx
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

from models.encdec_tokenizer import JsonTokenizer  # noqa: E402
from models.marian import MarianMTModel  # noqa: E402
from tests.encdec_fixtures import (BART_SUMMARIZATION, TEST_TEXTS, decoder_logits, encode_batch,  # noqa: E402
                                   hf_decoder_logits, hf_encoder_states, hf_generate, load_folder, make_bart_folder,
                                   make_marian_folder, make_t5_folder, random_ids, small_engine)
from tests.server_helpers import serve  # noqa: E402

ATOL = 2e-5
MAX_NEW = 12
TEXTS = ["the quick brown fox sat on a mat", "a red house", "city river night, big tree!"]


@pytest.fixture(scope="module")
def bart(tmp_path_factory):
    from transformers import AutoModelForSeq2SeqLM

    folder = make_bart_folder(tmp_path_factory.mktemp("bart") / "tiny-bart")
    return folder, load_folder(MarianMTModel, folder), AutoModelForSeq2SeqLM.from_pretrained(folder).eval()


def _random_seqs(lens: list[int], vocab: int, seed: int) -> list[list[int]]:
    """Ordinary tokens only, past the specials."""
    return random_ids(lens, 5, vocab, seed)


def test_config_is_post_ln_with_learned_positions(bart):
    _, ours, hf = bart
    c = ours.config
    assert not c.pre_norm and c.learned_positions and not c.scale_embedding
    assert ours.model.encoder.layer_norm is None and ours.model.encoder.layernorm_embedding is not None
    assert ours.model.encoder.embed_positions.weight.shape == hf.model.encoder.embed_positions.weight.shape
    assert torch.equal(ours.final_logits_bias, hf.final_logits_bias) and ours.final_logits_bias.abs().sum() > 0


def test_encoder_and_decoder_logits_match_hf(bart):
    _, ours, hf = bart
    c = ours.config
    src = [[0, *s, 2] for s in _random_seqs([5, 11, 1, 30], c.vocab_size, seed=1)]
    assert (encode_batch(ours, src) - hf_encoder_states(hf, src, c.pad_token_id)).abs().max() <= ATOL
    tgt = [[c.decoder_start_token_id, 0] + s for s in _random_seqs([4, 9, 0, 3], c.vocab_size, seed=3)]
    assert (decoder_logits(ours, src, tgt) - hf_decoder_logits(hf, src, tgt, c.pad_token_id)).abs().max() <= ATOL


def test_tokenizer_matches_hf(bart):
    from transformers import AutoTokenizer

    folder, _, _ = bart
    ours, theirs = MarianMTModel.load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    assert type(ours) is JsonTokenizer and not hasattr(ours, "language_codes")
    assert ours.eos_token_ids == (2,) and ours.pad_token_id == 1
    for text in TEST_TEXTS:
        ids = theirs(text)["input_ids"]
        assert ours.encode(text) == ids and ids[0] == 0 and ids[-1] == 2, text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text


def test_engine_reads_the_summarization_settings(bart):
    folder, _, _ = bart
    engine = small_engine(folder)
    assert engine.forced_bos == (0,) and engine.constraints.forced_eos_token_id == 2
    assert engine.constraints.eos_token_ids == (2,)
    p = engine.default_params()
    assert (p.num_beams, p.min_tokens, p.max_tokens, p.no_repeat_ngram_size, p.length_penalty) == (
        BART_SUMMARIZATION["num_beams"], BART_SUMMARIZATION["min_length"] - 1, BART_SUMMARIZATION["max_length"] - 1,
        3, 2.0)
    assert engine.default_params("summarization") == p  # config.json's task settings: the same here
    low = engine.default_params(max_tokens=4)  # under the default minimum: the minimum follows it down
    assert (low.max_tokens, low.min_tokens) == (4, 4)
    assert engine.default_params(max_tokens=30, min_tokens=2).min_tokens == 2


@pytest.mark.parametrize("overrides", [
    dict(num_beams=1),  # greedy: <s> forced, eos banned below the minimum, no repeated trigram
    dict(num_beams=1, min_tokens=0, no_repeat_ngram_size=0),
    dict(),  # the folder's: 4 beams, length penalty 2, early stopping
    dict(num_beams=3, length_penalty=0.5, min_tokens=2),
])
def test_summaries_match_hf_generate(bart, overrides):
    folder, _, hf = bart
    engine = small_engine(folder)
    tok = engine.tokenizer
    srcs = [tok.encode(t) for t in TEXTS] + [[0, *s, 2] for s in _random_seqs([6, 19], hf.config.vocab_size, seed=5)]
    params = engine.default_params(max_tokens=MAX_NEW, **overrides)
    outs = engine.translate(srcs, params)
    hf_kwargs = dict(num_beams=params.num_beams, length_penalty=params.length_penalty,
                     no_repeat_ngram_size=params.no_repeat_ngram_size, min_length=params.min_tokens + 1,
                     early_stopping=params.early_stopping)
    expected = hf_generate(hf, srcs, 2, MAX_NEW, **hf_kwargs)
    got = [o.outputs[0].token_ids for o in outs]
    assert got == expected
    assert all(g[0] == 0 for g in got)  # <s> forced first, as HF's forced_bos_token_id makes it
    assert all(len(g) > params.min_tokens or g[-1] != 2 for g in got)
    if params.min_tokens == 0:  # eos comes early somewhere, so the minimum above is no accident
        assert min(len(g) for g in got) < 8, got
    assert all(o.outputs[0].text == tok.decode(o.outputs[0].token_ids) for o in outs)
    assert engine.block_manager.num_free_blocks == engine.num_blocks


def test_min_tokens_holds_eos_back(bart):
    """A random model ends early somewhere without a minimum; with one, no output ends before it."""
    folder, _, hf = bart
    engine = small_engine(folder)
    srcs = [[0, *s, 2] for s in _random_seqs([3, 5, 8, 2, 9, 4], hf.config.vocab_size, seed=11)]
    free = engine.translate(srcs, engine.default_params(max_tokens=MAX_NEW, num_beams=1, min_tokens=0,
                                                          no_repeat_ngram_size=0))
    lengths = [len(o.outputs[0].token_ids) for o in free]
    assert min(lengths) < 6, lengths  # the check below would not fail otherwise
    held = engine.translate(srcs, engine.default_params(max_tokens=MAX_NEW, num_beams=1, min_tokens=6,
                                                          no_repeat_ngram_size=0))
    assert all(len(o.outputs[0].token_ids) >= 6 for o in held)
    assert engine.block_manager.num_free_blocks == engine.num_blocks


@pytest.fixture(scope="module")
def served(bart, tmp_path_factory):
    """BART, a T5 with task_specific_params.summarization (t5-small's shape of them) and a Marian,
    offline twins of the first two for the expected outputs."""
    import json

    folder, _, _ = bart
    root = tmp_path_factory.mktemp("summarizers")
    t5 = make_t5_folder(root / "t5")
    cfg = json.loads((t5 / "config.json").read_text())
    cfg["task_specific_params"] = {"summarization": {"num_beams": 2, "max_length": 10, "min_length": 4,
                                                     "no_repeat_ngram_size": 3, "prefix": "summarize: "}}
    (t5 / "config.json").write_text(json.dumps(cfg))
    marian = make_marian_folder(root / "marian")
    engines = {"bart": small_engine(folder), "t5": small_engine(t5), "marian": small_engine(marian)}
    with serve(engines) as url:
        yield url, engines, {"bart": small_engine(folder), "t5": small_engine(t5)}
    for engine in engines.values():
        assert engine.block_manager.num_free_blocks == engine.num_blocks


def _post(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/summarizations", json=body, timeout=60)


def test_summarizations_endpoint_uses_the_model_settings(served):
    url, _, offline = served
    r = _post(url, input=[TEXTS[0], TEXTS[2]])  # no model: the first summarizer served, BART
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "summarization" and body["model"] == "bart" and body["id"].startswith("summ-")
    bart = offline["bart"]
    want = bart.translate(TEXTS[:1] + TEXTS[2:], bart.default_params("summarization"))
    assert [d["summary"] for d in body["data"]] == [o.outputs[0].text for o in want]
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert body["usage"]["completion_tokens"] == sum(len(o.outputs[0].token_ids) for o in want)
    assert body["usage"]["prompt_tokens"] == sum(len(bart.tokenizer.encode(t)) for t in TEXTS[:1] + TEXTS[2:])

    t5 = offline["t5"]
    r = _post(url, model="t5", input=TEXTS[1])
    assert r.status_code == 200, r.text
    src = t5.tokenizer.encode("summarize: " + TEXTS[1])
    want_t5 = t5.translate([src], t5.default_params("summarization"))[0].outputs[0]
    assert r.json()["data"][0]["summary"] == want_t5.text
    assert r.json()["usage"]["prompt_tokens"] == len(src)
    p = t5.default_params("summarization")
    assert (p.num_beams, p.max_tokens, p.min_tokens) == (2, 9, 3)  # the task's settings, not the folder's
    assert t5.default_params().num_beams == 1


def test_summarizations_stream_and_overrides(served):
    url, _, offline = served
    bart = offline["bart"]
    body = {"model": "bart", "input": TEXTS[0], "num_beams": 1, "max_tokens": 10, "min_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{url}/v1/summarizations", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    import json

    events = [json.loads(x) for x in lines[:-1]]
    assert all(e["object"] == "summarization.chunk" for e in events)
    want = bart.translate([bart.tokenizer.encode(TEXTS[0])],
                          bart.default_params("summarization", num_beams=1, max_tokens=10, min_tokens=3))[0]
    assert "".join(d["delta"] for e in events for d in e["data"]) == want.outputs[0].text
    assert events[-1]["usage"]["completion_tokens"] == len(want.outputs[0].token_ids)


@pytest.mark.parametrize("body,status,param", [
    ({"model": "marian", "input": "a red house"}, 400, "model"),  # a translator, not a summarizer
    ({"model": "nope", "input": "a red house"}, 404, "model"),
    ({"model": "bart", "input": ["a", "b"], "stream": True}, 400, "stream"),
    ({"model": "bart", "input": "a red house", "min_tokens": 9, "max_tokens": 5}, 400, "min_tokens"),
    ({"model": "bart", "input": "a red house", "min_tokens": -1}, 400, "min_tokens"),
    ({"model": "bart", "input": "   "}, 400, "input"),
])
def test_summarizations_errors(served, body, status, param):
    r = _post(served[0], **body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param, r.text


@pytest.mark.parametrize("num_beams", [1, 4])
def test_multi_token_bad_words_from_generation_config(bart, tmp_path, num_beams):
    """generation_config.json's bad_words_ids with pairs the model writes unconstrained: the outputs
    equal HF generate's from the same folder, and none holds a banned pair."""
    import json
    import shutil

    from transformers import AutoModelForSeq2SeqLM

    folder, _, _ = bart
    free_engine = small_engine(folder)
    srcs = [free_engine.tokenizer.encode(t) for t in TEXTS]
    params = dict(max_tokens=MAX_NEW, num_beams=num_beams, no_repeat_ngram_size=0, min_tokens=0)
    free = [o.outputs[0].token_ids for o in free_engine.translate(srcs, free_engine.default_params(**params))]
    pairs = sorted({tuple(out[i:i + 2]) for out in free for i in (1, 3) if len(out) > i + 1})
    assert pairs
    banned = shutil.copytree(folder, tmp_path / "banned")
    config = json.loads((banned / "generation_config.json").read_text())
    (banned / "generation_config.json").write_text(json.dumps(config | {"bad_words_ids": [list(p) for p in pairs]}))
    engine = small_engine(banned)
    assert engine.constraints.bad_sequences == tuple(pairs)
    p = engine.default_params(**params)
    got = [o.outputs[0].token_ids for o in engine.translate(srcs, p)]
    hf = AutoModelForSeq2SeqLM.from_pretrained(banned).eval()
    assert got == hf_generate(hf, srcs, 2, MAX_NEW, num_beams=num_beams, no_repeat_ngram_size=0, min_length=1,
                              length_penalty=p.length_penalty, early_stopping=p.early_stopping)
    assert got != free
    for out in got:
        assert not any(tuple(out[i:i + 2]) in pairs for i in range(len(out) - 1)), out
    assert engine.block_manager.num_free_blocks == engine.num_blocks

"""M2M100 / NLLB-200 and mBART-50 vs transformers: tiny models with NLLB-style tokenizer.json files. Encoder
states and decoder logits (pre-LN blocks, final norms; fairseq positions, or mBART's learned ones and
embedding norm), greedy and beam translations with the target language forced as the first output token
(HF's forced_bos_token_id), the tokenizer's source layout, and /v1/translations with source_lang /
target_lang."""
from __future__ import annotations

import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

from engine.config import CacheConfig, EngineConfig, SchedulerConfig  # noqa: E402
from engine.errors import InvalidRequestError  # noqa: E402
from engine.translation_engine import TranslationEngine  # noqa: E402
from models.encdec_tokenizer import LanguageCodeTokenizer  # noqa: E402
from models.marian import MarianMTModel, fairseq_positions  # noqa: E402
from tests.encdec_fixtures import (decoder_logits, encode_batch, hf_decoder_logits, hf_encoder_states,  # noqa: E402
                                   hf_generate, language_codes, load_folder, make_nllb_folder)

ATOL = 2e-5
MAX_NEW = 10


@pytest.fixture(scope="module", params=["nllb", "mbart"])
def nllb(request, tmp_path_factory):
    from transformers import AutoModelForSeq2SeqLM

    folder = make_nllb_folder(tmp_path_factory.mktemp(request.param) / f"tiny-{request.param}", family=request.param)
    return folder, load_folder(MarianMTModel, folder), AutoModelForSeq2SeqLM.from_pretrained(folder).eval()


def _codes(folder) -> tuple[str, str, str]:
    return language_codes("mbart" if "mbart" in str(folder) else "nllb")


def _random_seqs(lens: list[int], vocab: int, seed: int) -> list[list[int]]:
    """Ordinary tokens only (ids 4 and up): HF gives a pad token inside a sequence a zero position."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (n,), generator=g).tolist() for n in lens]


def test_fairseq_positions_match_hf_table():
    from transformers.models.m2m_100.modeling_m2m_100 import M2M100SinusoidalPositionalEmbedding

    for dim in (32, 33):
        table = M2M100SinusoidalPositionalEmbedding.get_embedding(300 + 2, dim, padding_idx=1)
        assert torch.equal(fairseq_positions(torch.arange(300), dim, padding_idx=1), table[2:])


def test_encoder_and_decoder_logits_match_hf(nllb):
    _, ours, hf = nllb
    c = ours.config
    assert c.pre_norm and ours.model.encoder.layer_norm is not None
    assert c.learned_positions == ("mbart" in hf.config.model_type)
    src = _random_seqs([5, 11, 1, 8], c.vocab_size, seed=1)
    assert (encode_batch(ours, src) - hf_encoder_states(hf, src, c.pad_token_id)).abs().max() <= ATOL
    tgt = [[c.decoder_start_token_id] + s for s in _random_seqs([4, 9, 1, 3], c.vocab_size, seed=3)]
    assert (decoder_logits(ours, src, tgt) - hf_decoder_logits(hf, src, tgt, c.pad_token_id)).abs().max() <= ATOL


def test_tokenizer_source_layout(nllb):
    folder, _, _ = nllb
    tok = MarianMTModel.load_tokenizer(folder)
    eng, fra, deu = _codes(folder)
    assert isinstance(tok, LanguageCodeTokenizer) and set(tok.language_codes) == {eng, fra, deu}
    text = " ".join(tok.id_to_token(i) for i in (4, 9, 30, 7))  # words of the vocabulary
    words = tok.encode(text, add_special_tokens=False)
    assert words == [4, 9, 30, 7] and tok.encode(text) == [tok.language_codes[eng], *words, 2]  # saved default
    assert tok.encode_source(text, fra) == [tok.language_codes[fra], *words, 2]
    assert tok.encode_source(text, None) == tok.encode(text)
    assert tok.decode([tok.language_codes[deu], *words, 2]) == text  # codes are special: skipped


def _engine(folder) -> TranslationEngine:
    return TranslationEngine.from_config(EngineConfig(
        model=str(folder), cache=CacheConfig(block_size=4, num_blocks=300),
        scheduler=SchedulerConfig(max_num_batched_tokens=256, max_num_seqs=32),
    ))


@pytest.mark.parametrize("beams", [dict(num_beams=1), dict(num_beams=3), dict(num_beams=3, length_penalty=0.5)])
def test_forced_target_language_matches_hf_generate(nllb, beams):
    folder, _, hf = nllb
    engine = _engine(folder)
    tok = engine.tokenizer
    eng, fra, deu = _codes(folder)
    srcs = [tok.encode_source(t, eng) for t in ("the quick brown fox", "a red house on the river", "city")]
    srcs += [[tok.language_codes[deu], *s, 2] for s in _random_seqs([3, 7], hf.config.vocab_size, seed=5)]
    outputs = {}
    for lang in (fra, deu):
        code = tok.language_codes[lang]
        outs = engine.translate(srcs, engine.default_params(max_tokens=MAX_NEW, **beams), forced_prefix=(code,))
        expected = hf_generate(hf, srcs, 2, MAX_NEW, forced_bos_token_id=code, **beams)
        got = [o.outputs[0].token_ids for o in outs]
        assert got == expected
        assert all(g[0] == code for g in got)  # the forced code is the first output token, as in HF
        assert all(o.outputs[0].text == tok.decode(o.outputs[0].token_ids) for o in outs)
        outputs[lang] = got
    assert outputs[fra] != outputs[deu]  # the forced code steers the rest
    assert engine.block_manager.num_free_blocks == engine.num_blocks


def test_forced_prefix_counts_against_max_tokens(nllb):
    folder, _, _ = nllb
    engine = _engine(folder)
    eng, fra, _ = _codes(folder)
    code = engine.tokenizer.language_codes[fra]
    src = engine.tokenizer.encode_source("city", eng)
    with pytest.raises(InvalidRequestError, match="forced at the start"):
        engine.translate([src], engine.default_params(max_tokens=1), forced_prefix=(code,))
    out = engine.translate([src], engine.default_params(max_tokens=2, num_beams=1), forced_prefix=(code,))[0]
    assert len(out.outputs[0].token_ids) <= 2 and out.outputs[0].token_ids[0] == code
    assert engine.block_manager.num_free_blocks == engine.num_blocks


def test_translations_endpoint_with_language_codes(nllb):
    """source_lang leads the input, target_lang is forced; unknown codes and a missing target_lang
    (the folder's generation_config names no forced_bos_token_id) are 400s naming the field."""
    import httpx

    from tests.server_helpers import serve

    folder, _, _ = nllb
    eng, fra, deu = _codes(folder)
    engine, offline = _engine(folder), _engine(folder)
    tok = offline.tokenizer
    text = " ".join(tok.id_to_token(i) for i in (5, 12, 40))
    with serve({engine.info.name: engine}) as url:
        def post(**body) -> httpx.Response:
            return httpx.post(f"{url}/v1/translations", json={"model": engine.info.name} | body, timeout=60)

        r = post(input=[text, text], source_lang=deu, target_lang=fra, num_beams=1, max_tokens=8)
        assert r.status_code == 200, r.text
        want = offline.translate([tok.encode_source(text, deu)], offline.default_params(num_beams=1, max_tokens=8),
                                 forced_prefix=(tok.language_codes[fra],))[0].outputs[0]
        assert [d["translation"] for d in r.json()["data"]] == [want.text, want.text]
        assert r.json()["usage"]["completion_tokens"] == 2 * len(want.token_ids)
        for body, param in [({"target_lang": "xxx_Yyyy"}, "target_lang"), ({"source_lang": "fr"}, "source_lang"),
                            ({}, "target_lang"), ({"target_lang": fra, "max_tokens": 1}, "max_tokens")]:
            r = post(input=text, **body)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    assert engine.block_manager.num_free_blocks == engine.num_blocks

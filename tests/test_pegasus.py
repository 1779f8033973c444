"""Pegasus (pegasus-xsum's architecture) vs transformers: a tiny model with HF's own PegasusTokenizer saved as
tokenizer.json. Encoder states and decoder logits (pre-LN blocks, Marian's sinusoids, scaled embeddings, a
logits bias, decoding from <pad>), the tokenizer against HF's, greedy and beam summaries with the folder's
settings (xsum's length penalty, </s> forced at the limit) equal to HF generate's, and /v1/summarizations
serving it as a summarizer with no task settings in its config.json."""
from __future__ import annotations

import os

import httpx
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

from models.encdec_tokenizer import JsonTokenizer  # noqa: E402
from models.marian import MarianMTModel  # noqa: E402
from tests.encdec_fixtures import (PEGASUS_GENERATION, TEST_TEXTS, decoder_logits, encode_batch,  # noqa: E402
                                   hf_decoder_logits, hf_encoder_states, hf_generate, load_folder,
                                   make_pegasus_folder, random_ids, small_engine)
from tests.server_helpers import serve  # noqa: E402

ATOL = 2e-5
MAX_NEW = 12
TEXTS = ["the quick brown fox sat on a mat", "a red house", "city river night, big tree!"]
FIRST_PIECE = 106  # past <pad>, </s>, the two masks, <unk_2..102> and <unk>


@pytest.fixture(scope="module")
def pegasus(tmp_path_factory):
    from transformers import AutoModelForSeq2SeqLM

    folder = make_pegasus_folder(tmp_path_factory.mktemp("pegasus") / "tiny-pegasus")
    return folder, load_folder(MarianMTModel, folder), AutoModelForSeq2SeqLM.from_pretrained(folder).eval()


def _random_seqs(lens: list[int], vocab: int, seed: int) -> list[list[int]]:
    """Ordinary tokens only, past the specials."""
    return random_ids(lens, FIRST_PIECE, vocab, seed)


def test_config_is_pre_ln_with_marian_sinusoids(pegasus):
    _, ours, hf = pegasus
    c = ours.config
    assert c.pre_norm and c.positions == "sinusoidal" and c.scale_embedding
    assert ours.model.encoder.layer_norm is not None and ours.model.decoder.layer_norm is not None
    assert ours.model.encoder.embed_positions is None  # computed, not loaded
    assert c.decoder_start_token_id == c.pad_token_id == 0 and c.eos_token_id == 1
    assert torch.equal(ours.final_logits_bias, hf.final_logits_bias) and ours.final_logits_bias.abs().sum() > 0


def test_encoder_and_decoder_logits_match_hf(pegasus):
    _, ours, hf = pegasus
    c = ours.config
    src = [[*s, 1] for s in _random_seqs([5, 11, 1, 30], c.vocab_size, seed=1)]
    assert (encode_batch(ours, src) - hf_encoder_states(hf, src, c.pad_token_id)).abs().max() <= ATOL
    tgt = [[0] + s for s in _random_seqs([4, 9, 0, 3], c.vocab_size, seed=3)]
    assert (decoder_logits(ours, src, tgt) - hf_decoder_logits(hf, src, tgt, c.pad_token_id)).abs().max() <= ATOL


def test_tokenizer_matches_hf(pegasus):
    from transformers import AutoTokenizer

    folder, _, _ = pegasus
    ours, theirs = MarianMTModel.load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    assert type(ours) is JsonTokenizer and ours.eos_token_ids == (1,) and ours.pad_token_id == 0
    for text in TEST_TEXTS + ["<mask_1> the <unk_7> cat"]:
        ids = theirs(text)["input_ids"]
        assert ours.encode(text) == ids and ids[-1] == 1, text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text


def test_a_folder_with_only_spiece_model_is_refused(pegasus, tmp_path):
    import shutil

    folder = shutil.copytree(pegasus[0], tmp_path / "spm-only")
    (folder / "tokenizer.json").unlink()
    (folder / "spiece.model").write_bytes(b"")
    with pytest.raises(ValueError, match="tokenizer.json"):
        MarianMTModel.load_tokenizer(folder)


@pytest.mark.parametrize("overrides", [
    dict(num_beams=1),
    dict(),  # the folder's: 4 beams, length penalty 0.6
    dict(num_beams=2, length_penalty=1.5, min_tokens=3),
])
def test_summaries_match_hf_generate(pegasus, overrides):
    folder, _, hf = pegasus
    engine = small_engine(folder)
    tok = engine.tokenizer
    srcs = [tok.encode(t) for t in TEXTS] + [[*s, 1] for s in _random_seqs([6, 19], hf.config.vocab_size, seed=5)]
    params = engine.default_params("summarization", max_tokens=MAX_NEW, **overrides)
    outs = engine.translate(srcs, params)
    expected = hf_generate(hf, srcs, 1, MAX_NEW, num_beams=params.num_beams, length_penalty=params.length_penalty,
                           min_length=params.min_tokens + 1)
    got = [o.outputs[0].token_ids for o in outs]
    assert got == expected
    if not params.min_tokens:  # some end on their own, so </s> handling is exercised
        assert min(len(g) for g in got) < MAX_NEW
    assert all(o.outputs[0].text == tok.decode(o.outputs[0].token_ids) for o in outs)
    assert engine.block_manager.num_free_blocks == engine.num_blocks


def test_defaults_are_the_folders(pegasus):
    folder, _, _ = pegasus
    engine = small_engine(folder)
    p = engine.default_params("summarization")
    assert (p.num_beams, p.length_penalty, p.max_tokens) == (
        PEGASUS_GENERATION["num_beams"], PEGASUS_GENERATION["length_penalty"], PEGASUS_GENERATION["max_length"] - 1)
    assert engine.constraints.forced_eos_token_id == 1 and engine.forced_bos == ()


def test_summarizations_endpoint_serves_pegasus(pegasus):
    folder, _, _ = pegasus
    offline = small_engine(folder)
    engines = {"pegasus": small_engine(folder)}
    with serve(engines) as url:
        r = httpx.post(f"{url}/v1/summarizations", json={"input": TEXTS}, timeout=60)  # no model: Pegasus
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "pegasus" and body["object"] == "summarization"
        want = offline.translate([offline.tokenizer.encode(t) for t in TEXTS], offline.default_params("summarization"))
        assert [d["summary"] for d in body["data"]] == [o.outputs[0].text for o in want]
        assert body["usage"]["completion_tokens"] == sum(len(o.outputs[0].token_ids) for o in want)
    assert engines["pegasus"].block_manager.num_free_blocks == engines["pegasus"].num_blocks

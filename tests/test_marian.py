"""MarianMT vs transformers (fp32): encoder, teacher-forced decoder logits, tokenizer, greedy decode."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

from models.encdec_tokenizer import MarianTokenizer
from models.marian import MarianMTModel, sinusoidal_positions
from tests.encdec_fixtures import (
    TEST_TEXTS, decoder_logits, encode_batch, greedy_decode, hf_decoder_logits, hf_encoder_states, load_folder,
    make_marian_folder, padded,
    reversal_inputs, train_reversal,
)

os.environ["HF_HUB_OFFLINE"] = "1"
ATOL = 1e-4


@pytest.fixture(
    scope="module",
    params=[(True, True, False), (False, True, False), (False, False, False), (True, True, True)],
    ids=["shared", "separate", "untied", "shared-trained"],
)
def marian(request, tmp_path_factory):
    from transformers import MarianMTModel as HFMarian

    share, tie, trained = request.param
    folder = make_marian_folder(tmp_path_factory.mktemp("marian"), share_embeddings=share, tie=tie)
    if trained:
        train_reversal(folder)
    return folder, load_folder(MarianMTModel, folder), HFMarian.from_pretrained(folder).eval()


def _random_seqs(lens: list[int], vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab - 1, (n,), generator=g).tolist() + [0] for n in lens]


def _task_inputs(seed: int) -> list[list[int]]:
    """Sources of the reversal task the trained fixture learnt (eos = 0)."""
    return reversal_inputs((3, 6, 5), 0, seed)


def test_sinusoid_matches_hf_table():
    from transformers.models.marian.modeling_marian import MarianSinusoidalPositionalEmbedding

    for dim in (32, 33):
        table = MarianSinusoidalPositionalEmbedding(300, dim).create_weight()
        ours = sinusoidal_positions(torch.arange(300), dim).float()
        assert torch.allclose(ours, table, atol=1e-6)


def test_encoder_matches_hf(marian):
    _, ours, hf = marian
    src = _random_seqs([5, 11, 1, 8], ours.config.vocab_size, seed=1)
    expected = hf_encoder_states(hf, src, ours.config.pad_token_id)
    got = encode_batch(ours, src)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= ATOL


def test_decoder_logits_match_hf(marian):
    _, ours, hf = marian
    vocab = ours.config.vocab_size
    src = _random_seqs([6, 12, 3], vocab, seed=2)
    tgt = [[ours.config.decoder_start_token_id] + s[:-1] for s in _random_seqs([4, 9, 1], vocab, seed=3)]
    expected = hf_decoder_logits(hf, src, tgt, ours.config.pad_token_id)
    got = decoder_logits(ours, src, tgt)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert (got - expected).abs().max() <= ATOL


def test_tokenizer_matches_hf(marian):
    from transformers import MarianTokenizer as HFMarianTokenizer

    folder, _, _ = marian
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "pip install sacremoses"
        hf = HFMarianTokenizer.from_pretrained(folder)
    ours = MarianMTModel.load_tokenizer(folder)
    assert isinstance(ours, MarianTokenizer)
    assert ours.vocab_size == hf.vocab_size and ours.eos_token_ids == (hf.eos_token_id,)
    assert ours.pad_token_id == hf.pad_token_id
    for text in TEST_TEXTS:
        ids = ours.encode(text)
        assert ids == hf.encode(text), text
        assert ours.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), text
    g = torch.Generator().manual_seed(0)
    for _ in range(5):  # arbitrary model outputs, specials included
        ids = torch.randint(0, hf.vocab_size, (12,), generator=g).tolist()
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert [ours.id_to_token(i) for i in range(hf.vocab_size)] == hf.convert_ids_to_tokens(list(range(hf.vocab_size)))


def test_extra_info_reads_generation_config(marian):
    import json

    folder, ours, _ = marian
    info = MarianMTModel.extra_info(folder, json.loads((folder / "config.json").read_text()))
    pad = ours.config.pad_token_id
    assert info["decoder_start_token_id"] == pad and info["pad_token_id"] == pad
    assert info["eos_token_ids"] == (0,) and info["max_model_len"] == 128
    assert info["generation_defaults"]["num_beams"] == 4
    assert info["generation_defaults"]["bad_words_ids"] == [[pad]]
    assert ours.kv_cache_spec.num_layers == 2 and ours.kv_cache_spec.head_dim == 8


def test_greedy_matches_hf_generate(marian, request):
    folder, ours, hf = marian
    tok = MarianMTModel.load_tokenizer(folder)
    texts = ["the quick brown fox", "kamira tosune lope di ba", "a red house on the river!", "city"]
    src = [tok.encode(t) for t in texts] + _task_inputs(seed=7)
    pad = ours.config.pad_token_id
    max_new = 12
    got = greedy_decode(ours, src, start_id=pad, eos_id=0, max_new_tokens=max_new, bad_ids=(pad,))
    ids, mask = padded(src, pad)
    with torch.no_grad():
        expected = hf.generate(
            input_ids=ids, attention_mask=mask, num_beams=1, do_sample=False, max_new_tokens=max_new,
            bad_words_ids=[[pad]], forced_eos_token_id=None,
        )
    for row, ours_ids in zip(expected.tolist(), got):
        row = row[1:]  # drop decoder start
        row = row[: row.index(0) + 1] if 0 in row else row
        assert ours_ids == row
    assert len({tuple(g) for g in got}) > 1, "random model gave input-independent output"
    if request.node.callspec.id.endswith("trained"):
        assert sum(g[-1] == 0 for g in got) >= 3, "trained model should stop with eos"


def test_paged_incremental_decode_matches_teacher_forcing(marian):
    from tests.encdec_fixtures import paged_incremental_logits

    _, ours, _ = marian
    vocab = ours.config.vocab_size
    src = _random_seqs([6, 13, 2], vocab, seed=4)
    tgt = [[ours.config.decoder_start_token_id] + s[:-1] for s in _random_seqs([7, 2, 10], vocab, seed=5)]
    expected = decoder_logits(ours, src, tgt)
    got = paged_incremental_logits(ours, src, tgt, chunk=3, block_size=4)
    assert (got - expected).abs().max() <= ATOL


def test_beam_search_matches_hf_generate(marian):
    from tests.encdec_fixtures import beam_search

    folder, ours, hf = marian
    tok = MarianMTModel.load_tokenizer(folder)
    pad = ours.config.pad_token_id
    for src in [tok.encode(t) for t in ["the quick brown fox", "city"]] + _task_inputs(seed=8):
        text = src
        got = beam_search(ours, src, start_id=pad, eos_id=0, num_beams=4, max_new_tokens=10, bad_ids=(pad,))
        with torch.no_grad():
            row = hf.generate(
                input_ids=torch.tensor([src]), num_beams=4, do_sample=False, max_new_tokens=10,
                bad_words_ids=[[pad]], forced_eos_token_id=None, length_penalty=1.0, early_stopping=False,
            )[0].tolist()[1:]
        assert got == (row[: row.index(0) + 1] if 0 in row else row), text

"""T5 (v1.0 ReLU, v1.1 gated-GELU; tied and untied heads) vs transformers (fp32)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from models.encdec_tokenizer import JsonTokenizer, T5Tokenizer
from models.t5 import T5ForConditionalGeneration
from tests.encdec_fixtures import (
    TEST_TEXTS, decoder_logits, encode_batch, greedy_decode, hf_decoder_logits, hf_encoder_states, load_folder,
    make_t5_folder, padded,
    reversal_inputs, train_reversal,
)

os.environ["HF_HUB_OFFLINE"] = "1"
ATOL = 1e-4
T5_TEXTS = TEST_TEXTS + ["the <extra_id_0> dog <extra_id_99>mat", "<extra_id_3><extra_id_1>"]


@pytest.fixture(
    scope="module",
    # training T5 through HF is ~10x slower per step than Marian here; the trained decode-loop
    # coverage (eos, beam finishing) comes from test_marian's trained fixture instead
    params=[(False, True, False), (True, False, False), (True, True, False), (False, False, False)],
    ids=["v1.0-relu-tied", "v1.1-gated-untied", "gated-tied", "relu-untied"],
)
def t5(request, tmp_path_factory):
    from transformers import T5ForConditionalGeneration as HFT5

    gated, tie, trained = request.param
    folder = make_t5_folder(tmp_path_factory.mktemp("t5"), gated=gated, tie=tie)
    if trained:
        train_reversal(folder)
    return folder, load_folder(T5ForConditionalGeneration, folder), HFT5.from_pretrained(folder).eval()


def _random_seqs(lens: list[int], vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() + [1] for n in lens]


def _task_inputs(seed: int) -> list[list[int]]:
    """Sources of the reversal task the trained fixture learnt (eos = 1)."""
    return reversal_inputs((3, 6, 5), 1, seed)


def test_encoder_matches_hf(t5):
    _, ours, hf = t5
    # lengths past max_exact buckets and past max_distance exercise the log buckets
    src = _random_seqs([5, 30, 1, 12], ours.config.vocab_size, seed=1)
    expected = hf_encoder_states(hf, src, 0)
    got = encode_batch(ours, src)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= ATOL


def test_decoder_logits_match_hf(t5):
    _, ours, hf = t5
    vocab = ours.config.vocab_size
    src = _random_seqs([6, 25, 3], vocab, seed=2)
    tgt = [[0] + s[:-1] for s in _random_seqs([4, 27, 1], vocab, seed=3)]
    expected = hf_decoder_logits(hf, src, tgt, 0)
    got = decoder_logits(ours, src, tgt)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert (got - expected).abs().max() <= ATOL


def test_head_config(t5):
    folder, ours, hf = t5
    raw = json.loads((folder / "config.json").read_text())
    assert ours.config.scale_decoder_outputs == hf.config.scale_decoder_outputs == raw["scale_decoder_outputs"]
    info = T5ForConditionalGeneration.extra_info(folder, raw)
    assert info["decoder_start_token_id"] == 0 and info["eos_token_ids"] == (1,) and info["pad_token_id"] == 0
    assert ours.kv_cache_spec.num_layers == 3 and ours.kv_cache_spec.num_kv_heads == 4


def test_untied_head_from_old_style_checkpoint(tmp_path):
    """FLAN-style folder: tie_word_embeddings=False, no scale_decoder_outputs key, lm_head stored."""
    from safetensors.torch import load_file, save_file
    from transformers import T5ForConditionalGeneration as HFT5

    folder = make_t5_folder(tmp_path, gated=True, tie=False)
    raw = json.loads((folder / "config.json").read_text())
    raw.pop("scale_decoder_outputs")
    raw["tie_word_embeddings"] = False
    (folder / "config.json").write_text(json.dumps(raw))
    weights = load_file(folder / "model.safetensors")
    weights["lm_head.weight"] = torch.randn_like(weights["shared.weight"])
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    hf = HFT5.from_pretrained(folder).eval()
    ours = load_folder(T5ForConditionalGeneration, folder)
    assert not ours.config.tie_word_embeddings and not ours.config.scale_decoder_outputs
    src, tgt = [[5, 9, 17, 1], [40, 1]], [[0, 7, 3], [0]]
    assert (decoder_logits(ours, src, tgt) - hf_decoder_logits(hf, src, tgt, 0)).abs().max() <= ATOL


def test_tokenizer_matches_hf(t5, tmp_path):
    from transformers import T5Tokenizer as HFT5Tokenizer

    folder, _, _ = t5
    hf = HFT5Tokenizer.from_pretrained(folder)
    hf.save_pretrained(tmp_path)  # writes tokenizer.json: our tokenizers-library path
    for ours in (T5ForConditionalGeneration.load_tokenizer(folder), T5ForConditionalGeneration.load_tokenizer(tmp_path)):
        assert isinstance(ours, (T5Tokenizer, JsonTokenizer))
        assert ours.vocab_size == len(hf) and ours.eos_token_ids == (1,) and ours.pad_token_id == 0
        for text in T5_TEXTS:
            ids = ours.encode(text)
            assert ids == hf.encode(text), (type(ours), text)
            assert ours.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
        g = torch.Generator().manual_seed(0)
        for _ in range(5):
            ids = torch.randint(0, len(hf), (12,), generator=g).tolist()
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
        assert [ours.id_to_token(i) for i in range(len(hf))] == hf.convert_ids_to_tokens(list(range(len(hf))))
    assert isinstance(T5ForConditionalGeneration.load_tokenizer(folder), T5Tokenizer)
    assert isinstance(T5ForConditionalGeneration.load_tokenizer(tmp_path), JsonTokenizer)


def test_greedy_matches_hf_generate(t5, request):
    folder, ours, hf = t5
    tok = T5ForConditionalGeneration.load_tokenizer(folder)
    src = [tok.encode(t) for t in ["the quick brown fox", "kamira tosune lope di ba", "a red house!", "city"]]
    src += _task_inputs(seed=7)
    got = greedy_decode(ours, src, start_id=0, eos_id=1, max_new_tokens=12)
    ids, mask = padded(src, 0)
    with torch.no_grad():
        expected = hf.generate(
            input_ids=ids, attention_mask=mask, num_beams=1, do_sample=False, max_new_tokens=12,
            use_cache=False,  # HF's DynamicCache sizes itself by num_layers, not num_decoder_layers
        )
    for row, ours_ids in zip(expected.tolist(), got):
        row = row[1:]
        row = row[: row.index(1) + 1] if 1 in row else row
        assert ours_ids == row
    assert len({tuple(g) for g in got}) > 1, "random model gave input-independent output"
    if request.node.callspec.id.endswith("trained"):
        assert sum(g[-1] == 1 for g in got) >= 3, "trained model should stop with eos"


def test_paged_incremental_decode_matches_teacher_forcing(t5):
    from tests.encdec_fixtures import paged_incremental_logits

    _, ours, _ = t5
    vocab = ours.config.vocab_size
    src = _random_seqs([6, 13, 2], vocab, seed=4)
    tgt = [[0] + s[:-1] for s in _random_seqs([7, 2, 24], vocab, seed=5)]  # 24 > max_distance 20
    expected = decoder_logits(ours, src, tgt)
    got = paged_incremental_logits(ours, src, tgt, chunk=3, block_size=4)
    assert (got - expected).abs().max() <= ATOL


def test_beam_search_matches_hf_generate(t5):
    from tests.encdec_fixtures import beam_search

    folder, ours, hf = t5
    tok = T5ForConditionalGeneration.load_tokenizer(folder)
    for src in [tok.encode(t) for t in ["the quick brown fox", "city"]] + _task_inputs(seed=8):
        text = src
        got = beam_search(ours, src, start_id=0, eos_id=1, num_beams=4, max_new_tokens=10)
        with torch.no_grad():
            row = hf.generate(
                input_ids=torch.tensor([src]), num_beams=4, do_sample=False, max_new_tokens=10,
                length_penalty=1.0, early_stopping=False, use_cache=False,
            )[0].tolist()[1:]
        assert got == (row[: row.index(1) + 1] if 1 in row else row), text

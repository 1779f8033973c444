"""The compiled top-k log-prob kernel against its torch reference, and the constraint split it relies on."""
from __future__ import annotations

import pytest
import torch

from engine import top_logprobs as tl
from engine.beam_search import Constraints, DecoderRows

LIB = tl.load()
needs_kernel = pytest.mark.skipif(LIB is None, reason="no C compiler: the reference serves")


def _both(logits: torch.Tensor, k: int, bans: list[list[int]]):
    ref = tl.reference(logits.clone(), k, bans)
    got = tl.top_logprobs(logits.clone(), k, bans)
    return ref, got


@needs_kernel
@pytest.mark.parametrize("rows,vocab,k", [(1, 7, 1), (3, 64, 8), (5, 1000, 16), (17, 58_101, 8), (4, 130, 128)])
def test_kernel_matches_reference(rows: int, vocab: int, k: int) -> None:
    g = torch.Generator().manual_seed(rows * vocab + k)
    logits = torch.randn(rows, vocab, generator=g) * 6
    bans = [[int(t) for t in torch.randint(0, vocab, (r % 4,), generator=g)] for r in range(rows)]
    (ref_v, ref_i), (got_v, got_i) = _both(logits, k, bans)
    assert torch.equal(got_i, ref_i)
    torch.testing.assert_close(got_v, ref_v, rtol=0, atol=2e-6 * float(ref_v.abs().max()))
    for row, banned in enumerate(bans):  # a banned token only fills a slot no finite value could
        picked = dict(zip(got_i[row].tolist(), got_v[row].tolist()))
        assert all(picked[t] == float("-inf") for t in set(banned) & set(picked))


@needs_kernel
def test_bans_count_in_the_normaliser() -> None:
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    values, ids = tl.top_logprobs(logits.clone(), 2, [[0]])
    assert ids.tolist() == [[1, 2]]
    expected = torch.log_softmax(logits, -1)[0, 1:3]  # the banned 3.0 still normalises
    torch.testing.assert_close(values[0], expected)


@needs_kernel
def test_rows_with_fewer_finite_values_than_k_and_a_row_stride() -> None:
    base = torch.full((3, 40), float("-inf"))
    base[:, 5] = 0.0  # a forced row: one finite value
    base[1, 30] = -1.0
    view = base[:, :33]  # rows 40 apart, 33 columns
    values, ids = tl.top_logprobs(view, 4, [[], [], [5]])
    assert ids[0, 0] == 5 and values[0, 0] == 0.0 and torch.isinf(values[0, 1:]).all()
    assert ids[1, :2].tolist() == [5, 30]
    assert torch.isinf(values[2]).all()  # its only finite token banned
    assert sorted(ids[0].tolist()) == sorted(set(ids[0].tolist()))  # k distinct tokens all the same


def test_without_the_kernel_the_reference_serves(monkeypatch) -> None:
    monkeypatch.setattr(tl, "load", lambda: None)
    logits = torch.randn(2, 50)
    expected = torch.log_softmax(logits, -1)
    expected[0, 1] = float("-inf")
    values, ids = tl.top_logprobs(logits.clone(), 3, [[1], []])
    ref_v, ref_i = torch.topk(expected, 3)
    assert torch.equal(values, ref_v) and torch.equal(ids, ref_i)


def test_k_past_the_kernel_list_takes_the_reference() -> None:
    logits = torch.randn(2, 300)
    values, ids = tl.top_logprobs(logits.clone(), tl.MAX_K + 1, [[], []])
    ref_v, ref_i = torch.topk(torch.log_softmax(logits, -1), tl.MAX_K + 1)
    assert torch.equal(values, ref_v) and torch.equal(ids, ref_i)


def test_constraints_split_equals_apply() -> None:
    c = Constraints(banned_ids=(0,), forced_eos_token_id=2, eos_token_ids=(2,))
    ids = [[5, 1, 3, 1], [5, 4, 4], [5, 6]]
    scores = torch.randn(3, 8)
    rows = DecoderRows(ids, [3, 2, 1], [4, 9, 9], [0, 0, 0], [2, 2, 0])
    applied = c.apply(scores.clone(), rows)
    assert c.bans(rows) == [[3, 0], [4, 0], [0]]
    assert c.forced_eos(rows) == [True, False, False]
    assert applied[0].tolist() == [float("-inf")] * 2 + [0.0] + [float("-inf")] * 5
    assert torch.isinf(applied[1, [0, 4]]).all() and torch.isinf(applied[2, 0])
    assert torch.equal(applied[2, 1:], scores[2, 1:])
    short = DecoderRows(ids, [3, 2, 1], [4, 9, 9], [9, 3, 1], [2, 2, 0])  # rows 0 and 1 are under their minimum
    assert c.bans(short) == [[3, 0, 2], [4, 0, 2], [0]]
    assert c.apply(scores.clone(), short)[0].tolist() == applied[0].tolist()  # forced eos beats the minimum


@needs_kernel
def test_argmax_matches_torch_and_leaves_logits_alone() -> None:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 1000, generator=g)
    base[1, [10, 700]] = 50.0  # equal maxima: the first wins, as in torch
    base[2] = float("-inf")
    base[3, 999] = 99.0  # in the tail past the last whole block
    view = base
    before = view.clone()
    assert torch.equal(tl.argmax(view), view.argmax(-1))
    assert torch.equal(view, before)
    narrow = base[:, 3:990]  # a row stride and an unaligned start
    assert torch.equal(tl.argmax(narrow), narrow.argmax(-1))


def test_constraints_top_logprobs_is_the_top_k_of_apply() -> None:
    c = Constraints(banned_ids=(0,), forced_eos_token_id=2, eos_token_ids=(2,))
    ids = [[5, 1, 3, 1], [5, 4, 4], [5, 6]]
    # row 0 is at its limit: eos forced (over its minimum); row 1 is short of its minimum: eos banned
    rows = DecoderRows(ids, [3, 2, 1], [4, 9, 9], [9, 3, 0], [2, 2, 0])
    logits = torch.randn(3, 300, generator=torch.Generator().manual_seed(7))
    ref_v, ref_i = torch.topk(c.apply(torch.log_softmax(logits, -1), rows), 4)
    values, top = c.top_logprobs(logits.clone(), 4, rows)
    assert torch.equal(top[1:], ref_i[1:])
    torch.testing.assert_close(values[1:], ref_v[1:], rtol=0, atol=1e-5)
    assert top[0, 0] == 2 and values[0].tolist() == [0.0] + [float("-inf")] * 3


def test_constraints_argmax_is_the_argmax_of_apply() -> None:
    c = Constraints(banned_ids=(0,), forced_eos_token_id=2, eos_token_ids=(2,))
    ids = [[5, 1, 3, 1], [5, 4, 4], [5, 6]]
    # row 0 is at its limit: eos forced (over its minimum); row 1 is short of its minimum: eos banned
    rows = DecoderRows(ids, [3, 2, 1], [4, 9, 9], [9, 3, 0], [2, 2, 0])
    logits = torch.randn(3, 300, generator=torch.Generator().manual_seed(8))
    logits[1, 4] = logits[2, 0] = 99.0  # the winners the bans (no-repeat, bad words) take away
    logits[1, 2] = 98.0  # and eos, under row 1's minimum
    expected = c.apply(logits.clone(), rows).argmax(-1).tolist()
    got = c.argmax(lambda bans: tl.ban_(logits.clone(), bans).argmax(-1), rows)
    assert got == expected and got[0] == 2 and got[1] not in (2, 4) and got[2] != 0

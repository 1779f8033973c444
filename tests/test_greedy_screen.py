"""The bf16-screened greedy argmax against fp32 logits, and its candidate kernel against its torch reference."""
from __future__ import annotations

import pytest
import torch

from engine import greedy_screen as gs

LIB = gs.load()
needs_kernel = pytest.mark.skipif(LIB is None, reason="no C compiler: the reference serves")


def _head(vocab: int, hidden: int, seed: int, bias: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, hidden, generator=g) * 0.05
    return weight, (torch.randn(vocab, generator=g) if bias else None)


def _near_ties(weight: torch.Tensor, x: torch.Tensor, rows: int, seed: int) -> None:
    """Make each row's best tokens differ by less than bf16 can see: copy the argmax row of the
    weight into a few others, each nudged by ~1e-5 of its scale (in place)."""
    g = torch.Generator().manual_seed(seed)
    best = (x @ weight.T).argmax(dim=1)
    for r in range(rows):
        for j in torch.randint(0, weight.shape[0], (3,), generator=g).tolist():
            if j not in best.tolist():
                weight[j] = weight[best[r]] * (1 + 1e-5 * torch.randn((), generator=g))


@pytest.mark.parametrize("rows,vocab,hidden,bias", [(1, 50, 16, False), (7, 1000, 64, True), (33, 58_101, 512, False)])
def test_screened_argmax_equals_fp32_argmax(rows: int, vocab: int, hidden: int, bias: bool) -> None:
    weight, b = _head(vocab, hidden, seed=rows, bias=bias)
    x = torch.randn(rows, hidden, generator=torch.Generator().manual_seed(rows + 1)) * 3
    _near_ties(weight, x, rows, seed=rows + 2)
    bans = [[int((x[r] @ weight.T).argmax())] if r % 3 == 1 else [] for r in range(rows)]  # ban some winners
    screen = gs.GreedyScreen(weight, b)
    got = screen.argmax(x, bans)
    assert torch.equal(got, gs.reference(x, weight, b, bans))
    assert all(int(got[r]) not in bans[r] for r in range(rows))


@pytest.mark.parametrize("vocab,hidden", [(3000, 64), (2000, 1024)])
def test_the_bound_covers_the_screens_real_error(vocab: int, hidden: int) -> None:
    """Every bf16 logit lies within its bound of the fp32 one, with room to spare (the proof is
    worst-case; real rounding errors partly cancel)."""
    weight, bias = _head(vocab, hidden, seed=hidden, bias=True)
    x = torch.randn(24, hidden, generator=torch.Generator().manual_seed(9)) * 4
    screen = gs.GreedyScreen(weight, bias)
    low = screen._bf16_logits(x).float()
    exact = torch.nn.functional.linear(x, weight)
    bound = (x.norm(dim=1) * screen.coef_scale)[:, None] * screen.norms + gs.REL * low.abs()
    ratio = (low - exact).abs() / bound
    assert float(ratio.max()) < 0.5 and float(ratio.max()) > 1e-3


def test_candidates_hold_the_winner_and_few_others() -> None:
    weight, _ = _head(5000, 256, seed=3)
    x = torch.randn(16, 256, generator=torch.Generator().manual_seed(4)) * 3
    screen = gs.GreedyScreen(weight)
    coefs = x.norm(dim=1) * screen.coef_scale
    ids, counts = gs.candidates(screen._bf16_logits(x), None, screen.norms, coefs, gs.REL, [[]] * 16, screen.cap)
    winners = (x @ weight.T).argmax(dim=1)
    for r in range(16):
        assert 1 <= counts[r] <= 32  # random logits: the interval is narrow next to their spread
        assert int(winners[r]) in ids[r, : counts[r]].tolist()


def test_a_bound_too_tight_would_be_caught(monkeypatch) -> None:
    """The near-tie test has teeth: with no error bound the bf16 screen alone picks other tokens."""
    weight, _ = _head(2000, 128, seed=5)
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(6)) * 3
    _near_ties(weight, x, 64, seed=7)
    screen = gs.GreedyScreen(weight)
    screen.coef_scale, screen.norms = 0.0, torch.zeros_like(screen.norms)
    monkeypatch.setattr(gs, "REL", 0.0)
    got = screen.argmax(x, [[]] * 64)
    assert not torch.equal(got, gs.reference(x, weight, None, [[]] * 64))


def test_flat_and_nan_rows_take_the_fp32_row() -> None:
    weight = torch.ones(100, 8)  # every logit equal: all 100 are candidates, over the cap
    weight[37] += 1e-3  # the fp32 winner, invisible in bf16
    x = torch.ones(3, 8)
    x[2] = float("nan")
    got = gs.GreedyScreen(weight).argmax(x, [[], [37], []])
    assert got.tolist()[:2] == [37, 0]
    assert torch.equal(got, gs.reference(x, weight, None, [[], [37], []]))


@needs_kernel
@pytest.mark.parametrize("rows,vocab", [(1, 7), (5, 1000), (9, 58_101)])
def test_kernel_matches_reference(rows: int, vocab: int) -> None:
    g = torch.Generator().manual_seed(rows * vocab)
    screen = (torch.randn(rows, vocab + 3, generator=g) * 4).to(torch.bfloat16)[:, :vocab]  # a row stride
    bias = torch.randn(vocab, generator=g)
    norms = torch.rand(vocab, generator=g) + 0.5
    coefs = torch.rand(rows, generator=g) * 2
    bans = [torch.randint(0, vocab, (r % 3,), generator=g).tolist() for r in range(rows)]
    screen[0, 0] = float("-inf")
    for b in (None, bias):
        ref_ids, ref_counts = gs.candidates_reference(screen.clone(), b, norms, coefs, gs.REL, bans, 16)
        ids, counts = gs.candidates(screen.clone(), b, norms, coefs, gs.REL, bans, 16)
        assert torch.equal(counts, ref_counts)
        assert (counts > 0).all() and (rows == 1 or (counts > 1).any())  # rows with several to match
        for r in range(rows):
            n = min(int(counts[r]), 16)
            assert ids[r, :n].tolist() == ref_ids[r, :n].tolist()


@needs_kernel
def test_kernel_counts_rows_of_minus_inf_as_empty() -> None:
    screen = torch.full((2, 20), float("-inf"), dtype=torch.bfloat16)
    screen[1, 4] = 1.0
    ids, counts = gs.candidates(screen, None, torch.ones(20), torch.zeros(2), gs.REL, [[], [4]], 4)
    assert counts.tolist() == [0, 0]  # row 1's only finite token is banned


def test_wanted_follows_the_switch(monkeypatch) -> None:
    weight = torch.zeros(4, 4)
    monkeypatch.setenv(gs.ENV, "1")
    assert gs.wanted(weight) and not gs.wanted(weight.double())
    monkeypatch.setenv(gs.ENV, "0")
    assert not gs.wanted(weight) and gs.GreedyScreen.build(weight) is None

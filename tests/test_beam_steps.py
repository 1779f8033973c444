"""engine/beam_search.beam_steps: many searches in one batched step equal each search stepped alone."""
from __future__ import annotations

import copy

import torch

from engine.beam_search import BeamSearch, beam_steps

EOS = (0,)


def _searches(num: int, num_beams: int) -> list[BeamSearch]:
    out = []
    for i in range(num):
        # differing penalties, stopping rules and limits, so no row can borrow another's settings
        out.append(BeamSearch(num_beams, EOS, max_tokens=3 + i % 5, length_penalty=(1.0, 0.6, 2.0)[i % 3],
                              early_stopping=bool(i % 2)))
    return out


def _candidates(gen: torch.Generator, g: int, nb: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    lp = torch.rand(g, nb, k, generator=gen).log().sort(dim=-1, descending=True).values
    ids = torch.randint(0, 6, (g, nb, k), generator=gen)  # a small vocabulary: eos is often picked
    return lp, ids


def test_batched_steps_equal_steps_one_search_at_a_time():
    gen = torch.Generator().manual_seed(0)
    nb, g = 3, 9
    batched = _searches(g, nb)
    alone = copy.deepcopy(batched)
    running = [[[] for _ in range(nb)] for _ in range(g)]
    live = list(range(g))
    steps_taken = 0
    while live:
        k = batched[0].num_candidates
        lp, ids = _candidates(gen, len(live), nb, k + 2)  # wider than needed, as the engine's top-k may be
        got = beam_steps([batched[i] for i in live], lp, ids, [running[i] for i in live])
        for row, i in enumerate(live):
            want = alone[i].step(lp[row], ids[row], running[i])
            assert (got[row].parents, got[row].tokens, got[row].done) == (want.parents, want.tokens, want.done)
            assert torch.equal(batched[i].running_scores, alone[i].running_scores)
            assert torch.equal(batched[i].finished_scores, alone[i].finished_scores)
            assert batched[i].finished_ids == alone[i].finished_ids
            running[i] = [running[i][p] + [t] for p, t in zip(want.parents, want.tokens)]
        live = [i for row, i in enumerate(live) if not got[row].done]
        steps_taken += 1
    assert steps_taken >= 3 and all(s.best() for s in batched)  # several steps, every search finished

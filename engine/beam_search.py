"""Beam search for one request, one step at a time, with transformers generate()'s exact rules;
and the logit constraints generation_config.json asks for (bad words, forced eos, no-repeat n-grams).

`BeamSearch` sees only log-probs and token lists: which blocks the beams live in is the engine's
business (it forks the chosen parents so continuations share their prefix blocks).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.bad_words import banned_by_bad_words
from engine.top_logprobs import ban_, top_logprobs

NEG = -1.0e9  # HF's "impossible" score; kept bit-for-bit so ties and penalties resolve as in HF


@dataclass(frozen=True)
class BeamStep:
    """The running beams after a step: beam j continues running beam `parents[j]` with `tokens[j]`."""

    parents: list[int]
    tokens: list[int]
    done: bool


class BeamSearch:
    """HF `_beam_search` for a batch of one, vectorised over beams and vocabulary.

    Each step keeps the top `k = max(2, 1 + #eos) * num_beams` continuations by summed log-prob;
    those among the first `num_beams` that hit eos (or the length cap) compete for the finished
    slots with score `sum_logprob / gen_len ** length_penalty`; the best `num_beams` others run on
    (with a -1e9 penalty when too few are left, as HF does). Search ends when no running beam can
    beat the worst finished one (HF's heuristic for early_stopping=False), when every slot is
    finished and early_stopping=True, or when every candidate hit a stop.
    """

    def __init__(
        self, num_beams: int, eos_token_ids: tuple[int, ...], max_tokens: int, length_penalty: float,
        early_stopping: bool,
    ) -> None:
        self.num_beams = num_beams
        self.eos = torch.tensor(eos_token_ids, dtype=torch.long)
        self.max_tokens = max_tokens
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        self.num_candidates = max(2, 1 + len(eos_token_ids)) * num_beams
        self.running_scores = torch.full((num_beams,), NEG)
        self.running_scores[0] = 0.0  # all beams start identical: only the first may expand
        self.finished_scores = torch.full((num_beams,), NEG)
        self.is_finished = torch.zeros(num_beams, dtype=torch.bool)
        self.finished_ids: list[list[int] | None] = [None] * num_beams
        self.heuristic_unsatisfied = True
        self.num_generated = 0

    def step(self, logprobs: torch.Tensor, token_ids: torch.Tensor, running_ids: list[list[int]]) -> BeamStep:
        """One step of this search alone: `beam_steps` with a batch of one."""
        return beam_steps([self], logprobs[None], token_ids[None], [running_ids])[0]

    def best(self) -> list[int]:
        """The best finished hypothesis (generated tokens, eos included when produced)."""
        ids = self.finished_ids[0]
        assert ids is not None, "beam search ended without a finished hypothesis"
        return ids


def beam_steps(searches: list[BeamSearch], logprobs: torch.Tensor, token_ids: torch.Tensor,
               running_ids: list[list[list[int]]]) -> list[BeamStep]:
    """Advance several searches that share `num_beams`, `num_candidates` and eos ids by one step, with one
    set of tensor ops for all of them (per-request ops cost more than the math at 100+ requests).

    `logprobs` (G, num_beams, k >= num_candidates): each running beam's best processed next-token
    log-probs, descending, and `token_ids` the same shape, their tokens; `running_ids[g][j]`: beam j
    of search g's generated tokens. The best `num_candidates` continuations of a search are among
    its rows' best `num_candidates`, so the caller's one batched top-k over the vocabulary leaves
    k candidates per beam. Each row's arithmetic and top-k are those of HF's batch-of-one step."""
    first = searches[0]
    nb, ncand = first.num_beams, first.num_candidates
    assert all(s.num_beams == nb and s.num_candidates == ncand and torch.equal(s.eos, first.eos) for s in searches)
    g, k = logprobs.shape[0], ncand
    logprobs, token_ids = logprobs[:, :, :k], token_ids[:, :, :k]
    running_scores = torch.stack([s.running_scores for s in searches])
    flat = (logprobs.float() + running_scores[:, :, None]).reshape(g, nb * k)
    top_scores, top_idx = torch.topk(flat, ncand, dim=1)
    parents, tokens = top_idx // k, torch.gather(token_ids.reshape(g, nb * k), 1, top_idx)
    gen_lens = [s.num_generated + 1 for s in searches]
    at_cap = torch.tensor([n >= s.max_tokens for n, s in zip(gen_lens, searches)])
    hits = torch.isin(tokens, first.eos) | at_cap[:, None]

    running = top_scores + hits.to(torch.float32) * NEG
    keep = torch.topk(running, nb, dim=1).indices
    next_running_scores = torch.gather(running, 1, keep)

    just_finished = hits.clone()
    just_finished[:, nb:] = False  # only the top num_beams may finish; the rest are spares
    # gen_len ** length_penalty in double, then fp32, as a tensor divided by a Python float is
    denom = torch.tensor([n**s.length_penalty for n, s in zip(gen_lens, searches)], dtype=torch.float32)[:, None]
    norm = top_scores / denom
    is_finished = torch.stack([s.is_finished for s in searches])
    early = torch.tensor([s.early_stopping is True for s in searches])
    full = is_finished.all(dim=1) & early
    norm = norm + full.to(torch.float32)[:, None] * NEG
    satisfied = torch.tensor([not s.heuristic_unsatisfied for s in searches])
    norm = norm + satisfied.to(torch.float32)[:, None] * NEG
    norm = norm + (~just_finished).to(torch.float32) * NEG
    merged = torch.cat([torch.stack([s.finished_scores for s in searches]), norm], dim=1)
    merged_finished = torch.cat([is_finished, just_finished], dim=1)
    chosen = torch.topk(merged, nb, dim=1).indices
    finished_scores = torch.gather(merged, 1, chosen)
    is_finished = torch.gather(merged_finished, 1, chosen)

    best_running = next_running_scores[:, :1] / denom
    worst_finished = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True).values, torch.tensor(NEG))
    beats = (best_running > worst_finished).any(dim=1)
    all_full = is_finished.all(dim=1) & early
    ends = all_full | hits.all(dim=1)

    steps = []
    lists = zip(chosen.tolist(), parents.tolist(), tokens.tolist(), keep.tolist(), beats.tolist(), ends.tolist())
    for i, (search, (chosen_i, parent_i, token_i, keep_i, beats_i, ends_i)) in enumerate(zip(searches, lists)):
        search.finished_ids = [
            search.finished_ids[c] if c < nb else running_ids[i][parent_i[c - nb]] + [token_i[c - nb]]
            for c in chosen_i
        ]
        search.finished_scores, search.is_finished = finished_scores[i], is_finished[i]
        search.running_scores = next_running_scores[i]
        search.num_generated = gen_lens[i]
        search.heuristic_unsatisfied = search.heuristic_unsatisfied and beats_i
        done = not search.heuristic_unsatisfied or ends_i
        steps.append(BeamStep([parent_i[j] for j in keep_i], [token_i[j] for j in keep_i], done))
    return steps


def no_repeat_ngram_bans(ids: list[int], n: int) -> list[int]:
    """Tokens that would repeat an n-gram of `ids` (HF NoRepeatNGramLogitsProcessor, one row)."""
    if n <= 0 or len(ids) + 1 < n:
        return []
    prefix = ids[len(ids) - n + 1 :]
    return [ids[i + n - 1] for i in range(len(ids) - n + 1) if ids[i : i + n - 1] == prefix]


@dataclass(frozen=True)
class DecoderRows:
    """What `Constraints` reads of each decoder row (one entry per row): its tokens (start token
    included), how many it generated, its limit, its minimum (eos banned before it) and its
    no-repeat n-gram size."""

    token_ids: list[list[int]]
    num_generated: list[int]
    max_tokens: list[int]
    min_tokens: list[int]
    no_repeat: list[int]


@dataclass(frozen=True)
class Constraints:
    """Logit rules from generation_config.json and the request, applied to every decoder row."""

    banned_ids: tuple[int, ...] = ()  # single-token bad_words_ids (Marian bans <pad>)
    # longer bad_words_ids: the last token banned where the rest ends the row (start token included, as HF)
    bad_sequences: tuple[tuple[int, ...], ...] = ()
    forced_eos_token_id: int | None = None  # forced as the last token a request may generate
    eos_token_ids: tuple[int, ...] = ()  # banned while a row is short of its min_tokens

    def bans(self, rows: DecoderRows) -> list[list[int]]:
        """Each row's banned tokens: its no-repeat n-gram completions, the bad words, then eos
        while the row has generated fewer than its min_tokens (HF's min_length, which counts the
        start token, is min_tokens + 1)."""
        return [
            no_repeat_ngram_bans(ids, n) + list(self.banned_ids) + banned_by_bad_words(self.bad_sequences, ids)
            + (list(self.eos_token_ids) if g < m else [])
            for ids, n, g, m in zip(rows.token_ids, rows.no_repeat, rows.num_generated, rows.min_tokens)
        ]

    def forced_eos(self, rows: DecoderRows) -> list[bool]:
        """Rows whose next token is their last allowed one, where eos is forced."""
        if self.forced_eos_token_id is None:
            return [False] * len(rows.num_generated)
        return [g + 1 == m for g, m in zip(rows.num_generated, rows.max_tokens)]

    def apply(self, scores: torch.Tensor, rows: DecoderRows) -> torch.Tensor:
        """In HF's processor order: no-repeat n-grams, bad words, min length, forced eos (which
        overrides them); `scores` edited in place."""
        ban_(scores, self.bans(rows))
        forced = self.forced_eos(rows)
        if any(forced):
            last = torch.tensor(forced, device=scores.device)
            scores[last] = float("-inf")
            scores[last, self.forced_eos_token_id] = 0.0
        return scores

    def argmax(self, pick: Callable[[list[list[int]]], torch.Tensor], rows: DecoderRows) -> list[int]:
        """The argmax of each of `apply`'s rows, from `pick(bans)` (each row's argmax with its bans
        excluded, e.g. a bf16-screened one) without the rows themselves: where eos is forced, eos."""
        tokens = pick(self.bans(rows)).tolist()
        for row, forced in enumerate(self.forced_eos(rows)):
            if forced:
                tokens[row] = self.forced_eos_token_id
        return tokens

    def top_logprobs(self, logits: torch.Tensor, k: int, rows: DecoderRows) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-k of log_softmax(logits) after `apply`'s rules, without the full log-prob tensor
        (engine/top_logprobs.py); `logits` is overwritten. A row where eos is forced gets eos at 0
        first and -inf after, what the top-k of `apply`'s row of -inf but eos gives."""
        values, ids = top_logprobs(logits, min(k, logits.shape[-1]), self.bans(rows))
        forced = self.forced_eos(rows)
        if any(forced):
            last = torch.tensor(forced, device=values.device)
            values[last] = float("-inf")
            values[last, 0] = 0.0
            ids[last, 0] = self.forced_eos_token_id
        return values, ids

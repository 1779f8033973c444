"""Beam search for one request, one step at a time, with transformers generate()'s exact rules;
and the logit constraints generation_config.json asks for (bad words, forced eos, no-repeat n-grams).

`BeamSearch` sees only log-probs and token lists: which blocks the beams live in is the engine's
business (it forks the chosen parents so continuations share their prefix blocks).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

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
        """`logprobs` (num_beams, k >= num_candidates): each running beam's best processed next-token
        log-probs, descending, and `token_ids` (num_beams, k) their tokens; `running_ids[j]`: beam
        j's generated tokens so far. The best `num_candidates` continuations overall are among
        each row's best `num_candidates`, so the caller's one batched top-k over the vocabulary
        (every request's rows at once) leaves this step only k candidates per beam."""
        nb, k = logprobs.shape
        assert nb == self.num_beams and k >= self.num_candidates
        flat = (logprobs.float() + self.running_scores[:, None]).reshape(-1)
        top_scores, top_idx = torch.topk(flat, self.num_candidates)
        parents, tokens = top_idx // k, token_ids.reshape(-1)[top_idx]
        gen_len = self.num_generated + 1
        hits = torch.isin(tokens, self.eos) | (gen_len >= self.max_tokens)

        running = top_scores + hits.to(torch.float32) * NEG
        keep = torch.topk(running, nb).indices
        next_running_scores = running[keep]

        just_finished = hits.clone()
        just_finished[nb:] = False  # only the top num_beams may finish; the rest are spares
        norm = top_scores / (gen_len**self.length_penalty)
        full = bool(self.is_finished.all()) and self.early_stopping is True
        norm = norm + float(full) * NEG
        norm = norm + float(not self.heuristic_unsatisfied) * NEG
        norm = norm + (~just_finished).to(torch.float32) * NEG
        merged = torch.cat([self.finished_scores, norm])
        merged_finished = torch.cat([self.is_finished, just_finished])
        chosen = torch.topk(merged, nb).indices.tolist()
        parent_list, token_list = parents.tolist(), tokens.tolist()
        self.finished_ids = [
            self.finished_ids[c] if c < nb else running_ids[parent_list[c - nb]] + [token_list[c - nb]]
            for c in chosen
        ]
        self.finished_scores = merged[chosen]
        self.is_finished = merged_finished[chosen]

        self.running_scores = next_running_scores
        self.num_generated = gen_len
        best_running = next_running_scores[0] / (gen_len**self.length_penalty)
        worst_finished = torch.where(self.is_finished, self.finished_scores.min(), torch.tensor(NEG))
        self.heuristic_unsatisfied = self.heuristic_unsatisfied and bool((best_running > worst_finished).any())
        all_full = bool(self.is_finished.all()) and self.early_stopping is True
        done = not self.heuristic_unsatisfied or all_full or bool(hits.all())
        keep_list = keep.tolist()
        return BeamStep([parent_list[i] for i in keep_list], [token_list[i] for i in keep_list], done)

    def best(self) -> list[int]:
        """The best finished hypothesis (generated tokens, eos included when produced)."""
        ids = self.finished_ids[0]
        assert ids is not None, "beam search ended without a finished hypothesis"
        return ids


def log_softmax_(logits: torch.Tensor, rows_per_chunk: int = 8) -> torch.Tensor:
    """Row-wise log_softmax in place, a few rows at a time: the values of torch.log_softmax
    (each row is computed alone either way) without a second (rows, V) tensor, which for 256
    beams over a 58k vocabulary is a fresh 60 MB mmap whose page faults doubled the op's time."""
    for start in range(0, logits.shape[0], rows_per_chunk):
        part = logits[start : start + rows_per_chunk]
        part.copy_(torch.log_softmax(part, dim=-1))
    return logits


def no_repeat_ngram_bans(ids: list[int], n: int) -> list[int]:
    """Tokens that would repeat an n-gram of `ids` (HF NoRepeatNGramLogitsProcessor, one row)."""
    if n <= 0 or len(ids) + 1 < n:
        return []
    prefix = ids[len(ids) - n + 1 :]
    return [ids[i + n - 1] for i in range(len(ids) - n + 1) if ids[i : i + n - 1] == prefix]


@dataclass(frozen=True)
class Constraints:
    """Model-level logit rules from generation_config.json, applied to every decoder row."""

    banned_ids: tuple[int, ...] = ()  # single-token bad_words_ids (Marian bans <pad>)
    forced_eos_token_id: int | None = None  # forced as the last token a request may generate

    def apply(self, scores: torch.Tensor, decoder_ids: list[list[int]], num_generated: list[int],
              max_tokens: list[int], no_repeat: list[int]) -> torch.Tensor:
        """In HF's processor order: no-repeat n-grams, bad words, forced eos. Rows: decoder
        sequences (start token included), how many tokens each generated, and its limit."""
        for row, (ids, n) in enumerate(zip(decoder_ids, no_repeat)):  # one list per row, not per token
            bans = no_repeat_ngram_bans(ids, n)
            if bans:
                scores[row, bans] = float("-inf")
        if self.banned_ids:
            scores[:, list(self.banned_ids)] = float("-inf")
        if self.forced_eos_token_id is not None:
            last = torch.tensor([g + 1 == m for g, m in zip(num_generated, max_tokens)], device=scores.device)
            if bool(last.any()):
                forced = torch.full_like(scores[last], float("-inf"))
                forced[:, self.forced_eos_token_id] = 0.0
                scores[last] = forced
        return scores

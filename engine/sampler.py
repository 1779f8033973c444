"""Turns the logits of sampling rows into token ids: penalties, greedy or filtered sampling.

Per-request seeds use a generator per sequence that only advances when that sequence samples,
so a seeded request gives the same tokens whatever else shares its batch (or preempts it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.host_copy import to_device
from engine.outputs import TokenLogprob
from engine.sampling_params import SamplingParams
from engine.top_logprobs import argmax


@dataclass(frozen=True)
class SamplingRow:
    """One sampling row: its settings, its tokens so far, and its generator (None: shared)."""

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    generator: torch.Generator | None
    banned: tuple[int, ...] = ()  # tokens that may not come yet (EOS and stop ids before min_tokens)
    forced: int | None = None  # the token this row takes whatever the logits (a thinking budget's end)


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """OpenAI presence/frequency penalties over output tokens; HF's repetition penalty over all."""
    num_rows, vocab = logits.shape
    counts = torch.zeros((num_rows, vocab), dtype=logits.dtype, device=logits.device)
    seen = torch.zeros((num_rows, vocab), dtype=torch.bool, device=logits.device)
    for i, row in enumerate(rows):  # one scatter per row, not per token
        if row.output_ids:
            out = torch.tensor(row.output_ids, device=logits.device)
            counts[i].index_add_(0, out, torch.ones_like(out, dtype=logits.dtype))
            seen[i, out] = True
        if row.prompt_ids:
            seen[i, torch.tensor(row.prompt_ids, device=logits.device)] = True
    dev = logits.device
    presence = torch.tensor([r.params.presence_penalty for r in rows], device=dev)[:, None]
    frequency = torch.tensor([r.params.frequency_penalty for r in rows], device=dev)[:, None]
    repetition = torch.tensor([r.params.repetition_penalty for r in rows], device=dev)[:, None]
    logits = logits - presence * (counts > 0) - frequency * counts
    penalised = torch.where(logits > 0, logits / repetition, logits * repetition)
    return torch.where(seen & (repetition != 1.0), penalised, logits)


def apply_bias(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """OpenAI's logit_bias, then -inf for each row's banned tokens; one scatter per row."""
    logits = logits.clone()
    for i, row in enumerate(rows):
        if row.params.logit_bias:
            ids, bias = zip(*row.params.logit_bias)
            logits[i].index_add_(0, torch.tensor(ids, device=logits.device),
                                 torch.tensor(bias, dtype=logits.dtype, device=logits.device))
        if row.banned:
            logits[i, torch.tensor(row.banned, device=logits.device)] = float("-inf")
    return logits


def filter_logits(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Temperature, then top-k, top-p, min-p and typical-p (HF's order); filtered-out tokens get -inf."""
    dev = logits.device
    vocab = logits.shape[1]
    temperature = to_device([r.params.temperature for r in rows], dev)[:, None]
    # a repetition penalty near 0 (in range) or a small temperature can send logits to inf, and a
    # softmax over infs is NaN, which samples token 0 whatever the logits (or a grammar) allow
    logits = (logits / temperature).clamp(max=torch.finfo(logits.dtype).max)
    top_k = to_device([r.params.top_k if r.params.top_k > 0 else vocab for r in rows], dev).clamp(max=vocab)
    top_p = to_device([r.params.top_p for r in rows], dev)[:, None]
    min_p = to_device([r.params.min_p for r in rows], dev)[:, None]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=dev)[None, :]
    drop = rank >= top_k[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    # keep the smallest prefix whose mass reaches top_p (the first token always stays)
    drop |= (probs.cumsum(-1) - probs) >= top_p
    drop |= probs < min_p * probs[:, :1]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
    if any(r.params.typical_p < 1.0 for r in rows):  # a second sort, paid only by requests that ask
        logits = _typical(logits, to_device([r.params.typical_p for r in rows], dev))
    return logits


def _typical(logits: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Keep the tokens whose surprisal is closest to the entropy, fewest first until their mass
    reaches `mass` (the token that crosses it stays, and so does the closest one)."""
    logp = logits.log_softmax(-1)
    entropy = -(logp.exp() * logp).nansum(-1, keepdim=True)  # -inf * 0 is nan: those tokens add nothing
    distance, order = (-logp - entropy).abs().sort(dim=-1)
    cumulative = logp.gather(1, order).exp().cumsum(-1)
    last = (cumulative < mass[:, None]).sum(-1, keepdim=True).clamp(max=logits.shape[1] - 1)
    drop = distance > distance.gather(1, last)
    drop[:, 0] = False
    return logits.masked_fill(torch.zeros_like(drop).scatter_(1, order, drop), float("-inf"))


def _race(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Sample from each row by the exponential race: argmax(p / E), E ~ Exp(1)."""
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / noise).argmax(-1)


class Sampler:
    """Samples one token per row; greedy rows (temperature 0) take the argmax."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator  # for rows without a seed of their own

    def __call__(
        self, logits: torch.Tensor, rows: list[SamplingRow]
    ) -> tuple[list[int], list[TokenLogprob | None]]:
        tokens, logprobs = self.sample(logits, rows)
        return tokens.tolist(), logprobs

    def sample(
        self, logits: torch.Tensor, rows: list[SamplingRow]
    ) -> tuple[torch.Tensor, list[TokenLogprob | None]]:
        """Tokens as a device tensor; the host waits for them only when a row wants logprobs."""
        logits = logits.float()
        want_logprobs = [r.params.logprobs is not None for r in rows]
        raw_logprobs = logits.log_softmax(-1) if any(want_logprobs) else None
        if any(r.params.needs_penalties for r in rows):
            logits = apply_penalties(logits, rows)
        if any(r.params.logit_bias or r.banned for r in rows):
            logits = apply_bias(logits, rows)
        tokens = argmax(logits)
        sampling = [i for i, r in enumerate(rows) if not r.params.is_greedy]
        if sampling:
            # index with device tensors, never Python lists: a list index is a blocking copy
            dev = logits.device
            idx = None if len(sampling) == len(rows) else to_device(sampling, dev)
            probs = filter_logits(logits if idx is None else logits[idx], [rows[i] for i in sampling]).softmax(-1)
            shared = [j for j, i in enumerate(sampling) if rows[i].generator is None]
            if len(shared) == len(sampling):
                drawn, at = _race(probs, self.generator), idx
            elif shared:
                some = to_device(shared, dev)
                drawn, at = _race(probs[some], self.generator), (some if idx is None else idx[some])
            if shared and at is None:
                tokens.copy_(drawn)
            elif shared:
                tokens[at] = drawn
            for j, i in enumerate(sampling):
                if rows[i].generator is not None:
                    tokens[i] = _race(probs[j : j + 1], rows[i].generator)[0]
        for i, row in enumerate(rows):  # after the draw, so a seeded row's generator advances as ever
            if row.forced is not None:
                tokens[i] = row.forced
        logprobs: list[TokenLogprob | None] = [None] * len(rows)
        if raw_logprobs is None:
            return tokens, logprobs
        token_list = tokens.tolist()
        for i, row in enumerate(rows):
            if not want_logprobs[i]:
                continue
            n = row.params.logprobs or 0
            top = raw_logprobs[i].topk(n) if n else None
            logprobs[i] = TokenLogprob(
                token_id=token_list[i],
                logprob=float(raw_logprobs[i, token_list[i]]),
                # a grammar's -inf tokens are not candidates: fewer than n may be listed
                top={t: v for t, v in zip(top.indices.tolist(), top.values.tolist()) if v != float("-inf")}
                if top is not None else {},
            )
        return tokens, logprobs

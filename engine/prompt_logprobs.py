"""Log-probabilities of a prompt's own tokens (OpenAI's `echo` with `logprobs`: how evaluation
harnesses score a text). The hidden state at prompt position p predicts token p + 1, so a
prefill chunk over positions [s, e) scores tokens s + 1 .. min(e, P - 1) of a P-token prompt.
Position 0 has nothing before it and is never scored.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.outputs import TokenLogprob
from engine.sequence import Sequence


@dataclass(frozen=True)
class PromptRows:
    """The rows of a step's flat hidden states whose next token is a prompt token, per sequence."""

    seq_index: int  # in the schedule
    first_target: int  # prompt position of the token the first row predicts
    rows: range  # into the step's flat token rows


def prompt_rows(seqs: list[Sequence], num_new_tokens: list[int]) -> list[PromptRows]:
    """For each scheduled sequence that wants its prompt scored, the rows of its chunk (in the
    step's flat rows, chunks end to end) that predict a prompt token."""
    found = []
    row = 0
    for i, (seq, n) in enumerate(zip(seqs, num_new_tokens)):
        if seq.wants_prompt_logprobs:
            start = seq.num_computed_tokens
            end = min(start + n, seq.num_prompt_tokens - 1)  # the last prompt position predicts an output
            if end > start:
                found.append(PromptRows(i, start + 1, range(row, row + end - start)))
        row += n
    return found


def score(logits: torch.Tensor, targets: list[int], num_top: int) -> list[TokenLogprob]:
    """Per row of `logits`: the log-probability of `targets[row]`, its rank and the `num_top` best."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    picked = logprobs.gather(1, torch.tensor(targets, device=logprobs.device).view(-1, 1))
    ranks = ((logprobs > picked).sum(-1) + 1).tolist()  # vLLM's rank: 1 + the tokens more likely
    chosen = picked.view(-1).tolist()
    if num_top:
        values, ids = logprobs.topk(num_top, dim=-1)
        tops = [dict(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [{} for _ in targets]
    return [TokenLogprob(token_id=t, logprob=lp, top=top, rank=r) for t, lp, top, r in zip(targets, chosen, tops, ranks)]

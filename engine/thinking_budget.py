"""A thinking budget: at most so many tokens inside a reasoning block (`<think> ... </think>`), then the
block's end is forced, one token per step, and the model writes its answer.

vLLM's `thinking_token_budget` and Anthropic's `thinking.budget_tokens`. The state is read off the
output each step (no torch, nothing kept per sequence), so a preempted or speculated row needs
nothing restored:
- the block starts at the output's start (a prompt that opened it) or after the first `start_ids`;
- it has ended once `end_ids` follow its start, written by the model or forced, and from then on
  nothing is forced (a block opened again later is not counted);
- from `max_tokens` tokens into the block, the next tokens are `end_ids`, in order.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def _after(seq: Sequence[int], pattern: tuple[int, ...], start: int = 0) -> int | None:
    """The index just past the first occurrence of `pattern` in `seq` at or after `start`, or None.
    Run every step on a budgeted row's whole output: candidates are found by `index` (C speed)."""
    n = len(pattern)
    i = start - 1
    while True:
        try:
            i = seq.index(pattern[0], i + 1)
        except ValueError:
            return None
        if tuple(seq[i : i + n]) == pattern:
            return i + n


@dataclass(frozen=True)
class ThinkingBudget:
    max_tokens: int  # tokens the block may hold before its end is forced
    start_ids: tuple[int, ...]  # the opening tag's tokens, where the answer opens the block itself
    end_ids: tuple[int, ...]  # the closing tag's tokens: forced when the budget is spent
    opened: bool  # the prompt opened the block: the answer starts inside it

    def __post_init__(self) -> None:
        if self.max_tokens < 0 or not self.end_ids or not (self.opened or self.start_ids):
            raise ValueError("a thinking budget needs max_tokens >= 0, end_ids, and start_ids unless opened")

    def forced_token(self, output: Sequence[int]) -> int | None:
        """The token the next step must take after `output`, or None where the model chooses."""
        start = 0 if self.opened else _after(output, self.start_ids)
        if start is None:
            return None  # no block (yet): nothing to count
        if _after(output, self.end_ids, start) is not None:
            return None  # the block is closed
        over = len(output) - start - self.max_tokens
        return self.end_ids[over] if 0 <= over < len(self.end_ids) else None

"""Bad words: token sequences a request may not generate (vLLM's `bad_words`, HF's `bad_words_ids`).

A one-token word is banned at every step. A longer one bans its last token only when the tokens
before it end the output so far, so the sequence can never be completed while its pieces stay
usable on their own. No torch here: the runner turns the result into banned ids per row.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence


def bad_words_token_ids(words: Sequence[str], encode: Callable[[str], list[int]]) -> tuple[tuple[int, ...], ...]:
    """Each word's tokens as it would start the text and, where that tokenizes differently, after a
    space (most tokenizers fold the space into the word's first token), as vLLM does, so the word is
    banned at the start and inside the text. `encode` adds no special tokens."""
    out: list[tuple[int, ...]] = []
    for word in words:
        bare = tuple(encode(word.lstrip()))
        if bare:
            out.append(bare)
        spaced = tuple(encode(" " + word.lstrip()))
        # a new first token of the same length: the word after a space; anything else (a space
        # token in front, a different split) would ban pieces that are not the word
        if spaced and (not bare or (spaced[0] != bare[0] and len(spaced) == len(bare))):
            out.append(spaced)
    return tuple(out)


def banned_by_bad_words(bad: Sequence[Sequence[int]], tokens: Sequence[int]) -> list[int]:
    """The last tokens of the bad words whose other tokens end `tokens` (one-token words: always)."""
    banned = []
    for word in bad:
        head = len(word) - 1
        if head == 0 or (len(tokens) >= head and list(tokens[len(tokens) - head:]) == list(word[:head])):
            banned.append(word[-1])
    return banned

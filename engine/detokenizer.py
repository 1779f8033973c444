"""Incremental detokenization and stop strings, per sample.

Decoding only a short window of recent tokens keeps each step O(1) in the output length; a
window that ends inside a multi-byte character (U+FFFD) waits for the next token. Text that
could still become a stop string is held back from streaming, so a stop string is never cut
in half across chunks and never leaks into the output.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


@dataclass
class IncrementalDetokenizer:
    stop: tuple[str, ...] = ()
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    text: str = ""
    sent: int = 0  # chars of `text` already handed out as deltas
    _prefix_offset: int = 0
    _read_offset: int = 0
    _ids: list[int] = field(default_factory=list)

    def add(self, decoder: Decoder, token_id: int, check_stop: bool = True) -> str | None:
        """Append one token; returns the stop string if the text now contains one (and
        `check_stop`: no stop string counts before a request's min_tokens)."""
        self._ids.append(token_id)
        skip = self.skip_special_tokens
        prefix = decoder.decode(self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=skip)
        full = decoder.decode(self._ids[self._prefix_offset :], skip_special_tokens=skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new = full[len(prefix) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
            self.text += new
            return self._match_stop(start) if check_stop else None
        return None

    def _match_stop(self, search_from: int) -> str | None:
        best: tuple[int, str] | None = None
        for s in self.stop:
            at = self.text.find(s, search_from)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, s)
        if best is None:
            return None
        at, s = best
        self.text = self.text[: at + len(s)] if self.include_stop_str_in_output else self.text[:at]
        return s

    def delta(self, finished: bool) -> str:
        """Text not yet handed out, minus a tail that could still grow into a stop string."""
        end = len(self.text)
        if not finished and self.stop:
            end -= self._held_back()
        end = max(end, self.sent)
        out = self.text[self.sent : end]
        self.sent = end
        return out

    def _held_back(self) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:n]):
                    longest = n
                    break
        return longest

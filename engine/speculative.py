"""N-gram speculative decoding (prompt lookup): draft tokens from the sequence itself, verify them in one step.

A decoding sequence whose last few tokens appeared earlier in its prompt or output guesses that
what followed them then follows now: the proposer copies up to k of those tokens as drafts. The
step computes the last token and the k drafts together (a k+1-token chunk, like a prefill chunk
over the paged cache) and samples a token at each of the k+1 positions, each conditioned on the
drafts before it. Draft j is accepted while the token sampled before it equals it; the first
sample that differs (or the one after the last draft) is the step's extra token.

Why this keeps the output distribution exact: the draft is a fixed token d, so the rejection
rule of speculative sampling (accept with probability min(1, p(d)/q(d)) = p(d), else draw from
the normalised max(p - q, 0)) is the same as drawing t ~ p and accepting iff t == d: P(out = d)
= p(d), and P(out = x) = p(x) for x != d. So greedy and sampled rows share one rule, and the
sampler needs no change: with greedy rows the output equals decoding without drafts token for token.

No torch here: the scheduler proposes and the engine counts acceptance with lists of ints.
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass

from engine.errors import InvalidRequestError

MAX_SPECULATIVE_TOKENS = 16  # each draft is a row of the verification step: past a few, mostly wasted work


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's `speculative_config` for its n-gram method: up to `num_speculative_tokens` drafts
    copied after the longest suffix of `prompt_lookup_min`..`prompt_lookup_max` tokens that
    occurred before."""

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2
    # no drafts while more sequences than this run or wait: a large batch is no longer bound by reading the
    # weights, so verifying drafts costs about what it saves (vLLM's option; None: always draft)
    disable_by_batch_size: int | None = None

    @classmethod
    def from_dict(cls, fields: dict) -> SpeculativeConfig:
        """vLLM's `speculative_config` dict; a key it does not know is refused by name."""
        known = set(cls.__dataclass_fields__)
        if set(fields) - known:
            raise InvalidRequestError(f"unknown keys {sorted(set(fields) - known)}; known: {sorted(known)}")
        return cls(**fields)

    def __post_init__(self) -> None:
        if self.method != "ngram":
            raise InvalidRequestError(f"speculative method must be 'ngram' (no draft models are served), got {self.method!r}")
        if not 1 <= self.num_speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            raise InvalidRequestError(
                f"num_speculative_tokens must be in [1, {MAX_SPECULATIVE_TOKENS}], got {self.num_speculative_tokens}"
            )
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise InvalidRequestError(
                "prompt_lookup_min and prompt_lookup_max must satisfy 1 <= min <= max, got "
                f"{self.prompt_lookup_min} and {self.prompt_lookup_max}"
            )
        if self.disable_by_batch_size is not None and self.disable_by_batch_size < 1:
            raise InvalidRequestError(f"disable_by_batch_size must be positive, got {self.disable_by_batch_size}")


WIDTH = array("q").itemsize  # bytes per packed token id


def pack(token_ids: list[int], packed: bytearray) -> bytearray:
    """`packed` (a sequence's ids as 8-byte ints, kept between steps) brought up to `token_ids`:
    tokens are only appended while a sequence can still draft, so each is packed once. Packing
    all of a 2k-token sequence every step took ~30 us, the search itself ~2."""
    if len(packed) > len(token_ids) * WIDTH:  # cut at a stop string (a finished sequence): repack
        del packed[:]
    packed += array("q", token_ids[len(packed) // WIDTH :]).tobytes()
    return packed


def propose_ngram(token_ids: list[int], config: SpeculativeConfig, limit: int,
                  packed: bytes | bytearray | None = None) -> list[int]:
    """Up to `limit` tokens that followed the latest earlier occurrence of the sequence's longest
    matching suffix (`prompt_lookup_max` tokens down to `prompt_lookup_min`); [] when none matches.

    The search is bytes.rfind over the tokens packed as 8-byte ints (`packed`, see `pack`; packed
    here when not given): C speed, no per-token Python loop. A hit that does not start on a token
    boundary is skipped."""
    num = len(token_ids)
    limit = min(limit, config.num_speculative_tokens)
    if limit <= 0 or num < config.prompt_lookup_min + 1:
        return []
    if packed is None:
        packed = array("q", token_ids).tobytes()
    assert len(packed) == num * WIDTH, "packed ids out of step with the tokens"
    width = WIDTH
    for n in range(min(config.prompt_lookup_max, num - 1), config.prompt_lookup_min - 1, -1):
        needle = packed[(num - n) * width :]
        end = (num - 1) * width  # the match must end before the last token: one token follows it
        while True:
            at = packed.rfind(needle, 0, end)
            if at < 0:
                break
            if at % width == 0:
                start = at // width + n
                return token_ids[start : start + limit]
            end = at + len(needle) - 1  # a hit across token boundaries: look further left
    return []


def num_accepted(drafts: list[int], samples: list[int]) -> int:
    """How many leading drafts the verification step accepts: draft j stands while the token
    sampled at its position equals it. `samples` has one more entry than `drafts`."""
    accepted = 0
    for draft, sample in zip(drafts, samples):
        if draft != sample:
            break
        accepted += 1
    return accepted

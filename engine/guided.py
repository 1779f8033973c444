"""Guided decoding: which tokens each constrained sequence may sample next.

One llguidance matcher per constrained sequence follows its output tokens. Before a step, each
constrained sampling row gets a bitmask of allowed tokens (bit t of word t // 32 set: token t
allowed); the sampler sees -inf for every other token. After the step, the matcher consumes the
sampled token; a grammar that allows nothing more ends its sequence ("stop").

A constrained row's token is needed on the host before its next mask, so its steps are never run
ahead (SamplingParams.is_plain is False for it).
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from engine.errors import InvalidRequestError
from engine.structured_output import StructuredOutput

logger = logging.getLogger(__name__)


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set to -inf, in place, every logit whose bit is clear. logits [rows, vocab] on any device;
    bitmask int32 [rows, ceil(vocab / 32)] on the host."""
    covered = min(logits.shape[1], bitmask.shape[1] * 32)
    if covered < logits.shape[1]:  # logits past the vocabulary (padding): never a token
        logits[:, covered:] = float("-inf")
    words = bitmask.to(logits.device, non_blocking=True)
    bits = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((words.unsqueeze(-1) >> bits) & 1).flatten(1)[:, :covered]
    logits[:, :covered].masked_fill_(allowed == 0, float("-inf"))


class Guides:
    """The matchers of one engine's constrained sequences, keyed by seq_id.

    The llguidance tokenizer (every token's bytes, ~0.3 s for a 49k vocabulary) is built on the
    first constrained request, so engines that never see one never pay for it."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
        self._tokenizer = tokenizer  # models.tokenizer.Tokenizer, or None (token ids only)
        self.vocab_size = vocab_size  # the logits' width: the mask covers every logit
        self._eos = list(eos_token_ids)
        self._lltokenizer: Any = None
        self._matchers: dict[int, Any] = {}

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._matchers

    def __len__(self) -> int:
        return len(self._matchers)

    def _ll(self) -> Any:
        if self._lltokenizer is None:
            import llguidance

            if self._tokenizer is None or not self._eos:
                raise InvalidRequestError("structured outputs need the model's tokenizer and an end-of-sequence token")
            self._lltokenizer = llguidance.LLTokenizer(
                self._tokenizer.backend.to_str(), n_vocab=self.vocab_size, eos_token=self._eos
            )
        return self._lltokenizer

    def start(self, seq_ids: list[int], constraint: StructuredOutput) -> None:
        """A matcher for each sample of a request; a grammar the vocabulary cannot follow is a 400."""
        import llguidance

        tokenizer = self._ll()
        for seq_id in seq_ids:
            matcher = llguidance.LLMatcher(tokenizer, constraint.grammar, log_level=0)
            if matcher.is_error():
                self.release(seq_ids)
                raise InvalidRequestError(f"invalid {constraint.kind} constraint: {matcher.get_error()}")
            self._matchers[seq_id] = matcher

    def release(self, seq_ids: list[int]) -> None:
        for seq_id in seq_ids:
            self._matchers.pop(seq_id, None)

    def bitmask(self, seq_ids: list[int | None]) -> torch.Tensor | None:
        """Masks for a step's rows (None: a row that does not sample); None when no row is
        constrained. Unconstrained rows allow every token."""
        rows = [(i, self._matchers[s]) for i, s in enumerate(seq_ids) if s is not None and s in self._matchers]
        if not rows:
            return None
        words = bitmask_words(self.vocab_size)
        mask = torch.full((len(seq_ids), words), -1, dtype=torch.int32)
        for i, matcher in rows:
            # a matcher in its error state allows only EOS, so no row is ever left with no token
            matcher.unsafe_compute_mask_ptr(mask[i].data_ptr(), words * 4)
        return mask

    def advance(self, seq_id: int, token: int) -> bool:
        """Feed the sampled token; True when the grammar is complete (nothing but EOS may follow)."""
        matcher = self._matchers[seq_id]
        if not matcher.consume_token(token):
            # cannot happen while masks are applied; end the sequence rather than loop on EOS masks
            logger.error("guided sequence %d sampled token %d its grammar refuses: %s", seq_id, token, matcher.get_error())
            return True
        return matcher.is_stopped()

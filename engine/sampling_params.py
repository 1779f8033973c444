"""Per-request decoding settings, validated once at admission."""
from __future__ import annotations

from dataclasses import dataclass

from engine.errors import InvalidRequestError


@dataclass(frozen=True)
class SamplingParams:
    """OpenAI's sampling fields plus vLLM's extras. temperature == 0 means greedy."""

    n: int = 1
    max_tokens: int | None = 16  # None: up to the model's context
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N logprobs per sampled token (0: only the sampled one)
    include_stop_str_in_output: bool = False
    # beam search (encoder-decoder path)
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool = False
    no_repeat_ngram_size: int = 0

    MAX_N = 16
    MAX_LOGPROBS = 20

    def __post_init__(self) -> None:
        def bad(param: str, why: str) -> None:
            raise InvalidRequestError(f"{param} {why}", param=param)

        if not 1 <= self.n <= self.MAX_N:
            bad("n", f"must be between 1 and {self.MAX_N}, got {self.n}")
        if self.max_tokens is not None and self.max_tokens < 1:
            bad("max_tokens", f"must be at least 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            bad("temperature", f"must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            bad("top_k", f"must be -1, 0 (off) or positive, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", f"must be in [0, 1], got {self.min_p}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad("presence_penalty", f"must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad("frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty}")
        if not 0.0 < self.repetition_penalty <= 2.0:
            bad("repetition_penalty", f"must be in (0, 2], got {self.repetition_penalty}")
        if self.logprobs is not None and not 0 <= self.logprobs <= self.MAX_LOGPROBS:
            bad("logprobs", f"must be in [0, {self.MAX_LOGPROBS}], got {self.logprobs}")
        if any(not s for s in self.stop):
            bad("stop", "must not contain empty strings")
        if not 1 <= self.num_beams <= 16:
            bad("num_beams", f"must be between 1 and 16, got {self.num_beams}")
        if self.no_repeat_ngram_size < 0:
            bad("no_repeat_ngram_size", "must be >= 0")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def is_plain(self) -> bool:
        """No penalties and no logprobs: the token is all a step owes the host, and the row needs
        none of the sequence's own tokens on the host first."""
        return not self.needs_penalties and self.logprobs is None

    @property
    def is_plain_greedy(self) -> bool:
        """Greedy with nothing that needs the whole row of logits: the argmax is the token."""
        return self.is_greedy and self.is_plain

    @property
    def needs_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )

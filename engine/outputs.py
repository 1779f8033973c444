"""What the engine hands back after each step, per request."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    """The sampled token's logprob and the top-N alternatives (token id -> logprob)."""

    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)
    rank: int | None = None  # the token's place among all by logprob, 1 the best (scored prompt tokens)


@dataclass
class CompletionOutput:
    """One of a request's `n` samples: everything generated so far, and what is new this step."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: str | int | None = None  # the stop string or token id that matched
    new_text: str = ""  # delta since the previous output (streaming)
    num_new_tokens: int = 0


@dataclass
class RequestOutput:
    """A request's state after a step. `finished` once every sample has a finish_reason."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None  # per prompt token; None at position 0
    # timings (time.monotonic seconds) for metrics
    arrival_time: float = 0.0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None

"""Per-request decoding settings, validated once at admission."""
from __future__ import annotations

from dataclasses import dataclass

from engine.errors import InvalidRequestError
from engine.structured_output import StructuredOutput
from engine.thinking_budget import ThinkingBudget


@dataclass(frozen=True)
class Bound:
    """A numeric range, closed unless `low_open`. One table of these checks every request and is
    published in the server's OpenAPI schema, so the documented and the enforced ranges agree."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False

    def holds(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or value <= self.high

    def __str__(self) -> str:
        low, high = (f"{x:g}" if isinstance(x, float) else str(x) for x in (self.low, self.high))
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {low}"
        return f"in {'(' if self.low_open else '['}{low}, {high}]"


# Temperatures below this are greedy, as in vLLM: dividing logits by 1e-300 overflows to inf, and
# a softmax over infs is NaN, which samples token 0 whatever the logits (or a grammar) say
GREEDY_TEMPERATURE = 1e-5
MAX_N = 16
MAX_LOGPROBS = 20
MAX_BEAMS = 16
LOGIT_BIAS = Bound(-100.0, 100.0)  # OpenAI's range: -100 bans a token, +100 all but forces it

BOUNDS: dict[str, Bound] = {
    "n": Bound(1, MAX_N),
    "max_tokens": Bound(1),
    "min_tokens": Bound(0),
    "temperature": Bound(0.0, 2.0),
    "top_p": Bound(0.0, 1.0, low_open=True),
    "top_k": Bound(-1),  # -1 and 0 both mean off
    "min_p": Bound(0.0, 1.0),
    "typical_p": Bound(0.0, 1.0, low_open=True),
    "presence_penalty": Bound(-2.0, 2.0),
    "frequency_penalty": Bound(-2.0, 2.0),
    "repetition_penalty": Bound(0.0, 2.0, low_open=True),
    "logprobs": Bound(0, MAX_LOGPROBS),
    "prompt_logprobs": Bound(0, MAX_LOGPROBS),
    "num_beams": Bound(1, MAX_BEAMS),
    # beam scores divide by gen_len ** length_penalty in fp32: finite for any length up to 4,096
    # within +-10 (HF leaves it open; 3e111 overflowed in the step, failing every beam request in it)
    "length_penalty": Bound(-10.0, 10.0),
    "no_repeat_ngram_size": Bound(0),
    # int64, as OpenAI documents it; torch generators take up to 2**64 - 1, which leaves room
    # for the sample index a request with n > 1 adds to its seed
    "seed": Bound(-(2**63), 2**63 - 1),
}


@dataclass(frozen=True)
class SamplingParams:
    """OpenAI's sampling fields plus vLLM's extras. temperature 0 (below GREEDY_TEMPERATURE) means greedy."""

    n: int = 1
    max_tokens: int | None = 16  # None: up to the model's context
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    typical_p: float = 1.0  # locally typical sampling (Meister et al.); TGI's and HF's `typical_p`
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N logprobs per sampled token (0: only the sampled one)
    prompt_logprobs: int | None = None  # the same for each prompt token after the first (echo)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True  # False: the output text keeps special tokens (vLLM's; Mistral's [TOOL_CALLS])
    min_tokens: int = 0  # no EOS, stop token or stop string ends the output before this many tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit before sampling)
    structured: StructuredOutput | None = None  # output constrained to a grammar (engine/guided.py)
    bad_words: tuple[str, ...] = ()  # words the output may not contain (vLLM's; engine/bad_words.py)
    # their token sequences, filled from `bad_words` by the engine's tokenizer at admission (or given)
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()
    thinking_budget: ThinkingBudget | None = None  # a reasoning block's end forced after so many tokens
    # beam search (encoder-decoder path)
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool = False
    no_repeat_ngram_size: int = 0

    def __post_init__(self) -> None:
        for name, bound in BOUNDS.items():
            value = getattr(self, name)
            if value is not None and not bound.holds(value):
                raise InvalidRequestError(f"{name} must be {bound}, got {value}", param=name)
        if any(not s for s in self.stop):
            raise InvalidRequestError("stop must not contain empty strings", param="stop")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidRequestError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
                                      param="min_tokens")
        if any(not w.strip() for w in self.bad_words):
            raise InvalidRequestError("bad_words must not contain empty or blank strings", param="bad_words")
        if any(not ids or min(ids) < 0 for ids in self.bad_words_token_ids):
            raise InvalidRequestError("bad_words_token_ids must be non-empty lists of token ids >= 0",
                                      param="bad_words_token_ids")
        for token, bias in self.logit_bias:
            if token < 0 or not LOGIT_BIAS.holds(bias):
                raise InvalidRequestError(f"logit_bias maps token ids >= 0 to values {LOGIT_BIAS}, got {token}: {bias}",
                                          param="logit_bias")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def is_plain(self) -> bool:
        """No penalties, logprobs, grammar, multi-token bad words or thinking budget: the token is all a
        step owes the host, and the row needs none of the sequence's own tokens on the host first."""
        return (not self.needs_penalties and self.logprobs is None and self.structured is None
                and all(len(ids) == 1 for ids in self.bad_words_token_ids) and self.thinking_budget is None)

    @property
    def is_plain_greedy(self) -> bool:
        """Greedy with nothing that needs the whole row of logits: the argmax is the token."""
        return self.is_greedy and self.is_plain and not self.adjusts_logits

    @property
    def adjusts_logits(self) -> bool:
        """Logits changed before sampling by the request itself (bias, EOS held back, bad words, a forced
        end of thinking): the row needs its whole row of logits, though not its tokens on the host."""
        return (bool(self.logit_bias) or self.min_tokens > 0 or bool(self.bad_words_token_ids)
                or self.thinking_budget is not None)

    @property
    def needs_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )

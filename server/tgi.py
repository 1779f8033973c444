"""text-generation-inference's semantics on kvserve's engine: its parameters as SamplingParams, its
finish reasons, and its token lists. The routes (server/routes_tgi.py) only move these over HTTP.

Where TGI and OpenAI differ, TGI's users get TGI's behaviour: greedy unless asked to sample,
a stop sequence stays in the text, `best_of` is ranked on the server, and a sampled answer
reports the seed that reproduces it.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Any

from engine.detokenizer import IncrementalDetokenizer
from engine.errors import InvalidRequestError
from engine.outputs import CompletionOutput, RequestOutput, TokenLogprob
from engine.sampling_params import BOUNDS, SamplingParams
from engine.structured_output import StructuredOutput
from server.schemas_tgi import TgiGrammar, TgiParameters


@dataclasses.dataclass(frozen=True)
class TgiPlan:
    """One request: what to run, and what the answer reports."""

    params: SamplingParams
    seed: int | None  # the first sample's seed when sampling (reported); None when greedy
    details: bool
    top_n: int
    full_text: bool
    truncate: int | None

    @property
    def prefill(self) -> bool:
        """decoder_input_details (with details): the prompt is scored."""
        return self.params.prompt_logprobs is not None


def samples(p: TgiParameters) -> bool:
    """TGI samples when asked to, or when any sampling filter is set (its token chooser's rule)."""
    return bool(p.do_sample) or any(v is not None and v != 1.0 for v in (p.temperature, p.top_p, p.typical_p)) \
        or p.top_k is not None


def plan(p: TgiParameters | None, stream: bool) -> TgiPlan:
    """The request's plan; what TGI refuses is a 400 naming the field."""
    p = p or TgiParameters()
    sampling = samples(p)
    best_of = p.best_of or 1
    if best_of > 1 and not sampling:
        raise InvalidRequestError("best_of > 1 needs sampling: set do_sample (or temperature, top_k, top_p, "
                                  "typical_p); greedy samples would all be the same", "parameters.best_of")
    if best_of > 1 and stream:
        raise InvalidRequestError("best_of > 1 cannot be streamed: the best is known only at the end",
                                  "parameters.best_of")
    if p.decoder_input_details and stream:
        raise InvalidRequestError("decoder_input_details cannot be streamed",
                                  "parameters.decoder_input_details")
    seed = None
    if sampling:  # a drawn seed is reported, so any sampled answer can be asked for again
        seed = p.seed if p.seed is not None else random.randrange(BOUNDS["seed"].high - best_of)
    top_n = p.top_n_tokens or 0
    details = bool(p.details)
    # the sampled token's logprob: every streamed token and every detailed answer carries one,
    # and best_of ranks by their sum
    logprobs = top_n if (details or stream or best_of > 1) else None
    params = SamplingParams(
        n=best_of,
        max_tokens=p.max_new_tokens,
        temperature=(p.temperature or 1.0) if sampling else 0.0,
        top_p=p.top_p or 1.0,
        top_k=p.top_k or 0,
        typical_p=p.typical_p or 1.0,
        repetition_penalty=p.repetition_penalty or 1.0,
        frequency_penalty=p.frequency_penalty or 0.0,
        seed=seed,
        stop=tuple(p.stop or ()),
        include_stop_str_in_output=True,  # TGI's text keeps the stop sequence
        logprobs=logprobs,
        prompt_logprobs=0 if details and p.decoder_input_details else None,
        structured=grammar(p.grammar),
    )
    return TgiPlan(params, seed, details, top_n, bool(p.return_full_text), p.truncate)


def grammar(g: TgiGrammar | None) -> StructuredOutput | None:
    if g is None:
        return None
    if g.type == "regex":
        return StructuredOutput.regex(str(g.value), "parameters.grammar")
    schema = g.value["schema"] if g.type == "json_schema" else g.value  # type: ignore[index]
    return StructuredOutput.json_schema(schema, "parameters.grammar")


def truncated(ids: list[int], keep: int | None) -> list[int]:
    """TGI's `truncate`: the prompt's last `keep` tokens (the end is what the answer continues)."""
    return ids if keep is None or len(ids) <= keep else ids[-keep:]


def finish_reason(c: CompletionOutput) -> str:
    if c.finish_reason == "length":
        return "length"
    return "stop_sequence" if isinstance(c.stop_reason, str) else "eos_token"


def best_index(out: RequestOutput) -> int:
    """The sample with the highest total logprob (the first of equals), as TGI picks best_of."""
    totals = [sum(lp.logprob for lp in c.logprobs or ()) for c in out.outputs]
    return max(range(len(totals)), key=lambda i: (totals[i], -i))


class _Raw:
    """A decoder that keeps special tokens: TGI's token texts show them (flagged `special`)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


class TokenTexts:
    """Each generated token's text as it adds to the answer: concatenated, they are the text
    (special tokens included). A token that ends inside a UTF-8 character has "" and the next
    token carries the whole character, as TGI streams them."""

    def __init__(self, tokenizer: Any) -> None:
        self.decoder = _Raw(tokenizer)
        self.special = frozenset(tokenizer.all_special_ids)
        self.detok = IncrementalDetokenizer()

    def token(self, token_id: int, lp: TokenLogprob | None) -> dict:
        self.detok.add(self.decoder, token_id, check_stop=False)
        return {"id": token_id, "text": self.detok.delta(finished=True),
                "logprob": lp.logprob if lp is not None else None, "special": token_id in self.special}


def top_tokens(lp: TokenLogprob | None, text_of: Any, special: frozenset[int], n: int) -> list[dict]:
    """The `n` most likely tokens at one step, most likely first (each token's own text)."""
    if lp is None or not n:
        return []
    ranked = sorted(lp.top.items(), key=lambda kv: -kv[1])[:n]
    return [{"id": t, "text": text_of(t), "logprob": v, "special": t in special} for t, v in ranked]


def prefill(out: RequestOutput, text_of: Any) -> list[dict]:
    """The prompt's tokens, each with the logprob the model gave it (none for the first)."""
    scored = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
    return [{"id": t, "text": text_of(t), "logprob": e.logprob if e is not None else None}
            for t, e in zip(out.prompt_token_ids, scored)]


def sequence(out: RequestOutput, c: CompletionOutput, plan_: TgiPlan, tokenizer: Any, text_of: Any) -> dict:
    """One sample's details: finish reason, seed, prompt and generated tokens (and their tops)."""
    texts = TokenTexts(tokenizer)
    lps = c.logprobs or [None] * len(c.token_ids)
    body: dict[str, Any] = {
        "finish_reason": finish_reason(c),
        "generated_tokens": len(c.token_ids),
        "seed": None if plan_.seed is None else plan_.seed + c.index,  # sample i ran on seed + i
        "prefill": prefill(out, text_of) if plan_.prefill else [],
        "tokens": [texts.token(t, lp) for t, lp in zip(c.token_ids, lps)],
    }
    if plan_.top_n:
        body["top_tokens"] = [top_tokens(lp, text_of, texts.special, plan_.top_n) for lp in lps]
    return body


def generated_text(inputs: str, c: CompletionOutput, plan_: TgiPlan) -> str:
    return inputs + c.text if plan_.full_text else c.text

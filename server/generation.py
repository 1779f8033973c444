"""Route-independent generation plumbing: request -> SamplingParams, prompts -> token ids,
running several prompts at once, and OpenAI's logprob shapes.

Kept apart from the routes so /v1/completions, /v1/chat/completions (and a future translation
route) share one implementation of the fiddly parts.
"""
from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import Request

from engine.async_engine import AsyncEngine
from engine.errors import InvalidRequestError
from engine.outputs import RequestOutput, TokenLogprob
from engine.request import GenerationRequest
from engine.sampling_params import BOUNDS, SamplingParams
from engine.structured_output import StructuredOutput
from server.errors import ClientDisconnected
from server.schemas import ChatMessage, _SamplingFields
from server.settings import ServerSettings
from server.tools import template_messages

T = TypeVar("T")


# generation_config.json's sampling settings that become request defaults (vLLM's --generation-config auto)
MODEL_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def model_defaults(generation_config: dict[str, Any]) -> dict[str, Any]:
    """The sampling settings of a model's generation_config.json that requests inherit where they set
    none, as vLLM applies them: temperature, top_p, top_k, min_p, repetition_penalty, and
    max_new_tokens as the default max_tokens. A value out of the API's range is left out."""
    picked = {k: generation_config[k] for k in MODEL_DEFAULTS if isinstance(generation_config.get(k), (int, float))}
    if isinstance(generation_config.get("max_new_tokens"), int):
        picked["max_tokens"] = generation_config["max_new_tokens"]
    return {k: v for k, v in picked.items() if BOUNDS[k].holds(v)}


def defaults_for(engine: Any, settings: ServerSettings) -> dict[str, Any]:
    """The request defaults `engine`'s model gives under the server's --generation-config."""
    return model_defaults(engine.info.generation_defaults) if settings.generation_config == "auto" else {}


def sampling_params(req: _SamplingFields, max_tokens: int | None, logprobs: int | None,
                    defaults: dict[str, Any] | None = None) -> SamplingParams:
    """OpenAI fields -> SamplingParams; unset (None) fields take the model's `defaults`
    (`model_defaults`), then SamplingParams' own."""
    fields: dict[str, Any] = {
        "n": req.n,
        "max_tokens": max_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "min_p": req.min_p,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "repetition_penalty": req.repetition_penalty,
        "seed": req.seed,
        "logprobs": logprobs,
        "ignore_eos": req.ignore_eos,
        "include_stop_str_in_output": req.include_stop_str_in_output,
        "skip_special_tokens": req.skip_special_tokens,
        "min_tokens": req.min_tokens,
    }
    if req.stop is not None:
        fields["stop"] = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop)
    if req.logit_bias:
        fields["logit_bias"] = tuple((int(token), bias) for token, bias in req.logit_bias.items())
    if req.bad_words:
        fields["bad_words"] = tuple(req.bad_words)
    if req.stop_token_ids is not None:
        fields["stop_token_ids"] = tuple(req.stop_token_ids)
    for key, value in (defaults or {}).items():
        if fields.get(key) is None:
            fields[key] = value
    kwargs = {k: v for k, v in fields.items() if v is not None or k in ("max_tokens", "logprobs", "seed")}
    return SamplingParams(**kwargs, structured=structured_output(req))  # checks ranges: InvalidRequestError -> 400


def structured_output(req: _SamplingFields) -> StructuredOutput | None:
    """OpenAI's `response_format` or vLLM's `structured_outputs` -> the compiled constraint (a bad
    schema, pattern or grammar is a 400 naming the field)."""
    fmt, so = req.response_format, req.structured_outputs
    wants_format = fmt is not None and fmt.type != "text"
    if wants_format and so is not None:
        raise InvalidRequestError("give response_format or structured_outputs, not both", "structured_outputs")
    if wants_format:
        if fmt.type == "json_object":
            return StructuredOutput.json_object("response_format")
        return StructuredOutput.json_schema(fmt.json_schema.schema_, "response_format")
    if so is None:
        return None
    if so.json_ is not None:
        return StructuredOutput.json_schema(so.json_)
    if so.regex is not None:
        return StructuredOutput.regex(so.regex)
    if so.choice is not None:
        return StructuredOutput.choice(so.choice)
    if so.grammar is not None:
        return StructuredOutput.lark(so.grammar)
    return StructuredOutput.json_object()


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    if not ids:
        raise InvalidRequestError(f"{param} must not be empty", param)
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(
            f"{param} has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}", param
        )


def completion_prompts(prompt: str | list, tokenizer: Any, vocab_size: int, max_prompts: int) -> list[list[int]]:
    """OpenAI's four prompt forms (str, [str], [int], [[int]]) -> a list of token-id prompts."""
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif isinstance(prompt[0], int):  # the request schema refuses empty lists
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if len(prompts) > max_prompts:
        raise InvalidRequestError(f"at most {max_prompts} prompts per request, got {len(prompts)}", "prompt")
    out = []
    for p in prompts:
        ids = tokenizer.encode(p) if isinstance(p, str) else list(p)
        check_token_ids(ids, vocab_size, "prompt")
        out.append(ids)
    return out


# keys the server itself passes to chat templates: chat_template_kwargs may not replace them
_TEMPLATE_ARGS = ("messages", "add_generation_prompt", "tools")


def render_chat(messages: list[ChatMessage], tokenizer: Any, add_generation_prompt: bool,
                tools: list[dict[str, Any]] | None = None, template_kwargs: dict[str, Any] | None = None,
                continue_final: bool = False) -> str:
    """The model's chat template rendered, as HF's `apply_chat_template(tokenize=False)`. `tools` reach
    the template as HF's `tools` (a template without tool support ignores them); `template_kwargs`
    are the request's `chat_template_kwargs` (e.g. Qwen3's `enable_thinking`). With `continue_final`
    the prompt ends inside the last (assistant) message, for the model to carry on writing it."""
    convo = template_messages(messages)
    extra = dict(template_kwargs or {})
    taken = [k for k in extra if k in _TEMPLATE_ARGS]
    if taken:
        raise InvalidRequestError(f"chat_template_kwargs may not set {taken}: the request's own fields do",
                                  "chat_template_kwargs")
    if tools:
        extra["tools"] = tools
    final = ""
    if continue_final:
        if add_generation_prompt:
            raise InvalidRequestError("continue_final_message needs add_generation_prompt: false",
                                      "continue_final_message")
        final = convo[-1]["content"].strip()
        if convo[-1]["role"] != "assistant" or not final:
            raise InvalidRequestError("continue_final_message needs a last assistant message with content",
                                      "continue_final_message")
    try:
        text = tokenizer.apply_chat_template(convo, add_generation_prompt=add_generation_prompt, **extra)
    except Exception as exc:  # no template, or the template itself raised (e.g. role order)
        raise InvalidRequestError(f"cannot apply the model's chat template: {exc}", "messages") from exc
    if continue_final:
        # as HF: cut after the final message's text, dropping the template's end-of-turn
        at = text.rfind(final)
        if at < 0:
            raise InvalidRequestError("the chat template does not keep the final message's text, so it cannot "
                                      "be continued", "continue_final_message")
        text = text[: at + len(final)]
    return text


def chat_prompt(text: str, tokenizer: Any) -> list[int]:
    """A rendered chat's token ids (the template already wrote BOS)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise InvalidRequestError("messages render to an empty prompt", "messages")
    return ids


# ---- running -------------------------------------------------------------------------------
async def cancel_on_disconnect(request: Request, work: Awaitable[T], poll_s: float = 0.5) -> T:
    """Await `work`, cancelling it (which aborts its engine requests) if the client goes away."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise ClientDisconnected()
    finally:
        if not task.done():
            task.cancel()


async def run_all(async_engine: AsyncEngine, name: str, request_id: str,
                  payloads: list[GenerationRequest]) -> list[RequestOutput]:
    """Final outputs of several prompts run concurrently; one failure cancels the rest."""
    tasks = [asyncio.ensure_future(async_engine.run(name, f"{request_id}-{i}", p)) for i, p in enumerate(payloads)]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()


async def open_streams(async_engine: AsyncEngine, name: str, request_id: str,
                       payloads: list[GenerationRequest]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Start every prompt's stream and wait for each one's first output BEFORE returning, so
    admission errors (prompt too long, queue full) become HTTP statuses, not mid-stream events.
    Yields (prompt index, output) in arrival order; closing it aborts every unfinished request."""
    streams = [async_engine.stream(name, f"{request_id}-{i}", p) for i, p in enumerate(payloads)]
    firsts = [asyncio.ensure_future(s.__anext__()) for s in streams]
    try:
        first_outputs = await asyncio.gather(*firsts)
    except BaseException:
        for t in firsts:
            t.cancel()
        await asyncio.gather(*firsts, return_exceptions=True)
        for s in streams:
            await s.aclose()
        raise
    return _merge(streams, first_outputs)


async def _merge(streams: list[AsyncIterator[RequestOutput]],
                 first_outputs: list[RequestOutput]) -> AsyncIterator[tuple[int, RequestOutput]]:
    for i, out in enumerate(first_outputs):
        yield i, out
    live = {i for i, out in enumerate(first_outputs) if not out.finished}
    pending: dict[asyncio.Future, int] = {asyncio.ensure_future(streams[i].__anext__()): i for i in live}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                i = pending.pop(fut)
                try:
                    out = fut.result()
                except StopAsyncIteration:
                    continue
                yield i, out
                if not out.finished:
                    pending[asyncio.ensure_future(streams[i].__anext__())] = i
    finally:
        for fut in pending:
            fut.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for s in streams:
            await s.aclose()  # runs AsyncEngine.stream's finally: aborts what is unfinished


# ---- logprobs --------------------------------------------------------------------------
class TokenText:
    """Token id -> its text, memoised per request (logprob tables repeat the same ids)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}
        self.widths: dict[int, int] = {}

    def width(self, token_id: int) -> int:
        """Characters the token adds to the answer's text, which skips special tokens: what a
        `text_offset` advances by (a special token shows in `tokens` but takes no room)."""
        width = self.widths.get(token_id)
        if width is None:
            width = len(self.tokenizer.decode([token_id], skip_special_tokens=True))
            self.widths[token_id] = width
        return width

    def __call__(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self.cache[token_id] = text
        return text


def completion_logprobs(entries: list[TokenLogprob], text_of: TokenText, start_offset: int) -> tuple[dict, int]:
    """The legacy completions `logprobs` object for `entries`, and the text offset after them."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    offset = start_offset
    for e in entries:
        tok = text_of(e.token_id)
        tokens.append(tok)
        token_logprobs.append(e.logprob)
        tops.append({text_of(t): lp for t, lp in sorted(e.top.items(), key=lambda kv: -kv[1])} or None)
        offsets.append(offset)
        offset += text_of.width(e.token_id)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}, offset


def echo_logprobs(prompt_ids: list[int], scored: list[TokenLogprob | None], text_of: TokenText,
                  completion: dict | None) -> dict:
    """`echo` with `logprobs`: the prompt's tokens first, as OpenAI answers. Its first token has no
    logprob (nothing predicts it); `completion`'s entries, if any, follow."""
    head, _ = completion_logprobs([e for e in scored[1:] if e is not None], text_of, text_of.width(prompt_ids[0]))
    tail = completion or {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    return {"tokens": [text_of(prompt_ids[0])] + head["tokens"] + tail["tokens"],
            "token_logprobs": [None] + head["token_logprobs"] + tail["token_logprobs"],
            "top_logprobs": [None] + head["top_logprobs"] + tail["top_logprobs"],
            "text_offset": [0] + head["text_offset"] + tail["text_offset"]}


def prompt_logprobs(scored: list[TokenLogprob | None], text_of: TokenText, num_top: int) -> list[dict | None]:
    """vLLM's `prompt_logprobs` answer: None for the first prompt token (nothing predicts it), then per
    token its own entry first and the `num_top` best, each by token id (a string): logprob, rank
    (1 + the tokens more likely) and the decoded token."""
    out: list[dict | None] = [None]
    for e in scored[1:]:
        entry = {str(e.token_id): {"logprob": e.logprob, "rank": e.rank, "decoded_token": text_of(e.token_id)}}
        for rank, (token, lp) in enumerate(sorted(e.top.items(), key=lambda kv: -kv[1])[:num_top], start=1):
            entry.setdefault(str(token), {"logprob": lp, "rank": rank, "decoded_token": text_of(token)})
        out.append(entry)
    return out


def top_trimmed(scored: list[TokenLogprob | None], num_top: int) -> list[TokenLogprob | None]:
    """The scored prompt with each entry's alternatives cut to the `num_top` best (a request that asks
    two uses of the prompt's scores for different N scores it once, with the larger)."""
    return [None if e is None else dataclasses.replace(e, top=dict(sorted(e.top.items(), key=lambda kv: -kv[1])
                                                                    [:num_top])) for e in scored]


def chat_logprobs(entries: list[TokenLogprob], text_of: TokenText, num_top: int) -> dict:
    content = []
    for e in entries:
        tok = text_of(e.token_id)
        top = sorted(e.top.items(), key=lambda kv: -kv[1])[:num_top]
        content.append({
            "token": tok,
            "logprob": e.logprob,
            "bytes": list(tok.encode("utf-8")),
            "top_logprobs": [
                {"token": text_of(t), "logprob": lp, "bytes": list(text_of(t).encode("utf-8"))} for t, lp in top
            ],
        })
    return {"content": content}


def usage(outputs: list[RequestOutput], cached: bool = True) -> dict:
    """OpenAI's usage; `cached` adds how many prompt tokens the prefix cache held (generation)."""
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    body: dict = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    if cached:
        body["prompt_tokens_details"] = {"cached_tokens": sum(o.num_cached_tokens for o in outputs)}
    return body

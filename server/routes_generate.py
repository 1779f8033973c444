"""POST /v1/completions and /v1/chat/completions (OpenAI shapes, SSE streaming)."""
from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from engine.errors import InvalidRequestError
from engine.outputs import RequestOutput
from engine.request import GenerationRequest
from engine.sampling_params import SamplingParams
from server import generation as gen
from server import reasoning, sse, tools
from server.openapi import ENGINE_ERRORS, answers
from server.schemas import (
    ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, CompletionChunk, CompletionRequest,
    CompletionResponse,
)
from server.state import get_state, lora_name, new_request_id

router = APIRouter()

# ---- /v1/completions ---------------------------------------------------------------------
@router.post("/v1/completions", responses=answers(CompletionResponse, ENGINE_ERRORS, stream=CompletionChunk))
async def completions(body: CompletionRequest, request: Request) -> Any:
    state = get_state(request)
    name, engine = state.resolve(body.model, "generate")
    if body.best_of is not None and body.best_of != body.n:
        raise InvalidRequestError(f"best_of must equal n ({body.n}): extra samples are not ranked on the server",
                                  "best_of")
    # max_tokens 0 with echo answers the prompt alone (scored, with logprobs): one token is drawn in the
    # prefill step that scores the prompt anyway, then left out of the answer
    score_only = body.max_tokens == 0
    if score_only and not body.echo:
        raise InvalidRequestError("max_tokens 0 answers with the prompt alone: it needs echo", "max_tokens")
    if score_only and body.stream:
        raise InvalidRequestError("max_tokens 0 (the prompt alone) is not streamed", "stream")
    params = gen.sampling_params(body, 1 if score_only else body.max_tokens, body.logprobs,
                                 gen.defaults_for(engine, state.settings))
    echo_scores = body.logprobs if body.echo else None  # echo with logprobs scores the prompt's tokens too
    params = _scoring_prompt(params, body, echo_scores)
    prompts = gen.completion_prompts(
        body.prompt, engine.tokenizer, engine.info.vocab_size, state.settings.max_prompts_per_request
    )
    payloads = [GenerationRequest(p, params, lora_name(engine, name), body.priority) for p in prompts]
    request_id = new_request_id("cmpl")
    text_of = gen.TokenText(engine.tokenizer)
    echo = [engine.tokenizer.decode(p, skip_special_tokens=True) if body.echo else "" for p in prompts]
    n = params.n

    if body.stream:
        merged = await gen.open_streams(state.async_engine, name, request_id, payloads)
        include_usage, continuous = _usage_options(body)
        events = _completion_events(merged, request_id, name, n, body.logprobs, text_of, echo, include_usage,
                                    continuous)
        return sse.response(events, state, request_id)

    try:
        finals = await gen.cancel_on_disconnect(request, gen.run_all(state.async_engine, name, request_id, payloads))
    finally:
        state.metrics.forget(request_id)
    if score_only:  # the drawn token goes: no text, no logprob, no usage, finished by length
        finals = [dataclasses.replace(out, outputs=[dataclasses.replace(
            c, text="", token_ids=[], logprobs=[] if c.logprobs is not None else None, finish_reason="length",
            stop_reason=None) for c in out.outputs]) for out in finals]
    choices = []
    for p, out in enumerate(finals):
        for c in out.outputs:
            logprobs = None
            if body.logprobs is not None and c.logprobs is not None:
                logprobs, _ = gen.completion_logprobs(c.logprobs, text_of, len(echo[p]))
                if echo_scores is not None:
                    logprobs = gen.echo_logprobs(out.prompt_token_ids, gen.top_trimmed(out.prompt_logprobs, echo_scores),
                                                 text_of, logprobs)
            choice = {"index": p * n + c.index, "text": echo[p] + c.text, "logprobs": logprobs,
                      "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
            if body.prompt_logprobs is not None:
                choice["prompt_logprobs"] = gen.prompt_logprobs(out.prompt_logprobs, text_of, body.prompt_logprobs)
            choices.append(choice)
    return JSONResponse({"id": request_id, "object": "text_completion", "created": int(time.time()),
                         "model": name, "choices": choices, "usage": gen.usage(finals)})


def _scoring_prompt(params: SamplingParams, body: Any, echo_scores: int | None = None) -> SamplingParams:
    """The params scoring the prompt for vLLM's `prompt_logprobs` (not streamed) and for echo's logprobs,
    with the larger N where both ask."""
    if body.prompt_logprobs is not None and body.stream:
        raise InvalidRequestError("prompt_logprobs is answered in non-streamed requests only", "prompt_logprobs")
    wanted = [k for k in (body.prompt_logprobs, echo_scores) if k is not None]
    return dataclasses.replace(params, prompt_logprobs=max(wanted)) if wanted else params


def _usage_options(body: Any) -> tuple[bool, bool]:
    """(a last chunk with the usage, every chunk with the usage so far): `stream_options`."""
    opts = body.stream_options
    include = bool(opts and opts.include_usage)
    return include, include and opts.continuous_usage_stats


async def _completion_events(merged: AsyncIterator[tuple[int, RequestOutput]], request_id: str, model: str,
                             n: int, logprobs: int | None, text_of: gen.TokenText, echo: list[str],
                             include_usage: bool, continuous: bool = False) -> AsyncIterator[str]:
    created = int(time.time())
    sent_lp: dict[int, int] = {}  # choice index -> logprob entries already sent
    # choice index -> text_offset of its next logprob entry: summed token widths, as the whole
    # answer counts them (the text streamed so far lags where the detokenizer holds bytes back)
    lp_offsets: dict[int, int] = {}
    started: set[int] = set()  # choices whose echo went out
    done: set[int] = set()
    finals: dict[int, RequestOutput] = {}

    def chunk(choices: list[dict]) -> str:
        usage = {"usage": gen.usage(list(finals.values()))} if continuous else {}
        return sse.event({"id": request_id, "object": "text_completion", "created": created, "model": model,
                         "choices": choices, **usage})

    async for p, out in merged:
        finals[p] = out
        choices = []
        for c in out.outputs:
            idx = p * n + c.index
            if idx in done:
                continue
            text = c.new_text
            first = idx not in started
            if first:
                text = echo[p] + text
                started.add(idx)
            lp = None
            if logprobs is not None and c.logprobs is not None:
                fresh = c.logprobs[sent_lp.get(idx, 0):]
                sent_lp[idx] = len(c.logprobs)
                lp, lp_offsets[idx] = gen.completion_logprobs(fresh, text_of, lp_offsets.get(idx, len(echo[p])))
                if first and out.prompt_logprobs is not None:
                    lp = gen.echo_logprobs(out.prompt_token_ids, out.prompt_logprobs, text_of, lp)
            if not text and c.finish_reason is None and not (lp and lp["tokens"]):
                continue
            if c.finish_reason is not None:
                done.add(idx)
            choices.append({"index": idx, "text": text, "logprobs": lp, "finish_reason": c.finish_reason,
                            "stop_reason": c.stop_reason})
        if choices:
            yield chunk(choices)
    if include_usage:
        yield sse.event({"id": request_id, "object": "text_completion", "created": created, "model": model,
                        "choices": [], "usage": gen.usage(list(finals.values()))})


# ---- /v1/chat/completions ----------------------------------------------------------------
@router.post("/v1/chat/completions",
             responses=answers(ChatCompletionResponse, ENGINE_ERRORS, stream=ChatCompletionChunk))
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    state = get_state(request)
    name, engine = state.resolve(body.model, "generate")
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequestError("top_logprobs requires logprobs to be true", "top_logprobs")
    num_top = body.top_logprobs or 0
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    params = gen.sampling_params(body, max_tokens, num_top if body.logprobs else None,
                                 gen.defaults_for(engine, state.settings))
    tool_plan = tools.plan(body.tools, body.tool_choice, state.settings.tool_call_parser)
    params = tools.apply(params, tool_plan, body.tools, body.parallel_tool_calls,
                         "response_format or structured_outputs")
    params = _scoring_prompt(params, body)
    tool_defs = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    template_kwargs = dict(body.chat_template_kwargs or {})
    if body.reasoning_effort is not None:
        template_kwargs.setdefault("reasoning_effort", body.reasoning_effort)
    text = gen.render_chat(body.messages, engine.tokenizer, body.add_generation_prompt, tool_defs,
                           template_kwargs, body.continue_final_message)
    thinking = reasoning.plan(state.settings.reasoning_parser, text, params.structured is not None,
                              body.include_reasoning)
    if body.thinking_token_budget is not None:
        params = dataclasses.replace(params, thinking_budget=reasoning.budget(
            thinking, body.thinking_token_budget, engine.tokenizer, "thinking_token_budget"))
    payloads = [GenerationRequest(gen.chat_prompt(text, engine.tokenizer), params, lora_name(engine, name),
                                  body.priority)]
    request_id = new_request_id("chatcmpl")
    text_of = gen.TokenText(engine.tokenizer)

    if body.stream:
        merged = await gen.open_streams(state.async_engine, name, request_id, payloads)
        include_usage, continuous = _usage_options(body)
        events = _chat_events(merged, request_id, name, body.logprobs, num_top, text_of, include_usage, tool_plan,
                              thinking, continuous)
        return sse.response(events, state, request_id)

    try:
        finals = await gen.cancel_on_disconnect(request, gen.run_all(state.async_engine, name, request_id, payloads))
    finally:
        state.metrics.forget(request_id)
    out = finals[0]
    choices = []
    for c in out.outputs:
        logprobs = gen.chat_logprobs(c.logprobs, text_of, num_top) if body.logprobs and c.logprobs is not None else None
        thought, answer = reasoning.split(c.text, thinking.opened) if thinking else (None, c.text)
        message, finish = tools.chat_message(tool_plan, answer, c.finish_reason)
        if thinking:
            message = thinking.message(message, thought)
        choices.append({"index": c.index, "message": message, "logprobs": logprobs, "finish_reason": finish,
                        "stop_reason": c.stop_reason})
    answer = {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": name,
              "choices": choices, "usage": gen.usage(finals)}
    if body.prompt_logprobs is not None:
        answer["prompt_logprobs"] = gen.prompt_logprobs(out.prompt_logprobs, text_of, body.prompt_logprobs)
    return JSONResponse(answer)


async def _chat_events(merged: AsyncIterator[tuple[int, RequestOutput]], request_id: str, model: str,
                       logprobs: bool, num_top: int, text_of: gen.TokenText,
                       include_usage: bool, tool_plan: tools.ToolPlan,
                       thinking: reasoning.Thinking | None, continuous: bool = False) -> AsyncIterator[str]:
    created = int(time.time())
    streams: dict[int, tools.ToolStream] = {}  # per choice, where tools may be called
    thoughts: dict[int, reasoning.ReasoningStream] = {}  # per choice, with a reasoning parser
    sent_lp: dict[int, int] = {}
    started: set[int] = set()
    done: set[int] = set()
    final: RequestOutput | None = None

    def chunk(choices: list[dict]) -> str:
        usage = {"usage": gen.usage([final])} if continuous and final is not None else {}
        return sse.event({"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                         "choices": choices, **usage})

    async for _, out in merged:
        final = out
        choices = []
        for c in out.outputs:
            if c.index in done:
                continue
            if c.index not in started:  # OpenAI opens each choice with the role
                started.add(c.index)
                yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None}])
            lp = None
            if logprobs and c.logprobs is not None:
                fresh = c.logprobs[sent_lp.get(c.index, 0):]
                sent_lp[c.index] = len(c.logprobs)
                lp = gen.chat_logprobs(fresh, text_of, num_top) if fresh else None
            new_text, thought = c.new_text, ""
            if thinking:
                thought, new_text = thinking.feed(thoughts.setdefault(c.index, thinking.stream()), new_text,
                                                  c.finish_reason is not None)
            if tool_plan.calls_tools:
                delta, finish = streams.setdefault(c.index, tools.ToolStream(tool_plan)).feed(new_text, c.finish_reason)
                delta = delta or {}
            else:
                delta, finish = ({"content": new_text} if new_text else {}), c.finish_reason
            if thought:
                delta = {"reasoning": thought, "reasoning_content": thought, **delta}
            if not delta and finish is None and lp is None:
                continue
            if finish is not None:
                done.add(c.index)
            choices.append({"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": finish,
                            "stop_reason": c.stop_reason})
        if choices:
            yield chunk(choices)
    if include_usage and final is not None:
        yield sse.event({"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [], "usage": gen.usage([final])})

"""POST /v1/responses (OpenAI's Responses API, SSE streaming or in the background), and GET/DELETE
of stored answers, POST .../cancel of background ones. A background response keeps its stream's
events (server/event_log.py), so `stream: true` follows it and GET ...?stream=true resumes it.

A request is a chat request in another shape: its input items (after a stored conversation, with
`previous_response_id`) become chat messages under the model's template, and the answer's
reasoning, text and tool calls are split exactly as /v1/chat/completions splits them.
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from engine.errors import InvalidRequestError, KVServeError
from engine.outputs import CompletionOutput, RequestOutput
from engine.request import GenerationRequest
from engine.sampling_params import SamplingParams
from server import generation as gen
from server import reasoning, sse, tools
from server.deltas import DeltaSplitter
from server.event_log import EventLog
from server.openapi import ENGINE_ERRORS, answers
from server.responses import (
    ResponseBuilder, chat_messages, chat_tools, input_messages, output_message, page, reasoning_tokens, stored_items,
    structured_output, truncated,
)
from server.responses_store import StoredResponse
from server.schemas_responses import InputItemList, ResponseDeleted, ResponseEvent, ResponseObject, ResponsesRequest
from server.state import ServerState, get_state, lora_name, new_item_id

router = APIRouter()

LOGPROBS = "message.output_text.logprobs"


@dataclasses.dataclass
class _Answer:
    """What turning one choice's deltas into events needs, kept across a stream's events."""

    builder: ResponseBuilder
    split: DeltaSplitter
    text_of: gen.TokenText | None  # set when logprobs are asked for
    num_top: int
    sent_logprobs: int = 0

    def feed(self, c: CompletionOutput) -> list[dict[str, Any]]:
        thought, content, calls = self.split.feed(c.new_text, c.finish_reason)
        events = self.builder.reasoning(thought) if thought else []
        logprobs = None
        if self.text_of is not None and c.logprobs is not None:
            fresh, self.sent_logprobs = c.logprobs[self.sent_logprobs:], len(c.logprobs)
            logprobs = gen.chat_logprobs(fresh, self.text_of, self.num_top)["content"]
        return events + self.builder.text(content, logprobs) + self.builder.tool_calls(calls)

    def finish(self, out: RequestOutput, tokenizer: Any) -> list[dict[str, Any]]:
        c = out.outputs[0]
        status = "incomplete" if c.finish_reason == "length" else "completed"
        thought = self.split.reasoned
        end_ids = tokenizer.encode(reasoning.END, add_special_tokens=False) if thought else []
        used = reasoning_tokens(c.token_ids, end_ids, thought)
        usage = {"input_tokens": len(out.prompt_token_ids),
                 "input_tokens_details": {"cached_tokens": out.num_cached_tokens,
                                          "cache_write_tokens": len(out.prompt_token_ids) - out.num_cached_tokens},
                 "output_tokens": len(c.token_ids), "output_tokens_details": {"reasoning_tokens": used},
                 "total_tokens": len(out.prompt_token_ids) + len(c.token_ids)}
        return self.builder.finish(status, usage)


def _sampling_params(body: ResponsesRequest, logprobs: int | None, defaults: dict[str, Any]) -> SamplingParams:
    """The request's fields over the model's defaults (server/generation.py's `defaults_for`)."""
    fields = {**defaults, "logprobs": logprobs, "seed": body.seed,
              **{k: v for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
                 if (v := getattr(body, k)) is not None}}
    fields["max_tokens"] = body.max_output_tokens if body.max_output_tokens is not None else defaults.get("max_tokens")
    return SamplingParams(**fields, structured=structured_output(body))  # checks ranges: a 400


def _head(body: ResponsesRequest, response_id: str, model: str, stored: bool) -> dict[str, Any]:
    fmt = body.text.format.model_dump(by_alias=True, exclude_none=True) if body.text and body.text.format else None
    tool_choice = body.tool_choice or ("auto" if body.tools else "none")
    return {
        "id": response_id, "object": "response", "created_at": int(time.time()), "error": None,
        "instructions": body.instructions, "max_output_tokens": body.max_output_tokens, "model": model,
        "parallel_tool_calls": body.parallel_tool_calls, "previous_response_id": body.previous_response_id,
        "reasoning": body.reasoning.model_dump() if body.reasoning else None, "store": stored,
        "temperature": body.temperature, "text": {"format": fmt or {"type": "text"}},
        "tool_choice": tool_choice if isinstance(tool_choice, str) else tool_choice.model_dump(),
        "tools": [t.model_dump(exclude_none=True) for t in body.tools or []], "top_p": body.top_p,
        "top_logprobs": body.top_logprobs, "truncation": body.truncation or "disabled",
        "background": bool(body.background),
        "user": body.user,
        "metadata": body.metadata or {},
    }


@router.post("/v1/responses", responses=answers(ResponseObject, ENGINE_ERRORS, stream=ResponseEvent, done=False))
async def create_response(body: ResponsesRequest, request: Request) -> Any:
    state = get_state(request)
    name, engine = state.resolve(body.model, "generate")
    history: list[dict[str, Any]] = []
    if body.previous_response_id:
        previous = state.responses.get(body.previous_response_id, "previous_response_id")
        if previous.body["status"] in RUNNING:
            raise InvalidRequestError(f"response {body.previous_response_id!r} is still {previous.body['status']}",
                                      "previous_response_id")
        history = list(previous.messages)
    conversation = history + input_messages(body.input)
    wants_logprobs = LOGPROBS in (body.include or ())
    if body.top_logprobs and not wants_logprobs:
        raise InvalidRequestError(f"top_logprobs needs include: [\"{LOGPROBS}\"]", "top_logprobs")
    params = _sampling_params(body, (body.top_logprobs or 0) if wants_logprobs else None,
                              gen.defaults_for(engine, state.settings))
    chat_tool_defs, choice = chat_tools(body)
    tool_plan = tools.plan(chat_tool_defs, choice, state.settings.tool_call_parser)
    params = tools.apply(params, tool_plan, chat_tool_defs, body.parallel_tool_calls, "text.format")
    template_kwargs = dict(body.chat_template_kwargs or {})
    if body.reasoning and body.reasoning.effort:
        template_kwargs["reasoning_effort"] = body.reasoning.effort
    tool_defs = [t.model_dump(exclude_none=True) for t in chat_tool_defs] if chat_tool_defs else None

    def render(convo: list[dict[str, Any]]) -> str:
        return gen.render_chat(chat_messages(body.instructions, convo), engine.tokenizer, True, tool_defs,
                               template_kwargs)

    prompted = conversation  # the whole conversation is stored; truncation cuts only what the model sees
    if body.truncation == "auto":
        room = engine.info.max_model_len - (body.max_output_tokens or 1)
        prompted = truncated(conversation, lambda c: len(gen.chat_prompt(render(c), engine.tokenizer)) <= room)
    text = render(prompted)
    payload = GenerationRequest(gen.chat_prompt(text, engine.tokenizer), params, lora_name(engine, name), body.priority)
    response_id = new_item_id("resp")
    stored = body.store and state.responses.capacity > 0
    thinking = reasoning.plan(state.settings.reasoning_parser, text, params.structured is not None, True)
    answer = _Answer(ResponseBuilder(_head(body, response_id, name, stored)), DeltaSplitter(tool_plan, thinking),
                     gen.TokenText(engine.tokenizer) if wants_logprobs else None, body.top_logprobs or 0)

    log = EventLog() if body.background else None

    def keep(final: dict[str, Any]) -> None:
        if stored:
            state.responses.put(response_id, StoredResponse(final, tuple(conversation + output_message(final["output"])),
                                                            tuple(stored_items(body.input)), log))

    if log is not None:
        if not stored:
            raise InvalidRequestError("background responses must be stored (store: true, and a server "
                                      "--responses-store-size above 0)", "background")
        state.async_engine.check(name, payload)  # a bad request is this call's 4xx, not a failed response
        pending = StoredResponse(answer.builder.response("queued"), tuple(conversation),
                                 tuple(stored_items(body.input)), log)
        state.responses.put(response_id, pending)
        work = _in_background(state, name, response_id, payload, answer, engine.tokenizer, keep, pending)
        state.background[response_id] = asyncio.create_task(work)
        # streamed, the answer follows the log: a client that leaves stops reading, not the response
        return _replay(log, None) if body.stream else JSONResponse(pending.body)

    if body.stream:
        merged = await gen.open_streams(state.async_engine, name, response_id, [payload])
        return sse.response(_events(merged, answer, engine.tokenizer, keep), state, response_id, done=False)

    try:
        finals = await gen.cancel_on_disconnect(request, gen.run_all(state.async_engine, name, response_id, [payload]))
    finally:
        state.metrics.forget(response_id)
    final = _whole(finals[0], answer, engine.tokenizer)
    keep(final)
    return JSONResponse(final)


RUNNING = ("queued", "in_progress")  # a background response's statuses before it ends


def _whole(out: RequestOutput, answer: _Answer, tokenizer: Any) -> dict[str, Any]:
    """The answer to a finished request, all its text fed at once."""
    answer.feed(dataclasses.replace(out.outputs[0], new_text=out.outputs[0].text))
    return answer.finish(out, tokenizer)[-1]["response"]


async def _in_background(state: ServerState, name: str, response_id: str, payload: GenerationRequest,
                         answer: _Answer, tokenizer: Any, keep: Any, pending: StoredResponse) -> None:
    """Run a background response to its end, its stream events into its log, and store the answer;
    a failure is stored as a `failed` response carrying the error, its stream's last event
    `response.failed` (a cancel stores `cancelled` itself, and stops this)."""
    log = pending.events

    def store(status: str, error: dict[str, str] | None = None) -> dict[str, Any]:
        body = {**pending.body, "status": status, "error": error}
        state.responses.put(response_id, dataclasses.replace(pending, body=body))
        return body

    store("in_progress")
    merged = None
    try:
        merged = await gen.open_streams(state.async_engine, name, response_id, [payload])
        async for events in _batches(merged, answer, tokenizer, keep):
            log.append(events)
    except KVServeError as exc:
        failed = store("failed", {"code": exc.error_type, "message": str(exc)})
        log.append([answer.builder.event("response.failed", response=failed)])
    except Exception as exc:  # noqa: BLE001 - nobody awaits this task: the stored answer is the report
        failed = store("failed", {"code": "server_error", "message": f"{type(exc).__name__}: {exc}"})
        log.append([answer.builder.event("response.failed", response=failed)])
    finally:
        if merged is not None:
            await merged.aclose()  # a cancel lands here mid-stream: its engine request is aborted
        log.close()
        state.metrics.forget(response_id)
        state.background.pop(response_id, None)


def _replay(log: EventLog, starting_after: int | None) -> StreamingResponse:
    """A background response's events after `starting_after`, then each as it comes, until it ends."""
    async def events() -> AsyncIterator[str]:
        async for e in log.follow(starting_after):
            yield sse.event(e, e["type"])

    return StreamingResponse(events(), media_type="text/event-stream")


async def _batches(merged: AsyncIterator[tuple[int, RequestOutput]], answer: _Answer, tokenizer: Any,
                   keep: Any) -> AsyncIterator[list[dict[str, Any]]]:
    """A streamed answer's events, a batch per engine output after the opening ones; the answer is
    kept (stored) when it ends. Streamed to the client, or into a background response's log."""
    yield answer.builder.start()
    async for _, out in merged:
        events = answer.feed(out.outputs[0])
        if out.outputs[0].finish_reason is not None:
            events += answer.finish(out, tokenizer)
            keep(events[-1]["response"])
        yield events


async def _events(merged: AsyncIterator[tuple[int, RequestOutput]], answer: _Answer, tokenizer: Any,
                  keep: Any) -> AsyncIterator[str]:
    async for events in _batches(merged, answer, tokenizer, keep):
        for e in events:
            yield sse.event(e, e["type"])


@router.get("/v1/responses/{response_id}",
            responses=answers(ResponseObject, (400, 401, 404), stream=ResponseEvent, done=False))
async def get_response(response_id: str, request: Request, stream: bool = False,
                       starting_after: int | None = Query(None, ge=0)) -> Any:
    """The stored answer; with `stream`, a background response's events (after `starting_after`, a
    sequence number), replayed, then followed live until it ends, as OpenAI resumes a stream."""
    stored = get_state(request).responses.get(response_id)
    if not stream:
        return JSONResponse(stored.body)
    if stored.events is None:
        raise InvalidRequestError("only background responses can be streamed again", "stream")
    return _replay(stored.events, starting_after)


@router.delete("/v1/responses/{response_id}", responses=answers(ResponseDeleted, (401, 404)))
async def delete_response(response_id: str, request: Request) -> Any:
    state = get_state(request)
    state.responses.delete(response_id)
    task = state.background.pop(response_id, None)
    if task is not None:  # nobody can read its answer any more: stop it and free its KV blocks
        task.cancel()
    return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})


@router.post("/v1/responses/{response_id}/cancel", responses=answers(ResponseObject, (400, 401, 404)))
async def cancel_response(response_id: str, request: Request) -> Any:
    """Stop a background response (its KV blocks are freed at once) and store it as `cancelled`;
    one that already ended is returned as it is, as OpenAI does."""
    state = get_state(request)
    stored = state.responses.get(response_id)
    if not stored.body.get("background"):
        raise InvalidRequestError("only responses created with background: true can be cancelled", "response_id")
    task = state.background.pop(response_id, None)
    if task is not None:
        task.cancel()
        stored = dataclasses.replace(stored, body={**stored.body, "status": "cancelled"})
        state.responses.put(response_id, stored)
    return JSONResponse(stored.body)


@router.get("/v1/responses/{response_id}/input_items", responses=answers(InputItemList, (400, 401, 404)))
async def list_input_items(response_id: str, request: Request, limit: int = Query(20, ge=1, le=100),
                           order: Literal["asc", "desc"] = "desc", after: str | None = None,
                           before: str | None = None) -> Any:
    stored = get_state(request).responses.get(response_id)
    return JSONResponse(page(list(stored.input_items), limit, order, after, before))

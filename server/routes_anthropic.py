"""POST /v1/messages (Anthropic's Messages API, SSE streaming) and /v1/messages/count_tokens.

A request is a chat request in another shape: its messages become chat messages under the model's
template, and the answer's thinking, text and tool calls are split exactly as /v1/chat/completions
splits them. Errors on these paths come in Anthropic's shape (`server.errors`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from engine.outputs import CompletionOutput, RequestOutput
from engine.request import GenerationRequest
from engine.sampling_params import SamplingParams
from server import generation as gen
from server import reasoning, sse, tools
from server.anthropic import (
    MessageBuilder, chat_conversation, chat_tools, stop_reason, structured_output, template_kwargs,
)
from server.deltas import DeltaSplitter
from server.openapi import ENGINE_ERRORS, TOKENIZER_ERRORS, answers
from server.schemas import ChatMessage
from server.schemas_anthropic import (
    AnthropicErrorResponse, CountTokensRequest, MessageResponse, MessagesRequest, MessageStreamEvent, TokenCount,
)
from server.state import ServerState, get_state, lora_name, new_item_id

router = APIRouter()


@dataclasses.dataclass(frozen=True)
class _Prompt:
    ids: list[int]
    text: str
    tool_plan: tools.ToolPlan
    tools: list[Any] | None
    parallel: bool


def _render(body: CountTokensRequest, engine: Any, chat_tool_defs: list[Any] | None) -> str:
    messages = [ChatMessage.model_validate(m) for m in chat_conversation(body)]
    tool_defs = [t.model_dump(exclude_none=True) for t in chat_tool_defs] if chat_tool_defs else None
    return gen.render_chat(messages, engine.tokenizer, True, tool_defs, template_kwargs(body))


def _prompt(body: CountTokensRequest, state: ServerState, engine: Any) -> _Prompt:
    chat_tool_defs, choice, parallel = chat_tools(body)
    tool_plan = tools.plan(chat_tool_defs, choice, state.settings.tool_call_parser)
    text = _render(body, engine, chat_tool_defs)
    return _Prompt(gen.chat_prompt(text, engine.tokenizer), text, tool_plan, chat_tool_defs, parallel)


def _usage(out: RequestOutput) -> dict[str, int]:
    """Anthropic counts the prompt tokens read from a cache apart from `input_tokens`."""
    cached = out.num_cached_tokens
    return {"input_tokens": len(out.prompt_token_ids) - cached, "output_tokens": len(out.outputs[0].token_ids),
            "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}


@router.post("/v1/messages", responses=answers(MessageResponse, ENGINE_ERRORS, stream=MessageStreamEvent, done=False,
                                               error=AnthropicErrorResponse))
async def create_message(body: MessagesRequest, request: Request) -> Any:
    state = get_state(request)
    name, engine = state.resolve(body.model, "generate")
    prompt = _prompt(body, state, engine)
    # the model's generation_config.json settings where the request sets none (max_tokens it always sets)
    defaults = {k: v for k, v in gen.defaults_for(engine, state.settings).items() if k != "max_tokens"}
    fields = defaults | {k: v for k in ("temperature", "top_p", "top_k") if (v := getattr(body, k)) is not None}
    if body.stop_sequences:
        fields["stop"] = tuple(body.stop_sequences)
    params = tools.apply(SamplingParams(max_tokens=body.max_tokens, structured=structured_output(body), **fields),
                         prompt.tool_plan, prompt.tools, prompt.parallel, "output_config.format")
    thinking = reasoning.plan(state.settings.reasoning_parser, prompt.text, params.structured is not None, True)
    # enforced where answers are split into thinking and text; elsewhere accepted as before (Anthropic's
    # clients send a budget with every thinking request)
    budget = body.thinking.budget_tokens if body.thinking is not None and body.thinking.type == "enabled" else None
    if budget is not None and thinking is not None:
        params = dataclasses.replace(params, thinking_budget=reasoning.budget(
            thinking, budget, engine.tokenizer, "thinking.budget_tokens"))
    payload = GenerationRequest(prompt.ids, params, lora_name(engine, name))
    message_id = new_item_id("msg")
    builder = MessageBuilder(message_id, name)
    split = DeltaSplitter(prompt.tool_plan, thinking)

    if body.stream:
        merged = await gen.open_streams(state.async_engine, name, message_id, [payload])
        return sse.response(_events(merged, builder, split), state, message_id, done=False, error=sse.anthropic_error)

    try:
        finals = await gen.cancel_on_disconnect(request, gen.run_all(state.async_engine, name, message_id, [payload]))
    finally:
        state.metrics.forget(message_id)
    out = finals[0]
    _feed(builder, split, dataclasses.replace(out.outputs[0], new_text=out.outputs[0].text))
    c = out.outputs[0]
    return JSONResponse(builder.message(stop_reason(c.finish_reason, c.stop_reason, builder.called), _usage(out)))


def _feed(builder: MessageBuilder, split: DeltaSplitter, c: CompletionOutput) -> list[dict[str, Any]]:
    thought, content, calls = split.feed(c.new_text, c.finish_reason)
    return (builder.thinking(thought) if thought else []) + builder.text(content) + builder.tool_calls(calls)


async def _events(merged: AsyncIterator[tuple[int, RequestOutput]], builder: MessageBuilder,
                  split: DeltaSplitter) -> AsyncIterator[str]:
    started = False
    async for _, out in merged:
        events = [] if started else builder.start({**_usage(out), "output_tokens": 0})
        started = True
        c = out.outputs[0]
        events += _feed(builder, split, c)
        if c.finish_reason is not None:
            events += builder.finish(stop_reason(c.finish_reason, c.stop_reason, builder.called), _usage(out))
        for e in events:
            yield sse.event(e, e["type"])


@router.post("/v1/messages/count_tokens", responses=answers(TokenCount, TOKENIZER_ERRORS, error=AnthropicErrorResponse))
async def count_tokens(body: CountTokensRequest, request: Request) -> Any:
    state = get_state(request)
    _, engine = state.resolve(body.model, "generate")
    text = _render(body, engine, chat_tools(body)[0])  # counted whatever the tool choice: nothing runs
    return JSONResponse({"input_tokens": len(gen.chat_prompt(text, engine.tokenizer))})

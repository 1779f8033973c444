"""Anthropic's Messages API over the chat machinery: messages and their content blocks -> chat
messages, Anthropic tools -> chat tools, and `MessageBuilder`, which turns one answer's deltas
(thinking, text, tool calls: the deltas chat streams) into content blocks and Anthropic's events.

A finished answer is the stream fed everything at once, so the JSON answer and the streamed
blocks always agree.
"""
from __future__ import annotations

import copy
import json
from typing import Any

from engine.errors import InvalidRequestError
from engine.structured_output import StructuredOutput
from server.schemas import NamedToolChoice, Tool
from server.schemas_anthropic import CountTokensRequest, TextBlockIn, ToolResultIn, ToolUseIn
from server.tool_parsers import ToolCall


# ---- request -> chat ---------------------------------------------------------------------
def chat_conversation(body: CountTokensRequest) -> list[dict[str, Any]]:
    """The request as chat messages (`ChatMessage` fields): the system text first; an assistant
    turn's `tool_use` blocks as its tool calls; a user turn's `tool_result` blocks as tool turns,
    then its text; thinking blocks left out."""
    system = body.system if isinstance(body.system, str) or body.system is None else "".join(
        b.text for b in body.system)
    out: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    for at, m in enumerate(body.messages):
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        misplaced = ToolResultIn if m.role == "assistant" else ToolUseIn
        if any(isinstance(b, misplaced) for b in m.content):
            kind = "tool_result" if m.role == "assistant" else "tool_use"
            raise InvalidRequestError(f"messages.{at}: {kind} blocks do not belong in {m.role} messages", "messages")
        text = "".join(b.text for b in m.content if isinstance(b, TextBlockIn))
        if m.role == "assistant":
            calls = [ToolCall(b.name, json.dumps(b.input), b.id).to_openai() for b in m.content if isinstance(b, ToolUseIn)]
            out.append({"role": "assistant", "content": text, **({"tool_calls": calls} if calls else {})})
            continue
        out += [{"role": "tool", "tool_call_id": b.tool_use_id, "content": b.text()}
                for b in m.content if isinstance(b, ToolResultIn)]
        if text or not any(isinstance(b, ToolResultIn) for b in m.content):
            out.append({"role": "user", "content": text})
    return out


def chat_tools(body: CountTokensRequest) -> tuple[list[Tool] | None, Any, bool]:
    """(tools, tool_choice, parallel calls) in chat's shapes, for `server.tools`; with tools and no
    choice the model decides (`auto`), as Anthropic's default is."""
    tools = None
    if body.tools:
        tools = [Tool.model_validate({"type": "function", "function": {
            "name": t.name, "parameters": t.input_schema, **({"description": t.description} if t.description else {})}})
            for t in body.tools]
    choice = body.tool_choice
    if choice is None:
        return tools, None, True
    mode: Any = {"auto": "auto", "any": "required", "none": "none"}.get(choice.type)
    if choice.type == "tool":
        mode = NamedToolChoice.model_validate({"type": "function", "function": {"name": choice.name}})
    return tools, mode, not choice.disable_parallel_tool_use


def template_kwargs(body: CountTokensRequest) -> dict[str, Any]:
    """`thinking` enabled/disabled as Qwen3-style templates read it, and `output_config.effort` as
    `reasoning_effort` (vLLM's name); templates without these variables ignore them."""
    kwargs: dict[str, Any] = {}
    if body.thinking is not None and body.thinking.type != "adaptive":
        kwargs["enable_thinking"] = body.thinking.type == "enabled"
    if body.output_config is not None and body.output_config.effort is not None:
        kwargs["reasoning_effort"] = body.output_config.effort
    return kwargs


def structured_output(body: CountTokensRequest) -> StructuredOutput | None:
    """`output_config.format`: the answer's text is JSON following the schema."""
    fmt = body.output_config.format if body.output_config is not None else None
    return None if fmt is None else StructuredOutput.json_schema(fmt.schema_, "output_config.format")


def stop_reason(finish: str | None, stop: str | int | None, called: bool) -> tuple[str | None, str | None]:
    """(stop_reason, stop_sequence) for an engine finish."""
    if finish == "length":
        return "max_tokens", None
    if called:
        return "tool_use", None
    if isinstance(stop, str):
        return "stop_sequence", stop
    return "end_turn", None


def _input(arguments: str) -> dict[str, Any]:
    """A call's arguments as the object Anthropic's `input` is: `{}` when they are cut off (the
    answer then says `max_tokens`)."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


# ---- answer ------------------------------------------------------------------------------
class MessageBuilder:
    """One answer's content blocks and events. A block opens with its first delta and stops when
    another opens or the answer ends; a tool call's arguments stream as `input_json_delta`s."""

    def __init__(self, message_id: str, model: str) -> None:
        self.head = {"id": message_id, "type": "message", "role": "assistant", "model": model}
        self.blocks: list[dict[str, Any]] = []
        self.arguments: list[str] = []  # per block: a tool call's JSON text as it grows
        self.open: int | None = None
        self.calls: dict[int, int] = {}  # chat tool-call index -> block index

    def message(self, stop: tuple[str | None, str | None], usage: dict[str, int]) -> dict[str, Any]:
        content = copy.deepcopy(self.blocks)
        for block, args in zip(content, self.arguments):
            if block["type"] == "tool_use":
                block["input"] = _input(args)
        return {**self.head, "content": content, "stop_reason": stop[0], "stop_sequence": stop[1], "usage": usage}

    def start(self, usage: dict[str, int]) -> list[dict[str, Any]]:
        return [{"type": "message_start", "message": self.message((None, None), usage)}]

    def _add(self, block: dict[str, Any]) -> list[dict[str, Any]]:
        events = self._stop()
        self.blocks.append(block)
        self.arguments.append("")
        self.open = len(self.blocks) - 1
        return events + [{"type": "content_block_start", "index": self.open, "content_block": copy.deepcopy(block)}]

    def _stop(self) -> list[dict[str, Any]]:
        if self.open is None:
            return []
        at, self.open = self.open, None
        return [{"type": "content_block_stop", "index": at}]

    def _delta(self, kind: str, field: str, block: dict[str, Any], text: str) -> list[dict[str, Any]]:
        events = [] if self.open is not None and self.blocks[self.open]["type"] == block["type"] else self._add(block)
        if field in self.blocks[self.open]:
            self.blocks[self.open][field] += text
        return events + [{"type": "content_block_delta", "index": self.open, "delta": {"type": kind, field: text}}]

    def thinking(self, delta: str) -> list[dict[str, Any]]:
        return self._delta("thinking_delta", "thinking", {"type": "thinking", "thinking": "", "signature": ""}, delta)

    def text(self, delta: str) -> list[dict[str, Any]]:
        return self._delta("text_delta", "text", {"type": "text", "text": ""}, delta) if delta else []

    def tool_calls(self, deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Chat's tool-call deltas: one with an `id` opens a `tool_use` block, later ones add to its input."""
        events = []
        for d in deltas:
            fn = d.get("function", {})
            if "id" in d:
                events += self._add({"type": "tool_use", "id": d["id"].replace("call_", "toolu_", 1),
                                     "name": fn.get("name", ""), "input": {}})
                self.calls[d["index"]] = self.open
            at = self.calls[d["index"]]
            args = fn.get("arguments", "")
            if args:
                self.arguments[at] += args
                events.append({"type": "content_block_delta", "index": at,
                               "delta": {"type": "input_json_delta", "partial_json": args}})
        return events

    def finish(self, stop: tuple[str | None, str | None], usage: dict[str, int]) -> list[dict[str, Any]]:
        return self._stop() + [
            {"type": "message_delta", "delta": {"stop_reason": stop[0], "stop_sequence": stop[1]}, "usage": usage},
            {"type": "message_stop"},
        ]

    @property
    def called(self) -> bool:
        return any(b["type"] == "tool_use" for b in self.blocks)

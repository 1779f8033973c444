"""Tool calling for /v1/chat/completions: which constraint a `tool_choice` asks for, and how a
model's text becomes OpenAI `tool_calls`.

- a named function: the output is constrained to that function's parameter schema and is the call's
  arguments (streamed as argument deltas);
- `required`: the output is constrained to a JSON array of {"name", "parameters"} objects, one of the
  given tools each (one item without `parallel_tool_calls`), as vLLM does;
- `auto`: the model decides, in its own format, read by the server's `--tool-call-parser` (the formats
  are in server/tool_parsers.py); a server without one refuses `auto` rather than return a call as
  plain text.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams
from engine.structured_output import StructuredOutput
from server.call_array import CallArrayReader, scan_calls
from server.tool_parsers import PARSERS, ToolCall, new_call_id

def _parameters(tool: Any) -> dict[str, Any]:
    """The function's parameter schema with its objects closed: a declared parameter list is the whole
    signature (as OpenAI's strict mode requires), so a forced call never invents keys."""
    return _closed(tool.function.parameters if tool.function.parameters is not None else {"type": "object", "properties": {}})


def _closed(schema: Any) -> Any:
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (_closed(v) if k in ("items", "prefixItems", "anyOf", "oneOf", "allOf") else v) for k, v in schema.items()}
    for key in ("properties", "$defs", "definitions"):
        if isinstance(schema.get(key), dict):
            out[key] = {name: _closed(sub) for name, sub in schema[key].items()}
    if "properties" in schema and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    return out


def _compact(schema: dict[str, Any]) -> dict[str, Any]:
    # llguidance's top-level options; the client's own x-guidance wins
    return {**schema, "x-guidance": {"whitespace_flexible": False, **schema.get("x-guidance", {})}}


@dataclass(frozen=True)
class ToolPlan:
    """What a chat request's tools mean for its generation and its answer."""

    mode: str  # "none", "named", "required", "auto"
    named: str | None = None  # the function, with mode "named"
    parser: str | None = None  # with mode "auto"

    @property
    def calls_tools(self) -> bool:
        return self.mode != "none"

    def constraint(self, tools: list[Any], parallel: bool) -> StructuredOutput | None:
        """Forced calls are compact JSON (no free whitespace): programs read them, and a small model
        given free whitespace can spend its tokens on newlines."""
        if self.mode == "named":
            tool = next(t for t in tools if t.function.name == self.named)
            return StructuredOutput.json_schema(_compact(_parameters(tool)), "tool_choice")
        if self.mode == "required":
            items = [{"type": "object", "properties": {"name": {"const": t.function.name}, "parameters": _parameters(t)},
                      "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
            schema = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
            return StructuredOutput.json_schema(_compact(schema if parallel else {**schema, "maxItems": 1}), "tool_choice")
        return None

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a finished answer; text that does not parse stays content."""
        if self.mode == "named":
            return None, [ToolCall(self.named or "", text, new_call_id())]
        if self.mode == "required":
            try:
                items = json.loads(text)
                whole = bool(items) and all(isinstance(i, dict) and {"name", "parameters"} <= set(i) for i in items)
            except (ValueError, TypeError):  # cut off by max_tokens or a stop string
                whole = False
            if not whole:
                return text, []
            # the parameters as written (compact JSON from the grammar), as the stream sends them
            return None, [ToolCall(c.name or "", c.arguments(text), new_call_id()) for c in scan_calls(text)]
        if self.mode == "auto":
            return PARSERS[self.parser or ""].parse(text)
        return text, []

    @property
    def keeps_special_tokens(self) -> bool:
        """Whether the answer's text must keep special tokens for the parser to see its calls."""
        return self.mode == "auto" and PARSERS[self.parser or ""].keeps_special_tokens


def apply(params: SamplingParams, tool_plan: ToolPlan, tools: list[Any] | None, parallel: bool,
          format_field: str) -> SamplingParams:
    """`params` under the plan: a forced call's grammar (which leaves no room for the request's own
    `format_field` constraint: a 400), and special tokens kept where the parser reads them."""
    forced = tool_plan.constraint(tools or [], parallel)
    if forced is not None:
        if params.structured is not None:
            raise InvalidRequestError(f"a tool_choice that forces a call takes no {format_field}", "tool_choice")
        params = dataclasses.replace(params, structured=forced)
    if tool_plan.keeps_special_tokens:
        params = dataclasses.replace(params, skip_special_tokens=False)
    return params


def plan(tools: list[Any] | None, tool_choice: Any, parser: str | None) -> ToolPlan:
    """The request's tool mode; a choice the server cannot honour is a 400."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise InvalidRequestError("tool_choice needs tools", "tool_choice")
        return ToolPlan("none")
    if tool_choice == "none":
        return ToolPlan("none")
    if tool_choice == "required":
        return ToolPlan("required")
    if tool_choice is None or tool_choice == "auto":
        if parser is None:
            raise InvalidRequestError(
                "tool_choice \"auto\" (the default with tools) needs a server started with --tool-call-parser "
                f"({', '.join(PARSERS)}); use \"required\" or name a function instead", "tool_choice")
        return ToolPlan("auto", parser=parser)
    name = tool_choice.function.name
    if name not in {t.function.name for t in tools}:
        raise InvalidRequestError(f"tool_choice names {name!r}, which is not in tools", "tool_choice")
    return ToolPlan("named", named=name)


def template_messages(messages: list[Any]) -> list[dict[str, Any]]:
    """Chat messages as chat templates read them: an assistant's tool calls with their arguments as
    objects (templates write them with tojson), and a tool result's call id."""
    out = []
    for m in messages:
        entry: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.name is not None:
            entry["name"] = m.name
        if m.tool_call_id is not None:
            entry["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            entry["tool_calls"] = [{"id": c.id, "type": "function",
                                    "function": {"name": c.function.name, "arguments": _loads_or_text(c.function.arguments)}}
                                   for c in m.tool_calls]
        out.append(entry)
    return out


def _loads_or_text(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def finish_reason(tool_plan: ToolPlan, reason: str | None, called: bool) -> str | None:
    """OpenAI's: "tool_calls" when the model chose to call (auto, required); a forced named call
    ends with "stop"."""
    return "tool_calls" if called and reason == "stop" and tool_plan.mode != "named" else reason


def chat_message(tool_plan: ToolPlan, text: str, reason: str | None) -> tuple[dict[str, Any], str | None]:
    """A finished choice's assistant message and finish reason."""
    content, calls = tool_plan.parse(text) if tool_plan.calls_tools else (text, [])
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [c.to_openai() for c in calls]
    return message, finish_reason(tool_plan, reason, bool(calls))


class ToolStream:
    """One streamed choice's deltas under a tool plan, fed the engine's text deltas (which already
    hold back what a stop string may still take away). Named: the text is the arguments, streamed
    as they come. Required: each call opens (id, name) once its name is whole, then its parameters
    stream as argument deltas (server/call_array.py). Auto: content until a tool call opens, then
    the calls at the end."""

    def __init__(self, tool_plan: ToolPlan) -> None:
        self.plan = tool_plan
        self.text = ""
        self.sent = 0  # auto: characters of `text` sent as content
        self.call_id: str | None = None  # named: the call's id once its first delta is out
        self.streamed: list[int] = []  # required: per call opened, the characters of its arguments sent
        self.reader = CallArrayReader()  # required: where the calls are in `text`, read once per delta

    def feed(self, new_text: str, reason: str | None) -> tuple[dict[str, Any] | None, str | None]:
        """(delta or None, finish reason) for this event."""
        self.text += new_text
        mode = self.plan.mode
        if mode == "named":
            if self.call_id is None and (new_text or reason is not None):
                self.call_id = new_call_id()
                call = ToolCall(self.plan.named or "", new_text, self.call_id).to_openai(0)
                return {"tool_calls": [call]}, reason
            return ({"tool_calls": [{"index": 0, "function": {"arguments": new_text}}]} if new_text else None), reason
        if mode == "required":
            return self._required(reason)
        if reason is None:
            if mode != "auto":
                return None, None
            safe = PARSERS[self.plan.parser or ""].content_end(self.text)
            content, self.sent = self.text[self.sent : max(safe, self.sent)], max(safe, self.sent)
            return ({"content": content} if content else None), None
        content, calls = self.plan.parse(self.text)
        if not calls:
            rest, self.sent = self.text[self.sent :], len(self.text)
            return ({"content": rest} if rest else None), reason
        delta: dict[str, Any] = {"tool_calls": [c.to_openai(i) for i, c in enumerate(calls)]}
        if content and not self.sent:  # the answer came in one delta: its content had no event yet
            delta = {"content": content, **delta}
        return delta, finish_reason(self.plan, reason, True)

    def _required(self, reason: str | None) -> tuple[dict[str, Any] | None, str | None]:
        """The calls' new pieces: a call opening once its name is whole, then its arguments as they grow."""
        pieces = []
        for i, call in enumerate(self.reader.read(self.text)):
            if call.name is None:
                break  # later calls wait for this one's name: indexes stay in order
            args = call.arguments(self.text)
            if i == len(self.streamed):
                pieces.append(ToolCall(call.name, args, new_call_id()).to_openai(i))
                self.streamed.append(len(args))
            elif len(args) > self.streamed[i]:
                pieces.append({"index": i, "function": {"arguments": args[self.streamed[i]:]}})
                self.streamed[i] = len(args)
        if reason is not None and not self.streamed:  # cut off before any call opened: the text is content
            content, calls = self.plan.parse(self.text)
            delta = {"tool_calls": [c.to_openai(i) for i, c in enumerate(calls)]} if calls else (
                {"content": content} if content else None)
            return delta, finish_reason(self.plan, reason, bool(calls))
        finish = None if reason is None else finish_reason(self.plan, reason, True)
        return ({"tool_calls": pieces} if pieces else None), finish

"""The Responses API over the chat machinery: input items -> chat messages, Responses tools ->
chat tools, and `ResponseBuilder`, which turns one answer's deltas (reasoning, text, tool calls; the
same deltas chat streams) into output items and the API's events.

A finished answer is the stream fed everything at once, so the JSON answer and the last streamed
event always hold the same output.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from engine.structured_output import StructuredOutput
from server.schemas import ChatMessage, NamedToolChoice, Tool
from server.state import new_item_id
from server.tool_parsers import ToolCall
from server.schemas_responses import (
    FunctionCallItem, FunctionCallOutputItem, FunctionToolChoice, InputItem, MessageItem, ResponsesRequest,
)


# ---- request -> chat ---------------------------------------------------------------------
def input_messages(given: str | list[InputItem]) -> list[dict[str, Any]]:
    """The request's input as chat messages (`ChatMessage` fields). A function call joins the
    assistant turn right before it, as one answer's text and calls are one chat turn; reasoning
    items are left out."""
    if isinstance(given, str):
        return [{"role": "user", "content": given}]
    out: list[dict[str, Any]] = []
    for item in given:
        if isinstance(item, MessageItem):
            out.append({"role": item.role, "content": item.text()})
        elif isinstance(item, FunctionCallItem):
            call = ToolCall(item.name, item.arguments, item.call_id).to_openai()
            if out and out[-1]["role"] == "assistant":
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text()})
    return out


def stored_items(given: str | list[InputItem]) -> list[dict[str, Any]]:
    """The request's input as the API lists it back (`GET /v1/responses/{id}/input_items`): each item
    with an id, an assistant message as output text, a text as one user message."""
    if isinstance(given, str):
        return [{"id": new_item_id("msg"), "type": "message", "role": "user", "status": "completed",
                 "content": [{"type": "input_text", "text": given}]}]
    out: list[dict[str, Any]] = []
    for item in given:
        if isinstance(item, MessageItem) and item.role == "assistant":
            out.append({"id": new_item_id("msg"), "type": "message", "role": "assistant", "status": "completed",
                        "content": [{"type": "output_text", "text": item.text(), "annotations": []}]})
        elif isinstance(item, MessageItem):
            parts = ([{"type": "input_text", "text": item.content}] if isinstance(item.content, str)
                     else [p.model_dump() for p in item.content])
            out.append({"id": new_item_id("msg"), "type": "message", "role": item.role, "status": "completed",
                        "content": parts})
        elif isinstance(item, FunctionCallItem):
            out.append({"id": new_item_id("fc"), "type": "function_call", "call_id": item.call_id, "name": item.name,
                        "arguments": item.arguments, "status": "completed"})
        elif isinstance(item, FunctionCallOutputItem):
            out.append({"id": new_item_id("fco"), "type": "function_call_output", "call_id": item.call_id,
                        "output": item.text(), "status": "completed"})
        else:
            out.append({"id": new_item_id("rs"), "type": "reasoning", "summary": []})
    return out


def page(items: list[dict[str, Any]], limit: int, order: str, after: str | None,
         before: str | None) -> dict[str, Any]:
    """OpenAI's cursor page over `items` (in input order): `order` desc lists the last first, and
    `after`/`before` name the item the page starts after or ends before, in that order."""
    ordered = items[::-1] if order == "desc" else list(items)
    ids = [i["id"] for i in ordered]
    start = ids.index(after) + 1 if after in ids else 0
    end = ids.index(before) if before in ids else len(ordered)
    data = ordered[start:end][:limit]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": end - start > limit}


def output_message(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """An answer's output items as the chat turn that continues its conversation (none if empty)."""
    text = "".join(p["text"] for item in output if item["type"] == "message" for p in item["content"])
    calls = [ToolCall(i["name"], i["arguments"], i["call_id"]).to_openai() for i in output if i["type"] == "function_call"]
    if not text and not calls:
        return []
    return [{"role": "assistant", "content": text, **({"tool_calls": calls} if calls else {})}]


def truncated(conversation: list[dict[str, Any]], fits: Callable[[list[dict[str, Any]]], bool]) -> list[dict[str, Any]]:
    """`truncation: "auto"`: the conversation less its oldest turns, as few as `fits` needs. A turn
    starts at a user message, so no answer or tool result is left without what it answered;
    system and developer messages stay wherever they were. Where even the last turn alone does
    not fit, that is what is returned (the engine then refuses it, as with truncation disabled)."""
    if fits(conversation):
        return conversation
    starts = [i for i, m in enumerate(conversation) if m["role"] == "user"][1:]
    if not starts:
        return conversation

    def cut(k: int) -> list[dict[str, Any]]:
        return [m for i, m in enumerate(conversation) if i >= k or m["role"] in ("system", "developer")]

    lo, hi = 0, len(starts) - 1  # find the first start that fits; a later start only drops more
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(cut(starts[mid])):
            hi = mid
        else:
            lo = mid + 1
    return cut(starts[lo])


def chat_messages(instructions: str | None, conversation: list[dict[str, Any]]) -> list[ChatMessage]:
    system = [{"role": "system", "content": instructions}] if instructions else []
    return [ChatMessage.model_validate(m) for m in system + conversation]


def chat_tools(body: ResponsesRequest) -> tuple[list[Tool] | None, Any]:
    """(tools, tool_choice) in chat's shapes, for `server.tools`."""
    tools = None
    if body.tools:
        tools = [Tool.model_validate({"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)})
                 for t in body.tools]
    choice: Any = body.tool_choice
    if isinstance(choice, FunctionToolChoice):
        choice = NamedToolChoice.model_validate({"type": "function", "function": {"name": choice.name}})
    return tools, choice


def structured_output(body: ResponsesRequest) -> StructuredOutput | None:
    fmt = body.text.format if body.text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return StructuredOutput.json_object("text.format")
    return StructuredOutput.json_schema(fmt.schema_, "text.format")


def reasoning_tokens(token_ids: list[int], end_ids: list[int], has_reasoning: bool) -> int:
    """Output tokens spent thinking: through the first run of the closing tag's tokens, or all of
    them when the answer never closed the block (nor wrote the tag as the tokenizer alone would)."""
    if not has_reasoning:
        return 0
    n = len(end_ids)
    return next((k + n for k in range(len(token_ids) - n + 1) if n and token_ids[k:k + n] == end_ids), len(token_ids))


# ---- answer ------------------------------------------------------------------------------
class ResponseBuilder:
    """One answer's output items and events. Items open as their first delta comes (reasoning,
    then the message, then function calls, as models write them) and close when another opens or
    the answer ends; every event carries the next `sequence_number`."""

    def __init__(self, head: dict[str, Any]) -> None:
        self.head = head  # the answer's fields other than status, output, usage, incomplete_details
        self.output: list[dict[str, Any]] = []
        self.seq = 0
        self.open: int | None = None  # index in output of the item still growing
        self.calls: dict[int, int] = {}  # chat tool-call index -> its output index
        self.pending_logprobs: list[dict[str, Any]] = []  # arrived before any text to carry them

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.seq, **copy.deepcopy(fields)}
        self.seq += 1
        return event

    def response(self, status: str, usage: dict[str, Any] | None = None) -> dict[str, Any]:
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {**self.head, "status": status, "incomplete_details": incomplete, "output": copy.deepcopy(self.output),
                "usage": usage}

    def start(self) -> list[dict[str, Any]]:
        snapshot = self.response("in_progress")
        return [self.event("response.created", response=snapshot),
                self.event("response.in_progress", response=snapshot)]

    def _add(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        events = self._close("completed")
        self.output.append(item)
        self.open = len(self.output) - 1
        events.append(self.event("response.output_item.added", output_index=self.open, item=item))
        return events

    def _open_kind(self) -> str | None:
        return None if self.open is None else self.output[self.open]["type"]

    def reasoning(self, delta: str) -> list[dict[str, Any]]:
        events = []
        if self._open_kind() != "reasoning":
            events += self._add({"type": "reasoning", "id": new_item_id("rs"), "summary": [], "content": [],
                                 "status": "in_progress"})
            self.output[self.open]["content"].append({"type": "reasoning_text", "text": ""})
        item = self.output[self.open]
        item["content"][0]["text"] += delta
        events.append(self.event("response.reasoning_text.delta", item_id=item["id"], output_index=self.open,
                                  content_index=0, delta=delta))
        return events

    def text(self, delta: str, logprobs: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
        """A text delta; `logprobs` (None: not asked for) are the tokens generated since the last call."""
        if logprobs is not None:
            self.pending_logprobs += logprobs
        if not delta:
            return []
        events = []
        if self._open_kind() != "message":
            events += self._add({"type": "message", "id": new_item_id("msg"), "status": "in_progress",
                                 "role": "assistant", "content": []})
            part = {"type": "output_text", "text": "", "annotations": [],
                    **({"logprobs": []} if logprobs is not None else {})}
            self.output[self.open]["content"].append(part)
            events.append(self.event("response.content_part.added", item_id=self.output[self.open]["id"],
                                      output_index=self.open, content_index=0, part=part))
        item = self.output[self.open]
        part = item["content"][0]
        part["text"] += delta
        fresh, self.pending_logprobs = self.pending_logprobs, []
        if "logprobs" in part:
            part["logprobs"] += fresh
        events.append(self.event("response.output_text.delta", item_id=item["id"], output_index=self.open,
                                  content_index=0, delta=delta, logprobs=fresh))
        return events

    def tool_calls(self, deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Chat's tool-call deltas: one with an `id` opens a call, later ones add to its arguments."""
        events = []
        for d in deltas:
            fn = d.get("function", {})
            if "id" in d:
                events += self._add({"type": "function_call", "id": new_item_id("fc"), "call_id": d["id"],
                                     "name": fn.get("name", ""), "arguments": "", "status": "in_progress"})
                self.calls[d["index"]] = self.open
            at = self.calls[d["index"]]
            args = fn.get("arguments", "")
            if args:
                self.output[at]["arguments"] += args
                events.append(self.event("response.function_call_arguments.delta", item_id=self.output[at]["id"],
                                          output_index=at, delta=args))
        return events

    def _close(self, status: str) -> list[dict[str, Any]]:
        if self.open is None:
            return []
        at, item = self.open, self.output[self.open]
        self.open = None
        item["status"] = status
        events = []
        if item["type"] == "reasoning":
            events.append(self.event("response.reasoning_text.done", item_id=item["id"], output_index=at,
                                      content_index=0, text=item["content"][0]["text"]))
        elif item["type"] == "message":
            part = item["content"][0]
            events.append(self.event("response.output_text.done", item_id=item["id"], output_index=at,
                                      content_index=0, text=part["text"], logprobs=part.get("logprobs", [])))
            events.append(self.event("response.content_part.done", item_id=item["id"], output_index=at,
                                      content_index=0, part=part))
        else:
            events.append(self.event("response.function_call_arguments.done", item_id=item["id"], output_index=at,
                                      arguments=item["arguments"], name=item["name"]))
        events.append(self.event("response.output_item.done", output_index=at, item=item))
        return events

    def finish(self, status: str, usage: dict[str, Any]) -> list[dict[str, Any]]:
        """Close what is open (`incomplete` when the answer was cut off) and end the stream."""
        events = self._close(status)
        kind = "response.completed" if status == "completed" else "response.incomplete"
        events.append(self.event(kind, response=self.response(status, usage)))
        return events

"""Readers of the formats models write tool calls in, for `tool_choice: "auto"` (`--tool-call-parser`).

Each one answers two questions about an answer's text: where streamed content must stop (a call has
opened there, or the tail could still become one), and, once finished, which part is content and
which are calls. Text that does not parse as the format stays content: a model that meant to
answer in prose is never turned into a broken call.

- `hermes`: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, after optional content
  (Qwen2.5, Hermes, and many others);
- `llama3_json`: the whole answer is `{"name": ..., "parameters": {...}}`, several joined by `;`
  (Llama 3.1 to 3.3 with JSON tool calling; the `<|python_tag|>` before them is a special token, so
  the text holds it only when special tokens are kept);
- `pythonic`: the whole answer is a Python list of calls, `[get_weather(city="Paris"), get_time()]`
  (Llama 3.2 and 4, ToolACE), read with `ast`, never evaluated;
- `mistral`: `[TOOL_CALLS]` after optional content, then a JSON list `[{"name": ..., "arguments": {...}}]`
  (Mistral 7B v0.3, Mixtral 8x22B, Nemo, Small 3.1) or, from tokenizer v11 on (Small 3.2, Magistral,
  Devstral), `name[ARGS]{...}` with a `[TOOL_CALLS]` before each call. `[TOOL_CALLS]` is a special token,
  so requests under this parser keep special tokens in their text (`keeps_special_tokens`, as vLLM does).
"""
from __future__ import annotations

import ast
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = ""

    def to_openai(self, index: int | None = None) -> dict[str, Any]:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call(name: Any, arguments: Any) -> ToolCall:
    if not isinstance(name, str) or not name:
        raise ValueError("a call needs a name")
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return ToolCall(name, text, new_call_id())


class ToolParser(Protocol):
    keeps_special_tokens: bool  # the format opens with a special token, which the text must keep

    def content_end(self, text: str) -> int:
        """How much of a growing answer may stream as content now."""

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """A finished answer's (content, calls); no calls when it is not in the format."""


def before_prefix(text: str, opener: str) -> int:
    """Where `text` stops being safe content: at `opener`, or before a tail that could still grow into it."""
    at = text.find(opener)
    if at >= 0:
        return at
    for k in range(min(len(opener) - 1, len(text)), 0, -1):
        if opener.startswith(text[-k:]):
            return len(text) - k
    return len(text)


def _json_call(call: Any) -> ToolCall:
    """`{"name": ..., "arguments": {...}}` (or `"parameters"`) as a call."""
    return _call(call["name"], call.get("arguments", call.get("parameters", {})))


class _Tagged:
    """Formats where calls follow an opening tag, after optional content."""

    keeps_special_tokens = False
    OPEN = ""

    def content_end(self, text: str) -> int:
        return before_prefix(text, self.OPEN)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        if self.OPEN not in text:
            return text, []
        try:
            calls = self._calls(text)
        except (ValueError, TypeError, KeyError, AttributeError):
            return text, []  # not the format after all: all of it is content
        if not calls:
            return text, []
        content = text[: text.index(self.OPEN)].strip()
        return content or None, calls

    def _calls(self, text: str) -> list[ToolCall]:
        raise NotImplementedError


class Hermes(_Tagged):
    OPEN = "<tool_call>"
    _CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def _calls(self, text: str) -> list[ToolCall]:
        return [_json_call(json.loads(body)) for body in self._CALL.findall(text)]


class _WholeAnswer:
    """Formats where the calls are the whole answer, known by how it starts."""

    OPENERS: tuple[str, ...] = ()
    keeps_special_tokens = False

    def _body(self, text: str) -> str | None:
        """The calls' text without a leading tag, or None when the answer does not open like calls."""
        body = text.lstrip()
        for opener in self.OPENERS:
            if body.startswith(opener):
                return body
        return None

    def content_end(self, text: str) -> int:
        body = text.lstrip()
        if not body or any(o.startswith(body) or body.startswith(o) for o in self.OPENERS):
            return 0  # (so far) it opens like calls: nothing streams until the end decides
        return len(text)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        body = self._body(text)
        if body is None:
            return text, []
        try:
            calls = self._calls(body)
        except (ValueError, TypeError, KeyError, AttributeError, SyntaxError, RecursionError):
            return text, []
        return (None, calls) if calls else (text, [])

    def _calls(self, body: str) -> list[ToolCall]:
        raise NotImplementedError


class Llama3Json(_WholeAnswer):
    OPENERS = ("<|python_tag|>", "{")
    _decoder = json.JSONDecoder()

    def _calls(self, body: str) -> list[ToolCall]:
        body = body.removeprefix("<|python_tag|>")
        calls, at = [], 0
        while True:
            while at < len(body) and (body[at].isspace() or body[at] == ";"):
                at += 1
            if at == len(body):
                return calls
            call, at = self._decoder.raw_decode(body, at)
            calls.append(_call(call["name"], call.get("parameters", call.get("arguments", {}))))


class Pythonic(_WholeAnswer):
    OPENERS = ("[",)

    def _calls(self, body: str) -> list[ToolCall]:
        tree = ast.parse(body.strip(), mode="eval").body
        if not isinstance(tree, ast.List):
            raise ValueError("not a list of calls")
        calls = []
        for node in tree.elts:
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
                raise ValueError("each item is name(keyword=value, ...)")
            # literal_eval reads constants, lists, dicts; anything else (a name, a call) is refused
            arguments = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg is not None}
            if len(arguments) != len(node.keywords):
                raise ValueError("**kwargs are not arguments")
            calls.append(_call(node.func.id, arguments))
        return calls


class Mistral(_Tagged):
    keeps_special_tokens = True
    OPEN = "[TOOL_CALLS]"
    ARGS = "[ARGS]"

    def _calls(self, text: str) -> list[ToolCall]:
        calls = []
        for body in text.split(self.OPEN)[1:]:
            if self.ARGS in body:  # name[ARGS]{...}
                name, arguments = body.split(self.ARGS, 1)
                calls.append(_call(name.strip(), json.loads(arguments)))
            else:
                items = json.loads(body)
                calls.extend(_json_call(call) for call in (items if isinstance(items, list) else [items]))
        return calls


PARSERS: dict[str, ToolParser] = {"hermes": Hermes(), "llama3_json": Llama3Json(), "pythonic": Pythonic(),
                                  "mistral": Mistral()}

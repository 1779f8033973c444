"""Reading a `tool_choice: "required"` answer as it grows: a JSON array of `{"name", "parameters"}` objects
(the grammar's shape), each call's name once its string is whole and its parameters' raw text as far as
it has come, so the calls stream piecewise, as a named function's arguments do.

The parameters are passed on as written (the grammar writes compact JSON), so a streamed answer's
arguments and a whole one's are the same text.
"""
from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass
class PartialCall:
    name: str | None = None  # once its string has closed
    start: int | None = None  # where its parameters' value begins in the text
    end: int | None = None  # just past where it ends; None while it is still being written

    def arguments(self, text: str) -> str:
        return "" if self.start is None else text[self.start : self.end]


def scan_calls(text: str) -> list[PartialCall]:
    """The calls of a (possibly unfinished) `[{"name": ..., "parameters": {...}}, ...]`, in order."""
    calls: list[PartialCall] = []
    depth, in_string, escaped = 0, False, False
    key: str | None = None
    expecting = "key"  # inside a call object (depth 2): a key, or the value after its ':'
    string_start: int | None = None
    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
                if string_start is not None:  # a key, or the name's value, is whole
                    value = json.loads(text[string_start - 1 : i + 1])
                    if expecting == "key":
                        key = value
                    else:
                        calls[-1].name = value
                    string_start = None
                elif depth == 2 and key == "parameters" and calls[-1].end is None:
                    calls[-1].end = i + 1  # parameters given as a string
            continue
        if ch == '"':
            in_string = True
            if depth == 2 and (expecting == "key" or key == "name"):
                string_start = i + 1
            elif depth == 2 and key == "parameters" and calls[-1].start is None:
                calls[-1].start = i
        elif ch in "{[":
            if depth == 2 and expecting == "value" and key == "parameters" and calls[-1].start is None:
                calls[-1].start = i
            depth += 1
            if depth == 2 and ch == "{":
                calls.append(PartialCall())
                key, expecting = None, "key"
        elif ch in "}]":
            if depth == 2 and key == "parameters" and calls[-1].start is not None and calls[-1].end is None:
                calls[-1].end = i  # a scalar value ends where its object does
            depth -= 1
            if depth == 2 and key == "parameters" and calls[-1].end is None:
                calls[-1].end = i + 1  # the parameters' object (or array) closed
        elif depth == 2:
            if ch == ":":
                expecting = "value"
            elif ch == ",":
                if key == "parameters" and calls[-1].start is not None and calls[-1].end is None:
                    calls[-1].end = i
                key, expecting = None, "key"
            elif not ch.isspace() and expecting == "value" and key == "parameters" and calls[-1].start is None:
                calls[-1].start = i  # a scalar (null, a number): the schema allows only objects, but be exact
    return calls

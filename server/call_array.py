"""Reading a `tool_choice: "required"` answer as it grows: a JSON array of `{"name", "parameters"}` objects
(the grammar's shape), each call's name once its string is whole and its parameters' raw text as far as
it has come, so the calls stream piecewise, as a named function's arguments do.

The parameters are passed on as written (the grammar writes compact JSON), so a streamed answer's
arguments and a whole one's are the same text. The reader keeps its place: each delta is read once.
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


class CallArrayReader:
    """The calls of a growing `[{"name": ..., "parameters": {...}}, ...]`: `read(text)` takes the
    whole text so far (each call extends the last one's) and reads only what it has not seen."""

    def __init__(self) -> None:
        self.calls: list[PartialCall] = []
        self.pos = 0  # characters read
        self.depth, self.in_string, self.escaped = 0, False, False
        self.key: str | None = None
        self.expecting = "key"  # inside a call object (depth 2): a key, or the value after its ':'
        self.string_start: int | None = None

    def read(self, text: str) -> list[PartialCall]:
        calls = self.calls
        for i in range(self.pos, len(text)):
            ch = text[i]
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
                    if self.string_start is not None:  # a key, or the name's value, is whole
                        value = json.loads(text[self.string_start - 1 : i + 1])
                        if self.expecting == "key":
                            self.key = value
                        else:
                            calls[-1].name = value
                        self.string_start = None
                    elif self.depth == 2 and self.key == "parameters" and calls[-1].end is None:
                        calls[-1].end = i + 1  # parameters given as a string
                continue
            if ch == '"':
                self.in_string = True
                if self.depth == 2 and (self.expecting == "key" or self.key == "name"):
                    self.string_start = i + 1
                elif self.depth == 2 and self.key == "parameters" and calls[-1].start is None:
                    calls[-1].start = i
            elif ch in "{[":
                if (self.depth == 2 and self.expecting == "value" and self.key == "parameters"
                        and calls[-1].start is None):
                    calls[-1].start = i
                self.depth += 1
                if self.depth == 2 and ch == "{":
                    calls.append(PartialCall())
                    self.key, self.expecting = None, "key"
            elif ch in "}]":
                if (self.depth == 2 and self.key == "parameters" and calls[-1].start is not None
                        and calls[-1].end is None):
                    calls[-1].end = i  # a scalar value ends where its object does
                self.depth -= 1
                if self.depth == 2 and self.key == "parameters" and calls[-1].end is None:
                    calls[-1].end = i + 1  # the parameters' object (or array) closed
            elif self.depth == 2:
                if ch == ":":
                    self.expecting = "value"
                elif ch == ",":
                    if self.key == "parameters" and calls[-1].start is not None and calls[-1].end is None:
                        calls[-1].end = i
                    self.key, self.expecting = None, "key"
                elif (not ch.isspace() and self.expecting == "value" and self.key == "parameters"
                      and calls[-1].start is None):
                    calls[-1].start = i  # a scalar (null, a number): the schema allows only objects, but be exact
        self.pos = len(text)
        return calls


def scan_calls(text: str) -> list[PartialCall]:
    """The calls of a (possibly unfinished) `[{"name": ..., "parameters": {...}}, ...]`, in order."""
    return CallArrayReader().read(text)

"""A request's output constraint (JSON schema, JSON object, regex, choice, grammar) as an
llguidance grammar, compiled and checked once when the request is made.

No torch and no tokenizer here: what a grammar allows token by token is engine/guided.py's job.
Compiling here means a bad schema or pattern is the client's 400 before the request is queued.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from engine.errors import InvalidRequestError


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError as exc:  # a core dependency; missing only in a broken install
        raise InvalidRequestError("structured outputs need the llguidance package") from exc
    return llguidance


@dataclass(frozen=True)
class StructuredOutput:
    """`grammar` is llguidance's grammar text; `kind` names what it came from (json, json_object,
    regex, choice, grammar)."""

    kind: str
    grammar: str

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | bool | str, param: str = "structured_outputs") -> StructuredOutput:
        text = schema if isinstance(schema, str) else json.dumps(schema)
        return cls._compile("json", lambda m: m.grammar_from_json_schema(text), param)

    @classmethod
    def json_object(cls, param: str = "structured_outputs") -> StructuredOutput:
        # OpenAI's JSON mode: any JSON object (not any JSON value)
        return cls._compile("json_object", lambda m: m.grammar_from_json_schema('{"type": "object"}'), param)

    @classmethod
    def regex(cls, pattern: str, param: str = "structured_outputs") -> StructuredOutput:
        return cls._compile("regex", lambda m: m.grammar_from_regex(pattern), param)

    @classmethod
    def choice(cls, options: list[str], param: str = "structured_outputs") -> StructuredOutput:
        if not options:
            raise InvalidRequestError("choice must list at least one string", param)
        lark = "start: " + " | ".join(json.dumps(o) for o in options)  # a Lark string literal is JSON's
        return cls._compile("choice", lambda m: m.grammar_from_lark(lark), param)

    @classmethod
    def lark(cls, grammar: str, param: str = "structured_outputs") -> StructuredOutput:
        """A Lark grammar, or llama.cpp's GBNF (converted)."""
        llg = _llguidance()
        return cls._compile("grammar", lambda m: llg.grammar_from("grammar", grammar), param)

    @classmethod
    def _compile(cls, kind: str, build: Any, param: str) -> StructuredOutput:
        matcher = _llguidance().LLMatcher
        try:
            grammar = build(matcher)
            error = matcher.validate_grammar(grammar)
        except Exception as exc:  # llguidance raises ValueError/RuntimeError on malformed input
            error = str(exc) or type(exc).__name__
        if error:
            raise InvalidRequestError(f"invalid {kind} constraint: {error.strip()}", param)
        return cls(kind, grammar)

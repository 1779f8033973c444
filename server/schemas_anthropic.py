"""Anthropic Messages API shapes (`POST /v1/messages`, `/v1/messages/count_tokens`), in pydantic v2.

Messages hold a text or content blocks: text, the `tool_use` blocks an earlier answer made (assistant
turns), the `tool_result` blocks that answer them (user turns), and earlier thinking (kept out of
the prompt). Images, documents and server tools are refused by the unions. Requests are strict and
ignore unknown fields (`cache_control`, `citations`, ...), as `server.schemas` explains.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints, model_validator

from server.schemas import NonEmptyStr, _Request, _Response, bounded


# ---- request -------------------------------------------------------------------------------
class TextBlockIn(_Request):
    type: Literal["text"]
    text: str


class ToolUseIn(_Request):
    """A call an earlier answer made (assistant turns)."""

    type: Literal["tool_use"]
    id: NonEmptyStr
    name: NonEmptyStr
    input: dict[str, Any]


class ToolResultIn(_Request):
    """The result of a call (user turns)."""

    type: Literal["tool_result"]
    tool_use_id: NonEmptyStr
    content: str | list[TextBlockIn] = ""
    is_error: bool = False

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(b.text for b in self.content)


class ThinkingIn(_Request):
    """Earlier thinking, sent back as Anthropic's clients do: left out of the prompt, as chat
    templates drop a past turn's thinking."""

    type: Literal["thinking"]


class RedactedThinkingIn(_Request):
    type: Literal["redacted_thinking"]


Block = Annotated[TextBlockIn | ToolUseIn | ToolResultIn | ThinkingIn | RedactedThinkingIn,
                  Field(discriminator="type")]


class AnthropicMessage(_Request):
    role: Literal["user", "assistant"]
    content: str | Annotated[list[Block], Field(min_length=1)]


class AnthropicTool(_Request):
    type: Literal["custom"] | None = None  # server tools (web search, ...) have other types: refused
    name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: str | None = None
    input_schema: dict[str, Any] = Field(description="JSON Schema of the call's input")


class AnthropicToolChoice(_Request):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = Field(None, description="With type `tool`: the tool to call")
    disable_parallel_tool_use: bool = False

    @model_validator(mode="after")
    def _name_given(self) -> AnthropicToolChoice:
        if (self.type == "tool") != (self.name is not None):
            raise ValueError("tool_choice takes a name with type tool, and only then")
        return self


class ThinkingConfig(_Request):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(None, ge=1, le=2**31 - 1, description="With `enabled` and the server's "
                                      "--reasoning-parser: after this many thinking tokens the block's end is "
                                      "forced and the model answers (without a parser: accepted, not enforced)")


class JsonOutputFormat(_Request):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema", description="The JSON Schema the answer's text follows")


class OutputConfig(_Request):
    format: JsonOutputFormat | None = Field(None, description="Structured output: the text is JSON of this schema")
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = Field(
        None, description="Passed to the chat template as `reasoning_effort`; templates without it ignore it")


class SystemText(_Request):
    type: Literal["text"]
    text: str


class CountTokensRequest(_Request):
    model: str | None = None  # None: the first served generation model
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[SystemText] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    thinking: ThinkingConfig | None = Field(
        None, description="enabled/disabled reach the chat template as `enable_thinking` (Qwen3's switch)")
    output_config: OutputConfig | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: int = bounded("max_tokens", ...)
    stop_sequences: list[NonEmptyStr] | None = None
    stream: bool = False
    temperature: float | None = bounded("temperature")
    top_p: float | None = bounded("top_p")
    top_k: int | None = bounded("top_k")
    metadata: dict[str, Any] | None = None


# ---- answer --------------------------------------------------------------------------------
class TextBlockOut(_Response):
    type: Literal["text"] = "text"
    text: str


class ThinkingBlockOut(_Response):
    type: Literal["thinking"] = "thinking"
    thinking: str
    signature: str = Field("", description="Empty: kvserve does not sign thinking")


class ToolUseOut(_Response):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


ContentOut = Annotated[TextBlockOut | ThinkingBlockOut | ToolUseOut, Field(discriminator="type")]


class AnthropicUsage(_Response):
    input_tokens: int = Field(description="Prompt tokens not read from the prefix cache")
    output_tokens: int
    cache_read_input_tokens: int | None = Field(None, description="Prompt tokens read from the prefix cache")
    cache_creation_input_tokens: int | None = None


class MessageResponse(_Response):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[ContentOut]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"] | None
    stop_sequence: str | None = None
    usage: AnthropicUsage


class MessageStreamEvent(_Response):
    """One streamed event; `type` says which of the optional fields it has (as Anthropic's events)."""

    type: Literal["message_start", "content_block_start", "content_block_delta", "content_block_stop",
                  "message_delta", "message_stop", "ping"]
    message: MessageResponse | None = None
    index: int | None = None
    content_block: ContentOut | None = None
    delta: dict[str, Any] | None = None
    usage: dict[str, int] | None = None


class TokenCount(_Response):
    input_tokens: int


class AnthropicErrorDetail(_Response):
    type: str
    message: str


class AnthropicErrorResponse(_Response):
    """Every 4xx/5xx answer of the Messages API, in Anthropic's shape."""

    type: Literal["error"] = "error"
    error: AnthropicErrorDetail

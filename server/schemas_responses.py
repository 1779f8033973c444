"""OpenAI Responses API shapes (`POST /v1/responses`), request and answer, in pydantic v2.

A request's `input` is a text or a list of items: messages (`type` may be left out), the function
calls an earlier answer made and their outputs, and earlier reasoning (kept out of the prompt, as
chat templates drop a past turn's thinking). Images, files and audio are refused by the content
union; so are tools other than functions. Requests are strict and ignore unknown fields, as
`server.schemas` explains.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, StringConstraints, Tag, model_validator

from server.schemas import NonEmptyStr, _Request, _Response, bounded


# ---- request -------------------------------------------------------------------------------
class InputText(_Request):
    type: Literal["input_text"]
    text: str


class OutputTextIn(_Request):
    """An earlier answer's text, sent back as part of an assistant message."""

    type: Literal["output_text"]
    text: str


class RefusalIn(_Request):
    type: Literal["refusal"]
    refusal: str


ContentPart = Annotated[InputText | OutputTextIn | RefusalIn, Field(discriminator="type")]


class MessageItem(_Request):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.refusal if isinstance(p, RefusalIn) else p.text for p in self.content)


class FunctionCallItem(_Request):
    """A call an earlier answer made."""

    type: Literal["function_call"]
    call_id: NonEmptyStr
    name: NonEmptyStr
    arguments: str = Field(description="JSON text")


class FunctionCallOutputItem(_Request):
    """The result of a call, for the model to read."""

    type: Literal["function_call_output"]
    call_id: NonEmptyStr
    output: str | list[InputText]

    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(p.text for p in self.output)


class ReasoningItem(_Request):
    """An earlier answer's reasoning: accepted so a client may send its whole history back, and
    left out of the prompt (chat templates drop a past turn's thinking too)."""

    type: Literal["reasoning"]


def _item_type(value: Any) -> str:
    # a message may leave its `type` out (the API's "easy input message")
    kind = value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", None)
    return kind if isinstance(kind, str) else "message"


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")] | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(_item_type),
]


class FunctionTool(_Request):
    type: Literal["function"]
    name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="JSON Schema of the arguments")
    strict: bool | None = None


class FunctionToolChoice(_Request):
    type: Literal["function"]
    name: str


class TextFormat(_Request):
    """Free text, any JSON object, or JSON following a schema (the Responses API's flat form of
    chat's `response_format`)."""

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema", description="Required with type `json_schema`")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> TextFormat:
        if self.type == "json_schema" and self.schema_ is None:
            raise ValueError("text.format of type json_schema needs a schema")
        return self


class TextConfig(_Request):
    format: TextFormat | None = None


class ReasoningConfig(_Request):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = Field(
        None, description="Passed to the chat template as `reasoning_effort` (as vLLM does); templates "
                          "without the variable ignore it")
    summary: Literal["auto", "concise", "detailed"] | None = Field(
        None, description="Reasoning is answered whole (`content`), never summarised")


class ResponsesRequest(_Request):
    model: str | None = None  # None: the first served generation model
    input: NonEmptyStr | Annotated[list[InputItem], Field(min_length=1)]
    instructions: str | None = Field(None, description="A system message put first; not carried over by "
                                                       "previous_response_id")
    previous_response_id: str | None = Field(None, description="Continue a stored response's conversation")
    store: bool = Field(True, description="Keep the answer (in memory, bounded by --responses-store-size) "
                                          "for GET /v1/responses/{id} and previous_response_id")
    max_output_tokens: int | None = bounded("max_tokens")
    temperature: float | None = bounded("temperature")
    top_p: float | None = bounded("top_p")
    top_logprobs: int | None = bounded("logprobs")
    include: list[str] | None = Field(None, description="`message.output_text.logprobs` adds token logprobs")
    stream: bool = False
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionToolChoice | None = Field(
        None, description="auto (the default with tools) needs the server's --tool-call-parser")
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    metadata: Annotated[dict[str, Annotated[str, StringConstraints(max_length=512)]],
                        Field(max_length=16)] | None = None
    truncation: Literal["auto", "disabled"] | None = Field(
        None, description="`disabled` (the default): a conversation over the context is a 400; `auto`: its oldest "
                          "turns are left out of the prompt until it fits (the stored conversation keeps them)")
    background: bool | None = Field(None, description="Answer at once with status `queued` and run the response "
                                    "in the background: poll GET /v1/responses/{id}, stop it with POST "
                                    "/v1/responses/{id}/cancel. Needs `store`. With `stream`, its events follow; "
                                    "GET /v1/responses/{id}?stream=true&starting_after=N resumes them")
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = Field(None, description="Accepted; the prefix cache needs no key")
    # vLLM extras
    top_k: int | None = bounded("top_k")
    min_p: float | None = bounded("min_p")
    repetition_penalty: float | None = bounded("repetition_penalty")
    seed: int | None = bounded("seed")
    chat_template_kwargs: dict[str, Any] | None = None
    priority: int = Field(0, ge=-(2**31), le=2**31 - 1, description="Lower is served first; needs "
                                                                    "--scheduling-policy priority")


# ---- answer --------------------------------------------------------------------------------
class TopLogprobOut(_Response):
    token: str
    logprob: float
    bytes: list[int]


class LogprobOut(TopLogprobOut):
    top_logprobs: list[TopLogprobOut]


class OutputText(_Response):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[LogprobOut] | None = None


class OutputMessage(_Response):
    type: Literal["message"] = "message"
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class FunctionCallOut(_Response):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"]


class ReasoningText(_Response):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class ReasoningOut(_Response):
    type: Literal["reasoning"] = "reasoning"
    id: str
    summary: list[Any] = Field(default_factory=list)
    content: list[ReasoningText]
    status: Literal["in_progress", "completed", "incomplete"]


OutputItem = Annotated[OutputMessage | FunctionCallOut | ReasoningOut, Field(discriminator="type")]


class InputTokensDetails(_Response):
    cached_tokens: int = Field(description="Input tokens whose K/V came from the prefix cache.")
    cache_write_tokens: int = Field(description="Input tokens computed, and so written to the KV cache.")


class OutputTokensDetails(_Response):
    reasoning_tokens: int


class ResponseUsage(_Response):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(_Response):
    reason: Literal["max_output_tokens", "content_filter"]


class ResponseError(_Response):
    code: str
    message: str


class ResponseObject(_Response):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    # queued, cancelled and failed: background responses only
    status: Literal["queued", "in_progress", "completed", "incomplete", "cancelled", "failed"]
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[OutputItem]
    parallel_tool_calls: bool
    previous_response_id: str | None = None
    reasoning: dict[str, Any] | None = None
    store: bool
    temperature: float | None = None
    text: dict[str, Any]
    tool_choice: str | dict[str, Any]
    tools: list[dict[str, Any]]
    top_p: float | None = None
    top_logprobs: int | None = None
    truncation: Literal["auto", "disabled"] = "disabled"
    background: bool = False
    usage: ResponseUsage | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None


class InputItemList(_Response):
    """A page of a stored response's input items (messages, function calls and outputs, reasoning)."""

    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool


class ResponseDeleted(_Response):
    id: str
    object: Literal["response.deleted"] = "response.deleted"
    deleted: bool


class ResponseEvent(_Response):
    """One streamed event; `type` says which of the optional fields it has (as OpenAI's events)."""

    type: Literal[
        "response.created", "response.in_progress", "response.completed", "response.incomplete",
        "response.output_item.added", "response.output_item.done", "response.content_part.added",
        "response.content_part.done", "response.output_text.delta", "response.output_text.done",
        "response.reasoning_text.delta", "response.reasoning_text.done",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
    ]
    sequence_number: int
    response: ResponseObject | None = None
    output_index: int | None = None
    item: OutputItem | None = None
    item_id: str | None = None
    content_index: int | None = None
    part: OutputText | ReasoningText | None = None
    delta: str | None = None
    text: str | None = None
    logprobs: list[LogprobOut] | None = None
    arguments: str | None = None
    name: str | None = None

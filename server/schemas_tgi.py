"""text-generation-inference's request and response models: POST /generate, /generate_stream, / and
GET /info (TGI's shapes, so `huggingface_hub.InferenceClient.text_generation` and TGI's own clients
work unchanged). Requests are strict, as in `server.schemas`; TGI's clients leave unset fields out,
and `null` reads as unset, as TGI reads it.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from engine.sampling_params import BOUNDS, MAX_LOGPROBS, MAX_N
from server.schemas import NonEmptyStr, _Request, _Response, bounded, unsupported

MAX_STOP_SEQUENCES = 16  # TGI's --max-stop-sequences defaults to 4; kvserve allows more
DEFAULT_MAX_NEW_TOKENS = 100  # TGI's default when the request gives none


class TgiGrammar(_Request):
    """`json`: a JSON Schema (an object, or its text); `json_schema`: `{"name", "schema"}` as
    OpenAI's response_format carries it; `regex`: a pattern the whole output matches."""

    type: Literal["json", "json_schema", "regex"]
    value: dict[str, Any] | str

    @model_validator(mode="after")
    def _value_fits(self) -> TgiGrammar:
        if self.type == "regex" and not isinstance(self.value, str):
            raise ValueError("a regex grammar's value is the pattern, a string")
        if self.type == "json_schema" and not (isinstance(self.value, dict) and "schema" in self.value):
            raise ValueError('a json_schema grammar\'s value is {"name": ..., "schema": {...}}')
        return self


class TgiParameters(_Request):
    best_of: int | None = Field(None, ge=1, le=MAX_N, description="Sample this many, return the most likely")
    temperature: float | None = Field(None, gt=0.0, le=BOUNDS["temperature"].high)
    repetition_penalty: float | None = bounded("repetition_penalty")
    frequency_penalty: float | None = bounded("frequency_penalty")
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = bounded("top_p")
    typical_p: float | None = bounded("typical_p")
    do_sample: bool | None = Field(None, description="Sample; also implied by temperature, top_k, top_p or typical_p")
    max_new_tokens: int | None = Field(DEFAULT_MAX_NEW_TOKENS, ge=1, description="null: up to the context")
    return_full_text: bool | None = Field(None, description="Prefix the answer with `inputs`")
    stop: Annotated[list[NonEmptyStr], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    truncate: int | None = Field(None, ge=1, description="Keep only the last `truncate` tokens of `inputs`")
    watermark: unsupported(bool | None, "watermark: kvserve adds no watermark", {"enum": [False, None]}) = None
    details: bool | None = None
    decoder_input_details: bool | None = Field(None, description="With details: the prompt's tokens and logprobs")
    seed: int | None = Field(None, ge=0, le=BOUNDS["seed"].high)
    top_n_tokens: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    grammar: TgiGrammar | None = None
    adapter_id: str | None = Field(None, description="A LoRA adapter the model has loaded (--lora-modules)")


class TgiGenerateRequest(_Request):
    model: str | None = None  # extension: TGI serves one model; here the first generation model when absent
    inputs: NonEmptyStr
    parameters: TgiParameters | None = None


class TgiCompatRequest(TgiGenerateRequest):
    """POST / (TGI's route for clients given only the server's URL): `stream` picks the answer."""

    stream: bool | None = False


class TgiTokenizeRequest(TgiGenerateRequest):
    """POST /tokenize in TGI's shape (told from kvserve's by `inputs`): the tokens /generate would see."""


class TgiSimpleToken(_Response):
    id: int
    text: str  # the characters of `inputs` the token came from ("" for an added special token)
    start: int
    stop: int


FinishReason = Literal["length", "eos_token", "stop_sequence"]


class TgiPrefillToken(_Response):
    id: int
    text: str
    logprob: float | None = Field(description="null for the first token: nothing predicts it")


class TgiToken(_Response):
    id: int
    text: str
    logprob: float | None
    special: bool


class TgiBestOfSequence(_Response):
    generated_text: str
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None = None
    prefill: list[TgiPrefillToken]
    tokens: list[TgiToken]
    top_tokens: list[list[TgiToken]] | None = None


class TgiDetails(_Response):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None = None
    prefill: list[TgiPrefillToken]
    tokens: list[TgiToken]
    best_of_sequences: list[TgiBestOfSequence] | None = None
    top_tokens: list[list[TgiToken]] | None = None


class TgiGenerateResponse(_Response):
    generated_text: str
    details: TgiDetails | None = None


class TgiStreamDetails(_Response):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None = None
    input_length: int


class TgiStreamResponse(_Response):
    """One event per generated token; the last also carries the whole text and the details."""

    index: int
    token: TgiToken
    top_tokens: list[TgiToken] | None = None
    generated_text: str | None = None
    details: TgiStreamDetails | None = None


class ServerInfo(_Response):
    """TGI's (and TEI's) `/info`, for the model that requests without `model` reach."""

    model_id: str
    model_sha: str | None = None
    model_dtype: str
    model_device_type: str
    model_pipeline_tag: str
    max_concurrent_requests: int
    max_best_of: int
    max_stop_sequences: int
    max_input_tokens: int
    max_total_tokens: int
    max_client_batch_size: int
    router: str
    version: str
    sha: str | None = None
    docker_label: str | None = None
    model_type: dict[str, Any] | None = Field(None, description="TEI's: embedding (pooling) or classifier (labels)")
    models: list[str] = Field(description="Extension: every model this server serves (GET /v1/models)")


class TgiErrorResponse(_Response):
    """Every 4xx/5xx answer of TGI's routes, and a stream's failure event, in TGI's shape."""

    error: str
    error_type: Literal["validation", "overloaded", "generation"]

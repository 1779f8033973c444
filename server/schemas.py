"""OpenAI-compatible request and response models (pydantic v2).

Requests are STRICT: a string where a number belongs is a 400, not silently coerced. Numeric
ranges come from `engine.sampling_params.BOUNDS`, the table `SamplingParams` checks (shared with
the offline `LLM`), so the published OpenAPI schema states exactly what is enforced. Unknown
fields are ignored, as OpenAI clients send newer fields than any server knows.

The response models document the routes' answers in the OpenAPI schema; the routes build plain
dicts (no per-response validation cost) and a fuzz test holds them to these models.
"""
from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, RootModel, StringConstraints, model_validator

from engine.sampling_params import BOUNDS, LOGIT_BIAS


def bounded(name: str, default: Any = None) -> Any:
    """A field with `BOUNDS[name]` as its JSON-schema range (enforced again by SamplingParams)."""
    b = BOUNDS[name]
    low = {"gt": b.low} if b.low_open else {"ge": b.low}
    return Field(default, **low, **({} if b.high is None else {"le": b.high}))


NonEmptyStr = Annotated[str, StringConstraints(min_length=1)]
TokenId = Annotated[int, Field(ge=0)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
# OpenAI's four prompt forms: a text, texts, token ids, lists of token ids; none of them empty
TextsOrTokens = (
    NonEmptyStr | Annotated[list[NonEmptyStr], Field(min_length=1)] | TokenIds
    | Annotated[list[TokenIds], Field(min_length=1)]
)


def _visible(text: str) -> str:
    if not text.strip():
        raise ValueError("String should contain a character other than whitespace")
    return text


# not only whitespace; the schema states it as a pattern, the validator says it in words
VisibleStr = Annotated[str, AfterValidator(_visible), Field(json_schema_extra={"pattern": r"\S"})]


def unsupported(kind: Any, why: str, empty: dict[str, int]) -> Any:
    """`kind` for an OpenAI field kvserve cannot honour: absent or empty is fine, anything else is a
    400 saying why, rather than an answer that silently ignores what the client asked for. `empty`
    states the same in the JSON schema (e.g. {"maxItems": 0})."""

    def check(value: Any) -> Any:
        if value:
            raise ValueError(why)
        return value

    return Annotated[kind, AfterValidator(check), Field(description=why, json_schema_extra=empty)]


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- shared -----------------------------------------------------------------------------
class ErrorDetail(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(_Response):
    """Every 4xx/5xx answer, in OpenAI's shape."""

    error: ErrorDetail


class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = Field(False, description="With include_usage, every chunk carries the usage so "
                                                            "far (vLLM extra)")


class JsonSchemaSpec(_Request):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | bool = Field(None, alias="schema", description="The JSON Schema the output follows")
    strict: bool | None = None


class ResponseFormat(_Request):
    """OpenAI's output format: free text, any JSON object (JSON mode), or JSON following a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = Field(None, description="Required with type `json_schema`")

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError("response_format of type json_schema needs json_schema.schema")
        return self


class StructuredOutputs(_Request):
    """vLLM's structured outputs: exactly one constraint on the output."""

    json_: dict[str, Any] | bool | str = Field(None, alias="json", description="A JSON Schema (object or text)")
    regex: str = Field(None, description="A regular expression the whole output matches (Rust regex syntax)")
    choice: list[str] = Field(None, min_length=1, description="The output is one of these strings")
    grammar: str = Field(None, description="A Lark or llama.cpp GBNF grammar")
    json_object: Literal[True] = Field(None, description="Any JSON object")

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        given = [name for name in ("json_", "regex", "choice", "grammar", "json_object") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("structured_outputs takes exactly one of json, regex, choice, grammar, json_object")
        return self


class _SamplingFields(_Request):
    """Fields common to completions and chat (OpenAI's plus vLLM's extras)."""

    model: str | None = None  # None: the first served model of the right task
    n: int = bounded("n", 1)
    temperature: float | None = bounded("temperature")
    top_p: float | None = bounded("top_p")
    stop: NonEmptyStr | list[NonEmptyStr] | None = None
    seed: int | None = bounded("seed")
    presence_penalty: float | None = bounded("presence_penalty")
    frequency_penalty: float | None = bounded("frequency_penalty")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM extras
    top_k: int | None = bounded("top_k")
    min_p: float | None = bounded("min_p")
    repetition_penalty: float | None = bounded("repetition_penalty")
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    min_tokens: int = bounded("min_tokens", 0)
    structured_outputs: StructuredOutputs | None = None
    bad_words: list[str] | None = Field(None, description="Words the output may not contain, banned at the start "
                                                          "and after a space (vLLM extra)")
    # vLLM extra: score the prompt, each token's logprob and rank and the top N (not streamed)
    prompt_logprobs: int | None = bounded("prompt_logprobs")
    priority: int = Field(0, ge=-(2**31), le=2**31 - 1, description="Lower is served first; needs --scheduling-policy "
                                                                    "priority (vLLM extra)")
    # OpenAI's, for chat; vLLM takes it for completions too
    response_format: ResponseFormat | None = None
    logit_bias: dict[Annotated[str, StringConstraints(pattern=r"^[0-9]+$")],
                     Annotated[float, Field(ge=LOGIT_BIAS.low, le=LOGIT_BIAS.high)]] | None = Field(
        None, description="Token id (as a string) -> a value in [-100, 100] added to its logit before sampling")


class _Answer(_Response):
    """The head of every completion, chat and translation answer."""

    id: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str


class PromptTokensDetails(_Response):
    cached_tokens: int = Field(description="Prompt tokens whose K/V came from the prefix cache.")


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None  # completions and chat


# ---- /v1/completions --------------------------------------------------------------------
class CompletionRequest(_SamplingFields):
    prompt: TextsOrTokens
    # 0 with echo: the prompt back, scored with `logprobs` (vLLM's loglikelihood requests, lm-eval's)
    max_tokens: int | None = Field(16, ge=0, description="0 only with echo: the prompt alone, scored")
    logprobs: int | None = bounded("logprobs")
    echo: bool = False
    best_of: int | None = Field(None, description="Only equal to `n` (no server-side ranking of extra samples)")
    suffix: unsupported(str, "suffix (text insertion) is not supported", {"maxLength": 0}) | None = None


class CompletionLogprobs(_Response):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class PromptLogprob(_Response):
    logprob: float
    rank: int | None = None  # 1 + how many tokens were more likely
    decoded_token: str


# vLLM's `prompt_logprobs` answer: per prompt token, None for the first, else token id (a string) -> its entry;
# the prompt's own token first, then the top ones
PromptLogprobs = list[dict[str, PromptLogprob] | None]


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    prompt_logprobs: PromptLogprobs | None = None  # vLLM extra, with the request's prompt_logprobs


class CompletionResponse(_Answer):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionChunk(_Answer):
    """One event of a streamed completion; with `include_usage`, a last one has no choices and
    carries the usage."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


# ---- /v1/chat/completions ---------------------------------------------------------------
class TextPart(_Request):
    type: Literal["text"]
    text: str


class ToolCallFunction(_Request):
    name: str
    arguments: str = Field(description="JSON text")


class ToolCallIn(_Request):
    """A call an earlier assistant turn made, sent back in the conversation."""

    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # assistant turns that called tools
    tool_call_id: str | None = None  # tool turns: the call this result answers

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class FunctionDef(_Request):
    name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="JSON Schema of the arguments")
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = bounded("max_tokens")
    max_completion_tokens: int | None = bounded("max_tokens")  # OpenAI's newer name; wins over max_tokens
    logprobs: bool = False
    top_logprobs: int | None = bounded("logprobs")
    add_generation_prompt: bool = True  # vLLM extra
    continue_final_message: bool = False  # vLLM extra: the prompt ends inside the last assistant message
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="extra variables for the chat template, e.g. {\"enable_thinking\": false} (vLLM extra)")
    include_reasoning: bool = Field(
        True, description="with the server's --reasoning-parser: false leaves the reasoning out (vLLM extra)")
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = Field(
        None, description="OpenAI's; passed to the chat template as `reasoning_effort` (as vLLM does), which "
                          "templates without it ignore")
    thinking_token_budget: int | None = Field(
        None, ge=0, le=2**31 - 1, description="with the server's --reasoning-parser: after this many tokens of "
                                              "reasoning `</think>` is forced and the model answers (vLLM extra)")
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="auto (the default with tools) needs the server's --tool-call-parser")
    parallel_tool_calls: bool = True
    # OpenAI's older function calling, and audio output: refused like tools, never ignored
    functions: unsupported(list[dict[str, Any]], "function calling is not supported", {"maxItems": 0}) | None = None
    function_call: Literal["none", "auto"] | None = None  # with no functions, both mean a text answer
    modalities: list[Literal["text"]] | None = None
    audio: unsupported(dict[str, Any], "audio output is not supported", {"maxProperties": 0}) | None = None


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobEntry(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Response):
    content: list[TokenLogprobEntry] | None = None


class ToolCallFunctionOut(_Response):
    name: str
    arguments: str


class ToolCallOut(_Response):
    id: str
    type: Literal["function"]
    function: ToolCallFunctionOut


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    # with --reasoning-parser: the thinking block (vLLM's field; reasoning_content is its older name)
    reasoning: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class _ChatChoiceFields(_Response):
    index: int
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatChoice(_ChatChoiceFields):
    message: AssistantMessage


class ChatCompletionResponse(_Answer):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
    prompt_logprobs: PromptLogprobs | None = None  # vLLM extra: the templated prompt's, with prompt_logprobs


class ToolCallFunctionDelta(_Response):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(_Response):
    index: int
    id: str | None = None  # in each call's first event only
    type: Literal["function"] | None = None
    function: ToolCallFunctionDelta


class ChatDelta(_Response):
    role: Literal["assistant"] | None = None  # in each choice's first event only
    content: str | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(_ChatChoiceFields):
    delta: ChatDelta


class ChatCompletionChunk(_Answer):
    """One event of a streamed chat completion; with `include_usage`, a last one has no choices."""

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


# ---- /v1/embeddings ---------------------------------------------------------------------
class EmbeddingRequest(_Request):
    model: str | None = None
    input: TextsOrTokens
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None
    truncate: bool = False  # extension: cut inputs to the model's context instead of a 400


class EmbeddingData(_Response):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32, as OpenAI sends


class EmbeddingResponse(_Response):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage


# ---- /v1/score, /v1/rerank (vLLM; Jina/Cohere shapes), /rerank (TEI), /classify (vLLM) ----
Texts = NonEmptyStr | Annotated[list[NonEmptyStr], Field(min_length=1)]


class ScoreRequest(_Request):
    model: str | None = None
    text_1: Texts = Field(description="One text scored against each `text_2`, or as many texts as `text_2`")
    text_2: Texts
    truncate: bool = False  # extension, as on /v1/embeddings: cut over-long inputs instead of a 400
    user: str | None = None


class ScoreData(_Response):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreResponse(_Answer):
    object: Literal["list"] = "list"
    data: list[ScoreData]
    usage: Usage


class RerankDocument(_Request):
    text: NonEmptyStr


class RerankRequest(_Request):
    model: str | None = None
    query: NonEmptyStr
    documents: Annotated[list[NonEmptyStr | RerankDocument], Field(min_length=1)]
    top_n: int | None = Field(None, ge=1, description="Return the n most relevant documents; all when absent")
    return_documents: bool = True
    truncate: bool = False  # extension, as on /v1/embeddings
    user: str | None = None


class RerankDocumentOut(_Response):
    text: str


class RerankResult(_Response):
    index: int
    relevance_score: float
    document: RerankDocumentOut | None = None


class RerankUsage(_Response):
    total_tokens: int


class RerankResponse(_Response):
    id: str
    model: str
    usage: RerankUsage
    results: list[RerankResult]


class TeiRerankRequest(_Request):
    model: str | None = None  # extension: TEI serves one model; here the first reranker when absent
    query: NonEmptyStr
    texts: Annotated[list[NonEmptyStr], Field(min_length=1)]
    raw_scores: bool = False
    return_text: bool = False
    truncate: bool = False
    truncation_direction: Literal["Left", "Right", "left", "right"] = "Right"


class TeiRank(_Response):
    index: int
    score: float
    text: str | None = None


class TeiRerankResponse(RootModel[list[TeiRank]]):
    """Ranks, most relevant first (TEI answers a bare list)."""


class TeiEmbedRequest(_Request):
    model: str | None = None  # extension: TEI serves one model; here the first embedding model when absent
    inputs: TextsOrTokens
    normalize: bool = True
    truncate: bool = False
    truncation_direction: Literal["Right", "right"] = Field(
        "Right", description="Only right: an input is cut at its end, its trailing special tokens kept")
    dimensions: int | None = Field(None, ge=1)
    prompt_name: str | None = Field(None, description="One of the model's sentence-transformers prompts "
                                    "(config_sentence_transformers.json), put before each text input")


class TeiSimilarityInputs(_Request):
    source_sentence: NonEmptyStr
    sentences: Annotated[list[NonEmptyStr], Field(min_length=1)]


class TeiSimilarityParameters(_Request):
    truncate: bool = False
    truncation_direction: Literal["Right", "right"] = "Right"
    prompt_name: str | None = None


class TeiSimilarityRequest(_Request):
    """TEI's sentence similarity (huggingface_hub's `sentence_similarity` sends it to the server's URL)."""

    model: str | None = None  # extension: the first embedding model when absent
    inputs: TeiSimilarityInputs
    parameters: TeiSimilarityParameters | None = None


class TeiSimilarityResponse(RootModel[list[float]]):
    """The cosine similarity of `source_sentence` with each of `sentences`, in order."""


class TeiEmbedResponse(RootModel[list[list[float]]]):
    """One vector per input, in input order (TEI answers bare arrays)."""


class TeiEmbedAllRequest(_Request):
    model: str | None = None  # extension: the first embedding model when absent
    inputs: TextsOrTokens
    truncate: bool = False
    truncation_direction: Literal["Right", "right"] = Field(
        "Right", description="Only right: an input is cut at its end, its trailing special tokens kept")
    prompt_name: str | None = Field(None, description="One of the model's sentence-transformers prompts "
                                    "(config_sentence_transformers.json), put before each text input")


class TeiEmbedAllResponse(RootModel[list[list[list[float]]]]):
    """Per input, the model's last hidden state at every token (special tokens included), unpooled."""


class TeiEmbedSparseRequest(TeiEmbedAllRequest):
    """/embed_all's fields: inputs, and whether to cut over-long ones."""


class SparseValue(BaseModel):
    index: int  # a vocabulary id
    value: float  # its weight, > 0


class TeiEmbedSparseResponse(RootModel[list[list[SparseValue]]]):
    """Per input, a SPLADE model's non-zero vocabulary weights in index order."""


Pair = Annotated[list[NonEmptyStr], Field(min_length=2, max_length=2)]


class TeiPredictRequest(_Request):
    model: str | None = None  # extension: the first classifier when absent
    # TEI's forms: a text, a pair [a, b] (two strings are one pair), or a batch of texts and pairs
    inputs: NonEmptyStr | Pair | Annotated[list[NonEmptyStr | Pair], Field(min_length=1)]
    raw_scores: bool = False
    truncate: bool = False


class TeiPrediction(_Response):
    label: str
    score: float


class TeiPredictResponse(RootModel[list[TeiPrediction] | list[list[TeiPrediction]]]):
    """Labels by score, highest first; a batch gets one such list per input."""


class ClassifyRequest(_Request):
    model: str | None = None
    input: Texts
    truncate: bool = False
    user: str | None = None


class ClassifyData(_Response):
    index: int
    label: str
    probs: list[float]
    num_classes: int


class ClassifyResponse(_Answer):
    object: Literal["list"] = "list"
    data: list[ClassifyData]
    usage: Usage


# ---- /v1/models, /tokenize, /detokenize (vLLM shapes) -----------------------------------
class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kvserve"
    root: str | None = None
    parent: str | None = None  # a LoRA adapter's base model (vLLM's field); None for a base model
    max_model_len: int | None = None
    task: str | None = None  # extension: which routes serve this model


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class VersionResponse(_Response):
    version: str


class TokenizeRequest(_Request):
    """Either `prompt` (a completion) or `messages` (a chat, rendered by the template)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = None  # default: True for prompt, False for messages
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeResponse(_Response):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[TokenId]


class DetokenizeResponse(_Response):
    prompt: str


# ---- /v1/translations and /v1/summarizations (kvserve extensions) ----------------------
class _TextToTextRequest(_Request):
    """What an encoder-decoder request takes; unset fields take the model's defaults."""

    model: str | None = None
    input: VisibleStr | Annotated[list[VisibleStr], Field(min_length=1)]
    max_tokens: int | None = bounded("max_tokens")
    min_tokens: int | None = Field(None, ge=0, description="No end of text before this many tokens (HF's "
                                   "min_length less the start token); default: the model's")
    num_beams: int | None = bounded("num_beams")
    length_penalty: float | None = bounded("length_penalty")
    early_stopping: bool | None = None
    no_repeat_ngram_size: int | None = bounded("no_repeat_ngram_size")
    temperature: float | None = bounded("temperature")
    top_p: float | None = bounded("top_p")
    top_k: int | None = bounded("top_k")
    seed: int | None = bounded("seed")
    stream: bool = False
    user: str | None = None


class TranslationRequest(_TextToTextRequest):
    """Translate one text or several; unset fields take the model's generation_config.json defaults
    (Marian: 4 beams). T5 gets the prefix `translate {source_lang} to {target_lang}: `; a
    multilingual Marian gets the `>>{target_lang}<<` token; NLLB takes its codes (`eng_Latn`,
    `fra_Latn`): the source code leads the input, the target code is the first output token."""

    source_lang: str | None = None
    target_lang: str | None = None


class SummarizationRequest(_TextToTextRequest):
    """Summarize one text or several with an encoder-decoder summarizer: BART (bart-large-cnn,
    distilbart) or a model whose config.json has task_specific_params.summarization, as T5's does.
    Unset fields take the model's summarization settings, as HF's summarization pipeline does
    (bart-large-cnn: 4 beams, 56 to 142 tokens, no repeated trigram); T5 gets its `summarize: `
    prefix."""


class TranslationData(_Response):
    index: int
    translation: str
    finish_reason: str | None = None


class TranslationResponse(_Answer):
    object: Literal["translation"] = "translation"
    data: list[TranslationData]
    usage: Usage


class TranslationDelta(_Response):
    index: int
    delta: str
    finish_reason: str | None = None


class TranslationChunk(_Answer):
    """One event of a streamed translation; a last one has no data and carries the usage."""

    object: Literal["translation.chunk"] = "translation.chunk"
    data: list[TranslationDelta]
    usage: Usage | None = None


class SummarizationData(_Response):
    index: int
    summary: str
    finish_reason: str | None = None


class SummarizationResponse(_Answer):
    object: Literal["summarization"] = "summarization"
    data: list[SummarizationData]
    usage: Usage


class SummarizationChunk(_Answer):
    """One event of a streamed summary (a beam search's summary arrives whole, in one event); a last
    one has no data and carries the usage."""

    object: Literal["summarization.chunk"] = "summarization.chunk"
    data: list[TranslationDelta]
    usage: Usage | None = None


class LoadLoRAAdapterRequest(_Request):
    """vLLM's body for POST /v1/load_lora_adapter."""

    lora_name: NonEmptyStr
    lora_path: NonEmptyStr
    base_model_name: str | None = Field(None, description="The served model it adapts; default: the first "
                                        "generation model")


class UnloadLoRAAdapterRequest(_Request):
    lora_name: NonEmptyStr

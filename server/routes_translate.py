"""POST /v1/translations and /v1/summarizations: encoder-decoder models (Marian, NLLB, T5; BART,
Pegasus, T5 summarizers), one text or a list, SSE streaming.

Response: `{"id", "object": "translation", "created", "model", "data": [{"index", "translation",
"finish_reason"}], "usage"}` (a summary: `"object": "summarization"`, `"summary"`). Streaming (single
input): `translation.chunk` / `summarization.chunk` events whose data carry a text `delta`, a last
event with `usage`, then `[DONE]`.
"""
from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from engine.errors import InvalidRequestError, ModelNotFoundError
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.translation_request import TranslationRequest as Payload
from models.spec import ModelInfo
from server import generation as gen
from server import sse
from server.openapi import ENGINE_ERRORS, answers
from server.schemas import (SummarizationChunk, SummarizationRequest, SummarizationResponse, TranslationChunk,
                            TranslationRequest, TranslationResponse)
from server.state import ServerState, get_state, new_request_id, task_of

router = APIRouter()


def _texts(raw: str | list[str], max_inputs: int, stream: bool) -> list[str]:
    """Blank and empty inputs never get here: the request schema refuses them."""
    texts = [raw] if isinstance(raw, str) else list(raw)
    if len(texts) > max_inputs:
        raise InvalidRequestError(f"at most {max_inputs} inputs per request, got {len(texts)}", "input")
    if stream and len(texts) != 1:
        raise InvalidRequestError("stream supports a single input", "stream")
    return texts


def language_prefix(engine: Any, source_lang: str | None, target_lang: str | None) -> str:
    """What the model family expects in front of the text to pick the language pair."""
    if source_lang is None and target_lang is None:
        return ""
    if engine.info.architecture.startswith("T5"):
        if not source_lang or not target_lang:
            raise InvalidRequestError("T5 needs both source_lang and target_lang", "target_lang")
        return f"translate {source_lang} to {target_lang}: "
    vocab = getattr(engine.tokenizer, "encoder", {})
    codes = {t for t in vocab if t.startswith(">>") and t.endswith("<<")}
    if target_lang is None or not codes:
        return ""  # a single-pair Marian model: the pair is implied
    code = f">>{target_lang}<<"
    if code not in codes:
        raise InvalidRequestError(f"target_lang {target_lang!r} is not one of this model's "
                                  f"{sorted(c[2:-2] for c in codes)}", "target_lang")
    return code + " "


def language_code_inputs(engine: Any, texts: list[str], source_lang: str | None,
                         target_lang: str | None) -> tuple[list[list[int]], tuple[int, ...]]:
    """NLLB / M2M100: the source code leads each input, the target code is forced as the decoder's
    first token; with no target_lang, the folder's generation_config forced_bos_token_id."""
    tok = engine.tokenizer
    codes = tok.language_codes
    for param, lang in (("source_lang", source_lang), ("target_lang", target_lang)):
        if lang is not None and lang not in codes:
            examples = ", ".join(sorted(codes)[:6])
            raise InvalidRequestError(f"{param} {lang!r} is not one of this model's {len(codes)} language codes "
                                      f"({examples}, ...)", param)
    if target_lang is not None:
        forced: tuple[int, ...] = (codes[target_lang],)
    else:
        default = (engine.info.generation_defaults or {}).get("forced_bos_token_id")
        if default is None:
            raise InvalidRequestError("this multilingual model needs target_lang, a language code such as "
                                      f"{sorted(codes)[0]!r}", "target_lang")
        forced = (int(default),)
    return [tok.encode_source(t, source_lang) for t in texts], forced


@dataclass(frozen=True)
class _Kind:
    """How a text-to-text route names its answers."""

    object: str  # "translation": its stream's events are "translation.chunk"
    field: str  # the output text's key in each data item
    id_prefix: str


TRANSLATION = _Kind("translation", "translation", "trsl")
SUMMARIZATION = _Kind("summarization", "summary", "summ")
SUMMARIZER_ARCHITECTURES = ("Bart", "Pegasus")  # trained only to summarize: no task settings needed


def _params(engine: Any, body: TranslationRequest | SummarizationRequest, task: str | None) -> SamplingParams:
    return engine.default_params(
        task, max_tokens=body.max_tokens, min_tokens=body.min_tokens, num_beams=body.num_beams,
        length_penalty=body.length_penalty, early_stopping=body.early_stopping,
        no_repeat_ngram_size=body.no_repeat_ngram_size, temperature=body.temperature, top_p=body.top_p,
        top_k=body.top_k, seed=body.seed,
    )


@router.post("/v1/translations", responses=answers(TranslationResponse, ENGINE_ERRORS, stream=TranslationChunk))
async def translations(body: TranslationRequest, request: Request) -> Any:
    state = get_state(request)
    name, engine = state.resolve(body.model, "translate")
    texts = _texts(body.input, state.settings.max_prompts_per_request, body.stream)
    params = _params(engine, body, None)
    if hasattr(engine.tokenizer, "language_codes"):
        sources, forced = language_code_inputs(engine, texts, body.source_lang, body.target_lang)
    else:
        prefix = language_prefix(engine, body.source_lang, body.target_lang)
        sources, forced = [engine.tokenizer.encode(prefix + t) for t in texts], None
    payloads = [Payload(src, params, stream=body.stream, forced_prefix=forced) for src in sources]
    return await _run(request, name, payloads, TRANSLATION)


def summarization_prefix(info: ModelInfo) -> str | None:
    """The text a summarizer expects in front of its input (T5's `summarize: `); None for a model
    that is not one: neither BART nor Pegasus (summarizers by design) nor with
    task_specific_params.summarization in its config.json."""
    task = info.task_defaults.get("summarization")
    if task is None and not info.architecture.startswith(SUMMARIZER_ARCHITECTURES):
        return None
    return str((task or {}).get("prefix") or "")


def _summarizer(state: ServerState, model: str | None) -> tuple[str, Any, str]:
    """The (name, engine, prefix) a summarization addresses; `None` picks the first summarizer."""
    if model is None:
        for name, engine in state.served.items():
            prefix = summarization_prefix(engine.info) if task_of(engine) == "translate" else None
            if prefix is not None:
                return name, engine, prefix
        raise ModelNotFoundError("no summarization model is loaded; see GET /v1/models", "model")
    name, engine = state.resolve(model, "translate")
    prefix = summarization_prefix(engine.info)
    if prefix is None:
        raise InvalidRequestError(f"model {model!r} is not a summarizer: it is not BART or Pegasus and its "
                                  "config.json has no task_specific_params.summarization", "model")
    return name, engine, prefix


@router.post("/v1/summarizations",
             responses=answers(SummarizationResponse, ENGINE_ERRORS, stream=SummarizationChunk))
async def summarizations(body: SummarizationRequest, request: Request) -> Any:
    state = get_state(request)
    name, engine, prefix = _summarizer(state, body.model)
    texts = _texts(body.input, state.settings.max_prompts_per_request, body.stream)
    params = _params(engine, body, "summarization")
    payloads = [Payload(engine.tokenizer.encode(prefix + t), params, stream=body.stream) for t in texts]
    return await _run(request, name, payloads, SUMMARIZATION)


async def _run(request: Request, name: str, payloads: list[Payload], kind: _Kind) -> Any:
    state = get_state(request)
    request_id = new_request_id(kind.id_prefix)
    if payloads[0].stream:
        merged = await gen.open_streams(state.async_engine, name, request_id, payloads)
        return sse.response(_events(merged, request_id, name, kind), state, request_id)
    try:
        finals = await gen.cancel_on_disconnect(request, gen.run_all(state.async_engine, name, request_id, payloads))
    finally:
        state.metrics.forget(request_id)
    data = [{"index": i, kind.field: out.outputs[0].text, "finish_reason": out.outputs[0].finish_reason}
            for i, out in enumerate(finals)]
    return JSONResponse({"id": request_id, "object": kind.object, "created": int(time.time()), "model": name,
                         "data": data, "usage": gen.usage(finals, cached=False)})


async def _events(merged: AsyncIterator[tuple[int, RequestOutput]], request_id: str, model: str,
                  kind: _Kind) -> AsyncIterator[str]:
    created = int(time.time())
    chunk = f"{kind.object}.chunk"
    final: RequestOutput | None = None
    async for _, out in merged:
        final = out
        c = out.outputs[0]
        if not c.new_text and c.finish_reason is None:
            continue
        yield sse.event({"id": request_id, "object": chunk, "created": created, "model": model,
                        "data": [{"index": 0, "delta": c.new_text, "finish_reason": c.finish_reason}]})
    if final is not None:
        yield sse.event({"id": request_id, "object": chunk, "created": created, "model": model,
                        "data": [], "usage": gen.usage([final], cached=False)})

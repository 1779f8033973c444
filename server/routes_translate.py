"""POST /v1/translations: encoder-decoder models (Marian, T5, NLLB), one text or a list, SSE streaming.

Response: `{"id", "object": "translation", "created", "model", "data": [{"index", "translation",
"finish_reason"}], "usage"}`. Streaming (single input): `translation.chunk` events whose data
carry a text `delta`, a last event with `usage`, then `[DONE]`.
"""
from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from engine.errors import InvalidRequestError
from engine.outputs import RequestOutput
from engine.translation_request import TranslationRequest as Payload
from server import generation as gen
from server import sse
from server.openapi import ENGINE_ERRORS, answers
from server.schemas import TranslationChunk, TranslationRequest, TranslationResponse
from server.state import get_state, new_request_id

router = APIRouter()


def _texts(raw: str | list[str], max_inputs: int) -> list[str]:
    """Blank and empty inputs never get here: the request schema refuses them."""
    texts = [raw] if isinstance(raw, str) else list(raw)
    if len(texts) > max_inputs:
        raise InvalidRequestError(f"at most {max_inputs} inputs per request, got {len(texts)}", "input")
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


@router.post("/v1/translations", responses=answers(TranslationResponse, ENGINE_ERRORS, stream=TranslationChunk))
async def translations(body: TranslationRequest, request: Request) -> Any:
    state = get_state(request)
    name, engine = state.resolve(body.model, "translate")
    texts = _texts(body.input, state.settings.max_prompts_per_request)
    if body.stream and len(texts) != 1:
        raise InvalidRequestError("stream supports a single input", "stream")
    params = engine.default_params(
        max_tokens=body.max_tokens, num_beams=body.num_beams, length_penalty=body.length_penalty,
        early_stopping=body.early_stopping, no_repeat_ngram_size=body.no_repeat_ngram_size,
        temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, seed=body.seed,
    )
    if hasattr(engine.tokenizer, "language_codes"):
        sources, forced = language_code_inputs(engine, texts, body.source_lang, body.target_lang)
    else:
        prefix = language_prefix(engine, body.source_lang, body.target_lang)
        sources, forced = [engine.tokenizer.encode(prefix + t) for t in texts], ()
    payloads = [Payload(src, params, stream=bool(body.stream), forced_prefix=forced) for src in sources]
    request_id = new_request_id("trsl")

    if body.stream:
        merged = await gen.open_streams(state.async_engine, name, request_id, payloads)
        return sse.response(_events(merged, request_id, name), state, request_id)
    try:
        finals = await gen.cancel_on_disconnect(request, gen.run_all(state.async_engine, name, request_id, payloads))
    finally:
        state.metrics.forget(request_id)
    data = [{"index": i, "translation": out.outputs[0].text, "finish_reason": out.outputs[0].finish_reason}
            for i, out in enumerate(finals)]
    return JSONResponse({"id": request_id, "object": "translation", "created": int(time.time()), "model": name,
                         "data": data, "usage": gen.usage(finals, cached=False)})


async def _events(merged: AsyncIterator[tuple[int, RequestOutput]], request_id: str,
                  model: str) -> AsyncIterator[str]:
    created = int(time.time())
    final: RequestOutput | None = None
    async for _, out in merged:
        final = out
        c = out.outputs[0]
        if not c.new_text and c.finish_reason is None:
            continue
        yield sse.event({"id": request_id, "object": "translation.chunk", "created": created, "model": model,
                        "data": [{"index": 0, "delta": c.new_text, "finish_reason": c.finish_reason}]})
    if final is not None:
        yield sse.event({"id": request_id, "object": "translation.chunk", "created": created, "model": model,
                        "data": [], "usage": gen.usage([final], cached=False)})

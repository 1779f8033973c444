"""GET /v1/models (and one model), /version, /health, /metrics; POST /tokenize (vLLM's shape or TGI's), /detokenize."""
from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import Field

from engine.errors import InvalidRequestError, ModelNotFoundError
from server import generation as gen
from server import tgi
from server.errors import error_response
from server.openapi import TOKENIZER_ERRORS, answers
from server.schemas import (
    DetokenizeRequest, DetokenizeResponse, ErrorResponse, ModelCard, ModelList, TokenizeRequest, TokenizeResponse,
    VersionResponse,
)
from server.schemas_tgi import TgiSimpleToken, TgiTokenizeRequest
from server.state import get_state, task_of

router = APIRouter()
_STARTED = int(time.time())


def _card(name: str, engine: Any, parent: str | None = None) -> dict[str, Any]:
    """A served model's card, or (with `parent`, the model it adapts) a LoRA adapter's."""
    root = engine.loras.get(name).path if parent is not None else engine.info.path
    return {"id": name, "object": "model", "created": _STARTED, "owned_by": "kvserve", "root": root,
            "parent": parent, "max_model_len": engine.info.max_model_len, "task": task_of(engine)}


def _cards(served: dict[str, Any]) -> list[dict[str, Any]]:
    """Every served model, each followed by the LoRA adapters it has loaded."""
    return [card for name, engine in served.items()
            for card in [_card(name, engine)] + [_card(a, engine, name) for a in getattr(engine, "lora_names", ())]]


@router.get("/v1/models", responses=answers(ModelList, (401,)))
async def list_models(request: Request) -> Any:
    return {"object": "list", "data": _cards(get_state(request).served)}


@router.get("/v1/models/{model}", responses=answers(ModelCard, (401, 404)))
async def retrieve_model(model: str, request: Request) -> Any:
    """OpenAI's `models.retrieve`."""
    state = get_state(request)
    state.engine(model)  # a 404 for an unknown name
    return next(card for card in _cards(state.served) if card["id"] == model)


@router.get("/version", responses=answers(VersionResponse, ()))
async def version(request: Request) -> Any:
    return {"version": request.app.version}


@router.get("/health", response_class=Response, responses={
    200: {"description": "The engine is serving (empty body)", "content": None},
    503: {"model": ErrorResponse, "description": "No model is loaded, or the engine worker stopped"},
})
async def health(request: Request) -> Response:
    state = get_state(request)
    if not state.served:
        return error_response(503, "no model is loaded", "server_error")
    if not state.async_engine.is_running:
        return error_response(503, "the engine worker is not running", "server_error")
    return Response(status_code=200)


@router.get("/metrics", response_class=PlainTextResponse, responses={
    200: {"description": "Prometheus text exposition format",
          "content": {"text/plain": {"schema": {"type": "string"}}}},
})
async def metrics(request: Request) -> Response:
    return Response(generate_latest(get_state(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _engine_for(request: Request, model: str | None) -> tuple[str, Any]:
    """Any served model has a tokenizer; with none named, the first generation model (or any)."""
    state = get_state(request)
    if model is None:
        try:
            return state.resolve(None, "generate")
        except ModelNotFoundError:
            return next(iter(state.served.items()))
    return model, state.engine(model)


# a body with `inputs` is TGI's (other fields ignored, as everywhere); any other, vLLM's
_TokenizeBody = Annotated[TgiTokenizeRequest | TokenizeRequest, Field(union_mode="left_to_right")]


@router.post("/tokenize", responses=answers(TokenizeResponse | list[TgiSimpleToken], TOKENIZER_ERRORS))  # type: ignore[arg-type]
async def tokenize(body: _TokenizeBody, request: Request) -> Any:
    """vLLM's shape, or with `inputs` TGI's: each token /generate would see, with the characters it
    came from (after `parameters.truncate`, as TGI cuts)."""
    _, engine = _engine_for(request, body.model)
    if isinstance(body, TgiTokenizeRequest):
        if not hasattr(engine.tokenizer, "encode_offsets"):
            raise InvalidRequestError(f"model {body.model!r} has no character offsets for its tokens", "inputs")
        keep = body.parameters.truncate if body.parameters is not None else None
        tokens = tgi.truncated(engine.tokenizer.encode_offsets(body.inputs), keep)
        return JSONResponse([{"id": i, "text": body.inputs[a:b], "start": a, "stop": b} for i, a, b in tokens])
    if (body.prompt is None) == (body.messages is None):
        raise InvalidRequestError("give exactly one of `prompt` or `messages`", "prompt")
    if body.messages is not None:
        text = gen.render_chat(body.messages, engine.tokenizer, body.add_generation_prompt,
                               template_kwargs=body.chat_template_kwargs, continue_final=body.continue_final_message)
        ids = gen.chat_prompt(text, engine.tokenizer)
    else:
        add_special = True if body.add_special_tokens is None else body.add_special_tokens
        ids = engine.tokenizer.encode(body.prompt, add_special_tokens=add_special)
    return {"count": len(ids), "max_model_len": engine.info.max_model_len, "tokens": ids}


@router.post("/detokenize", responses=answers(DetokenizeResponse, TOKENIZER_ERRORS))
async def detokenize(body: DetokenizeRequest, request: Request) -> Any:
    _, engine = _engine_for(request, body.model)
    bad = [t for t in body.tokens if not 0 <= t < engine.info.vocab_size]
    if bad:
        raise InvalidRequestError(f"token ids outside the vocabulary: {bad[:5]}", "tokens")
    return JSONResponse({"prompt": engine.tokenizer.decode(body.tokens, skip_special_tokens=False)})

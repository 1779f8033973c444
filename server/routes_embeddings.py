"""POST /v1/embeddings (OpenAI shape, plus a `truncate` extension)."""
from __future__ import annotations

import base64
import time
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from engine.errors import InvalidRequestError
from server import generation as gen
from server.openapi import ENGINE_ERRORS, answers
from server.schemas import EmbeddingRequest, EmbeddingResponse
from server.state import get_state, new_request_id

router = APIRouter()


def payload_class() -> type:
    """The engine's EmbeddingRequest, imported when first needed (its module loads torch models)."""
    try:
        from engine.embedding_engine import EmbeddingRequest as Payload
    except ImportError:
        from engine.request import EmbeddingRequest as Payload  # type: ignore[attr-defined,no-redef]
    return Payload


def prompt_text(engine: Any, prompt_name: str | None) -> str:
    """The text a named sentence-transformers prompt puts before each input ("" for none)."""
    if prompt_name is None:
        return ""
    prompts: dict[str, str] = getattr(engine, "prompts", {})
    if prompt_name not in prompts:
        known = ", ".join(repr(p) for p in prompts) or "none"
        raise InvalidRequestError(f"prompt_name {prompt_name!r} is not one of the model's prompts ({known})",
                                  "prompt_name")
    return prompts[prompt_name]


def embedding_inputs(raw: str | list, tokenizer: Any, vocab_size: int, max_inputs: int,
                     prompt: str = "") -> list[list[int]]:
    """Empty lists and strings never get here: the request schema refuses them. `prompt` goes before
    each text, as sentence-transformers puts it."""
    if isinstance(raw, str):
        items: list = [raw]
    elif isinstance(raw[0], int):
        items = [raw]
    else:
        items = list(raw)
    if len(items) > max_inputs:
        raise InvalidRequestError(f"at most {max_inputs} inputs per request, got {len(items)}", "input")
    if prompt and not isinstance(items[0], str):
        raise InvalidRequestError("prompt_name applies to text inputs, not token ids", "prompt_name")
    out = []
    for item in items:
        ids = tokenizer.encode(prompt + item) if isinstance(item, str) else list(item)
        gen.check_token_ids(ids, vocab_size, "input")
        out.append(ids)
    return out


def _encode(vector: Any, fmt: str) -> list[float] | str:
    arr = np.asarray(vector.tolist() if hasattr(vector, "tolist") else vector, dtype="<f4")
    if fmt == "base64":  # OpenAI's format: little-endian float32 bytes, base64
        return base64.b64encode(arr.tobytes()).decode("ascii")
    return arr.astype(float).tolist()


@router.post("/v1/embeddings", responses=answers(EmbeddingResponse, ENGINE_ERRORS))
async def embeddings(body: EmbeddingRequest, request: Request) -> Any:
    state = get_state(request)
    start = time.monotonic()
    name, engine = state.resolve(body.model, "embed")
    inputs = embedding_inputs(body.input, engine.tokenizer, engine.info.vocab_size, state.settings.max_embedding_inputs)
    payload = payload_class()(inputs=inputs, truncate=body.truncate, dimensions=body.dimensions)
    request_id = new_request_id("embd")
    out = await gen.cancel_on_disconnect(request, state.async_engine.run(name, request_id, payload))
    data = [{"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
            for i, v in enumerate(out.embeddings)]
    state.metrics.embedding_request_latency.labels(name).observe(time.monotonic() - start)
    tokens = int(out.num_prompt_tokens)
    return JSONResponse({"object": "list", "data": data, "model": name,
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

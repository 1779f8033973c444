"""text-generation-inference's routes: POST /generate, /generate_stream and / (TGI's route for a
client given only the server's URL, as `InferenceClient("http://host:port")` is; server/routes_compat.py
shares it with TEI's embeddings), and GET /info.

TGI serves one model; here `model` (an extension) picks one, and without it the first generation
model answers. Errors come in TGI's body, `{"error": message, "error_type": "validation" | "overloaded" |
"generation"}` (with 422 for a refused request and 429 for a full queue, as TGI answers; a stream's
failure is such an event), so TGI's clients raise their typed errors; TGI's streams end without `[DONE]`.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from engine.errors import ModelNotFoundError, QueueFullError
from engine.outputs import RequestOutput
from engine.request import GenerationRequest
from engine.sampling_params import MAX_N
from server import generation as gen
from server import sse, tgi
from server.openapi import TGI_ERRORS, answers
from server.schemas_tgi import (
    MAX_STOP_SEQUENCES, ServerInfo, TgiCompatRequest, TgiErrorResponse, TgiGenerateRequest, TgiGenerateResponse,
    TgiStreamResponse,
)
from server.state import ServerState, get_state, lora_name, new_request_id, task_of

router = APIRouter()


def _start(body: TgiGenerateRequest, request: Request,
           stream: bool) -> tuple[ServerState, str, Any, tgi.TgiPlan, GenerationRequest]:
    state = get_state(request)
    name, engine = state.resolve(body.model, "generate")
    plan = tgi.plan(body.parameters, stream)
    ids = tgi.truncated(engine.tokenizer.encode(body.inputs), plan.truncate)
    adapter = body.parameters.adapter_id if body.parameters is not None else None
    if adapter is not None and adapter not in getattr(engine, "lora_names", ()):
        raise ModelNotFoundError(f"adapter_id {adapter!r} is not loaded; loaded: {getattr(engine, 'lora_names', [])}",
                                 "parameters.adapter_id")
    return state, name, engine, plan, GenerationRequest(ids, plan.params, adapter or lora_name(engine, name))


def _not_aborted(out: RequestOutput) -> None:
    if any(c.finish_reason == "abort" for c in out.outputs):  # TGI has no finish reason for it
        raise QueueFullError("the server is shutting down; the request was aborted")


async def _generate(body: TgiGenerateRequest, request: Request) -> JSONResponse:
    state, name, engine, plan, payload = _start(body, request, stream=False)
    request_id = new_request_id("tgi")
    try:
        out = (await gen.cancel_on_disconnect(request, gen.run_all(state.async_engine, name, request_id, [payload])))[0]
    finally:
        state.metrics.forget(request_id)
    _not_aborted(out)
    best = tgi.best_index(out)
    c = out.outputs[best]
    answer: dict[str, Any] = {"generated_text": tgi.generated_text(body.inputs, c, plan)}
    if plan.details:
        text_of = gen.TokenText(engine.tokenizer)
        details = tgi.sequence(out, c, plan, engine.tokenizer, text_of)
        if len(out.outputs) > 1:  # the other samples, as TGI lists them
            details["best_of_sequences"] = [
                {"generated_text": tgi.generated_text(body.inputs, o, plan),
                 **tgi.sequence(out, o, plan, engine.tokenizer, text_of)}
                for o in out.outputs if o.index != best
            ]
        answer["details"] = details
    headers = {"x-prompt-tokens": str(len(out.prompt_token_ids)), "x-generated-tokens": str(len(c.token_ids))}
    return JSONResponse(answer, headers=headers)


async def _stream(body: TgiGenerateRequest, request: Request) -> StreamingResponse:
    state, name, engine, plan, payload = _start(body, request, stream=True)
    request_id = new_request_id("tgi")
    merged = await gen.open_streams(state.async_engine, name, request_id, [payload])
    return sse.response(_events(merged, body.inputs, plan, engine.tokenizer), state, request_id, done=False,
                        error=sse.tgi_error)


async def _events(merged: AsyncIterator[tuple[int, RequestOutput]], inputs: str, plan: tgi.TgiPlan,
                  tokenizer: Any) -> AsyncIterator[str]:
    """One event per token (several when a step brings several); the last carries the text and details."""
    texts, text_of = tgi.TokenTexts(tokenizer), gen.TokenText(tokenizer)
    sent = 0
    async for _, out in merged:
        _not_aborted(out)
        c = out.outputs[0]
        for k in range(sent, len(c.token_ids)):
            lp = c.logprobs[k] if c.logprobs is not None else None
            event: dict[str, Any] = {"index": k + 1, "token": texts.token(c.token_ids[k], lp),
                                     "generated_text": None, "details": None}
            if plan.top_n:
                event["top_tokens"] = tgi.top_tokens(lp, text_of, texts.special, plan.top_n)
            if c.finish_reason is not None and k == len(c.token_ids) - 1:
                event["generated_text"] = tgi.generated_text(inputs, c, plan)
                event["details"] = {"finish_reason": tgi.finish_reason(c), "generated_tokens": len(c.token_ids),
                                    "seed": plan.seed, "input_length": len(out.prompt_token_ids)}
            yield sse.event(event)
        sent = len(c.token_ids)


@router.post("/generate", responses=answers(TgiGenerateResponse, TGI_ERRORS, error=TgiErrorResponse))
async def generate(body: TgiGenerateRequest, request: Request) -> Any:
    """TGI's generation: greedy unless asked to sample; `details` adds the tokens and their logprobs."""
    return await _generate(body, request)


@router.post("/generate_stream", responses=answers(None, TGI_ERRORS, stream=TgiStreamResponse, done=False,
                                                   error=TgiErrorResponse))
async def generate_stream(body: TgiGenerateRequest, request: Request) -> Any:
    """One server-sent event per generated token; the last also has `generated_text` and `details`."""
    return await _stream(body, request)


async def answer(body: TgiCompatRequest, request: Request) -> Any:
    """TGI's answer at POST / (server/routes_compat.py): /generate, or /generate_stream with `stream`."""
    return await (_stream(body, request) if body.stream else _generate(body, request))


_PIPELINE = {"generate": "text-generation", "embed": "feature-extraction", "classify": "text-classification",
             "translate": "translation"}


@router.get("/info", responses=answers(ServerInfo, (401, 404)))
async def info(request: Request) -> Any:
    """TGI's and TEI's `/info`, for the model that requests without `model` reach (a generation model
    first); `models` lists every one."""
    state = get_state(request)
    name, engine = state.resolve(None, ("generate", "embed", "classify", "translate"))
    task, config = task_of(engine), engine.config
    max_len = engine.info.max_model_len
    body: dict[str, Any] = {
        "model_id": name, "model_sha": None, "model_dtype": f"torch.{config.dtype}",
        "model_device_type": config.device.split(":")[0], "model_pipeline_tag": _PIPELINE[task],
        "max_concurrent_requests": config.scheduler.max_num_seqs + state.settings.max_waiting,
        "max_best_of": MAX_N, "max_stop_sequences": MAX_STOP_SEQUENCES,
        "max_input_tokens": max_len - 1 if task == "generate" else max_len, "max_total_tokens": max_len,
        "max_client_batch_size": (state.settings.max_prompts_per_request if task == "generate"
                                  else state.settings.max_embedding_inputs),
        "router": "kvserve", "version": request.app.version, "sha": None, "docker_label": None,
        "models": list(state.served),
    }
    if task == "embed":
        body["model_type"] = {"embedding": {"pooling": engine.info.pooling}}
    elif task == "classify":
        body["model_type"] = {"classifier": {"id2label": dict(enumerate(engine.info.labels))}}
    return body

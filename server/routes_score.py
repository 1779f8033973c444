"""Scoring routes: /v1/score (vLLM), /v1/rerank and /v2/rerank (vLLM's Jina/Cohere shape) and /classify
(vLLM); TEI's /rerank is in routes_tei.py, on the same helpers.

Score and rerank take a cross-encoder (a classifier with one label: each pair is one input) or an
embedding model (cosine similarity of the two embeddings); engine/scoring.py does both. With no
`model`, the first cross-encoder served answers, else the first embedding model.
"""
from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from engine.errors import InvalidRequestError
from server import generation as gen
from server.openapi import ENGINE_ERRORS, answers
from server.schemas import (
    ClassifyRequest, ClassifyResponse, RerankRequest, RerankResponse, ScoreRequest, ScoreResponse,
)
from server.state import ServerState, get_state, new_request_id, task_of

router = APIRouter()

SCORE_TASKS = ("embed", "classify")  # with no model named: after the cross-encoders, an embedding model


def _texts(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _scorer(state: ServerState, model: str | None) -> tuple[str, Any]:
    """The named model, or the first cross-encoder (a one-label classifier), or the first embedding model."""
    if model is None:
        for name, engine in state.served.items():
            if task_of(engine) == "classify" and len(engine.info.labels) == 1:
                return name, engine
    return state.resolve(model, SCORE_TASKS)


async def run_score(request: Request, state: ServerState, model: str | None, first: list[str], second: list[str],
                    truncate: bool, param: str, direction: str = "right", activation: str | None = None,
                    raw: bool = False) -> tuple[str, Any, list[float]]:
    """Run one score job: (served name, job, one score per pair). A cross-encoder's logits go through
    `activation`, or the model's own when None (`raw`: none); an embedding model's scores are cosines."""
    from engine.scoring import read_scores, score_job  # loads torch models' modules, as the embeddings route does

    name, engine = _scorer(state, model)
    limit = state.settings.max_embedding_inputs
    if max(len(first), len(second)) > limit:
        raise InvalidRequestError(f"at most {limit} texts to score per request, got {max(len(first), len(second))}",
                                  param)
    job = score_job(engine, first, second, truncate, param, direction)
    out = await gen.cancel_on_disconnect(request, state.async_engine.run(name, new_request_id("score"), job.payload))
    return name, job, read_scores(job, out.embeddings, activation or engine.info.activation, raw)


def ranked(scores: list[float], top_n: int | None) -> list[int]:
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # stable: ties keep input order
    return order[:top_n] if top_n is not None else order


@router.post("/v1/score", responses=answers(ScoreResponse, ENGINE_ERRORS))
@router.post("/score", responses=answers(ScoreResponse, ENGINE_ERRORS))
async def score(body: ScoreRequest, request: Request) -> Any:
    state, start = get_state(request), time.monotonic()
    name, job, scores = await run_score(request, state, body.model, _texts(body.text_1), _texts(body.text_2),
                                        body.truncate, "text_2")
    state.metrics.embedding_request_latency.labels(name).observe(time.monotonic() - start)
    return JSONResponse({
        "id": new_request_id("score"), "object": "list", "created": int(time.time()), "model": name,
        "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)],
        "usage": {"prompt_tokens": job.num_tokens, "total_tokens": job.num_tokens},
    })


@router.post("/v1/rerank", responses=answers(RerankResponse, ENGINE_ERRORS))
@router.post("/v2/rerank", responses=answers(RerankResponse, ENGINE_ERRORS))
async def rerank(body: RerankRequest, request: Request) -> Any:
    state, start = get_state(request), time.monotonic()
    docs = [d if isinstance(d, str) else d.text for d in body.documents]
    name, job, scores = await run_score(request, state, body.model, [body.query], docs, body.truncate, "documents")
    results = []
    for i in ranked(scores, body.top_n):
        result: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
        if body.return_documents:
            result["document"] = {"text": docs[i]}
        results.append(result)
    state.metrics.embedding_request_latency.labels(name).observe(time.monotonic() - start)
    return JSONResponse({"id": new_request_id("rerank"), "model": name,
                         "usage": {"total_tokens": job.num_tokens}, "results": results})


@router.post("/classify", responses=answers(ClassifyResponse, ENGINE_ERRORS))
async def classify(body: ClassifyRequest, request: Request) -> Any:
    from engine.scoring import class_probabilities, classify_request

    state, start = get_state(request), time.monotonic()
    name, engine = state.resolve(body.model, "classify")
    texts = _texts(body.input)
    limit = state.settings.max_embedding_inputs
    if len(texts) > limit:
        raise InvalidRequestError(f"at most {limit} inputs per request, got {len(texts)}", "input")
    payload = classify_request(engine, list(texts), body.truncate)
    out = await gen.cancel_on_disconnect(request, state.async_engine.run(name, new_request_id("cls"), payload))
    probs = class_probabilities(out.embeddings, engine.info.activation)
    labels = engine.info.labels
    data = [{"index": i, "label": labels[max(range(len(p)), key=p.__getitem__)], "probs": p,
             "num_classes": len(labels)} for i, p in enumerate(probs)]
    state.metrics.embedding_request_latency.labels(name).observe(time.monotonic() - start)
    tokens = int(out.num_prompt_tokens)
    return JSONResponse({"id": new_request_id("classify"), "object": "list", "created": int(time.time()),
                         "model": name, "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

"""text-embeddings-inference's routes and shapes: POST /embed, /embed_all, /embed_sparse, /similarity, /rerank
and /predict.

TEI serves one model and answers bare JSON arrays; here `model` (an extension) picks one, and without
it the first model of the route's kind answers. Errors keep kvserve's OpenAI-style body (at POST /, which
server/routes_compat.py shares with TGI, they come in TGI's, the shape TEI's are).
"""
from __future__ import annotations

import time
from typing import Any

import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from engine.errors import InvalidRequestError
from server import generation as gen
from server.openapi import ENGINE_ERRORS, answers
from server.routes_embeddings import embedding_inputs, payload_class, prompt_text
from server.routes_score import ranked, run_score
from server.schemas import (
    TeiEmbedAllRequest, TeiEmbedAllResponse, TeiEmbedRequest, TeiEmbedResponse, TeiEmbedSparseRequest,
    TeiEmbedSparseResponse, TeiPredictRequest, TeiPredictResponse, TeiRerankRequest, TeiRerankResponse,
    TeiSimilarityParameters, TeiSimilarityRequest, TeiSimilarityResponse,
)
from server.state import get_state, new_request_id

router = APIRouter()
MAX_EMBED_ALL_INPUTS = 32  # TEI's --max-client-batch-size default


async def _vectors(request: Request, model: str | None, raw_inputs: Any, limit: int, prompt_name: str | None,
                   sparse: bool = False, **fields: Any) -> list[torch.Tensor]:
    """One request to the embedding model (`sparse`: one that is SPLADE), texts behind the named
    prompt; each input's rows."""
    state, start = get_state(request), time.monotonic()
    name, engine = state.resolve(model, "embed")
    if sparse and getattr(engine, "sparse", None) is None:
        raise InvalidRequestError(f"model {name!r} is not a SPLADE model: /embed_sparse needs a sentence-transformers "
                                  "SparseEncoder folder (SpladePooling)", param="model")
    inputs = embedding_inputs(raw_inputs, engine.tokenizer, engine.info.vocab_size, limit,
                              prompt_text(engine, prompt_name))
    payload = payload_class()(inputs=inputs, **fields)
    out = await gen.cancel_on_disconnect(request, state.async_engine.run(name, new_request_id("embd"), payload))
    state.metrics.embedding_request_latency.labels(name).observe(time.monotonic() - start)
    return out.embeddings


async def _embed(request: Request, model: str | None, raw_inputs: Any, limit: int, prompt_name: str | None,
                 **fields: Any) -> JSONResponse:
    """/embed and /embed_all: each input's rows as nested lists."""
    return JSONResponse([v.tolist() for v in await _vectors(request, model, raw_inputs, limit, prompt_name, **fields)])


@router.post("/embed", responses=answers(TeiEmbedResponse, ENGINE_ERRORS))
async def embed(body: TeiEmbedRequest, request: Request) -> Any:
    """Vectors L2-normalised unless `normalize: false` (then as pooled, whatever the folder says)."""
    return await _embed(request, body.model, body.inputs, get_state(request).settings.max_embedding_inputs,
                        body.prompt_name, truncate=body.truncate, dimensions=body.dimensions, normalize=body.normalize)


@router.post("/similarity", responses=answers(TeiSimilarityResponse, ENGINE_ERRORS))
async def similarity(body: TeiSimilarityRequest, request: Request) -> Any:
    """The cosine similarity of the source sentence with each sentence (one batch of normalised vectors)."""
    p = body.parameters or TeiSimilarityParameters()
    texts = [body.inputs.source_sentence, *body.inputs.sentences]
    vectors = await _vectors(request, body.model, texts, get_state(request).settings.max_embedding_inputs,
                             p.prompt_name, truncate=p.truncate, normalize=True)
    source, others = vectors[0].float(), torch.stack([v.float() for v in vectors[1:]])
    return JSONResponse((others @ source).tolist())


@router.post("/embed_all", responses=answers(TeiEmbedAllResponse, ENGINE_ERRORS))
async def embed_all(body: TeiEmbedAllRequest, request: Request) -> Any:
    """Every token's last hidden state, unpooled and unnormalised (for late interaction, e.g. ColBERT-style)."""
    # a row per token makes answers length x hidden size per input: TEI's default batch limit keeps them bounded
    limit = min(MAX_EMBED_ALL_INPUTS, get_state(request).settings.max_embedding_inputs)
    return await _embed(request, body.model, body.inputs, limit, body.prompt_name, truncate=body.truncate,
                        per_token=True)


@router.post("/embed_sparse", responses=answers(TeiEmbedSparseResponse, ENGINE_ERRORS))
async def embed_sparse(body: TeiEmbedSparseRequest, request: Request) -> Any:
    """A SPLADE model's vocabulary weights, the non-zero ones as {index, value} in index order."""
    vectors = await _vectors(request, body.model, body.inputs, get_state(request).settings.max_embedding_inputs,
                             body.prompt_name, sparse=True, truncate=body.truncate, normalize=False)
    rows = []
    for vec in vectors:
        index = vec.nonzero().flatten()
        rows.append([{"index": i, "value": v} for i, v in zip(index.tolist(), vec[index].tolist())])
    return JSONResponse(rows)


@router.post("/rerank", responses=answers(TeiRerankResponse, ENGINE_ERRORS))
async def rerank(body: TeiRerankRequest, request: Request) -> Any:
    """Scores through a sigmoid unless `raw_scores` (an embedding model's are cosines), most relevant first."""
    state, start = get_state(request), time.monotonic()
    name, _, scores = await run_score(request, state, body.model, [body.query], body.texts, body.truncate, "texts",
                                      body.truncation_direction.lower(), activation="sigmoid", raw=body.raw_scores)
    ranks = []
    for i in ranked(scores, None):
        rank: dict[str, Any] = {"index": i, "score": scores[i]}
        if body.return_text:
            rank["text"] = body.texts[i]
        ranks.append(rank)
    state.metrics.embedding_request_latency.labels(name).observe(time.monotonic() - start)
    return JSONResponse(ranks)


def _is_pair(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)


@router.post("/predict", responses=answers(TeiPredictResponse, ENGINE_ERRORS))
async def predict(body: TeiPredictRequest, request: Request) -> Any:
    """Each input's labels by score, highest first: softmax over several labels, a sigmoid for one,
    logits with `raw_scores`. As in TEI, a list of exactly two strings is one pair, not two texts."""
    from engine.scoring import class_probabilities, classify_request

    state, start = get_state(request), time.monotonic()
    name, engine = state.resolve(body.model, "classify")
    single = isinstance(body.inputs, str) or _is_pair(body.inputs)
    items = [body.inputs] if single else list(body.inputs)
    limit = state.settings.max_embedding_inputs
    if len(items) > limit:
        raise InvalidRequestError(f"at most {limit} inputs per request, got {len(items)}", "inputs")
    payload = classify_request(engine, items, body.truncate, "inputs")
    out = await gen.cancel_on_disconnect(request, state.async_engine.run(name, new_request_id("pred"), payload))
    rows = [r.tolist() for r in out.embeddings] if body.raw_scores else class_probabilities(out.embeddings, "sigmoid")
    labels = engine.info.labels
    by_input = [sorted(({"label": labels[j], "score": s} for j, s in enumerate(row)), key=lambda p: -p["score"])
                for row in rows]
    state.metrics.embedding_request_latency.labels(name).observe(time.monotonic() - start)
    return JSONResponse(by_input[0] if single else by_input)

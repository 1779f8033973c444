"""POST /: the route of a client given only the server's URL, as `huggingface_hub.InferenceClient(url)` is.

TGI answers generation there and TEI embeddings; kvserve serves both, so the body and the served
models decide:
- `inputs` as `{source_sentence, sentences}`: TEI's sentence similarity (`sentence_similarity`);
- a body with TEI's embedding fields (`normalize`, `truncate`, `prompt_name`, ...; `feature_extraction`
  sends them) or inputs only TEI takes (a list): TEI's /embed;
- TGI's body: /generate, or /generate_stream with `stream`, where it names a generation model or sets
  TGI's `parameters` or `stream` (`text_generation` always sends `parameters`);
- a bare `{"inputs": text}` (`feature_extraction` with no options): the embedding model where one is
  served, else generation.
Errors come in TGI's body, which is TEI's shape too.
"""
from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Request
from pydantic import Discriminator, RootModel, Tag

from server import routes_tei, routes_tgi
from server.openapi import TGI_ERRORS, answers
from server.schemas import TeiEmbedRequest, TeiSimilarityRequest
from server.schemas_tgi import TgiCompatRequest, TgiErrorResponse, TgiGenerateResponse, TgiStreamResponse
from server.state import get_state, task_of

router = APIRouter()


class CompatResponse(RootModel[TgiGenerateResponse | list[list[float]] | list[float]]):
    """TGI's generation, TEI's vectors (one per input) or TEI's similarities, by what was asked."""


_EMBED_FIELDS = ("normalize", "truncate", "truncation_direction", "dimensions", "prompt_name")
# the union's tags; a validation error's location carries one, which server.errors leaves out (it has a space)
TGI, EMBED, SIMILARITY = "TGI request", "TEI embedding request", "TEI similarity request"


def _shape(body: Any) -> str:
    """Which API's body this is, read off its fields before validation, so a bad TGI body is refused
    as TGI's rather than read as another (the schemas ignore unknown fields)."""
    if not isinstance(body, dict):
        return TGI
    if isinstance(body.get("inputs"), dict):
        return SIMILARITY
    if "parameters" in body or "stream" in body:
        return TGI
    if any(k in body for k in _EMBED_FIELDS) or isinstance(body.get("inputs"), list):
        return EMBED
    return TGI  # a bare {"inputs": text}: `compat` picks the model


CompatRequest = Annotated[
    Annotated[TgiCompatRequest, Tag(TGI)] | Annotated[TeiEmbedRequest, Tag(EMBED)]
    | Annotated[TeiSimilarityRequest, Tag(SIMILARITY)],
    Discriminator(_shape),
]


def _generates(request: Request, body: TgiCompatRequest) -> bool:
    """Whether a TGI-shaped body is generation: it names a generation model or sets TGI's `parameters`
    or `stream`, or it is bare and no embedding model is served."""
    state = get_state(request)
    if body.model is not None:
        return task_of(state.engine(body.model)) == "generate"
    if body.parameters is not None or body.stream:
        return True  # TGI's own fields: answered by /generate, a 404 where nothing generates
    return not any(task_of(e) == "embed" for e in state.served.values())


@router.post("/", responses=answers(CompatResponse, TGI_ERRORS, stream=TgiStreamResponse, done=False,
                                    error=TgiErrorResponse))
async def compat(body: CompatRequest, request: Request) -> Any:
    """TGI's generation, TEI's embeddings or TEI's sentence similarity, by the body and the served models."""
    if isinstance(body, TeiSimilarityRequest):
        return await routes_tei.similarity(body, request)
    if isinstance(body, TgiCompatRequest):
        if _generates(request, body):
            return await routes_tgi.answer(body, request)
        body = TeiEmbedRequest(model=body.model, inputs=body.inputs)
    return await routes_tei.embed(body, request)

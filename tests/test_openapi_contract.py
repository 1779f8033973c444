"""The published OpenAPI document is the contract: schemathesis generates requests from it (valid and
invalid ones) against a server with one model of each family (and a reranker), and every answer must be documented:
no 5xx, a declared status and content type, a body that fits the declared schema, a 4xx for bad
data, a 405 with `Allow` for undeclared methods. Afterwards every KV block is free again.

Check left out: "schema-valid data is accepted". Some valid-looking requests are refused for reasons
a static schema cannot state (a prompt over the model's context, token ids over its vocabulary,
`top_logprobs` without `logprobs`), and those are 400s by design.
"""
from __future__ import annotations

import json
import os
import time

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import positive_data_acceptance

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from engine.config import CacheConfig, EngineConfig  # noqa: E402
from engine.embedding_engine import EmbeddingEngine  # noqa: E402
from engine.engine import LLMEngine  # noqa: E402
from engine.translation_engine import TranslationEngine  # noqa: E402
from server.openapi import stream_chunk_models  # noqa: E402
from tests.encdec_fixtures import make_marian_folder  # noqa: E402
from tests.server_helpers import serve  # noqa: E402
from tests.tiny_models import make_classifier, save_tiny  # noqa: E402

CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("contract")
    llama = save_tiny("llama", root / "tiny-llama")
    (llama / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    marian = make_marian_folder(root / "tiny-marian")
    make_classifier("bert", root / "tiny-reranker")
    cache = CacheConfig(block_size=4, num_blocks=128)
    return {
        # a short context keeps the longest generated answers (max_tokens up to it, n up to 16) quick
        "tiny-llama": LLMEngine.from_config(EngineConfig(model=str(llama), cache=cache, max_model_len=256)),
        "tiny-marian": TranslationEngine.from_config(EngineConfig(model=str(marian), cache=cache)),
        # an embedding model: MiniLM's shape is small enough, and it is what the server ships
        "minilm": EmbeddingEngine.from_config(EngineConfig(model="minilm")),
        # a cross-encoder (one-label classifier): /v1/score, /v1/rerank, /rerank and /classify
        "tiny-reranker": EmbeddingEngine.from_config(EngineConfig(model=str(root / "tiny-reranker"))),
    }


@pytest.fixture(scope="module")
def api_schema(engines):
    with serve(engines, max_waiting=256) as url:
        yield schemathesis.openapi.from_url(f"{url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture(scope="module")
def chunk_models(api_schema) -> dict:
    """Path -> the chunk model its documented event stream names, and whether `[DONE]` ends it."""
    return stream_chunk_models(api_schema.raw_schema)


@schema.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_every_answer_is_documented(case, chunk_models):
    response = case.call_and_validate(excluded_checks=[positive_data_acceptance], timeout=60)
    content_type = {k.lower(): v for k, v in response.headers.items()}.get("content-type", [""])
    if case.path in chunk_models and "text/event-stream" in str(content_type):
        model, done = chunk_models[case.path]
        _assert_stream_fits(response.text, model, done, whole=not response.stream_cut_short)


def _assert_stream_fits(text: str, chunk_model, done: bool, whole: bool) -> None:
    """schemathesis checks each event has a string `data`; this checks what the string holds: one
    documented chunk per event, never an error (a failure mid-stream is a bug, like a 5xx), and
    `[DONE]` last and only last where the API has it (`done`; TGI's streams have none). schemathesis stops reading a long stream after a number of events
    (`whole` is then False, and the server sees a client that left); the events up to there count."""
    events = [e for e in text.split("\n\n") if e.strip()]
    if not whole:
        events = events[:-1]  # the last may be cut mid-event
    data = []
    for e in events:  # `data: ...`, after `event: <its type>` where the API names events (Responses)
        lines = e.split("\n")
        assert len(lines) in (1, 2) and lines[-1].startswith("data: "), text[:500]
        if len(lines) == 2:
            assert lines[0] == f"event: {json.loads(lines[1][len('data: '):])['type']}", e
        data.append(lines[-1][len("data: "):])
    if whole and done:
        assert data and data[-1] == "[DONE]", text[-500:]
        data = data[:-1]
    ids = set()
    for raw in data:
        assert raw != "[DONE]", text[-500:]
        chunk = json.loads(raw)
        assert "error" not in chunk, raw
        ids.add(getattr(chunk_model.model_validate(chunk), "id", None))  # one answer's chunks share an id
    assert len(ids) <= 1, ids


def test_kv_blocks_free_after_fuzzing(api_schema, engines):
    deadline = time.monotonic() + 10
    while any(e.has_unfinished_requests() for e in engines.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    for name, engine in engines.items():
        assert not engine.has_unfinished_requests(), name
        stats = engine.stats()
        assert stats.num_running == stats.num_waiting == 0, name
        assert stats.kv_cache_usage == 0.0, name


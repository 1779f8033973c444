"""SPLADE sparse embeddings against sentence-transformers' SparseEncoder on the same folder.

The folder is a tiny random BertForMaskedLM with MiniLM's real tokenizer (30,522 entries), wrapped
as SparseEncoder(MLMTransformer, SpladePooling) and saved by sentence-transformers, so both read the
same files. TEI's `/embed_sparse` answers the non-zero entries.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from engine.embedding_engine import EmbeddingEngine  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from models.loader import load_model  # noqa: E402
from server.settings import ServerSettings  # noqa: E402
from tests.server_helpers import serve  # noqa: E402
from tests.tiny_models import _spread, minilm_folder  # noqa: E402

TEXTS = ["The cat sat on the mat.", "Sparse retrieval with learned term weights", "a", "Paris is in France. " * 6]


def save_splade(folder: Path, pooling: str, activation: str, arch: str = "bert") -> Path:
    """arch: bert (naver/splade-*) or distilbert (opensearch's distilled sparse encoders)."""
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.modules import MLMTransformer, SpladePooling
    from transformers import BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM

    torch.manual_seed(0)
    mlm = folder.parent / f"{folder.name}-mlm"
    if arch == "bert":
        hf = BertForMaskedLM(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=64, max_position_embeddings=128)).eval()
    else:
        hf = DistilBertForMaskedLM(DistilBertConfig(vocab_size=30522, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                                    max_position_embeddings=128)).eval()
    _spread(hf)
    with torch.no_grad():  # most logits below zero, as a trained SPLADE's: the vectors come out sparse
        (hf.cls.predictions.bias if arch == "bert" else hf.vocab_projector.bias).sub_(1.5)
        if arch == "distilbert":  # spread as BERT's head LayerNorm is (_spread knows it by "LayerNorm")
            hf.vocab_layer_norm.weight.uniform_(0.5, 1.5)
    hf.save_pretrained(mlm)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (minilm_folder() / name).exists():
            shutil.copy(minilm_folder() / name, mlm / name)
    model = SparseEncoder(modules=[MLMTransformer(str(mlm)), SpladePooling(pooling, activation_function=activation)],
                          device="cpu")
    model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module", params=[("max", "relu", "bert"), ("sum", "log1p_relu", "bert"),
                                        ("max", "relu", "distilbert")],
                ids=["max-relu", "sum-log1p_relu", "distilbert"])
def splade(request, tmp_path_factory):
    from sentence_transformers import SparseEncoder

    folder = save_splade(tmp_path_factory.mktemp("splade") / "model", *request.param)
    return folder, SparseEncoder(str(folder), device="cpu")


def dense_row(entries: list[dict]) -> torch.Tensor:
    row = torch.zeros(30522)
    row[[e["index"] for e in entries]] = torch.tensor([e["value"] for e in entries])
    return row


@pytest.fixture(scope="module")
def engine(splade) -> EmbeddingEngine:
    folder, _ = splade
    return EmbeddingEngine(load_model(str(folder)), EngineConfig(model=str(folder)))


def test_vectors_equal_sentence_transformers(splade, engine):
    _, reference = splade
    assert engine.info.task == "embed" and engine.sparse is not None and engine.embedding_dim == 30522
    got = engine.embed(TEXTS)
    want = reference.encode(TEXTS, convert_to_tensor=True).to_dense()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    nonzero = (got > 0).sum(-1)
    assert (nonzero > 0).all() and (nonzero < 30522 // 2).all()  # sparse, and not empty


def test_embed_sparse_route(splade, engine):
    _, reference = splade
    minilm = EmbeddingEngine.from_config(EngineConfig(model="minilm"))
    with serve({"splade": engine, "minilm": minilm}, settings=ServerSettings(shutdown_timeout_s=2.0)) as url:
        r = httpx.post(f"{url}/embed_sparse", json={"inputs": TEXTS[:2]}, timeout=30)
        assert r.status_code == 200, r.text
        want = reference.encode(TEXTS[:2], convert_to_tensor=True).to_dense()
        for row, vec in zip(r.json(), want):
            assert [e["index"] for e in row] == sorted({e["index"] for e in row})  # index order, no repeats
            assert all(e["value"] > 0 for e in row) and len(row) < 30522 // 2
            torch.testing.assert_close(dense_row(row), vec, atol=1e-5, rtol=1e-5)
        one = httpx.post(f"{url}/embed_sparse", json={"inputs": TEXTS[0]}, timeout=30).json()
        assert len(one) == 1
        torch.testing.assert_close(dense_row(one[0]), want[0], atol=1e-5, rtol=1e-5)  # alone: other GEMM sums
        # the dense routes answer the same weights as one vector
        dense = httpx.post(f"{url}/v1/embeddings", json={"input": TEXTS[0], "model": "splade"}, timeout=30)
        assert dense.json()["data"][0]["embedding"] == pytest.approx(want[0].tolist(), abs=1e-5)
        # a dense model has no sparse vectors: named, and a 400
        bad = httpx.post(f"{url}/embed_sparse", json={"inputs": "x", "model": "minilm"}, timeout=30)
        assert bad.status_code == 400 and "SPLADE" in bad.json()["error"]["message"]
        for body in ({"inputs": []}, {"inputs": 3}, {}):
            assert httpx.post(f"{url}/embed_sparse", json=body, timeout=30).status_code in (400, 422)

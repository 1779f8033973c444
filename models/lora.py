"""PEFT LoRA adapters: read a folder, check it fits the base model, lay it out for the merged projections.

A PEFT folder holds `adapter_config.json` and `adapter_model.safetensors` with, per adapted
Linear, `lora_A` (r, in) and `lora_B` (out, r); PEFT adds `scaling * B @ A @ x` to the Linear's
output, scaling = lora_alpha / r (/ sqrt(r) with rsLoRA). The model runs q/k/v (and gate/up)
as one merged Linear, so an adapter's parts for one merged Linear are stacked once here:
A as the rows of every adapted part, B block-diagonal with the scaling folded in. The delta
is then two matmuls per merged Linear, whichever of its parts the adapter touches.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from engine.errors import InvalidRequestError

# PEFT's key for one matrix: base_model.model.<the module's name in the HF model>.lora_A.weight
_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight")


class LoRALoadError(InvalidRequestError):
    """An adapter folder that is missing, malformed, or does not fit the base model (HTTP 400)."""


@dataclass(frozen=True)
class LoRATarget:
    """Where an HF projection runs in the model: the merged Linear, its rows there, its input width."""

    merged: str  # the model's Linear: "qkv_proj", "o_proj", "gate_up_proj", "down_proj"
    merged_out: int  # that Linear's output width
    offset: int  # its first output row there
    out_features: int
    in_features: int


@dataclass
class LoRAAdapter:
    """One loaded adapter: per (layer, merged Linear) the stacked A (R, in) and scaled B (out, R)."""

    name: str
    lora_id: int
    path: str
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


def supports_lora(model: nn.Module) -> bool:
    return hasattr(model, "lora_targets")


def load_adapter(path: str | Path, name: str, lora_id: int, model: nn.Module, max_rank: int,
                 dtype: torch.dtype, device: str) -> LoRAAdapter:
    """Read a PEFT LoRA folder for `model` (one that `supports_lora`); every part it cannot serve
    exactly is refused by name."""
    folder = Path(path)
    config_path, weights_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    for needed in (config_path, weights_path):
        if not needed.is_file():
            raise LoRALoadError(f"LoRA adapter {name!r}: no {needed.name} in {folder}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise LoRALoadError(f"LoRA adapter {name!r}: adapter_config.json is not JSON: {err.msg}") from None
    _check_config(name, config)
    targets: dict[str, LoRATarget] = model.lora_targets()
    num_layers = model.config.num_hidden_layers
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(weights_path)).items():
        found = _KEY.fullmatch(key)
        if found is None or found[3] not in targets or int(found[1]) >= num_layers:
            raise LoRALoadError(f"LoRA adapter {name!r}: cannot serve weight {key!r}; adapters here may target "
                                f"{sorted(targets)} of layers 0..{num_layers - 1}")
        pairs.setdefault((int(found[1]), found[3]), {})[found[4]] = tensor
    if not pairs:
        raise LoRALoadError(f"LoRA adapter {name!r}: adapter_model.safetensors holds no LoRA weights")
    alpha = float(config.get("lora_alpha", 8))
    parts: dict[tuple[int, str], list[tuple[LoRATarget, torch.Tensor, torch.Tensor]]] = {}
    for (layer, proj), ab in sorted(pairs.items()):
        target = targets[proj]
        if set(ab) != {"A", "B"}:
            raise LoRALoadError(f"LoRA adapter {name!r}: layer {layer} {proj} has lora_{''.join(ab)} only")
        a, b = ab["A"], ab["B"]
        r = a.shape[0]  # per module: rank_pattern may give each its own
        if a.shape != (r, target.in_features) or b.shape != (target.out_features, r):
            raise LoRALoadError(
                f"LoRA adapter {name!r}: layer {layer} {proj} has A {tuple(a.shape)} and B {tuple(b.shape)}; the "
                f"base model needs ({r}, {target.in_features}) and ({target.out_features}, {r}): "
                "an adapter of another model?")
        if r > max_rank:
            raise LoRALoadError(f"LoRA adapter {name!r} has rank {r}, above max_lora_rank {max_rank}")
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        parts.setdefault((layer, target.merged), []).append((target, a.float(), b.float() * scaling))
    weights = {key: _stack(group, dtype, device) for key, group in parts.items()}
    return LoRAAdapter(name=name, lora_id=lora_id, path=str(folder), weights=weights)


def _check_config(name: str, config: dict) -> None:
    """Refuse PEFT options whose arithmetic the delta below does not do."""
    if config.get("peft_type", "LORA") != "LORA":
        raise LoRALoadError(f"adapter {name!r} is {config.get('peft_type')!r}, not a LoRA adapter")
    refused = {
        "use_dora": "DoRA (use_dora) adapters are not supported",
        "modules_to_save": "adapters that replace whole modules (modules_to_save) are not supported",
        "fan_in_fan_out": "fan_in_fan_out adapters (GPT-2's Conv1D) are not supported",
        "alpha_pattern": "per-module lora_alpha (alpha_pattern) is not supported",
        "lora_bias": "adapters with a bias on lora_B (lora_bias) are not supported",
        "layer_replication": "adapters that replicate layers (layer_replication) are not supported",
        "trainable_token_indices": "adapters that retrain token embeddings (trainable_token_indices) are not supported",
        "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    }
    for key, why in refused.items():
        if config.get(key):
            raise LoRALoadError(f"LoRA adapter {name!r}: {why}")
    if config.get("bias", "none") != "none":
        raise LoRALoadError(f"LoRA adapter {name!r}: trained biases (bias={config['bias']!r}) are not supported")


def _stack(group: list[tuple[LoRATarget, torch.Tensor, torch.Tensor]], dtype: torch.dtype,
           device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of one merged Linear: A's rows are each part's A; B puts each part's scaled B at
    that part's output rows and its own A rows, zero elsewhere (parts not adapted add nothing)."""
    ranks = [a.shape[0] for _, a, _ in group]
    a_all = torch.cat([a for _, a, _ in group])
    b_all = torch.zeros(group[0][0].merged_out, sum(ranks))
    col = 0
    for (target, _, b), r in zip(group, ranks):
        b_all[target.offset : target.offset + target.out_features, col : col + r] = b
        col += r
    return a_all.to(device, dtype), b_all.to(device, dtype)

"""LoRA adapters served beside their base model (vLLM's `--lora-modules`): which to load, how many a batch mixes.

A request names an adapter instead of the base model (OpenAI's `model`, TGI's `adapter_id`); its
sequences carry the adapter's int id. Every step runs base and adapter rows together: each
Linear adds its rows' low-rank deltas (engine/lora_batch.py). Two bookkeeping rules follow here:
- at most `max_loras` distinct adapters run at once, so a step's delta work stays bounded;
  a waiting request whose adapter would exceed it is skipped, not blocking the ones behind it;
- an adapter's K/V differ from the base model's for the same tokens, so the prefix cache keys
  a sequence's blocks by its adapter too (`prefix_root`).

No torch here: the weights are read by models/lora.py.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from engine.errors import InvalidRequestError


@dataclass(frozen=True)
class LoRAModule:
    """An adapter to serve: the name requests use for it, and its PEFT folder."""

    name: str
    path: str
    base_model_name: str | None = None  # the served model it adapts; None: the first generation model

    @classmethod
    def parse(cls, text: str) -> LoRAModule:
        """vLLM's two spellings: `name=path`, or JSON {"name": ..., "path": ..., "base_model_name": ...}."""
        text = text.strip()
        if text.startswith("{"):
            try:
                fields = json.loads(text)
            except json.JSONDecodeError as err:
                raise InvalidRequestError(f"LoRA module {text!r} is not valid JSON: {err.msg}") from None
            if not isinstance(fields, dict) or set(fields) - {"name", "path", "base_model_name"} \
                    or not {"name", "path"} <= set(fields):
                raise InvalidRequestError(f"LoRA module {text!r}: JSON needs \"name\" and \"path\", "
                                          "and may have \"base_model_name\"")
            return cls(str(fields["name"]), str(fields["path"]), fields.get("base_model_name"))
        name, sep, path = text.partition("=")
        if not sep:
            raise InvalidRequestError(f"LoRA module {text!r} must be name=path or a JSON object")
        return cls(name.strip(), path.strip())

    def __post_init__(self) -> None:
        if not self.name or not self.path:
            raise InvalidRequestError(f"a LoRA module needs a name and a path, got {self.name!r}={self.path!r}")


@dataclass(frozen=True)
class LoRARequest:
    """vLLM's offline handle on an adapter (`LLM.generate(..., lora_request=...)`): loaded from
    `lora_path` the first time its name is seen. `lora_int_id` is taken for vLLM's signature
    only: the engine numbers adapters itself, never reusing a number."""

    lora_name: str
    lora_int_id: int = 0
    lora_path: str = ""


@dataclass(frozen=True)
class LoRAConfig:
    """vLLM's LoRA flags: the adapters loaded at start, how many run at once, the largest rank."""

    modules: tuple[LoRAModule, ...] = ()
    # distinct adapters among running sequences; vLLM defaults to 1, which serialises requests for
    # different adapters: a few cost only one extra pair of small matmuls each per Linear
    max_loras: int = 4
    max_lora_rank: int = 16  # vLLM's default; larger adapters are refused when loaded

    def __post_init__(self) -> None:
        if self.max_loras < 1:
            raise InvalidRequestError(f"max_loras must be at least 1, got {self.max_loras}")
        if self.max_lora_rank < 1:
            raise InvalidRequestError(f"max_lora_rank must be at least 1, got {self.max_lora_rank}")
        names = [m.name for m in self.modules]
        if len(set(names)) != len(names):
            raise InvalidRequestError(f"LoRA module names must be unique, got {names}")


def fits(lora_id: int, running: Iterable[int], max_loras: int) -> bool:
    """May a sequence of adapter `lora_id` (0: none) join sequences running with `running` ids?"""
    if not lora_id:
        return True
    active = {i for i in running if i}
    return lora_id in active or len(active) < max_loras


def prefix_root(lora_id: int) -> bytes:
    """What a sequence's first prefix-cache digest starts from: equal tokens under different
    adapters have different K/V, so they must never name the same block."""
    return b"" if not lora_id else b"lora:" + lora_id.to_bytes(8, "little")

"""The LoRA adapters one generation engine has loaded, by the name requests use and by int id."""
from __future__ import annotations

import itertools
from collections import OrderedDict

import torch
from torch import nn

from engine.errors import InvalidRequestError, ModelNotFoundError
from engine.lora import LoRAConfig
from engine.lora_batch import LoRAStack
from models.lora import LoRAAdapter, load_adapter

MAX_STACKS = 8  # adapter sets whose stacked weights are kept; each costs about its adapters' size


class LoRAAdapters:
    """Loads and unloads adapters for one model. Ids are never reused: an adapter loaded again
    under an old name gets a new id, so the prefix cache cannot hand it the old one's K/V."""

    def __init__(self, config: LoRAConfig, model: nn.Module, dtype: torch.dtype, device: str) -> None:
        self.config = config
        self._model = model
        self._dtype = dtype
        self._device = device
        self.by_id: dict[int, LoRAAdapter] = {}
        self._by_name: dict[str, LoRAAdapter] = {}
        self._ids = itertools.count(1)
        # stacked weights per set of adapter ids a step mixes (engine/lora_batch.py), most recent last
        self._stacks: OrderedDict[tuple[int, ...], LoRAStack] = OrderedDict()

    @property
    def names(self) -> list[str]:
        return list(self._by_name)

    def get(self, name: str) -> LoRAAdapter | None:
        return self._by_name.get(name)

    def id_of(self, name: str) -> int:
        adapter = self._by_name.get(name)
        if adapter is None:
            raise ModelNotFoundError(f"The model `{name}` does not exist: no LoRA adapter of that name is loaded",
                                     "model")
        return adapter.lora_id

    def stack(self, ids: tuple[int, ...]) -> LoRAStack:
        """The adapters `ids` (sorted) stacked for one step; kept for the next steps that mix the same ones."""
        found = self._stacks.get(ids)
        if found is None:
            found = self._stacks[ids] = LoRAStack.build([self.by_id[i] for i in ids])
            while len(self._stacks) > MAX_STACKS:
                self._stacks.popitem(last=False)
        self._stacks.move_to_end(ids)
        return found

    def add(self, name: str, path: str) -> LoRAAdapter:
        if name in self._by_name:
            raise InvalidRequestError(f"a LoRA adapter named {name!r} is already loaded", "lora_name")
        adapter = load_adapter(path, name, next(self._ids), self._model, self.config.max_lora_rank,
                               self._dtype, self._device)
        self._by_name[name] = adapter
        self.by_id[adapter.lora_id] = adapter
        return adapter

    def remove(self, name: str) -> LoRAAdapter:
        adapter = self._by_name.pop(name, None)
        if adapter is None:
            raise ModelNotFoundError(f"no LoRA adapter named {name!r} is loaded", "lora_name")
        del self.by_id[adapter.lora_id]
        for ids in [ids for ids in self._stacks if adapter.lora_id in ids]:
            del self._stacks[ids]
        return adapter

"""One step's LoRA deltas: which flat rows run which adapter, and what each adapted Linear adds to them.

The step's adapters are stacked per Linear (`LoRAStack`): A as the rows of every adapter's A, B as
the columns of every adapter's B. A Linear's delta is then one x @ A^T over all rows, a 0/1 mask
that keeps each row's own adapter's columns (a base row keeps none), and one product with B^T:
three launches per Linear however many adapters the step mixes, where a loop over adapters
would gather and scatter each one's rows. The wasted products are rank-wide, a few percent of
the Linear itself; `max_loras` bounds them.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.host_copy import to_device
from models.lora import LoRAAdapter


@dataclass(frozen=True)
class LoRAStack:
    """Adapters stacked per (layer, Linear): (A^T (in, R), B^T (R, out), owner (R,): the position
    among the stacked adapters of the one each rank column belongs to). Keys no adapter adapts are absent."""

    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

    @classmethod
    def build(cls, adapters: list[LoRAAdapter]) -> LoRAStack:
        owners: dict[tuple[int, ...], torch.Tensor] = {}  # one tensor per column layout, so masks are shared
        weights = {}
        for key in {key for adapter in adapters for key in adapter.weights}:
            parts = [(i, adapter.weights[key]) for i, adapter in enumerate(adapters) if key in adapter.weights]
            layout = tuple(i for i, (a, _) in parts for _ in range(a.shape[0]))
            if layout not in owners:
                owners[layout] = torch.tensor(layout, dtype=torch.int64, device=parts[0][1][0].device)
            owner = owners[layout]
            # transposed once here, so each step's products read both row-major
            a_t = torch.cat([a for _, (a, _) in parts]).t().contiguous()
            b_t = torch.cat([b for _, (_, b) in parts], dim=1).t().contiguous()
            weights[key] = (a_t, b_t, owner)
        return cls(weights)


class LoRABatch:
    """The step's stacked adapters and each flat row's adapter; `apply` adds one Linear's deltas."""

    def __init__(self, stack: LoRAStack, row_owner: torch.Tensor | None) -> None:
        self.stack = stack
        self.row_owner = row_owner  # (T,) the row's adapter's position in the stack, -1 for base rows; None: all
        # rows run the one stacked adapter
        self._masks: dict[int, torch.Tensor] = {}  # id(owner) -> (T, R) 0/1 in the model dtype

    @classmethod
    def build(cls, stack_of: Callable[[tuple[int, ...]], LoRAStack], lora_ids: list[int], num_tokens: list[int],
              device: str) -> LoRABatch:
        """Sequence i's `num_tokens[i]` consecutive flat rows run adapter `lora_ids[i]` (0: none; at
        least one row runs one); `stack_of(ids)` gives the LoRAStack of those adapter ids, sorted."""
        ids = tuple(sorted({i for i in lora_ids if i}))
        stack = stack_of(ids)
        if len(set(lora_ids)) == 1:
            return cls(stack, None)
        position = {lora_id: p for p, lora_id in enumerate(ids)}
        rows = [position.get(i, -1) for i, n in zip(lora_ids, num_tokens) for _ in range(n)]
        return cls(stack, to_device(rows, device, torch.int64))

    def apply(self, layer: int, linear: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`out` (= linear(x)) plus each row's adapter delta for that layer's `linear`."""
        weights = self.stack.weights.get((layer, linear))
        if weights is None:  # no adapter of the step touches this Linear
            return out
        a_t, b_t, owner = weights
        xa = x @ a_t
        if self.row_owner is not None:
            xa.mul_(self._mask(owner, xa.dtype))
        return torch.addmm(out, xa, b_t)

    def _mask(self, owner: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        mask = self._masks.get(id(owner))
        if mask is None:
            mask = (self.row_owner[:, None] == owner[None, :]).to(dtype)
            self._masks[id(owner)] = mask
        return mask

"""One step's LoRA deltas: which flat rows run which adapter, and what each adapted Linear adds to them.

The torch form of Punica's segmented matmul: per adapter in the step, its rows' inputs go through
A (R, in) then B (out, R), and the result is added at those rows. A step holds at most
`max_loras` adapters (the scheduler's rule), so this is a few small matmul pairs per Linear,
and a step whose rows all share one adapter gathers nothing.
"""
from __future__ import annotations

import torch

from engine.host_copy import to_device
from models.lora import LoRAAdapter


class LoRABatch:
    """Rows of a flat step by adapter; `apply` adds their deltas to one Linear's output."""

    def __init__(self, groups: list[tuple[LoRAAdapter, torch.Tensor | None]]) -> None:
        self.groups = groups  # (adapter, its flat rows; None: every row of the step)

    @classmethod
    def build(cls, adapters: dict[int, LoRAAdapter], lora_ids: list[int], num_tokens: list[int],
              device: str) -> LoRABatch | None:
        """Sequence i's `num_tokens[i]` consecutive flat rows run adapter `lora_ids[i]` (0: none).
        None when no row runs one: the model takes its fused path."""
        if not any(lora_ids):
            return None
        if len(set(lora_ids)) == 1:
            return cls([(adapters[lora_ids[0]], None)])
        rows: dict[int, list[int]] = {}
        start = 0
        for lora_id, n in zip(lora_ids, num_tokens):
            if lora_id:
                rows.setdefault(lora_id, []).extend(range(start, start + n))
            start += n
        return cls([(adapters[i], to_device(r, device)) for i, r in rows.items()])

    def apply(self, layer: int, linear: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`out` (= linear(x)) plus each adapter's delta for that layer's `linear` at its rows."""
        for adapter, rows in self.groups:
            weights = adapter.weights.get((layer, linear))
            if weights is None:  # the adapter leaves this Linear alone
                continue
            a, b = weights
            if rows is None:
                out = out + (x @ a.t()) @ b.t()
            else:
                out = out.index_add(0, rows, (x[rows] @ a.t()) @ b.t())
        return out

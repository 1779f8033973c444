"""Host values to device tensors without waiting for the device."""
from __future__ import annotations

from typing import Any

import torch


def to_device(data: Any, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`torch.tensor(data, dtype=dtype)` (or a CPU tensor as it is) on `device`.

    On CUDA the copy goes through pinned memory, asynchronously. A copy from pageable memory
    (what `torch.tensor(..., device="cuda")` does) waits for every kernel queued before it, which
    would stall a step launched ahead (engine.engine) until the previous step finished. The pinned
    block is not reused before the copy has run: torch's host allocator tracks it."""
    t = data if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype)
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)

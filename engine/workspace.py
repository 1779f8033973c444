"""A scratch tensor reused from step to step.

On CPU a fresh tensor of more than a few tens of MB is a fresh mmap: every page faults in on
first touch, which cost more than the GEMM or gather that fills it (logits of 256 rows over a
58k vocabulary: 60 MB, 40 ms of page faults per step). Reusing one buffer keeps the pages warm.
"""
from __future__ import annotations

import math

import torch


class Workspace:
    """One growable buffer; `take` views its front as the asked shape (contents undefined).

    A view is valid until the next `take`: callers use it within one step."""

    def __init__(self) -> None:
        self._buf: torch.Tensor | None = None

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        need = math.prod(shape)
        buf = self._buf
        if buf is None or buf.numel() < need or buf.dtype != dtype or buf.device != device:
            with torch.inference_mode(False):  # usable inside and outside inference mode
                # grow by half again: decode contexts and batches grow a little at a time
                buf = torch.empty(need + need // 2, dtype=dtype, device=device)
            self._buf = buf
        return buf[:need].view(shape)

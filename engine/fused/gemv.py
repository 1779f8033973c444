"""`GemvLinear`: a Linear that runs batches of a few rows through engine.fused.triton_gemv.

`swap_gemv_linears(model, max_rows)` replaces a decoder's `nn.Linear`s after loading (as
engine.cpu_linear packs them on CPU). Batches of at most `max_rows` rows (a decode step of a
few sequences) then take the Triton GEMV, and `engine.fused.norm_linear` / `silu_mul_linear`
fold the RMSNorm or SwiGLU product in front of such a Linear into its launch; larger batches
(prefills) keep F.linear, where tensor-core GEMMs win.
"""
from __future__ import annotations

import torch
from torch import nn

from engine.fused import ref


class GemvLinear(nn.Module):
    """nn.Linear's parameters and result; rows <= max_rows go through the Triton GEMV, with
    programmatic dependent launch where `pdl` (set by `launch_dependent`)."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, max_rows: int) -> None:
        super().__init__()
        self.weight = weight  # shared, not copied: a tied lm_head stays the embedding's weight
        self.bias = bias
        self.max_rows = max_rows
        self.pdl = False
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    @classmethod
    def from_linear(cls, linear: nn.Linear, max_rows: int) -> GemvLinear:
        return cls(linear.weight, linear.bias, max_rows)

    def takes(self, x: torch.Tensor) -> bool:
        return x.dim() == 2 and x.shape[0] <= self.max_rows

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        if self.takes(x):
            from engine.fused import triton_gemv

            return triton_gemv.linear(x.contiguous(), self.weight, self.bias, out_dtype, pdl=self.pdl)
        return ref.linear(x, self.weight, self.bias, out_dtype)


def swap_gemv_linears(model: nn.Module, max_rows: int) -> int:
    """Replace every `nn.Linear` below `model` by a `GemvLinear`; returns how many."""
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is nn.Linear]
    for parent, name, child in swaps:
        setattr(parent, name, GemvLinear.from_linear(child, max_rows))
    return len(swaps)


def launch_dependent(model: nn.Module, skip: nn.Module | None = None) -> int:
    """Turn on programmatic dependent launch (engine/fused/pdl.py) for the `GemvLinear`s below
    `model` but `skip`; returns how many. The engine skips the vocabulary projection: it runs
    after the decode graph's replay, where there is no kernel of the graph to overlap."""
    linears = [m for m in model.modules() if isinstance(m, GemvLinear) and m is not skip]
    for linear in linears:
        linear.pdl = True
    return len(linears)

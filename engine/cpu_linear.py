"""fp32 linear layers on CPU through oneDNN, with each weight packed once at load.

`F.linear` on CPU hands every call to a BLAS sgemm that re-packs the weight into its blocked
layout each time. oneDNN takes the weight packed once (`_reorder_linear_weight`, what
torch.compile's CPU freezing does): with 2 threads on an AVX2 EPYC, a 64-row product over a
58k-row vocabulary ran at 130 GFLOP/s against 64, decode-sized projections (32-128 rows) at
118-132 against 87-106, and 4096-row ones level. The result is the same fp32 product summed in
another order (max abs diff ~1e-4 on outputs of magnitude ~25).

oneDNN builds (JITs) and caches one primitive per input shape: ~1-3 ms and ~0.7 MB each, in a cache
of 1024. A server's row counts change every step (decode batch, prefill chunk, embedding batch), so
rows are padded up to one of a few sizes (`padded_rows`, < 6.25 % extra rows): 144 shapes up to
4096 rows per weight shape, instead of a new primitive per step and a cache that churns.

`pack_linears(model)` swaps every fp32 CPU `nn.Linear` for a `PackedLinear` holding only the packed
weight (same memory); `torch.nn.functional.linear` over the unpacked weight is the reference.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


def available(weight: torch.Tensor) -> bool:
    """oneDNN is built into torch's CPU wheels; packing pays for fp32 weights on CPU only."""
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()


def padded_rows(rows: int) -> int:
    """`rows` rounded up to a multiple of 2^(bits(rows) - 5): exact below 32, then 16 sizes per
    doubling, so padding wastes under 1/16 of the rows."""
    step = 1 << max(rows.bit_length() - 5, 0)
    return -(-rows // step) * step


class PackedLinear(nn.Module):
    """y = x @ W^T + b with W in oneDNN's blocked layout; a drop-in for a loaded `nn.Linear`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # an opaque mkldnn tensor: not a parameter or buffer, so state_dict never sees its layout
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedLinear:
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """`bias` overrides the layer's own (a vocabulary head with a separate logits bias)."""
        bias = self.bias if bias is None else bias
        rows = x.numel() // self.in_features
        padded = padded_rows(rows)
        if padded == rows:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")
        buf = x.new_empty(padded, self.in_features)
        buf[:rows] = x.reshape(rows, self.in_features)
        buf[rows:] = 0  # pad rows are computed and dropped; zeros keep them finite
        out = torch.ops.mkldnn._linear_pointwise(buf, self.packed, bias, "none", [], "")[:rows]
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_linears(model: nn.Module, quantized: dict[nn.Linear, Any] | None = None) -> int:
    """Replace every fp32 CPU `nn.Linear` below `model` by a `PackedLinear`, or by a
    `QuantizedLinear` where `quantized` holds its weight's GGUF blocks; returns how many."""
    from engine.quant_linear import QuantizedLinear  # it builds on PackedLinear

    quantized = quantized or {}
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is nn.Linear and available(child.weight)]
    for parent, name, child in swaps:
        blocks = quantized.get(child)
        setattr(parent, name, PackedLinear.from_linear(child) if blocks is None
                else QuantizedLinear(child.weight, child.bias, blocks))
    return len(swaps)

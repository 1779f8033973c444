"""Linears over GGUF-quantized weights on CPU: decode-sized row counts read the blocks
(quant_linear_cpu.c), larger ones the packed fp32 weight (engine/cpu_linear.py).

A batch-1 decode step streams every weight once, so its time is the weights' bytes over memory
bandwidth: SmolLM2's Q4_1 blocks are 5.7x fewer bytes than the fp32 weights they dequantize to
(Q8_0: 3.8x). The kernel converts each block in registers, once for all the step's rows; past a
few rows the step is no longer bound by reading weights, and oneDNN's GEMM over the packed fp32
weight is faster. Both compute x against the same weights (the dequantized values, exactly): the
results differ only in summation order.

`dequantize` is the torch reference (equal to gguf-py's); `QuantizedLinear` the module that
`engine.cpu_linear.pack_linears` installs where a Linear's weight is known to equal its blocks.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from engine import native
from engine.cpu_linear import PackedLinear

SOURCE = Path(__file__).with_name("quant_linear_cpu.c")
BLOCK = 32  # weights per block, in every format here
DEFAULT_ROWS = 2  # rows up to which the blocks beat oneDNN's fp32 GEMM (measured: docs/benchmarks.md)


@dataclass(frozen=True)
class QuantFormat:
    name: str
    block_bytes: int  # bytes per 32 weights
    has_min: bool  # Q4_1's per-block offset m (w = d q + m)
    kernel: str


FORMATS = {
    "Q4_1": QuantFormat("Q4_1", 20, True, "q4_1_linear"),
    "Q8_0": QuantFormat("Q8_0", 34, False, "q8_0_linear"),
}


@dataclass(frozen=True)
class QuantizedWeight:
    """A (out, in) weight as GGUF blocks: `blocks` is (out, in / 32 * block_bytes) uint8, each row its
    blocks in input order."""

    format: QuantFormat
    blocks: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        rows, row_bytes = self.blocks.shape
        return rows, row_bytes // self.format.block_bytes * BLOCK


def dequantize(weight: QuantizedWeight) -> torch.Tensor:
    """The fp32 weight the blocks hold (gguf-py's arithmetic: fp16 scales widened, then d q + m)."""
    fmt = weight.format
    out, _ = weight.shape
    blocks = weight.blocks.reshape(out, -1, fmt.block_bytes)
    d = blocks[..., 0:2].contiguous().view(torch.float16).float()
    if fmt.has_min:
        m = blocks[..., 2:4].contiguous().view(torch.float16).float()
        qs = blocks[..., 4:]
        q = torch.cat([qs & 15, qs >> 4], dim=-1).float()
        return (d * q + m).reshape(out, -1)
    q = blocks[..., 2:].contiguous().view(torch.int8).float()
    return (d * q).reshape(out, -1)


@lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    """The compiled kernels, or None (disabled, no compiler, failed build): the fp32 path serves."""
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    args = [ptr, i64, i64, ptr, i64, ptr, ptr]
    return native.load(SOURCE, {fmt.kernel: args for fmt in FORMATS.values()})


def quant_linear(lib: ctypes.CDLL, x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., in) fp32 @ the blocks' weight^T (+ bias), any number of rows (four at a time)."""
    out_features, in_features = weight.shape
    rows = x.numel() // in_features
    assert x.dtype == torch.float32
    x2 = x.reshape(rows, in_features).contiguous()
    y = x.new_empty(rows, out_features)
    getattr(lib, weight.format.kernel)(x2.data_ptr(), rows, in_features, weight.blocks.data_ptr(), out_features,
                                       None if bias is None else bias.data_ptr(), y.data_ptr())
    return y.view(*x.shape[:-1], out_features)


class QuantizedLinear(PackedLinear):
    """A `PackedLinear` that also holds its weight's GGUF blocks: up to `max_rows` rows read them."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, quantized: QuantizedWeight,
                 max_rows: int = DEFAULT_ROWS) -> None:
        super().__init__(weight, bias)
        self.quantized = quantized
        self.max_rows = max_rows
        self.lib = load()

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if self.lib is None or rows > self.max_rows or x.dtype != torch.float32:
            return super().forward(x, bias)
        return quant_linear(self.lib, x, self.quantized, self.bias if bias is None else bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, format={self.quantized.format.name}, max_rows={self.max_rows}"

"""Greedy tokens from a vocabulary head through a bf16 screen: the fp32 argmax, at about half the cost.

A greedy step needs only each row's argmax over the vocabulary, yet the fp32 projection onto a
58k-row head is a quarter of a translation step. On CPUs with AVX512-BF16 the same product in
bf16 runs at twice the rate (2 threads, 58,101 x 512 head: 36 vs 92 ms at 256 rows). bf16 alone
could pick another token, so its logits only screen: each has a proven error bound, and the few
tokens whose interval reaches the best lower bound of their row are scored again in fp32 from the
plain weight rows (a gather and a dot each). The token is the argmax of those fp32 scores, which
contain the fp32 argmax of the whole row; a row with no candidates or too many (a flat row, NaN)
takes its full fp32 logits. Results equal `reference` (fp32 logits, bans, argmax) except where two
fp32 logits tie within rounding, as any two GEMMs may.

The bound, for row h and token j with weight row w (u = 2^-8, bf16's unit roundoff; K = hidden):
rounding h and w to bf16 moves their product by at most (2u + u^2)|w||h|; summing K products in
fp32, here and in the fp32 GEMM it stands for, by at most 2K * 2^-24 * sum|w||h|; the bf16 output
by u / (1 - u) of its value; sum|w||h| <= ||w|| ||h||. The kernel (greedy_screen_cpu.c) takes
coef = (2u + u^2 + 2.1 K 2^-24) ||h|| per row and rel for the output and bias terms.
"""
from __future__ import annotations

import ctypes
import os
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from engine import native
from engine.cpu_linear import PackedLinear
from engine.top_logprobs import ban_, flat_bans

SOURCE = Path(__file__).with_name("greedy_screen_cpu.c")
ENV = "KVSERVE_GREEDY_SCREEN"  # "1": on wherever it runs (tests), "0": off; unset: on with native bf16
UNIT = 2.0**-8  # bf16 unit roundoff (8 significant bits, round to nearest)
REL = UNIT + 2 * UNIT * UNIT + 2.0**-22  # bf16 output rounding, and fp32 rounding of the bias sum


@lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (disabled, no compiler, failed build)."""
    i32, i64, f32, ptr = ctypes.c_int32, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    return native.load(SOURCE, {"greedy_candidates": [ptr, i64, i32, i64, ptr, ptr, ptr, f32, ptr, ptr, i64, ptr, ptr,
                                                      i32]})


@lru_cache(maxsize=1)
def native_bf16() -> bool:
    """Whether this CPU has bf16 dot products (AVX512-BF16 or AMX), where the screen pays: elsewhere
    oneDNN converts bf16 to fp32 and the screen costs more than the GEMM it replaces."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def wanted(weight: torch.Tensor) -> bool:
    """Screen this head? fp32 on CPU only; by default where bf16 is native and the kernel builds."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return False
    env = os.environ.get(ENV)
    if env is not None:
        return env != "0"
    return native_bf16() and torch.ops.mkldnn._is_mkldnn_bf16_supported() and load() is not None


def candidates_reference(screen: torch.Tensor, bias: torch.Tensor | None, norms: torch.Tensor, coefs: torch.Tensor,
                         rel: float, bans: list[list[int]], cap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's contract in torch: (ids (rows, cap) int64, ascending, first min(count, cap) set;
    counts (rows,) int32) of the tokens whose interval reaches their row's best lower bound; a count
    of 0 means every value is -inf or NaN. `screen` (rows, V) bf16 is scratch (bans become -inf)."""
    s = ban_(screen.float(), bans)
    b = torch.zeros_like(norms) if bias is None else bias
    v = s + b
    e = coefs[:, None] * norms + rel * (s.abs() + b.abs()) + 1e-6
    low = torch.nan_to_num(v - e, nan=float("-inf")).amax(dim=1, keepdim=True)
    hit = (v + e >= low) & (low > float("-inf"))
    counts = hit.sum(dim=1, dtype=torch.int32)
    ids = torch.zeros((s.shape[0], cap), dtype=torch.int64)
    for row in range(s.shape[0]):
        found = hit[row].nonzero()[:cap, 0]
        ids[row, : len(found)] = found
    return ids, counts


def candidates(screen: torch.Tensor, bias: torch.Tensor | None, norms: torch.Tensor, coefs: torch.Tensor,
               rel: float, bans: list[list[int]], cap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`candidates_reference` through the kernel where it loads."""
    lib = load() if screen.stride(1) == 1 else None
    if lib is None:
        return candidates_reference(screen, bias, norms, coefs, rel, bans, cap)
    rows, vocab = screen.shape
    offsets, flat = flat_bans(bans)
    ids = torch.zeros((rows, cap), dtype=torch.int64)
    counts = torch.empty(rows, dtype=torch.int32)
    coefs = coefs.contiguous()
    lib.greedy_candidates(screen.data_ptr(), screen.stride(0), rows, vocab, 0 if bias is None else bias.data_ptr(),
                          norms.data_ptr(), coefs.data_ptr(), rel, offsets.data_ptr(), flat.data_ptr(), cap,
                          ids.data_ptr(), counts.data_ptr(), torch.get_num_threads())
    return ids, counts


class GreedyScreen:
    """argmax over `hidden @ weight^T + bias` with banned tokens excluded, screened in bf16.

    Holds the head's plain fp32 weight (shared with the model, for the re-score), a bf16 copy
    (half the size; packed for oneDNN where it runs bf16) and each weight row's norm."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, input_scale: float | None = None,
                 cap: int = 64) -> None:
        self.weight = weight.detach()
        self.input_scale = input_scale  # what the model's compute_logits multiplies hidden by (T5 v1.0)
        self.bias = None if bias is None else bias.detach().reshape(-1).float().contiguous()
        self.cap = cap
        low = self.weight.to(torch.bfloat16)
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            self._screen: torch.nn.Module | None = PackedLinear(low, None)  # rows padded: one primitive per size
        else:
            self._screen, self._low = None, low
        k = self.weight.shape[1]
        slack = 1 + (k + 4) * 2.0**-22  # fp32 rounding of the norms (sums of k squares) and of the bound
        self.norms = torch.linalg.vector_norm(self.weight, dim=1) * slack
        self.coef_scale = (2 * UNIT + UNIT * UNIT + 2.1 * k * 2.0**-24) * slack

    @classmethod
    def build(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
              input_scale: float | None = None) -> GreedyScreen | None:
        """A screen for this head if `wanted`, else None (the caller takes full logits)."""
        return cls(weight, bias, input_scale) if wanted(weight) else None

    def _bf16_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.to(torch.bfloat16)
        return self._screen(x) if self._screen is not None else F.linear(x, self._low)

    def argmax(self, hidden: torch.Tensor, bans: list[list[int]]) -> torch.Tensor:
        """(rows,) int64: each row's token of highest fp32 logit, `bans[row]` excluded."""
        if self.input_scale is not None:
            hidden = hidden * self.input_scale
        hidden = hidden.float().contiguous()
        rows = hidden.shape[0]
        tokens = torch.zeros(rows, dtype=torch.int64)
        if rows == 0:
            return tokens
        coefs = hidden.norm(dim=1) * self.coef_scale
        ids, counts = candidates(self._bf16_logits(hidden), self.bias, self.norms, coefs, REL, bans, self.cap)
        ok = (counts > 0) & (counts <= self.cap)
        if bool(ok.any()):
            width = int(counts[ok].max())
            real = (torch.arange(width) < counts[:, None]) & ok[:, None]  # (rows, width): a candidate there
            flat = ids[:, :width][real]  # only real candidates are gathered: ~10 weight rows per row
            owner = real.nonzero()[:, 0]
            exact = (self.weight[flat] * hidden[owner]).sum(dim=1)  # fp32 dot products
            if self.bias is not None:
                exact += self.bias[flat]
            scores = torch.full((rows, width), float("-inf"))
            scores[real] = exact
            # ids ascend within a row, so argmax's first of equal maxima is the lower id, as on full rows
            tokens = ids.gather(1, scores.argmax(dim=1, keepdim=True))[:, 0]
        for row in (~ok).nonzero()[:, 0].tolist():  # flat or NaN rows: the whole fp32 row
            tokens[row] = reference(hidden[row : row + 1], self.weight, self.bias, bans[row : row + 1])[0]
        return tokens


def reference(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              bans: list[list[int]]) -> torch.Tensor:
    """The oracle: fp32 logits, banned tokens at -inf, argmax (the first of equal maxima)."""
    return ban_(F.linear(hidden.float(), weight, bias), bans).argmax(dim=1)

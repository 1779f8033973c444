"""The k best log-probabilities of each row of logits, some tokens banned: what a beam-search step
takes from the logits.

`top_logprobs` runs the compiled kernel (top_logprobs_cpu.c: each row read once, no log_softmax
tensor) on fp32 CPU logits where it builds, else `reference`, the torch oracle with the same
signature. Both treat `logits` as scratch and may overwrite it. Banned tokens count in the
normaliser and are excluded afterwards: HF's logits processors act on log-probs.
"""
from __future__ import annotations

import ctypes
import itertools
from functools import lru_cache
from pathlib import Path

import torch

from engine import native

SOURCE = Path(__file__).with_name("top_logprobs_cpu.c")
MAX_K = 128  # the kernel's list size (MAX_K in the C file)


@lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (disabled, no compiler, failed build)."""
    i32, i64, ptr = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p
    return native.load(SOURCE, {"top_logprobs": [ptr, i64, i32, i64, ptr, ptr, i32, i32, ptr, ptr, i32]})


def log_softmax_(logits: torch.Tensor, rows_per_chunk: int = 8) -> torch.Tensor:
    """Row-wise log_softmax in place, a few rows at a time: the values of torch.log_softmax
    (each row is computed alone either way) without a second (rows, V) tensor, which for 256
    beams over a 58k vocabulary is a fresh 60 MB mmap whose page faults doubled the op's time."""
    for start in range(0, logits.shape[0], rows_per_chunk):
        part = logits[start : start + rows_per_chunk]
        part.copy_(torch.log_softmax(part, dim=-1))
    return logits


def ban_(scores: torch.Tensor, bans: list[list[int]]) -> torch.Tensor:
    """Row r's `bans[r]` set to -inf in place (one index_put per row that has any)."""
    for row, banned in enumerate(bans):
        if banned:
            scores[row, banned] = float("-inf")
    return scores


def flat_bans(bans: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row bans as the C kernels take them: row offsets (rows + 1) and the ids end to end."""
    offsets = torch.tensor(list(itertools.accumulate(map(len, bans), initial=0)), dtype=torch.int64)
    return offsets, torch.tensor([t for banned in bans for t in banned] or [0], dtype=torch.int64)


def reference(logits: torch.Tensor, k: int, bans: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, token ids), each (rows, k), descending: top-k of log_softmax(logits) with row r's
    `bans[r]` set to -inf after normalising."""
    return torch.topk(ban_(log_softmax_(logits), bans), k, dim=-1)


def _kernel_fits(logits: torch.Tensor, k: int) -> bool:
    return (logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2
            and logits.stride(1) == 1 and 1 <= k <= min(MAX_K, logits.shape[1]))


def top_logprobs(logits: torch.Tensor, k: int, bans: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """`reference`'s result (to float rounding) through the kernel where it applies."""
    lib = load() if _kernel_fits(logits, k) else None
    if lib is None:
        return reference(logits, k, bans)
    rows, vocab = logits.shape
    offsets, flat = flat_bans(bans)
    values = torch.empty((rows, k), dtype=torch.float32)
    ids = torch.empty((rows, k), dtype=torch.int64)
    lib.top_logprobs(logits.data_ptr(), logits.stride(0), rows, vocab, offsets.data_ptr(), flat.data_ptr(), k, 1,
                     values.data_ptr(), ids.data_ptr(), torch.get_num_threads())
    return values, ids


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """`logits.argmax(-1)` (the first of equal maxima) for 2-D logits; through the kernel, which
    reads each row once with vector compares, for fp32 CPU rows (torch's took 2-3x as long on
    256 x 58k logits). `logits` is left as it is."""
    lib = load() if _kernel_fits(logits, 1) else None
    if lib is None:
        return logits.argmax(-1)
    rows, vocab = logits.shape
    offsets, flat = flat_bans([[]] * rows)
    values = torch.empty((rows, 1), dtype=torch.float32)
    ids = torch.empty((rows, 1), dtype=torch.int64)
    lib.top_logprobs(logits.data_ptr(), logits.stride(0), rows, vocab, offsets.data_ptr(), flat.data_ptr(), 1, 0,
                     values.data_ptr(), ids.data_ptr(), torch.get_num_threads())
    return ids[:, 0]

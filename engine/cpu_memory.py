"""Keep freed CPU memory in the process, so a step's large tensors reuse warm pages.

glibc serves each allocation above its mmap threshold (dynamic, 128 KiB to 32 MiB) with a fresh
mmap and unmaps it on free. A step's large tensors come back every step (the logits of 256 rows
over a 58k vocabulary: 60 MB; an encoder batch's FFN activations: 33 MB), and every page of a
fresh mapping faults and is zeroed on first touch: 60 MB allocated and filled took 28 ms against
6 ms when reused, and the vocabulary GEMM that writes them (oneDNN allocates its own output;
there is no `out=`) ran 15-20 % slower (measured on the 2-core AVX2 VM, docs/benchmarks.md).

`retain_freed_memory()` raises glibc's mmap and trim thresholds: blocks below 1 GiB come from the
heap and freed ones stay on malloc's free lists. The cost is RSS that stays near its peak
(about +170 MB for the Marian benchmark), as a server holding a preallocated KV cache expects.
A process-wide allocator setting, like a thread count: idempotent, and a no-op off glibc.
"""
from __future__ import annotations

import ctypes
import os
import platform

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3


def retain_freed_memory(mmap_threshold: int = 1 << 30, trim_threshold: int = 1 << 31) -> bool:
    """Set glibc's thresholds; False where there is no glibc or KVSERVE_RETAIN_MEMORY=0."""
    if os.environ.get("KVSERVE_RETAIN_MEMORY", "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    mmap_ok = libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
    trim_ok = libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    return bool(mmap_ok and trim_ok)

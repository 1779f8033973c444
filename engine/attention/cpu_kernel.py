"""The compiled CPU decode-attention kernel (paged_decode_cpu.c): built once, loaded with ctypes.

A plain C file compiled by the system's C compiler in about a second, no torch headers: the
shared object is cached under `$KVSERVE_CACHE_DIR` (default ~/.cache/kvserve) keyed by a hash
of the source and flags. It links OpenMP by soname, so it runs on the libgomp that torch has
already loaded: one thread pool for torch and the kernel, not two spinning against each other.
Where no compiler is found or the build fails, `load()` returns None and callers keep the torch
reference. ctypes releases the GIL for the call, so a server's event loop runs meanwhile.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("paged_decode_cpu.c")
DISABLE_ENV = "KVSERVE_CPU_KERNEL"  # "0": never build or load it (the torch reference serves)


def _flags() -> list[str]:
    """x86-64-v3 (AVX2 + FMA) where the CPU has it: a fixed target rather than -march=native,
    so a build cached in a container image runs on any such machine."""
    flags = ["-O3", "-std=gnu11", "-ffp-contract=fast", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags.append("-march=x86-64-v3")
    return flags


def _cache_root() -> Path:
    return Path(os.environ.get("KVSERVE_CACHE_DIR") or Path.home() / ".cache" / "kvserve")


def build(compiler: str | None = None) -> Path | None:
    """Path of the compiled kernel, compiling it first if no cached build matches the source."""
    cc = compiler or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    flags = _flags()
    digest = hashlib.sha1(SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:12]
    target = _cache_root() / "kernels" / f"paged_decode_cpu-{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # compile to a temp name and rename: concurrent builders never load half a file
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *flags, str(SOURCE), "-o", tmp, "-lm"], check=True, capture_output=True, timeout=120)
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    except (OSError, subprocess.SubprocessError):
        Path(tmp).unlink(missing_ok=True)
        return None
    return target


@lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (disabled, no compiler, failed build)."""
    if os.environ.get(DISABLE_ENV) == "0":
        return None
    path = build()
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:  # e.g. a build from another machine whose OpenMP runtime is missing here
        return None
    i32, i64, ptr = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p
    lib.paged_decode_attention.argtypes = [ptr, i64, ptr, i64, ptr, ptr, ptr, ptr, i64, ptr,
                                           i32, i32, i32, i32, i32, ctypes.c_float, i32]
    lib.paged_decode_attention.restype = None
    return lib


MAX_GROUP = 8  # query heads per kv head (the kernel's register budget, MAX_GROUP in the C file)


def supports(query: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """fp32 on CPU, heads contiguous within a token row (any row stride), a dense cache, head_dim
    a multiple of 8 and at most MAX_GROUP query heads per kv head."""
    num_heads, head_dim = query.shape[1:]
    num_kv_heads = k_cache.shape[2]
    return (
        num_heads % num_kv_heads == 0
        and num_heads // num_kv_heads <= MAX_GROUP
        and head_dim % 8 == 0
        and query.device.type == "cpu"
        and query.dtype == torch.float32
        and k_cache.dtype == torch.float32
        and query.stride(2) == 1
        and query.stride(1) == query.shape[2]
        and k_cache.is_contiguous()
    )


def paged_decode_attention(
    lib: ctypes.CDLL,
    out: torch.Tensor,  # (T, num_heads, head_dim), rows written: `rows`
    query: torch.Tensor,  # (T, num_heads, head_dim)
    k_cache: torch.Tensor,  # (num_blocks, block_size, num_kv_heads, head_dim), contiguous
    v_cache: torch.Tensor,
    rows: torch.Tensor,  # (B,) int64: the query row of each decoding sequence
    block_tables: torch.Tensor,  # (B, max_blocks) int32, contiguous
    seq_lens: torch.Tensor,  # (B,) int32: keys per sequence, the new one included
    scale: float,
) -> torch.Tensor:
    """Attention of one query token per sequence over its paged K/V, written into `out`."""
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    assert block_tables.dtype == torch.int32 and seq_lens.dtype == torch.int32 and rows.dtype == torch.int64
    assert block_tables.is_contiguous() and out.stride(2) == 1 and out.stride(1) == head_dim
    lib.paged_decode_attention(
        out.data_ptr(), out.stride(0), query.data_ptr(), query.stride(0), rows.data_ptr(),
        k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(), block_tables.stride(0),
        seq_lens.data_ptr(), rows.numel(), query.shape[1], num_kv_heads, head_dim, block_size,
        scale, torch.get_num_threads(),
    )
    return out

"""Plain C kernels for the CPU path: compiled once by the system's C compiler, loaded with ctypes.

A kernel is one C file (plus the local headers it includes), no torch headers: it builds in about a
second. The shared object is cached under `$KVSERVE_CACHE_DIR` (default ~/.cache/kvserve) keyed by a
hash of the sources and flags. It links OpenMP by soname, so it runs on the libgomp that torch has
already loaded: one thread pool for torch and the kernel, not two spinning against each other.
Where no compiler is found or the build fails, `build` returns None and callers keep their torch
reference. ctypes releases the GIL for a call, so a server's event loop runs meanwhile.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

DISABLE_ENV = "KVSERVE_CPU_KERNEL"  # "0": never build or load a C kernel (the torch references serve)


def _flags() -> list[str]:
    """x86-64-v3 (AVX2 + FMA) where the CPU has it: a fixed target rather than -march=native,
    so a build cached in a container image runs on any such machine."""
    flags = ["-O3", "-std=gnu11", "-ffp-contract=fast", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags.append("-march=x86-64-v3")
    return flags


def _cache_root() -> Path:
    return Path(os.environ.get("KVSERVE_CACHE_DIR") or Path.home() / ".cache" / "kvserve")


def _local_headers(source: Path) -> list[Path]:
    """The `#include "..."` files of `source` (directly; relative to it): part of what a build is keyed by."""
    names = re.findall(r'^\s*#include\s+"([^"]+)"', source.read_text(), flags=re.MULTILINE)
    return [(source.parent / name).resolve() for name in names]


def build(source: Path, compiler: str | None = None) -> Path | None:
    """Path of the compiled `source`, compiling it first if no cached build matches it."""
    cc = compiler or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    flags = _flags()
    key = b"".join(p.read_bytes() for p in [source, *_local_headers(source)]) + " ".join(flags).encode()
    target = _cache_root() / "kernels" / f"{source.stem}-{hashlib.sha1(key).hexdigest()[:12]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # compile to a temp name and rename: concurrent builders never load half a file
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *flags, str(source), "-o", tmp, "-lm"], check=True, capture_output=True, timeout=120)
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    except (OSError, subprocess.SubprocessError):
        Path(tmp).unlink(missing_ok=True)
        return None
    return target


def load(source: Path, signatures: dict[str, list[type]]) -> ctypes.CDLL | None:
    """The loaded library of `source` with each named function's argument types set (all return
    void), or None (disabled, no compiler, failed build)."""
    if os.environ.get(DISABLE_ENV) == "0":
        return None
    path = build(source)
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:  # e.g. a build from another machine whose OpenMP runtime is missing here
        return None
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, None
    return lib

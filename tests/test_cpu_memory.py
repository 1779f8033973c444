"""engine/cpu_memory.py: a freed large tensor stays in malloc's heap instead of being unmapped."""
from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# mallinfo2's fields (glibc >= 2.33): hblkhd = bytes in mmapped blocks, fordblks = free bytes in the heap
_PROBE = """
import ctypes, sys
import torch
from engine.cpu_memory import retain_freed_memory
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
applied = retain_freed_memory() if sys.argv[1] == "retain" else False
x = torch.empty(15_000_000)  # 60 MB, the size of one step's logits for 256 beams
x.fill_(1.0)
during = libc.mallinfo2()
del x
after = libc.mallinfo2()
print(applied, during.hblkhd, after.fordblks)
"""


def _probe(mode: str, env: dict | None = None) -> tuple[bool, int, int]:
    done = subprocess.run([sys.executable, "-c", _PROBE, mode], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    applied, mmapped, free_in_heap = done.stdout.split()
    return applied == "True", int(mmapped), int(free_in_heap)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_large_tensor_is_reused_from_the_heap_once_retained():
    applied, mmapped, free_in_heap = _probe("retain")
    assert applied
    assert mmapped < 60_000_000  # the tensor came from the heap, not a fresh mapping
    assert free_in_heap >= 60_000_000  # and its pages stay there once freed


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_default_allocator_maps_and_unmaps_it():
    # the behaviour retain_freed_memory changes: without it the same tensor is a fresh mmap
    applied, mmapped, free_in_heap = _probe("default")
    assert not applied and mmapped >= 60_000_000 and free_in_heap < 60_000_000


def test_env_switch_turns_it_off(monkeypatch):
    from engine.cpu_memory import retain_freed_memory

    monkeypatch.setenv("KVSERVE_RETAIN_MEMORY", "0")
    assert retain_freed_memory() is False

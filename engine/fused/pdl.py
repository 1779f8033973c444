"""Programmatic dependent launch (PDL, compute capability 9.0+) for a decode step's kernels.

A small model's decode step on a GPU is a chain of short kernels, each starting only once the
one before has drained: the gap between them is part of every launch. With PDL a kernel is
launched early, while the previous one still runs, and its programs wait in place
(`griddepcontrol.wait`) until that one has finished and its writes are visible. Each kernel
that takes PDL waits first thing, before any load or store, so the order of memory accesses is
the same as without it: only the launch overlaps. A kernel launched without PDL after one of
these waits as usual, so PDL kernels mix freely with torch's and cuBLAS's.

Kernels take a `PDL` constexpr and their launch wrappers a `pdl` flag (off by default); the
engine turns it on for the kernels of decoder layers (`EngineConfig.launch_pdl`). The
interpreter cannot run the wait, so CPU tensors never take it (`use_pdl`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def wait_for_previous(PDL: tl.constexpr):
    """With PDL: wait for the previous kernel's writes, then let the next kernel launch."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        # The next kernel's programs start once every program here has passed this point; they
        # then wait for all of this kernel in turn, so signalling this early is safe.
        tl.extra.cuda.gdc_launch_dependents()


def use_pdl(pdl: bool, x: torch.Tensor) -> bool:
    """Whether a launch on x's device takes PDL: asked for, and compiled rather than interpreted."""
    return pdl and x.is_cuda


def supported(device: str) -> bool:
    """PDL needs a Hopper or newer GPU; the wait instruction does not exist before sm_90."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(torch.device(device))[0] >= 9

"""Programmatic dependent launch (PDL, compute capability 9.0+) for a decode step's kernels.

A small model's decode step on a GPU is a chain of short kernels, each starting only once the
one before has drained: the gap between them is part of every launch. With PDL a kernel is
launched early, while the previous one still runs, and its programs wait in place
(`griddepcontrol.wait`) until that one has finished and its writes are visible. Each kernel
that takes PDL waits before it touches memory another kernel writes, so the order of those
accesses is the same as without it; only the launch overlaps, and a GEMV's first weight tile
(weights are written by no kernel) is already loading while the previous kernel ends. A kernel
launched without PDL after one of these waits as usual, so PDL kernels mix freely with torch's
and cuBLAS's.

Kernels take a `PDL` constexpr and their launch wrappers a `pdl` flag (off by default); the
engine turns it on for the kernels of decoder layers (`EngineConfig.enable_pdl`). Under
TRITON_INTERPRET=1 (the CPU tests) programs run one after another once the previous kernel has
returned, so the wait is a no-op there and the PDL variants of the kernels run unchanged
otherwise: their tests cover them on CPU.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

if os.environ.get("TRITON_INTERPRET") == "1":  # read when kernels are decorated, as triton does

    @triton.jit
    def wait_for_previous(PDL: tl.constexpr):
        """Interpreted: the previous kernel has finished before this one starts."""
        pass

else:

    @triton.jit
    def wait_for_previous(PDL: tl.constexpr):
        """With PDL: wait for the previous kernel's writes, then let the next kernel launch."""
        if PDL:
            tl.extra.cuda.gdc_wait()
            # The next kernel's programs start once every program here has passed this point;
            # they then wait for all of this kernel in turn, so signalling this early is safe.
            tl.extra.cuda.gdc_launch_dependents()


def launch_options(pdl: bool) -> dict[str, bool]:
    """The launch keyword that asks for PDL; none at all without it, so a launch that does not
    take PDL is the same call on any Triton, whichever launch options it knows."""
    return {"launch_pdl": True} if pdl else {}


def supported(device: str) -> bool:
    """PDL needs a Hopper or newer GPU; the wait instruction does not exist before sm_90."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(torch.device(device))[0] >= 9

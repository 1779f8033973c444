"""Attention backends behind one interface; the torch reference is the CPU path and the oracle."""
from __future__ import annotations

from engine.attention import cpu_kernel
from engine.attention.base import AttentionBackend
from engine.attention.cpu_backend import CpuAttentionBackend
from engine.attention.metadata import AttentionMetadata, RelativePositionBias
from engine.attention.ref import TorchAttentionBackend


def get_backend(device: str, name: str | None = None, pdl: bool = False) -> AttentionBackend:
    """By default the fused Triton backend on CUDA; on CPU the compiled decode kernel over the
    torch reference where it builds, else the reference alone. `name` picks one explicitly.
    `pdl`: the Triton decode kernels take programmatic dependent launch."""
    if name == "torch":
        return TorchAttentionBackend()
    if name == "cpu" or (name is None and not device.startswith("cuda")):
        lib = cpu_kernel.load()
        if lib is None:
            if name == "cpu":
                raise RuntimeError("the CPU attention kernel did not build (no C compiler, or it failed)")
            return TorchAttentionBackend()
        return CpuAttentionBackend(lib)
    from engine.attention.triton_backend import TritonAttentionBackend  # needs triton + a GPU

    return TritonAttentionBackend(pdl=pdl)


__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "CpuAttentionBackend",
    "RelativePositionBias",
    "TorchAttentionBackend",
    "get_backend",
]

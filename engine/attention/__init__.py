"""Attention backends behind one interface; the torch reference is the CPU path and the oracle."""
from __future__ import annotations

from engine.attention.base import AttentionBackend
from engine.attention.metadata import AttentionMetadata, RelativePositionBias
from engine.attention.ref import TorchAttentionBackend


def get_backend(device: str, name: str | None = None) -> AttentionBackend:
    """The fused Triton backend on CUDA, the torch reference elsewhere (or when asked by name)."""
    if name == "torch" or (name is None and not device.startswith("cuda")):
        return TorchAttentionBackend()
    from engine.attention.triton_backend import TritonAttentionBackend  # needs triton + a GPU

    return TritonAttentionBackend()


__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "RelativePositionBias",
    "TorchAttentionBackend",
    "get_backend",
]

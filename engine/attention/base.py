"""The attention-backend interface: the torch reference and the fused kernels share it."""
from __future__ import annotations

from typing import Protocol

import torch

from engine.attention.metadata import AttentionMetadata, AttentionVariant, RelativePositionBias


class AttentionBackend(Protocol):
    """Three operations cover every model family.

    Shapes: q (T, num_heads, head_dim); k, v (T, num_kv_heads, head_dim); caches
    (num_blocks, block_size, num_kv_heads, head_dim). num_heads is a multiple of num_kv_heads
    (grouped-query attention); backends must not require K/V repeated per query head.
    `variant`: the layer's sliding window and score soft-cap, if it has either.
    """

    name: str

    def store_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        """Write row t of key/value into flat cache slot slot_mapping[t]."""
        ...

    def paged_attention(
        self,
        query: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        bias: RelativePositionBias | None = None,
        variant: AttentionVariant | None = None,
    ) -> torch.Tensor:
        """Attention of the new queries over each sequence's cached keys (new ones included)."""
        ...

    def varlen_attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        bias: RelativePositionBias | None = None,
        variant: AttentionVariant | None = None,
    ) -> torch.Tensor:
        """Attention within each sequence's own new tokens, no cache (encoders, full prompts)."""
        ...

"""What a model's forward needs besides its inputs: passed as an argument, never global."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention.base import AttentionBackend
from engine.attention.metadata import AttentionMetadata, AttentionVariant, RelativePositionBias
from engine.lora_batch import LoRABatch


@dataclass
class ForwardContext:
    """Attention metadata, the backend and (optionally) this step's KV cache per layer.

    Models call `attend(layer_idx, q, k, v, scale)` and never touch caches themselves: with
    `kv_caches` the new K/V are written to their slots and attention reads the blocks; without
    (encoders, tests of a whole sequence) attention runs within the new tokens only.
    """

    meta: AttentionMetadata
    backend: AttentionBackend
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    # the step's LoRA rows and adapters (engine/lora_batch.py); None: no row runs one
    lora: LoRABatch | None = None

    def attend(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        bias: RelativePositionBias | None = None,
        variant: AttentionVariant | None = None,
    ) -> torch.Tensor:
        if self.kv_caches is None:
            return self.backend.varlen_attention(q, k, v, self.meta, scale, bias, variant)
        k_cache, v_cache = self.kv_caches[layer_idx]
        if self.meta.slot_mapping is not None:
            self.backend.store_kv(k, v, k_cache, v_cache, self.meta.slot_mapping)
        return self.backend.paged_attention(q, k_cache, v_cache, self.meta, scale, bias, variant)

    def write_target(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(k_cache, v_cache, slot_mapping) where this step writes its new K/V into layer_idx's
        cache, for a fused op that stores them itself before `attend_stored`; else None."""
        if self.kv_caches is None or self.meta.slot_mapping is None:
            return None
        return (*self.kv_caches[layer_idx], self.meta.slot_mapping)

    def attend_stored(
        self, layer_idx: int, q: torch.Tensor, scale: float, variant: AttentionVariant | None = None,
    ) -> torch.Tensor:
        """Attention of q over layer_idx's cache, the step's new K/V already in it."""
        assert self.kv_caches is not None
        k_cache, v_cache = self.kv_caches[layer_idx]
        return self.backend.paged_attention(q, k_cache, v_cache, self.meta, scale, variant=variant)

    def attend_cross(self, layer_idx: int, q: torch.Tensor, scale: float) -> torch.Tensor:
        """Cross-attention: new decoder queries over encoder K/V already in this layer's cache.

        Writes nothing (cross K/V are stored once per request); `meta.seq_lens` are encoder lengths.
        """
        assert not self.meta.causal
        return self.attend_stored(layer_idx, q, scale)


def metadata_for_sequences(
    seq_lens: list[int], causal: bool = True, device: torch.device | str = "cpu"
) -> AttentionMetadata:
    """Metadata for whole sequences with no cache (encoders, and tests of a model alone)."""
    cu = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(seq_lens, dtype=torch.int32).cumsum(0)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return AttentionMetadata(
        cu_seqlens_q=cu.to(device),
        seq_lens=lens.to(device),
        slot_mapping=None,
        block_tables=None,
        max_seqlen_q=max(seq_lens),
        max_seqlen_k=max(seq_lens),
        query_lens=tuple(seq_lens),
        seq_lens_host=tuple(seq_lens),
        causal=causal,
    )

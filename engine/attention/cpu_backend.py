"""CPU backend: the torch reference, with decode rows handed to the compiled kernel.

Decode attention is memory-bound: the reference gathers each sequence's blocks into a buffer and
runs SDPA over it (K and V cross memory three times, and SDPA's CPU kernel is built for long
queries). The kernel reads every K and V row once, in place. Rows with several queries (prefill
chunks, whole prompts, encoders) and T5's position bias stay on the reference, which is also the
oracle the kernel is tested against.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from engine.attention import cpu_kernel
from engine.attention.metadata import AttentionMetadata, AttentionVariant, RelativePositionBias, StepCache
from engine.attention.ref import TorchAttentionBackend


@dataclass(frozen=True)
class _DecodePlan:
    rows: torch.Tensor  # (B,) int64: q row of each one-query sequence
    tables: torch.Tensor  # (B, max_blocks) int32, contiguous
    seq_lens: torch.Tensor  # (B,) int32
    only_decodes: bool  # every sequence of the step has one query: nothing left for the reference


def _build_decode_plan(meta: AttentionMetadata) -> _DecodePlan | None:
    seqs = [i for i, n in enumerate(meta.query_lens) if n == 1]
    if not seqs or meta.block_tables is None:
        return None
    idx = torch.tensor(seqs, dtype=torch.long)
    return _DecodePlan(
        rows=meta.cu_seqlens_q.cpu().long()[idx].contiguous(),
        tables=meta.block_tables.cpu()[idx].to(torch.int32).contiguous(),
        seq_lens=torch.tensor([meta.seq_lens_host[i] for i in seqs], dtype=torch.int32),
        only_decodes=len(seqs) == meta.num_seqs,
    )


class CpuAttentionBackend(TorchAttentionBackend):
    """Same signatures as the reference (engine.attention.base); decode rows run the C kernel."""

    name = "cpu"

    def __init__(self, lib: ctypes.CDLL) -> None:
        super().__init__()
        self._lib = lib
        self._decode_plans: StepCache[_DecodePlan | None] = StepCache()  # one per step's metadata

    def _decode_plan(self, meta: AttentionMetadata) -> _DecodePlan | None:
        return self._decode_plans.get(meta, (), lambda: _build_decode_plan(meta))

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
        plan = self._decode_plan(meta) if bias is None and cpu_kernel.supports(query, k_cache) else None
        if plan is None:
            return super().paged_attention(query, k_cache, v_cache, meta, scale, bias, variant)
        out = torch.empty(query.shape, dtype=query.dtype)
        cpu_kernel.paged_decode_attention(
            self._lib, out, query, k_cache, v_cache, plan.rows, plan.tables, plan.seq_lens, scale, variant
        )
        if not plan.only_decodes:
            self._attend_paged(query, k_cache, v_cache, meta, scale, None, out, with_decodes=False, variant=variant)
        return out

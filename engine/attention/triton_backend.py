"""Fused Triton attention backend: same signatures as the torch reference (engine.attention.ref).

Routing: sequences with one new token (decodes) run the paged decode kernel, split-K when the
context is long and the grid alone would not fill the GPU; sequences with several (prompts,
prefill chunks, encoders, cross-attention prefills) run the FlashAttention prefill kernel, which
also reads earlier context through the block tables. A step mixing both launches each kernel on
its own sequences (by index lists), so decodes next to a long chunk still get split-K.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention import triton_kernels as kernels
from engine.attention.metadata import AttentionMetadata, AttentionVariant, RelativePositionBias, StepCache
from engine.host_copy import to_device


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@dataclass(frozen=True)
class _Rows:
    """One kernel's share of a step: which sequences, how many, and the longest of them."""

    seq_ids: torch.Tensor | None  # int32 indices into the metadata; None: all sequences
    num_seqs: int
    max_seqlen_q: int
    max_seqlen_k: int


def _rows(meta: AttentionMetadata, picked: list[int], device: torch.device) -> _Rows:
    everyone = len(picked) == meta.num_seqs
    ids = None if everyone else to_device(picked, device, torch.int32)
    return _Rows(
        ids, len(picked),
        max((meta.query_lens[i] for i in picked), default=0),
        max((meta.seq_lens_host[i] for i in picked), default=0),
    )


def _variant_args(variant: AttentionVariant | None, causal: bool) -> dict:
    """The kernels' window/softcap arguments (0: none) for a layer's variant: `window` is the
    causal window, or without causality the local radius."""
    if variant is None:
        return {}
    variant.check(causal)
    return {"window": variant.window or variant.radius or 0, "softcap": variant.softcap or 0.0}


class TritonAttentionBackend:
    """Attention through engine.attention.triton_kernels. See engine.attention.base for shapes.

    On CPU tensors it runs only under TRITON_INTERPRET=1 (the tests). `split_k`: None picks the split-K decode path by a heuristic, True always
    splits contexts longer than `partition_size`, False never does. `pdl`: decode kernels launch
    with programmatic dependent launch (engine/fused/pdl.py).
    """

    name = "triton"

    def __init__(
        self,
        split_k: bool | None = None,
        partition_size: int = 512,
        block_m: int = 64,
        block_n: int = 64,
        pdl: bool = False,
    ) -> None:
        self.split_k = split_k
        self.pdl = pdl
        self.partition_size = partition_size
        self.block_m = block_m
        self.block_n = block_n
        self._num_sms: int | None = None
        # Decode/prefill split of a step's sequences: built once per step, reused by every layer.
        self._plans: StepCache[tuple[_Rows, _Rows]] = StepCache()
        # T5 bias tables, keyed by the weight's identity (kept alive by the entry) and radius;
        # a table serves every layer and step until the context outgrows it. Never evicted: a
        # captured graph reads the table it was captured with, and there are at most a model's
        # bias weights (two in T5) times log2 of its longest context.
        self._bias_tables: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def store_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        kernels.store_kv(key, value, k_cache, v_cache, slot_mapping)

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
        assert meta.block_tables is not None
        out = torch.empty_like(query)
        mods = _variant_args(variant, meta.causal)
        table = self._bias_table(bias, meta)
        decode, prefill = self._plan(meta, query.device)
        if decode.num_seqs:
            split = self._use_split(decode.num_seqs, decode.max_seqlen_k, k_cache.shape[2], query.device)
            kernels.decode_attention(
                query, k_cache, v_cache, out, meta.cu_seqlens_q, meta.seq_lens, meta.block_tables,
                decode.num_seqs, decode.max_seqlen_k, scale, bias=table, seq_ids=decode.seq_ids,
                split=split, partition_size=self.partition_size, block_n=self.block_n, pdl=self.pdl, **mods,
            )
        if prefill.num_seqs:
            kernels.prefill_attention(
                query, k_cache, v_cache, out, meta.cu_seqlens_q, meta.seq_lens, meta.block_tables,
                prefill.num_seqs, prefill.max_seqlen_q, scale, meta.causal, bias=table,
                seq_ids=prefill.seq_ids, block_m=self.block_m, block_n=self.block_n, **mods,
            )
        return out

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
        out = torch.empty_like(query)
        kernels.prefill_attention(
            query, key, value, out, meta.cu_seqlens_q, None, None,
            meta.num_seqs, meta.max_seqlen_q, scale, meta.causal, bias=self._bias_table(bias, meta),
            block_m=self.block_m, block_n=self.block_n, **_variant_args(variant, meta.causal),
        )
        return out

    def _plan(self, meta: AttentionMetadata, device: torch.device) -> tuple[_Rows, _Rows]:
        # A loop over sequences (not tokens) on the host tuples; sequences with no new token
        # (none in practice) go nowhere and their (empty) rows stay untouched.
        return self._plans.get(meta, (), lambda: (
            _rows(meta, [i for i, n in enumerate(meta.query_lens) if n == 1], device),
            _rows(meta, [i for i, n in enumerate(meta.query_lens) if n > 1], device),
        ))

    def _use_split(self, num_seqs: int, max_seqlen_k: int, num_kv_heads: int, device: torch.device) -> bool:
        if max_seqlen_k <= self.partition_size or self.split_k is False:
            return False
        if self.split_k:
            return True
        # Without splitting the grid is (sequences x KV heads); split when that leaves SMs idle,
        # or when contexts are so long that one program per head would serialise too much.
        return num_seqs * num_kv_heads < 2 * self._sm_count(device) or max_seqlen_k > 8192

    def _sm_count(self, device: torch.device) -> int:
        if self._num_sms is None:
            is_cuda = device.type == "cuda"
            self._num_sms = torch.cuda.get_device_properties(device).multi_processor_count if is_cuda else 128
        return self._num_sms

    def _bias_table(self, bias: RelativePositionBias | None, meta: AttentionMetadata) -> torch.Tensor | None:
        if bias is None:
            return None
        # A power of two, so a growing context rebuilds the table only log-many times.
        radius = _next_power_of_2(max(meta.max_seqlen_q, meta.max_seqlen_k, 1))
        key = (id(bias.weight), radius)
        hit = self._bias_tables.get(key)
        if hit is not None and hit[0] is bias.weight:
            return hit[1]
        table = kernels.bias_table(bias.weight, bias.bidirectional, bias.num_buckets, bias.max_distance, radius)
        self._bias_tables[key] = (bias.weight, table)
        return table

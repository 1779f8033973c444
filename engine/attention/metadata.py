"""Per-step attention metadata for a flat, unpadded batch of sequences."""
from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class AttentionMetadata:
    """Describes one forward step over B sequences whose new tokens are concatenated.

    Sequence i contributes `query_lens[i]` new tokens (rows `cu_seqlens_q[i]:cu_seqlens_q[i+1]`
    of q) and attends to `seq_lens[i]` keys in total: the ones already in its cache blocks plus
    the new ones (stored by `store_kv` before attention runs). With `causal`, new token j of
    sequence i sits at position `seq_lens[i] - query_lens[i] + j` and sees keys up to it.
    Without `causal` (encoders, cross-attention) every query sees all `seq_lens[i]` keys.
    """

    cu_seqlens_q: torch.Tensor  # (B+1,) int32, prefix sums of query_lens
    seq_lens: torch.Tensor  # (B,) int32, keys per sequence after this step
    slot_mapping: torch.Tensor | None  # (T,) int64, cache slot of each new token; None: write nothing
    block_tables: torch.Tensor | None  # (B, max_blocks) int32, padded with 0 past each table's end
    max_seqlen_q: int
    max_seqlen_k: int
    query_lens: tuple[int, ...]  # host copies: the reference backend loops over sequences
    seq_lens_host: tuple[int, ...]
    causal: bool = True

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def is_pure_decode(self) -> bool:
        return self.max_seqlen_q == 1


@dataclass(frozen=True)
class RelativePositionBias:
    """T5-style learned bias added to attention scores, a function of (key pos - query pos).

    `weight` is the (num_buckets, num_heads) embedding; positions come from the metadata, so
    backends compute buckets themselves instead of materialising a (q, k) bias per sequence.
    """

    weight: torch.Tensor
    bidirectional: bool
    num_buckets: int
    max_distance: int


@dataclass(frozen=True)
class AttentionVariant:
    """One layer's changes to plain softmax attention, as HF's attention functions take them.

    `window`: a query at position p sees keys p - window + 1 .. p only (HF's sliding_window:
    Mistral, Gemma 2/3's local layers); causal attention only. `radius`: a query at p sees keys
    p - radius .. p + radius (ModernBERT's local layers); bidirectional attention only.
    `softcap`: scores (already scaled) become softcap * tanh(score / softcap) before the softmax
    (Gemma 2). A layer holds one for its lifetime, so kernels specialise on it and a captured
    graph keeps it.
    """

    window: int | None = None
    softcap: float | None = None
    radius: int | None = None

    def __post_init__(self) -> None:
        if self.window is not None and self.window < 1:
            raise ValueError(f"sliding window must be >= 1, got {self.window}")
        if self.radius is not None and (self.radius < 1 or self.window is not None):
            raise ValueError(f"radius must be >= 1 and exclusive with window, got {self.radius}")
        if self.softcap is not None and not self.softcap > 0:
            raise ValueError(f"softcap must be > 0, got {self.softcap}")

    def check(self, causal: bool) -> None:
        """A window narrows causal attention only, a radius bidirectional attention only."""
        if self.window is not None and not causal:
            raise ValueError("a sliding window applies to causal attention only")
        if self.radius is not None and causal:
            raise ValueError("a local radius applies to bidirectional attention only")


class StepCache(Generic[T]):
    """Values derived from one step's metadata (index plans), built once and reused by every layer.

    Keyed by the metadata's identity plus `extra`: the entry holds the metadata, so its id cannot be
    reused while the entry stands. A step has one or two metadata (self- and cross-attention); once
    `limit` entries exist they belong to older steps and are dropped together.
    """

    def __init__(self, limit: int = 4) -> None:
        self._limit = limit
        self._entries: dict[tuple, tuple[AttentionMetadata, T]] = {}

    def get(self, meta: AttentionMetadata, extra: tuple[Hashable, ...], build: Callable[[], T]) -> T:
        key = (id(meta), *extra)
        hit = self._entries.get(key)
        if hit is not None and hit[0] is meta:
            return hit[1]
        value = build()
        if len(self._entries) >= self._limit:
            self._entries.clear()
        self._entries[key] = (meta, value)
        return value

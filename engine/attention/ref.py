"""Pure-torch attention backend: the CPU path and the oracle every fused kernel is tested against.

Vectorised rather than per-token: decode rows (one query each) run as one batched SDPA over
their gathered blocks; rows with several queries (prefill chunks, encoders) run as one padded
SDPA among themselves, so a long prefill never pads the decode rows.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from engine.attention.metadata import AttentionMetadata, RelativePositionBias


def t5_relative_buckets(
    relative_position: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """Map (key pos - query pos) to T5's log-spaced buckets, exactly as HF's T5Attention does."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        relative_position = relative_position.abs()
    else:
        relative_position = -torch.clamp(relative_position, max=0)
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    large = max_exact + (
        torch.log(relative_position.float() / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(is_small, relative_position, large)


def _bias_values(bias: RelativePositionBias, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """(B, Q) query positions and (B, K) key positions -> (B, H, Q, K) additive bias."""
    rel = k_pos[:, None, :] - q_pos[:, :, None]
    buckets = t5_relative_buckets(rel, bias.bidirectional, bias.num_buckets, bias.max_distance)
    return bias.weight[buckets].permute(0, 3, 1, 2)


def _sdpa(
    q: torch.Tensor,  # (B, Q, Hq, D)
    k: torch.Tensor,  # (B, K, Hk, D)
    v: torch.Tensor,
    visible: torch.Tensor,  # (B, Q, K) bool
    scale: float,
    bias: torch.Tensor | None,  # (B, H, Q, K)
) -> torch.Tensor:
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    mask: torch.Tensor = visible[:, None]
    if bias is not None:
        mask = bias.to(q.dtype).masked_fill(~mask, float("-inf"))
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
    return out.transpose(1, 2)  # (B, Q, Hq, D)


def _pad_rows(x: torch.Tensor, cu: torch.Tensor, lens: torch.Tensor, max_len: int) -> torch.Tensor:
    """Flat (T, ...) rows of B sequences -> (B, max_len, ...) zero-padded."""
    b = lens.shape[0]
    out = x.new_zeros((b, max_len) + tuple(x.shape[1:]))
    idx = torch.arange(max_len, device=x.device)
    valid = idx[None, :] < lens[:, None]
    out[valid] = x[(cu[:-1, None] + idx[None, :])[valid]]
    return out


def _unpad_rows(x: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    idx = torch.arange(x.shape[1], device=x.device)
    return x[idx[None, :] < lens[:, None]]


def _visibility(q_lens: torch.Tensor, k_lens: torch.Tensor, max_q: int, max_k: int, causal: bool):
    """Bool (B, max_q, max_k) mask and the query/key positions it was built from."""
    dev = q_lens.device
    r = torch.arange(max_q, device=dev)
    q_pos = (k_lens - q_lens)[:, None] + r[None, :]  # (B, Q): absolute position of each query
    k_pos = torch.arange(max_k, device=dev)[None, :].expand(q_lens.shape[0], -1)
    visible = k_pos[:, None, :] < k_lens[:, None, None]
    if causal:
        visible = visible & (k_pos[:, None, :] <= q_pos[:, :, None])
    # Padded query rows would be fully masked (NaN in SDPA): let them see key 0; they are dropped.
    visible = visible | (r[None, :, None] >= q_lens[:, None, None]) & (k_pos[:, None, :] == 0)
    return visible, q_pos, k_pos


class TorchAttentionBackend:
    """Reference backend. Same signatures as the Triton backend (see engine.attention.base)."""

    name = "torch"

    def store_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        num_kv_heads, head_dim = k_cache.shape[-2:]
        k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
        v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value.to(v_cache.dtype))

    def paged_attention(
        self,
        query: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        bias: RelativePositionBias | None = None,
    ) -> torch.Tensor:
        assert meta.block_tables is not None
        out = torch.empty_like(query)
        q_lens = torch.tensor(meta.query_lens, device=query.device)
        k_lens = torch.tensor(meta.seq_lens_host, device=query.device)
        cu = meta.cu_seqlens_q.to(query.device).long()
        block_size = k_cache.shape[1]
        is_decode = q_lens == 1
        for rows in (is_decode.nonzero().flatten(), (~is_decode).nonzero().flatten()):
            if rows.numel() == 0:
                continue
            max_q = int(q_lens[rows].max())
            max_k = int(k_lens[rows].max())
            num_blocks = (max_k + block_size - 1) // block_size
            tables = meta.block_tables[rows, :num_blocks].long()
            k = k_cache[tables].flatten(1, 2)[:, :max_k]  # (b, K, Hk, D)
            v = v_cache[tables].flatten(1, 2)[:, :max_k]
            rq = q_lens[rows]
            sub_cu = torch.cat([rq.new_zeros(1), rq.cumsum(0)])
            # flat row of every query of these sequences, in order, without a Python loop
            starts = torch.repeat_interleave(cu[rows] - sub_cu[:-1], rq)
            flat_idx = starts + torch.arange(int(sub_cu[-1]), device=query.device)
            q = _pad_rows(query[flat_idx], sub_cu, q_lens[rows], max_q)
            visible, q_pos, k_pos = _visibility(q_lens[rows], k_lens[rows], max_q, max_k, meta.causal)
            b = _bias_values(bias, q_pos, k_pos) if bias is not None else None
            o = _sdpa(q, k, v, visible, scale, b)
            out[flat_idx] = _unpad_rows(o, q_lens[rows])
        return out

    def varlen_attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        bias: RelativePositionBias | None = None,
    ) -> torch.Tensor:
        lens = torch.tensor(meta.query_lens, device=query.device)
        cu = meta.cu_seqlens_q.to(query.device).long()
        m = meta.max_seqlen_q
        q, k, v = (_pad_rows(x, cu, lens, m) for x in (query, key, value))
        visible, q_pos, k_pos = _visibility(lens, lens, m, m, meta.causal)
        b = _bias_values(bias, q_pos, k_pos) if bias is not None else None
        return _unpad_rows(_sdpa(q, k, v, visible, scale, b), lens)

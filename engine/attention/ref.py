"""Pure-torch attention backend: the CPU path and the oracle every fused kernel is tested against.

Vectorised rather than per-token: decode rows (one query each) run as one batched SDPA over
their gathered blocks; rows with several queries (prefill chunks, encoders) run as one padded
SDPA among themselves, so a long prefill never pads the decode rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.attention.metadata import AttentionMetadata, AttentionVariant, RelativePositionBias, StepCache
from engine.workspace import Workspace


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
    visible: torch.Tensor | None,  # (B, Q, K) bool; None: every key is visible
    scale: float,
    bias: torch.Tensor | None,  # (B, H, Q, K)
    is_causal: bool = False,  # instead of `visible`: query i sees keys 0..i (Q == K, no bias)
    softcap: float | None = None,
) -> torch.Tensor:
    if softcap is not None:
        return _capped_attention(q, k, v, visible, scale, bias, is_causal, softcap)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    mask = None if visible is None else visible[:, None]
    if bias is not None:
        mask = bias.to(q.dtype) if mask is None else bias.to(q.dtype).masked_fill(~mask, float("-inf"))
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, is_causal=is_causal, enable_gqa=q.shape[1] != k.shape[1]
    )
    return out.transpose(1, 2)  # (B, Q, Hq, D)


def _capped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor | None, scale: float,
    bias: torch.Tensor | None, is_causal: bool, softcap: float,
) -> torch.Tensor:
    """`_sdpa` with scores soft-capped before the mask, in HF's eager order (Gemma 2): SDPA has no
    hook between the product and the softmax."""
    group = q.shape[2] // k.shape[2]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, L, D)
    if group > 1:
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = q @ k.transpose(-1, -2) * scale
    s = torch.tanh(s / softcap) * softcap
    if bias is not None:
        s = s + bias.to(s.dtype)
    if is_causal:
        visible = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril()[None]
    if visible is not None:
        s = s.masked_fill(~visible[:, None], float("-inf"))
    p = torch.softmax(s, -1, dtype=torch.float32).to(q.dtype)
    return (p @ v).transpose(1, 2)


def _narrowed(group: _Group, variant: AttentionVariant) -> torch.Tensor | None:
    """The group's mask with the keys the variant hides hidden: more than `window - 1` before each
    query (a sliding window), or more than `radius` away on either side (bidirectional local
    attention). None when it hides nothing (no two positions that far apart); padded query rows
    keep their own mask."""
    if variant.window is not None and group.k_len > variant.window:
        near = group.k_pos[:, None, :] > group.q_pos[:, :, None] - variant.window
    elif variant.radius is not None and group.k_len > variant.radius + 1:
        near = (group.k_pos[:, None, :] - group.q_pos[:, :, None]).abs() <= variant.radius
    else:
        return None
    return group.visible & (near | ~group.valid[:, :, None])


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


@dataclass(frozen=True)
class _Group:
    """Index work for one group of sequences, shared by every layer of a step."""

    flat_idx: torch.Tensor  # (n,) rows of q (and of the output) belonging to the group, in order
    valid: torch.Tensor  # (b, max_q) bool: which padded query slots hold a real row
    # (n,) where each of those rows sits in the flattened (b * max_q) padded layout: integer
    # index_copy/index_select run multi-threaded, boolean-mask indexing does not
    pad_idx: torch.Tensor
    # flat_idx is start..end-1: the group's rows are one slice of q, in order (encoder batches)
    span: tuple[int, int] | None
    dense: bool  # no padded slot (equal query lengths): padding is a gather, or with `span` a view
    tables: torch.Tensor | None  # (b, num_blocks) block ids (paged) or None (varlen)
    k_len: int
    visible: torch.Tensor  # (b, max_q, max_k) bool
    q_pos: torch.Tensor
    k_pos: torch.Tensor
    # one whole causal prompt (queries == keys): SDPA's is_causal skips the masked half, no mask
    causal_square: bool = False
    # every query sees every key (decodes of equal length, beams, equal-length encoder rows):
    # SDPA needs no mask to read
    sees_all: bool = False
    # one sequence whose blocks are consecutive in the cache (a lone request, fresh pool): its
    # K/V are a view of the cache from this block on, no gather
    first_block: int | None = None


def _group(
    rows: torch.Tensor, q_lens: torch.Tensor, k_lens: torch.Tensor, cu: torch.Tensor, causal: bool
) -> tuple[torch.Tensor, torch.Tensor, int, int, torch.Tensor, tuple]:
    rq = q_lens[rows]
    max_q, max_k = int(rq.max()), int(k_lens[rows].max())
    sub_cu = torch.cat([rq.new_zeros(1), rq.cumsum(0)])
    # flat row of every query of these sequences, in order, without a Python loop
    flat_idx = torch.repeat_interleave(cu[rows] - sub_cu[:-1], rq) + torch.arange(int(sub_cu[-1]), device=cu.device)
    valid = torch.arange(max_q, device=cu.device)[None, :] < rq[:, None]
    return flat_idx, valid, max_q, max_k, rq, _visibility(rq, k_lens[rows], max_q, max_k, causal)


def _length_buckets(rows: list[int], lengths: tuple[int, ...], slack: float = 1.25,
                    min_size: int = 8) -> list[list[int]]:
    """Rows sorted by key length and cut where a bucket's longest would exceed `slack` times its
    shortest: decodes of a 60-token and a 700-token sequence then do not both gather and attend
    over 700 keys (padding was a third of a large decode batch's attention time). Buckets keep
    at least `min_size` rows, so a ragged batch does not become one attention call per row."""
    buckets: list[list[int]] = []
    for r in sorted(rows, key=lengths.__getitem__):
        if buckets and (len(buckets[-1]) < min_size or lengths[r] <= slack * lengths[buckets[-1][0]]):
            buckets[-1].append(r)
        else:
            buckets.append([r])
    return buckets


def _split_by_bytes(rows: list[int], lengths: tuple[int, ...], token_bytes: int,
                    budget: int = 3 << 20) -> list[list[int]]:
    """Cut rows sorted by key length into runs whose gathered K (rows x longest x token_bytes)
    stays within `budget`: the gather then leaves K and V in the CPU's cache for SDPA to read.
    Decode attention is memory-bound; at 64 sequences of 512 tokens (SmolLM2) runs of 8
    took 30 % less time than one call over 50 MB of K/V that had gone out to DRAM and back."""
    runs: list[list[int]] = []
    for r in rows:
        if runs and (len(runs[-1]) + 1) * lengths[r] * token_bytes <= budget:
            runs[-1].append(r)
        else:
            runs.append([r])
    return runs


def _pad(x: torch.Tensor, group: _Group) -> torch.Tensor:
    """Group rows of flat x -> (b, max_q, ...) zero-padded."""
    b, max_q = group.valid.shape
    shape = (b, max_q) + tuple(x.shape[1:])
    rows = x[group.span[0]:group.span[1]] if group.span is not None else None
    if group.dense:  # nothing to pad: a view of a slice (any row stride), else one gather
        return (rows if rows is not None else x.index_select(0, group.flat_idx)).view(shape)
    out = x.new_zeros((b * max_q,) + tuple(x.shape[1:]))
    out.index_copy_(0, group.pad_idx, rows if rows is not None else x.index_select(0, group.flat_idx))
    return out.view(shape)


def _unpad(o: torch.Tensor, group: _Group, out: torch.Tensor | None) -> torch.Tensor:
    """(b, max_q, ...) attention output -> the group's rows, written into flat `out`."""
    rows = o.reshape((-1,) + tuple(o.shape[2:]))
    if not group.dense:
        rows = rows.index_select(0, group.pad_idx)
    if out is None:
        return rows
    if group.span is not None:
        out[group.span[0]:group.span[1]] = rows
        return out
    return out.index_copy_(0, group.flat_idx, rows)


def _equal_length_runs(lengths: tuple[int, ...]) -> list[list[int]]:
    """Consecutive rows of equal length, one run each. For a batch sorted by length (offline
    embeddings) every run is a slice of q with no padding: attention reads views, needs no mask."""
    runs: list[list[int]] = []
    for i, n in enumerate(lengths):
        if runs and lengths[runs[-1][0]] == n:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def _mask(g: _Group, may_be_causal: bool, causal: bool, variant: AttentionVariant | None,
          ) -> tuple[torch.Tensor | None, bool]:
    """(mask, is_causal) for `_sdpa`: none where every query sees every key, SDPA's own causal
    square where that is the mask, else the group's, narrowed by a window or radius."""
    if variant is not None:
        variant.check(causal)
        narrowed = _narrowed(g, variant)
        if narrowed is not None:
            return narrowed, False
    if may_be_causal and g.causal_square:
        return None, True
    return (None if g.sees_all else g.visible), False


def _softcap(variant: AttentionVariant | None) -> float | None:
    return None if variant is None else variant.softcap


class TorchAttentionBackend:
    """Reference backend. Same signatures as the Triton backend (see engine.attention.base)."""

    name = "torch"

    def __init__(self) -> None:
        # Index work depends only on the step's metadata: build it once, reuse it in every layer.
        self._plans: StepCache[list[_Group]] = StepCache()
        # Gathered K and V blocks land in buffers reused by every layer and step. A fresh tensor
        # of tens of MB is a fresh mmap on CPU: zeroing its pages cost 8x the copy itself.
        self._gather_buffers = (Workspace(), Workspace())

    def _gather(self, cache: torch.Tensor, group: _Group, which: int) -> torch.Tensor:
        """cache[group.tables] as (b, blocks * block_size, kv_heads, head_dim): a view of the cache
        when the group's one table is consecutive blocks, else gathered into a reused buffer."""
        tables = group.tables
        assert tables is not None
        tokens = (tables.shape[0], -1) + tuple(cache.shape[2:])
        if group.first_block is not None:
            return cache[group.first_block : group.first_block + tables.shape[1]].view(tokens)
        out = self._gather_buffers[which].take((tables.numel(),) + tuple(cache.shape[1:]), cache.dtype, cache.device)
        torch.index_select(cache, 0, tables.flatten(), out=out)
        return out.view(tokens)

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

    def _plan_groups(
        self, meta: AttentionMetadata, device: torch.device, block_size: int | None, token_bytes: int = 0,
        with_decodes: bool = True,
    ) -> list[_Group]:
        return self._plans.get(meta, (block_size or 0, token_bytes, with_decodes),
                               lambda: self._build_groups(meta, device, block_size, token_bytes, with_decodes))

    def _build_groups(
        self, meta: AttentionMetadata, device: torch.device, block_size: int | None, token_bytes: int,
        with_decodes: bool,
    ) -> list[_Group]:
        paged = block_size is not None
        q_lens = torch.tensor(meta.query_lens, device=device)
        k_lens = torch.tensor(meta.seq_lens_host if paged else meta.query_lens, device=device)
        cu = meta.cu_seqlens_q.to(device).long()
        if paged:  # decode rows apart, so one long prefill never pads them; and by length
            decode = [i for i, n in enumerate(meta.query_lens) if n == 1] if with_decodes else []
            # Each prefill chunk alone: padding chunks of 30 and 500 tokens to one (500, 500)
            # masked square per row cost 2-4x the same chunks attended one by one.
            chunks = [[i] for i, n in enumerate(meta.query_lens) if n != 1]
            lens = meta.seq_lens_host
            if token_bytes and device.type == "cpu":
                decodes = [run for b in _length_buckets(decode, lens) for run in _split_by_bytes(b, lens, token_bytes)]
            else:
                decodes = _length_buckets(decode, lens)
            splits = [torch.tensor(rows, dtype=torch.long, device=device) for rows in (*decodes, *chunks)]
        else:  # varlen (encoders, whole prompts): by length too, so a FIFO batch pads little
            lens = meta.query_lens
            is_sorted = all(a <= b for a, b in zip(lens, lens[1:]))
            buckets = _equal_length_runs(lens) if is_sorted else _length_buckets(list(range(len(lens))), lens)
            splits = [torch.tensor(rows, dtype=torch.long, device=device) for rows in buckets]
        groups = []
        for rows in splits:
            if rows.numel() == 0:
                continue
            flat_idx, valid, _, max_k, _, (visible, q_pos, k_pos) = _group(rows, q_lens, k_lens, cu, meta.causal)
            tables = None
            if paged:
                assert meta.block_tables is not None
                tables = meta.block_tables[rows, : (max_k + block_size - 1) // block_size].long()
            pad_idx = valid.flatten().nonzero().flatten()
            start = int(flat_idx[0]) if flat_idx.numel() else 0
            is_slice = bool(torch.equal(flat_idx, torch.arange(start, start + flat_idx.numel(), device=device)))
            span = (start, start + flat_idx.numel()) if is_slice else None
            dense = pad_idx.numel() == valid.numel()
            square = meta.causal and rows.numel() == 1 and valid.shape[1] == max_k
            first = None
            if tables is not None and tables.shape[0] == 1:
                t0 = int(tables[0, 0])
                if torch.equal(tables[0], torch.arange(t0, t0 + tables.shape[1], device=tables.device)):
                    first = t0
            groups.append(_Group(flat_idx, valid, pad_idx, span, dense, tables, max_k, visible, q_pos, k_pos, square,
                                 sees_all=bool(visible.all()), first_block=first))
        return groups

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
        return self._attend_paged(query, k_cache, v_cache, meta, scale, bias, torch.empty_like(query),
                                  variant=variant)

    def _attend_paged(
        self,
        query: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        bias: RelativePositionBias | None,
        out: torch.Tensor,
        with_decodes: bool = True,
        variant: AttentionVariant | None = None,
    ) -> torch.Tensor:
        """paged_attention into `out`; without `with_decodes`, rows of one query are left to the caller."""
        token_bytes = k_cache[0, 0].numel() * k_cache.element_size()
        groups = self._plan_groups(meta, query.device, k_cache.shape[1], token_bytes, with_decodes)
        for g in groups:
            k = self._gather(k_cache, g, 0)[:, : g.k_len]  # (b, K, Hk, D)
            v = self._gather(v_cache, g, 1)[:, : g.k_len]
            b = _bias_values(bias, g.q_pos, g.k_pos) if bias is not None else None
            visible, causal = _mask(g, b is None, meta.causal, variant)
            o = _sdpa(_pad(query, g), k, v, visible, scale, b, is_causal=causal, softcap=_softcap(variant))
            _unpad(o, g, out)
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
        groups = self._plan_groups(meta, query.device, block_size=None)
        whole = len(groups) == 1 and groups[0].span == (0, query.shape[0])
        out = None if whole else torch.empty_like(query)
        for g in groups:
            b = _bias_values(bias, g.q_pos, g.k_pos) if bias is not None else None
            visible, _ = _mask(g, False, meta.causal, variant)
            o = _sdpa(_pad(query, g), _pad(key, g), _pad(value, g), visible, scale, b, softcap=_softcap(variant))
            if out is None:
                return _unpad(o, g, None)
            _unpad(o, g, out)
        assert out is not None
        return out

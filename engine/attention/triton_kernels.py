"""Fused Triton kernels for the paged KV cache: store, varlen/paged prefill, split-K paged decode.

Layouts (see engine.attention.base): q (T, Hq, D); k, v (T, Hk, D); caches
(num_blocks, block_size, Hk, D) with the last dim contiguous. Grouped-query attention never
repeats K/V: one program owns one KV head and all GROUP = Hq // Hk query heads that read it, so
every K/V tile is loaded once per group. Softmax runs online (FlashAttention) in the log2 domain:
scores are scaled by scale * log2(e) so the inner loop uses exp2.

Every launch wrapper here writes into a caller-given `out`; picking which rows go to which kernel
is the backend's job (engine/attention/triton_backend.py). The decode kernels, inside a decode
step's chain of launches, can take programmatic dependent launch (engine/fused/pdl.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.fused.pdl import launch_options, wait_for_previous

LOG2E = 1.4426950408889634


@triton.jit
def _store_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch,
    stride_vcb, stride_vcs, stride_vch,
    block_size, num_heads, head_dim,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per new token: all its KV heads in one (H, D) tile.
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    blk = slot // block_size
    off = slot % block_size
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (h[:, None] < num_heads) & (d[None, :] < head_dim)
    k = tl.load(key_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    v = tl.load(value_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    k_dst = k_cache_ptr + blk * stride_kcb + off * stride_kcs + h[:, None] * stride_kch + d[None, :]
    v_dst = v_cache_ptr + blk * stride_vcb + off * stride_vcs + h[:, None] * stride_vch + d[None, :]
    tl.store(k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _kv_offsets(
    n, n_mask, seq, q_start, block_tables_ptr, stride_bt, block_size,
    stride_b, stride_s, PAGED: tl.constexpr,
):
    """Element offset of key/value row n of sequence `seq` (without the head/dim terms)."""
    if PAGED:
        # Keys live in the sequence's blocks; int64 because big caches pass 2**31 elements.
        blk = tl.load(block_tables_ptr + seq * stride_bt + n // block_size, mask=n_mask, other=0)
        return blk.to(tl.int64) * stride_b + (n % block_size).to(tl.int64) * stride_s
    else:
        # Keys are the sequence's own new tokens, flat like the queries.
        return (q_start + n).to(tl.int64) * stride_s


@triton.jit
def _bias_tile(bias_ptr, head, q_pos, n, mask, stride_bias_h, bias_radius):
    """T5 bias of each (row, key) pair, pre-multiplied by log2(e) for the exp2 softmax.

    The table row of a head holds the bias of every relative position -radius..radius, built on
    the host with the reference bucket function, so buckets match transformers exactly.
    """
    rel = n[None, :] - q_pos[:, None] + bias_radius
    rel = tl.minimum(tl.maximum(rel, 0), 2 * bias_radius)  # masked lanes stay in bounds
    b = tl.load(bias_ptr + head[:, None] * stride_bias_h + rel, mask=mask, other=0.0)
    return b * 1.4426950408889634


@triton.jit
def _softcap_log2(s, scale_log2, cap: tl.constexpr):
    """Raw scores `s` scaled and capped in natural units, as HF does (cap * tanh(scaled / cap)),
    returned in the log2 domain the online softmax uses. tanh comes from one exp2:
    tanh(y) = 1 - 2 / (exp(2y) + 1), which saturates to +-1 without overflow trouble (exp2 of a
    large argument is inf, 2 / inf is 0)."""
    x = s * (scale_log2 * 0.6931471805599453)
    return cap * (1.0 - 2.0 / (tl.exp2(x * (2.0 * 1.4426950408889634 / cap)) + 1.0)) * 1.4426950408889634


@triton.jit
def _prefill_tile(
    acc, m_i, l_i, q, start, kv_end, q_pos, head, row_mask, d_mask, kvh, seq, q_start,
    k_ptr, v_ptr, block_tables_ptr, bias_ptr, scale_log2,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_bt, block_size, stride_bias_h, bias_radius, window,
    PAGED: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, MASKED: tl.constexpr,
    HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """One key tile of the online softmax: (acc, m_i, l_i) updated with keys start..start+BLOCK_N.

    MASKED=False is for tiles whose keys all exist and are visible to every row (before the
    causal diagonal and the last key): the (rows x keys) score tile then takes no compare and
    no select, which on tensor cores is most of the work besides the two dots and the exp2.
    HAS_WINDOW hides keys at or before q_pos - window, or without CAUSAL keys more than `window`
    away on either side (every tile is then MASKED, and a row may see no key of a tile); SOFTCAP > 0
    caps the scaled scores before the mask (Gemma 2).
    """
    n = start + tl.arange(0, BLOCK_N)
    n_mask = n < kv_end
    d = tl.arange(0, BLOCK_D)
    if MASKED:
        kv_mask = n_mask[:, None] & d_mask[None, :]
    else:
        kv_mask = d_mask[None, :]
    k_off = _kv_offsets(n, n_mask, seq, q_start, block_tables_ptr, stride_bt, block_size, stride_kb, stride_ks, PAGED)
    k = tl.load(k_ptr + k_off[:, None] + kvh * stride_kh + d[None, :], mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION)  # (M, N), unscaled
    if MASKED:
        if CAUSAL:
            # a stored row's position is below kv_end, so its causal bound also drops the keys past it
            visible = n[None, :] <= q_pos[:, None]
            if HAS_WINDOW:  # causal only (the launch wrapper checks)
                visible = visible & (n[None, :] > q_pos[:, None] - window)
        elif HAS_WINDOW:  # bidirectional: `window` is a radius, keys within it on either side
            visible = n_mask[None, :] & (tl.abs(n[None, :] - q_pos[:, None]) <= window)
        else:
            visible = n_mask[None, :]
    else:
        visible = row_mask[:, None]  # only bounds the bias table's lanes
    if SOFTCAP > 0.0:
        s = _softcap_log2(s, scale_log2, SOFTCAP)
        scale = 1.0
    else:
        scale = scale_log2  # applied inside the exp2's argument: one FMA per score instead of a multiply and a subtract
    if HAS_BIAS:
        s = s * scale + _bias_tile(bias_ptr, head, q_pos, n, visible & row_mask[:, None], stride_bias_h,
                                   bias_radius)
        scale = 1.0
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
    # scale > 0, so the row max of scaled scores is the scaled row max (the same float, rounding is monotonic)
    m_new = tl.maximum(m_i, tl.max(s, 1) * scale)
    if HAS_WINDOW:  # a row that has seen no key yet keeps m = -inf: exp2 against 0 instead of NaN
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_ref = m_new
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(s * scale - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v_off = _kv_offsets(n, n_mask, seq, q_start, block_tables_ptr, stride_bt, block_size, stride_vb, stride_vs, PAGED)
    v = tl.load(v_ptr + v_off[:, None] + kvh * stride_vh + d[None, :], mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr,
    cu_seqlens_ptr, seq_lens_ptr, block_tables_ptr, seq_ids_ptr, bias_ptr,
    scale_log2,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt, block_size, head_dim, stride_bias_h, bias_radius, window,
    GROUP: tl.constexpr, PAGED: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEQ_IDS: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """FlashAttention over one sequence's keys for a tile of (token, query head) rows.

    Grid (num_seqs, row tiles, Hk). The rows of a tile are the sequence's new tokens times the
    GROUP query heads of KV head program_id(2), flattened token-major: row r is token r // GROUP,
    head r % GROUP. PAGED reads keys 0..seq_len through the block table (context from earlier
    steps plus this chunk, already stored); otherwise keys are the new tokens themselves.
    HAS_BIAS adds bias_ptr[head, key_pos - query_pos + bias_radius] (a T5 table, see `bias_table`).
    HAS_WINDOW: each row sees its last `window` keys (causal), or those within `window` positions
    (bidirectional: ModernBERT's local layers); SOFTCAP: see `_prefill_tile`.
    """
    pid_s = tl.program_id(0)
    pid_m = tl.program_id(1)
    kvh = tl.program_id(2)
    if HAS_SEQ_IDS:
        seq = tl.load(seq_ids_ptr + pid_s)
    else:
        seq = pid_s
    q_start = tl.load(cu_seqlens_ptr + seq)
    q_len = tl.load(cu_seqlens_ptr + seq + 1) - q_start
    if PAGED:
        seq_len = tl.load(seq_lens_ptr + seq)
    else:
        seq_len = q_len
    if pid_m * BLOCK_M >= q_len * GROUP:  # the grid covers the longest sequence of the batch
        return

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = rows // GROUP
    head = kvh * GROUP + rows % GROUP
    row_mask = tok < q_len
    d = tl.arange(0, BLOCK_D)
    d_mask = d < head_dim
    q_off = (q_start + tok).to(tl.int64) * stride_qt + head * stride_qh
    q = tl.load(q_ptr + q_off[:, None] + d[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)

    q_pos = seq_len - q_len + tok  # absolute position of each row's token
    if CAUSAL:
        last_tok = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // GROUP, q_len - 1)
        kv_end = tl.minimum(seq_len, seq_len - q_len + last_tok + 1)
        # every row of the tile sees the keys up to its first token's position
        full_end = seq_len - q_len + (pid_m * BLOCK_M) // GROUP + 1
    else:
        kv_end = seq_len
        full_end = seq_len
    full_end = full_end // BLOCK_N * BLOCK_N
    kv_lo = 0
    if HAS_WINDOW:  # from the tile holding the first row's first visible key; every tile masked
        first_pos = seq_len - q_len + (pid_m * BLOCK_M) // GROUP
        if CAUSAL:
            kv_lo = tl.maximum(first_pos - window + 1, 0) // BLOCK_N * BLOCK_N
        else:  # a radius: up to the last row's last visible key too
            kv_lo = tl.maximum(first_pos - window, 0) // BLOCK_N * BLOCK_N
            last_pos = seq_len - q_len + tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // GROUP, q_len - 1)
            kv_end = tl.minimum(seq_len, last_pos + window + 1)
        full_end = kv_lo

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Stage 0: whole tiles every row sees, unmasked; stage 1: the rest (the causal diagonal and
    # the last partial tile), masked. Without a window key 0 is visible to every row (causal or
    # not), so after the first tile m_i is finite and exp2(m_i - m_new) never sees -inf - -inf.
    for stage in tl.static_range(2):
        if stage == 0:
            lo, hi = kv_lo, full_end
        else:
            lo, hi = full_end, kv_end
        for start in range(lo, hi, BLOCK_N):
            acc, m_i, l_i = _prefill_tile(
                acc, m_i, l_i, q, start, kv_end, q_pos, head, row_mask, d_mask, kvh, seq, q_start,
                k_ptr, v_ptr, block_tables_ptr, bias_ptr, scale_log2,
                stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                stride_bt, block_size, stride_bias_h, bias_radius, window,
                PAGED, CAUSAL, HAS_BIAS, stage == 1, HAS_WINDOW, SOFTCAP, BLOCK_N, BLOCK_D, PRECISION)

    l_i = tl.where(l_i > 0.0, l_i, 1.0)  # seq_len == 0 (an empty encoder output) gives zeros
    o = acc / l_i[:, None]
    o_off = (q_start + tok).to(tl.int64) * stride_ot + head * stride_oh
    tl.store(out_ptr + o_off[:, None] + d[None, :], o.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & d_mask[None, :])


@triton.jit
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
    cu_seqlens_ptr, seq_lens_ptr, block_tables_ptr, seq_ids_ptr, bias_ptr,
    scale_log2,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt, block_size, head_dim, partition_size, num_q_heads, num_partitions,
    stride_bias_h, bias_radius, window,
    GROUP: tl.constexpr, SPLIT: tl.constexpr, HAS_SEQ_IDS: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, PDL: tl.constexpr,
):
    """One query token per sequence: all GROUP query heads of one KV head over one partition.

    Grid (num_seqs, Hk, num_partitions). Without SPLIT the single partition is the whole context
    and the program writes the normalised output. With SPLIT (flash-decoding) each program covers
    `partition_size` keys and writes its unnormalised accumulator and (max, sum) to scratch that
    `_decode_reduce_kernel` combines: long contexts then use the whole GPU even at batch 1.
    HAS_WINDOW: only the last `window` keys (partitions wholly before them write nothing);
    SOFTCAP > 0 caps the scaled scores.
    """
    wait_for_previous(PDL)
    pid_s = tl.program_id(0)
    kvh = tl.program_id(1)
    part = tl.program_id(2)
    if HAS_SEQ_IDS:
        seq = tl.load(seq_ids_ptr + pid_s)
    else:
        seq = pid_s
    q_row = tl.load(cu_seqlens_ptr + seq).to(tl.int64)
    if tl.load(cu_seqlens_ptr + seq + 1) == q_row:  # no new token: its row belongs to the next sequence
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    if SPLIT:
        kv_start = part * partition_size
        if kv_start >= seq_len:  # shorter sequence than the batch's longest: nothing here
            return
        kv_end = tl.minimum(kv_start + partition_size, seq_len)
    else:
        kv_start = 0
        kv_end = seq_len
    if HAS_WINDOW:
        kv_start = tl.maximum(kv_start, seq_len - window)
        if kv_start >= kv_end:  # a partition before the window
            return

    g = tl.arange(0, BLOCK_G)
    g_mask = g < GROUP
    head = kvh * GROUP + g
    d = tl.arange(0, BLOCK_D)
    d_mask = d < head_dim
    q_mask = g_mask[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + q_row * stride_qt + head[:, None] * stride_qh + d[None, :], mask=q_mask, other=0.0)
    q_pos = tl.zeros([BLOCK_G], dtype=tl.int32) + seq_len - 1  # the new token is the last key

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    # The first tile holds kv_start < kv_end, visible to every row: m_i is finite afterwards.
    for start in range(kv_start, kv_end, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_mask = n < kv_end
        kv_mask = n_mask[:, None] & d_mask[None, :]
        blk = tl.load(block_tables_ptr + seq * stride_bt + n // block_size, mask=n_mask, other=0)
        blk = blk.to(tl.int64)
        slot = (n % block_size).to(tl.int64)
        k = tl.load(k_cache_ptr + (blk * stride_kb + slot * stride_ks)[:, None] + kvh * stride_kh + d[None, :],
                    mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION)  # (G, N)
        if SOFTCAP > 0.0:
            s = _softcap_log2(s, scale_log2, SOFTCAP)
        else:
            s = s * scale_log2
        if HAS_BIAS:
            s += _bias_tile(bias_ptr, head, q_pos, n, g_mask[:, None] & n_mask[None, :], stride_bias_h, bias_radius)
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + (blk * stride_vb + slot * stride_vs)[:, None] + kvh * stride_vh + d[None, :],
                    mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PRECISION)
        m_i = m_new

    if SPLIT:
        # scratch: acc (num_seqs, Hq, P, D), ml (num_seqs, Hq, P, 2) = (max, sum), all fp32
        part_row = (pid_s.to(tl.int64) * num_q_heads + head) * num_partitions + part  # (G,)
        tl.store(part_acc_ptr + part_row[:, None] * head_dim + d[None, :], acc, mask=q_mask)
        tl.store(part_ml_ptr + part_row * 2, m_i, mask=g_mask)
        tl.store(part_ml_ptr + part_row * 2 + 1, l_i, mask=g_mask)
    else:
        l_i = tl.where(l_i > 0.0, l_i, 1.0)  # seq_len == 0 (an empty encoder output) gives zeros
        o = acc / l_i[:, None]
        tl.store(out_ptr + q_row * stride_ot + head[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def _decode_reduce_kernel(
    out_ptr, part_acc_ptr, part_ml_ptr, cu_seqlens_ptr, seq_lens_ptr, seq_ids_ptr,
    stride_ot, stride_oh, head_dim, partition_size, num_q_heads, num_partitions, window,
    HAS_SEQ_IDS: tl.constexpr, HAS_WINDOW: tl.constexpr, BLOCK_P: tl.constexpr, CHUNK_P: tl.constexpr,
    BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):
    """Combine the partitions of one (sequence, query head): rescale each by exp2(m_p - max).
    With a window, the partitions before its first key were never written and are skipped."""
    wait_for_previous(PDL)
    pid_s = tl.program_id(0)
    h = tl.program_id(1)
    if HAS_SEQ_IDS:
        seq = tl.load(seq_ids_ptr + pid_s)
    else:
        seq = pid_s
    q_row = tl.load(cu_seqlens_ptr + seq).to(tl.int64)
    if tl.load(cu_seqlens_ptr + seq + 1) == q_row:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    num_parts = tl.cdiv(seq_len, partition_size)  # partitions past this were never written
    first = 0
    if HAS_WINDOW:
        first = tl.maximum(seq_len - window, 0) // partition_size
    base = (pid_s.to(tl.int64) * num_q_heads + h) * num_partitions

    p_all = tl.arange(0, BLOCK_P)
    m_all = tl.load(part_ml_ptr + (base + p_all) * 2, mask=(p_all >= first) & (p_all < num_parts),
                    other=float("-inf"))
    m_max = tl.max(m_all, 0)

    d = tl.arange(0, BLOCK_D)
    d_mask = d < head_dim
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    l_sum = tl.zeros([CHUNK_P], dtype=tl.float32)
    # Chunks keep the (P, D) accumulator tile small at 100k-token contexts.
    for p0 in range(first, num_parts, CHUNK_P):
        p = p0 + tl.arange(0, CHUNK_P)
        p_mask = p < num_parts
        m = tl.load(part_ml_ptr + (base + p) * 2, mask=p_mask, other=float("-inf"))
        l = tl.load(part_ml_ptr + (base + p) * 2 + 1, mask=p_mask, other=0.0)
        w = tl.where(p_mask, tl.exp2(m - m_max), 0.0)
        l_sum += l * w
        a = tl.load(part_acc_ptr + (base + p)[:, None] * head_dim + d[None, :],
                    mask=p_mask[:, None] & d_mask[None, :], other=0.0)
        acc += tl.sum(a * w[:, None], 0)
    total = tl.sum(l_sum, 0)
    o = acc / tl.where(total > 0.0, total, 1.0)  # seq_len == 0: no partition, zeros
    tl.store(out_ptr + q_row * stride_ot + h * stride_oh + d, o.to(out_ptr.dtype.element_ty), mask=d_mask)


# ----------------------------------------------------------------------------- launch wrappers


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs would silently run as tf32 on tensor cores (~1e-3 error); keep them exact.
    # (16-bit inputs ignore the setting.)
    return "ieee" if dtype == torch.float32 else "tf32"


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot needs K >= 16


def _check_last_dim(*tensors: torch.Tensor) -> None:
    for t in tensors:
        assert t.stride(-1) == 1, "attention kernels need a contiguous head_dim"


def _bias_args(bias: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(pointer, head stride, radius) of a `bias_table`, or dummies when there is no bias."""
    if bias is None:
        return like, 0, 0
    assert bias.dtype == torch.float32 and bias.stride(1) == 1 and bias.shape[1] % 2 == 1
    return bias, bias.stride(0), bias.shape[1] // 2


def bias_table(
    weight: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int, radius: int
) -> torch.Tensor:
    """(Hq, 2 * radius + 1) float32: T5 bias of each head at relative position -radius..radius.

    Built with the reference bucket function, so the kernels' buckets equal transformers'
    exactly (a float log inside the kernel could land one bucket off at a boundary). `radius`
    must cover every |key_pos - query_pos| of the batch: max(max_seqlen_q, max_seqlen_k).
    """
    from engine.attention.ref import t5_relative_buckets

    rel = torch.arange(-radius, radius + 1, device=weight.device)
    buckets = t5_relative_buckets(rel, bidirectional, num_buckets, max_distance)
    return weight[buckets].t().float().contiguous()


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write row t of key/value (T, Hk, D) into flat cache slot slot_mapping[t], K and V in one launch."""
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    _check_last_dim(key, value, k_cache, v_cache)
    num_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        k_cache.shape[1], num_heads, head_dim,
        BLOCK_H=triton.next_power_of_2(num_heads), BLOCK_D=triton.next_power_of_2(head_dim),
    )


def prefill_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor | None,
    block_tables: torch.Tensor | None,
    num_seqs: int,
    max_seqlen_q: int,
    scale: float,
    causal: bool,
    bias: torch.Tensor | None = None,
    seq_ids: torch.Tensor | None = None,
    block_m: int = 64,
    block_n: int = 64,
    num_warps: int = 8,
    num_stages: int = 2,
    window: int = 0,
    softcap: float = 0.0,
) -> None:
    """FlashAttention for sequences with any number of new tokens, written into `out`.

    With `block_tables` (paged): `key`/`value` are the caches and sequence i attends to its
    `seq_lens[i]` cached keys, its new tokens being the last `query_lens[i]` of them (chunked
    prefill over earlier context, or cross-attention with causal=False). Without: `key`/`value`
    are flat (T, Hk, D) like `query` and each sequence attends within its own new tokens.
    `bias`: a `bias_table`. `seq_ids` (int32, num_seqs) picks which sequences of the metadata
    to run; None means all. Default tiles: 64 x 64 with 8 warps, the best of an H100 sweep at
    head_dim 128 (docs/benchmarks.md) before whole tiles ran unmasked. Its SASS has each of the
    two warpgroups compute the tile's whole QK^T (wgmma rows come 64 per warpgroup); 128-row
    tiles or 4 warps do not, and `benchmarks/bench_kernels.py` times them against it.
    `window` > 0: each query sees its last `window` keys (causal), or the keys within `window`
    positions on either side (not causal: a radius); `softcap` > 0: scores are soft-capped
    (engine.attention.metadata.AttentionVariant).
    """
    if num_seqs == 0 or max_seqlen_q == 0:
        return
    _check_last_dim(query, key, value, out)
    num_q_heads, head_dim = query.shape[1], query.shape[2]
    paged = block_tables is not None
    num_kv_heads = key.shape[2] if paged else key.shape[1]
    group = num_q_heads // num_kv_heads
    if paged:
        assert seq_lens is not None
        kv_strides = (key.stride(0), key.stride(1), key.stride(2), value.stride(0), value.stride(1), value.stride(2))
        block_size, stride_bt = key.shape[1], block_tables.stride(0)
    else:
        kv_strides = (0, key.stride(0), key.stride(1), 0, value.stride(0), value.stride(1))
        block_size, stride_bt = 1, 0
    bias_arg, stride_bias_h, radius = _bias_args(bias, query)
    grid = (num_seqs, triton.cdiv(max_seqlen_q * group, block_m), num_kv_heads)
    _prefill_kernel[grid](
        query, key, value, out,
        cu_seqlens_q, seq_lens if paged else cu_seqlens_q,
        block_tables if paged else cu_seqlens_q, seq_ids if seq_ids is not None else cu_seqlens_q,
        bias_arg,
        scale * LOG2E,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        *kv_strides,
        stride_bt, block_size, head_dim, stride_bias_h, radius, window,
        GROUP=group, PAGED=paged, CAUSAL=causal, HAS_SEQ_IDS=seq_ids is not None,
        HAS_BIAS=bias is not None, HAS_WINDOW=window > 0, SOFTCAP=float(softcap),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_d(head_dim),
        PRECISION=_precision(query.dtype), num_warps=num_warps, num_stages=num_stages,
    )


def decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    num_seqs: int,
    max_seqlen_k: int,
    scale: float,
    bias: torch.Tensor | None = None,
    seq_ids: torch.Tensor | None = None,
    split: bool = True,
    partition_size: int = 512,
    block_n: int = 64,
    num_warps: int = 8,
    num_stages: int = 2,
    pdl: bool = False,
    window: int = 0,
    softcap: float = 0.0,
) -> None:
    """Paged attention for sequences with one new token each (row cu_seqlens_q[i]), into `out`.

    With `split` and contexts longer than `partition_size`, the split-K (flash-decoding) path
    cuts the context into partitions processed by separate programs, then reduces them.
    `partition_size` should be a multiple of `block_n` (any value is correct; a multiple wastes
    no masked lanes); 64-key tiles need 8 warps at head_dim 128 to avoid register spills.
    Keys are visible up to seq_lens[i] whether the step is causal or not: the new token is the
    last key (self-attention) or queries see all keys (cross-attention). `window` > 0: only the
    last `window` keys; `softcap` > 0: soft-capped scores.
    """
    if num_seqs == 0:
        return
    _check_last_dim(query, k_cache, v_cache, out)
    num_q_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = num_q_heads // num_kv_heads
    num_partitions = triton.cdiv(max_seqlen_k, partition_size) if split else 1
    split = num_partitions > 1
    if split:
        part_acc = torch.empty((num_seqs, num_q_heads, num_partitions, head_dim), dtype=torch.float32, device=query.device)
        part_ml = torch.empty((num_seqs, num_q_heads, num_partitions, 2), dtype=torch.float32, device=query.device)
    else:
        part_acc = part_ml = out  # unused: SPLIT is a constexpr
    ids = seq_ids if seq_ids is not None else cu_seqlens_q
    bias_arg, stride_bias_h, radius = _bias_args(bias, query)
    block_d = _block_d(head_dim)
    _decode_kernel[(num_seqs, num_kv_heads, num_partitions)](
        query, k_cache, v_cache, out, part_acc, part_ml,
        cu_seqlens_q, seq_lens, block_tables, ids, bias_arg,
        scale * LOG2E,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), block_size, head_dim, partition_size, num_q_heads, num_partitions,
        stride_bias_h, radius, window,
        GROUP=group, SPLIT=split, HAS_SEQ_IDS=seq_ids is not None, HAS_BIAS=bias is not None,
        HAS_WINDOW=window > 0, SOFTCAP=float(softcap),
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n, BLOCK_D=block_d,
        PRECISION=_precision(query.dtype), PDL=pdl, **launch_options(pdl),
        num_warps=num_warps, num_stages=num_stages,
    )
    if split:
        _decode_reduce_kernel[(num_seqs, num_q_heads)](
            out, part_acc, part_ml, cu_seqlens_q, seq_lens, ids,
            out.stride(0), out.stride(1), head_dim, partition_size, num_q_heads, num_partitions, window,
            HAS_SEQ_IDS=seq_ids is not None, HAS_WINDOW=window > 0, BLOCK_P=triton.next_power_of_2(num_partitions),
            CHUNK_P=min(16, triton.next_power_of_2(num_partitions)), BLOCK_D=block_d,
            PDL=pdl, **launch_options(pdl),
        )


__all__ = ["bias_table", "decode_attention", "prefill_attention", "store_kv"]

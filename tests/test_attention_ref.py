"""Reference backend: paged attention over blocks equals plain causal attention per sequence."""
import pytest
import torch

from engine.attention import TorchAttentionBackend
from engine.attention.metadata import RelativePositionBias
from engine.attention.ref import _length_buckets, _split_by_bytes, t5_relative_buckets
from engine.forward_context import metadata_for_sequences
from engine.input_prep import prepare_inputs


def naive(q, k, v, scale, causal, offset=0):
    """q (Q,H,D) at positions offset.., k/v (K,Hk,D); dense attention with repeated K/V."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    if causal:
        qpos = torch.arange(q.shape[0])[:, None] + offset
        s = s.masked_fill(torch.arange(k.shape[0])[None, :] > qpos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v)


@pytest.mark.parametrize("causal", [True, False])
def test_paged_chunks_equal_dense_attention(causal):
    torch.manual_seed(0)
    hq, hk, d, bs, nblocks = 6, 2, 8, 4, 32
    totals, splits = [9, 1, 14, 5], [4, 0, 13, 5]  # computed before, then the rest
    backend = TorchAttentionBackend()
    kc, vc = torch.zeros(nblocks, bs, hk, d), torch.zeros(nblocks, bs, hk, d)
    perm = torch.randperm(nblocks).tolist()
    tables, used = [], 0
    for n in totals:
        nb = -(-n // bs)
        tables.append(perm[used : used + nb])
        used += nb
    ks = [torch.randn(n, hk, d) for n in totals]
    vs = [torch.randn(n, hk, d) for n in totals]
    qs = [torch.randn(n, hq, d) for n in totals]
    for phase in range(2):
        chunks, starts, idx = [], [], []
        for i, (n, s) in enumerate(zip(totals, splits)):
            lo, hi = (0, s) if phase == 0 else (s, n)
            if hi > lo:
                chunks.append(list(range(hi - lo)))
                starts.append(lo)
                idx.append((i, lo, hi))
        inp = prepare_inputs(chunks, starts, [tables[i] for i, _, _ in idx], [True] * len(idx), bs, causal=causal)
        q = torch.cat([qs[i][lo:hi] for i, lo, hi in idx])
        k = torch.cat([ks[i][lo:hi] for i, lo, hi in idx])
        v = torch.cat([vs[i][lo:hi] for i, lo, hi in idx])
        backend.store_kv(k, v, kc, vc, inp.meta.slot_mapping)
        out = backend.paged_attention(q, kc, vc, inp.meta, 0.3)
        row = 0
        for i, lo, hi in idx:
            ref = naive(qs[i][lo:hi], ks[i][:hi], vs[i][:hi], 0.3, causal, offset=lo)
            assert torch.allclose(out[row : row + hi - lo], ref, atol=1e-5)
            row += hi - lo


def test_length_buckets_bound_padding_and_keep_every_row():
    lengths = (700, 3, 60, 61, 5, 690, 4, 62, 6, 7, 8, 9, 10, 11, 12, 13, 600, 650, 66, 70)
    buckets = _length_buckets(list(range(len(lengths))), lengths, slack=1.25, min_size=3)
    assert sorted(r for b in buckets for r in b) == list(range(len(lengths)))
    # a bucket opens when a row is over 1.25x the bucket's shortest, but only once it has 3 rows
    assert [[lengths[r] for r in b] for b in buckets] == [
        [3, 4, 5], [6, 7, 8], [9, 10, 11], [12, 13, 60], [61, 62, 66, 70], [600, 650, 690, 700]]


def test_split_by_bytes_caps_each_runs_gather():
    lengths = (10, 20, 30, 40, 100, 100, 100, 5000)
    runs = _split_by_bytes(list(range(len(lengths))), lengths, token_bytes=10, budget=1000)
    assert runs == [[0, 1, 2], [3], [4], [5], [6], [7]]  # a row over budget alone still gets its run
    assert all(len(r) * lengths[r[-1]] * 10 <= 1000 for r in runs[:-1])


@pytest.mark.parametrize("hk,d", [(2, 8), (8, 128)])  # 64 B a token: length buckets; 4 KB: byte cap too
def test_decodes_of_very_different_lengths_equal_dense_attention(hk: int, d: int):
    """Twenty decodes from 2 to 300 keys: split into several length buckets, each exact."""
    torch.manual_seed(1)
    hq, bs = 2 * hk, 16
    totals = [2, 300, 40, 41, 7, 280, 9, 45, 3, 250, 5, 6, 8, 290, 44, 10, 11, 12, 260, 4]
    nblocks = sum(-(-n // bs) for n in totals) + 4
    backend = TorchAttentionBackend()
    kc, vc = torch.randn(nblocks, bs, hk, d), torch.randn(nblocks, bs, hk, d)
    perm, tables, used = torch.randperm(nblocks).tolist(), [], 0
    for n in totals:
        tables.append(perm[used : used + -(-n // bs)])
        used += len(tables[-1])
    inp = prepare_inputs([[0]] * len(totals), [n - 1 for n in totals], tables, [True] * len(totals), bs)
    q = torch.randn(len(totals), hq, d)
    out = backend.paged_attention(q, kc, vc, inp.meta, 0.5)
    assert len(backend._plan_groups(inp.meta, q.device, bs)) > 1  # the batch really was split
    groups = backend._plan_groups(inp.meta, q.device, bs, token_bytes=hk * d * 4)
    assert all(g.tables.shape[0] == 1 or g.tables.numel() * bs * hk * d * 4 <= 3 << 20 for g in groups)
    for i, (n, table) in enumerate(zip(totals, tables)):
        k = kc[table].flatten(0, 1)[:n]
        v = vc[table].flatten(0, 1)[:n]
        assert torch.allclose(out[i : i + 1], naive(q[i : i + 1], k, v, 0.5, causal=True, offset=n - 1), atol=1e-5)


def test_varlen_with_relative_bias_equals_dense():
    torch.manual_seed(1)
    lens, h, d = [5, 3], 4, 8
    bias = RelativePositionBias(torch.randn(32, h), bidirectional=True, num_buckets=32, max_distance=128)
    q, k, v = torch.randn(8, h, d), torch.randn(8, h, d), torch.randn(8, h, d)
    out = TorchAttentionBackend().varlen_attention(q, k, v, metadata_for_sequences(lens, causal=False), 1.0, bias)
    start = 0
    for n in lens:
        pos = torch.arange(n)
        b = bias.weight[t5_relative_buckets(pos[None, :] - pos[:, None], True, 32, 128)].permute(2, 0, 1)
        s = torch.einsum("qhd,khd->hqk", q[start : start + n], k[start : start + n]) + b
        ref = torch.einsum("hqk,khd->qhd", s.softmax(-1), v[start : start + n])
        assert torch.allclose(out[start : start + n], ref, atol=1e-5)
        start += n


def test_t5_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(-200, 200)[None, :]
    for bidir in (True, False):
        ref = T5Attention._relative_position_bucket(rel, bidirectional=bidir, num_buckets=32, max_distance=128)
        assert torch.equal(t5_relative_buckets(rel, bidir, 32, 128), ref)


@pytest.mark.parametrize("lens", [[3, 3, 7, 7, 7, 12], [12, 3, 7, 3, 1, 30, 7, 2, 2, 5, 9]])
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_sorted_runs_and_ragged_buckets_equal_dense(lens, causal):
    """Sorted lengths run as unpadded equal-length slices (views of strided q/k/v, as a fused
    QKV projection gives), unsorted ones as padded length buckets; both equal per-sequence attention."""
    torch.manual_seed(2)
    h, d, total = 4, 8, sum(lens)
    q, k, v = torch.randn(total, 3, h, d).unbind(1)  # strided views, like BERT's fused projection
    backend = TorchAttentionBackend()
    meta = metadata_for_sequences(lens, causal=causal)
    out = backend.varlen_attention(q, k, v, meta, 0.4)
    assert len(backend._plan_groups(meta, q.device, None)) > 1
    start = 0
    for n in lens:
        ref = naive(q[start : start + n], k[start : start + n], v[start : start + n], 0.4, causal)
        assert torch.allclose(out[start : start + n], ref, atol=1e-5)
        start += n


@pytest.mark.parametrize("new_tokens", [1, 5])  # a decode, a prefill chunk over earlier context
def test_consecutive_blocks_are_read_in_place(new_tokens: int):
    """A lone sequence in consecutive blocks attends through a view of the cache (no gather),
    equal decodes attend with no mask: same result as the dense reference."""
    torch.manual_seed(2)
    hq, hk, d, bs, n = 4, 2, 8, 4, 23
    kc, vc = torch.randn(16, bs, hk, d), torch.randn(16, bs, hk, d)
    table = list(range(3, 3 + -(-n // bs)))
    inp = prepare_inputs([[0] * new_tokens], [n - new_tokens], [table], [True], bs)
    q = torch.randn(new_tokens, hq, d)
    backend = TorchAttentionBackend()
    out = backend.paged_attention(q, kc, vc, inp.meta, 0.5)
    (group,) = backend._plan_groups(inp.meta, q.device, bs, token_bytes=hk * d * 4)
    assert group.first_block == 3 and group.sees_all == (new_tokens == 1)
    k, v = kc[table].flatten(0, 1)[:n], vc[table].flatten(0, 1)[:n]
    assert torch.allclose(out, naive(q, k, v, 0.5, causal=True, offset=n - new_tokens), atol=1e-5)


def test_step_cache_builds_once_per_metadata_object():
    from dataclasses import replace

    from engine.attention.metadata import StepCache
    from engine.forward_context import metadata_for_sequences

    cache: StepCache[int] = StepCache(limit=3)
    builds: list[str] = []

    def build(tag: str):
        return lambda: builds.append(tag) or len(builds)

    meta = metadata_for_sequences([3, 5])
    assert cache.get(meta, (), build("a")) == 1 and cache.get(meta, (), build("a")) == 1  # reused in every layer
    assert cache.get(meta, (16,), build("b")) == 2  # another key on the same step
    twin = replace(meta)  # equal fields, another object (a later step): never served the old plan
    assert cache.get(twin, (), build("c")) == 3
    assert cache.get(meta, (), build("x")) == 1  # three entries: all kept
    assert cache.get(replace(meta), (), build("d")) == 4  # a fourth: the older entries are dropped
    assert cache.get(meta, (), build("e")) == 5
    assert builds == ["a", "b", "c", "d", "e"]


def naive_variant(q, k, v, scale, offset, window, softcap):
    """HF's eager Gemma 2 order: scaled scores, soft-cap, causal + sliding-window mask, softmax."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    qpos = torch.arange(q.shape[0])[:, None] + offset
    kpos = torch.arange(k.shape[0])[None, :]
    hidden = kpos > qpos
    if window is not None:
        hidden = hidden | (kpos <= qpos - window)
    s = s.masked_fill(hidden, float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v)


@pytest.mark.parametrize("window, softcap", [(5, None), (None, 2.0), (3, 1.5), (64, None), (1, None)])
def test_sliding_window_and_softcap_equal_dense(window, softcap):
    """Chunks over earlier context, whole prompts and decodes (long and short, so some windows hide
    nothing) of the paged path; whole sequences of the varlen path."""
    from engine.attention.metadata import AttentionVariant

    torch.manual_seed(1)
    hq, hk, d, bs = 4, 2, 8, 4
    variant = AttentionVariant(window=window, softcap=softcap)
    totals, news = [9, 3, 14, 20, 1], [4, 1, 14, 1, 1]
    nblocks = sum(-(-n // bs) for n in totals) + 2
    perm = torch.randperm(nblocks).tolist()
    tables, used = [], 0
    for n in totals:
        tables.append(perm[used : used + -(-n // bs)])
        used += len(tables[-1])
    ks, vs, qs = ([torch.randn(n, h, d) for n in totals] for h in (hk, hk, hq))
    qs = [x * 3 for x in qs]  # large scores, so the cap bites
    kc, vc = torch.randn(nblocks, bs, hk, d), torch.randn(nblocks, bs, hk, d)
    backend = TorchAttentionBackend()
    for i, n in enumerate(totals):  # every key in place (earlier context and this step's)
        inp = prepare_inputs([list(range(n))], [0], [tables[i]], [True], bs)
        backend.store_kv(ks[i], vs[i], kc, vc, inp.meta.slot_mapping)
    inp = prepare_inputs([list(range(m)) for m in news], [t - m for t, m in zip(totals, news)], tables,
                         [True] * len(totals), bs)
    q = torch.cat([x[t - m:] for x, t, m in zip(qs, totals, news)])
    out = backend.paged_attention(q, kc, vc, inp.meta, 0.5, variant=variant)
    row = 0
    for i, (t, m) in enumerate(zip(totals, news)):
        ref = naive_variant(qs[i][t - m:], ks[i], vs[i], 0.5, t - m, window, softcap)
        torch.testing.assert_close(out[row : row + m], ref, atol=1e-5, rtol=1e-5)
        row += m
    flat = metadata_for_sequences(totals)
    out = backend.varlen_attention(torch.cat(qs), torch.cat(ks), torch.cat(vs), flat, 0.5, variant=variant)
    ref = torch.cat([naive_variant(qs[i], ks[i], vs[i], 0.5, 0, window, softcap) for i in range(len(totals))])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_sliding_window_is_refused_for_bidirectional_attention():
    from engine.attention.metadata import AttentionVariant

    q = torch.randn(6, 2, 8)
    with pytest.raises(ValueError, match="causal attention only"):
        TorchAttentionBackend().varlen_attention(q, q, q, metadata_for_sequences([6], causal=False), 0.3,
                                                 variant=AttentionVariant(window=2))
    with pytest.raises(ValueError, match="window must be >= 1"):
        AttentionVariant(window=0)


@pytest.mark.parametrize("radius", [1, 3, 30])
def test_bidirectional_radius_equals_dense(radius):
    """ModernBERT's local layers: |key - query| <= radius, per sequence of a ragged varlen batch."""
    from engine.attention.metadata import AttentionVariant

    torch.manual_seed(2)
    lens = [6, 1, 17, 9]
    qs, ks, vs = ([torch.randn(n, h, 8) for n in lens] for h in (4, 2, 2))
    out = TorchAttentionBackend().varlen_attention(torch.cat(qs), torch.cat(ks), torch.cat(vs),
                                                   metadata_for_sequences(lens, causal=False), 0.5,
                                                   variant=AttentionVariant(radius=radius))
    refs = []
    for q, k, v in zip(qs, ks, vs):
        s = torch.einsum("qhd,khd->hqk", q, k.repeat_interleave(2, 1)) * 0.5
        far = (torch.arange(len(k))[None, :] - torch.arange(len(q))[:, None]).abs() > radius
        refs.append(torch.einsum("hqk,khd->qhd", s.masked_fill(far, float("-inf")).softmax(-1), v.repeat_interleave(2, 1)))
    torch.testing.assert_close(out, torch.cat(refs), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="bidirectional attention only"):
        TorchAttentionBackend().varlen_attention(qs[0], ks[0], vs[0], metadata_for_sequences([6]), 0.5,
                                                 variant=AttentionVariant(radius=radius))

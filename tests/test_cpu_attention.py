"""The compiled CPU decode kernel (engine/attention/paged_decode_cpu.c) against the torch reference."""
import random
import shutil

import pytest
import torch

from engine.attention import CpuAttentionBackend, TorchAttentionBackend, cpu_kernel, get_backend
from engine.attention.metadata import RelativePositionBias
from engine.input_prep import prepare_inputs

LIB = cpu_kernel.load()
needs_kernel = pytest.mark.skipif(LIB is None and shutil.which("cc") is None, reason="no C compiler")


def paged_step(q_lens, k_lens, hq, hk, d, bs, seed=0, extra_blocks=5):
    """Random caches, scattered block tables and one step's inputs: sequence i brings q_lens[i]
    new tokens and attends to k_lens[i] keys (its earlier context already in the cache)."""
    g = torch.Generator().manual_seed(seed)
    nblocks = sum(-(-n // bs) for n in k_lens) + extra_blocks
    kc, vc = torch.randn(nblocks, bs, hk, d, generator=g), torch.randn(nblocks, bs, hk, d, generator=g)
    perm = torch.randperm(nblocks, generator=g).tolist()
    tables, used = [], 0
    for n in k_lens:
        tables.append(perm[used : used + -(-n // bs)])
        used += len(tables[-1])
    chunks = [[0] * n for n in q_lens]
    inp = prepare_inputs(chunks, [k - n for n, k in zip(q_lens, k_lens)], tables, [True] * len(q_lens), bs)
    q = torch.randn(sum(q_lens), hq, d, generator=g) * 2
    return q, kc, vc, inp.meta


@needs_kernel
@pytest.mark.parametrize(
    "hq,hk,d,bs",
    [(9, 3, 64, 16), (8, 8, 64, 16), (4, 1, 128, 16), (16, 2, 64, 4), (6, 2, 8, 4), (5, 5, 24, 1), (16, 4, 32, 8)],
)
def test_decodes_match_reference(hq, hk, d, bs):
    """Ragged lengths (partial last blocks, one-key sequences), scattered blocks, GQA ratios 1-8,
    head dims with and without code of their own."""
    rng = random.Random(hq * 1000 + d)
    k_lens = [1, 2, bs, bs + 1, 3 * bs - 1] + [rng.randint(1, 300) for _ in range(11)]
    q, kc, vc, meta = paged_step([1] * len(k_lens), k_lens, hq, hk, d, bs, seed=d)
    ref = TorchAttentionBackend().paged_attention(q, kc, vc, meta, 0.7)
    out = CpuAttentionBackend(cpu_kernel.load()).paged_attention(q, kc, vc, meta, 0.7)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("causal", [True, False])
def test_mixed_step_decodes_by_kernel_chunks_by_reference(causal):
    """Prefill chunks (with earlier context) between decodes: every row equals the reference."""
    q_lens, k_lens = [1, 7, 1, 1, 33, 1], [40, 20, 1, 17, 70, 130]
    q, kc, vc, meta = paged_step(q_lens, k_lens, 12, 4, 64, 16, seed=3)
    if not causal:  # cross-attention shape: every query sees all of its sequence's keys
        from dataclasses import replace

        meta = replace(meta, causal=False)
    ref = TorchAttentionBackend().paged_attention(q, kc, vc, meta, 0.125)
    backend = CpuAttentionBackend(cpu_kernel.load())
    out = backend.paged_attention(q, kc, vc, meta, 0.125)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert backend._decode_plan(meta).rows.tolist() == [0, 8, 9, 43]  # the one-query rows


@needs_kernel
def test_strided_query_rows_from_a_merged_projection():
    """Models slice q out of one qkv product: rows with a stride, heads contiguous within them."""
    q, kc, vc, meta = paged_step([1] * 5, [3, 50, 17, 16, 90], 9, 3, 64, 16, seed=5)
    qkv = torch.randn(q.shape[0], (9 + 2 * 3) * 64)
    qkv[:, : 9 * 64] = q.flatten(1)
    view = qkv[:, : 9 * 64].view(-1, 9, 64)
    assert not view.is_contiguous() and cpu_kernel.supports(view, kc)
    out = CpuAttentionBackend(cpu_kernel.load()).paged_attention(view, kc, vc, meta, 0.125)
    torch.testing.assert_close(out, TorchAttentionBackend().paged_attention(q, kc, vc, meta, 0.125), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_unsupported_inputs_fall_back_to_reference():
    """Position bias (T5), head dims not a multiple of 8, groups over 8, fp64: the reference runs."""
    backend = CpuAttentionBackend(cpu_kernel.load())
    q, kc, vc, meta = paged_step([1, 1, 4], [9, 30, 12], 4, 2, 8, 4, seed=7)
    bias = RelativePositionBias(torch.randn(32, 4), bidirectional=False, num_buckets=32, max_distance=128)
    torch.testing.assert_close(backend.paged_attention(q, kc, vc, meta, 1.0, bias),
                               TorchAttentionBackend().paged_attention(q, kc, vc, meta, 1.0, bias))
    for hq, hk, d, dtype in [(4, 2, 12, torch.float32), (18, 2, 8, torch.float32), (4, 2, 8, torch.float64)]:
        q, kc, vc, meta = paged_step([1, 1], [9, 30], hq, hk, d, 4, seed=8)
        q, kc, vc = q.to(dtype), kc.to(dtype), vc.to(dtype)
        assert not cpu_kernel.supports(q, kc)
        torch.testing.assert_close(backend.paged_attention(q, kc, vc, meta, 1.0),
                                   TorchAttentionBackend().paged_attention(q, kc, vc, meta, 1.0))


@needs_kernel
def test_softmax_of_extreme_scores_stays_finite_and_exact():
    """Scores thousands apart (the exp underflows to 0 for all but the max) and all equal."""
    q, kc, vc, meta = paged_step([1, 1], [40, 40], 2, 1, 64, 16, seed=9)
    q[0] *= 400.0
    q[1] = 0.0
    out = CpuAttentionBackend(cpu_kernel.load()).paged_attention(q, kc, vc, meta, 1.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, TorchAttentionBackend().paged_attention(q, kc, vc, meta, 1.0), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_build_is_cached_and_a_broken_compiler_means_no_kernel(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSERVE_CACHE_DIR", str(tmp_path))
    first = cpu_kernel.build()
    assert first is not None and first.parent == tmp_path / "kernels"
    mtime = first.stat().st_mtime_ns
    assert cpu_kernel.build() == first and first.stat().st_mtime_ns == mtime  # no second compile
    assert cpu_kernel.build(compiler="false") == first  # a cached build needs no compiler
    first.unlink()
    assert cpu_kernel.build(compiler="false") is None  # the compiler fails: no kernel
    assert list((tmp_path / "kernels").iterdir()) == []  # and no half-written file left


def test_backend_selection(monkeypatch):
    assert isinstance(get_backend("cpu", "torch"), TorchAttentionBackend)
    assert not isinstance(get_backend("cpu", "torch"), CpuAttentionBackend)
    monkeypatch.setattr(cpu_kernel, "load", lambda: None)  # no compiler on this machine
    assert type(get_backend("cpu")) is TorchAttentionBackend
    with pytest.raises(RuntimeError, match="did not build"):
        get_backend("cpu", "cpu")


@needs_kernel
def test_default_cpu_backend_is_the_kernel():
    assert isinstance(get_backend("cpu"), CpuAttentionBackend)


def test_env_switch_disables_the_kernel(monkeypatch):
    monkeypatch.setenv(cpu_kernel.DISABLE_ENV, "0")
    assert cpu_kernel.load.__wrapped__() is None


@needs_kernel
@pytest.mark.parametrize("window, softcap", [(7, None), (16, None), (33, 5.0), (None, 3.0), (1, None)])
def test_decodes_with_sliding_window_and_softcap_match_reference(window, softcap):
    """Windows starting mid-block, on a block edge and past short contexts; soft-capped scores;
    GQA groups with code of their own (3) and without (6)."""
    from engine.attention.metadata import AttentionVariant

    variant = AttentionVariant(window=window, softcap=softcap)
    k_lens = [1, 5, 16, 17, 40, 100, 33, 64]
    for hq, hk, d in [(6, 2, 64), (12, 2, 32)]:
        q, kc, vc, meta = paged_step([1] * len(k_lens), k_lens, hq, hk, d, 16, seed=hq)
        ref = TorchAttentionBackend().paged_attention(q, kc, vc, meta, 0.5, variant=variant)
        out = CpuAttentionBackend(cpu_kernel.load()).paged_attention(q, kc, vc, meta, 0.5, variant=variant)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        plain = TorchAttentionBackend().paged_attention(q, kc, vc, meta, 0.5)
        assert not torch.allclose(out, plain)  # the variant changed something

"""Batch-size ladder of the decode graphs (pure; the graph path itself is tested under the
interpreted kernels in test_triton_kernels.py and on a GPU in test_gpu_engine.py)."""
from engine.cuda_graphs import graph_batch_sizes, padded_size


def test_ladder_is_powers_then_multiples_of_16():
    assert graph_batch_sizes(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert graph_batch_sizes(5) == [1, 2, 4, 5]
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(40) == [1, 2, 4, 8, 16, 32, 40]


def test_padded_size_is_the_next_captured_size():
    sizes = graph_batch_sizes(64)
    assert [padded_size(sizes, b) for b in (1, 3, 8, 9, 17, 64)] == [1, 4, 8, 16, 32, 64]
    assert padded_size(sizes, 65) is None


def _graphs_without_capture(max_batch: int, max_model_len: int, block_size: int, backend=None):
    """DecodeGraphs on CPU with a stand-in model that records the inputs of each forward."""
    import torch

    from engine.cuda_graphs import DecodeGraphs

    seen = []

    def model(ids, positions, ctx):
        meta = ctx.meta
        seen.append(dict(ids=ids.tolist(), pos=positions.tolist(), slots=meta.slot_mapping.tolist(),
                         lens=meta.seq_lens.tolist(), tables=meta.block_tables.clone(), bound=meta.max_seqlen_k))
        return torch.zeros(ids.shape[0], 2)

    graphs = DecodeGraphs(model, [], backend=backend, block_size=block_size, max_batch=max_batch,
                          max_model_len=max_model_len, scratch_block=99, device="cpu", capture=False)
    return graphs, seen


def test_static_buffers_follow_tables_that_grow_move_rows_and_change_in_place():
    """The host buffers are rewritten incrementally (only entries appended since a row's last
    step, plus its last one): each step's inputs must still equal the tables as they are now,
    when tables grow, a copy-on-write replaces the last block in place, rows change sequence,
    and a freed sequence comes back with a new list."""
    bs = 4
    graphs, seen = _graphs_without_capture(max_batch=4, max_model_len=64, block_size=bs)
    a, b, c = [5, 6], [7], [8, 9, 10]
    steps = [
        ([a, b, c], [6, 3, 9]),
        ([a, b, c], [7, 4, 10]),  # b grows below
        ([a, c], [8, 11]),  # b finished: c moves to row 1
        ([c, a], [12, 9]),  # rows swap
    ]
    for i, (tables, positions) in enumerate(steps):
        if i == 1:
            b.append(11)
            a[-1] = 42  # copy-on-write gave a's last block a fresh id
        if i == 2:
            a.append(43)
        if i == 3:
            c.append(12)
            a = [50, 51, 52]  # preempted and prefilled again: a new list
            tables = [c, a]
        graphs.run([1] * len(tables), positions, tables)
        got = seen[-1]
        for row, (table, p) in enumerate(zip(tables, positions)):
            assert got["tables"][row, : len(table)].tolist() == table
            assert got["slots"][row] == table[p // bs] * bs + p % bs
            assert got["pos"][row] == p and got["lens"][row] == p + 1
        pad = range(len(tables), len(got["ids"]))
        assert all(got["slots"][r] == 99 * bs and got["lens"][r] == 0 and got["ids"][r] == 0 for r in pad)
    assert [len(s["ids"]) for s in seen] == [4, 4, 2, 2]


def test_a_step_replays_the_smallest_context_bound_that_holds_it():
    """Contexts within one split-K partition replay the graph planned for that bound (single-pass
    decode, one launch per layer); a longer one the graph planned for max_model_len."""
    from types import SimpleNamespace

    graphs, seen = _graphs_without_capture(max_batch=2, max_model_len=64, block_size=4,
                                           backend=SimpleNamespace(partition_size=8))
    assert graphs.bounds == [8, 64] and len(graphs._ctx) == 2 * len(graphs.sizes)
    table = list(range(16))
    for positions, bound in (([3, 7], 8), ([8, 2], 64), ([0], 8), ([63], 64)):
        graphs.run([1] * len(positions), positions, [table] * len(positions))
        assert seen[-1]["bound"] == bound, positions
    wide, _ = _graphs_without_capture(max_batch=2, max_model_len=8, block_size=4,
                                      backend=SimpleNamespace(partition_size=8))
    assert wide.bounds == [8]


def test_tokens_in_flight_override_their_rows_and_forward_alone_reruns_the_last_inputs():
    """Running ahead: rows whose input token is still on the device (sampled by the step before)
    take it from there, as the first rows or at given rows; the host's value for them is a
    placeholder. `forward_alone` (what benchmarks time) runs the step's key on the same inputs."""
    import torch

    graphs, seen = _graphs_without_capture(max_batch=4, max_model_len=64, block_size=4)
    table = list(range(16))
    graphs.run([0, 0, 7], [5, 6, 7], [table] * 3, (None, torch.tensor([11, 12])))
    assert seen[-1]["ids"] == [11, 12, 7, 0]
    graphs.run([3, 0, 0], [5, 6, 7], [table] * 3, (torch.tensor([1, 2]), torch.tensor([21, 22])))
    assert seen[-1]["ids"] == [3, 21, 22, 0]
    graphs.forward_alone(3, 8)()
    assert seen[-1]["ids"] == [3, 21, 22, 0] and seen[-1]["bound"] == 64 and len(seen) == 3


def test_capture_pads_the_inputs_then_captures_every_key(monkeypatch):
    """The capture branch (GPU only) up to the CUDA calls: buffers padded first (K/V into the
    scratch block, lengths 0), then one graph per (batch size, bound); for the encoder-decoder
    graphs, per (batch size, target bound, source bound)."""
    from types import SimpleNamespace

    import torch

    from engine import cuda_graphs
    from engine.encdec_graphs import EncDecGraphs

    captured = []

    def fake_capture(keys, forward):
        graphs = list(keys)
        captured.append((graphs, forward.__self__.vec.clone()))
        return {key: (None, torch.zeros(key[0], 2)) for key in graphs}

    monkeypatch.setattr(cuda_graphs, "capture_graphs", fake_capture)
    backend = SimpleNamespace(partition_size=8)
    for cls, keys_per_size in ((cuda_graphs.DecodeGraphs, 2), (EncDecGraphs, 4)):
        graphs = cls(None, [], backend=backend, block_size=4, max_batch=4, max_model_len=64, scratch_block=9,
                     device="cpu", capture=True)
        keys, vec = captured[-1]
        assert len(keys) == keys_per_size * len(graphs.sizes) and set(keys) == set(graphs._ctx)
        assert vec[2].eq(9 * 4).all() and vec[[0, 1, 3]].eq(0).all() and vec.shape[0] == cls.VEC_ROWS


def test_graphs_asked_for_with_a_backend_that_reads_host_lengths_are_refused():
    """The torch and CPU backends take each sequence's length from the host, which a graph fixes at
    its context bound: they would attend over the whole bound and give wrong tokens."""
    import pytest

    from engine.attention import get_backend
    from engine.cuda_graphs import wanted
    from engine.errors import InvalidRequestError

    for name in ("torch", "cpu"):
        backend = get_backend("cpu", name)
        with pytest.raises(InvalidRequestError, match="triton"):
            wanted(True, "cpu", backend)
        assert wanted(None, "cpu", backend) is False and wanted(False, "cpu", backend) is False

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

"""Block manager: exact block ids, reference counts, copy-on-write and free order."""
from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence


def make_seq(seq_id: int, num_tokens: int) -> Sequence:
    return Sequence(seq_id, f"r{seq_id}", list(range(num_tokens)), num_tokens, SamplingParams(), 16)


def test_allocate_takes_blocks_in_order_and_free_appends():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = make_seq(0, 10), make_seq(1, 5)
    assert bm.allocate_slots(a, 10)
    assert a.block_table == [0, 1, 2]
    assert bm.allocate_slots(b, 5)
    assert b.block_table == [3, 4]
    bm.free(a)
    assert bm.num_free_blocks == 6
    c = make_seq(2, 16)
    assert bm.allocate_slots(c, 16)
    # the free list is FIFO: never-used 5, 6, 7 first, then a's blocks in reverse order
    assert c.block_table == [5, 6, 7, 2]
    bm.check_integrity()


def test_allocate_fails_without_change_when_short():
    bm = BlockManager(num_blocks=3, block_size=4)
    a = make_seq(0, 13)
    assert not bm.allocate_slots(a, 13)
    assert a.block_table == [] and bm.num_free_blocks == 3
    assert bm.allocate_slots(a, 12)
    assert bm.num_free_blocks == 0


def test_append_within_last_block_needs_no_new_block():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_seq(0, 6)
    assert bm.allocate_slots(a, 6)
    a.num_computed_tokens = 6
    assert bm.num_blocks_needed(a, 2) == 0
    assert bm.num_blocks_needed(a, 3) == 1
    assert bm.allocate_slots(a, 3) and a.block_table == [0, 1, 2]


def test_fork_shares_and_copy_on_write_splits_last_block():
    bm = BlockManager(num_blocks=6, block_size=4)
    parent = make_seq(0, 6)
    assert bm.allocate_slots(parent, 6)
    parent.num_computed_tokens = 6
    child = make_seq(1, 6)
    child.num_computed_tokens = 6
    bm.fork(parent, child)
    assert child.block_table == [0, 1] and bm.ref_count(0) == 2 and bm.ref_count(1) == 2
    # the child writes into shared block 1: it gets a private copy, block 0 stays shared
    assert bm.allocate_slots(child, 1)
    assert child.block_table == [0, 2]
    assert bm.take_pending_copies() == [(1, 2)]
    assert bm.ref_count(1) == 1 and bm.ref_count(0) == 2
    # the parent now owns block 1 alone and writes in place
    assert bm.allocate_slots(parent, 1) and parent.block_table == [0, 1]
    assert bm.take_pending_copies() == []
    bm.free(parent)
    assert bm.ref_count(0) == 1 and bm.num_free_blocks == 4
    bm.free(child)
    assert bm.num_free_blocks == 6
    bm.check_integrity()


def test_usage_fraction():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make_seq(0, 3)
    bm.allocate_slots(a, 3)
    assert bm.usage == 0.5

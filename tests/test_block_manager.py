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


def seq_of(seq_id: int, tokens: list[int]) -> Sequence:
    return Sequence(seq_id, f"r{seq_id}", list(tokens), len(tokens), SamplingParams(), 16)


def computed(bm: BlockManager, seq: Sequence) -> None:
    """Allocate and compute all of `seq`'s tokens, as one step would."""
    n = seq.num_tokens - seq.num_computed_tokens
    assert bm.allocate_slots(seq, n)
    seq.num_computed_tokens += n


def test_prefix_cache_hands_back_full_blocks_and_leaves_the_last_token():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    a = seq_of(0, list(range(10)))
    assert bm.match_prefix(a) == 0
    computed(bm, a)  # blocks 0, 1 full and named; block 2 holds 2 tokens, unnamed
    b = seq_of(1, list(range(9)) + [50, 51, 52])  # the same first 9 tokens
    assert bm.match_prefix(b) == 8 and b.block_table == [0, 1] and b.num_computed_tokens == 8
    assert bm.ref_count(0) == bm.ref_count(1) == 2
    c = seq_of(2, list(range(8)))  # fully cached: its last block is computed again for the logits
    assert bm.match_prefix(c) == 4 and c.block_table == [0]
    computed(bm, b)
    assert b.block_table == [0, 1, 3] and b.num_cached_blocks == 3
    bm.check_integrity()


def test_prefix_digest_covers_every_token_before_the_block():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    computed(bm, seq_of(0, [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    # same second block, different first block: nothing matches
    assert bm.match_prefix(seq_of(1, [0, 2, 3, 4, 5, 6, 7, 8, 9])) == 0
    assert bm.match_prefix(seq_of(2, [1, 2, 3, 4, 5, 6, 7, 0, 9])) == 4


def test_freed_blocks_stay_cached_until_evicted_least_recently_used_first():
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=True)
    a = seq_of(0, [1, 2, 3, 4, 5])
    computed(bm, a)
    assert a.block_table == [0, 1, 2]
    bm.free(a)  # free list: 3, then a's blocks tail first: 2, 1, 0
    assert bm.num_free_blocks == 4 and bm.usage == 0.0
    b = seq_of(1, [1, 2, 3, 4, 9])
    assert bm.match_prefix(b) == 4 and b.block_table == [0, 1] and bm.num_free_blocks == 2
    bm.free(b)
    # a new prompt takes never-named 3, then 2 (a's partial block, freed before b took 0 and 1
    # back), then evicts b's blocks tail first, so a prefix loses its end before its start
    c = seq_of(2, [7] * 7)
    computed(bm, c)
    assert c.block_table == [3, 2, 1, 0]
    bm.check_integrity()
    assert bm.match_prefix(seq_of(3, [1, 2, 3, 4, 5])) == 0  # a's prefix was evicted


def test_prefix_cache_off_matches_nothing():
    bm = BlockManager(num_blocks=8, block_size=4)
    computed(bm, seq_of(0, list(range(10))))
    b = seq_of(1, list(range(10)))
    assert bm.match_prefix(b) == 0 and b.block_table == []


def test_reset_forgets_every_digest():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    computed(bm, seq_of(0, list(range(10))))
    bm.reset_prefix_cache()
    bm.check_integrity()
    assert bm.match_prefix(seq_of(1, list(range(10)))) == 0


def test_a_token_not_yet_on_the_host_names_its_block_later():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    a = seq_of(0, [1, 2, 3])
    computed(bm, a)
    a.num_inflight = 1  # running ahead: the 4th token is sampled on the device, its id unknown here
    assert bm.allocate_slots(a, 1)
    a.num_computed_tokens += 1
    assert a.num_cached_blocks == 0  # block 0 is full but its last id is not known
    a.token_ids.append(4)
    a.num_inflight = 0
    assert bm.allocate_slots(a, 1)
    assert a.num_cached_blocks == 1
    assert bm.match_prefix(seq_of(1, [1, 2, 3, 4, 5])) == 4


def test_blocks_behind_a_sliding_window_are_freed_once():
    bm = BlockManager(num_blocks=8, block_size=4, sliding_window=6)
    a = make_seq(0, 14)
    assert bm.allocate_slots(a, 14)
    a.num_computed_tokens = 14  # the next query is at 14: it sees keys 9..14
    assert bm.free_behind_window(a) == 2  # blocks 0 (keys 0-3) and 1 (4-7); block 2 holds key 9
    assert a.block_table == [0, 1, 2, 3] and a.num_freed_blocks == 2  # positions still index the table
    assert bm.num_free_blocks == 6 and bm.free_behind_window(a) == 0
    a.num_computed_tokens, a.num_inflight = 17, 1  # a step launched ahead: its query at 16 sees 11..16
    assert bm.free_behind_window(a) == 0
    a.num_inflight = 0
    assert bm.free_behind_window(a) == 1  # the next query at 17 sees 12..17: block 2 (8-11) goes
    bm.check_integrity()
    b = make_seq(1, 4)
    bm.fork(a, b)  # a fork shares only the blocks still held
    assert b.num_freed_blocks == 3 and bm.ref_count(3) == 2 and bm.ref_count(0) == 0
    bm.free(a)
    bm.free(b)  # freed entries are not released twice
    assert bm.num_free_blocks == 8 and a.num_freed_blocks == b.num_freed_blocks == 0
    bm.check_integrity()
    assert BlockManager(num_blocks=8, block_size=4).free_behind_window(make_seq(2, 30)) == 0  # no window


def test_a_block_freed_behind_the_window_is_never_named():
    """Running ahead, a block can fill while its last token is still on the device (so it is not named
    yet) and leave a one-key window before that token lands: once freed, another sequence may take it,
    so naming it later would hand that sequence's K/V to whoever matches the prefix."""
    bm = BlockManager(num_blocks=3, block_size=4, enable_prefix_caching=True, sliding_window=1)
    a = seq_of(0, [1, 2, 3])
    computed(bm, a)
    a.num_inflight = 1  # token 3 sampled on the device
    for _ in range(2):  # two steps launched ahead: positions 3 (fills block 0) and 4 (block 1)
        assert bm.allocate_slots(a, 1)
        a.num_computed_tokens += 1
        a.num_inflight += 1
    assert a.num_cached_blocks == 0 and a.block_table == [0, 1]
    for token in (4, 5):  # the two land
        a.token_ids.append(token)
        a.num_inflight -= 1
        bm.free_behind_window(a)
    assert a.num_freed_blocks == 1  # block 0 went back unnamed
    b = seq_of(1, [20, 21, 22, 23, 24])
    assert bm.allocate_slots(b, 5) and b.block_table == [2, 0]  # b writes block 0 (partly: unnamed)
    assert bm.allocate_slots(a, 1)  # a's next step names its full blocks: not the one it gave back
    assert bm.match_prefix(seq_of(2, [1, 2, 3, 4, 9])) == 0
    bm.check_integrity()

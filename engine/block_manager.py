"""Fixed-size KV blocks: a free list, reference counts and the prefix cache. No torch.

Blocks are opaque ids to the scheduler; only the model runner turns them into cache slots.
Allocation takes from the front of the free list and freeing appends to the back, so block ids
are reused in a predictable order (tests assert exact ids).

Prefix caching (vLLM's automatic prefix caching): a full block is named by a digest of its
tokens and of every token before it, so equal digests mean equal K/V. A freed block keeps its
digest while it waits on the free list; a new sequence whose leading blocks' digests are known
takes those blocks back instead of computing them, and only a block taken for new tokens loses
its digest. Free blocks are reused oldest-freed first, so the cache evicts least recently used.

With a sliding window on every layer (Mistral, Phi-3), a block every future query's window has
passed is given back at once (`free_behind_window`), as vLLM does: a long sequence then holds
about a window's worth of blocks, not its whole length.
"""
from __future__ import annotations

import hashlib
import itertools
from array import array
from collections import OrderedDict

from engine.lora import prefix_root
from engine.sequence import Sequence


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    """Owns which KV blocks are free and how many sequences share each used one."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False,
                 sliding_window: int | None = None) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.sliding_window = sliding_window  # every layer's, where all share one; None: keep all blocks
        # an ordered set: a cache hit takes a block out of the middle, allocation pops the front
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._ref_counts = [0] * num_blocks
        self._digest_of: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}  # digest -> the block holding that K/V
        # (src, dst) block copies that copy-on-write decided; the runner applies them before the step
        self.pending_copies: list[tuple[int, int]] = []

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def num_blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Fresh blocks to hold `num_new_tokens` more computed tokens, copy-on-write included."""
        total = cdiv(seq.num_computed_tokens + num_new_tokens, self.block_size)
        return max(0, total - len(seq.block_table)) + len(self._shared_written(seq, num_new_tokens))

    def _shared_written(self, seq: Sequence, num_new_tokens: int) -> list[int]:
        """Indices into the block table of shared blocks that the new tokens would write into."""
        if num_new_tokens == 0:
            return []
        first = seq.num_computed_tokens // self.block_size
        last = min(len(seq.block_table), cdiv(seq.num_computed_tokens + num_new_tokens, self.block_size))
        return [i for i in range(first, last) if self._ref_counts[seq.block_table[i]] > 1]

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Give `seq` room for `num_new_tokens` more tokens; False (and no change) if blocks run out."""
        table = seq.block_table
        last = (seq.num_computed_tokens + num_new_tokens - 1) // self.block_size
        if num_new_tokens == 1 and last < len(table) and self._ref_counts[table[last]] == 1:
            # most decodes: the token goes into a block it owns alone; at most a block to name
            if self.enable_prefix_caching and len(seq.token_ids) // self.block_size > seq.num_cached_blocks:
                self._cache_full_blocks(seq, num_new_tokens)
            return True
        if self.num_blocks_needed(seq, num_new_tokens) > len(self._free):
            return False
        for i in self._shared_written(seq, num_new_tokens):
            src = seq.block_table[i]
            dst = self._take()
            self._ref_counts[src] -= 1
            seq.block_table[i] = dst
            self.pending_copies.append((src, dst))
        total = cdiv(seq.num_computed_tokens + num_new_tokens, self.block_size)
        while len(seq.block_table) < total:
            seq.block_table.append(self._take())
        self._cache_full_blocks(seq, num_new_tokens)
        return True

    # ---- prefix cache -------------------------------------------------------------
    def match_prefix(self, seq: Sequence) -> int:
        """Give a sequence that holds no blocks the cached blocks of its longest cached prefix, as
        computed tokens; returns how many. Its last token is always left to compute: the step
        that computes it samples the next one."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        if not self.enable_prefix_caching:
            return 0
        bs = self.block_size
        wanted = (seq.num_tokens - 1) // bs
        self._extend_digests(seq, wanted)
        for digest in itertools.islice(seq.block_digests, wanted):
            block_id = self._cached.get(digest)
            if block_id is None:
                break
            if self._ref_counts[block_id] == 0:
                del self._free[block_id]
            self._ref_counts[block_id] += 1
            seq.block_table.append(block_id)
        seq.num_cached_blocks = len(seq.block_table)
        seq.num_computed_tokens = len(seq.block_table) * bs
        return seq.num_computed_tokens

    def reset_prefix_cache(self) -> None:
        """Forget every digest (a failed step may have left blocks named but never written)."""
        self._cached.clear()
        self._digest_of = [None] * self.num_blocks

    def _cache_full_blocks(self, seq: Sequence, num_new_tokens: int) -> None:
        """Name the blocks this step fills whose tokens are all known (a token sampled on the device
        but not yet on the host waits for a later step). They are named when scheduled, before the
        step writes them: a sequence admitted in the same step reads them only after the layer that
        writes them, and every later step runs after this one."""
        if not self.enable_prefix_caching:
            return
        full = min(seq.num_computed_tokens + num_new_tokens, seq.num_tokens) // self.block_size
        if full <= seq.num_cached_blocks:
            return
        self._extend_digests(seq, full)
        digests = seq.block_digests
        # a block already given back behind a sliding window may hold another sequence's K/V by now
        for i in range(max(seq.num_cached_blocks, seq.num_freed_blocks), full):
            block_id = seq.block_table[i]
            if digests[i] not in self._cached and self._digest_of[block_id] is None:
                self._cached[digests[i]] = block_id
                self._digest_of[block_id] = digests[i]
        seq.num_cached_blocks = full

    def _extend_digests(self, seq: Sequence, num_blocks: int) -> None:
        """Make `seq.block_digests` cover its first `num_blocks` blocks, each digest over the one
        before and the block's tokens (SHA-256: a collision would hand one request another's K/V,
        so no weak hash). Each is computed once: tokens are only ever appended. The first starts
        from the sequence's adapter, whose K/V differ from the base model's for the same tokens."""
        digests, bs = seq.block_digests, self.block_size
        for i in range(len(digests), num_blocks):
            parent = digests[i - 1] if i else prefix_root(seq.lora_id)
            digests.append(hashlib.sha256(parent + array("q", seq.token_ids[i * bs : (i + 1) * bs]).tobytes()).digest())

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Let `child` share all of `parent`'s blocks (beams, parallel samples); writes copy later."""
        assert not child.block_table, "fork into a sequence that already holds blocks"
        child.block_table = list(parent.block_table)
        child.num_freed_blocks = parent.num_freed_blocks
        for block_id in child.block_table[child.num_freed_blocks:]:
            self._ref_counts[block_id] += 1

    def free(self, seq: Sequence) -> None:
        """Release the sequence's blocks; a block returns to the free list when no one shares it."""
        for block_id in reversed(seq.block_table[seq.num_freed_blocks:]):  # the tail first: it is evicted first
            self._release(block_id)
        seq.block_table = []
        seq.num_cached_blocks = 0
        seq.num_freed_blocks = 0

    def free_behind_window(self, seq: Sequence) -> int:
        """Give back the blocks no query of `seq` will attend again: a query at position p sees keys
        p - window + 1 .. p, and every query still to run is at `num_computed_tokens` or later, less
        the tokens of a step launched ahead and not landed (its query is already counted as
        computed). Call it once a step's tokens have landed (rejected drafts taken back). Returns
        how many blocks were freed."""
        if self.sliding_window is None:
            return 0
        first_needed = seq.num_computed_tokens - seq.num_inflight - self.sliding_window + 1
        behind = min(max(0, first_needed) // self.block_size, len(seq.block_table))
        if behind <= seq.num_freed_blocks:
            return 0
        for block_id in seq.block_table[seq.num_freed_blocks:behind]:  # oldest first: evicted first
            self._release(block_id)
        freed, seq.num_freed_blocks = behind - seq.num_freed_blocks, behind
        return freed

    def _release(self, block_id: int) -> None:
        self._ref_counts[block_id] -= 1
        if self._ref_counts[block_id] == 0:
            self._free[block_id] = None

    def take_pending_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def _take(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        assert self._ref_counts[block_id] == 0
        self._ref_counts[block_id] = 1
        digest = self._digest_of[block_id]
        if digest is not None:  # evicted: its K/V is about to be overwritten
            self._digest_of[block_id] = None
            del self._cached[digest]
        return block_id

    def check_integrity(self) -> None:
        """Every block is either free with count 0 or used with a positive count, never both; the
        digest index and each block's digest agree."""
        for block_id, count in enumerate(self._ref_counts):
            assert (count == 0) == (block_id in self._free), f"block {block_id}: count {count}"
        assert all(self._digest_of[b] == d for d, b in self._cached.items()), "digest index out of date"
        assert sum(d is not None for d in self._digest_of) == len(self._cached), "a digest outside the index"

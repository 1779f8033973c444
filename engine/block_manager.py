"""Fixed-size KV blocks: a free list and reference counts. Ints only, no torch.

Blocks are opaque ids to the scheduler; only the model runner turns them into cache slots.
Allocation takes from the front of the free list and freeing appends to the back, so block ids
are reused in a predictable order (tests assert exact ids).
"""
from __future__ import annotations

from collections import deque

from engine.sequence import Sequence


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    """Owns which KV blocks are free and how many sequences share each used one."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._ref_counts = [0] * num_blocks
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
            return True  # most decodes: the token goes into a block it owns alone, nothing to do
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
        return True

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Let `child` share all of `parent`'s blocks (beams, parallel samples); writes copy later."""
        assert not child.block_table, "fork into a sequence that already holds blocks"
        child.block_table = list(parent.block_table)
        for block_id in child.block_table:
            self._ref_counts[block_id] += 1

    def free(self, seq: Sequence) -> None:
        """Release the sequence's blocks; a block returns to the free list when no one shares it."""
        for block_id in reversed(seq.block_table):
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                self._free.append(block_id)
        seq.block_table = []

    def take_pending_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def _take(self) -> int:
        block_id = self._free.popleft()
        assert self._ref_counts[block_id] == 0
        self._ref_counts[block_id] = 1
        return block_id

    def check_integrity(self) -> None:
        """Every block is either free with count 0 or used with a positive count, never both."""
        free = set(self._free)
        assert len(free) == len(self._free), "a block is on the free list twice"
        for block_id, count in enumerate(self._ref_counts):
            assert (count == 0) == (block_id in free), f"block {block_id}: count {count}"

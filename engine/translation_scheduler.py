"""Continuous batching of encoder-decoder requests over one paged block pool. Ints only, no torch.

A request is a `TranslationGroup`: its source (whose cross-attention K/V live in blocks of a
`cross` Sequence it owns until it finishes) and its decoder beams (1 for greedy/sampling,
`num_beams` for beam search, sharing prefix blocks by ref count). Self- and cross-attention
blocks come from the same pool (they have the same shape: one decoder layer's heads).

A group is scheduled whole: its encoder (once, when admitted) and one decoder chunk for every
beam, since beam search needs every beam's logits in the same step. Under one token budget,
running groups go first; when blocks run out the newest running group is preempted BY
RECOMPUTE: all its blocks (cross and self) are freed, and on readmission the encoder runs again
and each beam recomputes its prefix (tokens and beam scores are kept on the host). A request is
only admitted if it fits the pool alone (checked by the engine), so preemption always ends.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockManager, cdiv
from engine.sequence import Sequence, SequenceStatus


@dataclass(eq=False)
class TranslationGroup:
    """One translation request: a cross-attention 'sequence' (the source) and its decoder beams."""

    request_id: str
    cross: Sequence  # token_ids = source; block_table = cross-attention K/V blocks
    beams: list[Sequence]
    num_beams: int  # beams once search has expanded (1: greedy or sampling)
    status: SequenceStatus = SequenceStatus.WAITING

    @property
    def source_len(self) -> int:
        return self.cross.num_tokens

    @property
    def needs_encoder(self) -> bool:
        return self.cross.num_computed_tokens < self.cross.num_tokens

    @property
    def num_step_tokens(self) -> int:
        """Tokens this group computes in its next step (encoder + decoder chunks)."""
        enc = self.source_len if self.needs_encoder else 0
        return enc + sum(b.num_uncomputed_tokens for b in self.beams)


def group_max_blocks(source_len: int, max_decoder_len: int, num_beams: int, block_size: int) -> int:
    """Blocks a group may hold at once, at worst (no prefix shared), plus the copy-on-write slack
    of the conservative per-beam estimate in `TranslationScheduler._allocate`."""
    return cdiv(source_len, block_size) + num_beams * (cdiv(max_decoder_len, block_size) + 1)


@dataclass
class TranslationBatch:
    """One step: which groups run (and which of them encode first), copies to apply first."""

    groups: list[TranslationGroup] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[TranslationGroup] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.groups


class TranslationScheduler:
    """Waiting and running queues of groups; the block manager owns the blocks."""

    def __init__(self, block_manager: BlockManager, max_num_batched_tokens: int, max_num_seqs: int) -> None:
        self.block_manager = block_manager
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[TranslationGroup] = deque()
        self.running: list[TranslationGroup] = []
        self.num_preemptions = 0

    def add(self, group: TranslationGroup) -> None:
        self.waiting.append(group)

    @property
    def num_running_seqs(self) -> int:
        return sum(g.num_beams for g in self.running)

    def schedule(self) -> TranslationBatch:
        out = TranslationBatch()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running):
            group = self.running[i]
            n = group.num_step_tokens
            if out.groups and n > budget:
                break  # the rest wait a step; the first group always runs, whatever its size
            while not self._allocate(group):
                victim = self.running.pop()  # the newest: it loses the least work
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is group:
                    break
            else:
                out.groups.append(group)
                budget -= n
                i += 1
                continue
            break
        # A step that had to preempt admits nothing new: the pool is already too full.
        while not out.preempted and self.waiting:
            group = self.waiting[0]
            n = group.num_step_tokens
            if out.groups and (n > budget or self.num_running_seqs + group.num_beams > self.max_num_seqs):
                break
            if not self._allocate(group):
                break
            self.waiting.popleft()
            group.status = SequenceStatus.RUNNING
            self.running.append(group)
            out.groups.append(group)
            budget -= n
        out.block_copies = self.block_manager.take_pending_copies()
        return out

    def _allocate(self, group: TranslationGroup) -> bool:
        """Blocks for the group's whole step, or False and no change. The per-beam estimate counts
        a copy-on-write for every beam sharing a block, so it never falls short."""
        bm = self.block_manager
        needed = cdiv(group.source_len, bm.block_size) if group.needs_encoder else 0
        needed += sum(bm.num_blocks_needed(b, b.num_uncomputed_tokens) for b in group.beams)
        if needed > bm.num_free_blocks:
            return False
        if group.needs_encoder:
            assert bm.allocate_slots(group.cross, group.source_len)
        for beam in group.beams:
            assert bm.allocate_slots(beam, beam.num_uncomputed_tokens)
        return True

    def _preempt(self, group: TranslationGroup) -> None:
        self.free(group)
        group.cross.num_computed_tokens = 0
        for beam in group.beams:
            beam.num_computed_tokens = 0
            beam.num_preemptions += 1
        group.status = SequenceStatus.WAITING
        self.num_preemptions += 1
        self.waiting.appendleft(group)  # popped newest-first, so the oldest ends up in front

    def free(self, group: TranslationGroup) -> None:
        self.block_manager.free(group.cross)
        for beam in group.beams:
            self.block_manager.free(beam)

    def finish(self, group: TranslationGroup) -> None:
        """Finish (or abort) a group wherever it is and free all its blocks at once."""
        if group.status is SequenceStatus.RUNNING:
            self.running.remove(group)
        elif group.status is SequenceStatus.WAITING:
            self.waiting.remove(group)
        group.status = SequenceStatus.FINISHED
        self.free(group)

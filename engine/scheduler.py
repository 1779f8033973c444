"""Continuous batching under one token budget, vLLM v1 style: no prefill or decode "phase".

Each step every running sequence asks for the tokens it has not computed yet (a decode asks
for 1, a prompt for as many as the budget allows: chunked prefill), then waiting sequences
are admitted while budget, blocks and `max_num_seqs` last. An admitted sequence starts from the
longest prefix the block manager has cached, as tokens already computed. When blocks run out,
the newest running sequence is preempted by recompute and goes back to the front of the queue
(and, its blocks being cached, mostly finds them again). A sequence whose LoRA adapter would
make more than `max_loras` distinct ones run at once waits, and the ones behind it go first.

Under the priority policy both queues are kept in `Sequence.rank` order (priority, then arrival),
so the preemption victim, the last running one, is the lowest-ranked; and a waiting sequence that
outranks running ones but cannot start (no free seat or too few free blocks for its first chunk)
preempts them, lowest first, before the step is planned.

A step's bookkeeping has two halves: `advance` (its chunks are computed, its sampling rows have
a token in flight) when it is launched, and `land` (the tokens are appended, stop rules applied)
when its tokens reach the host; `update` does both for a step that is not run ahead of.

With n-gram speculation (engine/speculative.py) a decoding sequence also computes the drafts its
own tokens suggest: they count as computed when the step is launched, and `land` takes back
the ones the step's samples rejected, so computed tokens never run ahead of verified ones.
"""
from __future__ import annotations

from bisect import insort
from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockManager, cdiv
from engine.config import SchedulerConfig
from engine.lora import fits
from engine.sequence import Sequence, SequenceStatus
from engine.speculative import SpeculativeConfig, pack, propose_ngram


@dataclass
class SchedulerOutput:
    """What one step computes: `num_new_tokens[i]` tokens of `seqs[i]`, starting at its
    `num_computed_tokens`. A sequence samples when the chunk reaches its last token."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    sampling: list[bool] = field(default_factory=list)  # row i's chunk reaches its sequence's end
    # row i's draft tokens, computed after its last token; a sampling row samples 1 + len(drafts[i])
    drafts: list[list[int]] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def add(self, seq: Sequence, n: int, drafts: list[int] | None = None) -> None:
        drafts = drafts or []
        self.seqs.append(seq)
        self.num_new_tokens.append(n)
        self.sampling.append(seq.num_computed_tokens + n == seq.num_tokens + seq.num_inflight + len(drafts))
        self.drafts.append(drafts)


class Scheduler:
    """Owns the waiting and running queues; the block manager owns the blocks."""

    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        eos_token_ids: frozenset[int] = frozenset(),
        speculative: SpeculativeConfig | None = None,
        max_loras: int | None = None,
    ) -> None:
        """`max_loras`: distinct LoRA adapters running at once (engine/lora.py); None: no adapters."""
        self.config = config
        self.block_manager = block_manager
        self.eos_token_ids = eos_token_ids
        self.speculative = speculative
        self.max_loras = max_loras
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_prefix_queried_tokens = 0  # prompt tokens looked up in the prefix cache
        self.num_prefix_hit_tokens = 0  # of those, found there
        self.num_draft_tokens = 0  # drafts verified (speculative decoding)
        self.num_accepted_tokens = 0  # of those, accepted

    @property
    def by_priority(self) -> bool:
        return self.config.policy == "priority"

    def add(self, seq: Sequence) -> None:
        if self.by_priority:
            insort(self.waiting, seq, key=_rank)
        else:
            self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        if self.by_priority:
            self._make_room_for_waiting(out)
        starved = False  # a running sequence had to preempt: the pool is already too full
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.num_inflight and seq.num_output_tokens + seq.num_inflight >= seq.max_tokens:
                i += 1  # its token in flight is its last: nothing more to compute
                continue
            drafts = self._drafts(seq, budget)
            if drafts and self.block_manager.allocate_slots(seq, 1 + len(drafts)):
                out.add(seq, 1 + len(drafts), drafts)
                budget -= 1 + len(drafts)
                i += 1
                continue  # no room for the drafts: the plain decode below may still preempt for its token
            n = min(seq.num_uncomputed_tokens, budget)
            while not self.block_manager.allocate_slots(seq, n):
                victim = self.running.pop()  # the newest (lowest-ranked): it loses the least work
                self._preempt(victim)
                out.preempted.append(victim)
                starved = True
                if victim is seq:
                    break
            else:
                out.add(seq, n)
                budget -= n
                i += 1
                continue
            break  # `seq` preempted itself: nothing older is left to make room for
        # A step that had to preempt admits nothing new: the pool is already too full.
        skipped: list[Sequence] = []  # their adapter would exceed max_loras: they keep their place
        while not starved and self.waiting and budget > 0:
            if len(self.running) >= self.config.max_num_seqs:
                break
            seq = self.waiting[0]
            if self.max_loras is not None and not fits(seq.lora_id, (s.lora_id for s in self.running), self.max_loras):
                skipped.append(self.waiting.popleft())
                continue
            cached = 0 if seq.wants_prompt_logprobs else self.block_manager.match_prefix(seq)
            n = min(seq.num_uncomputed_tokens, budget)
            if not self.block_manager.allocate_slots(seq, n):
                self.block_manager.free(seq)  # the cached blocks too: they wait on the free list
                seq.num_computed_tokens = 0
                break
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = cached
                self.num_prefix_queried_tokens += seq.num_tokens
                self.num_prefix_hit_tokens += cached
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            if self.by_priority:
                insort(self.running, seq, key=_rank)
            else:
                self.running.append(seq)
            out.add(seq, n)
            budget -= n
        self.waiting.extendleft(reversed(skipped))
        out.block_copies = self.block_manager.take_pending_copies()
        return out

    def _make_room_for_waiting(self, out: SchedulerOutput) -> None:
        """Preempt the lowest-ranked running sequences while the first waiting one outranks them and
        has no free seat or too few free blocks for its first chunk (counted without cache hits)."""
        while self.waiting and self.running and self.running[-1].rank > self.waiting[0].rank:
            head = self.waiting[0]
            if self.max_loras is not None and not fits(head.lora_id, (s.lora_id for s in self.running[:-1]),
                                                        self.max_loras):
                return  # its adapter would not fit even then: preempting would not let it start
            first_chunk = min(head.num_uncomputed_tokens, self.config.max_num_batched_tokens)
            seated = len(self.running) < self.config.max_num_seqs
            if seated and cdiv(first_chunk, self.block_manager.block_size) <= self.block_manager.num_free_blocks:
                return
            victim = self.running.pop()
            self._preempt(victim)
            out.preempted.append(victim)

    def _drafts(self, seq: Sequence, budget: int) -> list[int]:
        """Draft tokens for a sequence about to decode, leaving room for the token the step always
        adds within its `max_tokens` and the budget. None for a grammar: its mask at a draft's
        position would need the grammar advanced through the drafts before it."""
        spec = self.speculative
        if spec is None or seq.num_uncomputed_tokens != 1 or seq.num_inflight:
            return []
        if spec.disable_by_batch_size is not None and len(self.running) + len(self.waiting) > spec.disable_by_batch_size:
            return []
        if seq.params.structured is not None:
            return []
        room = min(seq.max_tokens - seq.num_output_tokens, budget) - 1
        return propose_ngram(seq.token_ids, spec, room, pack(seq.token_ids, seq.packed_token_ids))

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        if self.by_priority:
            insort(self.waiting, seq, key=_rank)
        else:
            self.waiting.appendleft(seq)  # popped newest-first, so the oldest ends up in front

    def update(self, out: SchedulerOutput, sampled: list[int | None],
               accepted: list[list[int]] | None = None) -> list[Sequence]:
        """`advance` then `land`: a step whose tokens are on the host when the next is scheduled."""
        self.advance(out)
        return self.land(out, sampled, accepted)

    def advance(self, out: SchedulerOutput) -> None:
        """The step is launched: its chunks count as computed, its sampling rows hold a token in flight."""
        for seq, n, samples in zip(out.seqs, out.num_new_tokens, out.sampling):
            seq.num_computed_tokens += n
            seq.num_inflight += samples

    def land(self, out: SchedulerOutput, sampled: list[int | None],
             accepted: list[list[int]] | None = None) -> list[Sequence]:
        """Append the step's sampled tokens (None: did not sample), after the drafts each row
        accepted (`accepted[i]`, a prefix of `out.drafts[i]`), and finish sequences that hit a
        stop token or their length; returns the finished ones. Rejected drafts stop counting as
        computed: the cache slots they wrote are written again by the tokens that replace them.
        A sequence finished meanwhile (stopped by the step before, or aborted) drops its tokens."""
        finished: list[Sequence] = []
        for i, (seq, token) in enumerate(zip(out.seqs, sampled)):
            if token is None:
                continue
            seq.num_inflight -= 1
            drafts = out.drafts[i]
            kept = accepted[i] if accepted is not None else []
            assert kept == drafts[: len(kept)], "accepted tokens must be a prefix of the drafts"
            self.num_draft_tokens += len(drafts)
            self.num_accepted_tokens += len(kept)
            if seq.is_finished:
                continue
            seq.num_computed_tokens -= len(drafts) - len(kept)
            for t in (*kept, token):
                seq.token_ids.append(t)
                reason = self._stop_reason(seq, t)
                if reason is not None:
                    seq.finish_reason, seq.stop_reason = reason
                    self.finish(seq)
                    finished.append(seq)
                    break
        if self.block_manager.sliding_window is not None:  # no per-sequence pass for models without one
            for seq in out.seqs:  # the landed tokens are final now: blocks behind the window can go
                if seq.status is SequenceStatus.RUNNING:
                    self.block_manager.free_behind_window(seq)
        return finished

    def _stop_reason(self, seq: Sequence, token: int) -> tuple[str, int | None] | None:
        params = seq.params
        if token in params.stop_token_ids:
            return "stop", token
        if not params.ignore_eos and token in self.eos_token_ids:
            return "stop", None
        if seq.num_output_tokens >= seq.max_tokens:
            return "length", None
        return None

    def finish(self, seq: Sequence, reason: str | None = None) -> None:
        """Finish (or abort) a sequence wherever it is and free its blocks at once."""
        if reason is not None:
            seq.finish_reason = reason
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        self.block_manager.free(seq)


def _rank(seq: Sequence) -> tuple[int, float, int]:
    return seq.rank

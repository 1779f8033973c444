"""One sequence being generated: its tokens, how many have been computed, and its blocks.

No torch here: the scheduler and block manager reason about sequences with ints only.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """A prompt plus what has been sampled after it.

    Invariant: `num_computed_tokens <= num_tokens`; KV for tokens [0, num_computed_tokens) lives in
    `block_table`. The scheduler lets `num_computed_tokens` catch up with `num_tokens` in chunks;
    when it reaches `num_tokens` the step samples one more token. Preemption (by recompute) drops
    the blocks and resets `num_computed_tokens` to 0; sampled tokens are kept and recomputed.

    Running ahead (engine.engine), a step is launched before the previous one's tokens reach the
    host: `num_inflight` counts tokens sampled on the device but not yet appended. They already
    count as tokens to compute, so the next step feeds them to the model from the device.
    """

    seq_id: int
    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    max_tokens: int  # resolved limit on output tokens (params.max_tokens capped by the context)
    sample_index: int = 0  # which of the request's n samples this is
    arrival_time: float = 0.0
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    # leading entries of `block_table` given back because every future query's sliding window has
    # passed them (BlockManager.free_behind_window); they stay in the table, unowned, so positions
    # still index it, and the attention masks whatever those blocks hold by then
    num_freed_blocks: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_preemptions: int = 0
    num_inflight: int = 0
    # prefix cache (engine.block_manager): digests of its full blocks, computed once (tokens are
    # only ever appended), and how many leading blocks of `block_table` are named by them
    block_digests: list[bytes] = field(default_factory=list)
    num_cached_blocks: int = 0
    num_cached_tokens: int = 0  # of its prompt, found in the prefix cache when first scheduled
    # its token ids as 8-byte ints, extended as tokens are appended: the n-gram proposer's haystack
    # (engine/speculative.py), packed once per token rather than whole every step
    packed_token_ids: bytearray = field(default_factory=bytearray)
    lora_id: int = 0  # the LoRA adapter its request names (engine/lora.py); 0: the base model
    priority: int = 0  # its request's; lower goes first under the priority policy

    @property
    def rank(self) -> tuple[int, float, int]:
        """Its place under the priority policy: priority, then arrival (then id, for a total order)."""
        return self.priority, self.arrival_time, self.seq_id

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) + self.num_inflight - self.num_computed_tokens

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Its prompt is scored (one sample of a request is enough): it cannot start from the
        prefix cache, since a cached token has no hidden state to score it from."""
        return self.params.prompt_logprobs is not None and self.sample_index == 0

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

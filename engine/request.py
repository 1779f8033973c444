"""What the server hands an engine: one request, already tokenized."""
from __future__ import annotations

from dataclasses import dataclass

from engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class GenerationRequest:
    prompt_token_ids: list[int]
    params: SamplingParams
    lora_name: str | None = None  # a LoRA adapter the engine has loaded; None: the base model
    priority: int = 0  # lower goes first, under the priority scheduling policy (SchedulerConfig.policy)


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for metrics; counters are totals since start."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of KV blocks in use, 0..1
    num_preemptions: int
    num_prompt_tokens: int
    num_generation_tokens: int
    num_blocks_total: int = 0
    num_prefix_queried_tokens: int = 0  # prompt tokens looked up in the prefix cache
    num_prefix_hit_tokens: int = 0  # of those, found there
    num_draft_tokens: int = 0  # speculative drafts verified (engine/speculative.py)
    num_accepted_tokens: int = 0  # of those, accepted
    # LoRA adapters (engine/lora.py) of the running and the waiting requests, and the limit
    running_loras: tuple[str, ...] = ()
    waiting_loras: tuple[str, ...] = ()
    max_loras: int = 0

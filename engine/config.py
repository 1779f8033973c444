"""Frozen engine configuration; validation only, no I/O."""
from __future__ import annotations

from dataclasses import dataclass

from engine.errors import InvalidRequestError
from engine.lora import LoRAConfig
from engine.speculative import SpeculativeConfig

MAX_GEMV_ROWS = 16  # each row of a GEMV reads the weights again (from L2 at best): past a few, a GEMM wins


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    num_blocks: int | None = None  # None: sized from kv_cache_memory_gib (or GPU memory utilization)
    kv_cache_memory_gib: float = 1.0  # CPU default budget for the KV cache
    gpu_memory_utilization: float = 0.9  # of the GPU's total memory, for weights + KV caches
    # This engine's part of the GPU memory still free for KV caches when it loads. A server holding
    # several models gives each cache-holding one an equal part (1/2 to the first of two, then all
    # the rest to the second), so the first model loaded does not take the whole budget.
    gpu_kv_share: float = 1.0
    # Reuse the K/V of cached full blocks for prompts that start the same way (a shared system
    # prompt, a chat's earlier turns, n samples, a preempted sequence). Decoder-only generation.
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise InvalidRequestError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise InvalidRequestError(f"num_blocks must be positive, got {self.num_blocks}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise InvalidRequestError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if not 0.0 < self.gpu_kv_share <= 1.0:
            raise InvalidRequestError(f"gpu_kv_share must be in (0, 1], got {self.gpu_kv_share}")
        if self.kv_cache_memory_gib <= 0.0:
            raise InvalidRequestError(f"kv_cache_memory_gib must be positive, got {self.kv_cache_memory_gib}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 2048  # token budget of one step (prefill chunks + decodes)
    max_num_seqs: int = 64  # sequences running at once
    max_model_len: int = 2048  # prompt + output limit (capped by the model's own)
    # "fcfs": first come, first served; "priority": requests' `priority` first (lower first, then
    # arrival), and a waiting request preempts running ones it outranks when it cannot start
    policy: str = "fcfs"

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise InvalidRequestError("max_num_batched_tokens and max_num_seqs must be positive")
        if self.policy not in ("fcfs", "priority"):
            raise InvalidRequestError(f"policy must be fcfs or priority, got {self.policy!r}")


@dataclass(frozen=True)
class EngineConfig:
    model: str  # path, GGUF file or alias ("smollm2", "minilm")
    dtype: str = "float32"
    device: str = "cpu"
    attention_backend: str | None = None  # torch, cpu or triton; None: triton on CUDA, cpu elsewhere
    max_model_len: int | None = None  # None: the model's own limit
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    seed: int = 0
    served_name: str | None = None  # what requests call the model (default: its alias or folder name)
    # Decode steps through engine.cuda_graphs. None: on for CUDA with the fused backend. True
    # elsewhere runs the same padded static-buffer path without capture (the CPU tests of it).
    decode_graphs: bool | None = None
    max_graph_batch: int = 256  # larger decode batches run eagerly
    # Launch each step before reading the previous step's tokens (engine.engine.LLMEngine.step).
    # None: on where it pays, with CUDA graphs; True elsewhere is how CPU tests check it.
    run_ahead: bool | None = None
    # Decode batches of at most this many rows run their Linears as Triton GEMVs with the RMSNorm
    # or SwiGLU product before each folded in (engine/fused/gemv.py); 0: off. It replaces the
    # CPU's packed Linears, so on CPU it only serves the interpreter tests.
    gemv_max_rows: int = 0
    # Programmatic dependent launch for the decoder layers' Triton kernels (the GEMVs above and
    # decode attention; engine/fused/pdl.py): each launches while the previous one drains. CUDA
    # compute capability 9.0+ only.
    enable_pdl: bool = False
    # n-gram speculative decoding (engine/speculative.py); None: off
    speculative: SpeculativeConfig | None = None
    # LoRA adapters served beside the model (engine/lora.py); None: requests cannot name any
    lora: LoRAConfig | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.gemv_max_rows <= MAX_GEMV_ROWS:
            raise InvalidRequestError(f"gemv_max_rows must be in [0, {MAX_GEMV_ROWS}], got {self.gemv_max_rows}")
        if self.speculative is not None and self.run_ahead:
            raise InvalidRequestError("speculative decoding cannot run ahead: a step's inputs depend on how "
                                      "many drafts the step before accepted")

"""What the engine needs to know about a loaded model, independent of its family."""
from __future__ import annotations

from dataclasses import dataclass, field

from models.registry import Task


@dataclass(frozen=True)
class KVCacheSpec:
    """Shape of one layer's paged K/V cache; the runner allocates `num_layers` of them."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    # the causal sliding window every layer shares (Mistral, Phi-3): blocks behind it can be freed early;
    # None where any layer attends to everything (Gemma 2/3's alternating layers included)
    sliding_window: int | None = None


@dataclass(frozen=True)
class ModelInfo:
    """Family-independent facts the engine and server read (limits, special tokens, defaults)."""

    name: str  # served model name (alias or folder name)
    path: str  # folder the weights were read from
    architecture: str
    task: Task
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    decoder_start_token_id: int | None = None  # encoder-decoder only
    chat_template: str | None = None
    # generation_config.json / sentence-transformers settings, as read (defaults for requests)
    generation_defaults: dict = field(default_factory=dict)
    # encoder-decoder: config.json's task_specific_params, the per-task settings HF's pipelines lay over
    # them ({"summarization": {"num_beams": 4, "min_length": 56, ..., "prefix": "summarize: "}})
    task_defaults: dict = field(default_factory=dict)
    pooling: str | None = None  # embeddings: "mean" | "cls" | "lasttoken"
    normalize: bool = False
    labels: tuple[str, ...] = ()  # classifiers: label names in id order (one label: a cross-encoder)
    activation: str | None = None  # classifiers: "sigmoid" | "identity", applied to logits for scores

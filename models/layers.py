"""Blocks shared by the decoder families: RMSNorm, rotary embedding (HF rope types), activations."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine import fused
from engine.cpu_linear import PackedLinear
from engine.fused.gemv import GemvLinear
from engine.workspace import Workspace


class RMSNorm(nn.Module):
    """LLaMA's RMSNorm, computed in fp32 and cast back before the weight, exactly as HF does."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the residual add rides in the norm's kernel."""
        return fused.add_rms_norm(x, residual, self.weight, self.variance_epsilon)

    def then(self, linear: nn.Module, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(linear(norm(x + residual)), x + residual), in one launch where `linear` can fuse it."""
        return fused.norm_linear(x, residual, self.weight, self.variance_epsilon, linear)


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    # HF's NewGELUActivation formula verbatim (F.gelu(approximate="tanh") differs in the last bits).
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": gelu_new,
    "gelu_fast": gelu_new,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


@dataclass(frozen=True)
class RopeConfig:
    """Rotary parameters read from an HF config (v5 `rope_parameters` or legacy `rope_theta`/`rope_scaling`).

    Only position-independent frequency rules are supported (default, linear, llama3): "dynamic"
    NTK rescales every position once a sequence grows, which would invalidate cached keys.
    """

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None

    @classmethod
    def from_hf(cls, config: dict) -> RopeConfig:
        params = dict(config.get("rope_parameters") or {})
        # Legacy keys; v5 folds both into rope_parameters.
        params.update({k: v for k, v in (config.get("rope_scaling") or {}).items() if k not in params})
        theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"unsupported rope type {rope_type!r}; supported: default, linear, llama3")
        return cls(
            theta=float(theta),
            rope_type=rope_type,
            factor=float(params.get("factor", 1.0)),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=params.get("original_max_position_embeddings"),
        )


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """(head_dim/2,) fp32 inverse frequencies, with the same float ops as HF's rope init functions."""
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        old_len = rope.original_max_position_embeddings
        assert old_len is not None, "llama3 rope needs original_max_position_embeddings"
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Rotates q and k by their absolute position (HF's rotate_half layout).

    A (max_positions, head_dim) table of [cos | sin] halves is built once in fp32; it is cast
    with the model, which equals HF's `cos.to(x.dtype)`. Lookup is by the `positions` tensor, so
    flat batches that start mid-sequence (chunked prefill, decode) rotate correctly.
    """

    def __init__(self, head_dim: int, max_positions: int, rope: RopeConfig) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(rope, head_dim)
        freqs = torch.arange(max_positions, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
        self.register_buffer("cos_sin_cache", torch.cat([freqs.cos(), freqs.sin()], dim=-1), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T,) positions -> cos, sin of shape (T, 1, D/2) (HF repeats each half; the halves are
        equal, so one is enough), broadcast over heads; once per forward."""
        cos, sin = self.cos_sin_cache[positions].chunk(2, dim=-1)  # (T, D/2) each
        return cos[:, None, :], sin[:, None, :]


def merged_linear(*linears: nn.Linear) -> nn.Linear:
    """One Linear whose output is the given ones' outputs side by side (same input)."""
    first = linears[0]
    out = sum(m.out_features for m in linears)
    merged = nn.Linear(first.in_features, out, bias=first.bias is not None, device="meta")
    merged.weight = nn.Parameter(torch.cat([m.weight for m in linears]), requires_grad=False)
    if first.bias is not None:
        merged.bias = nn.Parameter(torch.cat([m.bias for m in linears]), requires_grad=False)
    return merged


def tied_head(embedding: nn.Embedding) -> nn.Linear:
    """A bias-free Linear over the embedding's own weight (shared, not copied): tied models get an
    `lm_head` like untied ones, which CPU packing (engine.cpu_linear) can swap like any Linear."""
    vocab, hidden = embedding.weight.shape
    head = nn.Linear(hidden, vocab, bias=False, device="meta")
    head.weight = embedding.weight
    return head


def vocab_logits(hidden: torch.Tensor, head: nn.Module, bias: torch.Tensor | None = None,
                 chunk: int = 2048, workspace: Workspace | None = None) -> torch.Tensor:
    """hidden (M, H) @ head's weight (V, H)^T (+ bias) as fp32 logits (M, V).

    A `PackedLinear` head (CPU, fp32) runs oneDNN over its packed weight: faster than either path
    below at every row count (engine/cpu_linear.py). Otherwise, an `nn.Linear`:
    On CPU, for 2-256 rows, F.linear over a 50k-row vocabulary ran at half the rate of the same
    product taken as weight-chunk @ hidden^T (measured with 2 threads: 43 vs 30 ms at 32 rows,
    119 vs 84 at 128): each chunk's (chunk, M) result stays in cache and is transposed into place.
    One row (batch-1 decode) is a matrix-vector product either way, and GPUs take F.linear.
    `workspace` (CPU, fp32): the logits are written there rather than into a fresh tensor, whose
    page faults cost a quarter of the GEMM at 256 rows; they are valid until its next use.
    A `GemvLinear` head (GPU, a few rows) rounds to the model dtype and stores fp32 in one launch."""
    if isinstance(head, PackedLinear):
        return head(hidden, bias)
    if isinstance(head, GemvLinear) and bias is None and head.takes(hidden):
        return head(hidden, out_dtype=torch.float32)  # stored as fp32 by the GEMV itself: no cast launch
    weight = head.weight
    rows = hidden.shape[0]
    if hidden.is_cuda or rows < 2 or hidden.dtype != weight.dtype:
        return F.linear(hidden, weight, bias).float()
    shape = (rows, weight.shape[0])
    fp32 = hidden.dtype == torch.float32
    out = workspace.take(shape, torch.float32, hidden.device) if workspace is not None and fp32 else None
    if rows > 256:
        if out is None:
            return F.linear(hidden, weight, bias).float()
        if bias is None:
            return torch.mm(hidden, weight.t(), out=out)
        return torch.addmm(bias, hidden, weight.t(), out=out)
    if out is None:
        out = hidden.new_empty(shape)
    ht = hidden.t()
    for start in range(0, weight.shape[0], chunk):
        w = weight[start:start + chunk]
        part = torch.mm(w, ht) if bias is None else torch.addmm(bias[start:start + chunk, None], w, ht)
        out[:, start:start + chunk].copy_(part.t())
    return out.float()

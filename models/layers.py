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


class ResidualAdd(nn.Module):
    """RMSNorm's interface without the norm, for blocks whose inputs are not normed (OLMo 2):
    (x + residual, x + residual), and `then` applies the linear to that sum."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = x if residual is None else x + residual
        return h, h

    def then(self, linear: nn.Module, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self(x, residual)[0]
        return linear(h), h


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

    Supported: default, linear, llama3, and longrope (Phi-3-128k, Phi-3.5). "dynamic" NTK rescales
    every position once a sequence grows, which would invalidate cached keys, so it is refused.
    longrope is kept position-wise: transformers picks the short or the long factors by the length
    of the current forward call (so a prompt past original_max_position_embeddings rotates all its
    tokens with the long ones), which a paged cache that keeps every key as first rotated cannot
    follow; here a position below original_max_position_embeddings always uses the short factors
    and one at or past it the long ones, identical to transformers up to that length.
    """

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    short_factor: tuple[float, ...] | None = None  # longrope: per frequency, below original_max
    long_factor: tuple[float, ...] | None = None  # longrope: per frequency, from original_max on
    attention_factor: float = 1.0  # longrope: cos and sin are scaled by it (HF's attention_scaling)

    @classmethod
    def from_hf(cls, config: dict) -> RopeConfig:
        params = dict(config.get("rope_parameters") or {})
        # Legacy keys; v5 folds both into rope_parameters.
        params.update({k: v for k, v in (config.get("rope_scaling") or {}).items() if k not in params})
        theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in ("default", "linear", "llama3", "longrope"):
            raise ValueError(f"unsupported rope type {rope_type!r}; supported: default, linear, llama3, longrope")
        # Phi-3's configs keep original_max_position_embeddings at the top level
        original = params.get("original_max_position_embeddings") or config.get("original_max_position_embeddings")
        longrope: dict = {}
        if rope_type == "longrope":
            assert original, "longrope needs original_max_position_embeddings"
            # HF: factor defaults to the ratio of the two context lengths; attention_factor to YaRN's rule
            factor = params.get("factor") or config.get("max_position_embeddings", original) / original
            attention = params.get("attention_factor")
            if attention is None:
                attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
            longrope = dict(short_factor=tuple(map(float, params["short_factor"])),
                            long_factor=tuple(map(float, params["long_factor"])), attention_factor=float(attention))
        return cls(
            theta=float(theta),
            rope_type=rope_type,
            factor=float(params.get("factor", 1.0)),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=original,
            **longrope,
        )


def rope_inv_freq(rope: RopeConfig, head_dim: int, long: bool = False) -> torch.Tensor:
    """(head_dim/2,) fp32 inverse frequencies, with the same float ops as HF's rope init functions;
    `long`: longrope's long factors instead of its short ones."""
    powers = rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    if rope.rope_type == "longrope":
        factors = torch.tensor(rope.long_factor if long else rope.short_factor, dtype=torch.float32)
        return 1.0 / (factors * powers)
    inv_freq = 1.0 / powers
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

    def __init__(self, head_dim: int, max_positions: int, rope: RopeConfig, rotary_dim: int | None = None) -> None:
        """`rotary_dim` < head_dim (partial rotary): frequencies for the first rotary_dim / 2 pairs, then
        pairs left as they are (cos 1, sin 0), for heads laid out by `partial_rotary_permutation`."""
        super().__init__()
        dim = rotary_dim or head_dim
        positions = torch.arange(max_positions, dtype=torch.int64).float()[:, None]
        freqs = positions * rope_inv_freq(rope, dim)[None, :]
        if rope.rope_type == "longrope":  # the long factors' rows from original_max_position_embeddings on
            past = rope.original_max_position_embeddings
            freqs[past:] = positions[past:] * rope_inv_freq(rope, dim, long=True)[None, :]
        cos, sin = freqs.cos(), freqs.sin()
        if rope.attention_factor != 1.0:  # HF scales cos and sin in fp32, before the cast
            cos, sin = cos * rope.attention_factor, sin * rope.attention_factor
        if dim < head_dim:  # the unrotated pairs: identity, unscaled (HF passes those dims through)
            rest = head_dim // 2 - dim // 2
            cos = torch.cat([cos, cos.new_ones(max_positions, rest)], dim=-1)
            sin = torch.cat([sin, sin.new_zeros(max_positions, rest)], dim=-1)
        self.register_buffer("cos_sin_cache", torch.cat([cos, sin], dim=-1), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T,) positions -> cos, sin of shape (T, 1, D/2) (HF repeats each half; the halves are
        equal, so one is enough), broadcast over heads; once per forward."""
        cos, sin = self.cos_sin_cache[positions].chunk(2, dim=-1)  # (T, D/2) each
        return cos[:, None, :], sin[:, None, :]


def partial_rotary_permutation(head_dim: int, rotary_dim: int) -> torch.Tensor:
    """Order of a head's dims that turns HF's partial rotary into a whole-head one: HF rotates dims
    [0, r) as rotate_half pairs (i, i + r/2) and passes the rest through; whole-head kernels pair
    (j, j + D/2). Dim j of the new order is old dim perm[j]: the rotated pairs land on (j, j + D/2)
    for j < r/2 and the passed-through dims fill the pairs whose frequency is zero. q and k rows are
    permuted alike at load, so their dot products, the scores, are unchanged (v is not)."""
    half, r2 = head_dim // 2, rotary_dim // 2
    rest = half - r2
    return torch.cat([torch.arange(r2), torch.arange(rotary_dim, rotary_dim + rest),
                      torch.arange(r2, rotary_dim), torch.arange(rotary_dim + rest, head_dim)])


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

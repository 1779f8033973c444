"""Mixture-of-experts compute, pure torch: the router's top-k choice and the chosen SwiGLU experts.

This is the CPU path and the reference for any fused MoE kernel. Tokens are grouped by expert
with one sort, so each expert runs once over all the tokens that chose it (vLLM's grouping); the
per-expert counts come to the host once per layer, which is why MoE steps run outside CUDA graphs
(engine/cuda_graphs.wanted). Each expert is the model's own module, so its Linears are what the
device's loader made of them (on CPU, oneDNN-packed: engine/cpu_linear.py).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


def route(
    router_logits: torch.Tensor, top_k: int, renormalize: bool, weights_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights (T, k) in `weights_dtype`, expert ids (T, k)): softmax in fp32 over all experts,
    the top k, rescaled to sum to one where the model says so; HF's order of ops."""
    probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(weights_dtype), ids


def experts(
    x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: Sequence[Callable[[torch.Tensor], torch.Tensor]]
) -> torch.Tensor:
    """sum_k weights[t, k] * experts[ids[t, k]](x[t]) for x (T, H), each expert (n, H) -> (n, H);
    (T, H) in x's dtype."""
    num_tokens, top_k = ids.shape
    flat = ids.flatten()
    order = flat.argsort(stable=True)  # slots grouped by expert, tokens ascending within each
    counts = torch.bincount(flat, minlength=len(experts)).tolist()
    tokens = order // top_k
    gathered = x[tokens]
    scale = weights.flatten()[order, None]
    out = torch.empty_like(gathered)
    start = 0
    for expert, n in zip(experts, counts):
        if n:
            rows = slice(start, start + n)
            # weighted in the weights' dtype (fp32 for Mixtral, as HF's product is) before the cast back
            out[rows] = (expert(gathered[rows]) * scale[rows]).to(out.dtype)
            start += n
    return torch.zeros_like(x).index_add_(0, tokens, out)

"""Sparse mixture-of-experts MLP of the LLaMA family's MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE).

A router picks `top_k` of `num_experts` SwiGLU experts per token; Qwen2-MoE adds a shared expert
every token runs, scaled by a sigmoid gate. Modules carry HF's names (`mlp.gate`,
`mlp.experts.N.gate_proj`, `mlp.shared_expert`, `mlp.shared_expert_gate`) so checkpoints load as
saved; Mixtral's `block_sparse_moe.experts.N.w1/w3/w2` are renamed to them (`mixtral_name`).
Each expert keeps its own (merged gate/up, down) Linears rather than one stacked (E, ...) tensor: the
loader packs every Linear for the device (on CPU, oneDNN's layout: ~1.8x F.linear at a few rows), and
engine/fused/moe.py runs each chosen expert once over its tokens.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from engine import fused
from engine.fused import moe as moe_ops
from models.layers import RMSNorm, merged_linear


@dataclass(frozen=True)
class MoeConfig:
    num_experts: int
    top_k: int
    intermediate_size: int  # of each routed expert
    renormalize: bool  # rescale the top-k weights to sum to one (Mixtral always; Qwen's norm_topk_prob)
    fp32_weights: bool  # Mixtral keeps the routing weights fp32; Qwen casts them to the model's dtype
    shared_intermediate_size: int = 0  # Qwen2-MoE's shared expert; 0: none
    dense_layers: tuple[int, ...] = ()  # layers with a dense MLP instead (mlp_only_layers, decoder_sparse_step)

    @classmethod
    def from_hf(cls, config: dict) -> MoeConfig | None:
        """None for a dense model."""
        # transformers 5 writes Qwen-MoE's num_experts as num_local_experts, Mixtral's own name
        num_experts = config.get("num_experts") or config.get("num_local_experts") or 0
        if not num_experts:
            return None
        if config.get("hidden_act", "silu") not in ("silu", "swish"):
            raise ValueError(f"MoE experts with activation {config['hidden_act']!r} are not supported; only silu")
        top_k = config.get("num_experts_per_tok", 2)
        if config.get("model_type") == "mixtral" or "MixtralForCausalLM" in (config.get("architectures") or []):
            # every layer sparse, experts of intermediate_size, weights always renormalised and kept fp32
            return cls(num_experts=num_experts, top_k=top_k, intermediate_size=config["intermediate_size"],
                       renormalize=True, fp32_weights=True)
        step = config.get("decoder_sparse_step", 1)
        only_mlp = set(config.get("mlp_only_layers") or [])
        return cls(
            num_experts=num_experts,
            top_k=top_k,
            intermediate_size=config["moe_intermediate_size"],
            renormalize=bool(config.get("norm_topk_prob", False)),
            fp32_weights=False,
            shared_intermediate_size=config.get("shared_expert_intermediate_size") or 0,
            dense_layers=tuple(i for i in range(config["num_hidden_layers"]) if i in only_mlp or (i + 1) % step != 0),
        )


class Expert(nn.Module):
    """One SwiGLU expert as checkpoints store it (gate/up merged after loading, as the dense MLP's)."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.gate_up_proj: nn.Linear | None = None

    def merge_projections(self) -> None:
        self.gate_up_proj = merged_linear(self.gate_proj, self.up_proj)
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.gate_up_proj is not None, "after_load() merges the projections"
        return fused.silu_mul_linear(self.gate_up_proj(x), self.down_proj)


class SparseMoeBlock(nn.Module):
    def __init__(self, hidden: int, moe: MoeConfig) -> None:
        super().__init__()
        self.config = moe
        self.gate = nn.Linear(hidden, moe.num_experts, bias=False)  # the router
        self.experts = nn.ModuleList(Expert(hidden, moe.intermediate_size) for _ in range(moe.num_experts))
        shared = moe.shared_intermediate_size
        self.shared_expert = Expert(hidden, shared) if shared else None
        self.shared_expert_gate = nn.Linear(hidden, 1, bias=False) if shared else None

    def merge_projections(self) -> None:
        for expert in self.experts:
            expert.merge_projections()
        if self.shared_expert is not None:
            self.shared_expert.merge_projections()

    def forward(self, x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """(moe(norm(x + residual)), x + residual), as the dense MLP's forward."""
        h, residual = norm(x, residual)
        c = self.config
        weights, ids = moe_ops.route(self.gate(h), c.top_k, c.renormalize, torch.float32 if c.fp32_weights else h.dtype)
        out = moe_ops.experts(h, weights, ids, self.experts)
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(h)) * self.shared_expert(h)
        return out, residual

    def forward_lora(self, x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm, layer_idx: int,
                     lora: object) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapters on MoE models reach attention only (LlamaForCausalLM.lora_targets)."""
        return self.forward(x, residual, norm)


_MIXTRAL = re.compile(r"(model\.layers\.\d+\.)block_sparse_moe\.(gate|experts\.\d+\.w[123])\.weight")
_MIXTRAL_W = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def mixtral_name(name: str) -> str:
    """Mixtral's `block_sparse_moe.experts.N.w1` as the HF names the rest of the family uses."""
    found = _MIXTRAL.fullmatch(name)
    if found is None:
        return name
    part = found[2]
    if part != "gate":
        index, w = part.split(".")[1:]
        part = f"experts.{index}.{_MIXTRAL_W[w]}"
    return f"{found[1]}mlp.{part}.weight"

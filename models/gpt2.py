"""GPT-2: learned positions, pre-LayerNorm blocks, GELU-new MLP, Conv1D weights, tied lm_head.

Module names equal HF's (`transformer.h.N.attn.c_attn`); Conv1D keeps HF's [in, out] weight layout
so checkpoint tensors load untransposed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.forward_context import ForwardContext
from engine.greedy_screen import GreedyScreen
from engine.workspace import Workspace
from models.layers import activation, tied_head, vocab_logits
from models.spec import KVCacheSpec


@dataclass(frozen=True)
class GPT2Config:
    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int
    n_inner: int
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_hf(cls, config: dict) -> GPT2Config:
        if config.get("add_cross_attention"):
            raise ValueError("GPT-2 with cross-attention is not supported")
        n_embd = config.get("n_embd", 768)
        return cls(
            vocab_size=config["vocab_size"],
            n_positions=config.get("n_positions", 1024),
            n_embd=n_embd,
            n_layer=config.get("n_layer", 12),
            n_head=config.get("n_head", 12),
            n_inner=config.get("n_inner") or 4 * n_embd,
            layer_norm_epsilon=config.get("layer_norm_epsilon", 1e-5),
            activation_function=config.get("activation_function", "gelu_new"),
            scale_attn_weights=config.get("scale_attn_weights", True),
            scale_attn_by_inverse_layer_idx=config.get("scale_attn_by_inverse_layer_idx", False),
            tie_word_embeddings=config.get("tie_word_embeddings", True),
        )


class Conv1D(nn.Module):
    """HF's Conv1D: a linear layer whose weight is stored [in_features, out_features]."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.view(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)

    def as_linear(self) -> nn.Linear:
        linear = nn.Linear(*self.weight.shape, device="meta")
        linear.weight = nn.Parameter(self.weight.t().contiguous(), requires_grad=False)
        linear.bias = nn.Parameter(self.bias.detach(), requires_grad=False)
        return linear


class GPT2Attention(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.n_head
        self.head_dim = config.head_dim
        scale = self.head_dim**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= layer_idx + 1
        self.scale = scale
        self.c_attn = Conv1D(3 * config.n_embd, config.n_embd)
        self.c_proj = Conv1D(config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        t, h = x.shape
        q, k, v = self.c_attn(x).view(t, 3, self.num_heads, self.head_dim).unbind(1)  # (T, H, D) each
        out = ctx.attend(self.layer_idx, q, k, v, self.scale)
        return self.c_proj(out.reshape(t, h))


class GPT2MLP(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.c_fc = Conv1D(config.n_inner, config.n_embd)
        self.c_proj = Conv1D(config.n_embd, config.n_inner)
        self.act = activation(config.activation_function)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), ctx)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(GPT2Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = self.wte(input_ids) + self.wpe(positions)  # (T, H)
        for block in self.h:
            x = block(x, ctx)
        return self.ln_f(x)


class GPT2LMHeadModel(nn.Module):
    """GPT-2 LM over a flat batch. Tied (the usual case): no `lm_head` parameter, logits use `wte`."""

    config_class = GPT2Config

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(
            config.n_embd, config.vocab_size, bias=False
        )
        self.greedy_screen: GreedyScreen | None = None  # compute_logits' argmax, set by after_load where it pays

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.transformer(input_ids, positions, ctx)

    def after_load(self) -> None:
        """Serving runs HF's [in, out] Conv1D weights as ordinary Linears (what CPU packing swaps)."""
        for block in self.transformer.h:
            for parent, name in ((block.attn, "c_attn"), (block.attn, "c_proj"), (block.mlp, "c_fc"),
                                 (block.mlp, "c_proj")):
                setattr(parent, name, getattr(parent, name).as_linear())
        if self.lm_head is None:
            self.lm_head = tied_head(self.transformer.wte)
        self.greedy_screen = GreedyScreen.build(self.lm_head.weight)

    def compute_logits(self, hidden: torch.Tensor, workspace: Workspace | None = None) -> torch.Tensor:
        return vocab_logits(hidden, self.lm_head, workspace=workspace)

    @property
    def kv_cache_spec(self) -> KVCacheSpec:
        c = self.config
        return KVCacheSpec(c.n_layer, c.n_head, c.head_dim)

    def rename_weight(self, name: str) -> str | None:
        if name == "lm_head.weight":  # tied: the same tensor as transformer.wte.weight
            return None if self.lm_head is None else name
        if name.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers of old checkpoints
            return None
        # The original OpenAI checkpoints were saved from GPT2Model, without the prefix.
        return name if name.startswith("transformer.") else f"transformer.{name}"

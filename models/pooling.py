"""Sentence embeddings from token hidden states: pooling and L2 normalisation, as the folder declares.

A sentence-transformers folder lists its modules in `modules.json`: a `Pooling` module (its
`config.json` names the mode, in the new `pooling_mode` or the legacy `pooling_mode_*_tokens`
format), then optionally `Dense` projections of the pooled vector (LaBSE, EmbeddingGemma) and
`Normalize`. Any other module is refused by name rather than skipped (skipping one would give
wrong vectors). Folders without `modules.json` (a bare HF encoder) get the usual default, mean
pooling + L2 normalisation. Pooling runs on the flat, unpadded batch the
model returns, with segment sums (`index_add_`) instead of padding back to (B, L, H).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# sentence-transformers' legacy boolean keys, in the order it concatenates several active modes
_LEGACY_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


# sentence-transformers Dense activations, by the class path it saves
_DENSE_ACTIVATIONS = {
    "torch.nn.modules.activation.Tanh": torch.tanh,
    "torch.nn.modules.linear.Identity": lambda x: x,
    "torch.nn.modules.activation.ReLU": F.relu,
    "torch.nn.modules.activation.GELU": F.gelu,
    "torch.nn.modules.activation.Sigmoid": torch.sigmoid,
}
# modules.json types (by class name) that this module or the model itself implements
_KNOWN_MODULES = ("Transformer", "Pooling", "Dense", "Normalize")


class PoolingConfigError(ValueError):
    """The folder's pooling configuration names something kvserve does not implement."""


@dataclass(frozen=True, eq=False)
class DenseLayer:
    """A sentence-transformers `Dense` module over the pooled vector: activation(x W^T + b)."""

    weight: torch.Tensor  # (out_features, in_features)
    bias: torch.Tensor | None
    activation: str  # a key of _DENSE_ACTIVATIONS

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _DENSE_ACTIVATIONS[self.activation](F.linear(x, self.weight, self.bias))

    def to(self, device: torch.device | str) -> DenseLayer:
        bias = None if self.bias is None else self.bias.to(device)
        return DenseLayer(self.weight.to(device), bias, self.activation)

    @classmethod
    def from_folder(cls, folder: Path) -> DenseLayer:
        """The Dense module saved in `folder`: its config checked (`dense_config`), its weights read."""
        activation, has_bias = dense_config(folder)
        if (folder / "model.safetensors").exists():
            from safetensors.torch import load_file

            weights = load_file(str(folder / "model.safetensors"))
        else:  # older sentence-transformers saved a torch pickle; tensors only
            weights = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        bias = weights.get("linear.bias") if has_bias else None
        return cls(weights["linear.weight"].float(), None if bias is None else bias.float(), activation)


def dense_config(folder: Path) -> tuple[str, bool]:
    """(activation, has bias) of the Dense module saved in `folder`; refused unless it projects the
    pooled vector without a residual, with an activation of _DENSE_ACTIVATIONS."""
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    activation = cfg.get("activation_function", "torch.nn.modules.activation.Tanh")
    if activation not in _DENSE_ACTIVATIONS:
        raise PoolingConfigError(f"{folder}: Dense activation {activation!r} not supported; "
                                 f"supported: {sorted(_DENSE_ACTIVATIONS)}")
    if cfg.get("use_residual") or cfg.get("module_input_name", "sentence_embedding") != "sentence_embedding":
        raise PoolingConfigError(f"{folder}: only Dense modules over the pooled vector, without a residual, "
                                 "are supported")
    return activation, bool(cfg.get("bias", True))


@dataclass(frozen=True)
class PoolingConfig:
    """Pooling modes (several are concatenated, in order, as sentence-transformers does), the folders
    of the Dense projections after them (checked here; their weights are read by whoever runs them,
    once: `DenseLayer.from_folder`), and normalisation."""

    modes: tuple[str, ...] = ("mean",)
    normalize: bool = True
    dense: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        bad = [m for m in self.modes if m not in POOLING_MODES]
        if not self.modes or bad:
            raise PoolingConfigError(f"pooling modes {bad or '()'} not supported; supported: {POOLING_MODES}")

    @property
    def name(self) -> str:
        return "+".join(self.modes)

    @classmethod
    def from_folder(cls, folder: str | Path, causal: bool = False) -> PoolingConfig:
        """`causal`: the model is a decoder, whose last token is the only one that saw the whole input."""
        folder = Path(folder)
        modules_file = folder / "modules.json"
        if not modules_file.exists():
            # a bare model: what embedding servers default to (vLLM: mean for encoders, last token for decoders)
            return cls(modes=("lasttoken",) if causal else ("mean",))
        modes: tuple[str, ...] = ("mean",)
        normalize = False  # a sentence-transformers folder normalises only if it lists Normalize
        dense: list[Path] = []
        for module in json.loads(modules_file.read_text(encoding="utf-8")):
            kind = module.get("type", "").rsplit(".", 1)[-1]
            if kind == "Normalize":
                normalize = True
            elif kind.endswith("Pooling"):
                modes = read_pooling_modes(folder / module.get("path", "") / "config.json")
            elif kind == "Dense":
                dense.append(folder / module.get("path", ""))
                dense_config(dense[-1])
            elif not kind.endswith(_KNOWN_MODULES):
                raise PoolingConfigError(f"{folder}: sentence-transformers module {module.get('type')!r} is not "
                                         f"supported; supported: {', '.join(_KNOWN_MODULES)}")
        return cls(modes=modes, normalize=normalize, dense=tuple(dense))


def read_prompts(folder: str | Path) -> dict[str, str]:
    """The named prompts of a sentence-transformers folder (`config_sentence_transformers.json`), e.g.
    Qwen3-Embedding's {"query": "Instruct: ...\nQuery:"}: text put before an input, chosen by name."""
    path = Path(folder) / "config_sentence_transformers.json"
    if not path.exists():
        return {}
    prompts = json.loads(path.read_text(encoding="utf-8")).get("prompts") or {}
    return {str(k): str(v) for k, v in prompts.items()}


def read_pooling_modes(path: Path) -> tuple[str, ...]:
    """Modes of a sentence-transformers Pooling config.json (new or legacy keys); mean if absent."""
    if not path.exists():
        return ("mean",)
    cfg = json.loads(path.read_text(encoding="utf-8"))
    if cfg.get("include_prompt") is False:
        raise PoolingConfigError(f"{path}: include_prompt=false (instruction models) is not supported")
    mode = cfg.get("pooling_mode")
    if mode is None:
        modes = tuple(m for key, m in _LEGACY_KEYS.items() if cfg.get(key))
        return modes or ("mean",)
    modes = (mode,) if isinstance(mode, str) else tuple(mode)
    return tuple("lasttoken" if m == "last_token" else m for m in modes)


def pool(hidden: torch.Tensor, cu_seqlens: torch.Tensor, modes: tuple[str, ...]) -> torch.Tensor:
    """(T, H) hidden states of B concatenated sequences -> (B, len(modes) * H) float32.

    Accumulates in float32 whatever the model dtype (sentence-transformers does the same for
    half precision); `cu_seqlens` (B+1,) are the prefix sums of the sequence lengths.
    """
    x = hidden.float()
    cu = cu_seqlens.to(device=x.device, dtype=torch.long)
    lens = cu[1:] - cu[:-1]  # (B,)
    num_seqs = lens.shape[0]
    seg = torch.repeat_interleave(torch.arange(num_seqs, device=x.device), lens)  # (T,) sequence of each row
    out = []
    for mode in modes:
        if mode == "cls":
            out.append(x[cu[:-1]])
        elif mode == "lasttoken":
            out.append(x[cu[1:] - 1])
        elif mode == "max":
            idx = seg[:, None].expand_as(x)
            out.append(x.new_full((num_seqs, x.shape[1]), float("-inf")).scatter_reduce(0, idx, x, "amax"))
        elif mode == "weightedmean":
            w = (torch.arange(x.shape[0], device=x.device) - cu[:-1][seg] + 1).float()  # 1..L in each sequence
            sums = x.new_zeros(num_seqs, x.shape[1]).index_add_(0, seg, x * w[:, None])
            out.append(sums / (lens * (lens + 1) / 2).float()[:, None])
        else:  # mean, mean_sqrt_len_tokens
            sums = x.new_zeros(num_seqs, x.shape[1]).index_add_(0, seg, x)
            denom = lens.float() if mode == "mean" else lens.float().sqrt()
            out.append(sums / denom[:, None])
    return torch.cat(out, dim=-1)


def finish_embedding(emb: torch.Tensor, dimensions: int | None, normalize: bool) -> torch.Tensor:
    """Pooled rows -> what a request gets: Matryoshka-style `dimensions` keeps the first d values,
    then L2-normalisation where asked (after the cut: a cut unit vector is no longer unit, and
    cosine users expect unit vectors back)."""
    if dimensions is not None and dimensions < emb.shape[-1]:
        emb = emb[..., :dimensions]
    return F.normalize(emb, p=2, dim=-1) if normalize else emb

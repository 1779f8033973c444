"""BERT-family sequence classifiers: cross-encoders (rerankers, one label) and text classifiers.

The encoder is models/bert.py's; these add HF's heads under HF's names, so a
`BertForSequenceClassification` / `RobertaForSequenceClassification` checkpoint loads unchanged:
- BERT: `pooler.dense` + tanh on the first token ([CLS]), then `classifier` (H -> num_labels);
- RoBERTa / XLM-R: `classifier.dense` + tanh on the first token (<s>), then `classifier.out_proj`.
Dropout is an identity at inference and has no weights, so it is left out.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.bert import BertConfig, BertModel, RobertaConfig
from models.weights import ModelLoadError

# sentence-transformers' CrossEncoder applies this to the logits in predict(); the names it
# saves (a class path) -> ours. Identity keeps raw logits (e.g. the ms-marco cross-encoders).
_ACTIVATIONS = {"Sigmoid": "sigmoid", "Identity": "identity"}


def config_labels(cfg: dict[str, Any]) -> tuple[str, ...]:
    """Label names in id order. HF writes id2label for every classifier; num_labels alone is older."""
    id2label = cfg.get("id2label")
    if id2label:
        return tuple(id2label[k] for k in sorted(id2label, key=int))
    return tuple(f"LABEL_{i}" for i in range(int(cfg.get("num_labels", 2))))


@dataclass(frozen=True)
class BertClassifierConfig(BertConfig):
    labels: tuple[str, ...] = ("LABEL_0", "LABEL_1")

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> BertClassifierConfig:
        return dataclasses.replace(super().from_hf(cfg), labels=config_labels(cfg))  # type: ignore[return-value]

    @property
    def num_labels(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class RobertaClassifierConfig(BertClassifierConfig, RobertaConfig):
    """RoBERTa's position offset (from RobertaConfig) with the labels."""


class BertPooler(nn.Module):
    def __init__(self, config: BertClassifierConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, first: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(first))


class RobertaClassificationHead(nn.Module):
    def __init__(self, config: BertClassifierConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, first: torch.Tensor) -> torch.Tensor:
        return self.out_proj(torch.tanh(self.dense(first)))


class BertForSequenceClassification(BertModel):
    """Encoder + [CLS] pooler + linear classifier. `forward` returns hidden states, as the
    embedding encoders do; `classify` turns them into per-sequence logits."""

    config_class = BertClassifierConfig
    _unused = ("cls.", "lm_head.", "qa_outputs.")  # the pooler and classifier are ours now

    def __init__(self, config: BertClassifierConfig) -> None:
        super().__init__(config)
        self.pooler = BertPooler(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def classify(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """(T, H) hidden states of B concatenated sequences -> (B, num_labels) float32 logits, read
        from each sequence's first token."""
        return self.head(hidden[cu_seqlens[:-1].to(device=hidden.device, dtype=torch.long)]).float()

    def head(self, first: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pooler(first))

    @classmethod
    def extra_info(cls, folder: str | Path, config: dict[str, Any]) -> dict[str, Any]:
        return classifier_info(cls, folder, config)


def classifier_info(model_cls: type[BertModel], folder: str | Path, config: dict[str, Any]) -> dict[str, Any]:
    """ModelInfo fields of a sequence classifier's folder (BERT-family, ModernBERT): its context,
    labels, and the activation sentence-transformers' CrossEncoder applies to its logits."""
    labels = model_cls.config_class.from_hf(config).labels
    return {"max_model_len": model_cls.folder_max_model_len(Path(folder), config), "labels": labels,
            "activation": score_activation(Path(folder), config, len(labels))}


class RobertaForSequenceClassification(BertForSequenceClassification):
    """RoBERTa / XLM-R: no pooler; the head's own dense + tanh, then out_proj."""

    config_class = RobertaClassifierConfig

    def __init__(self, config: BertClassifierConfig) -> None:
        BertModel.__init__(self, config)
        self.classifier = RobertaClassificationHead(config)  # type: ignore[assignment]

    def head(self, first: torch.Tensor) -> torch.Tensor:
        return self.classifier(first)


def score_activation(folder: Path, config: dict[str, Any], num_labels: int) -> str:
    """"sigmoid" | "identity": what sentence-transformers' CrossEncoder.predict applies.

    Where it is saved, newest first: config_sentence_transformers.json (v5+), config.json's
    `sentence_transformers.activation_fn` (v3-v4), `sbert_ce_default_activation_function`
    (older). Unsaved: sigmoid for one label, identity otherwise (CrossEncoder's default).
    """
    st_file = folder / "config_sentence_transformers.json"
    st = json.loads(st_file.read_text(encoding="utf-8")) if st_file.exists() else {}
    path = (st.get("activation_fn") or (config.get("sentence_transformers") or {}).get("activation_fn")
            or config.get("sbert_ce_default_activation_function"))
    if not path:
        return "sigmoid" if num_labels == 1 else "identity"
    name = str(path).rsplit(".", 1)[-1]
    if name not in _ACTIVATIONS:
        raise ModelLoadError(f"{folder}: activation_fn {path!r} is not supported; known: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]

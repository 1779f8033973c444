"""Tokenizers of the encoder-decoder families, token-identical to HF's, plus generation defaults.

- `MarianTokenizer`: `source.spm` + `target.spm` + `vocab.json`, like HF MarianTokenizer (encode
  with the source SentencePiece model, map pieces through vocab.json, append `</s>`).
- `T5Tokenizer.from_folder`: `tokenizer.json` through the tokenizers library when present, else
  `spiece.model` through sentencepiece with T5's `<extra_id_N>` sentinels (ids counted down from
  the end of the vocab), appending `</s>`.
- `LanguageCodeTokenizer` (NLLB-200, M2M100 folders with a `tokenizer.json`): language codes are
  special tokens; a source is `[source code] pieces </s>`, and the target code is forced as the
  decoder's first output token.
Both expose the kvserve tokenizer surface: encode, decode, eos_token_ids, bos_token_id,
pad_token_id, vocab_size, id_to_token.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import sentencepiece

if TYPE_CHECKING:  # the tokenizers library is imported when a tokenizer.json is read
    from tokenizers import Tokenizer

SPIECE_UNDERLINE = "▁"

# generation_config.json keys worth carrying as request defaults, also read from old config.json files
GENERATION_KEYS = (
    "num_beams", "max_length", "max_new_tokens", "min_length", "bad_words_ids", "early_stopping",
    "length_penalty", "no_repeat_ngram_size", "forced_eos_token_id", "decoder_start_token_id",
    "eos_token_id", "pad_token_id", "bos_token_id", "forced_bos_token_id", "do_sample", "temperature", "top_k", "top_p",
    "repetition_penalty",
)


def generation_defaults(folder: Path, config: dict) -> dict:
    """generation_config.json as written (minus bookkeeping keys), else the generation keys of config.json."""
    path = folder / "generation_config.json"
    if path.exists():
        raw = json.loads(path.read_text())
        return {k: v for k, v in raw.items() if not k.startswith("_") and k != "transformers_version"}
    return {k: config[k] for k in GENERATION_KEYS if k in config}


def translation_info(folder: str | Path, config: dict | object, cfg: object, max_model_len: int) -> dict:
    """ModelInfo fields of an encoder-decoder folder (config.json as a raw dict or as the family's
    parsed `cfg`): its start and end tokens, where generation_config.json overrides config.json,
    its generation defaults and its per-task ones."""
    raw = config if isinstance(config, dict) else json.loads((Path(folder) / "config.json").read_text())
    defaults = generation_defaults(Path(folder), raw)
    eos = defaults.get("eos_token_id", cfg.eos_token_id)
    return {
        "decoder_start_token_id": defaults.get("decoder_start_token_id", cfg.decoder_start_token_id),
        "eos_token_ids": tuple(eos) if isinstance(eos, list) else (eos,),
        "pad_token_id": cfg.pad_token_id,
        "bos_token_id": None,
        "max_model_len": max_model_len,
        "generation_defaults": defaults,
        "task_defaults": {k: v for k, v in (raw.get("task_specific_params") or {}).items() if isinstance(v, dict)},
    }


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _token_str(value: str | dict | None, default: str) -> str:
    """tokenizer_config.json stores special tokens as strings or AddedToken dicts."""
    if isinstance(value, dict):
        return value["content"]
    return value or default


def _split_on(text: str, specials: list[str]) -> list[str]:
    """Split text around special-token strings (kept as their own chunks), longest match first."""
    if not specials:
        return [text]
    pattern = "(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")"
    return [chunk for chunk in re.split(pattern, text) if chunk]


def clean_up_tokenization(text: str) -> str:
    """HF's `clean_up_tokenization` (applied only when tokenizer_config asks for it)."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                          (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


class MarianTokenizer:
    """HF MarianTokenizer without transformers: source/target SentencePiece models and a shared vocab.

    Pieces are mapped through vocab.json (the SentencePiece ids differ from the model's ids);
    pieces missing from it become `<unk>`. A leading language code `>>xx<<` is looked up in the
    vocab as one token. Decoding uses the source model unless the vocabs are separate (as HF does).
    """

    def __init__(
        self,
        source_spm: Path,
        target_spm: Path,
        vocab: dict[str, int],
        target_vocab: dict[str, int] | None = None,
        eos_token: str = "</s>",
        unk_token: str = "<unk>",
        pad_token: str = "<pad>",
        clean_up_spaces: bool = False,
    ) -> None:
        self.spm_source = sentencepiece.SentencePieceProcessor(model_file=str(source_spm))
        self.spm_target = sentencepiece.SentencePieceProcessor(model_file=str(target_spm))
        self.encoder = vocab
        self.separate_vocabs = target_vocab is not None
        self.decoder = {i: t for t, i in (target_vocab if target_vocab is not None else vocab).items()}
        if unk_token not in vocab:
            raise ValueError("<unk> token must be in the Marian vocab")
        self.special_tokens = [eos_token, unk_token, pad_token]
        self.special_ids = {vocab[t] for t in self.special_tokens if t in vocab}
        self.eos_token_id = vocab[eos_token]
        self.unk_token_id = vocab[unk_token]
        self.pad_token_id = vocab.get(pad_token)
        self.clean_up_spaces = clean_up_spaces

    @classmethod
    def from_folder(cls, folder: str | Path) -> MarianTokenizer:
        folder = Path(folder)
        cfg = _read_json(folder / "tokenizer_config.json")
        separate = cfg.get("separate_vocabs", False)
        return cls(
            folder / "source.spm",
            folder / "target.spm",
            _read_json(folder / "vocab.json"),
            _read_json(folder / "target_vocab.json") if separate else None,
            eos_token=_token_str(cfg.get("eos_token"), "</s>"),
            unk_token=_token_str(cfg.get("unk_token"), "<unk>"),
            pad_token=_token_str(cfg.get("pad_token"), "<pad>"),
            clean_up_spaces=bool(cfg.get("clean_up_tokenization_spaces", False)),
        )

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return (self.eos_token_id,)

    @property
    def bos_token_id(self) -> int | None:
        return None  # Marian starts decoding with decoder_start_token_id (the pad token)

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def _tokenize(self, chunk: str) -> list[str]:
        code: list[str] = []
        if chunk.startswith(">>") and (end := chunk.find("<<")) != -1:
            code, chunk = [chunk[: end + 2]], chunk[end + 2 :]
        return code + self.spm_source.encode(chunk, out_type=str)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        pieces: list[str] = []
        for chunk in _split_on(text, self.special_tokens):
            pieces.extend([chunk] if chunk in self.special_tokens else self._tokenize(chunk))
        ids = [self.encoder.get(p, self.unk_token_id) for p in pieces]
        return ids + [self.eos_token_id] if add_special_tokens else ids

    def id_to_token(self, token_id: int) -> str:
        if token_id in self.decoder:
            return self.decoder[token_id]
        spm = self.spm_target if self.separate_vocabs else self.spm_source
        return spm.id_to_piece(token_id) if 0 <= token_id < spm.get_piece_size() else self.special_tokens[1]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        spm = self.spm_target if self.separate_vocabs else self.spm_source
        out, run = "", []
        for i in ids:
            if i in self.special_ids:
                if not skip_special_tokens:
                    # HF: flush pieces, then the special token and a space
                    out += spm.decode_pieces(run) + self.id_to_token(i) + " "
                    run = []
                continue
            run.append(self.id_to_token(i))
        out = (out + spm.decode_pieces(run)).replace(SPIECE_UNDERLINE, " ").strip()
        return clean_up_tokenization(out) if self.clean_up_spaces else out


class T5Tokenizer:
    """T5's tokenizer from `spiece.model`: sentencepiece pieces, then sentinels, then `</s>` appended.

    Special tokens (pad, eos, unk, `<extra_id_N>`) written in the text are kept whole, as HF does;
    sentinel N has id `spm_size + extra_ids - 1 - N`.
    """

    def __init__(
        self, spiece_model: Path, extra_ids: int = 100, eos_token: str = "</s>", unk_token: str = "<unk>",
        pad_token: str = "<pad>", clean_up_spaces: bool = False,
    ) -> None:
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(spiece_model))
        self.spm_size = self.sp.get_piece_size()
        self.extra_ids = extra_ids
        self.special_to_id = {t: self.sp.piece_to_id(t) for t in (pad_token, eos_token, unk_token)}
        self.special_to_id |= {f"<extra_id_{n}>": self.spm_size + extra_ids - 1 - n for n in range(extra_ids)}
        self.id_to_special = {i: t for t, i in self.special_to_id.items()}
        self.eos_token_id = self.special_to_id[eos_token]
        self.pad_token_id: int | None = self.special_to_id[pad_token]
        self.clean_up_spaces = clean_up_spaces

    @staticmethod
    def from_folder(folder: str | Path) -> T5Tokenizer | JsonTokenizer:
        folder = Path(folder)
        if (folder / "tokenizer.json").exists():
            return JsonTokenizer.from_folder(folder)
        cfg, eos, pad, clean = _settings(folder)
        return T5Tokenizer(
            folder / "spiece.model", extra_ids=cfg.get("extra_ids", 100), eos_token=eos,
            unk_token=_token_str(cfg.get("unk_token"), "<unk>"), pad_token=pad, clean_up_spaces=clean,
        )

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return (self.eos_token_id,)

    @property
    def bos_token_id(self) -> int | None:
        return None

    @property
    def vocab_size(self) -> int:
        return self.spm_size + self.extra_ids

    def id_to_token(self, token_id: int) -> str:
        return self.id_to_special.get(token_id) or self.sp.id_to_piece(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = []
        for chunk in _split_on(text, list(self.special_to_id)):
            special = self.special_to_id.get(chunk)
            ids.extend([special] if special is not None else self.sp.encode(chunk))
        return ids + [self.eos_token_id] if add_special_tokens else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        # tokenizers' Metaspace decoder: concatenate, "▁" -> " ", drop the one leading space
        tokens = [self.id_to_token(i) for i in ids if not (skip_special_tokens and i in self.id_to_special)]
        text = "".join(tokens).replace(SPIECE_UNDERLINE, " ")
        text = text[1:] if text.startswith(" ") else text
        return clean_up_tokenization(text) if self.clean_up_spaces else text


def _settings(folder: Path) -> tuple[dict, str, str, bool]:
    """tokenizer_config.json, and the eos token, pad token and clean-up flag it sets (HF's defaults
    where it sets none)."""
    cfg = _read_json(folder / "tokenizer_config.json")
    return (cfg, _token_str(cfg.get("eos_token"), "</s>"), _token_str(cfg.get("pad_token"), "<pad>"),
            bool(cfg.get("clean_up_tokenization_spaces", False)))


def _load_json(folder: Path) -> Tokenizer:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json"))


class JsonTokenizer:
    """A `tokenizer.json` through the tokenizers library (its post-processor adds `</s>`)."""

    def __init__(self, tok: Tokenizer, eos_token: str, pad_token: str, clean_up_spaces: bool = False) -> None:
        self.tok = tok
        self.eos_token_id = self.tok.token_to_id(eos_token)
        self.pad_token_id: int | None = self.tok.token_to_id(pad_token)
        self.clean_up_spaces = clean_up_spaces

    @classmethod
    def from_folder(cls, folder: str | Path) -> JsonTokenizer:
        """The folder's tokenizer.json with its tokenizer_config.json's eos, pad and clean-up."""
        folder = Path(folder)
        _, eos, pad, clean = _settings(folder)
        return cls(_load_json(folder), eos, pad, clean)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return (self.eos_token_id,)

    @property
    def bos_token_id(self) -> int | None:
        return None

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def id_to_token(self, token_id: int) -> str:
        return self.tok.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        text = self.tok.decode(ids, skip_special_tokens=skip_special_tokens)
        return clean_up_tokenization(text) if self.clean_up_spaces else text


# NLLB-200's codes (eng_Latn, zho_Hans), M2M100's (__en__, __zh__) and mBART-50's (en_XX, zh_CN)
_LANGUAGE_CODE = re.compile(r"^(?:[a-z]{3}_[A-Z][a-z]{3}|__[a-z]{2,3}__|[a-z]{2}_[A-Z]{2})$")


def language_codes(tok: Tokenizer) -> dict[str, int]:
    """The language codes among a tokenizer's added tokens, with their ids."""
    added = tok.get_added_tokens_decoder()
    return {t.content: i for i, t in added.items() if _LANGUAGE_CODE.match(t.content)}


class LanguageCodeTokenizer(JsonTokenizer):
    """NLLB-200's or mBART-50's tokenizer.json with its language codes: HF NllbTokenizerFast's and
    MBart50TokenizerFast's source layout `[source code] pieces </s>` (NLLB's `legacy_behaviour`:
    `pieces </s> [source code]`). A source with no language named keeps the layout the folder's
    tokenizer.json was saved with (its src_lang)."""

    def __init__(self, tok: Tokenizer, eos_token: str, pad_token: str, clean_up_spaces: bool = False,
                 legacy: bool = False) -> None:
        super().__init__(tok, eos_token, pad_token, clean_up_spaces)
        self.language_codes = language_codes(tok)
        self.legacy = legacy

    @staticmethod
    def from_folder(folder: str | Path) -> JsonTokenizer:
        """The folder's tokenizer.json, read once: a LanguageCodeTokenizer where it has language
        codes, else a plain JsonTokenizer (BART's)."""
        folder = Path(folder)
        cfg, eos, pad, clean = _settings(folder)
        tok = _load_json(folder)
        if not language_codes(tok):
            return JsonTokenizer(tok, eos, pad, clean)
        return LanguageCodeTokenizer(tok, eos, pad, clean, legacy=bool(cfg.get("legacy_behaviour", False)))

    def encode_source(self, text: str, source_lang: str | None) -> list[int]:
        """The encoder input of `text` in language `source_lang` (a code of `language_codes`)."""
        if source_lang is None:
            return self.encode(text)
        ids = self.encode(text, add_special_tokens=False)
        code = self.language_codes[source_lang]
        return ids + [self.eos_token_id, code] if self.legacy else [code, *ids, self.eos_token_id]

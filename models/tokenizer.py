"""Text <-> ids and chat rendering, behaving as HF's fast tokenizer loaded from the same folder.

Wraps a `tokenizers.Tokenizer` (tokenizer.json) plus what tokenizer_config.json adds on top:
named special tokens and the jinja chat template, rendered in a sandbox with the same globals and
filters transformers gives it. Like transformers 5, BOS/EOS insertion is whatever tokenizer.json's
post-processor says; `add_bos_token`/`add_eos_token` in tokenizer_config.json do not override it
(the GGUF converter bakes those flags into the post-processor it writes).
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as BackendTokenizer

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


def _token_content(value: str | dict | None) -> str | None:
    # tokenizer_config.json stores a special token as a string or as a serialized AddedToken.
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _chat_template(folder: Path, config: dict) -> str | None:
    """transformers v5 saves the template to chat_template.jinja; older folders keep it in the config."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.exists():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template") or _read_json(folder / "chat_template.json").get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t["name"]: t["template"] for t in template}
        return named.get("default", next(iter(named.values()), None))
    return template


def _clean_up_tokenization(text: str) -> str:
    # transformers' clean_up_tokenization, applied only where it is enabled (WordPiece-style vocabularies).
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                          (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: object, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters; chat templates expect plain json.dumps.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class Tokenizer:
    """A fast tokenizer with HF's special-token and chat-template behaviour.

    `encode` adds what the post-processor adds (BOS for LLaMA-2 style vocabularies, CLS/SEP for
    BERT); `decode(skip_special_tokens=True)` drops every added token marked special.
    """

    def __init__(
        self,
        backend: BackendTokenizer,
        special_tokens: dict[str, str | None] | None = None,
        chat_template: str | None = None,
        clean_up_tokenization_spaces: bool = False,
    ) -> None:
        self.backend = backend
        self.special_tokens = {name: (special_tokens or {}).get(name) for name in SPECIAL_TOKEN_NAMES}
        self.chat_template = chat_template
        # transformers skips the clean-up for BPE models: it would eat real spaces before punctuation.
        self._clean_up = clean_up_tokenization_spaces and type(backend.model).__name__ != "BPE"
        # truncating copies of the backend by (max_length, direction): building one reparses the whole
        # vocabulary (20 ms for MiniLM's), too slow to repeat per request on the event loop
        self._truncating: dict[tuple[int, str], BackendTokenizer] = {}

    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer:
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"no tokenizer.json in {folder}")
        backend = BackendTokenizer.from_file(str(path))
        # transformers sets padding/truncation per call; settings saved in tokenizer.json
        # (all-MiniLM pads and cuts to 128) must not leak into encode().
        backend.no_padding()
        backend.no_truncation()
        config = _read_json(folder / "tokenizer_config.json")
        fallback = _read_json(folder / "special_tokens_map.json")
        special = {n: _token_content(config.get(n, fallback.get(n))) for n in SPECIAL_TOKEN_NAMES}
        return cls(backend, special, _chat_template(folder, config),
                   bool(config.get("clean_up_tokenization_spaces", False)))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_offsets(self, text: str, add_special_tokens: bool = True) -> list[tuple[int, int, int]]:
        """(id, start, stop) per token: the characters of `text` it came from ((0, 0) for added special tokens)."""
        enc = self.backend.encode(text, add_special_tokens=add_special_tokens)
        return [(i, a, b) for i, (a, b) in zip(enc.ids, enc.offsets)]

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """`encode` for many texts at once: the Rust batch encoder uses every core."""
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def encode_pairs(
        self, pairs: list[tuple[str, str]], max_length: int | None = None, direction: str = "right",
    ) -> list[tuple[list[int], list[int]]]:
        """(ids, token_type_ids) per text pair, joined by the post-processor's pair template
        ([CLS] a [SEP] b [SEP] with types 0..0 1..1 for BERT; <s> a </s></s> b </s> for RoBERTa),
        as HF's tokenizer(a, b) gives. `max_length` cuts the longer text first until the pair
        fits, HF's truncation="longest_first", on a private copy so `encode` stays uncut."""
        backend = self.backend
        if max_length is not None:
            key = (max_length, direction)
            if key not in self._truncating:
                copy = BackendTokenizer.from_str(self.backend.to_str())
                copy.enable_truncation(max_length, strategy="longest_first", direction=direction)
                self._truncating[key] = copy
            backend = self._truncating[key]
        return [(e.ids, e.type_ids) for e in backend.encode_batch(pairs, add_special_tokens=True)]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._clean_up else text

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: object) -> str:
        if self._template is None:
            raise ValueError("this tokenizer has no chat template")
        # the caller's kwargs win over the special tokens, as in HF's apply_chat_template
        special = {n: t for n, t in self.special_tokens.items() if t is not None}
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     **{**special, **kwargs})

    @cached_property
    def _template(self) -> jinja2.Template | None:
        return None if self.chat_template is None else _compile_template(self.chat_template)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def _special_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = self._special_id("eos_token")
        return () if eos is None else (eos,)

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer can produce, added tokens included (may be below the model's vocab_size)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @cached_property
    def all_special_ids(self) -> tuple[int, ...]:
        return tuple(sorted(i for i, t in self.backend.get_added_tokens_decoder().items() if t.special))


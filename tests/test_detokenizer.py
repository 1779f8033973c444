"""Incremental detokenizer: same text as a full decode, stop strings never leak or split."""
from tokenizers import Tokenizer, models, pre_tokenizers, decoders

from engine.detokenizer import IncrementalDetokenizer


class ByteTokenizer:
    """Byte-level BPE with no merges: every UTF-8 byte is a token, so characters span tokens."""

    def __init__(self) -> None:
        vocab = {c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}
        self.tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        self.tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self.tok.decoder = decoders.ByteLevel()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def run(text: str, stop: tuple[str, ...] = (), include: bool = False) -> tuple[str, list[str], str | None]:
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(stop, include)
    deltas, matched = [], None
    for t in tok.encode(text):
        matched = detok.add(tok, t)
        deltas.append(detok.delta(finished=matched is not None))
        if matched:
            break
    if matched is None:
        deltas.append(detok.delta(finished=True))
    return detok.text, deltas, matched


def test_incremental_text_equals_full_decode_with_multibyte_characters():
    text = "Grüße, 世界! naïve café 🙂 done"
    out, deltas, _ = run(text)
    assert out == text and "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_stop_string_truncates_and_is_never_streamed():
    out, deltas, matched = run("Hello world. STOP here", stop=("STOP",))
    assert matched == "STOP" and out == "Hello world. "
    assert "".join(deltas) == "Hello world. "
    assert not any("S" in d for d in deltas)


def test_stop_string_included_on_request_and_earliest_wins():
    out, _, matched = run("abc END xyz FIN", stop=("FIN", "END"), include=True)
    assert matched == "END" and out == "abc END"


def test_partial_stop_prefix_is_released_when_it_does_not_match():
    out, deltas, matched = run("a STOx STOP", stop=("STOP",))
    assert matched == "STOP" and out == "a STOx " and "".join(deltas) == out


def test_special_tokens_are_dropped_unless_kept():
    from tokenizers import AddedToken

    tok = ByteTokenizer()
    tok.tok.add_special_tokens([AddedToken("[TOOL_CALLS]", special=True)])
    special = tok.tok.token_to_id("[TOOL_CALLS]")
    ids = tok.encode("ok ") + [special] + tok.encode('[{"name": "f"}]')
    texts = []
    for skip in (True, False):
        detok = IncrementalDetokenizer(skip_special_tokens=skip)
        for t in ids:
            detok.add(tok, t)
        texts.append(detok.text)
    assert texts == ['ok [{"name": "f"}]', 'ok [TOOL_CALLS][{"name": "f"}]']

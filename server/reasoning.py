"""Reasoning outputs for /v1/chat/completions (`--reasoning-parser`): a thinking model's
`<think> ... </think>` block becomes the message's `reasoning`, the rest its `content`.

- `deepseek_r1` (DeepSeek-R1 and its distills, QwQ): the template opens the block in the prompt, so
  the answer is reasoning from its first token until `</think>`; with no `</think>` all of it is;
- `qwen3`: the answer opens the block itself with `<think>` (or the prompt already did, as the
  Qwen3 thinking-only templates do); an answer that does not start with it is all content, as with
  `chat_template_kwargs: {"enable_thinking": false}`, whose template writes an empty block into the
  prompt.

Each part loses its leading whitespace, and the reasoning its trailing whitespace (the newlines
around the tags), so `split` of the whole text and the deltas of `ReasoningStream` always join to
the same two strings: `split` is the stream fed everything at once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.errors import InvalidRequestError
from engine.thinking_budget import ThinkingBudget
from server.tool_parsers import before_prefix

START, END = "<think>", "</think>"


@dataclass(frozen=True)
class ReasoningFormat:
    opens_in_prompt: bool  # the answer starts inside the block (DeepSeek-R1's templates)


PARSERS: dict[str, ReasoningFormat] = {
    "deepseek_r1": ReasoningFormat(opens_in_prompt=True),
    "qwen3": ReasoningFormat(opens_in_prompt=False),
}


def opens_in(fmt: ReasoningFormat, prompt_text: str) -> bool:
    """Whether the answer to this rendered prompt starts inside the reasoning block."""
    return fmt.opens_in_prompt or prompt_text.rstrip().endswith(START)


class ReasoningStream:
    """One choice's text deltas -> (reasoning delta, content delta), holding back what a tag may
    still take: a tail that could become `</think>`, and the reasoning's trailing whitespace."""

    def __init__(self, opened: bool) -> None:
        self.state = "reasoning" if opened else "undecided"  # undecided: might still open with <think>
        self.buf = ""
        self.fresh = True  # nothing of the current part sent yet: its leading whitespace goes
        self.entered = opened  # a block opened: the answer has reasoning (maybe empty)

    def feed(self, text: str) -> tuple[str, str]:
        self.buf += text
        reasoning, content = "", ""
        while True:
            if self.state == "undecided":
                head = self.buf.lstrip()
                if head.startswith(START):
                    self.buf, self.state, self.entered, self.fresh = head[len(START):], "reasoning", True, True
                    continue
                if not head or START.startswith(head):
                    break  # could still be the tag
                self.state, self.fresh = "content", False  # a plain answer: kept as written
            if self.state == "reasoning":
                at = self.buf.find(END)
                if at >= 0:
                    reasoning += self._part(self.buf[:at].rstrip())
                    self.buf, self.state, self.fresh = self.buf[at + len(END):], "content", True
                    continue
                keep = before_prefix(self.buf, END)  # END is not in buf: where a tail could become it
                safe = len(self.buf[:keep].rstrip())
                reasoning += self._part(self.buf[:safe])
                self.buf = self.buf[safe:]
                break
            content += self._part(self.buf)
            self.buf = ""
            break
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """The held-back rest, once the answer has ended."""
        rest, self.buf = self.buf, ""
        if self.state == "reasoning":
            return self._part(rest.rstrip()), ""
        return "", rest if self.state == "undecided" else self._part(rest)

    def _part(self, text: str) -> str:
        if self.fresh:
            text = text.lstrip()
            self.fresh = not text
        return text


def split(text: str, opened: bool) -> tuple[str | None, str]:
    """A finished answer's (reasoning, content); reasoning None when the answer has no block."""
    stream = ReasoningStream(opened)
    parts = [stream.feed(text), stream.finish()]
    reasoning = "".join(p[0] for p in parts)
    return (reasoning if stream.entered else None), "".join(p[1] for p in parts)


@dataclass(frozen=True)
class Thinking:
    """How one chat request's answers are split: whether they start inside the block, and whether
    the reasoning is sent (`include_reasoning`; when not, it is still kept out of the content)."""

    opened: bool
    include: bool = True

    def stream(self) -> ReasoningStream:
        return ReasoningStream(self.opened)

    def feed(self, stream: ReasoningStream, text: str, finished: bool) -> tuple[str, str]:
        """(reasoning delta, content delta) of one streamed event."""
        thought, content = stream.feed(text)
        if finished:
            more_thought, more_content = stream.finish()
            thought, content = thought + more_thought, content + more_content
        return (thought if self.include else ""), content

    def message(self, message: dict[str, Any], thought: str | None) -> dict[str, Any]:
        """A finished choice's message with its reasoning (vLLM's `reasoning`, and the older
        `reasoning_content` that clients still read); an answer that was all reasoning (cut off by
        max_tokens) has `content: null`, as vLLM answers."""
        if thought is None:
            return message
        out = dict(message)
        if out.get("content") == "":
            out["content"] = None
        if thought and self.include:
            out["reasoning"] = out["reasoning_content"] = thought
        return out


def plan(parser: str | None, prompt_text: str, constrained: bool, include: bool) -> Thinking | None:
    """None where answers are not split: no parser, or a grammar shapes the answer from its first token
    (structured outputs, forced tool calls), which leaves it no room for a thinking block."""
    if parser is None or constrained:
        return None
    return Thinking(opens_in(PARSERS[parser], prompt_text), include)


def budget(thinking: Thinking | None, max_tokens: int, tokenizer: Any, param: str) -> ThinkingBudget:
    """A request's thinking budget (`param` names its field): after `max_tokens` tokens of reasoning,
    `</think>` is forced and the model answers. Only where answers are split into reasoning and content."""
    if thinking is None:
        raise InvalidRequestError(f"{param} needs a server started with --reasoning-parser, and an answer that no "
                                  "grammar (structured output, a forced tool call) shapes from its first token", param)
    return ThinkingBudget(max_tokens, tuple(tokenizer.encode(START, add_special_tokens=False)),
                          tuple(tokenizer.encode(END, add_special_tokens=False)), thinking.opened)

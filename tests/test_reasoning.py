"""Reasoning outputs (`--reasoning-parser`) and the chat template's extra inputs (`chat_template_kwargs`,
`continue_final_message`): the split in pieces, then over HTTP.

A random model never writes a <think> block, so answers over HTTP come from a scripted fake engine;
the templates' inputs are checked on a real tokenizer with a Qwen3-style template."""
from __future__ import annotations

import json
import random

import httpx
import openai
import pytest

from engine.errors import InvalidRequestError
from server import generation as gen
from server import reasoning
from server.schemas import ChatMessage
from server.settings import ServerSettings
from tests.server_helpers import FakeEngine, free_port, serve

THINK = "<think>\nThe user says hi.\nA short answer will do.\n</think>\n\nHello there!"
REASONING, ANSWER = "The user says hi.\nA short answer will do.", "Hello there!"


@pytest.mark.parametrize("text,opened,want", [
    (THINK, False, (REASONING, ANSWER)),
    ("The user says hi.\n</think>\n\nHello there!", True, ("The user says hi.", ANSWER)),  # opened by the prompt
    ("Hello <think> there", False, (None, "Hello <think> there")),  # only a leading tag opens a block
    ("  \n<think>cut off by max_tokens </thi", False, ("cut off by max_tokens </thi", "")),
    ("no end tag: all reasoning", True, ("no end tag: all reasoning", "")),
    ("<thinking> is not the tag", False, (None, "<thinking> is not the tag")),
    ("<think></think>\n\nanswer", False, ("", "answer")),
    ("\n  plain answer\n", False, (None, "\n  plain answer\n")),  # no block: the text as written
])
def test_split(text, opened, want):
    assert reasoning.split(text, opened) == want


def test_each_parser_knows_where_the_block_opens():
    r1, qwen3 = reasoning.PARSERS["deepseek_r1"], reasoning.PARSERS["qwen3"]
    assert reasoning.opens_in(r1, "<|Assistant|>") and not reasoning.opens_in(qwen3, "<|im_start|>assistant\n")
    assert reasoning.opens_in(qwen3, "<|im_start|>assistant\n<think>\n")  # Qwen3 thinking-only templates
    assert reasoning.plan("qwen3", "x", constrained=True, include=True) is None  # a grammar leaves no room
    assert reasoning.plan(None, "x", constrained=False, include=True) is None


@pytest.mark.parametrize("text,opened", [(THINK, False), (THINK[len("<think>"):], True), ("plain <think> text", False),
                                         ("<think> a </think", False), ("\n\n<think>\n\n</think>\n\nx \n", False)])
def test_stream_deltas_join_to_the_split_for_any_chunking(text, opened):
    rng = random.Random(0)
    for _ in range(200):
        cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(0, min(6, len(text)))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        stream = reasoning.ReasoningStream(opened)
        deltas = [stream.feed(p) for p in pieces] + [stream.finish()]
        thought, content = reasoning.split(text, opened)
        assert "".join(d[0] for d in deltas) == (thought or "") and "".join(d[1] for d in deltas) == content
    # a tag split over deltas never leaks into the content
    stream = reasoning.ReasoningStream(False)
    assert stream.feed("<thi") == ("", "") and stream.feed("nk>why</") == ("why", "")
    assert stream.feed("think>\nso") == ("", "so")


def _messages(*turns: tuple[str, str]) -> list[ChatMessage]:
    return [ChatMessage(role=role, content=content) for role, content in turns]


QWEN3_STYLE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from models.tokenizer import Tokenizer
    from tests.tiny_models import byte_level_tokenizer_json

    folder = tmp_path_factory.mktemp("tok")
    byte_level_tokenizer_json(folder, 320)
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": QWEN3_STYLE, "eos_token": "<extra_300>"}))
    return Tokenizer.from_folder(folder)


def test_chat_template_kwargs_reach_the_template(tokenizer):
    convo = _messages(("user", "Hi"))
    thinking = gen.render_chat(convo, tokenizer, True)
    assert thinking.endswith("<|im_start|>assistant\n")
    plain = gen.render_chat(convo, tokenizer, True, template_kwargs={"enable_thinking": False})
    assert plain == thinking + "<think>\n\n</think>\n\n"
    # as in HF, the request's variables win over the special tokens', but not over the request's own fields
    assert gen.render_chat(convo, tokenizer, True, template_kwargs={"eos_token": "x"}) == thinking
    for key in ("messages", "add_generation_prompt", "tools"):
        with pytest.raises(InvalidRequestError) as err:
            gen.render_chat(convo, tokenizer, True, template_kwargs={key: 1})
        assert err.value.param == "chat_template_kwargs"


def test_continue_final_message_ends_inside_the_last_turn(tokenizer):
    convo = _messages(("user", "Count to three."), ("assistant", "One, two, "))
    text = gen.render_chat(convo, tokenizer, False, continue_final=True)
    assert text == "<|im_start|>user\nCount to three.<|im_end|>\n<|im_start|>assistant\nOne, two,"
    for bad, add in ((convo, True), (convo[:1], False), (_messages(("user", "x"), ("assistant", " ")), False)):
        with pytest.raises(InvalidRequestError) as err:
            gen.render_chat(bad, tokenizer, add, continue_final=True)
        assert err.value.param == "continue_final_message"


@pytest.fixture(scope="module")
def qwen3_url():
    port = free_port()
    with serve({"fake": FakeEngine(max_model_len=400, script=THINK)},
               ServerSettings(port=port, shutdown_timeout_s=2.0, reasoning_parser="qwen3")) as url:
        yield url


def _chat(url: str, **fields) -> httpx.Response:
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], **fields}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)


def _stream(url: str, **fields) -> tuple[list[dict], str, str, str | None]:
    """(deltas, joined reasoning, joined content, finish_reason)."""
    deltas, finish = [], None
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=30, json={
            "model": "fake", "messages": [{"role": "user", "content": "hi"}], "stream": True, **fields}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choice = json.loads(line[6:])["choices"][0]
                deltas.append(choice["delta"])
                finish = choice["finish_reason"] or finish
    for d in deltas:  # both names, same text
        assert d.get("reasoning") == d.get("reasoning_content")
    return (deltas, "".join(d.get("reasoning") or "" for d in deltas), "".join(d.get("content") or "" for d in deltas),
            finish)


def test_reasoning_and_content_over_http_like_vllm(qwen3_url):
    client = openai.OpenAI(base_url=f"{qwen3_url}/v1", api_key="unused", max_retries=0, timeout=30)
    out = client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi"}])
    message = out.choices[0].message
    assert message.content == ANSWER and out.choices[0].finish_reason == "stop"
    assert message.model_extra["reasoning"] == REASONING == message.model_extra["reasoning_content"]
    deltas, thought, content, finish = _stream(qwen3_url)
    assert (thought, content, finish) == (REASONING, ANSWER, "stop")
    assert not any(d.get("reasoning") and d.get("content") for d in deltas[1:-1])  # the answer follows the thought
    # include_reasoning: false leaves the reasoning out of both, and out of the content
    body = _chat(qwen3_url, include_reasoning=False).json()["choices"][0]["message"]
    assert body["content"] == ANSWER and "reasoning" not in body
    assert _stream(qwen3_url, include_reasoning=False)[1:] == ("", ANSWER, "stop")


def test_an_answer_cut_off_while_thinking_has_no_content(qwen3_url):
    choice = _chat(qwen3_url, max_tokens=25).json()["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"]["content"] is None
    assert choice["message"]["reasoning"] == "The user says hi."  # 25 characters, less the tag and its newline
    assert _stream(qwen3_url, max_tokens=25)[1:] == ("The user says hi.", "", "length")


def test_a_constrained_answer_is_not_split(qwen3_url):
    """A grammar shapes the answer from its first token (here the fake engine ignores it): no split."""
    message = _chat(qwen3_url, response_format={"type": "json_object"}).json()["choices"][0]["message"]
    assert message["content"] == THINK and "reasoning" not in message


def test_template_kwargs_over_http(qwen3_url):
    tokens = lambda **f: httpx.post(f"{qwen3_url}/tokenize", timeout=10, json={  # noqa: E731
        "model": "fake", "messages": [{"role": "user", "content": "hi"}], **f}).json()
    assert tokens(chat_template_kwargs={"enable_thinking": False})["count"] == tokens()["count"] + len("<think>\n\n</think>\n\n")
    usage = _chat(qwen3_url, chat_template_kwargs={"enable_thinking": False}).json()["usage"]
    assert usage["prompt_tokens"] == tokens(chat_template_kwargs={"enable_thinking": False})["count"]
    bad = _chat(qwen3_url, chat_template_kwargs={"messages": []})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "chat_template_kwargs"
    bad = _chat(qwen3_url, continue_final_message=True)  # add_generation_prompt is true by default
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "continue_final_message"


def test_a_block_the_prompt_opened(qwen3_url):
    """A Qwen3 thinking-only template writes <think> into the prompt: the answer starts inside it (here
    the scripted answer repeats the tag, which then is reasoning text: the model would not write it)."""
    message = _chat(qwen3_url, chat_template_kwargs={"thinking_prompt": True}).json()["choices"][0]["message"]
    assert message["content"] == ANSWER and message["reasoning"] == "<think>\n" + REASONING


def test_reasoning_before_tool_calls_and_deepseek_r1():
    """The content after the block goes to the tool parser; deepseek_r1's answers start inside the block."""
    script = THINK.replace("Hello there!", '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
    port = free_port()
    settings = ServerSettings(port=port, shutdown_timeout_s=2.0, reasoning_parser="qwen3", tool_call_parser="hermes")
    tool = {"type": "function", "function": {"name": "get_time"}}
    with serve({"fake": FakeEngine(max_model_len=400, script=script)}, settings) as url:
        choice = _chat(url, tools=[tool]).json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["reasoning"] == REASONING
        assert choice["message"]["content"] is None and choice["message"]["tool_calls"][0]["function"]["name"] == "get_time"
        deltas, thought, content, finish = _stream(url, tools=[tool])
        assert (thought, content, finish) == (REASONING, "", "tool_calls")
        assert [c["function"]["name"] for d in deltas for c in d.get("tool_calls") or []] == ["get_time"]
    port = free_port()
    with serve({"fake": FakeEngine(max_model_len=400, script=THINK[len("<think>"):])},
               ServerSettings(port=port, shutdown_timeout_s=2.0, reasoning_parser="deepseek_r1")) as url:
        assert _stream(url)[1:] == (REASONING, ANSWER, "stop")
        message = _chat(url).json()["choices"][0]["message"]
        assert (message["reasoning"], message["content"]) == (REASONING, ANSWER)


def test_without_a_parser_the_block_stays_in_the_content():
    port = free_port()
    with serve({"fake": FakeEngine(max_model_len=400, script=THINK)}, ServerSettings(port=port)) as url:
        message = _chat(url).json()["choices"][0]["message"]
        assert message["content"] == THINK and "reasoning" not in message
    with pytest.raises(ValueError, match="reasoning_parser"):
        ServerSettings(reasoning_parser="granite")

"""POST /v1/messages (Anthropic's Messages API) on fake engines: answers and every streamed event
held to the `anthropic` package's own types and driven by its client, tool use and thinking split
as chat splits them, and errors in Anthropic's shape. A forced tool call runs on the real engine
in tests/test_server_engine.py."""
from __future__ import annotations

import json

import anthropic
import httpx
import pytest
from anthropic.types import Message, RawMessageStreamEvent
from pydantic import TypeAdapter

from server.schemas_anthropic import AnthropicErrorResponse, MessageResponse, MessageStreamEvent
from server.settings import ServerSettings
from tests.server_helpers import (
    HERMES, THINK, FakeEngine, free_port, greedy_text, leave_stream_early, named_events, scripted, serve,
)

EVENTS = TypeAdapter(RawMessageStreamEvent)
WEATHER = {"name": "get_weather", "description": "Weather now", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TIME = {"name": "get_time", "input_schema": {"type": "object", "properties": {}}}
USER = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def engine() -> FakeEngine:
    return FakeEngine(max_model_len=160)


@pytest.fixture(scope="module")
def url(engine):
    with serve({"fake": engine}) as u:
        yield u


@pytest.fixture(scope="module")
def client(url) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0, timeout=30)



def _post(url: str, path: str = "/v1/messages", **body) -> httpx.Response:
    return httpx.post(f"{url}{path}", json={"model": "fake", "max_tokens": 8, **body}, timeout=30)


def _events(url: str, **body) -> list[dict]:
    """A streamed answer's events, each held to Anthropic's event types; `event:` names its data's type."""
    events = named_events(f"{url}/v1/messages", {"model": "fake", "max_tokens": 8, "stream": True, **body})
    for event in events:
        EVENTS.validate_python(event)
        MessageStreamEvent.model_validate(event)
    return events


def _final(events: list[dict]) -> dict:
    """The message the events build, as Anthropic's clients accumulate it."""
    message = dict(events[0]["message"], content=[])
    partial: dict[int, str] = {}
    for e in events[1:]:
        if e["type"] == "content_block_start":
            message["content"].append(dict(e["content_block"]))
        elif e["type"] == "content_block_delta":
            block, delta = message["content"][e["index"]], e["delta"]
            if delta["type"] == "input_json_delta":
                partial[e["index"]] = partial.get(e["index"], "") + delta["partial_json"]
            else:
                key = "text" if delta["type"] == "text_delta" else "thinking"
                block[key] += delta[key]
        elif e["type"] == "message_delta":
            message.update(e["delta"], usage={**message["usage"], **e["usage"]})
    for i, text in partial.items():
        message["content"][i]["input"] = json.loads(text)
    assert events[-1] == {"type": "message_stop"}
    return message


def test_a_text_answer_like_anthropic(url, client, engine):
    raw = _post(url, system="be brief", messages=USER, max_tokens=5).json()
    Message.model_validate(raw)
    MessageResponse.model_validate(raw)
    prompt = "<s>[system]be brief\n[user]hello\n[assistant]"
    m = client.messages.create(model="fake", max_tokens=5, system=[{"type": "text", "text": "be brief"}], messages=USER)
    assert m.content[0].text == greedy_text(prompt, 5) == raw["content"][0]["text"]
    assert m.id.startswith("msg_") and m.role == "assistant" and m.model == "fake"
    assert (m.stop_reason, m.stop_sequence) == ("max_tokens", None)
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == len(prompt) and m.usage.output_tokens == 5
    # an earlier turn in blocks, and a stop sequence
    turns = [{"role": "user", "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]},
             {"role": "assistant", "content": [{"type": "thinking", "thinking": "x", "signature": ""},
                                               {"type": "text", "text": "hi"}]},
             {"role": "user", "content": "again"}]
    prompt = "<s>[user]hello\n[assistant]hi\n[user]again\n[assistant]"
    text = greedy_text(prompt, 12)
    stop = text[4:6]
    m = client.messages.create(model="fake", max_tokens=12, messages=turns, stop_sequences=[stop])
    assert (m.content[0].text, m.stop_reason, m.stop_sequence) == (text[:text.index(stop)], "stop_sequence", stop)
    assert client.messages.count_tokens(model="fake", messages=turns).input_tokens == len(prompt)


def test_the_stream_builds_the_answer_the_json_gives(url, client):
    whole = _post(url, messages=USER, max_tokens=6).json()
    events = _events(url, messages=USER, max_tokens=6)
    kinds = [e["type"] for e in events]
    assert kinds == ["message_start", "content_block_start", *["content_block_delta"] * 6, "content_block_stop",
                     "message_delta", "message_stop"]
    assert events[0]["message"]["content"] == [] and events[0]["message"]["stop_reason"] is None
    assert _final(events) == {**whole, "id": events[0]["message"]["id"]}
    # Anthropic's own stream helper accumulates the events to the same answer
    with client.messages.stream(model="fake", max_tokens=6, messages=USER) as stream:
        final = stream.get_final_message()
    assert final.content[0].text == whole["content"][0]["text"] and final.stop_reason == "max_tokens"
    assert final.usage.output_tokens == 6


@pytest.mark.parametrize("body", [
    {"messages": USER, "max_tokens": None},
    {"messages": []},
    {"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "x"}}]}]},
    {"messages": [{"role": "system", "content": "x"}]},
    {"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "a", "name": "f", "input": {}}]}]},
    {"messages": USER, "tools": [{"type": "web_search_20250305", "name": "web_search"}]},
    {"messages": USER, "tools": [WEATHER]},  # auto needs a parser
    {"messages": USER, "tools": [WEATHER], "tool_choice": {"type": "tool"}},
    {"messages": USER, "tool_choice": {"type": "any"}},
    {"messages": USER, "temperature": "1"},
    {"messages": USER, "max_tokens": 200},
])
def test_refusals_are_400s_in_anthropics_shape(url, engine, body):
    r = _post(url, **body)
    assert r.status_code == 400, r.text
    AnthropicErrorResponse.model_validate(r.json())
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert engine.stats().kv_cache_usage == 0


def test_the_client_raises_typed_errors(client):
    with pytest.raises(anthropic.NotFoundError) as err:
        client.messages.create(model="nope", max_tokens=4, messages=USER)
    assert err.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model="fake", max_tokens=4, messages=USER, extra_body={"temperature": 5.0})


def test_keys_and_body_limits_answer_in_anthropics_shape():
    settings = ServerSettings(port=free_port(), api_key="sekrit", max_body_bytes=2048)
    with serve({"fake": FakeEngine()}, settings) as u:
        good = anthropic.Anthropic(base_url=u, api_key="sekrit", max_retries=0, timeout=30)  # sends x-api-key
        assert good.messages.create(model="fake", max_tokens=2, messages=USER).usage.output_tokens == 2
        with pytest.raises(anthropic.AuthenticationError) as err:
            anthropic.Anthropic(base_url=u, api_key="wrong", max_retries=0).messages.create(
                model="fake", max_tokens=2, messages=USER)
        assert err.value.body == {"type": "error", "error": {"type": "authentication_error",
                                                             "message": "Incorrect API key provided"}}
        big = httpx.post(f"{u}/v1/messages", headers={"x-api-key": "sekrit"}, timeout=10,
                         json={"model": "fake", "max_tokens": 2, "messages": [{"role": "user", "content": "x" * 4000}]})
        assert big.status_code == 413 and big.json()["error"]["type"] == "request_too_large"
        # other APIs keep OpenAI's shape
        assert "type" not in httpx.post(f"{u}/v1/chat/completions", json={}, timeout=10).json()


def test_leaving_a_stream_frees_its_blocks(url, engine):
    leave_stream_early(f"{url}/v1/messages", {"model": "fake", "messages": USER, "stream": True, "max_tokens": 60},
                       engine, lines=8)
    assert engine.stats().kv_cache_usage == 0


def test_tool_use_blocks_and_their_results_go_back(hermes_url):
    client = anthropic.Anthropic(base_url=hermes_url, api_key="unused", max_retries=0, timeout=30)
    m = client.messages.create(model="fake", max_tokens=300, messages=[{"role": "user", "content": "weather?"}],
                               tools=[WEATHER, TIME])
    text, weather, clock = m.content
    assert text.text == "Let me check." and m.stop_reason == "tool_use"
    assert (weather.type, weather.name, weather.input) == ("tool_use", "get_weather", {"city": "Paris"})
    assert (clock.name, clock.input) == ("get_time", {}) and weather.id.startswith("toolu_") and weather.id != clock.id
    events = _events(hermes_url, max_tokens=300, messages=[{"role": "user", "content": "weather?"}], tools=[WEATHER, TIME])
    final = _final(events)
    assert [(b["type"], b.get("name"), b.get("input")) for b in final["content"]] == [
        ("text", None, None), ("tool_use", "get_weather", {"city": "Paris"}), ("tool_use", "get_time", {})]
    assert final["stop_reason"] == "tool_use"
    # the calls and their results go back: one assistant turn, then a tool turn per result, then the user's text
    turns = [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": [b.model_dump() for b in m.content]},
             {"role": "user", "content": [
                 {"type": "tool_result", "tool_use_id": weather.id, "content": "sunny"},
                 {"type": "tool_result", "tool_use_id": clock.id, "content": [{"type": "text", "text": "noon"}]},
                 {"type": "text", "text": "thanks"}]}]
    prompt = ("<s>[tools]get_weather,get_time\n[user]weather?\n[assistant]Let me check.\n[tool]sunny\n[tool]noon\n"
              "[user]thanks\n[assistant]")
    assert client.messages.count_tokens(model="fake", messages=turns, tools=[WEATHER, TIME]).input_tokens == len(prompt)
    # tool_choice none: the same text is all text
    plain = client.messages.create(model="fake", max_tokens=300, messages=[{"role": "user", "content": "weather?"}],
                                   tools=[WEATHER], tool_choice={"type": "none"})
    assert [b.type for b in plain.content] == ["text"] and plain.content[0].text == HERMES
    assert plain.stop_reason == "end_turn"


def test_thinking_is_its_own_block():
    with scripted(THINK, reasoning_parser="qwen3") as u:
        client = anthropic.Anthropic(base_url=u, api_key="unused", max_retries=0, timeout=30)
        m = client.messages.create(model="fake", max_tokens=100, messages=USER)
        thought, text = m.content
        assert (thought.type, thought.thinking, thought.signature) == ("thinking", "hmm, hi.", "")
        assert text.text == "Hello!" and m.stop_reason == "end_turn"
        final = _final(_events(u, max_tokens=100, messages=USER))
        assert final["content"] == [b.model_dump(exclude_none=True) for b in m.content]
        # thinking disabled reaches the template as Qwen3's switch: an empty block in the prompt
        off = client.messages.count_tokens(model="fake", messages=USER, thinking={"type": "disabled"}).input_tokens
        on = client.messages.count_tokens(model="fake", messages=USER, thinking={"type": "enabled", "budget_tokens": 1024})
        assert off == on.input_tokens + len("<think>\n\n</think>\n\n")

"""Tool calling: the choice -> constraint -> OpenAI tool_calls path, in pieces and over HTTP.

`auto` answers come from a scripted fake engine (a random model never writes <tool_call>); named and
required calls run on the real engine in tests/test_server_engine.py, where the grammar makes them."""
from __future__ import annotations

import json

import httpx
import openai
import pytest

from engine.errors import InvalidRequestError
from server import tools
from server.tool_parsers import PARSERS
from server.schemas import ChatCompletionRequest
from server.settings import ServerSettings
from tests.server_helpers import HERMES, FakeEngine, free_port, serve

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}


def _request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], **fields})


def test_plan_follows_tool_choice_and_refuses_what_it_cannot_do():
    tl = _request(tools=[WEATHER, TIME]).tools
    assert tools.plan(tl, "none", None).mode == "none"
    assert tools.plan(None, None, None).mode == "none"
    assert tools.plan(tl, "required", None).mode == "required"
    assert tools.plan(tl, None, "hermes").mode == "auto"
    named = _request(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert tools.plan(named.tools, named.tool_choice, None).named == "get_weather"
    for tools_, choice, parser, needle in [(tl, None, None, "--tool-call-parser"), (None, "required", None, "needs tools"),
                                           (tl, named.tool_choice.model_copy(update={"function": named.tool_choice.function.model_copy(update={"name": "nope"})}), None, "not in tools")]:
        with pytest.raises(InvalidRequestError, match=needle):
            tools.plan(tools_, choice, parser)


def test_hermes_parsing_and_held_back_content():
    hermes = PARSERS["hermes"]
    content, calls = hermes.parse(HERMES)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)
    assert hermes.parse('<tool_call>{"name": "f", "argu')[1] == []  # cut off: all of it is content
    assert hermes.parse("<tool_call>not json</tool_call>") == ("<tool_call>not json</tool_call>", [])
    assert hermes.content_end("Hello <tool") == len("Hello ")  # might become a tag: hold it
    assert hermes.content_end("Hello <b>") == len("Hello <b>")
    assert hermes.content_end("a<tool_call>{") == 1


# what Llama 3.1-3.3 write with JSON tool calling, and what Llama 3.2/4 write in their pythonic format
LLAMA3 = '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {}}'
PYTHONIC = '[get_weather(city="Paris"), get_time()]'


@pytest.mark.parametrize("parser, text", [("llama3_json", LLAMA3), ("llama3_json", "<|python_tag|>" + LLAMA3),
                                          ("llama3_json", " \n" + LLAMA3 + "\n"), ("pythonic", PYTHONIC)])
def test_whole_answer_formats_become_calls(parser, text):
    content, calls = PARSERS[parser].parse(text)
    assert content is None
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}), ("get_time", {})]


@pytest.mark.parametrize("parser, text", [
    ("llama3_json", "The weather is fine."),  # prose
    ("llama3_json", '{"name": "get_weather", "parameters": {"ci'),  # cut off by max_tokens
    ("llama3_json", '{"city": "Paris"}'),  # JSON, but not a call
    ("llama3_json", LLAMA3 + " and then some prose"),
    ("pythonic", "[a link](http://example.com) in prose"),
    ("pythonic", "[get_weather(city=open('/etc/passwd'))]"),  # only literals: nothing is evaluated
    ("pythonic", "[get_weather('Paris')]"),  # positional: not the format
    ("pythonic", "[get_weather(**kw)]"),
    ("pythonic", "[1, 2]"),
])
def test_text_that_is_not_the_format_stays_content(parser, text):
    assert PARSERS[parser].parse(text) == (text, [])


def test_whole_answer_formats_hold_back_only_what_opens_like_calls():
    llama, pythonic = PARSERS["llama3_json"], PARSERS["pythonic"]
    assert llama.content_end("  ") == 0 and llama.content_end(' {"na') == 0 and llama.content_end("<|py") == 0
    assert llama.content_end("Sure, here") == len("Sure, here") and llama.content_end("<b>") == 3
    assert pythonic.content_end("[get_") == 0 and pythonic.content_end("Paris is") == len("Paris is")
    for parser, text in (("llama3_json", LLAMA3), ("pythonic", PYTHONIC), ("pythonic", "Plain [text] answer")):
        stream = tools.ToolStream(tools.ToolPlan("auto", parser=parser))
        pieces = [text[i : i + 4] for i in range(0, len(text), 4)]
        events = [stream.feed(p, None) for p in pieces[:-1]] + [stream.feed(pieces[-1], "stop")]
        content = "".join(d["content"] for d, _ in events if d and "content" in d)
        calls = [c for d, _ in events if d for c in d.get("tool_calls", [])]
        if text.startswith("Plain"):
            assert content == text and not calls and events[-1][1] == "stop"
        else:
            assert content == "" and [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
            assert events[-1][1] == "tool_calls"


def test_forced_calls_close_the_declared_objects():
    nested = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "integer"}}},
                                               "c": {"type": "array", "items": {"properties": {"d": {}}}},
                                               "e": {"type": "object", "additionalProperties": True}}}
    tl = _request(tools=[{"type": "function", "function": {"name": "f", "parameters": nested}}]).tools
    schema = json.loads(tools.ToolPlan("named", named="f").constraint(tl, True).grammar)["grammars"][0]["json_schema"]
    assert schema["additionalProperties"] is False and schema["properties"]["a"]["additionalProperties"] is False
    assert schema["properties"]["c"]["items"]["additionalProperties"] is False
    assert schema["properties"]["e"]["additionalProperties"] is True  # stated: kept
    assert "additionalProperties" not in nested  # the request's own schema is not changed


def test_required_output_becomes_calls_and_a_cut_off_one_stays_text():
    plan = tools.ToolPlan("required")
    tl = _request(tools=[WEATHER, TIME]).tools
    schema = json.loads(plan.constraint(tl, parallel=False).grammar)["grammars"][0]["json_schema"]
    assert schema["maxItems"] == 1 and len(schema["items"]["anyOf"]) == 2
    assert schema["x-guidance"] == {"whitespace_flexible": False}
    assert "maxItems" not in json.loads(plan.constraint(tl, parallel=True).grammar)["grammars"][0]["json_schema"]
    message, finish = tools.chat_message(plan, '[{"name": "get_weather", "parameters": {"city": "Oslo"}}]', "stop")
    assert finish == "tool_calls" and message["content"] is None
    assert message["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    message, finish = tools.chat_message(plan, '[{"name": "get_wea', "length")
    assert finish == "length" and message == {"role": "assistant", "content": '[{"name": "get_wea'}


def test_streams_reassemble_to_the_whole_answer():
    pieces = [HERMES[i : i + 5] for i in range(0, len(HERMES), 5)]
    stream = tools.ToolStream(tools.ToolPlan("auto", parser="hermes"))
    events = [stream.feed(p, None) for p in pieces[:-1]] + [stream.feed(pieces[-1], "stop")]
    content = "".join(d["content"] for d, _ in events if d and "content" in d)
    assert content == "Let me check.\n" and events[-1][1] == "tool_calls"
    assert [c["function"]["name"] for c in events[-1][0]["tool_calls"]] == ["get_weather", "get_time"]
    named = tools.ToolStream(tools.ToolPlan("named", named="get_weather"))
    deltas = [named.feed(p, r) for p, r in (('{"ci', None), ('', None), ('ty": "Rome"}', "stop"))]
    assert deltas[0][0]["tool_calls"][0]["id"].startswith("call_") and deltas[1][0] is None
    assert "".join(d["tool_calls"][0]["function"]["arguments"] for d, _ in deltas if d) == '{"city": "Rome"}'
    assert deltas[-1][1] == "stop"  # a forced call ends with stop, as OpenAI's do
    plain = tools.ToolStream(tools.ToolPlan("auto", parser="hermes"))
    assert [plain.feed("Hi <to", None), plain.feed("ast>", "stop")] == [({"content": "Hi "}, None), ({"content": "<toast>"}, "stop")]


def test_auto_tool_calls_over_http_like_openai(hermes_url):
    client = openai.OpenAI(base_url=f"{hermes_url}/v1", api_key="unused", max_retries=0, timeout=30)
    kwargs = dict(model="fake", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER, TIME],
                  max_tokens=300)
    r = client.chat.completions.create(**kwargs)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {})]
    calls: dict[int, dict] = {}
    content, finish = "", None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            content += c.delta.content or ""
            for call in c.delta.tool_calls or []:  # the OpenAI client's way of assembling them
                slot = calls.setdefault(call.index, {"name": "", "arguments": ""})
                slot["name"] += call.function.name or ""
                slot["arguments"] += call.function.arguments or ""
            finish = c.finish_reason or finish
    assert content.strip() == "Let me check." and finish == "tool_calls"
    assert [c["name"] for c in calls.values()] == ["get_weather", "get_time"]
    # a conversation carrying the calls and their results renders and answers
    history = [{"role": "user", "content": "Weather?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}]
    r = httpx.post(f"{hermes_url}/v1/chat/completions", json={"model": "fake", "messages": history, "tools": [WEATHER],
                                                               "tool_choice": "none", "max_tokens": 300}, timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == HERMES  # none: text as written


@pytest.mark.parametrize("parser, script", [("llama3_json", LLAMA3), ("pythonic", PYTHONIC)])
def test_other_parsers_over_http(parser, script):
    """The flag reaches the route: each format's answer comes back as OpenAI tool calls, streamed or not."""
    settings = ServerSettings(port=free_port(), shutdown_timeout_s=2.0, tool_call_parser=parser)
    with serve({"fake": FakeEngine(max_model_len=400, script=script)}, settings) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
        kwargs = dict(model="fake", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER, TIME],
                      max_tokens=300)
        choice = client.chat.completions.create(**kwargs).choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [
            ("get_weather", {"city": "Paris"}), ("get_time", {})]
        deltas = [c.delta for chunk in client.chat.completions.create(stream=True, **kwargs) for c in chunk.choices]
        assert not "".join(d.content or "" for d in deltas)  # nothing of the calls leaks as content
        assert [t.function.name for d in deltas for t in d.tool_calls or []] == ["get_weather", "get_time"]


def test_unknown_parser_is_refused():
    with pytest.raises(ValueError, match="llama3_json"):
        ServerSettings(tool_call_parser="granite")


# what Mistral models write: tokenizer v3 (7B v0.3, Mixtral 8x22B, Nemo) and v11+ (Small 3.2, Magistral)
MISTRAL_V3 = '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}]'
MISTRAL_V11 = '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}'


@pytest.mark.parametrize("text", [MISTRAL_V3, MISTRAL_V11, "Checking.\n" + MISTRAL_V11])
def test_mistral_formats_become_calls(text):
    mistral = PARSERS["mistral"]
    content, calls = mistral.parse(text)
    assert content == ("Checking." if text.startswith("Checking") else None)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert mistral.content_end("Checking. [TOOL_") == len("Checking. ") and mistral.content_end(text) == text.find("[TOOL")
    for not_calls in ("[TOOL_CALLS] [{\"name\": \"get_wea", "[TOOL_CALLS]get_weather[ARGS]{\"ci", "[TOOL_CALLS] []",
                      "[TOOL_CALLS] prose", "Plain [text]."):
        assert mistral.parse(not_calls) == (not_calls, [])


class _Recording(FakeEngine):
    """Keeps the sampling parameters each request arrived with."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.params: list = []

    def add_request(self, request_id, payload) -> None:
        self.params.append(payload.params)
        super().add_request(request_id, payload)


def test_mistral_parser_over_http_keeps_special_tokens_for_tool_requests():
    settings = ServerSettings(port=free_port(), shutdown_timeout_s=2.0, tool_call_parser="mistral")
    engine = _Recording(max_model_len=400, script=MISTRAL_V11)
    with serve({"fake": engine}, settings) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
        kwargs = dict(model="fake", messages=[{"role": "user", "content": "Weather in Paris?"}], max_tokens=300)
        choice = client.chat.completions.create(tools=[WEATHER, TIME], **kwargs).choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [
            ("get_weather", {"city": "Paris"}), ("get_time", {})]
        deltas = [c.delta for chunk in client.chat.completions.create(stream=True, tools=[WEATHER, TIME], **kwargs)
                  for c in chunk.choices]
        assert not "".join(d.content or "" for d in deltas)
        assert [t.function.name for d in deltas for t in d.tool_calls or []] == ["get_weather", "get_time"]
        client.chat.completions.create(**kwargs)  # no tools: special tokens dropped as usual
        client.chat.completions.create(tools=[WEATHER], tool_choice="required", **kwargs)  # forced: a grammar, no tag
        client.chat.completions.create(extra_body={"skip_special_tokens": False}, **kwargs)  # vLLM's field, asked
    assert [p.skip_special_tokens for p in engine.params] == [False, False, True, True, False]


REQUIRED = ('[{"name":"get_weather","parameters":{"city":"O\\"slo}","days":[1,{"x":"]"}]}},'
            '{"name":"get_time","parameters":{}}]')


def _replay(text: str, size: int, reason: str = "stop") -> tuple[list[dict], str | None]:
    """A required-mode stream of `text` in pieces of `size`: its tool-call pieces and finish reason."""
    stream = tools.ToolStream(tools.ToolPlan("required"))
    pieces, finish = [], None
    chunks = [text[i : i + size] for i in range(0, len(text), size)]
    for k, chunk in enumerate(chunks):
        delta, finish = stream.feed(chunk, reason if k == len(chunks) - 1 else None)
        assert k == len(chunks) - 1 or finish is None
        pieces += (delta or {}).get("tool_calls", [])
    return pieces, finish


def _calls(pieces: list[dict]) -> list[tuple[str, str]]:
    """(name, arguments) per index, from streamed pieces: the first of each names it, the rest add text."""
    calls: dict[int, list[str]] = {}
    for p in pieces:
        if "id" in p:
            assert p["index"] == len(calls) and p["type"] == "function"
            calls[p["index"]] = [p["function"]["name"], p["function"]["arguments"]]
        else:
            calls[p["index"]][1] += p["function"]["arguments"]
    return [tuple(c) for c in calls.values()]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_required_calls_stream_piecewise_and_equal_the_whole_answer(size):
    pieces, finish = _replay(REQUIRED, size)
    message, whole_finish = tools.chat_message(tools.ToolPlan("required"), REQUIRED, "stop")
    assert finish == whole_finish == "tool_calls"
    assert _calls(pieces) == [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]]
    assert json.loads(_calls(pieces)[0][1]) == {"city": 'O"slo}', "days": [1, {"x": "]"}]}
    assert _calls(pieces)[1] == ("get_time", "{}")
    if size == 1:  # the arguments came in many pieces, each call opened before its arguments ended
        assert sum("id" not in p for p in pieces) > 10


def test_required_stream_edge_cases():
    reordered = '[{"parameters":{"a":1},"name":"f"}]'  # the name after the parameters: it opens with them
    pieces, finish = _replay(reordered, 2)
    assert _calls(pieces) == [("f", '{"a":1}')] and finish == "tool_calls"
    pieces, finish = _replay('[{"name":"get_wea', 3, reason="length")  # cut off before any call opened
    assert pieces == [] and finish == "length"
    stream = tools.ToolStream(tools.ToolPlan("required"))
    assert stream.feed('[{"name":"get_wea', "length") == ({"content": '[{"name":"get_wea'}, "length")
    pieces, finish = _replay('[{"name":"f","parameters":{"a":[1,', 4, reason="length")  # cut off mid-arguments
    assert _calls(pieces) == [("f", '{"a":[1,')] and finish == "length"

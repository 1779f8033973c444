"""POST /v1/responses (OpenAI's Responses API) on fake engines: the answer and every streamed event
held to the `openai` package's own types, conversations continued through the store, tool calls
and reasoning split as chat splits them, and refusals. The grammar-driven paths (text.format, forced
calls) run on the real engine in tests/test_server_engine.py."""
from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from server.responses import ResponseBuilder, reasoning_tokens
from server.schemas_responses import ResponseEvent, ResponseObject
from server.settings import ServerSettings
from tests.server_helpers import (
    HERMES, THINK, FakeEngine, free_port, greedy_text, leave_stream_early, named_events, scripted, serve,
)

EVENTS = TypeAdapter(ResponseStreamEvent)
WEATHER = {"type": "function", "name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TIME = {"type": "function", "name": "get_time"}


@pytest.fixture(scope="module")
def engine() -> FakeEngine:
    return FakeEngine(max_model_len=160)


@pytest.fixture(scope="module")
def url(engine):
    with serve({"fake": engine}, ServerSettings(port=free_port(), shutdown_timeout_s=2.0, responses_store_size=3)) as u:
        yield u


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)



def _post(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/responses", json={"model": "fake", **body}, timeout=30)


def _events(url: str, **body) -> list[dict]:
    """A streamed answer's events, each held to OpenAI's event types; `event:` names its data's type."""
    events = named_events(f"{url}/v1/responses", {"model": "fake", "stream": True, **body})
    for event in events:
        EVENTS.validate_python(event)
        ResponseEvent.model_validate(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def test_a_text_answer_like_openai(url, client, engine):
    raw = _post(url, input="hello", instructions="be brief", max_output_tokens=5).json()
    Response.model_validate(raw)
    ResponseObject.model_validate(raw)
    prompt = "<s>[system]be brief\n[user]hello\n[assistant]"
    r = client.responses.create(model="fake", input="hello", instructions="be brief", max_output_tokens=5)
    assert r.output_text == greedy_text(prompt, 5) == raw["output"][0]["content"][0]["text"]
    assert r.id.startswith("resp_") and r.object == "response" and r.model == "fake"
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output[0].status == "incomplete" and r.output[0].role == "assistant"
    assert r.usage.input_tokens == len(prompt) and r.usage.output_tokens == 5 and r.usage.total_tokens == len(prompt) + 5
    assert r.instructions == "be brief" and r.max_output_tokens == 5 and r.store
    # input as message items, content as parts: the same prompt
    items = [{"role": "system", "content": [{"type": "input_text", "text": "be brief"}]},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hel"},
                                                            {"type": "input_text", "text": "lo"}]}]
    assert client.responses.create(model="fake", input=items, max_output_tokens=5).output_text == r.output_text


def test_the_stream_ends_in_the_answer_the_json_gives(url, client, engine):
    whole = _post(url, input="hi", max_output_tokens=6).json()
    events = _events(url, input="hi", max_output_tokens=6)
    kinds = [e["type"] for e in events]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * 6, "response.output_text.done",
                     "response.content_part.done", "response.output_item.done", "response.incomplete"]
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    last = events[-1]["response"]
    assert text == last["output"][0]["content"][0]["text"] == whole["output"][0]["content"][0]["text"]
    assert last["usage"] == whole["usage"] and last["status"] == "incomplete"
    assert len({e["item_id"] for e in events if "item_id" in e}) == 1
    # OpenAI's own stream helper accumulates the events to the same answer
    with client.responses.stream(model="fake", input="hi", max_output_tokens=6) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
    assert "".join(deltas) == text


def test_previous_response_id_continues_the_stored_conversation(url, client, engine):
    first = client.responses.create(model="fake", input="hi", instructions="old", max_output_tokens=3)
    second = client.responses.create(model="fake", input="more", previous_response_id=first.id, max_output_tokens=4)
    # the earlier instructions are not carried over; its answer is the assistant's turn
    prompt = f"<s>[user]hi\n[assistant]{first.output_text}\n[user]more\n[assistant]"
    assert second.output_text == greedy_text(prompt, 4) and second.usage.input_tokens == len(prompt)
    assert second.previous_response_id == first.id
    third = client.responses.create(model="fake", input="again", previous_response_id=second.id, max_output_tokens=2)
    assert third.usage.input_tokens == len(prompt + f"{second.output_text}\n[user]again\n[assistant]")
    # retrieval and deletion; the store holds three, the oldest goes first
    assert client.responses.retrieve(second.id).model_dump() == second.model_dump()
    client.responses.create(model="fake", input="x", max_output_tokens=1)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    client.responses.delete(third.id)
    for gone in (lambda: client.responses.retrieve(third.id), lambda: client.responses.delete(third.id),
                 lambda: client.responses.create(model="fake", input="x", previous_response_id=third.id)):
        with pytest.raises(openai.NotFoundError):
            gone()
    unstored = client.responses.create(model="fake", input="x", store=False, max_output_tokens=1)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    # a streamed answer is stored once it has ended
    streamed = _events(url, input="hi", max_output_tokens=2)[-1]["response"]
    assert _post(url, input="x", previous_response_id=streamed["id"], max_output_tokens=1).status_code == 200


def test_a_server_that_stores_nothing_says_so():
    with serve({"fake": FakeEngine()}, ServerSettings(port=free_port(), responses_store_size=0)) as u:
        r = _post(u, input="hi", max_output_tokens=1).json()
        assert r["store"] is False
        err = _post(u, input="hi", previous_response_id=r["id"])
        assert err.status_code == 404 and "--responses-store-size is 0" in err.json()["error"]["message"]
        assert err.json()["error"]["param"] == "previous_response_id"


def test_logprobs_ride_on_the_text(url, engine):
    r = _post(url, input="hi", max_output_tokens=3, top_logprobs=2, include=["message.output_text.logprobs"]).json()
    part = r["output"][0]["content"][0]
    assert [e["token"] for e in part["logprobs"]] == list(part["text"])
    assert all(e["logprob"] == -0.5 and len(e["top_logprobs"]) == 2 for e in part["logprobs"])
    events = _events(url, input="hi", max_output_tokens=3, top_logprobs=2, include=["message.output_text.logprobs"])
    streamed = [lp for e in events if e["type"] == "response.output_text.delta" for lp in e["logprobs"]]
    assert streamed == part["logprobs"] == events[-1]["response"]["output"][0]["content"][0]["logprobs"]
    assert _post(url, input="hi", top_logprobs=2).status_code == 400  # without the include


@pytest.mark.parametrize("body, param", [
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input"),
    ({"input": "x", "background": True, "store": False}, "background"),
    ({"input": "x", "background": True, "max_output_tokens": 200}, "prompt"),  # admission errors come at once
    ({"input": "x", "truncation": "middle"}, "truncation"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools"),
    ({"input": "x", "tools": [WEATHER]}, "tool_choice"),  # auto needs a parser
    ({"input": "x", "tool_choice": "required"}, "tool_choice"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "a"}}}, "text"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "temperature": "1"}, "temperature"),
    ({"input": "x", "max_output_tokens": 200}, "prompt"),
])
def test_refusals_are_400s_naming_the_field(url, engine, body, param):
    r = _post(url, **body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()
    assert engine.stats().kv_cache_usage == 0


def _until_ended(url: str, response_id: str, timeout_s: float = 10.0) -> dict:
    """GET a background response until it leaves queued / in_progress."""
    deadline = time.monotonic() + timeout_s
    while True:
        body = httpx.get(f"{url}/v1/responses/{response_id}", timeout=10).json()
        if body["status"] not in ("queued", "in_progress") or time.monotonic() > deadline:
            return body
        time.sleep(0.02)


def test_a_background_response_is_queued_then_stored(url, client, engine):
    raw = _post(url, input="hello", max_output_tokens=5, background=True)
    assert raw.status_code == 200, raw.text
    queued = raw.json()
    Response.model_validate(queued)
    ResponseObject.model_validate(queued)
    assert queued["status"] == "queued" and queued["background"] and queued["output"] == []
    done = _until_ended(url, queued["id"])
    Response.model_validate(done)
    sync = _post(url, input="hello", max_output_tokens=5).json()
    assert done["status"] == "incomplete" and done["background"] and done["error"] is None
    assert done["output"][0]["content"][0]["text"] == sync["output"][0]["content"][0]["text"] == greedy_text(
        "<s>[user]hello\n[assistant]", 5)
    assert done["usage"] == sync["usage"]
    assert client.responses.retrieve(queued["id"]).output_text == sync["output"][0]["content"][0]["text"]
    again = client.responses.create(model="fake", input="more", previous_response_id=queued["id"], max_output_tokens=2)
    assert again.status == "incomplete"  # an ended background answer continues like any other
    # cancelling one that ended returns it as it is; a foreground one cannot be cancelled
    assert httpx.post(f"{url}/v1/responses/{queued['id']}/cancel", timeout=10).json() == done
    r = httpx.post(f"{url}/v1/responses/{sync['id']}/cancel", timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_id"
    assert httpx.post(f"{url}/v1/responses/resp_nope/cancel", timeout=10).status_code == 404
    assert engine.stats().kv_cache_usage == 0


def test_cancel_and_delete_stop_a_background_response_and_free_its_blocks():
    slow = FakeEngine(max_model_len=400, step_delay_s=0.02)
    with serve({"fake": slow}, ServerSettings(port=free_port(), shutdown_timeout_s=2.0)) as url:
        started = [_post(url, input="long", max_output_tokens=300, background=True).json() for _ in range(2)]
        deadline = time.monotonic() + 10
        while len(slow.running) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(slow.running) == 2 and slow.stats().kv_cache_usage > 0
        running = httpx.get(f"{url}/v1/responses/{started[0]['id']}", timeout=10).json()
        assert running["status"] == "in_progress"
        r = _post(url, input="next", previous_response_id=started[0]["id"])
        assert r.status_code == 400 and r.json()["error"]["param"] == "previous_response_id"

        cancelled = httpx.post(f"{url}/v1/responses/{started[0]['id']}/cancel", timeout=10).json()
        Response.model_validate(cancelled)
        assert cancelled["status"] == "cancelled" and cancelled["output"] == []
        assert httpx.delete(f"{url}/v1/responses/{started[1]['id']}", timeout=10).status_code == 200
        while slow.has_unfinished_requests() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not slow.has_unfinished_requests() and slow.stats().kv_cache_usage == 0
        assert slow.generation_tokens < 300  # stopped long before its end
        time.sleep(0.1)  # nothing overwrites the cancelled answer later
        assert _until_ended(url, started[0]["id"]) == cancelled
        assert httpx.post(f"{url}/v1/responses/{started[0]['id']}/cancel", timeout=10).json() == cancelled
        assert httpx.get(f"{url}/v1/responses/{started[1]['id']}", timeout=10).status_code == 404


def test_an_unknown_model_is_a_404(url):
    assert _post(url, input="x", model="nope").status_code == 404


def test_leaving_a_stream_frees_its_blocks(url, engine):
    leave_stream_early(f"{url}/v1/responses", {"model": "fake", "input": "hi", "stream": True, "max_output_tokens": 60},
                       engine, lines=8)
    assert engine.stats().kv_cache_usage == 0


def test_tool_calls_become_function_call_items_and_their_outputs_go_back(hermes_url):
    r = _post(hermes_url, input="weather?", tools=[WEATHER, TIME]).json()
    Response.model_validate(r)
    message, weather, clock = r["output"]
    assert message["content"][0]["text"] == "Let me check."
    assert (weather["type"], weather["name"], json.loads(weather["arguments"])) == ("function_call", "get_weather",
                                                                                    {"city": "Paris"})
    assert (clock["name"], clock["arguments"], r["status"]) == ("get_time", "{}", "completed")
    assert weather["call_id"].startswith("call_") and weather["call_id"] != clock["call_id"]
    events = _events(hermes_url, input="weather?", tools=[WEATHER, TIME])
    done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert [(i["type"], i.get("name")) for i in done] == [("message", None), ("function_call", "get_weather"),
                                                          ("function_call", "get_time")]
    args = [e["arguments"] for e in events if e["type"] == "response.function_call_arguments.done"]
    assert [json.loads(a) for a in args] == [{"city": "Paris"}, {}]
    # the calls and their results go back as items; the template sees one assistant turn, then tool turns
    back = [{"role": "user", "content": "weather?"}, message, weather, clock,
            {"type": "function_call_output", "call_id": weather["call_id"], "output": "sunny"},
            {"type": "function_call_output", "call_id": clock["call_id"], "output": [{"type": "input_text", "text": "noon"}]}]
    again = _post(hermes_url, input=back, tools=[WEATHER, TIME]).json()
    prompt = ("<s>[tools]get_weather,get_time\n[user]weather?\n[assistant]Let me check.\n[tool]sunny\n[tool]noon\n"
              "[assistant]")
    assert again["usage"]["input_tokens"] == len(prompt)
    # continuing by id gives the same prompt as sending the history back
    follow = [{"type": "function_call_output", "call_id": weather["call_id"], "output": "sunny"},
              {"type": "function_call_output", "call_id": clock["call_id"], "output": "noon"}]
    by_id = _post(hermes_url, input=follow, previous_response_id=r["id"], tools=[WEATHER, TIME]).json()
    assert by_id["usage"]["input_tokens"] == len(prompt)
    # tool_choice none: the same text is all message
    plain = _post(hermes_url, input="weather?", tools=[WEATHER], tool_choice="none").json()
    assert [i["type"] for i in plain["output"]] == ["message"] and plain["output"][0]["content"][0]["text"] == HERMES


def test_reasoning_is_its_own_item():
    with scripted(THINK, reasoning_parser="qwen3") as u:
        r = _post(u, input="hi").json()
        Response.model_validate(r)
        thought, message = r["output"]
        assert thought["type"] == "reasoning" and thought["content"] == [{"type": "reasoning_text", "text": "hmm, hi."}]
        assert message["content"][0]["text"] == "Hello!" and thought["summary"] == []
        # each character is a token: the reasoning runs through the closing tag
        assert r["usage"]["output_tokens_details"]["reasoning_tokens"] == THINK.index("</think>") + len("</think>")
        events = _events(u, input="hi")
        assert "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta") == "hmm, hi."
        assert [e["output_index"] for e in events if e["type"] == "response.output_item.done"] == [0, 1]
        assert events[-1]["response"]["output"][0]["content"] == thought["content"]
        # the reasoning stays out of the next turn's prompt
        r2 = _post(u, input="and?", previous_response_id=r["id"]).json()
        assert r2["usage"]["input_tokens"] == len("<s>[user]hi\n[assistant]Hello!\n[user]and?\n[assistant]")
        cut = _post(u, input="hi", max_output_tokens=10).json()  # "<think>\nhm"
        assert cut["status"] == "incomplete" and [i["type"] for i in cut["output"]] == ["reasoning"]
        assert cut["output"][0]["content"][0]["text"] == "hm" and cut["output"][0]["status"] == "incomplete"
        assert cut["usage"]["output_tokens_details"]["reasoning_tokens"] == 10


def test_reasoning_tokens_count_through_the_closing_tag():
    assert reasoning_tokens([5, 6, 9, 7, 9], [9], True) == 3
    assert reasoning_tokens([5, 6, 8, 9, 7], [8, 9], True) == 4
    assert reasoning_tokens([5, 6, 7], [9], True) == 3  # never closed: all of it
    assert reasoning_tokens([5, 6, 9], [9], False) == 0


def test_builder_closes_each_item_before_the_next_opens():
    b = ResponseBuilder({"id": "resp_x"})
    events = b.start() + b.reasoning("a") + b.text("b", None) + b.tool_calls(
        [{"index": 0, "id": "call_1", "function": {"name": "f", "arguments": "{"}}]) + b.tool_calls(
        [{"index": 0, "function": {"arguments": "}"}}]) + b.finish("completed", {})
    added = [e["sequence_number"] for e in events if e["type"] == "response.output_item.added"]
    done = [e["sequence_number"] for e in events if e["type"] == "response.output_item.done"]
    assert all(d < a for d, a in zip(done, added[1:])) and len(done) == len(added) == 3
    assert events[-1]["response"]["output"][2]["arguments"] == "{}"
    assert [i["status"] for i in events[-1]["response"]["output"]] == ["completed"] * 3


def test_a_wrong_method_lists_both_of_the_paths_methods(url):
    r = httpx.put(f"{url}/v1/responses/resp_x", timeout=10)
    assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET"


def test_input_items_are_listed_back_like_openai(url, client):
    from openai.types.responses import ResponseItemList

    items = [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
             {"role": "assistant", "content": "hello"},
             {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{}"},
             {"type": "function_call_output", "call_id": "call_1", "output": "done"}, {"role": "user", "content": "and?"}]
    r = client.responses.create(model="fake", input=items, max_output_tokens=1)
    raw = httpx.get(f"{url}/v1/responses/{r.id}/input_items", params={"order": "asc"}, timeout=10).json()
    ResponseItemList.model_validate(raw)
    assert [(i["type"], i.get("role")) for i in raw["data"]] == [
        ("message", "system"), ("message", "user"), ("message", "assistant"), ("function_call", None),
        ("function_call_output", None), ("message", "user")]
    assert raw["data"][2]["content"] == [{"type": "output_text", "text": "hello", "annotations": []}]
    assert (raw["first_id"], raw["last_id"], raw["has_more"]) == (raw["data"][0]["id"], raw["data"][-1]["id"], False)
    ids = [i["id"] for i in raw["data"]]
    listed = client.responses.input_items.list(r.id)  # OpenAI's default order: the last first
    assert [i.id for i in listed.data] == ids[::-1]
    first = httpx.get(f"{url}/v1/responses/{r.id}/input_items", params={"order": "asc", "limit": 2}, timeout=10).json()
    assert [i["id"] for i in first["data"]] == ids[:2] and first["has_more"]
    rest = httpx.get(f"{url}/v1/responses/{r.id}/input_items",
                     params={"order": "asc", "limit": 10, "after": first["last_id"]}, timeout=10).json()
    assert [i["id"] for i in rest["data"]] == ids[2:] and not rest["has_more"]
    bad = httpx.get(f"{url}/v1/responses/{r.id}/input_items", params={"limit": 0}, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "limit"
    assert httpx.get(f"{url}/v1/responses/resp_nope/input_items", timeout=10).status_code == 404
    text_only = client.responses.create(model="fake", input="just text", max_output_tokens=1)
    (item,) = client.responses.input_items.list(text_only.id).data
    assert (item.role, item.content[0].text) == ("user", "just text")


def test_truncation_auto_leaves_out_the_oldest_turns(url, engine):
    a, b, c = "a" * 40, "b" * 40, "c" * 20
    first = _post(url, input=a, instructions="be brief", max_output_tokens=4).json()
    second = _post(url, input=b, previous_response_id=first["id"], instructions="be brief", max_output_tokens=4).json()
    body = dict(input=c, previous_response_id=second["id"], instructions="be brief", max_output_tokens=4)
    refused = _post(url, **body)  # the whole conversation is over the context
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "prompt", refused.text
    r = _post(url, **body, truncation="auto")
    assert r.status_code == 200, r.text
    raw = r.json()
    answer = second["output"][0]["content"][0]["text"]
    prompt = f"<s>[system]be brief\n[user]{b}\n[assistant]{answer}\n[user]{c}\n[assistant]"  # a's turn left out
    assert raw["output"][0]["content"][0]["text"] == greedy_text(prompt, 4)
    assert raw["usage"]["input_tokens"] == len(prompt) and raw["truncation"] == "auto"
    assert engine.stats().kv_cache_usage == 0


def test_truncated_keeps_whole_turns_and_system_messages():
    from server.responses import truncated

    convo = [{"role": "system", "content": "s"}, {"role": "user", "content": "u1"},
             {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}, {"role": "tool", "content": "t"},
             {"role": "assistant", "content": "a1"}, {"role": "developer", "content": "d"},
             {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"},
             {"role": "user", "content": "u3"}]
    def fits(n: int):
        return lambda c: len(c) <= n

    assert truncated(convo, fits(9)) == convo
    assert truncated(convo, fits(5)) == [convo[0], convo[5], *convo[6:]]  # u1's turn, tool result included, gone
    assert truncated(convo, fits(3)) == [convo[0], convo[5], convo[8]]
    assert truncated(convo, fits(1)) == [convo[0], convo[5], convo[8]]  # the last turn, left for the engine to refuse
    assert truncated(convo[1:2], fits(0)) == convo[1:2]


def _blocks(text: str) -> list[dict]:
    """The complete named SSE events of a stream's text (a partial last block is left out)."""
    events = []
    for block in text.split("\n\n")[:-1]:
        name, data = block.split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert name == f"event: {event['type']}"
        EVENTS.validate_python(event)
        events.append(event)
    return events


def test_a_streamed_background_response_resumes_where_its_reader_left():
    """OpenAI's resumable streams: the reader of a background stream leaves, the response runs on, and
    GET ?stream=true&starting_after=N (the openai client's retrieve(stream=True)) gives the rest."""
    slow = FakeEngine(max_model_len=400, step_delay_s=0.01)
    with serve({"fake": slow}, ServerSettings(port=free_port(), shutdown_timeout_s=2.0)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        body = {"model": "fake", "input": "hello", "max_output_tokens": 40, "background": True, "stream": True}
        text = ""
        with httpx.stream("POST", f"{url}/v1/responses", json=body, timeout=30) as r:
            assert r.status_code == 200
            for chunk in r.iter_text():
                text += chunk
                if text.count("\n\n") >= 6:
                    break  # the reader leaves
        first = _blocks(text)
        response_id = first[0]["response"]["id"]
        live = client.responses.retrieve(response_id, stream=True, starting_after=first[-1]["sequence_number"])
        rest = [e.model_dump(exclude_unset=True) for e in live]  # followed until it ends
        done = _until_ended(url, response_id)
        events = first + rest
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
        assert rest[-1]["type"] == "response.incomplete" and rest[-1]["response"]["output"] == done["output"]
        said = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
        assert said == done["output"][0]["content"][0]["text"] == greedy_text("<s>[user]hello\n[assistant]", 40)
        replay = httpx.get(f"{url}/v1/responses/{response_id}", params={"stream": "true"}, timeout=30)
        assert _blocks(replay.text) == events  # an ended one replays whole
        assert slow.stats().kv_cache_usage == 0

        foreground = _post(url, input="hi", max_output_tokens=2).json()
        r = httpx.get(f"{url}/v1/responses/{foreground['id']}", params={"stream": "true"}, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["param"] == "stream"


def test_cancel_ends_the_streams_that_follow_a_background_response():
    slow = FakeEngine(max_model_len=400, step_delay_s=0.02)
    with serve({"fake": slow}, ServerSettings(port=free_port(), shutdown_timeout_s=2.0)) as url:
        started = _post(url, input="long", max_output_tokens=300, background=True).json()
        with httpx.stream("GET", f"{url}/v1/responses/{started['id']}", params={"stream": "true"}, timeout=30) as r:
            lines = r.iter_lines()
            next(lines)  # following it
            cancelled = httpx.post(f"{url}/v1/responses/{started['id']}/cancel", timeout=10).json()
            rest = list(lines)  # the stream ends: nothing more will come
        assert cancelled["status"] == "cancelled" and all('"response.completed"' not in x for x in rest)
        deadline = time.monotonic() + 10
        while slow.has_unfinished_requests() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert slow.stats().kv_cache_usage == 0 and slow.generation_tokens < 300

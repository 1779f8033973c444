"""The OpenAI-compatible routes against a live uvicorn, on a deterministic fake engine."""
from __future__ import annotations

import json
import logging
import os
import time

import httpx
import openai
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.server_helpers import FakeEngine, metric_value, queue_full, serve  # noqa: E402


@pytest.fixture(scope="module")
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture(scope="module")
def base_url(engine: FakeEngine):
    with serve({"fake": engine}) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=30)


def _expected(engine: FakeEngine, prompt_ids: list[int], n_tokens: int) -> str:
    """What the fake engine generates greedily (its rule, restated independently)."""
    return "".join(chr(ord("a") + (sum(prompt_ids) + 3 * k) % 26) for k in range(n_tokens))


def test_completion_text_usage_and_finish(client, engine):
    r = client.completions.create(model="fake", prompt="hello", max_tokens=5, temperature=0)
    ids = engine.tokenizer.encode("hello")
    assert r.choices[0].text == _expected(engine, ids, 5)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 5
    assert r.usage.total_tokens == len(ids) + 5
    assert r.object == "text_completion" and r.model == "fake"


def test_completion_token_prompts_and_batch(client, engine):
    ids = engine.tokenizer.encode("abc")
    r = client.completions.create(model="fake", prompt=[ids, engine.tokenizer.encode("xyz")], max_tokens=3,
                                  temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text == _expected(engine, ids, 3)
    assert r.choices[0].text != r.choices[1].text


def test_completion_stop_string(client, engine):
    full = client.completions.create(model="fake", prompt="stop test", max_tokens=10, temperature=0)
    text = full.choices[0].text
    stop = text[4:6]
    r = client.completions.create(model="fake", prompt="stop test", max_tokens=10, temperature=0, stop=[stop])
    assert r.choices[0].text == text[: text.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_completion_n2_and_logprobs(client):
    r = client.completions.create(model="fake", prompt="hi", max_tokens=4, n=2, temperature=1.0, seed=3,
                                  logprobs=2)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text != r.choices[1].text
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 4 and "".join(lp.tokens) == r.choices[0].text
    assert lp.token_logprobs == [-0.5] * 4
    assert all(len(t) == 2 for t in lp.top_logprobs)
    assert lp.text_offset == [0, 1, 2, 3]


def test_completion_stream_matches_non_stream(client):
    whole = client.completions.create(model="fake", prompt="stream me", max_tokens=8, temperature=0)
    chunks = list(client.completions.create(model="fake", prompt="stream me", max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8


def test_chat_and_stream_reassemble(client):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    whole = client.chat.completions.create(model="fake", messages=msgs, max_completion_tokens=7, temperature=0)
    assert whole.choices[0].message.role == "assistant"
    assert len(whole.choices[0].message.content) == 7
    assert whole.choices[0].finish_reason == "length"
    stream = client.chat.completions.create(model="fake", messages=msgs, max_tokens=7, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert chunks[-1].choices == []


def test_continuous_usage_stats_count_as_they_go(client):
    """vLLM's `continuous_usage_stats`: every chunk carries the usage so far, the last the whole."""
    msgs = [{"role": "user", "content": "count"}]
    options = {"include_usage": True, "continuous_usage_stats": True}
    chat = list(client.chat.completions.create(model="fake", messages=msgs, max_tokens=6, temperature=0, stream=True,
                                               stream_options=options))
    done = [c.usage.completion_tokens for c in chat]
    assert all(c.usage is not None for c in chat) and done == sorted(done) and done[0] < done[-1] == 6
    assert len({c.usage.prompt_tokens for c in chat}) == 1
    text = [c.choices[0].delta.content or "" for c in chat if c.choices]
    assert [len("".join(text[: i + 1])) for i in range(1, len(text))] == done[1:len(text)]  # a token a character
    cmpl = list(client.completions.create(model="fake", prompt="count", max_tokens=5, temperature=0, stream=True,
                                          stream_options=options))
    assert [c.usage.completion_tokens for c in cmpl][-2:] == [5, 5] and all(c.usage for c in cmpl)
    plain = list(client.chat.completions.create(model="fake", messages=msgs, max_tokens=6, temperature=0, stream=True,
                                                stream_options={"include_usage": True, "continuous_usage_stats": False}))
    assert [c.usage is None for c in plain] == [True] * (len(plain) - 1) + [False]


def test_chat_logprobs_and_n(client):
    r = client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                       logprobs=True, top_logprobs=3, n=2, temperature=0.5)
    assert len(r.choices) == 2
    content = r.choices[1].logprobs.content
    assert len(content) == 3 and "".join(e.token for e in content) == r.choices[1].message.content
    assert [t.logprob for t in content[0].top_logprobs] == [-0.5, -1.5, -2.5]


def test_chat_content_parts(base_url, client):
    parts = [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]
    a = client.chat.completions.create(model="fake", messages=[{"role": "user", "content": parts}],
                                       max_tokens=4, temperature=0)
    b = client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi there"}],
                                       max_tokens=4, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_retrieve_model_and_version(base_url, client, engine):
    card = client.models.retrieve("fake")
    assert (card.id, card.object, card.owned_by) == ("fake", "model", "kvserve")
    assert card.model_extra["max_model_len"] == engine.info.max_model_len
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("nope")
    assert httpx.get(f"{base_url}/version").json() == {"version": "0.1.0"}


def test_models_health_tokenize(base_url, engine):
    models = httpx.get(f"{base_url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["fake"]
    assert models["data"][0]["max_model_len"] == engine.info.max_model_len
    assert httpx.get(f"{base_url}/health").status_code == 200
    tok = httpx.post(f"{base_url}/tokenize", json={"model": "fake", "prompt": "ab"}).json()
    assert tok["tokens"] == engine.tokenizer.encode("ab") and tok["count"] == 3
    chat_tok = httpx.post(f"{base_url}/tokenize", json={"messages": [{"role": "user", "content": "q"}]}).json()
    assert chat_tok["tokens"] == engine.tokenizer.encode("[user]q\n[assistant]", add_special_tokens=False)[:0] + \
        engine.tokenizer.encode(engine.tokenizer.apply_chat_template([{"role": "user", "content": "q"}]),
                                add_special_tokens=False)
    detok = httpx.post(f"{base_url}/detokenize", json={"model": "fake", "tokens": tok["tokens"]}).json()
    assert detok["prompt"] == "<s>ab"


# ---- bad input: each a 4xx in OpenAI's error shape, and the server keeps serving ----------
def _assert_error(resp: httpx.Response, status: int, param: str | None = None, contains: str = "") -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param, err
    assert contains in err["message"], err["message"]
    return err


BAD_COMPLETIONS = [
    ({"model": "fake", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "fake", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": "fake", "prompt": "x", "top_p": 2}, 400, "top_p"),
    ({"model": "fake", "prompt": "x", "n": 0}, 400, "n"),
    ({"model": "fake", "prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ({"model": "fake", "prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ({"model": "fake", "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"model": "fake", "prompt": 5}, 400, None),
    ({"model": "fake", "prompt": []}, 400, "prompt"),
    ({"model": "fake", "prompt": [[]]}, 400, "prompt"),
    ({"model": "fake", "prompt": [10**9]}, 400, "prompt"),
    ({"model": "fake", "prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"model": "fake"}, 400, "prompt"),
    ({"model": "nope", "prompt": "x"}, 404, "model"),
    # OpenAI fields kvserve cannot honour are refused, never silently ignored
    ({"model": "fake", "prompt": "x", "logit_bias": {"5x": 5}}, 400, "logit_bias"),
    ({"model": "fake", "prompt": "x", "suffix": "end"}, 400, "suffix"),
    ({"model": "fake", "prompt": "x", "best_of": 3}, 400, "best_of"),
    ({"model": "fake", "prompt": "x", "structured_outputs": {"regex": "(", "choice": ["a"]}}, 400, "structured_outputs"),
]


@pytest.mark.parametrize("body,status,param", BAD_COMPLETIONS)
def test_bad_completion_requests(base_url, body, status, param):
    _assert_error(httpx.post(f"{base_url}/v1/completions", json=body), status, param)
    if "stream" not in body:  # the streamed form must fail the same way, before any SSE starts
        _assert_error(httpx.post(f"{base_url}/v1/completions", json={**body, "stream": True}), status, param)


BAD_CHATS = [
    ({"model": "fake", "messages": []}, 400, "messages"),
    ({"model": "fake", "messages": [{"role": "wizard", "content": "x"}]}, 400, None),
    ({"model": "fake", "messages": [{"role": "user", "content": 3}]}, 400, None),
    ({"model": "fake", "messages": "hi"}, 400, "messages"),
    ({"model": "fake", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "top_logprobs"),
    ({"model": "fake", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, 400,
     "max_completion_tokens"),
    ({"model": "fake", "messages": [{"role": "user", "content": "x"}], "stop": [""]}, 400, "stop"),
    ({"model": "fake", "messages": [{"role": "user", "content": "x"}],
      "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tool_choice"),  # auto: this server has no --tool-call-parser
    ({"model": "fake", "messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}, 400,
     "tool_choice"),
    ({"model": "fake", "messages": [{"role": "user", "content": "x"}],
      "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "nope"}}}}, 400,
     "response_format"),
    ({"model": "fake", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"a": 5}}, 400,
     "logit_bias"),
    ({"model": "fake", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"50": 101}}, 400,
     "logit_bias"),
    ({"model": "fake", "messages": [{"role": "user", "content": "x"}], "min_tokens": 9, "max_tokens": 8}, 400,
     "min_tokens"),
    ({"model": "fake", "messages": [{"role": "user", "content": "x"}],
      "functions": [{"name": "f", "parameters": {}}]}, 400, "functions"),
    ({"model": "fake", "messages": [{"role": "user", "content": "x"}], "function_call": {"name": "f"}}, 400,
     "function_call"),
    ({"model": "fake", "messages": [{"role": "user", "content": "x"}], "modalities": ["text", "audio"]}, 400,
     "modalities"),
    ({"model": "fake", "messages": [{"role": "user", "content": "x"}],
      "audio": {"voice": "alloy", "format": "wav"}}, 400, "audio"),
]


@pytest.mark.parametrize("body,status,param", BAD_CHATS)
def test_bad_chat_requests(base_url, body, status, param):
    _assert_error(httpx.post(f"{base_url}/v1/chat/completions", json=body), status, param)


def test_unsupported_fields_in_their_neutral_form_are_accepted(client):
    """What SDKs send by default (no tools, text format, empty bias, best_of == n) still works."""
    messages = [{"role": "user", "content": "x"}]
    plain = client.chat.completions.create(model="fake", messages=messages, max_tokens=3, temperature=0)
    neutral = client.chat.completions.create(model="fake", messages=messages, max_tokens=3, temperature=0,
                                             tools=[], tool_choice="none", response_format={"type": "text"},
                                             logit_bias={}, modalities=["text"],
                                             extra_body={"functions": [], "function_call": "none"})
    assert neutral.choices[0].message.content == plain.choices[0].message.content
    r = client.completions.create(model="fake", prompt="x", max_tokens=3, n=2, best_of=2, suffix="", temperature=1)
    assert len(r.choices) == 2


def test_prompt_too_long_states_limit_and_count(base_url, engine):
    prompt = "y" * 200
    err = _assert_error(httpx.post(f"{base_url}/v1/completions",
                                   json={"model": "fake", "prompt": prompt, "max_tokens": 4}), 400, "prompt")
    assert str(engine.info.max_model_len) in err["message"] and "201" in err["message"]
    err = _assert_error(httpx.post(f"{base_url}/v1/completions",
                                   json={"model": "fake", "prompt": prompt, "stream": True}), 400, "prompt")


def test_malformed_json_and_wrong_content(base_url):
    r = httpx.post(f"{base_url}/v1/completions", content=b'{"model": "fake", "prompt": ',
                   headers={"content-type": "application/json"})
    _assert_error(r, 400, contains="JSON")
    r = httpx.post(f"{base_url}/v1/chat/completions", content=b"[1, 2]", headers={"content-type": "application/json"})
    _assert_error(r, 400)
    _assert_error(httpx.get(f"{base_url}/v1/nowhere"), 404)
    _assert_error(httpx.get(f"{base_url}/v1/completions"), 405)


def test_huge_body_413_by_length_and_by_stream(base_url):
    big = {"model": "fake", "prompt": "x" * (5 * 1024 * 1024)}
    _assert_error(httpx.post(f"{base_url}/v1/completions", json=big), 413)

    def chunks():  # no Content-Length: chunked transfer, cut off by bytes read
        yield b'{"model": "fake", "prompt": "'
        for _ in range(80):
            yield b"x" * 65536
        yield b'"}'

    r = httpx.post(f"{base_url}/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    _assert_error(r, 413)


def test_server_still_serves_after_errors(client):
    r = client.completions.create(model="fake", prompt="still alive", max_tokens=2, temperature=0)
    assert len(r.choices[0].text) == 2


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="missing", prompt="x")
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="fake", prompt="x", temperature=-1)
    assert info.value.body["param"] == "temperature"


def test_queue_full_is_503_with_retry_after():
    slow = FakeEngine(step_delay_s=0.02, max_running=1)
    body = {"model": "fake", "prompt": "a", "max_tokens": 40}
    with serve({"fake": slow}, max_waiting=1) as url:
        with queue_full(url, slow, "/v1/completions", body):
            r = httpx.post(f"{url}/v1/completions", json={"model": "fake", "prompt": "b", "max_tokens": 2})
        err = _assert_error(r, 503)
        assert err["type"] == "server_overloaded"
        assert r.headers["retry-after"] == "1"
        ok = httpx.post(f"{url}/v1/completions", json={"model": "fake", "prompt": "b", "max_tokens": 2}, timeout=30)
        assert ok.status_code == 200


def test_metrics_exposed_and_moving(base_url, client):
    names = ["kvserve:num_requests_running", "kvserve:num_requests_waiting", "kvserve:kv_cache_usage_perc",
             "kvserve:prompt_tokens_total", "kvserve:generation_tokens_total", "kvserve:num_preemptions_total",
             "kvserve:time_to_first_token_seconds_bucket", "kvserve:inter_token_latency_seconds_bucket",
             "kvserve:e2e_request_latency_seconds_bucket", "kvserve:request_queue_time_seconds_bucket",
             "kvserve:iteration_tokens_total_bucket"]
    before = httpx.get(f"{base_url}/metrics").text
    client.completions.create(model="fake", prompt="metrics", max_tokens=6, temperature=0)
    after = httpx.get(f"{base_url}/metrics").text
    for name in names:
        assert metric_value(after, name, model_name="fake") is not None, name
    gen_before = metric_value(before, "kvserve:generation_tokens_total", model_name="fake")
    assert metric_value(after, "kvserve:generation_tokens_total", model_name="fake") == gen_before + 6
    assert metric_value(after, "kvserve:prompt_tokens_total", model_name="fake") >= \
        metric_value(before, "kvserve:prompt_tokens_total", model_name="fake") + 8
    assert metric_value(after, "kvserve:request_success_total", model_name="fake", finished_reason="length") >= 1
    assert metric_value(after, "kvserve:e2e_request_latency_seconds_count", model_name="fake") > \
        (metric_value(before, "kvserve:e2e_request_latency_seconds_count", model_name="fake") or 0)
    assert metric_value(after, "kvserve:inter_token_latency_seconds_count", model_name="fake") >= 5


def test_disconnected_stream_is_aborted_and_frees_kv(base_url, engine):
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{base_url}/v1/completions",
                         json={"model": "fake", "prompt": "long", "max_tokens": 80, "stream": True}) as r:
            lines = r.iter_lines()
            seen = [next(lines) for _ in range(3)]
            assert all(s.startswith("data: ") or s == "" for s in seen)
            assert engine.stats().kv_cache_usage > 0
    deadline = time.monotonic() + 5
    while engine.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not engine.has_unfinished_requests()
    assert engine.stats().kv_cache_usage == 0.0
    text = httpx.get(f"{base_url}/metrics").text
    deadline = time.monotonic() + 5
    while metric_value(text, "kvserve:kv_cache_usage_perc", model_name="fake") != 0.0 and time.monotonic() < deadline:
        # the gauge is refreshed after each step; run a short request to trigger one
        httpx.post(f"{base_url}/v1/completions", json={"model": "fake", "prompt": "z", "max_tokens": 1})
        text = httpx.get(f"{base_url}/metrics").text
    assert metric_value(text, "kvserve:kv_cache_usage_perc", model_name="fake") == 0.0


def test_sse_wire_format(base_url):
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", timeout=30,
                      json={"model": "fake", "messages": [{"role": "user", "content": "w"}], "max_tokens": 3,
                            "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert all(p["object"] == "chat.completion.chunk" for p in payloads)
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"


def test_a_client_leaving_a_non_streaming_request_aborts_it_without_an_error_log():
    """Not streamed, the server notices the client left by polling; the request is aborted (its
    blocks freed) and logged at INFO, not raised into uvicorn as an ASGI error with a traceback."""
    slow = FakeEngine(step_delay_s=0.05)  # 60 tokens take 3 s
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    keep = Keep(level=logging.INFO)
    loggers = [logging.getLogger("uvicorn.error"), logging.getLogger("kvserve.server")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(keep)
        lg.setLevel(logging.INFO)
    try:
        with serve({"fake": slow}) as url:
            for route, body in (("completions", {"prompt": "leave"}),
                                ("chat/completions", {"messages": [{"role": "user", "content": "leave"}]})):
                with pytest.raises(httpx.ReadTimeout):
                    httpx.post(f"{url}/v1/{route}", json={"model": "fake", "max_tokens": 60, **body}, timeout=0.3)
                deadline = time.monotonic() + 5
                while slow.has_unfinished_requests() and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert not slow.has_unfinished_requests() and slow.stats().kv_cache_usage == 0.0
            deadline = time.monotonic() + 5
            while sum("client disconnected" in r.getMessage() for r in records) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(keep)
            lg.setLevel(level)
    assert sum("client disconnected" in r.getMessage() for r in records) == 2
    assert not [r for r in records if r.levelno >= logging.ERROR], [r.getMessage() for r in records]

"""The server on the real LLMEngine with a tiny random Llama: routes, streaming, errors, KV freeing."""
from __future__ import annotations

import json
import os

import httpx
import openai
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from engine.config import CacheConfig, EngineConfig  # noqa: E402
from engine.engine import LLMEngine  # noqa: E402
from engine.llm import LLM  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from tests.server_helpers import leave_stream_early, metric_value, serve  # noqa: E402
from tests.tiny_models import save_tiny  # noqa: E402

CHAT_TEMPLATE = (
    "{% if tools %}<|tools|>{% for t in tools %}{{ t['function']['name'] }} {% endfor %}\n{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
NUM_BLOCKS, BLOCK_SIZE = 64, 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = save_tiny("llama", tmp_path_factory.mktemp("tiny") / "tiny-llama")
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return path


@pytest.fixture(scope="module")
def engine(folder) -> LLMEngine:
    return LLMEngine.from_config(EngineConfig(model=str(folder), cache=CacheConfig(block_size=BLOCK_SIZE,
                                                                                   num_blocks=NUM_BLOCKS)))


@pytest.fixture(scope="module")
def offline(folder) -> LLM:
    return LLM(str(folder), num_kv_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE)


@pytest.fixture(scope="module")
def base_url(engine):
    with serve({engine.info.name: engine}) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60)


MODEL = "tiny-llama"


def test_models_lists_the_folder_name(base_url, engine):
    data = httpx.get(f"{base_url}/v1/models").json()["data"]
    assert [(m["id"], m["task"]) for m in data] == [(MODEL, "generate")]
    assert data[0]["max_model_len"] == engine.info.max_model_len


def test_completion_equals_offline_engine(client, offline):
    prompt = "The quick brown fox"
    ref = offline.generate([offline.tokenizer.encode(prompt)],
                           SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))[0].outputs[0]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == ref.text
    assert r.usage.completion_tokens == len(ref.token_ids) == 10
    assert r.choices[0].finish_reason == "length"


def test_stream_reassembles_to_greedy_text(client):
    kwargs = dict(model=MODEL, prompt="streaming check", max_tokens=12, temperature=0,
                  extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].usage.completion_tokens == 12


def test_chat_stream_reassembles_to_chat(client, engine):
    msgs = [{"role": "user", "content": "hello there"}]
    whole = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0,
                                           extra_body={"ignore_eos": True})
    prompt = engine.tokenizer.encode(engine.tokenizer.apply_chat_template(msgs), add_special_tokens=False)
    assert whole.usage.prompt_tokens == len(prompt)
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_n2_seeded_samples_are_reproducible(client):
    kwargs = dict(model=MODEL, prompt="sample", max_tokens=8, n=2, temperature=1.0, seed=7,
                  extra_body={"ignore_eos": True})
    a, b = client.completions.create(**kwargs), client.completions.create(**kwargs)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.usage.completion_tokens == 16


def test_seed_at_the_int64_edge(base_url, client):
    """A seed of 2**64 or more was a 500 for every request in its engine step (torch's generator
    overflowed inside the step). Seeds are int64, as OpenAI documents: anything past is a 400 at
    the door, and the extreme int64 seeds sample as any other."""
    for seed in (2**63, 2**64, 2**70):
        body = {"model": MODEL, "prompt": "edge", "max_tokens": 4, "n": 2, "temperature": 1.0, "seed": seed}
        r = httpx.post(f"{base_url}/v1/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "seed", r.text
    kwargs = dict(model=MODEL, prompt="edge", max_tokens=4, n=2, temperature=1.0, extra_body={"ignore_eos": True})
    a, b = (client.completions.create(seed=2**63 - 1, **kwargs) for _ in range(2))
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert client.completions.create(seed=-(2**63), **kwargs).usage.completion_tokens == 8


def test_logprobs(client):
    r = client.completions.create(model=MODEL, prompt="logprobs", max_tokens=5, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == 5 and all(x <= 0 for x in lp.token_logprobs)
    for tok_lp, top in zip(lp.token_logprobs, lp.top_logprobs):
        # greedy picks the best; a random tiny model has byte tokens that all print as U+FFFD, so
        # OpenAI's text-keyed dict may merge entries: the chosen one is still never beaten.
        assert 1 <= len(top) <= 3 and max(top.values()) <= tok_lp + 1e-5
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2,
                                          extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(e.top_logprobs) == 2 for e in content)
    assert all(e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob for e in content)
    assert all(e.logprob == pytest.approx(e.top_logprobs[0].logprob, abs=1e-5) for e in content)  # greedy


def test_stop_string(client):
    # a prompt whose greedy text (on this seeded random model) has printable runs to stop on
    kwargs = dict(model=MODEL, prompt="The quick brown fox", max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    text = client.completions.create(**kwargs).choices[0].text
    stop = next(text[i:i + 2] for i in range(3, len(text) - 2) if text[i:i + 2].isprintable())
    r = client.completions.create(stop=[stop], **kwargs)
    assert r.choices[0].text == text[: text.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_bad_requests_and_recovery(base_url, engine, client):
    limit = engine.max_model_len
    long_prompt = list(range(3, 3 + limit + 5))
    r = httpx.post(f"{base_url}/v1/completions", json={"model": MODEL, "prompt": long_prompt, "max_tokens": 4})
    assert r.status_code == 400
    err = r.json()["error"]
    assert str(limit) in err["message"] and str(len(long_prompt)) in err["message"]
    for body in ({"model": MODEL, "prompt": "x", "max_tokens": -1}, {"model": MODEL, "prompt": "x", "top_p": 2},
                 {"model": MODEL, "prompt": "x", "temperature": -1}, {"model": MODEL, "messages": []}):
        url = f"{base_url}/v1/{'chat/' if 'messages' in body else ''}completions"
        assert httpx.post(url, json=body).status_code == 400
    assert httpx.post(f"{base_url}/v1/completions", json={"model": "other", "prompt": "x"}).status_code == 404
    assert client.completions.create(model=MODEL, prompt="ok", max_tokens=2).usage.completion_tokens >= 1


def test_disconnect_frees_kv_blocks(base_url, engine):
    leave_stream_early(f"{base_url}/v1/completions", {"model": MODEL, "prompt": "a long one", "max_tokens": 150,
                                                      "stream": True, "ignore_eos": True}, engine, lines=4)
    assert engine.stats().kv_cache_usage == 0.0
    assert engine.stats().num_running == 0
    metrics = httpx.get(f"{base_url}/metrics").text
    assert metric_value(metrics, "kvserve:kv_cache_usage_perc", model_name=MODEL) == 0.0
    assert metric_value(metrics, "kvserve:request_success_total", model_name=MODEL, finished_reason="abort") >= 1


def test_metrics_count_real_tokens(base_url, client):
    before = httpx.get(f"{base_url}/metrics").text
    r = client.completions.create(model=MODEL, prompt="count me", max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True})
    after = httpx.get(f"{base_url}/metrics").text

    def delta(name: str) -> float:
        return metric_value(after, name, model_name=MODEL) - (metric_value(before, name, model_name=MODEL) or 0)

    assert delta("kvserve:generation_tokens_total") == 6
    assert delta("kvserve:prompt_tokens_total") == r.usage.prompt_tokens
    assert delta("kvserve:time_to_first_token_seconds_count") == 1
    assert delta("kvserve:inter_token_latency_seconds_count") == 5
    assert delta("kvserve:e2e_request_latency_seconds_count") == 1
    assert delta("kvserve:iteration_tokens_total_sum") == r.usage.prompt_tokens + 6


def test_tokenize_detokenize_roundtrip(base_url, engine):
    tok = httpx.post(f"{base_url}/tokenize", json={"model": MODEL, "prompt": "round trip"}).json()
    assert tok["tokens"] == engine.tokenizer.encode("round trip")
    assert tok["max_model_len"] == engine.info.max_model_len
    text = httpx.post(f"{base_url}/detokenize", json={"model": MODEL, "tokens": tok["tokens"]}).json()["prompt"]
    assert text.endswith("round trip")


def test_a_repeated_chat_prefix_is_served_from_the_prefix_cache(base_url, client, engine):
    before = httpx.get(f"{base_url}/metrics").text
    system = {"role": "system", "content": "You are a terse assistant who answers in one short line, always."}
    kwargs = dict(model=MODEL, max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    first = client.chat.completions.create(messages=[system, {"role": "user", "content": "hi"}], **kwargs)
    second = client.chat.completions.create(messages=[system, {"role": "user", "content": "bye"}], **kwargs)
    after = httpx.get(f"{base_url}/metrics").text

    def delta(name: str) -> float:
        return metric_value(after, name, model_name=MODEL) - (metric_value(before, name, model_name=MODEL) or 0)

    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    # the system prompt's full blocks, never the whole prompt
    assert BLOCK_SIZE * 4 <= cached < second.usage.prompt_tokens and cached % BLOCK_SIZE == 0
    assert delta("kvserve:prefix_cache_queries_total") == first.usage.prompt_tokens + second.usage.prompt_tokens
    assert delta("kvserve:prefix_cache_hits_total") == cached
    assert engine.stats().kv_cache_usage == 0.0


def test_echo_with_logprobs_scores_the_prompt_like_openai(base_url, offline, engine):
    """How evaluation harnesses score text: the prompt's tokens come first in `logprobs`, the
    first with no logprob, then the completion's; streamed, the first chunk carries them."""
    prompt = "The quick brown fox jumps over the lazy dog"
    ids = offline.tokenizer.encode(prompt)
    ref = offline.generate([ids], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True,
                                                 prompt_logprobs=2))[0].prompt_logprobs
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 3, "temperature": 0, "ignore_eos": True,
            "echo": True, "logprobs": 2}
    r = httpx.post(f"{base_url}/v1/completions", json=body, timeout=60).json()
    lp = r["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == r["usage"]["prompt_tokens"] + 3 == len(ids) + 3
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1 : len(ids)] == [e.logprob for e in ref[1:]]
    assert all(0 < len(top) <= 2 for top in lp["top_logprobs"][1:])  # two ids may read as one text
    assert r["choices"][0]["text"].startswith(prompt)
    # offsets index the answer's text: the completion's first token starts where the prompt ends
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][len(ids)] == len(prompt)
    with httpx.stream("POST", f"{base_url}/v1/completions", json={**body, "stream": True}, timeout=60) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    streamed = [c["choices"][0]["logprobs"] for c in chunks if c["choices"] and c["choices"][0]["logprobs"]]
    assert [v for part in streamed for v in part["token_logprobs"]] == lp["token_logprobs"]
    assert [v for part in streamed for v in part["text_offset"]] == lp["text_offset"]
    assert engine.stats().kv_cache_usage == 0.0


def test_max_tokens_zero_with_echo_answers_the_scored_prompt(base_url, offline, engine):
    """lm-eval's loglikelihood request (vLLM answers it): max_tokens 0 with echo and logprobs gives the
    prompt back with its tokens scored and nothing generated; without echo, or streamed, it is a 400."""
    prompt = "The quick brown fox jumps over the lazy dog"
    ids = offline.tokenizer.encode(prompt)
    ref = offline.generate([ids], SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1))[0].prompt_logprobs
    body = {"model": MODEL, "prompt": [prompt, prompt], "max_tokens": 0, "echo": True, "logprobs": 1}
    r = httpx.post(f"{base_url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        lp = choice["logprobs"]
        assert choice["text"] == prompt and choice["finish_reason"] == "length"
        assert len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None
        assert lp["token_logprobs"][1:] == [e.logprob for e in ref[1:]]
    usage = r.json()["usage"]
    assert usage["completion_tokens"] == 0 and usage["total_tokens"] == usage["prompt_tokens"] == 2 * len(ids)
    for extra, param in (({"echo": False}, "max_tokens"), ({"stream": True}, "stream")):
        r = httpx.post(f"{base_url}/v1/completions", json=body | extra, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert engine.stats().kv_cache_usage == 0.0


def test_structured_outputs_over_http(base_url, client, offline, engine):
    """OpenAI's response_format and vLLM's structured_outputs give the offline engine's guided
    tokens, streamed or not; a bad constraint is a 400 naming its field."""
    from engine.structured_output import StructuredOutput as SO

    schema = {"type": "object", "properties": {"a": {"enum": ["x", "yz"]}}, "required": ["a"],
              "additionalProperties": False, "x-guidance": {"whitespace_flexible": False}}
    messages = [{"role": "user", "content": "Answer in JSON"}]
    prompt = offline.tokenizer.encode(offline.tokenizer.apply_chat_template(messages), add_special_tokens=False)
    greedy = dict(temperature=0.0, max_tokens=12)
    cases = [  # (chat request extras, the same constraint offline)
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}}, SO.json_schema(schema)),
        ({"response_format": {"type": "json_object"}}, SO.json_object()),
        ({"extra_body": {"structured_outputs": {"choice": ["red", "green"]}}}, SO.choice(["red", "green"])),
        ({"extra_body": {"structured_outputs": {"regex": "[a-z]{3}[0-9]"}}}, SO.regex("[a-z]{3}[0-9]")),
    ]
    for extra, constraint in cases:
        ref = offline.generate([prompt], SamplingParams(**greedy, structured=constraint))[0].outputs[0]
        got = client.chat.completions.create(model=MODEL, messages=messages, **greedy, **extra).choices[0]
        assert (got.message.content, got.finish_reason) == (ref.text, ref.finish_reason), extra
        streamed = client.chat.completions.create(model=MODEL, messages=messages, stream=True, **greedy, **extra)
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == ref.text
    assert json.loads(client.chat.completions.create(model=MODEL, messages=messages, **greedy, **cases[0][0])
                      .choices[0].message.content) in ({"a": "x"}, {"a": "yz"})
    r = client.completions.create(model=MODEL, prompt="Pick:", max_tokens=8, temperature=0, n=3,
                                  extra_body={"structured_outputs": {"choice": ["red", "green"]}, "seed": 1})
    assert all(c.text.rstrip("#") in ("red", "green") for c in r.choices)  # "#" is this vocabulary's EOS
    bad = [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "nope"}}}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "a"}}}, "response_format"),
        ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
        ({"structured_outputs": {"grammar": "start: ??"}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}, "structured_outputs"),
    ]
    for extra, param in bad:
        r = httpx.post(f"{base_url}/v1/chat/completions", json={"model": MODEL, "messages": messages, **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (extra, r.text)
    assert engine.stats().kv_cache_usage == 0.0 and len(engine.guides) == 0


def test_logit_bias_and_min_tokens_over_http(client, offline, engine):
    """Both reach the engine: the offline engine's tokens for the same fields (token ids as JSON keys)."""
    ids = offline.tokenizer.encode("Hello there")
    extra = {"logit_bias": {"2": 12, "100": 3.5}, "min_tokens": 5}
    ref = offline.generate([ids], SamplingParams(temperature=0.0, max_tokens=9, logit_bias=((2, 12.0), (100, 3.5)),
                                                 min_tokens=5))[0].outputs[0]
    assert len(ref.token_ids) == 6 and ref.token_ids[-1] == 2  # EOS (id 2, favoured) held back 5 tokens
    r = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=9, temperature=0,
                                  logprobs=0, extra_body=extra)
    assert r.choices[0].text == ref.text and r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "stop"
    (a,) = offline.tokenizer.encode("a")
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                          temperature=0, logit_bias={str(a): 100})
    assert chat.choices[0].message.content == "aaaa"
    assert engine.stats().kv_cache_usage == 0.0


def test_forced_tool_calls_on_the_real_engine(base_url, client, offline, engine):
    """A named function's arguments and `required` calls come out of the grammar: they parse, name
    given tools, fit the parameters, and equal the offline engine under the same constraint with
    the tools in the prompt."""
    from server import tools as tool_calls
    from server.schemas import ChatCompletionRequest

    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}, "days": {"type": "integer", "minimum": 1,
                                                                                   "maximum": 7}},
        "required": ["city", "days"], "additionalProperties": False}}}
    clock = {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {}, "additionalProperties": False}}}
    messages = [{"role": "user", "content": "Weather in Paris for 3 days?"}]
    fields = dict(model=MODEL, messages=messages, tools=[weather, clock], max_tokens=80, temperature=0)
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(tool_choice=named, **fields).choices[0]
    assert r.finish_reason == "stop" and r.message.content is None  # forced: "stop", as OpenAI answers
    (call,) = r.message.tool_calls
    args = json.loads(call.function.arguments)
    assert call.function.name == "get_weather" and args["city"] in ("Paris", "Oslo") and 1 <= args["days"] <= 7
    request = ChatCompletionRequest.model_validate({"messages": messages, "tools": [weather, clock], "tool_choice": named})
    plan = tool_calls.plan(request.tools, request.tool_choice, None)
    text = offline.tokenizer.apply_chat_template(messages, tools=[weather, clock])
    assert text.startswith("<|tools|>get_weather get_time <|user|>")  # the tools reach the template
    ref = offline.generate([offline.tokenizer.encode(text, add_special_tokens=False)], SamplingParams(
        temperature=0.0, max_tokens=80, structured=plan.constraint(request.tools, True)))[0].outputs[0]
    assert call.function.arguments == ref.text
    streamed = "".join(d.function.arguments or "" for chunk in client.chat.completions.create(
        tool_choice=named, stream=True, **fields) for c in chunk.choices for d in (c.delta.tool_calls or []))
    assert streamed == ref.text
    r = client.chat.completions.create(tool_choice="required", parallel_tool_calls=False, **fields).choices[0]
    assert r.finish_reason == "tool_calls" and len(r.message.tool_calls) == 1
    assert r.message.tool_calls[0].function.name in ("get_weather", "get_time")
    json.loads(r.message.tool_calls[0].function.arguments)
    pieces = [d for chunk in client.chat.completions.create(tool_choice="required", parallel_tool_calls=False,
                                                              stream=True, **fields)
              for c in chunk.choices for d in (c.delta.tool_calls or [])]
    assert pieces[0].function.name == r.message.tool_calls[0].function.name and pieces[0].id  # opens the call
    assert "".join(d.function.arguments or "" for d in pieces) == r.message.tool_calls[0].function.arguments
    bad = httpx.post(f"{base_url}/v1/chat/completions", json={**fields, "tool_choice": "required",
                                                                "response_format": {"type": "json_object"}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tool_choice"
    assert engine.stats().kv_cache_usage == 0.0 and len(engine.guides) == 0


def test_responses_api_on_the_real_engine(base_url, client, offline, engine):
    """/v1/responses is chat under another shape: its text, its `text.format` JSON and its named
    function's arguments equal /v1/chat/completions' for the same conversation, streamed or not."""
    schema = {"type": "object", "properties": {"a": {"enum": ["x", "yz"]}}, "required": ["a"],
              "additionalProperties": False, "x-guidance": {"whitespace_flexible": False}}
    messages = [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Answer in JSON"}]
    chat = dict(model=MODEL, messages=messages, temperature=0, max_tokens=12)
    resp = dict(model=MODEL, instructions="Be brief", input="Answer in JSON", temperature=0, max_output_tokens=12)
    plain = client.chat.completions.create(**chat).choices[0]
    r = client.responses.create(**resp)
    assert r.output_text == plain.message.content
    assert r.status == ("incomplete" if plain.finish_reason == "length" else "completed")
    fmt = {"format": {"type": "json_schema", "name": "a", "schema": schema}}
    shaped = client.chat.completions.create(**chat, response_format={"type": "json_schema", "json_schema": {
        "name": "a", "schema": schema}}).choices[0].message.content
    r = client.responses.create(**resp, text=fmt)
    assert r.output_text == shaped and json.loads(shaped) in ({"a": "x"}, {"a": "yz"})
    assert r.text.format.type == "json_schema"
    with client.responses.stream(**resp, text=fmt) as stream:
        assert stream.get_final_response().output_text == shaped
    weather = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}},
                                                     "required": ["city"], "additionalProperties": False}}
    called = client.chat.completions.create(**{**chat, "max_tokens": 40}, tools=[{"type": "function", "function": weather}],
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}})
    r = client.responses.create(**{**resp, "max_output_tokens": 40}, tools=[{"type": "function", **weather}],
                                tool_choice={"type": "function", "name": "get_weather"})
    (call,) = r.output
    assert (call.type, call.name, call.arguments) == ("function_call", "get_weather",
                                                     called.choices[0].message.tool_calls[0].function.arguments)
    bad = httpx.post(f"{base_url}/v1/responses", json={**resp, "text": {"format": {"type": "json_schema", "name": "a",
                                                                                      "schema": {"type": "nope"}}}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "text.format"
    assert engine.stats().kv_cache_usage == 0.0 and len(engine.guides) == 0


def test_messages_api_on_the_real_engine(base_url, client, engine):
    """/v1/messages is chat under another shape: its text and a forced tool's input equal
    /v1/chat/completions' for the same conversation, streamed or not."""
    import anthropic

    claude = anthropic.Anthropic(base_url=base_url, api_key="unused", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    chat = dict(model=MODEL, messages=[{"role": "system", "content": "Be brief"}, *messages], temperature=0)
    plain = client.chat.completions.create(**chat, max_tokens=12).choices[0]
    m = claude.messages.create(model=MODEL, system="Be brief", messages=messages, max_tokens=12,
                               extra_body={"temperature": 0})
    assert m.content[0].text == plain.message.content
    assert m.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[plain.finish_reason]
    weather = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}},
                                                     "required": ["city"], "additionalProperties": False}}
    called = client.chat.completions.create(**chat, max_tokens=40, tools=[{"type": "function", "function": weather}],
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}})
    tool = {"name": "get_weather", "input_schema": weather["parameters"]}
    fields = dict(model=MODEL, system="Be brief", messages=messages, max_tokens=40, tools=[tool],
                  tool_choice={"type": "tool", "name": "get_weather"}, extra_body={"temperature": 0})
    (use,) = claude.messages.create(**fields).content
    assert (use.type, use.name, use.input) == ("tool_use", "get_weather",
                                               json.loads(called.choices[0].message.tool_calls[0].function.arguments))
    with claude.messages.stream(**fields) as stream:
        assert stream.get_final_message().content[0].input == use.input
    # output_config.format is chat's json_schema response_format
    schema = {"type": "object", "properties": {"a": {"enum": ["x", "yz"]}}, "required": ["a"],
              "additionalProperties": False, "x-guidance": {"whitespace_flexible": False}}
    shaped = client.chat.completions.create(**chat, max_tokens=12, response_format={
        "type": "json_schema", "json_schema": {"name": "a", "schema": schema}}).choices[0].message.content
    m = claude.messages.create(model=MODEL, system="Be brief", messages=messages, max_tokens=12,
                               output_config={"format": {"type": "json_schema", "schema": schema}},
                               extra_body={"temperature": 0})
    assert m.content[0].text == shaped and json.loads(shaped) in ({"a": "x"}, {"a": "yz"})
    for bad in ({"output_config": {"format": {"type": "json_schema", "schema": {"type": "nope"}}}},
                {"output_config": {"format": {"type": "json_schema", "schema": schema}}, "tools": [tool],
                 "tool_choice": {"type": "any"}}):
        r = httpx.post(f"{base_url}/v1/messages", json={"model": MODEL, "max_tokens": 8, "messages": messages, **bad})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
    assert engine.stats().kv_cache_usage == 0.0 and len(engine.guides) == 0


def test_a_priority_without_the_priority_policy_is_a_400(base_url, engine):
    for path, body in (("/v1/completions", {"prompt": "hi"}), ("/v1/chat/completions", {"messages": [
            {"role": "user", "content": "hi"}]}), ("/v1/responses", {"input": "hi"})):
        r = httpx.post(f"{base_url}{path}", json={"model": MODEL, "max_tokens": 2, "priority": 3, **body}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "priority", (path, r.text)
        assert "--scheduling-policy priority" in r.json()["error"]["message"]
    ok = httpx.post(f"{base_url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2, "priority": 0})
    assert ok.status_code == 200 and engine.stats().kv_cache_usage == 0.0

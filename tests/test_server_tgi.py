"""TGI's routes (/generate, /generate_stream, /, /info) over HTTP on a tiny random Llama: tokens and
logprobs against transformers, sampling parameters against the offline engine, TGI's own client
(`huggingface_hub.InferenceClient`), refusals, and every KV block free afterwards."""
from __future__ import annotations

import json
import os

import httpx
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from engine.config import CacheConfig, EngineConfig  # noqa: E402
from engine.engine import LLMEngine  # noqa: E402
from engine.llm import LLM  # noqa: E402
from engine.outputs import CompletionOutput, RequestOutput, TokenLogprob  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from server import tgi  # noqa: E402
from server.schemas_tgi import TgiGenerateResponse, TgiParameters, TgiStreamResponse  # noqa: E402
from tests.server_helpers import leave_stream_early, serve  # noqa: E402

NUM_BLOCKS, BLOCK_SIZE = 96, 4
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def engine(tiny_llama) -> LLMEngine:
    return LLMEngine.from_config(EngineConfig(model=str(tiny_llama), cache=CacheConfig(block_size=BLOCK_SIZE,
                                                                                       num_blocks=NUM_BLOCKS)))


@pytest.fixture(scope="module")
def url(engine):
    with serve({"tiny": engine}) as base:
        yield base
    assert engine.stats().kv_cache_usage == 0.0


def generate(url: str, inputs: str = PROMPT, route: str = "/generate", **parameters) -> httpx.Response:
    return httpx.post(url + route, json={"inputs": inputs, "parameters": parameters}, timeout=60)


def stream_events(url: str, inputs: str = PROMPT, route: str = "/generate_stream", body: dict | None = None,
                  **parameters) -> list[dict]:
    r = httpx.post(url + route, json={"inputs": inputs, "parameters": parameters, **(body or {})}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
    events = [e for e in r.text.split("\n\n") if e.strip()]
    assert all(e.startswith("data: ") for e in events)
    data = [e[len("data: "):] for e in events]
    assert "[DONE]" not in data  # TGI's streams end without it; its clients parse every event as JSON
    return [TgiStreamResponse.model_validate(json.loads(d)).model_dump() for d in data]


def hf_greedy(hf, prompt_ids: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    out = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False, output_logits=True,
                      return_dict_in_generate=True, pad_token_id=0)
    ids = out.sequences[0, len(prompt_ids):].tolist()
    return ids, [lg[0].log_softmax(-1) for lg in out.logits]


# ---- against transformers ---------------------------------------------------------------------
def test_greedy_details_equal_transformers(url, hf_tiny_llama):
    r = generate(url, max_new_tokens=8, details=True, decoder_input_details=True, top_n_tokens=3)
    assert r.status_code == 200
    body = TgiGenerateResponse.model_validate(r.json()).model_dump()
    d = body["details"]
    prompt_ids = [t["id"] for t in d["prefill"]]
    ids, logprobs = hf_greedy(hf_tiny_llama, prompt_ids, 8)
    eos = hf_tiny_llama.generation_config.eos_token_id
    if eos in ids:  # HF pads after EOS; both stop there
        ids, logprobs = ids[: ids.index(eos) + 1], logprobs[: ids.index(eos) + 1]
    assert [t["id"] for t in d["tokens"]] == ids
    assert d["generated_tokens"] == len(ids) and d["seed"] is None
    assert d["finish_reason"] == ("eos_token" if ids[-1] == eos else "length")
    for tok, ref in zip(d["tokens"], logprobs):
        assert tok["logprob"] == pytest.approx(ref[tok["id"]].item(), abs=1e-4)
    for tops, ref in zip(d["top_tokens"], logprobs):
        want = ref.topk(3)
        assert [t["id"] for t in tops] == want.indices.tolist()
        assert [t["logprob"] for t in tops] == pytest.approx(want.values.tolist(), abs=1e-4)
    # the prompt's tokens, scored as transformers scores them; nothing predicts the first
    with torch.no_grad():
        ref = hf_tiny_llama(torch.tensor([prompt_ids])).logits[0].log_softmax(-1)
    assert d["prefill"][0]["logprob"] is None
    assert [t["logprob"] for t in d["prefill"][1:]] == pytest.approx(
        [ref[i, t].item() for i, t in enumerate(prompt_ids[1:])], abs=1e-4)
    text = "".join(t["text"] for t in d["tokens"])
    assert body["generated_text"] == text  # no special tokens in it: the pieces add up to the text


def test_stream_is_one_event_per_token_and_matches_generate(url):
    whole = generate(url, max_new_tokens=7, details=True).json()
    events = stream_events(url, max_new_tokens=7, top_n_tokens=2)
    assert [e["index"] for e in events] == list(range(1, len(events) + 1))
    assert [e["token"]["id"] for e in events] == [t["id"] for t in whole["details"]["tokens"]]
    assert [e["token"]["logprob"] for e in events] == pytest.approx(
        [t["logprob"] for t in whole["details"]["tokens"]], abs=1e-5)
    assert all(len(e["top_tokens"]) == 2 and e["top_tokens"][0]["id"] == e["token"]["id"] for e in events)
    *middle, last = events
    assert all(e["generated_text"] is None and e["details"] is None for e in middle)
    assert last["generated_text"] == whole["generated_text"] == "".join(e["token"]["text"] for e in events)
    assert last["details"]["generated_tokens"] == len(events)
    assert last["details"]["finish_reason"] == whole["details"]["finish_reason"]
    assert last["details"]["input_length"] == len(generate(url, max_new_tokens=1, details=True,
                                                           decoder_input_details=True).json()["details"]["prefill"])


# ---- TGI's parameters on the engine -----------------------------------------------------------
def test_sampling_parameters_reach_the_engine(url, tiny_llama):
    """Every sampling field TGI has gives the tokens the offline engine gives with the same settings."""
    offline = LLM(str(tiny_llama), num_kv_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE)
    fields = dict(temperature=0.7, top_k=40, top_p=0.9, typical_p=0.8, repetition_penalty=1.3,
                  frequency_penalty=0.5, seed=11)
    got = generate(url, max_new_tokens=10, details=True, **fields).json()["details"]
    prompt = offline.tokenizer.encode(PROMPT)
    ref = offline.generate([prompt], SamplingParams(max_tokens=10, **fields))[0].outputs[0]
    assert [t["id"] for t in got["tokens"]] == ref.token_ids
    assert got["seed"] == 11
    greedy = offline.generate([prompt], SamplingParams(max_tokens=10, temperature=0.0))[0].outputs[0]
    assert ref.token_ids != greedy.token_ids  # the sampled case differs from greedy: it can fail


def test_a_drawn_seed_is_reported_and_reproduces(url):
    first = generate(url, max_new_tokens=10, do_sample=True, details=True).json()
    seed = first["details"]["seed"]
    assert isinstance(seed, int)
    again = generate(url, max_new_tokens=10, do_sample=True, seed=seed, details=True).json()
    assert [t["id"] for t in again["details"]["tokens"]] == [t["id"] for t in first["details"]["tokens"]]


def test_best_of_returns_the_most_likely_sample(url):
    d = generate(url, max_new_tokens=6, best_of=4, do_sample=True, seed=5, details=True).json()["details"]
    others = d["best_of_sequences"]
    assert len(others) == 3

    def total(seq: dict) -> float:
        return sum(t["logprob"] for t in seq["tokens"])

    assert all(total(d) >= total(o) for o in others)
    assert sorted([d["seed"]] + [o["seed"] for o in others]) == [5, 6, 7, 8]
    # the reported seed reproduces the winner on its own
    alone = generate(url, max_new_tokens=6, do_sample=True, seed=d["seed"], details=True).json()["details"]
    assert [t["id"] for t in alone["tokens"]] == [t["id"] for t in d["tokens"]]


def test_truncate_keeps_the_end_of_the_prompt(url, engine):
    long = "word " * 300  # over the context
    r = generate(url, long, max_new_tokens=2)
    assert r.status_code == 422 and "context" in r.json()["error"], r.text  # TGI's status and body
    ids = engine.tokenizer.encode(long)
    d = generate(url, long, max_new_tokens=2, truncate=20, details=True, decoder_input_details=True).json()["details"]
    assert [t["id"] for t in d["prefill"]] == ids[-20:]
    assert stream_events(url, long, max_new_tokens=2, truncate=20)[-1]["details"]["input_length"] == 20


def test_stop_sequence_stays_in_the_text(url):
    # a grammar makes the output known: "abcabc"; the stop sequence "bc" ends it after "abc"
    r = generate(url, max_new_tokens=10, stop=["bc"], details=True, grammar={"type": "regex", "value": "abcabc"})
    body = r.json()
    assert body["generated_text"] == "abc"
    assert body["details"]["finish_reason"] == "stop_sequence"
    free = generate(url, max_new_tokens=10, details=True, grammar={"type": "regex", "value": "abcabc"}).json()
    assert free["generated_text"] == "abcabc" and free["details"]["finish_reason"] == "eos_token"


def test_grammars_and_full_text(url):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
              "additionalProperties": False,
              "x-guidance": {"whitespace_flexible": False}}  # a random model spends its tokens on newlines
    for grammar in ({"type": "json", "value": schema}, {"type": "json", "value": json.dumps(schema)},
                    {"type": "json_schema", "value": {"name": "x", "schema": schema}}):
        text = generate(url, max_new_tokens=40, grammar=grammar).json()["generated_text"]
        assert isinstance(json.loads(text)["a"], int), text
    r = generate(url, max_new_tokens=3, return_full_text=True, grammar={"type": "regex", "value": "xyz"})
    assert r.json()["generated_text"] == PROMPT + "xyz"


def test_compat_route_answers_by_stream(url):
    plain = generate(url, max_new_tokens=5).json()
    assert generate(url, route="/", max_new_tokens=5).json() == plain
    events = stream_events(url, route="/", body={"stream": True}, max_new_tokens=5)
    assert events[-1]["generated_text"] == plain["generated_text"]


def test_inference_client(url, monkeypatch):
    """TGI's own client, given only the server's URL, in its four modes."""
    from huggingface_hub import InferenceClient, constants

    # its offline switch blocks every request, even to 127.0.0.1; it is given nothing else to reach
    monkeypatch.setattr(constants, "is_offline_mode", lambda: False)
    client = InferenceClient(url, timeout=60)
    text = client.text_generation(PROMPT, max_new_tokens=6)
    assert text == generate(url, max_new_tokens=6).json()["generated_text"]
    assert "".join(client.text_generation(PROMPT, max_new_tokens=6, stream=True)) == text
    out = client.text_generation(PROMPT, max_new_tokens=6, details=True, decoder_input_details=True)
    assert out.generated_text == text and out.details.generated_tokens == len(out.details.tokens)
    assert out.details.prefill[0].logprob is None
    chunks = list(client.text_generation(PROMPT, max_new_tokens=6, details=True, stream=True))
    assert chunks[-1].generated_text == text and chunks[-1].details.finish_reason in ("length", "eos_token")


def test_info_describes_the_default_model(url, engine):
    info = httpx.get(url + "/info").json()
    assert info["model_id"] == "tiny" and info["model_pipeline_tag"] == "text-generation"
    assert info["max_total_tokens"] == engine.info.max_model_len == info["max_input_tokens"] + 1
    assert info["model_device_type"] == "cpu" and info["model_dtype"] == "torch.float32"
    assert info["models"] == ["tiny"] and info["max_best_of"] == 16


def test_info_for_an_embedding_server():
    from engine.embedding_engine import EmbeddingEngine

    minilm = EmbeddingEngine.from_config(EngineConfig(model="minilm"))
    with serve({"minilm": minilm}) as base:
        info = httpx.get(base + "/info").json()
        assert info["model_type"] == {"embedding": {"pooling": "mean"}}
        assert info["model_pipeline_tag"] == "feature-extraction" and info["max_total_tokens"] == 256
        assert httpx.post(base + "/generate", json={"inputs": "x"}).status_code == 404  # no generation model


# ---- refusals and cleanup -----------------------------------------------------------------------
@pytest.mark.parametrize("parameters", [
    {"best_of": 2},  # greedy samples would all be equal
    {"temperature": 0.0},  # TGI: greedy is do_sample false, not temperature 0
    {"top_n_tokens": 50},
    {"typical_p": 0.0},
    {"watermark": True},
    {"stop": ["s"] * 17},
    {"grammar": {"type": "regex", "value": "("}},
    {"grammar": {"type": "json_schema", "value": {"name": "x"}}},
    {"max_new_tokens": 0},
    {"do_sample": "yes"},
])
def test_refusals_name_the_field(url, parameters):
    r = generate(url, **parameters)
    assert r.status_code == 422, r.text  # TGI's status and body, the field named in the message
    assert r.json()["error_type"] == "validation" and set(r.json()) == {"error", "error_type"}, r.text
    assert "parameters." + next(iter(parameters)) in r.json()["error"], r.text


def test_an_adapter_not_loaded_is_a_404_naming_the_field(url):
    """This engine was started without LoRA: no adapter_id can be served (tests/test_lora.py serves some)."""
    r = generate(url, adapter_id="lora-1")
    assert r.status_code == 404 and r.json()["error"].startswith("parameters.adapter_id"), r.text


def test_stream_only_refusals(url):
    for parameters, param in (({"best_of": 2, "do_sample": True}, "best_of"),
                              ({"decoder_input_details": True, "details": True}, "decoder_input_details")):
        r = generate(url, route="/generate_stream", **parameters)
        assert r.status_code == 422 and "parameters." + param in r.json()["error"], r.text
    assert httpx.post(url + "/generate", json={"inputs": ""}).status_code == 422
    assert httpx.post(url + "/generate", json={"inputs": "x", "model": "other"}).status_code == 404


def test_a_client_that_leaves_frees_its_blocks(url, engine):
    leave_stream_early(url + "/generate_stream",
                       {"inputs": PROMPT, "parameters": {"max_new_tokens": 200, "do_sample": True}}, engine)
    assert engine.stats().kv_cache_usage == 0.0 and engine.stats().num_running == 0


# ---- the mapping, without a server ----------------------------------------------------------------
def test_sampling_rule_and_finish_reasons():
    assert not tgi.samples(TgiParameters()) and not tgi.samples(TgiParameters(temperature=1.0, top_p=1.0))
    for kw in ({"do_sample": True}, {"temperature": 0.5}, {"top_k": 5}, {"top_p": 0.9}, {"typical_p": 0.5}):
        assert tgi.samples(TgiParameters(**kw)), kw
    assert tgi.plan(TgiParameters(), stream=False).params.temperature == 0.0
    assert tgi.plan(TgiParameters(do_sample=True), stream=False).params.temperature == 1.0
    assert tgi.plan(None, stream=False).params.max_tokens == 100
    assert tgi.finish_reason(CompletionOutput(0, finish_reason="length")) == "length"
    assert tgi.finish_reason(CompletionOutput(0, finish_reason="stop", stop_reason="###")) == "stop_sequence"
    assert tgi.finish_reason(CompletionOutput(0, finish_reason="stop", stop_reason=None)) == "eos_token"
    assert tgi.finish_reason(CompletionOutput(0, finish_reason="stop", stop_reason=7)) == "eos_token"
    outs = [CompletionOutput(i, logprobs=[TokenLogprob(1, a), TokenLogprob(2, b)])
            for i, (a, b) in enumerate([(-1.0, -2.0), (-0.5, -1.0), (-1.5, 0.0)])]
    assert tgi.best_index(RequestOutput("r", [1], outs)) == 1
    assert tgi.truncated([1, 2, 3, 4], 2) == [3, 4] and tgi.truncated([1, 2], 5) == [1, 2]


def test_tokenize_in_tgis_shape(url, engine):
    """POST /tokenize with `inputs` answers as TGI does: the ids /generate sees (its prefill details),
    each with the characters of the input it came from (character offsets, not bytes), cut by
    `truncate` as /generate cuts; the vLLM-shaped body still gets vLLM's answer."""
    tokens = httpx.post(f"{url}/tokenize", json={"inputs": PROMPT}, timeout=30).json()
    prefill = generate(url, max_new_tokens=1, details=True, decoder_input_details=True).json()["details"]["prefill"]
    assert [t["id"] for t in tokens] == [t["id"] for t in prefill] == engine.tokenizer.encode(PROMPT)
    assert "".join(t["text"] for t in tokens) == PROMPT
    assert all(PROMPT[t["start"]:t["stop"]] == t["text"] for t in tokens)
    cut = httpx.post(f"{url}/tokenize", json={"inputs": PROMPT, "parameters": {"truncate": 3}}, timeout=30).json()
    assert cut == tokens[-3:]
    accented = httpx.post(f"{url}/tokenize", json={"inputs": "café"}, timeout=30).json()
    assert accented[-1]["text"] == "é" and accented[-1]["stop"] == 4  # é is two byte tokens, one character
    vllm = httpx.post(f"{url}/tokenize", json={"prompt": PROMPT}, timeout=30).json()
    assert vllm["tokens"] == engine.tokenizer.encode(PROMPT) and vllm["count"] == len(tokens)
    both = httpx.post(f"{url}/tokenize", json={"inputs": PROMPT, "prompt": "other"}, timeout=30)
    assert both.json() == tokens  # `inputs` decides; other fields are ignored, as everywhere
    assert httpx.post(f"{url}/tokenize", json={"model": "tiny"}, timeout=30).status_code == 400  # neither
    assert httpx.post(f"{url}/tokenize", json={"inputs": ""}, timeout=30).status_code == 400


def test_errors_are_tgis_typed_errors_in_its_client(url, monkeypatch):
    """TGI's body ({"error", "error_type"}) makes huggingface_hub raise its typed errors."""
    from huggingface_hub import InferenceClient, constants
    from huggingface_hub.errors import ValidationError

    monkeypatch.setattr(constants, "is_offline_mode", lambda: False)
    client = InferenceClient(url, timeout=60)
    for stream in (False, True):
        with pytest.raises(ValidationError, match="max_new_tokens"):
            out = client.text_generation(PROMPT, max_new_tokens=0, stream=stream)
            list(out) if stream else out


def test_a_full_queue_is_tgis_429_overloaded():
    from huggingface_hub.errors import OverloadedError

    from tests.server_helpers import FakeEngine, queue_full

    slow = FakeEngine(step_delay_s=0.02, max_running=1)
    body = {"inputs": "a", "parameters": {"max_new_tokens": 40}}
    with serve({"fake": slow}, max_waiting=1) as base:
        # an OpenAI stream holds the fake engine (its tokenizer is too plain for TGI's token events)
        held = {"model": "fake", "prompt": "a", "max_tokens": 40, "stream": True}
        with queue_full(base, slow, "/generate", body, stream_path="/v1/completions", stream_body=held):
            r = httpx.post(f"{base}/generate", json={"inputs": "b", "parameters": {"max_new_tokens": 2}})
    assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
    assert r.json()["error_type"] == "overloaded"
    # huggingface_hub's client retries a 429 (after Retry-After); given up on, it is its OverloadedError
    from huggingface_hub.inference._common import raise_text_generation_error
    from huggingface_hub.utils import HfHubHTTPError

    with pytest.raises(OverloadedError):
        raise_text_generation_error(HfHubHTTPError("429", response=r))

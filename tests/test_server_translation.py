"""/v1/translations end to end on the real TranslationEngine with a tiny Marian folder."""
from __future__ import annotations

import json
import os

import httpx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from engine.config import CacheConfig, EngineConfig  # noqa: E402
from engine.translation_engine import TranslationEngine  # noqa: E402
from tests.encdec_fixtures import make_marian_folder  # noqa: E402
from tests.server_helpers import metric_value, serve  # noqa: E402

MODEL = "tiny-marian"
TEXTS = ["the quick brown fox", "kamira tosune lope di ba", "a red house on the river!"]


def _config(folder) -> EngineConfig:
    return EngineConfig(model=str(folder), cache=CacheConfig(block_size=4, num_blocks=256))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_marian_folder(tmp_path_factory.mktemp("srv") / MODEL)


@pytest.fixture(scope="module")
def engine(folder) -> TranslationEngine:
    return TranslationEngine.from_config(_config(folder))


@pytest.fixture(scope="module")
def offline(folder) -> TranslationEngine:
    return TranslationEngine.from_config(_config(folder))


@pytest.fixture(scope="module")
def base_url(engine):
    with serve({engine.info.name: engine}) as url:
        yield url


def _post(base_url: str, **body) -> httpx.Response:
    return httpx.post(f"{base_url}/v1/translations", json=body, timeout=60)


def test_models_lists_translation_task(base_url):
    data = httpx.get(f"{base_url}/v1/models").json()["data"]
    assert [(m["id"], m["task"]) for m in data] == [(MODEL, "translate")]


def test_single_input_equals_offline_engine_with_model_defaults(base_url, offline):
    r = _post(base_url, model=MODEL, input=TEXTS[0], max_tokens=10)
    assert r.status_code == 200, r.text
    body = r.json()
    ref = offline.translate([TEXTS[0]], offline.default_params(max_tokens=10))[0]  # 4 beams, like the config
    assert body["object"] == "translation" and body["model"] == MODEL
    assert body["data"] == [{"index": 0, "translation": ref.outputs[0].text,
                             "finish_reason": ref.outputs[0].finish_reason}]
    assert ref.outputs[0].text  # a random model still emits text
    prompt = len(offline.tokenizer.encode(TEXTS[0]))
    assert body["usage"] == {"prompt_tokens": prompt, "completion_tokens": len(ref.outputs[0].token_ids),
                             "total_tokens": prompt + len(ref.outputs[0].token_ids)}


def test_list_input_greedy_and_beams(base_url, offline):
    for beams in (1, 3):
        r = _post(base_url, model=MODEL, input=TEXTS, num_beams=beams, max_tokens=8, length_penalty=0.8)
        assert r.status_code == 200, r.text
        refs = offline.translate(TEXTS, offline.default_params(num_beams=beams, max_tokens=8, length_penalty=0.8))
        assert [d["index"] for d in r.json()["data"]] == [0, 1, 2]
        assert [d["translation"] for d in r.json()["data"]] == [o.outputs[0].text for o in refs]
        assert r.json()["usage"]["completion_tokens"] == sum(len(o.outputs[0].token_ids) for o in refs)


def test_streaming_reassembles(base_url):
    whole = _post(base_url, model=MODEL, input=TEXTS[1], num_beams=1, max_tokens=12).json()
    with httpx.stream("POST", f"{base_url}/v1/translations", timeout=60,
                      json={"model": MODEL, "input": TEXTS[1], "num_beams": 1, "max_tokens": 12, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    deltas = [d for c in chunks for d in c["data"]]
    assert len(deltas) > 2, "streamed in one piece"
    assert "".join(d["delta"] for d in deltas) == whole["data"][0]["translation"]
    assert deltas[-1]["finish_reason"] == whole["data"][0]["finish_reason"]
    assert chunks[-1]["usage"] == whole["usage"]


@pytest.mark.parametrize("body, status, param", [
    ({"input": ""}, 400, "input"),
    ({"input": []}, 400, "input"),
    ({"input": "the cat " * 200}, 400, "input"),  # over the 128-token limit
    ({"input": "x", "num_beams": 0}, 400, "num_beams"),
    ({"input": "x", "num_beams": 4, "temperature": 0.7}, 400, "num_beams"),
    ({"input": ["a", "b"], "stream": True}, 400, "stream"),
    ({"input": "x", "num_beams": "4"}, 400, "num_beams"),
    ({"input": "x", "num_beams": 2, "length_penalty": 3e111}, 400, "length_penalty"),  # was a 500 in the step
    ({"input": "x", "model": "nope"}, 404, "model"),
])
def test_bad_requests(base_url, body, status, param):
    r = _post(base_url, **({"model": MODEL} | body))
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_kv_blocks_free_after_requests(base_url, engine):
    assert _post(base_url, model=MODEL, input=TEXTS, max_tokens=6).status_code == 200
    metrics = httpx.get(f"{base_url}/metrics").text
    assert metric_value(metrics, "kvserve:kv_cache_usage_perc", model_name=MODEL) == 0.0
    assert metric_value(metrics, "kvserve:request_success_total", model_name=MODEL, finished_reason="stop") >= 3
    assert engine.block_manager.num_free_blocks == engine.num_blocks

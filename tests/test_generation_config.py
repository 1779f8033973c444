"""vLLM's `--generation-config auto` (the default): a model's generation_config.json sampling settings are the
defaults of requests that set none, on chat, completions, the Responses and the Messages APIs; a request's
own values win, and `--generation-config vllm` keeps the API's defaults. Answers equal the offline engine's
with the same settings spelled out."""
from __future__ import annotations

import json
import shutil

import httpx
import pytest

from engine.config import CacheConfig, EngineConfig
from engine.engine import LLMEngine
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from server.generation import model_defaults
from server.settings import ServerSettings
from tests.server_helpers import free_port, serve

CONFIG = {"temperature": 0.0, "repetition_penalty": 1.5, "max_new_tokens": 7, "do_sample": True, "top_p": 5.0}
TEMPLATE = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
MESSAGES = [{"role": "user", "content": "the river and the river and the river"}]


def test_model_defaults_pick_the_sampling_settings_in_range():
    assert model_defaults(CONFIG) == {"temperature": 0.0, "repetition_penalty": 1.5, "max_tokens": 7}  # top_p 5 out
    assert model_defaults({"top_k": 20, "min_p": 0.1, "bos_token_id": 1}) == {"top_k": 20, "min_p": 0.1}
    assert model_defaults({}) == {}


@pytest.fixture(scope="module")
def folder(tiny_llama, tmp_path_factory):
    folder = shutil.copytree(tiny_llama, tmp_path_factory.mktemp("genconfig") / "m")
    (folder / "generation_config.json").write_text(json.dumps(CONFIG))
    (folder / "chat_template.jinja").write_text(TEMPLATE)
    return folder


def _engine(folder) -> LLMEngine:
    return LLMEngine.from_config(EngineConfig(model=str(folder), cache=CacheConfig(block_size=4, num_blocks=64)))


def _offline(folder, prompt: str, **params) -> str:
    llm = LLM(str(folder), num_kv_blocks=64, block_size=4)
    return llm.generate([llm.engine.tokenizer.encode(prompt)], SamplingParams(**params))[0].outputs[0].text


def test_requests_inherit_the_models_settings(folder):
    engine = _engine(folder)
    prompt = MESSAGES[0]["content"] + "\nA:"
    penalised = _offline(folder, prompt, temperature=0.0, repetition_penalty=1.5, max_tokens=7, ignore_eos=True)
    plain = _offline(folder, prompt, temperature=0.0, max_tokens=7, ignore_eos=True)
    assert penalised != plain  # the penalty shows in this answer
    with serve({"m": engine}) as url:
        chat = httpx.post(f"{url}/v1/chat/completions", timeout=30, json={
            "model": "m", "messages": MESSAGES, "ignore_eos": True}).json()
        assert chat["choices"][0]["message"]["content"] == penalised and chat["usage"]["completion_tokens"] == 7
        own = httpx.post(f"{url}/v1/chat/completions", timeout=30, json={
            "model": "m", "messages": MESSAGES, "ignore_eos": True, "repetition_penalty": 1.0}).json()
        assert own["choices"][0]["message"]["content"] == plain  # the request's value wins
        resp = httpx.post(f"{url}/v1/responses", timeout=30, json={"model": "m", "input": MESSAGES[0]["content"]})
        assert resp.json()["usage"]["output_tokens"] <= 7  # max_new_tokens as the default limit
        msg = httpx.post(f"{url}/v1/messages", timeout=30, json={"model": "m", "messages": MESSAGES, "max_tokens": 7})
        assert msg.status_code == 200, msg.text
        text = _offline(folder, prompt, temperature=0.0, repetition_penalty=1.5, max_tokens=7)
        assert msg.json()["content"][0]["text"] == text, (msg.json(), text)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_vllm_keeps_the_apis_defaults(folder):
    engine = _engine(folder)
    prompt = MESSAGES[0]["content"] + "\nA:"
    plain = _offline(folder, prompt, temperature=0.0, max_tokens=9, ignore_eos=True)
    settings = ServerSettings(port=free_port(), shutdown_timeout_s=2.0, generation_config="vllm")
    with serve({"m": engine}, settings) as url:
        chat = httpx.post(f"{url}/v1/chat/completions", timeout=30, json={
            "model": "m", "messages": MESSAGES, "ignore_eos": True, "temperature": 0, "max_tokens": 9}).json()
        assert chat["choices"][0]["message"]["content"] == plain  # no penalty from the folder
    with pytest.raises(ValueError):
        ServerSettings(generation_config="folder")


def test_reasoning_effort_reaches_the_template(tiny_llama, tmp_path):
    """OpenAI's chat `reasoning_effort` becomes the template's `reasoning_effort`, as the Responses API's
    `reasoning.effort` does (gpt-oss-style templates read it)."""
    folder = shutil.copytree(tiny_llama, tmp_path / "effort")
    (folder / "chat_template.jinja").write_text(
        "{% if reasoning_effort is defined %}effort={{ reasoning_effort }}\n{% endif %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    engine = _engine(folder)
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    with serve({"m": engine}) as url:
        def prompt_tokens(path: str, body: dict) -> int:
            r = httpx.post(f"{url}{path}", json=body, timeout=30)
            assert r.status_code == 200, r.text
            usage = r.json()["usage"]
            return usage.get("prompt_tokens", usage.get("input_tokens"))

        plain = prompt_tokens("/v1/chat/completions", base)
        high = prompt_tokens("/v1/chat/completions", base | {"reasoning_effort": "high"})
        assert high == plain + len(engine.tokenizer.encode("effort=high\n", add_special_tokens=False))
        responses = prompt_tokens("/v1/responses", {"model": "m", "input": "hi", "max_output_tokens": 1,
                                                    "reasoning": {"effort": "high"}})
        assert responses == high
        r = httpx.post(f"{url}/v1/chat/completions", json=base | {"reasoning_effort": "huge"}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "reasoning_effort"

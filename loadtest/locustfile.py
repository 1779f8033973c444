"""Locust users for kvserve, one class per endpoint; each targets the first served model of its task.

Run through loadtest/run.py, which asks GET /v1/models what is served and names only the matching
classes on the locust command line (or name them yourself: `locust -f loadtest/locustfile.py
ChatStreamUser CompletionUser --host URL`, or pick them in the web UI with --class-picker).

Request names in the stats:
  chat_stream        POST /v1/chat/completions, stream=True, time until the last SSE event
  chat_stream TTFT   time to the first content token of the same requests (a custom event)
  completions        POST /v1/completions (not streamed)
  generate_stream    POST /generate_stream (TGI's), time until the last event
  responses_stream   POST /v1/responses, stream=True (OpenAI's Responses API), time until the last event
  embeddings         POST /v1/embeddings
  translations       POST /v1/translations
  summarizations     POST /v1/summarizations (no model named: the server's first summarizer answers)
  /v1/models         each user's one lookup of its model at start

Env: KVSERVE_LOAD_MAX_TOKENS (tokens generated per request, default 32).
Locust monkey-patches with gevent: keep it out of the server's process (it fights torch).
"""
from __future__ import annotations

import json
import os
import random
import time
from typing import Any

from locust import HttpUser, between, task
from locust.exception import StopUser

WORDS = ("river mountain city light quiet music garden winter paper window story ocean bridge "
         "morning forest engine market yellow simple travel").split()
MAX_TOKENS = int(os.environ.get("KVSERVE_LOAD_MAX_TOKENS", "32"))


def sentence(rng: random.Random, low: int = 4, high: int = 16) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


class KvserveUser(HttpUser):
    """Base: finds its model once in /v1/models; `served_task` is the ModelCard.task it needs."""

    abstract = True
    served_task = ""
    wait_time = between(0.05, 0.3)

    def on_start(self) -> None:
        self.rng = random.Random()
        with self.client.get("/v1/models", name="/v1/models", catch_response=True) as r:
            models = [m["id"] for m in r.json().get("data", []) if m.get("task") == self.served_task] \
                if r.ok else []
            if not models:
                r.failure(f"no served model with task {self.served_task!r}")
                raise StopUser()
        self.model = models[0]

    def post_json(self, path: str, name: str, body: dict[str, Any], check) -> None:
        """POST, then `check(parsed_json)` returns an error string (failure) or None (success)."""
        with self.client.post(path, json=body, name=name, catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
                return
            try:
                problem = check(r.json())
            except (ValueError, KeyError, IndexError, TypeError) as e:
                problem = f"bad response body: {e!r}"
            if problem:
                r.failure(problem)


class ChatStreamUser(KvserveUser):
    served_task = "generate"

    @task
    def chat_stream(self) -> None:
        body = {"model": self.model, "stream": True, "max_tokens": MAX_TOKENS, "temperature": 0.8,
                "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": sentence(self.rng)}]}
        start = time.perf_counter()
        first_token_s: float | None = None
        with self.client.post("/v1/chat/completions", json=body, name="chat_stream", stream=True,
                              catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
                return
            done, finish_reason, usage = False, None, None
            try:
                for line in r.iter_lines(decode_unicode=True):
                    if not line or not line.startswith("data: "):
                        continue
                    data = line[len("data: "):]
                    if data == "[DONE]":
                        done = True
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise ValueError(f"error event: {chunk['error']}")
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices", []):
                        # the first chunk carries only the role; time the first generated text
                        if first_token_s is None and choice.get("delta", {}).get("content"):
                            first_token_s = time.perf_counter() - start
                        finish_reason = choice.get("finish_reason") or finish_reason
            except (ValueError, OSError) as e:
                r.failure(f"broken stream: {e!r}")
                return
            # locust timed only the response headers of a streamed request: report the whole stream
            r.request_meta["response_time"] = (time.perf_counter() - start) * 1000
            if not done or finish_reason is None or not usage:
                r.failure(f"stream ended early (done={done}, finish_reason={finish_reason}, usage={usage})")
            # an output that stops early may have no text: the stop token is kept out of it (as vLLM
            # does), and the bytes of an unfinished UTF-8 character before it never become one (the
            # tiny models' random byte tokens). One that ran to max_tokens has decodable content.
            elif first_token_s is None and finish_reason == "length" and usage.get("completion_tokens", 0) > 0:
                r.failure("tokens were generated but no content delta arrived")
        if first_token_s is not None:
            self.environment.events.request.fire(
                request_type="TTFT", name="chat_stream TTFT", response_time=first_token_s * 1000,
                response_length=0, exception=None, context={})


class TgiStreamUser(KvserveUser):
    """text-generation-inference's stream: one event per token, the last with the text and details."""

    served_task = "generate"

    @task
    def generate_stream(self) -> None:
        body = {"model": self.model, "inputs": sentence(self.rng),
                "parameters": {"max_new_tokens": MAX_TOKENS, "do_sample": True, "temperature": 0.8}}
        start = time.perf_counter()
        with self.client.post("/generate_stream", json=body, name="generate_stream", stream=True,
                              catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
                return
            events, last = 0, None
            try:
                for line in r.iter_lines(decode_unicode=True):
                    if line and line.startswith("data:"):
                        last = json.loads(line[len("data:"):])  # TGI's streams have no [DONE]: all JSON
                        if "error" in last:
                            raise ValueError(f"error event: {last['error']}")
                        events += 1
                        if last["index"] != events:
                            raise ValueError(f"event {events} has index {last['index']}")
            except (ValueError, KeyError, OSError) as e:
                r.failure(f"broken stream: {e!r}")
                return
            r.request_meta["response_time"] = (time.perf_counter() - start) * 1000
            details = (last or {}).get("details")
            if not details or details["generated_tokens"] != events or last.get("generated_text") is None:
                r.failure(f"stream ended early after {events} events: {last}")


class ResponsesStreamUser(KvserveUser):
    """OpenAI's Responses API streamed: numbered events, the last one the whole answer."""

    served_task = "generate"

    @task
    def responses_stream(self) -> None:
        body = {"model": self.model, "stream": True, "max_output_tokens": MAX_TOKENS, "temperature": 0.8,
                "store": False, "input": sentence(self.rng)}
        start = time.perf_counter()
        with self.client.post("/v1/responses", json=body, name="responses_stream", stream=True,
                              catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
                return
            events: list[dict[str, Any]] = []
            try:
                for line in r.iter_lines(decode_unicode=True):
                    if line and line.startswith("data: "):
                        event = json.loads(line[len("data: "):])
                        if "error" in event:
                            raise ValueError(f"error event: {event['error']}")
                        if event["sequence_number"] != len(events):
                            raise ValueError(f"event {len(events)} has sequence_number {event['sequence_number']}")
                        events.append(event)
            except (ValueError, KeyError, OSError) as e:
                r.failure(f"broken stream: {e!r}")
                return
            r.request_meta["response_time"] = (time.perf_counter() - start) * 1000
            last = events[-1] if events else {}
            if last.get("type") not in ("response.completed", "response.incomplete"):
                r.failure(f"stream ended early after {len(events)} events: {last.get('type')}")
            elif not last["response"]["usage"]["output_tokens"]:
                r.failure("no tokens generated")


class CompletionUser(KvserveUser):
    served_task = "generate"

    @task
    def completion(self) -> None:
        body = {"model": self.model, "prompt": sentence(self.rng), "max_tokens": MAX_TOKENS, "temperature": 0.8}

        def check(reply: dict) -> str | None:
            choice = reply["choices"][0]
            if not isinstance(choice["text"], str) or choice["finish_reason"] not in ("stop", "length"):
                return f"bad choice {choice}"
            return None if reply["usage"]["completion_tokens"] > 0 else "no tokens generated"

        self.post_json("/v1/completions", "completions", body, check)


class EmbeddingUser(KvserveUser):
    served_task = "embed"

    @task
    def embeddings(self) -> None:
        inputs = [sentence(self.rng) for _ in range(self.rng.randint(1, 4))]

        def check(reply: dict) -> str | None:
            data = reply["data"]
            if [d["index"] for d in data] != list(range(len(inputs))):
                return f"expected {len(inputs)} embeddings, got indices {[d['index'] for d in data]}"
            return None if all(len(d["embedding"]) > 0 for d in data) else "empty embedding"

        self.post_json("/v1/embeddings", "embeddings", {"model": self.model, "input": inputs}, check)


class RerankUser(KvserveUser):
    served_task = "classify"  # a cross-encoder (one label); a multi-label classifier refuses reranking

    @task
    def rerank(self) -> None:
        docs = [sentence(self.rng) for _ in range(self.rng.randint(2, 8))]
        body = {"model": self.model, "query": sentence(self.rng, 3, 8), "documents": docs}

        def check(reply: dict) -> str | None:
            results = reply["results"]
            if sorted(r["index"] for r in results) != list(range(len(docs))):
                return f"expected a ranking of {len(docs)} documents, got {[r['index'] for r in results]}"
            scores = [r["relevance_score"] for r in results]
            return None if scores == sorted(scores, reverse=True) else f"not ranked: {scores}"

        self.post_json("/v1/rerank", "rerank", body, check)


class TranslationUser(KvserveUser):
    served_task = "translate"

    @task
    def translations(self) -> None:
        inputs = [sentence(self.rng, 3, 10) for _ in range(self.rng.randint(1, 2))]
        body = {"model": self.model, "input": inputs, "max_tokens": MAX_TOKENS}

        def check(reply: dict) -> str | None:
            data = reply["data"]
            if [d["index"] for d in data] != list(range(len(inputs))):
                return f"expected {len(inputs)} translations, got indices {[d['index'] for d in data]}"
            bad = [d for d in data if not isinstance(d["translation"], str) or d["finish_reason"] is None]
            return f"bad translations {bad}" if bad else None

        self.post_json("/v1/translations", "translations", body, check)


class SummarizationUser(KvserveUser):
    """Names no model: the server answers with its first summarizer (BART, Pegasus, a T5 with task
    settings), which a translate-task lookup could not tell from a translator. loadtest/run.py starts
    it only where a probe finds one."""

    served_task = "translate"

    def on_start(self) -> None:
        self.rng = random.Random()

    @task
    def summarizations(self) -> None:
        article = ". ".join(sentence(self.rng, 6, 14) for _ in range(self.rng.randint(2, 5)))
        body = {"input": article, "max_tokens": MAX_TOKENS}

        def check(reply: dict) -> str | None:
            data = reply["data"]
            if len(data) != 1 or not isinstance(data[0]["summary"], str) or data[0]["finish_reason"] is None:
                return f"bad summary {data}"
            return None

        self.post_json("/v1/summarizations", "summarizations", body, check)

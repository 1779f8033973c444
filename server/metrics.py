"""Prometheus metrics, vLLM's names under the `kvserve:` prefix, each labelled by `model_name`.

`ServerMetrics.on_step` is the AsyncEngine's step hook: it runs on the worker thread after every
engine step (prometheus_client objects are thread-safe). Engine counters are totals since start,
so the hook turns them into increments by remembering the last snapshot per model.
"""
from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                2.5, 5.0, 10.0)
_TOKENS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    """All kvserve metrics on one registry (passed in, so tests and apps never share state)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        m = ["model_name"]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"kvserve:{name}", doc, m, registry=registry)

        def counter(name: str, doc: str, labels: list[str] = m) -> Counter:
            return Counter(f"kvserve:{name}", doc, labels, registry=registry)

        def hist(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(f"kvserve:{name}", doc, m, buckets=buckets, registry=registry)

        self.num_requests_running = gauge("num_requests_running", "Requests in the running batch.")
        self.num_requests_waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_cache_usage_perc = gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).")
        self.prompt_tokens = counter("prompt_tokens", "Prefill tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.num_preemptions = counter("num_preemptions", "Requests preempted for lack of KV blocks.")
        self.prefix_cache_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_cache_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.spec_decode_draft_tokens = counter("spec_decode_num_draft_tokens", "Speculative draft tokens verified.")
        self.spec_decode_accepted_tokens = counter("spec_decode_num_accepted_tokens",
                                                   "Speculative draft tokens accepted.")
        # vLLM's: one sample whose labels name the adapters running and waiting (comma-separated),
        # valued at the time they last changed; the previous label set is removed, not left stale
        self.lora_requests_info = Gauge(
            "kvserve:lora_requests_info", "LoRA adapters of the running and waiting requests.",
            ["model_name", "max_lora", "running_lora_adapters", "waiting_lora_adapters"], registry=registry)
        self._lora_labels: dict[str, tuple[str, ...]] = {}
        # engine counters (totals since start) and the Prometheus counters they feed, as increments
        self._counters = (("num_prompt_tokens", self.prompt_tokens),
                          ("num_generation_tokens", self.generation_tokens),
                          ("num_preemptions", self.num_preemptions),
                          ("num_prefix_queried_tokens", self.prefix_cache_queries),
                          ("num_prefix_hit_tokens", self.prefix_cache_hits),
                          ("num_draft_tokens", self.spec_decode_draft_tokens),
                          ("num_accepted_tokens", self.spec_decode_accepted_tokens))
        self.request_success = counter(
            "request_success", "Finished requests by finish reason.", ["model_name", "finished_reason"]
        )
        self.time_to_first_token = hist(
            "time_to_first_token_seconds", "Arrival to first generated token.", _LATENCY_BUCKETS
        )
        self.inter_token_latency = hist("inter_token_latency_seconds", "Time between tokens.", _ITL_BUCKETS)
        self.e2e_request_latency = hist(
            "e2e_request_latency_seconds", "Arrival to finish.", _LATENCY_BUCKETS
        )
        self.request_queue_time = hist(
            "request_queue_time_seconds", "Arrival to first scheduled.", _LATENCY_BUCKETS
        )
        self.iteration_tokens = hist(
            "iteration_tokens_total", "Tokens (prefill + decode) processed per engine step.", _TOKENS_BUCKETS
        )
        self.embedding_requests = counter("embedding_requests", "Embedding requests finished.")
        self.embedding_tokens = counter("embedding_tokens", "Tokens embedded.")
        self.embedding_batch_size = hist(
            "embedding_batch_size", "Embedding requests finished per engine step.", _BATCH_BUCKETS
        )
        self.embedding_request_latency = hist(
            "embedding_request_latency_seconds", "Embedding request latency.", _LATENCY_BUCKETS
        )
        self._last_stats: dict[str, Any] = {}
        self._last_token_time: dict[str, float] = {}  # request id -> when its last token arrived

    # ---- step hook (worker thread) ---------------------------------------------------
    def on_step(self, name: str, engine: Any, outputs: list[Any], seconds: float) -> None:
        if hasattr(engine, "stats"):
            self._record_stats(name, engine.stats())
        if outputs and hasattr(outputs[0], "embeddings"):
            self._record_embeddings(name, outputs)
        else:
            self._record_generation(name, outputs)

    def _record_stats(self, name: str, stats: Any) -> None:
        self.num_requests_running.labels(name).set(stats.num_running)
        self.num_requests_waiting.labels(name).set(stats.num_waiting)
        self.kv_cache_usage_perc.labels(name).set(stats.kv_cache_usage)
        last = self._last_stats.get(name)
        self._last_stats[name] = stats
        deltas = {f: getattr(stats, f) - (getattr(last, f) if last is not None else 0) for f, _ in self._counters}
        for field, metric in self._counters:
            if deltas[field] > 0:
                metric.labels(name).inc(deltas[field])
        if getattr(stats, "max_loras", 0):
            self._record_loras(name, stats)
        step_tokens = deltas["num_prompt_tokens"] + deltas["num_generation_tokens"]
        if step_tokens > 0:
            self.iteration_tokens.labels(name).observe(step_tokens)

    def _record_loras(self, name: str, stats: Any) -> None:
        labels = (name, str(stats.max_loras), ",".join(stats.running_loras), ",".join(stats.waiting_loras))
        last = self._lora_labels.get(name)
        if labels == last:
            return
        if last is not None:
            self.lora_requests_info.remove(*last)
        self.lora_requests_info.labels(*labels).set(time.time())
        self._lora_labels[name] = labels

    def _record_generation(self, name: str, outputs: list[Any]) -> None:
        now = time.monotonic()
        for out in outputs:
            new_tokens = sum(c.num_new_tokens for c in out.outputs)
            last = self._last_token_time.get(out.request_id)
            if new_tokens > 0:
                if last is not None:
                    self.inter_token_latency.labels(name).observe(now - last)
                elif out.first_token_time is not None:
                    self.time_to_first_token.labels(name).observe(out.first_token_time - out.arrival_time)
                self._last_token_time[out.request_id] = now
            if out.finished:
                self._last_token_time.pop(out.request_id, None)
                reason = out.outputs[0].finish_reason if out.outputs else None
                self.request_success.labels(name, reason or "abort").inc()
                end = out.finished_time if out.finished_time is not None else now
                self.e2e_request_latency.labels(name).observe(end - out.arrival_time)
                if out.first_scheduled_time is not None:
                    self.request_queue_time.labels(name).observe(out.first_scheduled_time - out.arrival_time)

    def _record_embeddings(self, name: str, outputs: list[Any]) -> None:
        done = [o for o in outputs if getattr(o, "finished", True)]
        if not done:
            return
        self.embedding_batch_size.labels(name).observe(len(done))
        self.embedding_requests.labels(name).inc(len(done))
        self.embedding_tokens.labels(name).inc(sum(int(o.num_prompt_tokens) for o in done))

    # ---- event-loop side ------------------------------------------------------------
    def forget(self, request_id: str) -> None:
        """Drop per-request state of a request that ended without a finished output (abort)."""
        self._last_token_time.pop(request_id, None)

    def register_model(self, name: str, task: str) -> None:
        """Create the label children up front so /metrics lists every series from the start."""
        if task in ("embed", "classify"):  # encoder-only engines: no KV cache, no tokens generated
            for metric in (self.embedding_requests, self.embedding_tokens, self.embedding_batch_size,
                           self.embedding_request_latency):
                metric.labels(name)
            return
        for metric in (self.num_requests_running, self.num_requests_waiting, self.kv_cache_usage_perc,
                       self.prompt_tokens, self.generation_tokens, self.num_preemptions,
                       self.prefix_cache_queries, self.prefix_cache_hits,
                       self.time_to_first_token, self.inter_token_latency, self.e2e_request_latency,
                       self.request_queue_time, self.iteration_tokens):
            metric.labels(name)

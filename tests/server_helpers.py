"""Helpers for the server tests: a deterministic fake StepEngine, a live uvicorn in a thread, and a
`kvserve serve` (or any server script) in a subprocess, which the benchmarks start the same way.

The fake engine keeps the route/error/metrics tests fast and exact; the real engine is exercised
by test_server_engine.py on a tiny random Llama and by test_server_smollm2.py.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import httpx
import uvicorn

from engine.async_engine import AsyncEngine
from engine.errors import PromptTooLongError
from engine.outputs import CompletionOutput, RequestOutput, TokenLogprob
from engine.request import EngineStats, GenerationRequest
from models.registry import Task
from models.spec import ModelInfo
from server.app import create_app
from server.settings import ServerSettings

REPO = Path(__file__).resolve().parents[1]
EOS, BOS, OFFSET = 0, 1, 2  # char c is token ord(c) + OFFSET


class FakeTokenizer:
    """Characters are tokens; enough to check that routes tokenize, template and detokenize."""

    eos_token_ids = (EOS,)
    bos_token_id = BOS
    vocab_size = 130

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [min(ord(c), 127) + OFFSET for c in text]
        return [BOS] + ids if add_special_tokens else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        special = {EOS: "</s>", BOS: "<s>"}
        return "".join(chr(i - OFFSET) if i >= OFFSET else ("" if skip_special_tokens else special[i]) for i in ids)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, enable_thinking: bool = True,
                            thinking_prompt: bool = False) -> str:
        text = "<s>" + "".join(f"[{m['role']}]{m['content']}\n" for m in messages)
        if tools:  # as HF templates with tool support do: the tools come first
            text = "<s>[tools]" + ",".join(t["function"]["name"] for t in tools) + "\n" + text[3:]
        if not add_generation_prompt:
            return text
        # as Qwen3's templates: an empty block without thinking; thinking-only ones open the block
        return text + "[assistant]" + ("<think>\n\n</think>\n\n" if not enable_thinking else "") + \
            ("<think>\n" if thinking_prompt else "")


@dataclass
class _Seq:
    request_id: str
    req: GenerationRequest
    arrival: float
    samples: list[CompletionOutput] = field(default_factory=list)
    first_token_time: float | None = None


class FakeEngine:
    """Generates lowercase letters determined by (prompt, sample index, seed); 4 tokens per block."""

    BLOCK = 4

    def __init__(self, name: str = "fake", max_model_len: int = 96, num_blocks: int = 256,
                 step_delay_s: float = 0.002, max_running: int = 64, script: str | None = None) -> None:
        self.script = script  # if set, every sample writes this text, then stops
        self.tokenizer = FakeTokenizer()
        self.info = ModelInfo(name=name, path=f"/models/{name}", architecture="Fake", task=Task.GENERATE,
                              max_model_len=max_model_len, vocab_size=FakeTokenizer.vocab_size,
                              eos_token_ids=(EOS,), bos_token_id=BOS, chat_template="fake")
        self.num_blocks = num_blocks
        self.step_delay_s = step_delay_s
        self.max_running = max_running
        self.running: dict[str, _Seq] = {}
        self.waiting: list[_Seq] = []
        self.prompt_tokens = 0
        self.generation_tokens = 0

    # StepEngine
    def validate(self, payload: GenerationRequest) -> None:
        count = len(payload.prompt_token_ids)
        limit = self.info.max_model_len
        if count + (payload.params.max_tokens or 1) > limit:
            raise PromptTooLongError(
                f"This model's maximum context length is {limit} tokens; the prompt has {count} tokens "
                f"and max_tokens is {payload.params.max_tokens}", "prompt")

    def add_request(self, request_id: str, payload: GenerationRequest) -> None:
        seq = _Seq(request_id, payload, time.monotonic())
        seq.samples = [CompletionOutput(index=i, logprobs=[] if payload.params.logprobs is not None else None)
                       for i in range(payload.params.n)]
        self.waiting.append(seq)

    def abort_request(self, request_id: str) -> None:
        self.running.pop(request_id, None)
        self.waiting = [s for s in self.waiting if s.request_id != request_id]

    def has_unfinished_requests(self) -> bool:
        return bool(self.running or self.waiting)

    def num_waiting(self) -> int:
        return len(self.waiting)

    def stats(self) -> EngineStats:
        used = sum(self._blocks(s) for s in self.running.values())
        return EngineStats(len(self.running), len(self.waiting), used / self.num_blocks, 0,
                           self.prompt_tokens, self.generation_tokens, self.num_blocks)

    def _blocks(self, seq: _Seq) -> int:
        longest = max(len(c.token_ids) for c in seq.samples)
        return -(-(len(seq.req.prompt_token_ids) + longest) // self.BLOCK) * len(seq.samples)

    def _next_token(self, seq: _Seq, sample: CompletionOutput) -> int:
        params = seq.req.params
        if self.script is not None:
            return min(ord(self.script[len(sample.token_ids)]), 127) + OFFSET
        salt = 0 if params.is_greedy else sample.index * 7 + (params.seed or 0) * 13
        return ord("a") + OFFSET + (sum(seq.req.prompt_token_ids) + 3 * len(sample.token_ids) + salt) % 26

    def step(self) -> list[RequestOutput]:
        time.sleep(self.step_delay_s)
        now = time.monotonic()
        while self.waiting and len(self.running) < self.max_running:
            seq = self.waiting.pop(0)
            self.running[seq.request_id] = seq
            self.prompt_tokens += len(seq.req.prompt_token_ids)
        outputs = []
        for rid, seq in list(self.running.items()):
            params = seq.req.params
            for c in seq.samples:
                c.new_text, c.num_new_tokens = "", 0
                if c.finish_reason is not None:
                    continue
                tok = self._next_token(seq, c)
                c.token_ids.append(tok)
                c.num_new_tokens = 1
                self.generation_tokens += 1
                if c.logprobs is not None:
                    top = {tok: -0.5, tok + 1: -1.5, tok + 2: -2.5}
                    c.logprobs.append(TokenLogprob(tok, -0.5, dict(list(top.items())[:params.logprobs])))
                full = self.tokenizer.decode(c.token_ids)
                hit = next((s for s in params.stop if s in full), None)
                if hit is not None:
                    full = full[: full.index(hit)]
                    c.finish_reason, c.stop_reason = "stop", hit
                elif params.max_tokens is not None and len(c.token_ids) >= params.max_tokens:
                    c.finish_reason = "length"
                elif self.script is not None and len(c.token_ids) == len(self.script):
                    c.finish_reason = "stop"
                c.new_text = full[len(c.text):]
                c.text = full
            if seq.first_token_time is None:
                seq.first_token_time = now
            finished = all(c.finish_reason is not None for c in seq.samples)
            outputs.append(RequestOutput(
                rid, list(seq.req.prompt_token_ids),
                [CompletionOutput(c.index, c.text, list(c.token_ids), list(c.logprobs) if c.logprobs is not None
                                  else None, c.finish_reason, c.stop_reason, c.new_text, c.num_new_tokens)
                 for c in seq.samples],
                finished=finished, arrival_time=seq.arrival, first_scheduled_time=seq.arrival,
                first_token_time=seq.first_token_time, finished_time=now if finished else None))
            if finished:
                del self.running[rid]
        return outputs


# a Hermes-format answer (text, then two calls) and a thinking answer, for scripted fake engines
HERMES = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
          '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
THINK = "<think>\nhmm, hi.\n</think>\n\nHello!"


def greedy_text(prompt: str, n: int) -> str:
    """What FakeEngine generates greedily after a rendered chat prompt (its rule, restated)."""
    ids = FakeTokenizer().encode(prompt, add_special_tokens=False)
    return "".join(chr(ord("a") + (sum(ids) + 3 * k) % 26) for k in range(n))


@contextmanager
def scripted(script: str, **settings: Any) -> Iterator[str]:
    """A live server whose fake engine always writes `script`, under these ServerSettings."""
    with serve({"fake": FakeEngine(max_model_len=400, script=script)},
               ServerSettings(port=free_port(), shutdown_timeout_s=2.0, **settings)) as url:
        yield url


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def subprocess_server(args: list[str], port: int, log: Path, env: dict[str, str] | None = None,
                      timeout: float = 60) -> Iterator[tuple[str, subprocess.Popen]]:
    """`python *args` from the repo root, its output to `log` (a file, so a chatty server never
    blocks on a full pipe); yields (base URL, process) once GET /health answers, and stops it after."""
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env or dict(os.environ),
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5):
                    break
            except OSError:  # refused while starting; HTTPError (e.g. 503) is an OSError too
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server {args} did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.3)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextmanager
def serve(engines: dict[str, Any], settings: ServerSettings | None = None,
          max_waiting: int = 64) -> Iterator[str]:
    """Run the real app under uvicorn on a free port in a thread; yield its base URL."""
    port = free_port()
    settings = settings or ServerSettings(port=port, shutdown_timeout_s=2.0)
    async_engine = AsyncEngine(engines, max_waiting=max_waiting)
    app = create_app(async_engine, engines, settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=3))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text format (labels must match exactly the given ones)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, label_str = head.partition("{")
        if metric != name:
            continue
        got = dict(kv.split("=", 1) for kv in label_str.rstrip("}").split(",") if kv) if label_str else {}
        got = {k: v.strip('"') for k, v in got.items()}
        if all(got.get(k) == v for k, v in labels.items()):
            return float(value)
    return None


def leave_stream_early(url: str, body: dict, engine: Any, lines: int = 3) -> None:
    """Read a few lines of a streamed answer, check the request holds KV blocks, hang up, then
    wait (at most 10 s) until the server has aborted it and freed them."""
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", url, json=body) as r:
            it = r.iter_lines()
            for _ in range(lines):
                next(it)
            assert engine.stats().kv_cache_usage > 0
    deadline = time.monotonic() + 10
    while engine.stats().kv_cache_usage > 0 and time.monotonic() < deadline:
        time.sleep(0.01)



def named_events(url: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """POST a streamed request and read its named SSE events (OpenAI's Responses API, Anthropic's
    Messages API): each block's `event:` line must name its data's `type`; the data, in order."""
    events = []
    with httpx.stream("POST", url, json=body, timeout=30) as r:
        assert r.status_code == 200, r.read()
        for block in r.read().decode().split("\n\n"):
            if block.strip():
                name, data = block.split("\n")
                event = json.loads(data.removeprefix("data: "))
                assert name == f"event: {event['type']}"
                events.append(event)
    return events


@contextmanager
def queue_full(url: str, slow: FakeEngine, path: str, body: dict[str, Any], stream_path: str | None = None,
               stream_body: dict[str, Any] | None = None) -> Iterator[None]:
    """Inside the block the waiting queue of a server started with max_waiting=1 is full: one request
    runs (streamed from `stream_path`, held open; `slow` runs one at a time) and a second to `path`
    waits; both end after the block."""
    with httpx.Client(timeout=30) as http:
        first = stream_body or {**body, "stream": True}
        with http.stream("POST", f"{url}{stream_path or path}", json=first) as running:
            assert running.status_code == 200
            lines = running.iter_lines()  # keep the iterator: dropping it closes the connection
            assert '"error"' not in next(lines)  # the first request runs
            second = threading.Thread(target=lambda: httpx.post(f"{url}{path}", json=body, timeout=30))
            second.start()
            deadline = time.monotonic() + 5
            while slow.num_waiting() < 1 and time.monotonic() < deadline:
                time.sleep(0.005)
            assert slow.num_waiting() == 1  # the second waits, filling the queue
            yield
    second.join(timeout=30)

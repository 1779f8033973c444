#!/usr/bin/env bash
# End-to-end check of the Dockerfile on a machine with no registry access for images:
#   1. starts its own Docker daemon (no bridge, no iptables; data, sockets and pidfile in a temp dir),
#   2. makes a Debian bookworm base image with debootstrap (mirror read from this machine's apt
#      sources, CA bundle copied in) and imports it,
#   3. builds the Dockerfile with this machine's pip configuration (local wheel folders and file://
#      indexes are served read-only on 127.0.0.1 for the build),
#   4. runs the image on a free port, waits for /health and the Docker HEALTHCHECK, sends a chat
#      completion and checks the answer, then stops the container and the daemon.
# Needs root. Slow (5-8 minutes): not part of scripts/test.sh; .ci/run runs it after the suite.
# Exit 75 (EX_TEMPFAIL) when this machine cannot host the check (not root, no apt, dockerd will not
# start, no Debian mirror): .ci/run reports that and goes on; any other non-zero exit is a failure
# of the image itself (build, start, health, answers).
# Env: KVSERVE_CHECK_MODELS (default smollm2; comma-separated, passed as KVSERVE_MODEL; with minilm
#      an embeddings request is checked too),
#      KVSERVE_CHECK_BASE_CACHE (default ~/.cache/kvserve/docker-base-bookworm.tar: the base rootfs is
#      reused across runs; delete it to rebuild).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
MODELS=${KVSERVE_CHECK_MODELS:-smollm2}
BASE_TAR=${KVSERVE_CHECK_BASE_CACHE:-$HOME/.cache/kvserve/docker-base-bookworm.tar}
BASE_IMAGE=kvserve-base:bookworm
IMAGE=kvserve:check
START=$(date +%s)
say() { echo "[docker_check +$(( $(date +%s) - START ))s] $*"; }

ENV_UNAVAILABLE=75
[[ $(id -u) == 0 ]] || { echo "docker_check.sh needs root (dockerd, debootstrap)" >&2; exit $ENV_UNAVAILABLE; }
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if ((${#missing[@]})); then
  say "installing ${missing[*]}"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; } ||
    { echo "could not install ${missing[*]}" >&2; exit $ENV_UNAVAILABLE; }
fi

# Short path: the daemon's unix sockets live under it (108-byte limit).
WORK=$(mktemp -d /tmp/kvd.XXXXXX)
export DOCKER_HOST=unix://$WORK/docker.sock
CONTAINER=kvserve-check-$$
HTTP_PID=""
cleanup() {
  local rc=$?
  set +e
  if [[ -S $WORK/docker.sock ]]; then
    docker logs --tail 30 "$CONTAINER" >"$WORK/container.log" 2>&1 && { ((rc == 0)) || cat "$WORK/container.log"; }
    docker rm -f "$CONTAINER" >/dev/null 2>&1
  fi
  [[ -n $HTTP_PID ]] && kill "$HTTP_PID" 2>/dev/null
  if [[ -f $WORK/dockerd.pid ]]; then
    local pid
    pid=$(cat "$WORK/dockerd.pid")
    kill "$pid" 2>/dev/null
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  fi
  ((rc == 0)) || { echo "--- dockerd log tail"; tail -n 20 "$WORK/dockerd.log" 2>/dev/null; }
  # the daemon unmounts its layers on exit; anything left mounted is unmounted before deleting
  grep -o " $WORK[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null
  rm -rf "$WORK"
  say "done (exit $rc)"
  exit "$rc"
}
trap cleanup EXIT INT TERM

say "starting dockerd in $WORK"
dockerd --data-root "$WORK/data" --exec-root "$WORK/exec" -p "$WORK/dockerd.pid" -H "$DOCKER_HOST" \
  --bridge=none --iptables=false --ip6tables=false >"$WORK/dockerd.log" 2>&1 &
for _ in $(seq 120); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
docker info >/dev/null || { echo "dockerd did not start" >&2; exit $ENV_UNAVAILABLE; }

# --- base image: debootstrap'd bookworm with python3 + venv, this machine's CA bundle ---------------
if [[ ! -s $BASE_TAR ]]; then
  # the first bookworm (non-security) mirror in this machine's apt sources, deb822 or one-line format
  MIRROR=$(python3 - <<'EOF'
import glob, re
files = ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list")) \
    + sorted(glob.glob("/etc/apt/sources.list.d/*.sources"))
for path in files:
    try:
        text = open(path, encoding="utf-8").read()
    except OSError:
        continue
    if path.endswith(".sources"):
        for stanza in re.split(r"\n\s*\n", text):
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.+)$", stanza, re.M))
            if "bookworm" in fields.get("Suites", "").split() and "deb" in fields.get("Types", "").split():
                print(fields["URIs"].split()[0]); raise SystemExit
    else:
        for line in text.splitlines():
            m = re.match(r"\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+bookworm\s", line)
            if m:
                print(m.group(1)); raise SystemExit
raise SystemExit("no bookworm mirror in the apt sources")
EOF
) || exit $ENV_UNAVAILABLE
  say "debootstrap bookworm from $MIRROR"
  ROOTFS=$WORK/rootfs
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$ROOTFS" "$MIRROR" \
    >"$WORK/debootstrap.log" 2>&1 || { tail -n 30 "$WORK/debootstrap.log"; exit $ENV_UNAVAILABLE; }
  # this machine's CA bundle: pip inside the build then trusts what pip here trusts
  cp /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/ssl/certs/ca-certificates.crt"
  rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
  mkdir -p "$(dirname "$BASE_TAR")"
  tar -C "$ROOTFS" -cf "$BASE_TAR.tmp" . && mv "$BASE_TAR.tmp" "$BASE_TAR"
  rm -rf "$ROOTFS"
else
  say "reusing base rootfs $BASE_TAR"
fi
docker import "$BASE_TAR" "$BASE_IMAGE" >/dev/null

# --- this machine's pip configuration as build args --------------------------------------------------
# Local folders and file:// indexes are symlinked under $WORK/www and served on 127.0.0.1 (the build
# runs with --network host); remote indexes are passed unchanged.
mkdir -p "$WORK/www"
HTTP_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mapfile -t PIP_ARGS < <(python3 - "$WORK/www" "$HTTP_PORT" <<'EOF'
import os, re, subprocess, sys
from pathlib import Path
from urllib.parse import urlparse

www, port = Path(sys.argv[1]), sys.argv[2]
out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
rank = {"global": 0, "user": 1, "site": 2, ":env:": 3}  # pip: later scopes override earlier ones
best: dict[str, tuple[int, str]] = {}
for line in out.splitlines():
    m = re.match(r"^(:env:|[\w-]+)\.([\w-]+)='(.*)'$", line)
    if m and rank.get(m.group(1), 0) >= best.get(m.group(2), (-1, ""))[0]:
        best[m.group(2)] = (rank.get(m.group(1), 0), m.group(3))
served: dict[str, str] = {}

def serve(folder: str, tail: str = "") -> str:
    if folder not in served:
        link = www / str(len(served))
        link.symlink_to(folder)
        served[folder] = f"http://127.0.0.1:{port}/{link.name}"
    return served[folder] + tail

def local(value: str, is_index: bool) -> str:
    path = urlparse(value).path if value.startswith("file://") else value
    if "://" in value and not value.startswith("file://"):
        return value
    path = os.path.normpath(path)
    if not os.path.isdir(path):
        return ""  # a local path that does not exist here would not exist in the build either
    if is_index:  # serve the index's parent: simple/<pkg>/ pages link to ../../files/
        return serve(os.path.dirname(path), "/" + os.path.basename(path) + "/")
    return serve(path, "/")

for key, env, is_index in (("index-url", "PIP_INDEX_URL", True), ("extra-index-url", "PIP_EXTRA_INDEX_URL", True),
                           ("find-links", "PIP_FIND_LINKS", False), ("trusted-host", "PIP_TRUSTED_HOST", None)):
    if key in best:
        values = best[key][1].split()
        mapped = values if is_index is None else [v for v in (local(v, is_index) for v in values) if v]
        if mapped:
            print(f"--build-arg={env}={' '.join(mapped)}")
print("--build-arg=PIP_CERT=/etc/ssl/certs/ca-certificates.crt")  # the bundle copied into the base
EOF
)
python3 -m http.server --bind 127.0.0.1 --directory "$WORK/www" "$HTTP_PORT" >"$WORK/http.log" 2>&1 &
HTTP_PID=$!
say "pip build args: ${PIP_ARGS[*]}"

# --- build --------------------------------------------------------------------------------------------
say "building $IMAGE"
DOCKER_BUILDKIT=0 docker build --network host --build-arg "BASE_IMAGE=$BASE_IMAGE" "${PIP_ARGS[@]}" \
  -t "$IMAGE" "$REPO" >"$WORK/build.log" 2>&1 || { tail -n 40 "$WORK/build.log"; exit 1; }
say "built: $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"

# --- run and check ------------------------------------------------------------------------------------
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
docker run -d --name "$CONTAINER" --network host -e "KVSERVE_PORT=$PORT" -e "KVSERVE_MODEL=$MODELS" "$IMAGE" >/dev/null
say "container up, serving $MODELS on :$PORT"
python3 - "$PORT" "$CONTAINER" <<'EOF'
import json, subprocess, sys, time, urllib.error, urllib.request

port, container = sys.argv[1], sys.argv[2]
base = f"http://127.0.0.1:{port}"

def inspect(fmt: str) -> str:
    return subprocess.run(["docker", "inspect", "-f", fmt, container], capture_output=True, text=True).stdout.strip()

t0 = time.monotonic()
while True:
    try:
        urllib.request.urlopen(base + "/health", timeout=2)
        break
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        if inspect("{{.State.Running}}") != "true":
            sys.exit("container exited before /health answered")
        if time.monotonic() - t0 > 180:
            sys.exit("/health did not answer within 180 s")
        time.sleep(1)
print(f"/health OK after {time.monotonic() - t0:.1f} s")
models = [m["id"] for m in json.load(urllib.request.urlopen(base + "/v1/models"))["data"]]
print("models:", models)
body = {"model": "smollm2", "temperature": 0, "max_tokens": 24,
        "messages": [{"role": "user", "content": "What is the capital of France?"}]}
req = urllib.request.Request(base + "/v1/chat/completions", json.dumps(body).encode(),
                             {"content-type": "application/json"})
reply = json.load(urllib.request.urlopen(req, timeout=120))
text = reply["choices"][0]["message"]["content"]
print("chat:", repr(text), reply["usage"])
assert reply["choices"][0]["message"]["role"] == "assistant"
assert 0 < reply["usage"]["completion_tokens"] <= 24, reply["usage"]
assert "Paris" in text, f"expected the greedy answer to name Paris, got {text!r}"
if "minilm" in models:
    req = urllib.request.Request(base + "/v1/embeddings", json.dumps(
        {"model": "minilm", "input": ["a cat sat on the mat", "stock markets fell today"]}).encode(),
        {"content-type": "application/json"})
    data = json.load(urllib.request.urlopen(req, timeout=60))["data"]
    dims = [len(d["embedding"]) for d in data]
    assert dims == [384, 384], dims  # all-MiniLM-L6-v2
    print("embeddings:", dims)
uid = subprocess.run(["docker", "exec", container, "id", "-u"], capture_output=True, text=True).stdout.strip()
assert uid not in ("", "0"), f"container runs as uid {uid!r}"
print("container uid:", uid)
while (health := inspect("{{.State.Health.Status}}")) != "healthy":
    assert health in ("starting", ""), f"HEALTHCHECK status {health!r}"
    assert time.monotonic() - t0 < 300, "HEALTHCHECK not healthy within 300 s"
    time.sleep(2)
print("HEALTHCHECK: healthy")
EOF
say "docker check passed"

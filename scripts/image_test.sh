#!/usr/bin/env bash
# `make image-test`: build the gradserve image with podman and run it for real, on a machine without Docker.
# Installs podman when missing, keeps podman's state outside the repo, builds a debian:bookworm-slim base
# with debootstrap when missing, builds the image, runs it as the Deployment does (read-only root, no
# capabilities) with --init and published loopback ports, waits for its health check, checks a gRPC and a
# REST prediction from the host and the batch Job's command inside, stops it (SIGTERM must exit 0), and
# removes the container whatever happens. Prints the time of each phase.
#
#   scripts/image_test.sh [--mount] [--build-only]
#     --mount       build without an archive and mount model_store/ at /app/model_store (default: bake it in)
#     --build-only  stop after building the image
#   env: GRADSERVE_PODMAN_DIR (podman state, default /var/tmp/gradserve-podman), IMAGE (default
#        localhost/gradserve:test), MODEL (default digits), READY_TIMEOUT (seconds, default 300)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
STATE=${GRADSERVE_PODMAN_DIR:-/var/tmp/gradserve-podman}
IMAGE=${IMAGE:-localhost/gradserve:test}
MODEL=${MODEL:-digits}
READY_TIMEOUT=${READY_TIMEOUT:-300}
# The image listens on 0.0.0.0, which the front door refuses without authentication: a token for this run.
TOKEN=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
BASE=docker.io/library/debian:bookworm-slim
NAME=gradserve-image-test-$$
MOUNT=0
BUILD_ONLY=0
for arg in "$@"; do
    case $arg in
        --mount) MOUNT=1 ;;
        --build-only) BUILD_ONLY=1 ;;
        *) echo "usage: $0 [--mount] [--build-only]" >&2; exit 2 ;;
    esac
done
PY=$ROOT/.venv/bin/python
[ -x "$PY" ] || { echo "no $PY: run 'make bootstrap' first" >&2; exit 1; }
ARCHIVE=$ROOT/model_store/$MODEL.mar
if [ ! -f "$ARCHIVE" ] && [ "$BUILD_ONLY" -eq 0 ]; then
    echo "no $ARCHIVE: build it with 'gradserve train' and 'gradserve package' (or 'make run') first" >&2
    exit 1
fi

TIMINGS=()
PHASE=""
PHASE_START=0
phase() {  # phase NAME: close the running phase (recording its time) and start the next one
    local now
    now=$(date +%s.%N)
    [ -n "$PHASE" ] && TIMINGS+=("$(awk -v p="$PHASE" -v a="$PHASE_START" -v b="$now" \
        'BEGIN { printf "%-12s %7.1f s", p, b - a }')")
    PHASE=$1
    PHASE_START=$now
    [ -n "$PHASE" ] && echo "== $PHASE" >&2
    return 0
}
quiet() {  # podman without systemd logs that it cannot add timers for the HEALTHCHECK; we run it by hand
    "$@" 2> >(grep -v 'unable to get systemd connection' >&2)
}
finish() {
    local rc=$?
    phase ""
    if podman container exists "$NAME" 2>/dev/null; then
        [ "$rc" -ne 0 ] && { echo "-- container log (tail)" >&2; podman logs --tail 60 "$NAME" >&2 || true; }
        quiet podman rm -f -t 5 "$NAME" >/dev/null || true
    fi
    echo "== timings" >&2
    printf '  %s\n' "${TIMINGS[@]}" >&2
    [ "$rc" -eq 0 ] && echo "image-test: OK" >&2 || echo "image-test: FAILED ($rc)" >&2
}
trap finish EXIT

phase tools
missing=()
for tool in podman buildah runc debootstrap curl; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q podman buildah runc debootstrap curl
fi

phase state
# Podman's state and configuration live in $STATE (shared/CONTAINERS.md): runc (crun refuses this host's
# cgroups), ulimits within the host's hard limits, and the host's CA bundle for pip inside builds (these
# machines intercept HTTPS; elsewhere the bundle is harmless).
mkdir -p "$STATE/tmp" "$STATE/wheels"
cat > "$STATE/storage.conf" <<EOF
[storage]
driver = "overlay"
runroot = "$STATE/run"
graphroot = "$STATE/storage"
EOF
CA=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
volumes=""
if [ -f "$CA" ]; then
    printf '[global]\ncert = /etc/pip-ca.crt\n' > "$STATE/pip.conf"
    volumes="volumes = [\"$CA:/etc/pip-ca.crt:ro\", \"$STATE/pip.conf:/etc/pip.conf:ro\"]"
fi
cat > "$STATE/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
$volumes

[engine]
runtime = "runc"
EOF
export CONTAINERS_STORAGE_CONF=$STATE/storage.conf CONTAINERS_CONF=$STATE/containers.conf TMPDIR=$STATE/tmp

phase base-image
if ! podman image exists "$BASE"; then
    # No registry can be reached: debootstrap the base from the host's Debian mirror.
    mirror=$(sed -n 's/^URIs: *\(http[^ ]*\/debian\)$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
    mirror=${mirror:-http://deb.debian.org/debian}
    rootfs=$STATE/rootfs
    rm -rf "$rootfs"
    debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$STATE/debootstrap.log" 2>&1 \
        || { tail -20 "$STATE/debootstrap.log" >&2; exit 1; }
    rm -f "$rootfs/etc/apt/sources.list"
    cat > "$rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${mirror}-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb
    tar --numeric-owner -C "$rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - localhost/debian:bookworm >/dev/null
    podman tag localhost/debian:bookworm "$BASE"
    rm -rf "$rootfs"
fi

phase wheels
# The CPU-only torch wheel when this machine has one on disk (the index only has the CUDA build for Linux).
torch_version=$(sed -n 's/^torch==//p' "$ROOT/constraints.txt")
if ! ls "$STATE/wheels/torch-$torch_version"*.whl >/dev/null 2>&1; then
    "$PY" -m pip download -q --no-index --no-deps -d "$STATE/wheels" "torch==$torch_version" 2>/dev/null \
        || echo "no local torch $torch_version wheel: the image installs torch from the index" >&2
fi

phase build
build_args=()
[ "$MOUNT" -eq 1 ] || [ ! -f "$ARCHIVE" ] || build_args+=(--build-arg "MODEL_ARCHIVE=$MODEL.mar")
podman build --format docker --layers -t "$IMAGE" --build-context "torch-wheels=$STATE/wheels" \
    "${build_args[@]}" "$ROOT"
echo "image $IMAGE: $(podman image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1/1e9}')" >&2
[ "$BUILD_ONLY" -eq 1 ] && exit 0

phase start
read -r grpc_port http_port < <("$PY" -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')
# Locked down as deploy/deployment.yaml runs it: read-only root (tmpfs /tmp and /app/logs), no capabilities.
run_args=(--init -d --name "$NAME" -e "GRADSERVE_TOKEN=$TOKEN" -p "127.0.0.1:$grpc_port:8001" -p "127.0.0.1:$http_port:8000"
          --read-only --tmpfs "/app/logs:rw,U" --cap-drop ALL --security-opt no-new-privileges)
[ "$MOUNT" -eq 1 ] && run_args+=(-v "$ROOT/model_store:/app/model_store:ro")
quiet podman run "${run_args[@]}" "$IMAGE" >/dev/null
echo "container $NAME: gRPC 127.0.0.1:$grpc_port, HTTP 127.0.0.1:$http_port" >&2

phase ready
deadline=$((SECONDS + READY_TIMEOUT))
# The image's own HEALTHCHECK (gRPC health service) must pass, and REST readiness from the host.
until podman healthcheck run "$NAME" >/dev/null 2>&1 \
        && curl -fsS -o /dev/null "http://127.0.0.1:$http_port/v2/health/ready"; do
    [ "$(podman inspect -f '{{.State.Running}}' "$NAME")" = true ] || { echo "container exited" >&2; exit 1; }
    [ $SECONDS -lt $deadline ] || { echo "not ready after ${READY_TIMEOUT}s" >&2; exit 1; }
    sleep 2
done

phase predict
"$PY" "$ROOT/scripts/image_check.py" predict --grpc "127.0.0.1:$grpc_port" --http "http://127.0.0.1:$http_port" \
    --model "$MODEL" --token "$TOKEN"
# Inside, only the front door listens beyond loopback (TorchServe stays on 127.0.0.1).
podman exec "$NAME" cat /proc/net/tcp /proc/net/tcp6 | "$PY" "$ROOT/scripts/image_check.py" listeners

phase batch
# The Indexed Job's command (deploy/batch/job.yaml) in the image: two shards at once, merged, must equal one
# unsharded run.
podman exec -i -e MODEL="$MODEL" "$NAME" bash -s <<'EOF'
set -euo pipefail
cd /tmp && mkdir -p parts
python -c 'import numpy as np; from sklearn.datasets import load_digits
np.save("input.npy", (load_digits().images / 16).astype(np.float32)[:, None])'
job() { gradserve batch --model "$MODEL" --grpc 127.0.0.1:8001 --input input.npy --no-progress "$@" >/dev/null; }
job --output parts/part-0.jsonl --shard 0/2 & shard0=$!
job --output parts/part-1.jsonl --shard 1/2 & shard1=$!
wait "$shard0" && wait "$shard1"
gradserve batch merge parts/part-1.jsonl parts/part-0.jsonl --output merged.jsonl
job --output whole.jsonl
cmp merged.jsonl whole.jsonl
echo "batch: 2 shards merged = 1 unsharded run ($(wc -l < whole.jsonl) rows)"
EOF

phase stop
quiet podman stop -t 30 "$NAME" >/dev/null
code=$(podman inspect -f '{{.State.ExitCode}}' "$NAME")
echo "exit code after SIGTERM: $code" >&2
[ "$code" -eq 0 ]

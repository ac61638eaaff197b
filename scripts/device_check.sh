#!/usr/bin/env bash
# The GPU machine's check of issue 14, in one call of at most ~9 minutes: a bare machine with one GPU, 16 cores,
# CPython 3.12 with torch, and no package registry. Build .device/ here first (scripts/device_bundle.sh), then
# run this from the repository root there, carrying .device and server/generated:
#     scripts/device_check.sh OUT_DIR
# Phases, most wanted first, each cut off before the budget (BUDGET_S, default 540 s) runs out (PHASES="setup
# package cuda" runs those alone):
#   setup     the carried wheels, TorchServe's worker and frontend into the image's Python; a JRE
#   package   the three models' archives (forward_rows measured on this machine's CPU)
#   doors     bench.frontdoor_ab on the demo, CPU only, four workers: one front-door process against four
#             (listen.processes; the REST load generator is light enough to outrun one)
#   cuda      bench.cuda_check: the handler on the GPU against the CPU (agreement, batch independence, rows/s)
#   gpu       bench.frontdoor_ab on ResNet: TorchServe workers on the CPU (one per core) against one on the GPU
#   workers   bench.frontdoor_ab on ResNet, CPU only: one worker of every core against one worker per core
#   train     gradserve train of the demo on the GPU and on the CPU; torchrun with NCCL
#   demo      bench.frontdoor_ab on the demo, CPU only: one worker against four (a front door bound model)
#   gpuworkers  bench.frontdoor_ab on ResNet, on the GPU: one worker against four
# Writes OUT_DIR/device.log (everything), one JSON per phase that measures, and logs.tar.gz (TorchServe's logs).
set -u
OUT=${1:?usage: scripts/device_check.sh OUT_DIR}
BUDGET_S=${BUDGET_S:-540}
SECONDS_PER_WINDOW=${SECONDS_PER_WINDOW:-1.5}
PHASES=${PHASES:-setup package cuda gpu workers train demo gpuworkers}  # a rerun may name fewer
B=.device
START=$(date +%s)
mkdir -p "$OUT"
exec > >(tee -a "$OUT/device.log") 2>&1

log() { echo "[$(( $(date +%s) - START ))s] $*"; }
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
# phase NAME SECONDS COMMAND...: run it with at most SECONDS (less if the budget is shorter), skip it if under 30 s
phase() {
    local name=$1 want=$2 limit
    shift 2
    [[ " $PHASES " == *" $name "* ]] || return 0
    limit=$(( $(left) < want ? $(left) : want ))
    if (( limit < 30 )); then log "$name: skipped, ${limit}s of the budget left"; return 0; fi
    log "$name: start (at most ${limit}s)"
    PYTHONUNBUFFERED=1 timeout -k 5 "$limit" "$@"
    log "$name: exit $?"
}

log "machine: $(nproc) cores, $(python3 -V 2>&1), $(nvidia-smi -L 2>&1 | head -1)"
python3 -c 'import torch, numpy; print("torch", torch.__version__, "cuda", torch.version.cuda, "numpy", numpy.__version__)'

PY=$(python3 -c 'import sys; print(sys.executable)')  # the image's Python, the one with torch
BIN=$(dirname "$PY")  # where bench and the front door look for the gradserve and torchserve commands
setup() {  # into the image's own environment (a throwaway machine): TorchServe's workers and `package`'s
    # clean-interpreter check (python -I) see what the image's Python sees, and this repository through a .pth
    local site
    site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    "$PY" -m pip install -q --no-index --no-deps --no-compile "$B"/whl/*.whl || return 1
    cp -r "$B"/ts/* "$site/" && xz -dc "$B/model-server.jar.xz" > "$site/ts/frontend/model-server.jar" || return 1
    echo "$PWD" > "$site/gradserve-repo.pth"
    printf '#!%s\nimport sys\nfrom ts.model_server import start\nsys.exit(start())\n' "$PY" > "$BIN/torchserve"
    printf '#!%s\nimport sys\nfrom gradserve.cli import main\nsys.exit(main())\n' "$PY" > "$BIN/gradserve"
    chmod +x "$BIN/torchserve" "$BIN/gradserve"
    if ! command -v java > /dev/null; then tar xJf "$B/jre.tar.xz" -C /tmp && echo "java: the carried JRE"; fi
    cp -r "$B"/runs/. .  # runs/digits, examples/images/runs/digits-rgb, examples/resnet/runs/resnet
    # the runs name their model code by the absolute folder they were trained in
    [ -e /work/main ] || { mkdir -p /work && ln -s "$PWD" /work/main; }
}
phase setup 90 bash -c "$(declare -f setup); B=$B PY=$PY BIN=$BIN setup" || true
command -v java > /dev/null || export JAVA_HOME=/tmp/jre
export PATH=$BIN:$PATH
$PY -c 'import grpc, fastapi, simdjson, ts, model_archiver; print("imports ok, grpc", grpc.__version__)'
"${JAVA_HOME:+$JAVA_HOME/bin/}java" -version 2>&1 | head -1; df -h /dev/shm | tail -1

STORE=/tmp/device-store
package() {  # archives packaged here: forward_rows measured on this machine's CPU
    gradserve package --run runs/digits --model-store $STORE --force \
    && gradserve package --config examples/images/gradserve.yaml --run examples/images/runs/digits-rgb \
        --model-store $STORE --force \
    && gradserve package --config examples/resnet/gradserve.yaml --run examples/resnet/runs/resnet \
        --model-store $STORE --force
}
phase package 90 bash -c "$(declare -f package); STORE=$STORE package"
AB=(-m bench.frontdoor_ab --rounds 1 --seconds "$SECONDS_PER_WINDOW" --ways grpc,rest)
FOUR=(torchserve.gpus=0 package.min_workers=4 package.max_workers=4)
phase doors 90 $PY "${AB[@]}" --model digits --out "$OUT/ab-digits-doors.json" \
    --a "${FOUR[@]}" --b "${FOUR[@]}" listen.processes=4
phase cuda 120 $PY -m bench.cuda_check --seconds 0.4 --out "$OUT/cuda_check.json" \
    --archive $STORE/digits.mar --archive $STORE/digits-rgb.mar --archive $STORE/resnet.mar

phase gpu 110 $PY "${AB[@]}" --model resnet --loads 1x1,64x1,8x64,32x64 --out "$OUT/ab-resnet-gpu.json" \
    --a torchserve.gpus=0 --b package.min_workers=1 package.max_workers=1
phase workers 110 $PY "${AB[@]}" --model resnet --loads 1x1,64x1,8x64,32x64 --out "$OUT/ab-resnet-workers.json" \
    --a torchserve.gpus=0 package.min_workers=1 package.max_workers=1 --b torchserve.gpus=0

train() {
    local t0 t1 t2
    t0=$(date +%s)
    gradserve train --device cuda --epochs 10 --no-progress --runs-dir /tmp/train --name digits-cuda 2>&1 | tail -4
    t1=$(date +%s)
    gradserve train --device cpu --epochs 10 --no-progress --runs-dir /tmp/train --name digits-cpu 2>&1 | tail -4
    t2=$(date +%s)
    echo "train seconds (10 epochs, with start-up): cuda $((t1 - t0)), cpu $((t2 - t1))"
    $PY -m torch.distributed.run --standalone --nproc_per_node=1 -m training.cli --device cuda --epochs 2 \
        --no-progress --runs-dir /tmp/train --name digits-ddp-nccl 2>&1 | tail -3
}
phase train 100 bash -c "$(declare -f train); PY=$PY train"
phase demo 90 $PY "${AB[@]}" --model digits --out "$OUT/ab-digits-workers.json" \
    --a torchserve.gpus=0 --b torchserve.gpus=0 package.min_workers=4 package.max_workers=4

phase gpuworkers 90 $PY "${AB[@]}" --model resnet --loads 64x1,8x64,32x64 --out "$OUT/ab-resnet-gpu-workers.json" \
    --a package.min_workers=1 package.max_workers=1 --b package.min_workers=4 package.max_workers=4

tar czf "$OUT/logs.tar.gz" logs /tmp/train/*/summary.json 2>/dev/null
log "done; $(left)s of the budget left"

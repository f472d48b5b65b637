#!/usr/bin/env bash
# What a session with GPU time runs first, in one device call on a two-GPU host (about 8 of the
# call's 10 minutes): build kvtier there, run every `gpu` test (the segment copy kernel on
# segment_plan.h, the background GPU_UNPIN and kvtier.upload's deadline were not GPU-run when
# they landed), then the pending GPU figures: bench_p2p_gpu's TTFT of a peer prefix against a
# one-step recompute (docs/p2p.md), the IPC and same-host share benches, and diag_hit's profile
# of a half-prefix hit (the simulator's largest miss, docs/sim.md).
#
#   device (carry .device):  KVTIER_BENCH_COMMIT=<hash> bash scripts/gpu_check.sh "$OUT"
#
# .device/ must hold the liburing debs (cp ../shared/device/debs/*.deb .device/). Each step runs
# to its own time limit and reports; a failing step does not stop the later ones.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-bench/results}")
mkdir -p "$OUT"
for f in .device/*.deb; do dpkg -x "$f" /; done
python3 -m pip install --no-build-isolation --no-deps -q --config-settings=build-dir=build/gpu -e . \
  || { echo "BUILD FAILED"; exit 1; }
nvidia-smi -L
step() { echo "== $*"; timeout "$1" "${@:2}" 2>&1 | tail -25; echo "== exit ${PIPESTATUS[0]}"; }
step 300 python3 -m pytest -q -m gpu tests/test_p2p_share.py tests/test_p2p_gpu.py
step 400 python3 -m pytest -q -m gpu tests/ --ignore=tests/test_p2p_share.py --ignore=tests/test_p2p_gpu.py
step 300 python3 bench/bench_p2p_share.py --mechanism cuda --reps 9 --out "$OUT"
step 300 python3 bench/bench_p2p_gpu.py --workloads ipc,ttft --out "$OUT"
step 200 python3 scripts/diag_hit.py 32768 vllm auto half

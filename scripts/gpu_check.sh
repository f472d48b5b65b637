#!/usr/bin/env bash
# What a session with GPU time runs first, in one device call on a two-GPU host (about 8 of the
# call's 10 minutes):
# build kvtier there, run every `gpu` test, then the benches whose GPU figures are pending:
# CUDA IPC with 'push' from a mapping opened on the sources' GPU (docs/p2p.md), same-host sharing
# through CUDA IPC, scripts/diag_hit.py and bench_e2e on GPU 0 (the reference engine's changes of
# 14d32bc, a96859b and 078d414, and the CPU hit's time line: docs/architecture.md "Layer-wise
# loading"). A second call: bench_e2e --max-writebacks 4 (docs/policies.md, the split).
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
step 300 python3 bench/bench_p2p_gpu.py --workloads ipc --out "$OUT"
step 150 python3 scripts/diag_hit.py 32768
(cd bench && step 330 python3 bench_e2e.py --out "$OUT")

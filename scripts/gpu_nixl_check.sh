#!/usr/bin/env bash
# NIXL on the GPU machine, one device call (about 4 minutes): which UCX transports NIXL's GPU
# reads take with the UCX error mode "none" (the default "peer" gave tcp/lo emulation for every
# GPU read on an H100 host, docs/nixl.md), the gpu NIXL test, and the CPU-pool NIXL bench on that
# host (UCX_TLS must name cuda_copy on a GPU machine).
#
#   here:   mkdir -p .device && cp ../shared/device/debs/*.deb .device/ && bash scripts/strip_nixl_site.sh
#   device (carry .device):  bash scripts/gpu_nixl_check.sh "$OUT"
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-bench/results}")
mkdir -p "$OUT"
for f in .device/*.deb; do dpkg -x "$f" /; done
python3 -m pip install --no-build-isolation --no-deps -q --config-settings=build-dir=build/gpu -e . \
  || { echo "BUILD FAILED"; exit 1; }
export PYTHONPATH=$PWD/.device/nixl-site
gpu_bench() {  # name, args...
  d=$OUT/$1
  shift
  mkdir -p "$d"
  UCX_PROTO_INFO=y timeout 90 python3 bench/bench_p2p_nixl_gpu.py --reps 5 --out "$d" "$@" >"$d/stdout" 2>"$d/stderr"
  echo "rc=$?"
  grep -E '"case"|"value"|"baseline_value"' "$d/stdout" | tr -d ' \n'
  echo
  grep -E "remote memory read|\| 0\.\.inf" "$d/stderr" | sed 's/.*\] *//' | sort | uniq -c | head -10
}
echo "== error mode none, UCX_TLS unset"
gpu_bench none --ucx-error-mode none
echo "== error mode none, UCX_TLS=cuda_ipc,cuda_copy,tcp"
UCX_TLS=cuda_ipc,cuda_copy,tcp gpu_bench none_cuda --ucx-error-mode none
echo "== error mode peer, UCX_TLS=cuda_ipc,cuda_copy,tcp"
UCX_TLS=cuda_ipc,cuda_copy,tcp gpu_bench peer_cuda
echo "== gpu NIXL test"
timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_p2p_nixl_gpu.py 2>&1 | tail -4
echo "== CPU-pool NIXL bench"
timeout 150 python3 bench/bench_p2p_nixl.py --tls 'tcp,cuda_copy;tcp,shm,self,cuda_copy' --reps 3 --out "$OUT" \
  2>/dev/null | grep -E '"case"|"value"|"baseline_value"' | tr -d ' \n'
echo

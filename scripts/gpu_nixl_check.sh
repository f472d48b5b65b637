#!/usr/bin/env bash
# NIXL on the GPU machine, one device call (about 3 minutes): why UCX's cuda_ipc is in no lane of a
# GPU READ by default (NVML's NVLink state and UCX's debug line about cuda_ipc GETs), the GPU bench
# with UCX's default for cuda_ipc GETs (auto) beside kvtier's (on), in both UCX error modes, the
# lanes UCX chose (UCX_PROTO_INFO), and the gpu NIXL test (docs/nixl.md, "Why no CUDA transport").
#
#   here:   mkdir -p .device && cp ../shared/device/debs/*.deb .device/ && bash scripts/strip_nixl_site.sh
#   device (carry .device):  bash scripts/gpu_nixl_check.sh "$OUT"
# Writes check.log and the benches' JSON (one per run) into the directory given.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-bench/results}")
mkdir -p "$OUT"
exec > >(tee "$OUT/check.log") 2>&1
for f in .device/*.deb; do dpkg -x "$f" /; done
python3 -m pip install --no-build-isolation --no-deps -q --config-settings=build-dir=build/gpu -e . \
  || { echo "BUILD FAILED"; exit 1; }
export PYTHONPATH=$PWD/.device/nixl-site
tmp=$(mktemp -d)

echo "== GPU and NVLink as NVML reports them"
nvidia-smi --query-gpu=name,driver_version,pci.bus_id --format=csv,noheader
nvidia-smi nvlink -s 2>&1 | head -4
nvidia-smi topo -m 2>&1 | head -3
echo "== UCX debug log, cuda transports, UCX_CUDA_IPC_ENABLE_GET_ZCOPY=auto (UCX's default)"
UCX_CUDA_IPC_ENABLE_GET_ZCOPY=auto UCX_LOG_LEVEL=debug timeout 60 python3 -c '
import torch
torch.zeros(1, device="cuda")
from kvtier.p2p.nixl_agent import NixlEndpoint
NixlEndpoint("diag").close()' >"$tmp/debug" 2>&1
echo "rc=$?"
grep -iE "nvlink|get zcopy|cuda_ipc|cuda-ipc|libuct_cuda|nvml" "$tmp/debug" | sed 's/^\[[^]]*\] *//' \
  | sort | uniq -c | sort -rn | head -15

gpu_bench() {  # name, args...
  name=$1
  shift
  echo "== $name: UCX_TLS=${UCX_TLS:-<unset>} UCX_CUDA_IPC_ENABLE_GET_ZCOPY=${UCX_CUDA_IPC_ENABLE_GET_ZCOPY:-<unset>} $*"
  UCX_PROTO_INFO=y UCX_LOG_LEVEL=info timeout 120 python3 bench/bench_p2p_nixl_gpu.py --reps 5 --out "$OUT" "$@" \
    >"$tmp/$name.stdout" 2>"$tmp/$name.stderr"
  echo "rc=$?"
  grep -E '"case"|"value"|"baseline_value"' "$tmp/$name.stdout" | tr -d ' \n'
  echo
  # The endpoints' lanes, then the protocol UCX chose for each READ (one table per memory pair).
  grep -E "intra-node cfg#|remote memory read|\| 0\.\.inf" "$tmp/$name.stderr" | sed 's/^\[[^]]*\] *//; s/^ *ucp_[a-z_]*\.c:[0-9]* *UCX *INFO *//' \
    | sort | uniq -c | head -16
  grep -E "Error|error|Traceback" "$tmp/$name.stderr" | head -5
}
UCX_CUDA_IPC_ENABLE_GET_ZCOPY=auto gpu_bench peer_ipcget_auto
gpu_bench peer
gpu_bench none --ucx-error-mode none
cp "$tmp/peer_ipcget_auto.stderr" "$tmp/peer.stderr" "$OUT/" 2>/dev/null
if ! grep -q "cuda_ipc" "$tmp/peer.stderr"; then
  echo "== cuda_ipc still in no READ: UCX's debug lines about it"
  UCX_LOG_LEVEL=debug timeout 120 python3 bench/bench_p2p_nixl_gpu.py --reps 1 >/dev/null 2>"$tmp/debug_bench"
  grep -iE "cuda_ipc|cuda-ipc|unreachable|cuIpc|nvlink" "$tmp/debug_bench" | sed 's/^\[[^]]*\] *//' \
    | sort | uniq -c | sort -rn | head -25
fi
echo "== gpu NIXL test"
timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_p2p_nixl_gpu.py 2>&1 | tail -4
rm -rf "$tmp"

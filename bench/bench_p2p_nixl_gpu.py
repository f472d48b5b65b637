"""bench_p2p_nixl_gpu: NIXL's READ between two processes on one GPU host beside the physical path,
measured in the same run: what the CUDA transports of the installed nixl wheel deliver.

Workload ``llama3_8b_4096tok_gpu``: 512 MiB (4096 tokens of Llama-3-8B-shaped KV). A holder process
keeps the bytes on the GPU and in pinned host memory, both registered with a NIXL agent (kvtier's
``NixlEndpoint``); this process reads them with one READ of the whole region into its own
registered GPU or pinned memory:

- ``nixl_read_gpu_to_gpu``: the holder's device memory -> this process's (cuda_ipc where UCX
  loads it), against ``torch_d2d_copy``: one ``copy_`` of the same bytes between two buffers
  on the same GPU in this process;
- ``nixl_read_host_to_gpu``: the holder's pinned memory -> this GPU, against ``torch_h2d_pinned``;
- ``nixl_read_gpu_to_host``: the holder's GPU -> this process's pinned memory, against
  ``torch_d2h_pinned``.

Every read is checked bit-exact once. ``UCX_TLS`` is left to the environment (unset: UCX picks),
and so is ``UCX_CUDA_IPC_ENABLE_GET_ZCOPY`` (kvtier's endpoint sets ``y`` where unset; ``auto``
gives UCX's default, which on a host without active NVLink leaves cuda_ipc out of READs);
with ``UCX_PROTO_INFO=y`` UCX prints the protocol each transfer took (cuda_ipc, cuda_copy, or a
tcp/cma fallback) on stderr.

    python bench/bench_p2p_nixl_gpu.py [--reps 5] [--out bench/results/]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_report import publish

NBYTES = 512 << 20
SEED = 7
HOLDER = """
import json, sys
import torch
from kvtier.p2p.nixl_agent import GPU, HOST, NixlEndpoint
n, seed, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
data = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
dev, host = data.cuda(), data.pin_memory()
torch.cuda.synchronize()
ep = NixlEndpoint("bench-gpu-holder", ucx_error_mode=mode)
ep.register(dev.data_ptr(), n, GPU, dev.device.index)
ep.register(host.data_ptr(), n, HOST)
print(json.dumps({"md": ep.metadata().hex(), "gpu": dev.data_ptr(), "host": host.data_ptr(),
                  "device": dev.device.index}), flush=True)
sys.stdin.readline()
"""


def median_gbps(fn, reps: int) -> tuple[float, list[float]]:
    samples = []
    for _ in range(reps):
        seconds = fn()
        samples.append(NBYTES / seconds / 1e9)
    return statistics.median(samples), [round(s, 2) for s in samples]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None, help="directory to write the JSON into")
    ap.add_argument("--ucx-error-mode", default="peer", choices=("peer", "none"), help="both agents' UCX error mode")
    args = ap.parse_args()

    import torch
    from kvtier.p2p.nixl_agent import GPU, HOST, NixlEndpoint

    if not torch.cuda.is_available():
        print("bench_p2p_nixl_gpu: needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda", 0)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "python") + os.pathsep + env.get("PYTHONPATH", "")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(NBYTES), str(SEED), args.ucx_error_mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        info = json.loads(holder.stdout.readline())
        want = torch.randint(0, 256, (NBYTES,), dtype=torch.uint8, generator=torch.Generator().manual_seed(SEED))
        dst = torch.empty(NBYTES, dtype=torch.uint8, device=dev)
        dst_host = torch.empty(NBYTES, dtype=torch.uint8).pin_memory()
        src_dev = want.to(dev)
        src_host = want.pin_memory()
        ep = NixlEndpoint("bench-gpu-puller", progress_thread=False, ucx_error_mode=args.ucx_error_mode)
        ep.register(dst.data_ptr(), NBYTES, GPU, 0)
        ep.register(dst_host.data_ptr(), NBYTES, HOST)
        peer = ep.add_peer(bytes.fromhex(info["md"]))
        # NixlEndpoint turns cuda_ipc's READs on unless the environment chose (nixl_agent.py).
        ipc_get = os.environ.get("UCX_CUDA_IPC_ENABLE_GET_ZCOPY", "<unset>")
        holder_gpu = (GPU, info["device"])

        def nixl(remote_addr, remote, local_addr, local):
            def once() -> float:
                out = ep.read(
                    peer, [(remote_addr, local_addr, NBYTES)], 120.0, local=local, remote=remote, max_post_bytes=NBYTES
                )
                assert out.ok, out.detail
                torch.cuda.synchronize()
                return out.seconds

            return once

        def torch_copy(to, frm):
            def once() -> float:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                to.copy_(frm, non_blocking=True)
                torch.cuda.synchronize()
                return time.perf_counter() - t0

            return once

        paths = {
            "gpu_to_gpu": (
                nixl(info["gpu"], holder_gpu, dst.data_ptr(), (GPU, 0)),
                torch_copy(dst, src_dev),
                "torch_d2d_copy",
                dst,
            ),
            "host_to_gpu": (
                nixl(info["host"], (HOST, 0), dst.data_ptr(), (GPU, 0)),
                torch_copy(dst, src_host),
                "torch_h2d_pinned",
                dst,
            ),
            "gpu_to_host": (
                nixl(info["gpu"], holder_gpu, dst_host.data_ptr(), (HOST, 0)),
                torch_copy(dst_host, src_dev),
                "torch_d2h_pinned",
                dst_host,
            ),
        }
        results, samples = [], {}
        for name, (read, copy, baseline, into) in paths.items():
            into.zero_()
            torch.cuda.synchronize()
            read()  # warm-up (connection, IPC handle mapping), then the bit-exact check
            assert torch.equal(into.cpu(), want), f"NIXL {name} read is not bit-exact"
            copy()
            nixl_gbps, nixl_samples = median_gbps(read, args.reps)
            base_gbps, base_samples = median_gbps(copy, args.reps)
            samples[name] = {"nixl": nixl_samples, baseline: base_samples}
            results.append(
                {
                    "case": f"nixl_read_{name}",
                    "value": round(nixl_gbps, 2),
                    "unit": "GB/s",
                    "baseline": baseline,
                    "baseline_value": round(base_gbps, 2),
                    "ratio": round(nixl_gbps / base_gbps, 3),
                    "note": f"one 512 MiB READ from another process, median of {args.reps}; "
                    f"UCX_TLS={os.environ.get('UCX_TLS', '<unset>')}, UCX_CUDA_IPC_ENABLE_GET_ZCOPY={ipc_get}, "
                    f"UCX error mode {args.ucx_error_mode}",
                }
            )
        ep.close()
    finally:
        holder.stdin.close()
        holder.wait(30)
    gpu = torch.cuda.get_device_name(0)
    tag = "h200" if "H200" in gpu else "h100" if "H100" in gpu else "gpu"
    workload = "llama3_8b_4096tok" + ("" if args.ucx_error_mode == "peer" else "_errmode_none")
    if ipc_get != "y":  # UCX's own default (auto) or the user's: cuda_ipc may not serve READs
        workload += f"_ipcget_{ipc_get}"
    machine = f"{gpu}, {os.cpu_count()} cores"
    publish("bench_p2p_nixl_gpu", workload, tag, results, args.out, machine_name=machine, samples_gbps=samples)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""NixlEndpoint with GPU memory: two processes on one GPU, one-sided NIXL READs of the other
process's device memory (UCX picks cuda_ipc / cuda_copy where its CUDA modules load) and of its
pinned host memory, bit-exact. Needs a CUDA GPU and the optional ``nixl`` package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from kvtier.p2p.nixl_agent import DONE, GPU, HOST, nixl_unavailable_reason

_REASON = nixl_unavailable_reason()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.multiproc,
    pytest.mark.skipif(_REASON is not None, reason=f"SKIPPED (needs nixl): {_REASON}"),
]

PYTHON_DIR = str(Path(__file__).resolve().parents[1] / "python")
SEED = 23
BLOCK = 4 << 20
BLOCKS = 16

# The holder: the same seeded bytes on the GPU and in pinned host memory, both registered; prints
# its metadata and both addresses as one JSON line, then waits for a line on stdin.
HOLDER = """
import json, sys
import torch
from kvtier.p2p.nixl_agent import GPU, HOST, NixlEndpoint
size, seed = int(sys.argv[1]), int(sys.argv[2])
data = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
dev, host = data.cuda(), data.pin_memory()
torch.cuda.synchronize()
ep = NixlEndpoint("gpu-holder")
ep.register(dev.data_ptr(), size, GPU, dev.device.index)
ep.register(host.data_ptr(), size, HOST)
print(json.dumps({"md": ep.metadata().hex(), "gpu": dev.data_ptr(), "host": host.data_ptr(),
                  "device": dev.device.index}), flush=True)
sys.stdin.readline()
ep.close()
"""


@pytest.fixture
def holder():
    env = dict(os.environ, NIXL_LOG_LEVEL="WARN")
    env.pop("UCX_TLS", None)  # UCX's own choice: the CUDA transports where they load
    env["PYTHONPATH"] = PYTHON_DIR + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(BLOCK * BLOCKS), str(SEED)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line, f"the holder exited ({proc.wait(timeout=30)}) before printing its metadata"
        yield json.loads(line)
    finally:
        try:
            proc.stdin.write("\n")
            proc.stdin.flush()
            proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        proc.stdin.close()
        proc.stdout.close()


def test_reads_of_another_process_gpu_and_pinned_memory_are_bit_exact(gpu, holder, monkeypatch):
    import torch
    from kvtier.p2p.nixl_agent import NixlEndpoint

    monkeypatch.delenv("UCX_TLS", raising=False)
    size = BLOCK * BLOCKS
    want = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(SEED))
    want_reversed = want.view(BLOCKS, BLOCK).flip(0).reshape(-1)
    dst = torch.zeros(size, dtype=torch.uint8, device=gpu)
    dst_host = torch.zeros(size, dtype=torch.uint8).pin_memory()
    ep = NixlEndpoint("gpu-puller", progress_thread=False)
    try:
        ep.register(dst.data_ptr(), size, GPU, gpu.index)
        ep.register(dst_host.data_ptr(), size, HOST)
        peer = ep.add_peer(bytes.fromhex(holder["md"]))
        me, holder_gpu = (GPU, gpu.index), (GPU, holder["device"])

        def blocks(src: int, into: int):  # block i of the source lands in block BLOCKS-1-i
            return [(src + i * BLOCK, into + (BLOCKS - 1 - i) * BLOCK, BLOCK) for i in range(BLOCKS)]

        # GPU -> GPU across processes (cuda_ipc where UCX has it).
        out = ep.read(peer, blocks(holder["gpu"], dst.data_ptr()), 60.0, local=me, remote=holder_gpu)
        assert out.status == DONE, out.detail
        torch.cuda.synchronize()
        assert torch.equal(dst.cpu(), want_reversed)
        # The holder's pinned host memory -> this GPU.
        dst.zero_()
        torch.cuda.synchronize()
        out = ep.read(peer, blocks(holder["host"], dst.data_ptr()), 60.0, local=me, remote=(HOST, 0))
        assert out.status == DONE, out.detail
        torch.cuda.synchronize()
        assert torch.equal(dst.cpu(), want_reversed)
        # The holder's GPU -> this process's pinned host memory.
        out = ep.read(peer, blocks(holder["gpu"], dst_host.data_ptr()), 60.0, local=(HOST, 0), remote=holder_gpu)
        assert out.status == DONE, out.detail
        assert torch.equal(dst_host, want_reversed)
    finally:
        ep.close()

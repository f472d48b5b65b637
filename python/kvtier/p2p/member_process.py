"""A KVCache peer member in its own process, driven by JSON lines on stdin (tests and benches).

    python -m kvtier.p2p.member_process '<json config>'

Config: ``layers, heads, dim, num_pages, page_tokens, chunk_tokens, dtype, cpu_bytes, seed``,
optional ``disk_dir, disk_bytes``, ``peers`` (PeerConfig fields), ``slow_send_s`` (sleep
before every send of 4 KiB or more, e.g. each BLOB piece: lets a test kill a member mid-transfer)
and ``stop_after_leased`` (the process stops itself, SIGSTOP, as it sends a NIXL lease, and the
lease leaves only once it is stopped: a puller's READ over UCX's TCP transport then waits on it, so a
test can kill it mid-READ). Each command
``{"op": ..., ...}`` gets one JSON line back; ``{"error": ...}`` when it raised.

"Computing" the KV of a prompt fills its pages with bytes derived from (token seed, page index),
so every member that computes the same prompt produces the same bytes, and a page hash proves a
pulled chunk bit-exact.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
import traceback

import numpy as np


def _tokens(spec) -> list[int]:
    return np.random.default_rng(spec["seed"]).integers(0, 50000, spec["n"]).tolist()


def main(argv: list[str]) -> int:
    cfg = json.loads(argv[0])
    import torch

    from kvtier.cache import KVCache
    from kvtier.layout import Layout
    from kvtier.p2p import transport
    from kvtier.p2p.config import PeerConfig

    if cfg.get("slow_send_s"):
        orig = transport.Connection.send

        def slow_send(self, data, deadline, _orig=orig, _s=cfg["slow_send_s"]):
            if len(data) >= 4096:
                time.sleep(_s)
            return _orig(self, data, deadline)

        transport.Connection.send = slow_send
    if cfg.get("stop_after_leased"):
        from kvtier.p2p import protocol as P

        orig_frame = transport.Connection.send_frame

        def send_then_stop(self, kind, rid, body, deadline, _orig=orig_frame):
            if kind not in (P.Kind.NIXL_LEASED, P.Kind.NIXL_LEASED_LATE):
                return _orig(self, kind, rid, body, deadline)
            # A forked child sends the lease once this process is stopped: sent before the stop,
            # NIXL's progress thread here could answer the READ in between.
            pid = os.getpid()
            if os.fork() == 0:
                try:
                    while not is_stopped(pid):
                        time.sleep(0.001)
                    _orig(self, kind, rid, body, deadline)
                finally:
                    os._exit(0)
            os.kill(pid, signal.SIGSTOP)

        transport.Connection.send_frame = send_then_stop
    dtype = getattr(torch, cfg.get("dtype", "float32"))
    gen = torch.Generator().manual_seed(cfg.get("seed", 0))
    kv = [
        torch.randn(2, cfg["num_pages"], cfg["page_tokens"], cfg["heads"], cfg["dim"], generator=gen).to(dtype)
        for _ in range(cfg["layers"])
    ]
    layout = Layout.from_vllm(kv, chunk_tokens=cfg["chunk_tokens"])
    peers = PeerConfig(**cfg["peers"]) if cfg.get("peers") else None
    extra = {}
    if cfg.get("disk_dir"):
        extra = {
            "disk_dir": cfg["disk_dir"],
            "disk_bytes": cfg["disk_bytes"],
            "disk_backend": "posix",
            "disk_admit_min_seen": 1,
        }
    cache = KVCache(layout, cpu_bytes=cfg["cpu_bytes"], method="cpu", model_id="p2p-test", peers=peers, **extra)
    views = [t.view(torch.uint8) if t.dtype != torch.uint8 else t for t in kv]

    def page_hash(pages) -> str:
        h = hashlib.sha256()
        for t in views:
            for p in pages:
                h.update(t[:, p].contiguous().numpy().tobytes())
        return h.hexdigest()

    def compute(tok_seed: int, pages) -> None:
        for li, t in enumerate(views):
            for i, p in enumerate(pages):
                g = torch.Generator().manual_seed(tok_seed * 1_000_003 + li * 10_007 + i)
                t[:, p] = torch.randint(0, 256, t[:, p].shape, generator=g, dtype=torch.uint8)

    out = {"event": "ready", "chunk_bytes": layout.chunk_bytes, "ppc": layout.pages_per_chunk}
    if cache.peers is not None:
        s = cache.peers
        out.update(node_id=s.node_id, address=f"{s.address[0]}:{s.address[1]}")
    print(json.dumps(out), flush=True)
    for line in sys.stdin:
        try:
            cmd = json.loads(line)
            op = cmd["op"]
            if op == "exit":
                break
            if op == "compute_store":
                compute(cmd["tokens"]["seed"], cmd["pages"])
                toks = _tokens(cmd["tokens"])
                n = cache.store(toks, cmd["pages"]).wait()
                res = {"stored": n, "hash": page_hash(cmd["pages"])}
            elif op == "store":
                res = {"stored": cache.store(_tokens(cmd["tokens"]), cmd["pages"]).wait()}
            elif op == "lookup":
                res = {"tokens": cache.lookup(_tokens(cmd["tokens"]))}
            elif op == "load":
                t0 = time.monotonic()
                h = cache.load(_tokens(cmd["tokens"]), cmd["pages"])
                n = h.wait()
                ppc = layout.pages_per_chunk
                got_pages = cmd["pages"][: n // layout.page_tokens]
                res = {
                    "tokens": n,
                    "seconds": time.monotonic() - t0,
                    "hash": page_hash(got_pages),
                    "pages_loaded": len(got_pages),
                    "ppc": ppc,
                }
            elif op == "hash":
                res = {"hash": page_hash(cmd["pages"])}
            elif op == "stats":
                st = cache.stats()
                res = {"stats": json.loads(json.dumps(st, default=str))}
            elif op == "members":
                res = {"members": cache.peers.members(), "digests": cache.peers.digest_versions()}
            else:
                res = {"error": f"unknown op {op}"}
        except Exception as e:  # noqa: BLE001 - report any failure to the driver, keep serving
            res = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
        print(json.dumps(res), flush=True)
    cache.close()
    return 0


def is_stopped(pid: int) -> bool:
    """Whether process ``pid`` is stopped (state T in /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "T"
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

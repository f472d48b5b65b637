"""Peer sharing between real processes on loopback (and across network namespaces where allowed).

Each member is ``python -m kvtier.p2p.member_process``: a KVCache with a CPU layout and a peer
service, driven by JSON lines. Chunks are "computed" from the token seed, so a page hash proves a
pulled chunk bit-exact.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib

import pytest

pytest.importorskip("torch")

from _util import free_port
from kvtier.p2p import protocol as P
from kvtier.p2p.nixl_agent import nixl_unavailable_reason
from kvtier.p2p.transport import Connection, Deadline, Identity, client_handshake

pytestmark = pytest.mark.multiproc

SECRET = "p2p-test-secret-0123456789"
LAYOUT = {
    "layers": 2,
    "heads": 2,
    "dim": 64,
    "num_pages": 96,
    "page_tokens": 16,
    "chunk_tokens": 64,
    "dtype": "float32",
}  # 4 pages a chunk, 128 KiB a chunk
FAST = {
    "gossip_interval_s": 0.1,
    "ack_timeout_s": 0.08,
    "suspicion_mult": 3.0,
    "sync_interval_s": 1.0,
    "request_timeout_s": 3.0,
    "dead_retention_s": 20.0,
}
CT = LAYOUT["chunk_tokens"]
PPC = CT // LAYOUT["page_tokens"]


class Member:
    """One member process; ``call`` sends a command and waits (with a deadline) for its reply."""

    def __init__(
        self, tmp_path, name, *, secret=SECRET, seeds=(), listen="127.0.0.1:0", netns=None, peers_extra=None, **cfg
    ) -> None:
        conf = {**LAYOUT, "cpu_bytes": 64 * 128 * 1024, "seed": zlib.crc32(name.encode()) & 0xFFFF, **cfg}
        conf["peers"] = {
            "listen": listen,
            "seeds": list(seeds),
            "secret": secret,
            "node_id": name,
            **FAST,
            **(peers_extra or {}),
        }
        argv = [sys.executable, "-m", "kvtier.p2p.member_process", json.dumps(conf)]
        if netns:
            argv = ["ip", "netns", "exec", netns, *argv]
        self.name = name
        self.log_path = tmp_path / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log)
        self.ready = self._read(60.0)
        assert self.ready.get("event") == "ready", self.ready
        self.address = self.ready["address"]

    def _read(self, timeout: float) -> dict:
        end = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        buf = b""
        while not buf.endswith(b"\n"):
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name}: no reply in {timeout}s; log:\n{self.log()}")
            r, _, _ = select.select([fd], [], [], left)
            if r:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise EOFError(f"{self.name} exited; log:\n{self.log()}")
                buf += chunk
        return json.loads(buf)

    def call(self, op: str, timeout: float = 30.0, **kw) -> dict:
        self.proc.stdin.write((json.dumps({"op": op, **kw}) + "\n").encode())
        self.proc.stdin.flush()
        out = self._read(timeout)
        assert "error" not in out, f"{self.name} {op}: {out.get('trace', out)}"
        return out

    def send(self, op: str, **kw) -> None:
        self.proc.stdin.write((json.dumps({"op": op, **kw}) + "\n").encode())
        self.proc.stdin.flush()

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def stats(self) -> dict:
        return self.call("stats")["stats"]["peers"]

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("exit")
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(10)
        for f in (self.proc.stdin, self.proc.stdout):
            f.close()
        self._log.close()


def wait_for(pred, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def toks(seed: int, chunks: int) -> dict:
    return {"seed": seed, "n": chunks * CT}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("p2p")
    a = Member(tmp, "A")
    b = Member(tmp, "B", seeds=[a.address])
    c = Member(tmp, "C", seeds=[b.address])  # knows only B: learns of A by gossip
    yield {"A": a, "B": b, "C": c, "tmp": tmp}
    for m in (c, b, a):
        m.stop()


def test_members_learn_each_other_by_gossip(cluster):
    a, c = cluster["A"], cluster["C"]
    wait_for(lambda: c.call("members")["members"].get("A") == "alive", 15, "C to learn of A")
    wait_for(lambda: a.call("members")["members"].get("C") == "alive", 15, "A to learn of C")


def test_b_and_c_load_what_a_computed_bit_exact(cluster):
    a, b, c = cluster["A"], cluster["B"], cluster["C"]
    t = toks(101, 8)
    src = a.call("compute_store", tokens=t, pages=list(range(32)))
    assert src["stored"] == 8
    wait_for(lambda: b.call("lookup", tokens=t)["tokens"] == 8 * CT, 15, "B to see A's chunks")
    got_b = b.call("load", tokens=t, pages=list(range(40, 72)))
    assert got_b["tokens"] == 8 * CT
    assert got_b["hash"] == src["hash"]
    wait_for(lambda: c.call("lookup", tokens=t)["tokens"] == 8 * CT, 15, "C to see the chunks")
    got_c = c.call("load", tokens=t, pages=list(range(8, 40)))
    assert got_c["tokens"] == 8 * CT and got_c["hash"] == src["hash"]
    sb = b.stats()
    assert sb["chunks_pulled"] >= 8 and sb.get("checksum_failures", 0) == 0
    # The data path: NIXL READs where the members have the nixl package (transport auto), else
    # the TCP stream. CI runs this suite both ways (scripts/ci_nixl.sh).
    if nixl_unavailable_reason() is None:
        assert sb["data_path"] == "nixl+tcp" and sb["chunks_pulled_nixl"] == sb["chunks_pulled"]
        assert sb["nixl"]["peers"]["A"] == "nixl"
    else:
        assert sb["data_path"] == "tcp" and sb.get("chunks_pulled_nixl", 0) == 0
    # A partial prefix: the first 5 chunks of a longer prompt are found, the rest is a miss.
    longer = {"seed": 101, "n": 8 * CT}
    assert c.call("lookup", tokens=longer)["tokens"] == 8 * CT


def test_wrong_secret_is_refused(cluster, tmp_path):
    a = cluster["A"]
    before = a.stats().get("auth_failures", 0)
    d = Member(tmp_path, "D", secret="not-the-cluster-secret-xx", seeds=[a.address])
    try:
        wait_for(lambda: a.stats().get("auth_failures", 0) > before, 10, "A to refuse D")
        assert d.call("members")["members"] == {}
        assert d.stats().get("auth_failures_outbound", 0) > 0
        assert "D" not in a.call("members")["members"]
        assert d.call("lookup", tokens=toks(101, 8))["tokens"] == 0
    finally:
        d.stop()


def _raw(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=5)
    return s


def _closed_by_peer(s: socket.socket, timeout: float = 5.0) -> bool:
    s.settimeout(timeout)
    try:
        while True:
            if not s.recv(65536):
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    finally:
        s.close()


def _authed(address: str) -> Connection:
    from kvtier.p2p.auth import load_secret

    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=5)
    conn = Connection(sock, (host, int(port)))
    # Same layout as the members: learn blob size and fingerprint from a member's handshake.
    conn_fp = _member_identity()
    client_handshake(conn, Identity("raw-test", conn_fp[1], conn_fp[0], load_secret(SECRET)), Deadline(5))
    return conn


def _member_identity():
    import torch
    from kvtier import Layout

    kv = [torch.zeros(2, 1, LAYOUT["page_tokens"], LAYOUT["heads"], LAYOUT["dim"]) for _ in range(LAYOUT["layers"])]
    lay = Layout.from_vllm(kv, chunk_tokens=CT)
    return lay.chunk_bytes, lay.fingerprint


def test_garbage_oversized_and_truncated_frames_drop_the_connection(cluster):
    a, b = cluster["A"], cluster["B"]
    before = a.stats().get("protocol_errors", 0)
    # 1. Garbage bytes.
    s = _raw(a.address)
    s.sendall(os.urandom(64))
    assert _closed_by_peer(s)
    # 2. A pre-auth frame declaring a 1 GiB body.
    s = _raw(a.address)
    s.sendall(struct.pack("<2sBBIII", b"KT", 1, P.Kind.HELLO, 0, 1 << 30, 0))
    assert _closed_by_peer(s)
    # 3. A data frame before authentication.
    s = _raw(a.address)
    s.sendall(P.encode_frame(P.Kind.GET, 1, P.encode_keys([b"\0" * 16])))
    assert _closed_by_peer(s)
    # 4. A truncated frame, then the client goes away: the server must not hang on it.
    s = _raw(a.address)
    s.sendall(P.encode_frame(P.Kind.HELLO, 0, b"x" * 100)[:40])
    s.close()
    # 5. Authenticated, then an oversized GET and a frame with a bad body checksum.
    conn = _authed(a.address)
    conn.sock.sendall(struct.pack("<2sBBIII", b"KT", 1, P.Kind.GET, 7, P.MAX_CONTROL_BODY + 1, 0))
    assert _closed_by_peer(conn.sock)
    conn = _authed(a.address)
    body = P.encode_keys([b"\1" * 16])
    conn.sock.sendall(struct.pack("<2sBBIII", b"KT", 1, P.Kind.CONFIRM, 7, len(body), 12345) + body)
    assert _closed_by_peer(conn.sock)
    # 6. Authenticated, a request naming more chunks than allowed.
    conn = _authed(a.address)
    conn.sock.sendall(P.encode_frame(P.Kind.GET, 9, struct.pack("<I", 5000) + b"\0" * 16 * 5000))
    assert _closed_by_peer(conn.sock)
    wait_for(lambda: a.stats().get("protocol_errors", 0) >= before + 6, 10, "A to count the bad frames")
    # The service is still up and serving.
    t = toks(202, 2)
    src = a.call("compute_store", tokens=t, pages=list(range(80, 88)))
    wait_for(lambda: b.call("lookup", tokens=t)["tokens"] == 2 * CT, 15, "B to see new chunks")
    assert b.call("load", tokens=t, pages=list(range(80, 88)))["hash"] == src["hash"]


def test_sigkill_mid_transfer_is_a_miss_within_the_deadline(tmp_path):
    # E serves slowly (0.4 s per 4 KiB-or-larger send: each 2 MiB chunk is one), so the kill lands
    # mid-pull: about 3 of the 8 chunks have landed after 1.2 s.
    # A cluster of its own: a different layout (2 MiB chunks) is refused by A, B and C.
    # The TCP stream (slow_send_s slows its sends); test_p2p_nixl_path kills a holder mid-READ.
    big = {"layers": 8, "heads": 4, "dim": 128, "num_pages": 64, "cpu_bytes": 48 << 20}
    tcp = {"transport": "tcp"}
    f = Member(tmp_path, "F", peers_extra=tcp, **big)
    e = Member(tmp_path, "E", seeds=[f.address], slow_send_s=0.4, peers_extra=tcp, **big)
    try:
        t = toks(303, 8)
        src = e.call("compute_store", tokens=t, pages=list(range(32)))
        assert src["stored"] == 8
        wait_for(lambda: f.call("lookup", tokens=t, timeout=30)["tokens"] == 8 * CT, 20, "F to see E's chunks")
        f.send("load", tokens=t, pages=list(range(32, 64)))
        time.sleep(1.2)  # a few chunks landed, the rest are on the wire
        e.kill()
        t0 = time.monotonic()
        got = f._read(30)
        waited = time.monotonic() - t0
        assert "error" not in got, got
        assert got["tokens"] < 8 * CT, "the kill should have cut the transfer short"
        assert waited < FAST["request_timeout_s"] + 2.0
        # Whatever prefix landed is bit-exact; nothing partial is visible.
        n = got["tokens"] // CT
        ref = f.call("hash", pages=list(range(32, 32 + n * PPC)))
        assert got["hash"] == ref["hash"]
        st = f.call("stats")["stats"]
        assert st["index"]["writing"] == 0, st["index"]
        # F keeps serving: its next lookup is answered promptly, and it still shares what it has.
        assert f.call("lookup", tokens=toks(404, 2))["tokens"] == 0
        wait_for(
            lambda: "E" in f.call("members")["members"] and f.call("members")["members"]["E"] != "alive",
            15,
            "F to declare E suspect/dead",
        )
    finally:
        f.stop()
        if e.proc.poll() is None:
            e.stop()


def _populate_disk(tmp, cache_dir, seeds) -> tuple[dict, str]:
    """A member with a disk tier computes 4 chunks and evicts them to disk, then 4 more, which
    its close persists (disk.persist_on_close): 8 chunks on disk."""
    p = Member(
        tmp, "P", seeds=seeds, cpu_bytes=4 * 128 * 1024, disk_dir=str(cache_dir), disk_bytes=64 * 128 * 1024 + (1 << 20)
    )
    try:
        t = toks(505, 4)
        src = p.call("compute_store", tokens=t, pages=list(range(16)))
        p.call("compute_store", tokens=toks(506, 4), pages=list(range(16, 32)))  # evicts t's chunks
        p.call("stats")
    finally:
        p.stop()
    return t, src["hash"]


def test_standalone_node_restart_rejoins_and_rebuilds_its_digest(cluster, tmp_path):
    b, c = cluster["B"], cluster["C"]
    cache_dir = tmp_path / "disk"
    cache_dir.mkdir()
    t, ref = _populate_disk(tmp_path, cache_dir, [b.address])
    port = free_port()
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    # chunk_tokens too: the directory a KVCache wrote records it and opens only with it.
    spec = json.dumps(
        {"blob_bytes": _member_identity()[0], "fingerprint": _member_identity()[1].hex(), "chunk_tokens": CT}
    )

    def start_node():
        log = open(tmp_path / "node.log", "ab")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kvtier.cli",
                "peer",
                "--layout",
                spec,
                "--listen",
                f"127.0.0.1:{port}",
                "--seeds",
                b.address,
                "--secret-file",
                str(secret_file),
                "--node-id",
                "N",
                "--cache-dir",
                str(cache_dir),
                "--cpu-bytes",
                str(8 * 128 * 1024),
                "--disk-bytes",
                str(64 * 128 * 1024 + (1 << 20)),
                "--disk-backend",
                "posix",
                "--gossip-interval",
                "0.1",
                "--request-timeout",
                "3",
            ],
            stdout=subprocess.PIPE,
            stderr=log,
        )
        log.close()
        try:
            r, _, _ = select.select([proc.stdout], [], [], 60)
            line = proc.stdout.readline() if r else b""
            assert line, f"node did not start: {(tmp_path / 'node.log').read_text()[-2000:]}"
            ready = json.loads(line)
            assert ready["event"] == "ready", ready
        except BaseException:
            proc.kill()
            proc.wait(10)
            proc.stdout.close()
            raise
        return proc, ready

    node, ready = start_node()
    try:
        assert ready["digest_keys"] == 8  # rebuilt from the journal: the chunks on disk
        wait_for(lambda: b.call("lookup", tokens=t)["tokens"] == 4 * CT, 20, "B to find the node's chunks")
        got = b.call("load", tokens=t, pages=list(range(72, 88)))
        assert got["tokens"] == 4 * CT and got["hash"] == ref
        node.send_signal(signal.SIGKILL)
        node.wait(10)
        node.stdout.close()
        wait_for(lambda: c.call("members")["members"].get("N") in ("suspect", "dead"), 15, "N to be suspected")
        node, ready = start_node()
        assert ready["digest_keys"] == 8
        wait_for(lambda: c.call("members")["members"].get("N") == "alive", 15, "N to rejoin")
        got = wait_for(
            lambda: (r := c.call("load", tokens=t, pages=list(range(72, 88))))["tokens"] == 4 * CT and r,
            20,
            "C to load from the restarted node",
        )
        assert got["hash"] == ref
    finally:
        if node.poll() is None:
            node.send_signal(signal.SIGTERM)
            node.wait(10)
        node.stdout.close()


# -- across network namespaces ------------------------------------------------------------------


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root for ip netns"
    if shutil.which("ip") is None:
        return "the ip command is missing"
    r = subprocess.run(["ip", "netns", "add", "kvtier-probe"], capture_output=True, check=False)
    if r.returncode:
        return f"ip netns add failed: {r.stderr.decode().strip()}"
    subprocess.run(["ip", "netns", "del", "kvtier-probe"], capture_output=True, check=False)
    return None


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


@pytest.fixture(params=["veth", "veth+netem"])
def two_hosts(request):
    """Namespaces kvtA (10.93.0.1) and kvtB (10.93.0.2) joined by a veth pair; with
    "veth+netem", 20 ms delay and 1% loss each way (tc netem)."""
    reason = _netns_unavailable()
    if reason:
        pytest.skip(f"SKIPPED (network namespaces unavailable): {reason}")
    suffix = str(os.getpid() % 10000)
    a, b = f"kvtA{suffix}", f"kvtB{suffix}"
    try:
        _sh("ip", "netns", "add", a)
        _sh("ip", "netns", "add", b)
        _sh("ip", "link", "add", f"va{suffix}", "type", "veth", "peer", "name", f"vb{suffix}")
        _sh("ip", "link", "set", f"va{suffix}", "netns", a)
        _sh("ip", "link", "set", f"vb{suffix}", "netns", b)
        _sh("ip", "-n", a, "addr", "add", "10.93.0.1/24", "dev", f"va{suffix}")
        _sh("ip", "-n", b, "addr", "add", "10.93.0.2/24", "dev", f"vb{suffix}")
        for ns, dev in ((a, f"va{suffix}"), (b, f"vb{suffix}")):
            _sh("ip", "-n", ns, "link", "set", dev, "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        if request.param == "veth+netem":
            for ns, dev in ((a, f"va{suffix}"), (b, f"vb{suffix}")):
                r = subprocess.run(
                    [
                        "ip",
                        "netns",
                        "exec",
                        ns,
                        "tc",
                        "qdisc",
                        "add",
                        "dev",
                        dev,
                        "root",
                        "netem",
                        "delay",
                        "20ms",
                        "loss",
                        "1%",
                    ],
                    capture_output=True,
                    check=False,
                )
                if r.returncode:
                    pytest.skip(
                        "SKIPPED (tc netem unavailable on this kernel: "
                        f"{r.stderr.decode().strip()}); the plain veth case ran"
                    )
        yield a, b
    finally:
        subprocess.run(["ip", "netns", "del", a], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", b], capture_output=True, check=False)


def test_sharing_across_network_namespaces(two_hosts, tmp_path):
    ns_a, ns_b = two_hosts
    slow = {"gossip_interval_s": 0.2, "ack_timeout_s": 0.15, "request_timeout_s": 5.0}
    a = Member(tmp_path, "nsA", listen="10.93.0.1:7070", netns=ns_a, peers_extra=slow)
    b = Member(tmp_path, "nsB", listen="10.93.0.2:7070", seeds=["10.93.0.1:7070"], netns=ns_b, peers_extra=slow)
    try:
        t = toks(606, 6)
        src = a.call("compute_store", tokens=t, pages=list(range(24)))
        wait_for(lambda: b.call("lookup", tokens=t)["tokens"] == 6 * CT, 30, "nsB to see nsA's chunks")
        got = b.call("load", tokens=t, pages=list(range(24, 48)))
        assert got["tokens"] == 6 * CT and got["hash"] == src["hash"]
        assert b.call("members")["members"]["nsA"] == "alive"
    finally:
        b.stop()
        a.stop()

"""kvtier.p2p pieces in one process: frames, auth, digests, membership, and PeerServices over
loopback against honest, corrupting and stalling peers."""

from __future__ import annotations

import random
import socket
import struct
import threading
import time

import numpy as np
import pytest
from _util import wait_until
from hypothesis import given, settings
from hypothesis import strategies as st
from kvtier import _core
from kvtier.errors import InvalidArgumentError
from kvtier.p2p import PeerConfig, PeerService
from kvtier.p2p import protocol as P
from kvtier.p2p.auth import client_mac, load_secret, server_mac
from kvtier.p2p.digest import (
    BloomFilter,
    LocalDigest,
    PeerDigests,
    assemble_plan,
    bloom_geometry,
    choose_sources,
)
from kvtier.p2p.membership import Membership, MembershipConfig
from kvtier.p2p.transport import Connection, Deadline, Identity, server_handshake

SECRET = b"unit-test-secret-0123456789"


# -- frames -----------------------------------------------------------------------------------


def test_frame_roundtrip_and_header_checks():
    raw = P.encode_frame(P.Kind.CONFIRM, 42, P.encode_keys([b"a" * 16, b"b" * 16]))
    h = P.decode_header(raw[: P.HEADER_BYTES], authenticated=True)
    assert (h.kind, h.request_id, h.body_len) == (P.Kind.CONFIRM, 42, 36)
    body = raw[P.HEADER_BYTES :]
    P.check_body(h, body)
    assert P.decode_keys(body) == [b"a" * 16, b"b" * 16]
    with pytest.raises(P.ChecksumError):
        P.check_body(h, body[:-1] + b"x")
    bad = [
        (b"XX" + raw[2:16], "magic"),
        (raw[:2] + b"\x09" + raw[3:16], "version"),
        (raw[:3] + b"\xee" + raw[4:16], "kind"),
    ]
    for hdr, what in bad:
        with pytest.raises(P.ProtocolError, match=what):
            P.decode_header(hdr, authenticated=True)
    with pytest.raises(P.ProtocolError, match="before authentication"):
        P.decode_header(raw[:16], authenticated=False)
    huge = struct.pack("<2sBBIII", b"KT", 1, P.Kind.HELLO, 0, P.MAX_PREAUTH_BODY + 1, 0)
    with pytest.raises(P.ProtocolError, match="limit"):
        P.decode_header(huge, authenticated=False)
    huge = struct.pack("<2sBBIII", b"KT", 1, P.Kind.GET, 0, P.MAX_CONTROL_BODY + 1, 0)
    with pytest.raises(P.ProtocolError, match="limit"):
        P.decode_header(huge, authenticated=True)


def test_bodies_roundtrip():
    rec = P.MemberRecord("n1", "10.0.0.1", 7070, 123, P.SUSPECT, 5, 9)
    d = P.DigestDelta("n1", 5, 9, (b"12345678", b"abcdefgh"))
    g = P.Gossip(rec, "n2", [rec], [d])
    assert P.Gossip.decode(g.encode()) == g
    assert P.decode_bitmap(P.encode_bitmap([True, False, True]), 3) == [True, False, True]
    snap = P.DigestSnapshot(1, 2, 128, 3, b"\x01" * 16)
    assert P.DigestSnapshot.decode(snap.encode()) == snap
    assert P.decode_deltas(P.encode_deltas([d])) == [d]
    with pytest.raises(P.ProtocolError):
        P.decode_keys(struct.pack("<I", P.MAX_KEYS_PER_REQUEST + 1))
    with pytest.raises(P.ProtocolError):
        P.decode_bitmap(P.encode_bitmap([True]), 2)
    with pytest.raises(P.ProtocolError):
        P.DigestSnapshot.decode(struct.pack("<IIQB", 1, 1, 1 << 40, 3))


_DECODERS = [
    lambda b: P.Gossip.decode(b),
    lambda b: P.Gossip.decode(b, full_state=True),
    P.decode_keys,
    lambda b: P.decode_bitmap(b, 3),
    P.DigestSnapshot.decode,
    P.decode_deltas,
    P.Hello.decode,
    P.Challenge.decode,
    P.decode_blob_meta,
    P.decode_digest_req,
]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(0, len(_DECODERS) - 1))
def test_garbage_bodies_raise_protocol_error_only(data, which):
    try:
        _DECODERS[which](data)
    except P.ProtocolError:
        pass


def test_checksum_negotiation_prefers_crc32c_when_both_have_it():
    assert P.pick_algorithm(1 << P.CRC32, P.LOCAL_ALGORITHMS_MASK) == P.CRC32
    with pytest.raises(P.ProtocolError):
        P.pick_algorithm(0, P.LOCAL_ALGORITHMS_MASK)
    if P.CRC32C in P.ALGORITHMS:
        assert P.pick_algorithm(P.LOCAL_ALGORITHMS_MASK, P.LOCAL_ALGORITHMS_MASK) == P.CRC32C


# -- auth and config --------------------------------------------------------------------------


def test_secret_and_config_checks(tmp_path):
    with pytest.raises(InvalidArgumentError, match="at least 16"):
        load_secret(b"short")
    f = tmp_path / "s"
    f.write_bytes(SECRET + b"\n")
    assert load_secret(secret_file=str(f)) == SECRET
    assert server_mac(SECRET, b"h", b"c") != client_mac(SECRET, b"h", b"c")  # no reflection
    with pytest.raises(InvalidArgumentError, match="exactly one"):
        PeerConfig()
    with pytest.raises(InvalidArgumentError, match=r"peers.listen"):
        PeerConfig(secret=SECRET, listen="nowhere")
    with pytest.raises(InvalidArgumentError, match=r"peers.request_timeout_s"):
        PeerConfig(secret=SECRET, request_timeout_s=0)
    assert PeerConfig(secret=SECRET, seeds="a:1,b:2").seeds == ("a:1", "b:2")


def test_layout_spec_from_shape_matches_a_serving_layout():
    torch = pytest.importorskip("torch")
    from kvtier import Layout
    from kvtier.p2p.node import layout_spec, resolve_spec

    kv = [torch.zeros(2, 8, 16, 8, 128, dtype=torch.bfloat16) for _ in range(4)]
    lay = Layout.from_vllm(kv, chunk_tokens=64)
    spec = {
        "kind": "vllm",
        "num_layers": 4,
        "kv_heads": 8,
        "head_dim": 128,
        "dtype": "bfloat16",
        "page_tokens": 16,
        "chunk_tokens": 64,
    }
    assert resolve_spec(spec) == (lay.chunk_bytes, lay.fingerprint)
    assert resolve_spec(layout_spec(lay)) == (lay.chunk_bytes, lay.fingerprint)
    assert layout_spec(lay)["chunk_tokens"] == 64
    with pytest.raises(InvalidArgumentError, match="fingerprint"):
        resolve_spec({"blob_bytes": 10, "fingerprint": "zz"})
    with pytest.raises(InvalidArgumentError, match="chunk_tokens must be a positive int, got 0"):
        resolve_spec({**layout_spec(lay), "chunk_tokens": 0})


def test_cli_has_a_peer_command(capsys):
    from kvtier.cli import main

    with pytest.raises(SystemExit) as e:
        main(["peer", "--help"])
    assert e.value.code == 0
    assert "--secret-file" in capsys.readouterr().out


# -- digests ----------------------------------------------------------------------------------


def test_bloom_has_no_false_negatives_and_the_expected_false_positive_rate():
    bits, k = bloom_geometry(2000, 0.01)
    f = BloomFilter(bits, k)
    rng = random.Random(0)
    keys = [rng.randbytes(16) for _ in range(2000)]
    for key in keys:
        f.add(key)
    assert all(key in f for key in keys)
    fp = sum(rng.randbytes(16) in f for _ in range(20000)) / 20000
    assert fp < 0.02


def test_digest_deltas_in_order_and_catch_up():
    own = LocalDigest("a", 1024, 4, generation=7)
    peers = PeerDigests()
    own.add([b"k1" + b"\0" * 14])
    own.flush()
    peers.install("a", own.snapshot())
    own.add([b"k2" + b"\0" * 14])
    own.flush()
    own.add([b"k3" + b"\0" * 14])
    (d3,) = own.flush()
    assert peers.apply_delta(d3)  # out of order: applied (adding commutes), watermark stays
    assert peers.candidates([b"k3" + b"\0" * 14]) == [["a"]]
    assert peers.stale() == ["a"] and peers.version_of("a") == (7, 1)
    assert not peers.apply_delta(d3)  # a duplicate is not new
    for d in own.deltas_since(*peers.version_of("a")):
        peers.apply_delta(d)
    assert peers.stale() == [] and peers.version_of("a") == (7, 3)
    assert peers.candidates([b"k2" + b"\0" * 14]) == [["a"]]
    own.rebuild([b"k3" + b"\0" * 14])
    assert own.deltas_since(7, 3) is None  # new generation: fetch it whole


def test_source_choice_prefers_long_runs_and_is_bounded():
    rng = random.Random(0)
    local = [False] * 8
    # x holds 0-3, y 4-7, z (a false positive) claims chunk 0 only, w claims everything.
    cands = [["x", "z"]] + [["x"]] * 3 + [["y"]] * 4
    asks = choose_sources(0, local, cands, 4, set(), rng)
    assert asks == {"x": [0, 1, 2, 3], "y": [4, 5, 6, 7]}
    assert assemble_plan(local, {"x": {0, 1, 2, 3}, "y": {4, 5, 6}}) == ["x"] * 4 + ["y"] * 3
    many = [[f"p{i}"] for i in range(8)]
    assert len(choose_sources(0, local, many, 4, set(), rng)) == 4


# -- membership -------------------------------------------------------------------------------


class _Net:
    """A tiny synchronous driver for Membership (the service and the simulator do the same)."""

    def __init__(self, n: int) -> None:
        cfg = MembershipConfig(period_s=1.0, ack_timeout_s=0.5, suspicion_mult=2.0, dead_retention_s=100)
        self.nodes = {f"m{i}": Membership(f"m{i}", f"m{i}", 1, 1, cfg, random.Random(i)) for i in range(n)}
        self.down: set[str] = set()
        self.now = 0.0
        for m in list(self.nodes.values())[1:]:
            for out in m.join_requests([("m0", 1)]):
                self.deliver(m, out, "m0")

    def deliver(self, src, out, dst_id=None) -> None:
        dst_id = dst_id or out.node_id
        if dst_id in self.down:
            for more in src.on_no_reply(out, self.now):
                self.deliver(src, more)
            return
        dst = self.nodes[dst_id]
        if out.kind == P.Kind.PING_REQ:
            dst.ingest(out.body, self.now)
            ok = out.body.target not in self.down
            if ok:
                k, r = self.nodes[out.body.target].handle(P.Kind.PING, dst.ping_body(), self.now)
                dst.on_reply(k, r, self.now)
            k, r = dst.relay_answer(ok, out.body.target)
        else:
            k, r = dst.handle(out.kind, out.body, self.now)
        src.on_reply(k, r, self.now, probe_of=out.probe_of)

    def step(self) -> None:
        for name, m in self.nodes.items():
            if name not in self.down:
                for out in m.tick(self.now):
                    self.deliver(m, out)
        self.now += 1.0


def test_membership_detects_a_death_and_a_restart_refutes_it():
    net = _Net(6)
    for _ in range(10):
        net.step()
    assert all(len(m.alive_ids()) == 5 for m in net.nodes.values())
    net.down.add("m3")
    for _ in range(25):
        net.step()
    assert all(m.state_of("m3") == P.DEAD for k, m in net.nodes.items() if k != "m3")
    # m3 restarts with a higher incarnation and rejoins through m1.
    net.down.discard("m3")
    cfg = net.nodes["m0"].config
    net.nodes["m3"] = Membership("m3", "m3", 1, 2, cfg, random.Random(9))
    for out in net.nodes["m3"].join_requests([("m1", 1)]):
        net.deliver(net.nodes["m3"], out, "m1")
    for _ in range(10):
        net.step()
    assert all(m.state_of("m3") == P.ALIVE for k, m in net.nodes.items() if k != "m3")


def test_a_falsely_suspected_member_refutes():
    net = _Net(4)
    for _ in range(5):
        net.step()
    m1 = net.nodes["m1"]
    rec = m1.members["m2"].record
    m1.apply(P.MemberRecord("m2", "m2", 1, rec.incarnation, P.SUSPECT), net.now)
    for _ in range(6):
        net.step()
    assert all(m.state_of("m2") == P.ALIVE for k, m in net.nodes.items() if k != "m2")
    assert net.nodes["m2"].counters["refutations"] >= 1


# -- services over loopback -------------------------------------------------------------------

BLOB = 64 << 10


def _tier(chunks: int = 16, pages: int = 8):
    """A CPU tier whose layout is ``pages`` pages of one blob each (one page = one chunk)."""
    scratch = np.zeros(pages * BLOB, dtype=np.uint8)
    tier = _core.CpuTier([(scratch.ctypes.data, BLOB, BLOB, pages)], -1, 1, [[0]], chunks * BLOB, "cpu", 1 << 20, 1)
    return tier, scratch


FP = b"F" * 16


def _put(tier, key: bytes, fill: int) -> None:
    view = tier.begin_put(key)
    np.frombuffer(view, dtype=np.uint8)[:] = np.arange(BLOB, dtype=np.uint64).astype(np.uint8) ^ fill
    view.release()
    tier.commit_put(key)


def _blob(tier, key: bytes) -> bytes:
    views = tier.acquire_blobs(key)
    assert views
    out = bytes(views[0])
    views[0].release()
    tier.release_blobs(key)
    return out


def _svc(tier, **kw):
    cfg = {
        "secret": SECRET,
        "gossip_interval_s": 0.05,
        "ack_timeout_s": 0.04,
        "request_timeout_s": 2.0,
        "sync_interval_s": 0.5,
    }
    cfg.update(kw)
    return PeerService(tier, FP, PeerConfig(**cfg)).start()


KEYS = [bytes([i]) * 16 for i in range(1, 9)]


def test_pull_from_two_sources_at_once_bit_exact():
    (ta, _sa), (tb, _sb), (tc, sc) = _tier(), _tier(), _tier()
    a = _svc(ta)
    addr = f"{a.address[0]}:{a.address[1]}"
    b = _svc(tb, seeds=(addr,))
    c = _svc(tc, seeds=(addr,))
    try:
        for i, k in enumerate(KEYS[:4]):
            _put(ta, k, i)
        for i, k in enumerate(KEYS[4:], start=4):
            _put(tb, k, i)
        a.note_stored(KEYS[:4])
        b.note_stored(KEYS[4:])
        wait_until(lambda: c.lookup(KEYS) == 8)
        op = c.load(KEYS, np.arange(8), 0)
        op.transfer.wait(5)
        assert op.chunks == 8
        assert bytes(sc) == b"".join(_blob(ta, k) for k in KEYS[:4]) + b"".join(_blob(tb, k) for k in KEYS[4:])
        assert c.counters["chunks_pulled"] == 8
        # The TCP path's measured rate, for planners: none below the threshold, then 8 blobs' bytes
        # over the pulls' seconds.
        assert c.pull_rate() is None and a.pull_rate(min_bytes=1) is None  # a pulled nothing
        rate = c.pull_rate(min_bytes=1)
        assert rate is not None and 8 * len(_blob(ta, KEYS[0])) / rate < 5.0  # within the load's 5 s
        assert {k: _blob(tc, k) for k in KEYS} == {
            **{k: _blob(ta, k) for k in KEYS[:4]},
            **{k: _blob(tb, k) for k in KEYS[4:]},
        }
        assert a.counters["chunks_served"] == 4 and b.counters["chunks_served"] == 4
    finally:
        for s in (c, b, a):
            s.close()


def _fake_peer(behaviour: str):
    """A member that passes the handshake, confirms everything, then misbehaves on GET."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(4)
    me = Identity("bad", FP, BLOB, SECRET)
    stop = threading.Event()

    def serve():
        lst.settimeout(0.1)
        conns = []
        while not stop.is_set():
            try:
                sock, addr = lst.accept()
            except TimeoutError:
                continue
            conn = Connection(sock, addr)
            conns.append(conn)
            try:
                server_handshake(conn, me, Deadline(5))
                while True:
                    h, body = conn.recv_frame(Deadline(30))
                    if h.kind == P.Kind.CONFIRM:
                        keys = P.decode_keys(body)
                        conn.send_frame(
                            P.Kind.CONFIRM_REPLY, h.request_id, P.encode_bitmap([True] * len(keys)), Deadline(5)
                        )
                    elif h.kind == P.Kind.GET:
                        key = P.decode_keys(body)[0]
                        payload = bytes(BLOB)
                        if behaviour == "bad_checksum":
                            conn.send_frame(
                                P.Kind.BLOB, h.request_id, P.encode_blob_meta(key, FP, BLOB, P.CRC32), Deadline(5)
                            )
                            conn.send(payload, Deadline(5))
                            conn.send(P.encode_trailer(12345), Deadline(5))
                        elif behaviour == "too_long":
                            conn.send_frame(
                                P.Kind.BLOB, h.request_id, P.encode_blob_meta(key, FP, 2 * BLOB, P.CRC32), Deadline(5)
                            )
                            conn.send(payload * 2, Deadline(5))
                        elif behaviour == "stall":
                            conn.send_frame(
                                P.Kind.BLOB, h.request_id, P.encode_blob_meta(key, FP, BLOB, P.CRC32), Deadline(5)
                            )
                            conn.send(payload[: BLOB // 2], Deadline(5))
                            stop.wait(10)
                    else:
                        conn.send_frame(P.Kind.ERROR, h.request_id, b"no", Deadline(5))
            except Exception:  # noqa: BLE001 - a fake peer just drops the connection
                pass
        for c in conns:
            c.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()

    def close():
        stop.set()
        t.join(5)
        lst.close()

    return lst.getsockname()[1], close


@pytest.mark.parametrize("behaviour", ["bad_checksum", "too_long", "stall"])
def test_a_misbehaving_peer_costs_a_miss_and_nothing_partial_is_visible(behaviour):
    port, close_fake = _fake_peer(behaviour)
    tier, _s = _tier()
    c = _svc(tier, request_timeout_s=1.0)
    try:
        rec = P.MemberRecord("bad", "127.0.0.1", port, 1, P.ALIVE)
        with c._lock:
            c._m.apply(rec, time.monotonic())
            own = LocalDigest("bad", 1024, 4)
            own.add(KEYS[:1])
            own.flush()
            c._digests.install("bad", own.snapshot())
        t0 = time.monotonic()
        op = c.load(KEYS[:1], np.zeros(1, dtype=np.int64), 0)
        elapsed = time.monotonic() - t0
        assert op.chunks == 0
        assert elapsed < 1.0 + 1.5  # within the request deadline (plus slack), never a hang
        assert tier.lookup(KEYS[0]) == 0
        assert tier.stats()["index"]["writing"] == 0  # the reserved block was given back
        want = {"bad_checksum": "checksum_failures", "too_long": "protocol_errors", "stall": "pull_deadline_misses"}[
            behaviour
        ]
        assert c.counters[want] == 1
        if behaviour != "stall":
            assert c.bad_peers["bad"] == 1
    finally:
        c.close()
        close_fake()


def test_kvcache_with_peers_in_one_process():
    torch = pytest.importorskip("torch")
    from kvtier import KVCache, Layout

    def make(seed):
        g = torch.Generator().manual_seed(seed)
        kv = [torch.randn(2, 16, 16, 2, 32, generator=g) for _ in range(2)]
        return kv, Layout.from_vllm(kv, chunk_tokens=32)

    (kva, la), (kvb, lb) = make(1), make(2)
    peers = {"secret": SECRET, "gossip_interval_s": 0.05, "ack_timeout_s": 0.04, "request_timeout_s": 2.0}
    with pytest.raises(InvalidArgumentError, match="peers"):
        KVCache(la, cpu_bytes=8 * la.chunk_bytes, method="cpu", peers="yes")
    a = KVCache(la, cpu_bytes=8 * la.chunk_bytes, method="cpu", peers=PeerConfig(**peers))
    addr = a.stats()["peers"]["address"]
    b = KVCache(lb, cpu_bytes=8 * lb.chunk_bytes, method="cpu", peers={**peers, "seeds": (addr,)})
    try:
        tokens = list(range(7, 7 + 4 * 32))
        a.store(tokens, list(range(8))).wait()
        wait_until(lambda: b.lookup(tokens) == 4 * 32)
        h = b.load(tokens, list(range(8, 16)))
        assert h.wait() == 4 * 32
        assert all(torch.equal(kva[i][:, p], kvb[i][:, 8 + p]) for i in range(2) for p in range(8))
        assert b.stats()["peers"]["chunks_pulled"] == 4
        assert b.lookup(tokens) == 4 * 32  # now local
        other = list(range(500, 500 + 2 * 32))
        assert b.lookup(other) == 0  # nobody has it: no hang, a plain miss
        assert b.load(other, list(range(4))).wait() == 0
    finally:
        b.close()
        a.close()


def test_paged_pools_share_prefixes_through_peers():
    """Instance B's pool misses locally and pulls the chunks A's pool committed (write-through
    put them in A's CPU tier while they are still in A's GPU pages), bit-exact."""
    torch = pytest.importorskip("torch")
    from kvtier.pool import PagedKVPool

    peers = {"secret": SECRET, "gossip_interval_s": 0.05, "ack_timeout_s": 0.04, "request_timeout_s": 2.0}

    def make(**kw):
        return PagedKVPool(
            num_layers=2,
            kv_heads=2,
            head_dim=32,
            num_pages=32,
            page_tokens=8,
            chunk_tokens=32,
            dtype=torch.float32,
            kv_layout="vllm",
            cpu_bytes=16 * 32 * 2 * 2 * 2 * 32 * 4,
            method="cpu",
            write_through=True,
            **kw,
        )

    with pytest.raises(InvalidArgumentError, match="peers need a CPU tier"):
        PagedKVPool(num_layers=2, kv_heads=2, head_dim=32, num_pages=32, cpu_bytes=0, peers=peers)
    a = make(peers=PeerConfig(**peers))
    b = make(peers={**peers, "seeds": (a.cache.stats()["peers"]["address"],)})
    try:
        tokens = list(range(11, 11 + 3 * 32))
        sa = a.begin(tokens)
        g = torch.Generator().manual_seed(3)
        for t in a.kv:
            t[:, sa.page_table] = torch.randn(t[:, sa.page_table].shape, generator=g)
        assert a.commit(sa, tokens) == 3
        wait_until(lambda: b.cache.lookup(tokens) == 3 * 32)
        sb = b.begin(tokens + [1])
        assert sb.lower_hit_tokens == 3 * 32 and sb.gpu_hit_tokens == 0
        sb.wait()
        for ta, tb in zip(a.kv, b.kv):
            assert torch.equal(ta[:, sa.page_table[:12]], tb[:, sb.page_table[:12]])
        assert b.cache.stats()["peers"]["chunks_pulled"] == 3
        b.release(sb)
        a.release(sa)
    finally:
        b.close()
        a.close()


def test_suspect_members_stay_lookup_candidates():
    import dataclasses

    net = _Net(3)
    for _ in range(10):
        net.step()
    m0 = net.nodes["m0"]
    m1 = m0.members["m1"]
    m1.record = dataclasses.replace(m1.record, state=P.SUSPECT)  # one probe answered late
    assert "m1" not in m0.alive_ids() and "m1" in m0.candidate_ids()

"""Peers' NIXL data path (kvtier.p2p.nixl_path): a pull is a lease on the holder's CPU-tier blocks,
one-sided READs into the puller's own blocks, a CRC32C check, then commit. Never wrong KV: a lease
that ran out, a bad checksum, a holder killed mid-READ all end as misses.

The leases and messages are tested everywhere; the transfers need the ``nixl`` package (CI runs
this file and the p2p suites again with it: scripts/ci_nixl.sh).
"""

from __future__ import annotations

import concurrent.futures as cf
import socket
import time
from collections import Counter

import numpy as np
import pytest
from _util import wait_until
from hypothesis import given, settings
from hypothesis import strategies as st
from kvtier import _core
from kvtier.errors import ResourceExhaustedError, UnavailableError
from kvtier.p2p import PeerConfig, PeerService, member_process, nixl_path
from kvtier.p2p import protocol as P
from kvtier.p2p.nixl_agent import PEER_LOST, NixlEndpoint, ReadOutcome, nixl_unavailable_reason
from kvtier.p2p.nixl_path import BlockLeases, NixlPath
from test_p2p_units import BLOB, FP, KEYS, SECRET, _blob, _put, _svc, _tier

NIXL_REASON = nixl_unavailable_reason()
needs_nixl = pytest.mark.skipif(NIXL_REASON is not None, reason=f"needs nixl: {NIXL_REASON}")


# -- messages and leases (no nixl needed) ----------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    blocks=st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1)), max_size=64),
    lease_id=st.integers(0, 2**64 - 1),
    ms=st.integers(0, 2**32 - 1),
    md=st.binary(min_size=1, max_size=2048),
    agent=st.text(min_size=1, max_size=16),
    addr=st.integers(1, 2**64 - 1),
)
def test_nixl_messages_round_trip(blocks, lease_id, ms, md, agent, addr):
    leased = P.NixlLeased(lease_id, ms, tuple(blocks))
    assert P.NixlLeased.decode(leased.encode()) == leased
    late = P.NixlLeased(lease_id, ms, tuple(blocks), tuple(i % 3 == 1 for i in range(len(blocks))))
    assert P.NixlLeased.decode_late(late.encode_late()) == late
    crcs = [crc for _, crc in blocks]
    assert P.decode_sums(P.encode_sums(crcs), len(crcs)) == (crcs or None)
    assert P.decode_sums(P.encode_sums(None), len(crcs)) is None  # the lease is gone
    meta = P.NixlMeta(True, "", agent, md, addr, 1 << 20)
    assert P.NixlMeta.decode(meta.encode()) == meta
    no = P.NixlMeta(False, "transport: tcp")
    assert P.NixlMeta.decode(no.encode()) == no


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=256))
def test_garbage_nixl_messages_raise_protocol_errors_only(body):
    for decode in (P.NixlLeased.decode, P.NixlLeased.decode_late, P.NixlMeta.decode, lambda b: P.decode_sums(b, 3)):
        try:
            decode(body)
        except P.ProtocolError:
            pass


def test_a_checksum_list_of_another_length_is_refused():
    with pytest.raises(P.ProtocolError):
        P.decode_sums(P.encode_sums([1, 2]), 3)
    with pytest.raises(P.ProtocolError):
        P.NixlLeased.decode_late(P.NixlLeased(1, 2, ((0, 0), (8, 0))).encode() + P.encode_bitmap([True]))


def test_an_offer_without_an_agent_or_a_region_is_refused():
    for bad in (
        P.NixlMeta(True, "", "", b"md", 1, 1),
        P.NixlMeta(True, "", "a", b"", 1, 1),
        P.NixlMeta(True, "", "a", b"md", 0, 1),
        P.NixlMeta(True, "", "a", b"md", 1, 0),
    ):
        with pytest.raises(P.ProtocolError):
            P.NixlMeta.decode(bad.encode())


def _leases(tier, lease_s=10.0, crc_pool=None):
    addr, nbytes = tier.arena_region
    return BlockLeases(tier, addr, nbytes, lease_s, Counter(), crc_pool=crc_pool)


_lease_ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(0, 11)),  # store chunk i (evicts what is not pinned)
        st.tuples(st.just("lease"), st.lists(st.integers(0, 11), min_size=1, max_size=4), st.booleans()),
        st.tuples(st.just("release"), st.integers(0, 50)),
        st.tuples(st.just("wait"), st.floats(0, 8)),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(ops=_lease_ops)
def test_leased_blocks_are_never_reused_and_every_lease_ends(ops):
    """A holder storing under pressure while leases are out: a leased block keeps its bytes (the
    CRC the lease gave) and its place until the lease is released or expires; then its pin goes."""
    tier, _scratch = _tier(chunks=6)
    keys = [bytes([i + 1]) * 16 for i in range(12)]
    pool = cf.ThreadPoolExecutor(2)
    leases = _leases(tier, lease_s=5.0, crc_pool=pool)  # a late lease's checksums come from sums()
    now, live = 0.0, {}  # lease id -> (expiry, [(key, offset, crc)])
    region = tier.arena_region[0]
    for op in ops:
        if op[0] == "put":
            k = keys[op[1]]
            if tier.lookup(k) == 0:
                try:
                    _put(tier, k, op[1])
                except ResourceExhaustedError:
                    assert sum(len(v[1]) for v in live.values()) >= 1  # only pins can fill the tier
        elif op[0] == "lease":
            got = leases.lease([keys[i] for i in op[1]], now=now, late=op[2])
            crcs = [crc for _, crc in got.blocks]
            if any(got.late):
                crcs = leases.sums(got.lease_id, 10.0)
            if got.blocks:
                held = [(keys[i], off, crc) for i, (off, _), crc in zip(op[1], got.blocks, crcs)]
                live[got.lease_id] = (now + 5.0, held)
            assert len(got.blocks) <= len(op[1])
        elif op[0] == "release" and live:
            lid = sorted(live)[op[1] % len(live)]
            assert leases.release(lid)
            del live[lid]
            assert not leases.release(lid)  # once
        elif op[0] == "wait":
            now += op[1]
            n = leases.expire(now)
            gone = [lid for lid, (at, _) in live.items() if at <= now]
            assert n == len(gone)
            for lid in gone:
                del live[lid]
        for _lid, (_at, held) in live.items():
            for k, off, crc in held:
                views = tier.acquire_blobs(k)
                assert views, "a leased chunk left the tier"
                v = views[0]
                assert np.frombuffer(v, np.uint8).ctypes.data == region + off
                assert _core.crc32c(v) == crc
                v.release()
                del views
                tier.release_blobs(k)
        assert tier.stats()["index"]["pinned"] == len({k for _, h in live.values() for k, _, _ in h})
        assert leases.held() == len(live)
    leases.close()
    pool.shutdown()
    assert tier.stats()["index"]["pinned"] == 0


def test_a_late_lease_names_its_checksums_while_it_lives():
    tier, _s = _tier()
    for i, k in enumerate(KEYS[:3]):
        _put(tier, k, i)
    pool = cf.ThreadPoolExecutor(2)
    leases = _leases(tier, crc_pool=pool)
    want = [_core.crc32c(_blob(tier, k)) for k in KEYS[:3]]
    got = leases.lease(KEYS[:2], late=True)
    assert got.late == (True, True) and [c for _, c in got.blocks] == [0, 0]  # the tier kept none
    assert leases.sums(got.lease_id, 10.0) == want[:2]
    assert leases.counters["nixl_checksums_late"] == 2
    # Computed once, kept by the tier: the next lease names them at once (and a new one late).
    again = leases.lease(KEYS[:3], late=True)
    assert again.late == (False, False, True)
    assert [c for _, c in again.blocks[:2]] == want[:2]
    assert leases.sums(again.lease_id, 10.0) == want
    assert leases.release(got.lease_id)
    assert leases.sums(got.lease_id, 10.0) is None  # gone: nothing to name
    leases.close()
    pool.shutdown()
    assert tier.stats()["index"]["pinned"] == 0


def test_a_lease_covers_only_the_leading_chunks_held():
    tier, _s = _tier()
    for i, k in enumerate(KEYS[:3]):
        _put(tier, k, i)
    leases = _leases(tier)
    got = leases.lease([KEYS[0], KEYS[1], KEYS[5], KEYS[2]])
    assert len(got.blocks) == 2
    assert [c for _, c in got.blocks] == [_core.crc32c(_blob(tier, k)) for k in KEYS[:2]]
    assert leases.lease([KEYS[6]]).blocks == ()
    assert leases.held() == 1  # an empty lease holds nothing
    leases.close()
    assert tier.stats()["index"]["pinned"] == 0


def test_nixl_frames_before_the_handshake_drop_the_connection():
    """NIXL metadata is never sent to a connection that has not proved the secret."""
    tier, _s = _tier()
    svc = _svc(tier)
    try:
        for kind in (P.Kind.NIXL_META_REQ, P.Kind.NIXL_LEASE):
            with socket.create_connection(svc.address, timeout=5) as s:
                s.sendall(P.encode_frame(kind, 1, P.encode_keys(KEYS[:1]) if kind == P.Kind.NIXL_LEASE else b""))
                s.settimeout(5)
                got = b""
                try:
                    while chunk := s.recv(65536):
                        got += chunk
                except OSError:
                    pass
            assert bytes([P.Kind.NIXL_META]) not in got[:16] and b"nixlSerDes" not in got
        wait_until(lambda: svc.counters["protocol_errors"] >= 2)
        assert svc.counters["nixl_leases"] == 0
    finally:
        svc.close()


def test_transport_tcp_offers_no_nixl_and_says_so():
    tier, _s = _tier()
    svc = _svc(tier, transport="tcp")
    try:
        st_ = svc.stats()
        assert st_["data_path"] == "tcp" and st_["nixl"] == {"off": "transport: tcp"}
    finally:
        svc.close()


@pytest.mark.skipif(NIXL_REASON is None, reason="nixl is installed here")
def test_transport_nixl_without_the_package_refuses_to_start_and_auto_falls_back():
    tier, _s = _tier()
    with pytest.raises(UnavailableError, match=r"peers\.transport=nixl.*nixl"):
        _svc(tier, transport="nixl")
    svc = _svc(tier)  # auto: the TCP stream, and why
    try:
        assert svc.stats()["data_path"] == "tcp" and "nixl" in svc.stats()["nixl"]["off"]
    finally:
        svc.close()


# -- pulls over NIXL, in one process ---------------------------------------------------------------


def _pair(holder_kw=None, puller_kw=None):
    (ta, sa), (tc, sc) = _tier(), _tier()
    a = _svc(ta, **(holder_kw or {}))
    c = _svc(tc, seeds=(f"{a.address[0]}:{a.address[1]}",), **(puller_kw or {}))
    for i, k in enumerate(KEYS[:4]):
        _put(ta, k, i)
    a.note_stored(KEYS[:4])
    wait_until(lambda: c.lookup(KEYS[:4]) == 4)
    return (a, ta, sa), (c, tc, sc)


def _load(c, n=4):
    op = c.load(KEYS[:n], np.arange(n), 0)
    if op.transfer is not None:
        op.transfer.wait(5)
    return op.chunks


@pytest.fixture(params=["one_read", "a_read_per_block"])
def reads(request, monkeypatch):
    """A pull's blocks in one NIXL read, or one read per block (each checked and committed while
    the next one moves), as 32 MiB blobs are read in production."""
    if request.param == "a_read_per_block":
        monkeypatch.setattr(nixl_path, "DEFAULT_MAX_POST_BYTES", BLOB)
    return request.param


@needs_nixl
def test_a_pull_over_nixl_is_bit_exact_and_releases_its_lease(reads):
    (a, ta, _), (c, _tc, sc) = _pair()
    try:
        assert _load(c) == 4
        assert bytes(sc[: 4 * BLOB]) == b"".join(_blob(ta, k) for k in KEYS[:4])
        assert c.counters["chunks_pulled_nixl"] == 4 and c.counters["nixl_reads_done"] == 1
        assert c.stats()["nixl"]["peers"][a.node_id] == "nixl"
        assert a.counters["nixl_chunks_leased"] == 4 and a.counters["chunks_served"] == 4
        wait_until(lambda: a.stats()["nixl"]["leases_held"] == 0)  # released by the puller
        assert ta.stats()["index"]["pinned"] == 0
        assert c.pull_rate(min_bytes=1) is not None
    finally:
        c.close()
        a.close()


@needs_nixl
@pytest.mark.parametrize("answer", ["none", "a_short_list"])
def test_late_checksums_that_do_not_come_are_misses_never_unchecked_commits(monkeypatch, answer):
    """A late lease whose NIXL_SUMS names nothing (the holder's checksums missed the deadline, or
    the lease is gone) or a list of the wrong length: the chunks read are misses, their blocks
    given back; a malformed answer also counts against the holder."""
    if answer == "none":
        monkeypatch.setattr(BlockLeases, "sums", lambda self, lease_id, timeout_s: None)
    else:
        real = BlockLeases.sums
        monkeypatch.setattr(BlockLeases, "sums", lambda self, lease_id, timeout_s: real(self, lease_id, timeout_s)[:-1])
    (a, ta, _), (c, tc, _sc) = _pair()
    try:
        assert _load(c) == 0
        assert a.counters["nixl_checksums_late"] == 4
        assert c.counters["nixl_checksums_missing"] == 1 and c.counters["chunks_pulled_nixl"] == 0
        assert all(tc.lookup(k) == 0 for k in KEYS[:4]) and tc.stats()["index"]["writing"] == 0
        if answer == "none":
            assert c.counters["nixl_sums_not_given"] == 1 and not c.bad_peers
        else:
            assert c.counters["protocol_errors"] == 1 and c.bad_peers[a.node_id] == 1
        wait_until(lambda: a.stats()["nixl"]["leases_held"] == 0)  # released all the same
        assert ta.stats()["index"]["pinned"] == 0
    finally:
        c.close()
        a.close()


@needs_nixl
@pytest.mark.parametrize("who", ["holder", "puller"])
def test_a_mixed_cluster_streams_to_and_from_a_member_without_nixl(who):
    tcp = {"transport": "tcp"}
    (a, ta, _), (c, _tc, sc) = _pair(tcp if who == "holder" else None, tcp if who == "puller" else None)
    try:
        assert _load(c) == 4
        assert bytes(sc[: 4 * BLOB]) == b"".join(_blob(ta, k) for k in KEYS[:4])
        assert c.counters["chunks_pulled"] == 4 and c.counters["chunks_pulled_nixl"] == 0
        assert a.counters["nixl_leases"] == 0 and a.counters["chunks_served"] == 4
        if who == "holder":  # it offered no NIXL in the handshake: never asked for metadata
            assert c.stats()["nixl"]["peers"][a.node_id] == "tcp"
            assert c.counters["nixl_peers_tcp_only"] == 1 and c.counters["nixl_peers_refused"] == 0
    finally:
        c.close()
        a.close()


@needs_nixl
@pytest.mark.parametrize(
    "bad",
    ["garbage", "tag_then_garbage", "another_agent_name", "other_members_metadata", "region_too_small"],
)
def test_metadata_that_is_not_the_holders_own_is_refused_and_it_is_streamed(monkeypatch, bad):
    other = PeerService(_tier()[0], FP, PeerConfig(secret=SECRET, node_id="other")).start()
    real_meta = NixlPath.meta

    def meta(self):
        m = real_meta(self)
        if self._node_id == "other":
            return m
        md = {
            "garbage": b"\x00" * 300,
            "tag_then_garbage": b"nixlSerDes|" + b"\x07" * 300,
            "other_members_metadata": other._nixl.meta().metadata,
        }.get(bad, m.metadata)
        agent = "someone-else" if bad == "another_agent_name" else m.agent
        size = BLOB // 2 if bad == "region_too_small" else m.region_bytes
        return P.NixlMeta(True, "", agent, md, m.region_addr, size)

    monkeypatch.setattr(NixlPath, "meta", meta)
    (a, ta, _), (c, tc, sc) = _pair()
    try:
        got = _load(c)
        if bad == "region_too_small":  # loads, but a lease outside it is refused: a miss
            assert got == 0 and c.counters["protocol_errors"] == 1
            assert tc.stats()["index"]["writing"] == 0 and all(tc.lookup(k) == 0 for k in KEYS[:4])
        else:
            assert got == 4
            assert bytes(sc[: 4 * BLOB]) == b"".join(_blob(ta, k) for k in KEYS[:4])
            assert c.counters["nixl_peers_refused"] == 1 and c.bad_peers[a.node_id] == 1
            assert c.counters["chunks_pulled_nixl"] == 0 and c.stats()["nixl"]["peers"][a.node_id] == "tcp"
    finally:
        c.close()
        a.close()
        other.close()


@needs_nixl
def test_a_lease_that_runs_out_before_the_read_is_a_miss(monkeypatch):
    (a, _ta, _), (c, tc, _sc) = _pair()
    try:
        a._nixl.leases.lease_s = 0.01  # shorter than the puller's safety margin
        assert _load(c) == 0
        assert c.counters["pull_deadline_misses"] == 1 and c.counters["chunks_pulled"] == 0
        assert tc.stats()["index"]["writing"] == 0 and all(tc.lookup(k) == 0 for k in KEYS[:4])
        wait_until(lambda: a.stats()["nixl"]["leases_held"] == 0)
    finally:
        c.close()
        a.close()


@needs_nixl
def test_blocks_read_before_the_holder_is_lost_are_kept(monkeypatch):
    monkeypatch.setattr(nixl_path, "DEFAULT_MAX_POST_BYTES", BLOB)  # a read per block
    real, calls = NixlEndpoint.read, []

    def lost_at_the_third(self, peer, pieces, deadline_s, **kw):
        calls.append(len(pieces))
        if len(calls) == 3:
            return ReadOutcome(PEER_LOST, "killed", 0.0, 0)
        return real(self, peer, pieces, deadline_s, **kw)

    monkeypatch.setattr(NixlEndpoint, "read", lost_at_the_third)
    (a, ta, _), (c, tc, _sc) = _pair()
    try:
        assert _load(c) == 2  # the two whole blocks, checked; the rest are misses
        assert calls == [1, 1, 1] and c.counters["nixl_reads_peer_lost"] == 1
        assert [_blob(tc, k) == _blob(ta, k) for k in KEYS[:2]] == [True, True]
        assert tc.lookup(KEYS[2]) == 0 and tc.stats()["index"]["writing"] == 0
        assert c.stats()["nixl"]["peers"].get(a.node_id) is None  # forgotten: fetched again next time
    finally:
        c.close()
        a.close()


@needs_nixl
@pytest.mark.parametrize("late", [False, True], ids=["in_the_lease", "late_sums"])
def test_a_block_whose_checksum_differs_is_a_miss(monkeypatch, reads, late):
    monkeypatch.setattr(nixl_path, "LATE_CHECKSUMS", late)
    if late:  # the holder names the checksums after the lease (NIXL_SUMS)
        real_sums = BlockLeases.sums

        def wrong_second_sum(self, lease_id, timeout_s):
            crcs = real_sums(self, lease_id, timeout_s)
            return crcs[:1] + [crcs[1] ^ 1] + crcs[2:] if crcs and len(crcs) > 1 else crcs

        monkeypatch.setattr(BlockLeases, "sums", wrong_second_sum)
    else:
        real = BlockLeases.lease

        def wrong_second_crc(self, keys, now=None, late=False):
            got = real(self, keys, now, late)
            blocks = list(got.blocks)
            if len(blocks) > 1:
                blocks[1] = (blocks[1][0], blocks[1][1] ^ 1)
            return P.NixlLeased(got.lease_id, got.lease_ms, tuple(blocks), got.late)

        monkeypatch.setattr(BlockLeases, "lease", wrong_second_crc)
    (a, ta, _), (c, tc, _sc) = _pair()
    try:
        assert _load(c) == 1  # the first chunk; the second fails its check, so the run stops
        assert c.counters["checksum_failures"] == 1
        assert a.counters["nixl_checksums_late"] == (4 if late else 0)
        assert tc.lookup(KEYS[1]) == 0 and tc.stats()["index"]["writing"] == 0
        assert _blob(tc, KEYS[0]) == _blob(ta, KEYS[0])
    finally:
        c.close()
        a.close()


# -- a holder killed mid-READ, across processes ------------------------------------------------------


@needs_nixl
@pytest.mark.multiproc
def test_a_holder_killed_mid_read_is_a_miss_within_the_deadline(tmp_path, monkeypatch):
    from test_p2p_multiproc import CT, FAST, Member, toks, wait_for

    # UCX over TCP emulates a READ with messages the holder must answer; it stops itself right
    # after it sends the lease, so the READ is in flight when it is killed.
    monkeypatch.setenv("UCX_TLS", "tcp")
    f = Member(tmp_path, "F")
    h = Member(tmp_path, "H", seeds=[f.address], stop_after_leased=True)
    try:
        t = toks(707, 8)
        src = h.call("compute_store", tokens=t, pages=list(range(32)))
        assert src["stored"] == 8
        wait_for(lambda: f.call("lookup", tokens=t)["tokens"] == 8 * CT, 20, "F to see H's chunks")
        f.send("load", tokens=t, pages=list(range(32, 64)))
        wait_for(lambda: member_process.is_stopped(h.proc.pid), 20, "H to stop after its lease")
        time.sleep(0.3)  # the lease leaves H only once H is stopped; F's READ then waits on H
        h.kill()
        t0 = time.monotonic()
        got = f._read(30)
        assert "error" not in got, got
        assert got["tokens"] == 0  # the READ's chunks are misses: never a partial blob
        assert time.monotonic() - t0 < FAST["request_timeout_s"] + 2.0
        st_ = f.call("stats")["stats"]
        assert st_["index"]["writing"] == 0, st_["index"]
        peers = st_["peers"]
        assert peers.get("nixl_reads_peer_lost", 0) + peers.get("nixl_reads_deadline", 0) == 1, peers
        assert peers.get("chunks_pulled", 0) == 0
        # F keeps serving: it answers at once and still computes and shares.
        assert f.call("lookup", tokens=toks(808, 2))["tokens"] == 0
        assert f.call("compute_store", tokens=toks(808, 2), pages=list(range(8)))["stored"] == 2
    finally:
        f.stop()
        if h.proc.poll() is None:
            h.kill()


# -- where NIXL pays -------------------------------------------------------------------------------


def test_nixl_pays_on_this_host_or_with_an_rdma_device(tmp_path, monkeypatch):
    assert nixl_path._is_this_host("127.0.0.1") and nixl_path._is_this_host("localhost")
    assert not nixl_path._is_this_host("192.0.2.1")  # TEST-NET-1: never an address of this machine
    assert not nixl_path._is_this_host("no-such-host.invalid")
    assert not nixl_path._has_rdma_device(str(tmp_path / "absent"))
    assert not nixl_path._has_rdma_device(str(tmp_path))
    (tmp_path / "mlx5_0").mkdir()
    assert nixl_path._has_rdma_device(str(tmp_path))
    monkeypatch.setattr(nixl_path, "_has_rdma_device", lambda: False)
    assert nixl_path.nixl_pays("127.0.0.1") and not nixl_path.nixl_pays("192.0.2.1")
    monkeypatch.setattr(nixl_path, "_has_rdma_device", lambda: True)
    assert nixl_path.nixl_pays("192.0.2.1")


@needs_nixl
@pytest.mark.parametrize("transport", ["auto", "nixl"])
def test_auto_keeps_the_stream_where_nixl_would_not_pay(monkeypatch, transport):
    monkeypatch.setattr(nixl_path, "nixl_pays", lambda host: False)  # as for a peer on another host, no RDMA
    (a, ta, _), (c, _tc, sc) = _pair(puller_kw={"transport": transport})
    try:
        assert _load(c) == 4
        assert bytes(sc[: 4 * BLOB]) == b"".join(_blob(ta, k) for k in KEYS[:4])
        if transport == "auto":
            assert c.counters["nixl_peers_stream_faster"] == 1 and c.counters["chunks_pulled_nixl"] == 0
            assert c.stats()["nixl"]["peers"][a.node_id] == "tcp"
        else:  # asked for NIXL: NIXL with every peer that offers it
            assert c.counters["chunks_pulled_nixl"] == 4
    finally:
        c.close()
        a.close()

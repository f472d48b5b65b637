"""Inbound connection slots of the peer service: every per-connection structure stays bounded
whatever connects (no secret needed to connect), and one peer identity cannot keep the others out."""

from __future__ import annotations

import socket

import numpy as np
import pytest
from _util import wait_until
from hypothesis import given, settings
from hypothesis import strategies as st
from kvtier import _core
from kvtier.p2p import PeerConfig, PeerService
from kvtier.p2p import protocol as P
from kvtier.p2p.service import InboundSlots
from kvtier.p2p.transport import Deadline, Identity, connect

SECRET = b"slots-test-secret-0123456789"
BLOB = 64 << 10
FP = b"F" * 16


def _tier():
    scratch = np.zeros(8 * BLOB, dtype=np.uint8)
    tier = _core.CpuTier([(scratch.ctypes.data, BLOB, BLOB, 8)], -1, 1, [[0]], 16 * BLOB, "cpu", 1 << 20, 1)
    return tier, scratch


def _svc(**kw):
    tier, scratch = _tier()
    cfg = {
        "secret": SECRET,
        "gossip_interval_s": 0.05,
        "ack_timeout_s": 0.04,
        "connect_timeout_s": 1.0,
    }  # the handshake deadline is twice connect_timeout_s
    cfg.update(kw)
    svc = PeerService(tier, FP, PeerConfig(**cfg)).start()
    svc._test_keep = (tier, scratch)
    return svc


def _login(svc, name: str, secret: bytes = SECRET):
    """An authenticated connection as ``name``, or None if the server refused it."""
    try:
        return connect(*svc.address, Identity(name, FP, BLOB, secret), Deadline(5), 5)
    except (OSError, P.ProtocolError, Exception):  # noqa: BLE001 - any failure is a refusal here
        return None


def _per_connection_sizes(svc) -> dict[str, int]:
    with svc._lock:
        return {
            "threads": len(svc._threads),
            "server_conns": len(svc._server_conns),
            "bad_peers": len(svc.bad_peers),
            **svc._slots.sizes(),
        }


def _hello() -> bytes:
    return P.encode_frame(P.Kind.HELLO, 0, P.Hello("x", b"n" * 32, FP, BLOB, P.LOCAL_ALGORITHMS_MASK).encode())


# -- the slot rules, on their own ------------------------------------------------------------------

_ops = st.lists(
    st.one_of(
        st.tuples(st.just("accept")),
        st.tuples(st.just("login"), st.integers(0, 5)),  # accept + admit as identity i
        st.tuples(st.just("drop"), st.integers(0, 200)),  # the n-th live connection goes away
        st.tuples(st.just("request"), st.integers(0, 200)),
        st.tuples(st.just("wait"), st.floats(0, 400)),
    ),
    max_size=120,
)


@settings(max_examples=200, deadline=None)
@given(capacity=st.integers(1, 12), pending_max=st.integers(1, 4), ops=_ops)
def test_slots_are_bounded_and_a_login_is_refused_only_at_its_fair_share(capacity, pending_max, ops):
    slots = InboundSlots(capacity, pending_max, idle_timeout_s=300.0, scarce_idle_timeout_s=10.0)
    now, live, pending, serial = 0.0, {}, [], 0  # live: conn -> identity
    for op in ops:
        if op[0] == "accept":
            serial += 1
            if slots.accept(serial):
                pending.append(serial)
        elif op[0] == "login":
            serial += 1
            if not slots.accept(serial):
                assert slots.sizes()["pending"] == pending_max
                continue
            peer = f"id{op[1]}"
            held = {p: sum(1 for q in live.values() if q == p) for p in set(live.values())}
            mine = held.get(peer, 0)
            refused, victim = slots.admit(serial, peer, now)
            if refused:
                # Refused only when full and nobody holds two more than this identity.
                assert len(live) == capacity and max(held.values()) <= mine + 1
                assert "busy" in refused and repr(peer) in refused
                slots.release(serial)
            else:
                if victim is not None:
                    assert len(live) == capacity
                    assert held[live[victim]] == max(held.values()) >= mine + 2
                    del live[victim]
                live[serial] = peer
        elif op[0] == "drop" and (live or pending):
            conns = list(live) + pending
            c = conns[op[1] % len(conns)]
            slots.release(c)
            live.pop(c, None)
            if c in pending:
                pending.remove(c)
        elif op[0] == "request" and live:
            c = list(live)[op[1] % len(live)]
            assert slots.begin(c, now)
            slots.end(c, now)
        elif op[0] == "wait":
            limit = slots.idle_limit()
            assert limit == (10.0 if 2 * len(live) >= capacity else 300.0)
            now += op[1]
            for c in slots.expire(now):
                assert c in live
                del live[c]
        sizes = slots.sizes()
        assert sizes["admitted"] == len(live) <= capacity
        assert sizes["pending"] <= pending_max
        assert sizes["identities"] == len(set(live.values()))
    for c in list(live) + pending:
        slots.release(c)
    assert slots.sizes() == {"pending": 0, "admitted": 0, "identities": 0, "busy": 0}


def test_an_evicted_connection_cannot_start_a_request():
    slots = InboundSlots(2, 2, 300.0, 10.0)
    for c, who in ((1, "a"), (2, "a")):
        assert slots.accept(c) and slots.admit(c, who, 0.0) == (None, None)
    assert slots.begin(2, 1.0)  # busy: the idle one goes first
    assert slots.accept(3)
    assert slots.admit(3, "b", 2.0) == (None, 1)
    assert not slots.begin(1, 3.0)
    slots.end(1, 3.0)  # a late end of a released connection is ignored
    assert slots.sizes() == {"pending": 0, "admitted": 2, "identities": 2, "busy": 1}


# -- over sockets ----------------------------------------------------------------------------------


def _garbage(addr):
    with socket.create_connection(addr, timeout=5) as s:
        s.sendall(b"\xff" * 64)


def _hangup(addr):
    socket.create_connection(addr, timeout=5).close()


def _half_handshake(addr):
    with socket.create_connection(addr, timeout=5) as s:
        s.sendall(_hello())


def _wrong_secret(addr):
    c = _login_addr(addr, "intruder", b"w" * 32)
    assert c is None


def _login_addr(addr, name, secret):
    try:
        return connect(*addr, Identity(name, FP, BLOB, secret), Deadline(5), 5)
    except Exception:  # noqa: BLE001
        return None


def _authenticated(addr):
    c = connect(*addr, Identity("member", FP, BLOB, SECRET), Deadline(5), 5)  # raises what refused it
    c.close()


CYCLES = {
    "garbage": _garbage,
    "hangup": _hangup,
    "half_handshake": _half_handshake,
    "wrong_secret": _wrong_secret,
    "authenticated": _authenticated,
}


@pytest.mark.parametrize("kind", [*CYCLES, "mixed"])
def test_connect_close_cycles_leave_per_connection_state_bounded(kind):
    svc = _svc(max_connections=8)
    try:
        fns = list(CYCLES.values()) if kind == "mixed" else [CYCLES[kind]]
        for i in range(200):
            fns[i % len(fns)](svc.address)
            sizes = _per_connection_sizes(svc)
            assert sizes["threads"] == 2  # the accept and gossip loops only
            assert sizes["server_conns"] <= 8 + 4 and sizes["pending"] <= 4 and sizes["admitted"] <= 8
            # A slot is freed when the server's thread sees the close, and a connection still in the
            # listen backlog holds none yet: the next cycle waits until the server took this one and
            # let it go (a login while every slot is taken is refused, as it should be).
            wait_until(
                lambda n=i + 1: (
                    svc.counters["connections_accepted"] == n and _per_connection_sizes(svc)["server_conns"] == 0
                )
            )
        assert svc.counters["connections_refused"] == 0
        wait_until(lambda: _per_connection_sizes(svc)["server_conns"] == 0)
        assert _per_connection_sizes(svc) == {
            "threads": 2,
            "server_conns": 0,
            "bad_peers": 0,
            "pending": 0,
            "admitted": 0,
            "identities": 0,
            "busy": 0,
        }
        _authenticated(svc.address)  # still serving
    finally:
        svc.close()


def test_half_open_connections_hold_only_the_handshake_slots():
    svc = _svc(max_connections=8)
    held = []
    try:
        for _ in range(30):  # never send a byte: each waits for the handshake deadline
            held.append(socket.create_connection(svc.address, timeout=5))
        wait_until(lambda: svc.counters["connections_refused"] >= 20)
        sizes = _per_connection_sizes(svc)
        assert sizes["pending"] <= 4 and sizes["server_conns"] <= 4 and sizes["threads"] == 2
        wait_until(lambda: _per_connection_sizes(svc)["server_conns"] == 0)  # handshake deadline
        c = _login(svc, "member")
        assert c is not None
        c.close()
    finally:
        for s in held:
            s.close()
        svc.close()


@pytest.mark.parametrize(("capacity", "others"), [(8, 1), (12, 3), (16, 5)])
def test_one_identity_cannot_lock_out_the_others(capacity, others):
    svc = _svc(max_connections=capacity)
    hog, mine = [], []
    try:
        for _ in range(capacity + 4):  # more than all the slots, every one idle
            c = _login(svc, "greedy")
            if c is not None:
                hog.append(c)
        assert len(hog) == capacity  # the rest refused: it holds every slot
        refused = 0
        for i in range(100):  # short logins from other members
            c = _login(svc, f"member-{i % others}")
            if c is None:
                refused += 1
            else:
                c.close()
                # until the server sees the hang-up its slot is held: wait for that, not for time
                wait_until(lambda: svc.stats()["server_slots"]["identities"] == 1)
        assert refused == 0
        assert svc.counters["logins_refused"] == 4  # greedy's own, beyond all the slots
        wait_until(lambda: svc.stats()["server_slots"]["identities"] == 1)  # their hang-ups seen
        # Each other identity keeps its share open at once: floor(capacity / identities) - 1.
        share = capacity // (others + 1) - 1
        for _ in range(share):
            for j in range(others):
                c = _login(svc, f"member-{j}")
                assert c is not None, (j, svc.stats()["server_slots"])
                mine.append(c)
                # the evicted connection's thread unwinds before its place at accept is free
                wait_until(lambda: (n := _per_connection_sizes(svc))["server_conns"] == n["admitted"])
        stats = svc.stats()
        assert stats["server_slots"]["admitted"] <= capacity
        assert stats["connections_evicted"] >= others * share
    finally:
        for c in hog + mine:
            c.close()
        svc.close()


def test_idle_connections_expire_sooner_when_slots_are_scarce():
    svc = _svc(max_connections=4, scarce_idle_timeout_s=0.2)
    try:
        conns = [_login(svc, "a"), _login(svc, "b")]  # half the slots: scarce
        assert all(conns)

        def closed_by_server(c):
            c.sock.settimeout(0.05)
            try:
                return c.sock.recv(1) == b""
            except TimeoutError:
                return False
            except OSError:
                return True

        wait_until(lambda: all(closed_by_server(c) for c in conns))
        assert svc.counters["connections_idle_closed"] == 2
        assert svc.stats()["server_slots"]["admitted"] == 0
        for c in conns:
            c.close()
    finally:
        svc.close()

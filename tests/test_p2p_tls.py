"""TLS on the peer channel: mutual TLS with a cluster CA, the HMAC handshake inside it and bound
to the server's certificate, clear refusals of missing or mismatched files. Certificates are made
here with the openssl command line."""

from __future__ import annotations

import select
import shutil
import socket
import subprocess
import threading

import numpy as np
import pytest
from _util import wait_until
from kvtier import _core
from kvtier.errors import InvalidArgumentError
from kvtier.p2p import PeerConfig, PeerService
from kvtier.p2p.transport import Deadline, Identity, TlsSettings, connect

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command line")

SECRET = b"tls-test-secret-0123456789abcdef"
BLOB = 64 << 10
FP = b"F" * 16
KEYS = [bytes([i]) * 16 for i in range(1, 5)]


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(d, name):
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.pem",
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
        cwd=d,
    )


def _member(d, name, ca):
    _openssl(
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        "-subj",
        f"/CN={name}",
        cwd=d,
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        f"{ca}.pem",
        "-CAkey",
        f"{ca}.key",
        "-CAcreateserial",
        "-out",
        f"{name}.pem",
        "-days",
        "2",
        cwd=d,
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _ca(d, "rogue_ca")
    for name in ("a", "b"):
        _member(d, name, "ca")
    _member(d, "rogue", "rogue_ca")
    return d


def _tls(pki, name, ca="ca"):
    return {
        "tls_cert_file": str(pki / f"{name}.pem"),
        "tls_key_file": str(pki / f"{name}.key"),
        "tls_ca_file": None if ca is None else str(pki / f"{ca}.pem"),
    }


def _tier():
    scratch = np.zeros(8 * BLOB, dtype=np.uint8)
    return _core.CpuTier([(scratch.ctypes.data, BLOB, BLOB, 8)], -1, 1, [[0]], 16 * BLOB, "cpu", 1 << 20, 1), scratch


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


def _put(tier, key, fill):
    view = tier.begin_put(key)
    np.frombuffer(view, dtype=np.uint8)[:] = (np.arange(BLOB) ^ fill).astype(np.uint8)
    view.release()
    tier.commit_put(key)


def _blob(tier, key):
    views = tier.acquire_blobs(key)
    out = bytes(views[0])
    views[0].release()
    tier.release_blobs(key)
    return out


@pytest.mark.parametrize("ca", ["ca", None], ids=["mutual", "server_cert_only"])
def test_members_share_chunks_over_tls(pki, ca):
    (ta, _sa), (tb, sb) = _tier(), _tier()
    a = _svc(ta, **_tls(pki, "a", ca))
    b = _svc(tb, seeds=(f"{a.address[0]}:{a.address[1]}",), **_tls(pki, "b", ca))
    try:
        for i, k in enumerate(KEYS):
            _put(ta, k, i + 1)
        a.note_stored(KEYS)
        wait_until(lambda: b.lookup(KEYS) == len(KEYS))
        op = b.load(KEYS, np.arange(len(KEYS)), 0)
        op.transfer.wait(5)
        assert op.chunks == len(KEYS)
        assert bytes(sb[: len(KEYS) * BLOB]) == b"".join(_blob(ta, k) for k in KEYS)
        assert a.stats()["tls"] == b.stats()["tls"] == ("mutual" if ca else "server")
        assert a.counters["tls_failures"] == 0 and a.counters["auth_failures"] == 0
    finally:
        b.close()
        a.close()


def _client_tls(pki, name, ca="ca"):
    t = _tls(pki, name, ca)
    return TlsSettings(t["tls_cert_file"], t["tls_key_file"], t["tls_ca_file"])


def test_a_certificate_from_another_ca_is_refused_both_ways(pki):
    ta, _sa = _tier()
    a = _svc(ta, **_tls(pki, "a"))
    try:
        me = Identity("rogue", FP, BLOB, SECRET)  # even with the cluster secret
        with pytest.raises(OSError):  # our CA did not sign a's certificate: the client refuses
            connect(*a.address, me, Deadline(5), 5, _client_tls(pki, "rogue", "rogue_ca"))
        with pytest.raises(OSError):  # a refuses ours
            connect(*a.address, me, Deadline(5), 5, _client_tls(pki, "rogue", "ca"))
        wait_until(lambda: a.counters["tls_failures"] >= 1)
        assert a.counters["auth_failures"] == 0  # never got as far as the HMAC handshake
        c = connect(*a.address, Identity("b", FP, BLOB, SECRET), Deadline(5), 5, _client_tls(pki, "b"))
        c.close()
    finally:
        a.close()


def test_plain_and_tls_members_do_not_talk(pki):
    ta, _sa = _tier()
    a = _svc(ta, **_tls(pki, "a"))
    tb, _sb = _tier()
    b = _svc(tb)  # plain TCP
    try:
        with pytest.raises((OSError, Exception)):
            connect(*a.address, Identity("p", FP, BLOB, SECRET), Deadline(2), 2)
        wait_until(lambda: a.counters["tls_failures"] >= 1)
        with pytest.raises(OSError):
            connect(*b.address, Identity("t", FP, BLOB, SECRET), Deadline(2), 2, _client_tls(pki, "a"))
    finally:
        b.close()
        a.close()


# The relay's patience: long enough that a loaded CI machine's stalls do not end a relayed
# connection before the handshake decides (it closes as soon as either side does).
RELAY_PATIENCE_S = 30


def _relay(server_addr, own_tls: TlsSettings):
    """An on-path relay: terminates the client's TLS with its own certificate, opens its own TLS
    to the server, and forwards the bytes (it does not know the secret)."""
    lst = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def pump(a, b):
        # One thread for both directions: an SSL socket must not be read and written from two
        # threads at once. Bytes already decrypted (pending) are forwarded before waiting again.
        peer = {a: b, b: a}
        try:
            while True:
                ready = [s for s in (a, b) if s.pending()] or select.select([a, b], [], [], RELAY_PATIENCE_S)[0]
                if not ready:
                    break
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        raise EOFError
                    peer[s].sendall(data)
        except (OSError, EOFError):
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def serve():
        lst.settimeout(0.1)
        while not stop.is_set():
            try:
                raw, _ = lst.accept()
            except TimeoutError:
                continue
            try:
                front = own_tls.wrap_server(raw, Deadline(RELAY_PATIENCE_S))
            except OSError:
                raw.close()
                continue
            try:
                back, _binding = own_tls.wrap_client(
                    socket.create_connection(server_addr, timeout=RELAY_PATIENCE_S), Deadline(RELAY_PATIENCE_S)
                )
            except OSError:
                front.close()
                continue
            front.settimeout(RELAY_PATIENCE_S)
            back.settimeout(RELAY_PATIENCE_S)
            threading.Thread(target=pump, args=(front, back), daemon=True).start()

    t = threading.Thread(target=serve, daemon=True)
    t.start()

    def close():
        stop.set()
        t.join(5)
        lst.close()

    return lst.getsockname(), close


def test_the_handshake_is_bound_to_the_servers_certificate(pki):
    """Without a CA nobody checks certificates, yet a relay with its own certificate cannot pass
    the HMAC handshake: both MACs cover the certificate each side saw."""
    ta, _sa = _tier()
    # The relay's two TLS handshakes and its pump thread come before the HELLO reaches the server:
    # a patient server, so that a busy machine shows the MAC check, not the handshake deadline.
    a = _svc(ta, connect_timeout_s=15.0, **_tls(pki, "a", None))
    relay_addr, close_relay = _relay(a.address, _client_tls(pki, "rogue", None))
    try:
        me = Identity("b", FP, BLOB, SECRET)
        tls = _client_tls(pki, "b", None)
        c = connect(*a.address, me, Deadline(30), 30, tls)  # directly: fine
        c.close()
        with pytest.raises(Exception, match="did not prove the cluster secret"):
            connect(*relay_addr, me, Deadline(30), 30, tls)
    finally:
        close_relay()
        a.close()


def test_missing_or_mismatched_files_are_refused_naming_the_key(pki, tmp_path):
    t = _tls(pki, "a")
    base = {"secret": SECRET}
    with pytest.raises(InvalidArgumentError, match=r"peers.tls_cert_file='/nope.pem' is not a file"):
        PeerConfig(**base, **{**t, "tls_cert_file": "/nope.pem"})
    with pytest.raises(InvalidArgumentError, match=r"peers.tls_key_file=.* is not a file"):
        PeerConfig(**base, **{**t, "tls_key_file": str(tmp_path / "none.key")})
    with pytest.raises(InvalidArgumentError, match=r"tls_cert_file=.*tls_key_file=.*another certificate"):
        PeerConfig(**base, **{**t, "tls_key_file": str(pki / "b.key")})
    with pytest.raises(InvalidArgumentError, match=r"needs both peers.tls_cert_file and peers.tls_key_file"):
        PeerConfig(**base, tls_ca_file=t["tls_ca_file"])
    with pytest.raises(InvalidArgumentError, match=r"needs both"):
        PeerConfig(**base, tls_cert_file=t["tls_cert_file"])
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(InvalidArgumentError, match=r"peers.tls_ca_file=.*not a PEM CA certificate"):
        PeerConfig(**base, **{**t, "tls_ca_file": str(junk)})
    with pytest.raises(InvalidArgumentError, match=r"peers.tls_cert_file=.*holds no PEM certificate"):
        PeerConfig(**base, **{**t, "tls_cert_file": str(junk)})
    assert PeerConfig(**base, **t).tls().mutual


def test_tls_keys_in_the_engine_config(pki, monkeypatch):
    from kvtier.config import KVTierConfig

    t = _tls(pki, "a")
    env = {
        "KVTIER_PEERS_TLS_CERT_FILE": t["tls_cert_file"],
        "KVTIER_PEERS_TLS_KEY_FILE": t["tls_key_file"],
        "KVTIER_PEERS_TLS_CA_FILE": t["tls_ca_file"],
    }
    cfg = KVTierConfig.load(env=env, peers={"listen": "127.0.0.1:0"})
    assert {k: cfg.peers[k] for k in t} == t
    peer = PeerConfig(secret=SECRET, **{k: v for k, v in cfg.peers.items() if v is not None and k != "seeds"})
    assert peer.tls().mutual
    with pytest.raises(InvalidArgumentError, match=r"peers.tls_ca_file"):
        KVTierConfig.load(env={}, peers={"tls_ca_file": 5})

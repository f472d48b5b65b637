"""TCP transport: deadline-bound framed I/O, optional TLS, the authenticated handshake, blob
streaming, and a pool of authenticated client connections.

Every blocking call takes a :class:`Deadline`; a socket operation never waits past it (a stalled
peer raises ``TimeoutError``). Any error leaves the connection in an unknown state, so the caller
closes it: connections are never reused after a failure.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import ssl
import threading
import time
from collections import defaultdict

from kvtier.errors import DeadlineExceededError, InvalidArgumentError, KVTierError
from kvtier.p2p import auth
from kvtier.p2p import protocol as P

# Checksummed right after each socket call, while in cache. bench_p2p on a 2-core VM: 256 KiB
# pieces reach 66% of a raw socket stream, 1 MiB 70%, 4 MiB 100%, 8 MiB 96%.
PIECE_BYTES = 4 << 20


class AuthenticationError(KVTierError):
    """The peer did not prove the cluster secret (or we could not)."""


class LoginRefusedError(KVTierError):
    """The peer proved the secret, but this server has no connection slot for it now."""


class Deadline:
    __slots__ = ("at",)

    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds

    def remaining(self) -> float:
        left = self.at - time.monotonic()
        if left <= 0:
            raise DeadlineExceededError("peer request deadline passed")
        return left

    def expired(self) -> bool:
        return time.monotonic() >= self.at

    def sub(self, seconds: float) -> Deadline:
        d = Deadline(0)
        d.at = min(self.at, time.monotonic() + seconds)
        return d


class TlsSettings:
    """TLS for the peer channel, from PEM files; both ends of a connection use it or neither.

    ``cert_file`` / ``key_file``: this member's certificate (chain, leaf first) and private key,
    presented when it serves and, with a CA, when it dials. ``ca_file``: the CA that signs the
    members' certificates; given, TLS is mutual (each side refuses a peer whose certificate that CA
    did not sign); absent, the channel is encrypted and the peer's certificate is checked only by
    the channel binding of the HMAC handshake (``binding``). Host names are not checked: members
    dial the addresses gossip gives them, and membership is the CA's signature plus the secret.

    Raises InvalidArgumentError naming the key when a file is missing or unreadable, the key does
    not match the certificate, or the CA file holds no certificate.
    """

    def __init__(self, cert_file: str, key_file: str, ca_file: str | None = None) -> None:
        for key, path in (
            ("peers.tls_cert_file", cert_file),
            ("peers.tls_key_file", key_file),
            ("peers.tls_ca_file", ca_file),
        ):
            if path is not None and not os.path.isfile(path):
                raise InvalidArgumentError(f"{key}={path!r} is not a file")
        self.cert_file, self.key_file, self.ca_file = cert_file, key_file, ca_file
        self.mutual = ca_file is not None
        try:
            with open(cert_file) as f:
                pem = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise InvalidArgumentError(f"peers.tls_cert_file={cert_file!r}: cannot read: {e}") from None
        first = re.search(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", pem, re.DOTALL)
        if first is None:
            raise InvalidArgumentError(f"peers.tls_cert_file={cert_file!r} holds no PEM certificate")
        # tls-server-end-point binding of this member's own certificate, as clients receive it.
        self.own_binding = hashlib.sha256(ssl.PEM_cert_to_DER_cert(first.group(0))).digest()
        self.server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.client.check_hostname = False
        for ctx in (self.server, self.client):
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            self.server.load_cert_chain(cert_file, key_file)
        except (ssl.SSLError, OSError) as e:
            raise InvalidArgumentError(
                f"peers.tls_cert_file={cert_file!r} / peers.tls_key_file={key_file!r}: cannot load "
                f"the certificate with its key (a key of another certificate, or not PEM): {e}"
            ) from None
        if ca_file is None:
            self.client.verify_mode = ssl.CERT_NONE
            return
        try:
            for ctx in (self.server, self.client):
                ctx.load_verify_locations(cafile=ca_file)
        except (ssl.SSLError, OSError) as e:
            raise InvalidArgumentError(f"peers.tls_ca_file={ca_file!r}: not a PEM CA certificate: {e}") from None
        self.server.verify_mode = ssl.CERT_REQUIRED
        self.client.verify_mode = ssl.CERT_REQUIRED
        self.client.load_cert_chain(cert_file, key_file)

    @classmethod
    def from_config(cls, cert_file: str | None, key_file: str | None, ca_file: str | None) -> TlsSettings | None:
        """None when no TLS key is set; InvalidArgumentError for an incomplete set."""
        if cert_file is None and key_file is None and ca_file is None:
            return None
        if cert_file is None or key_file is None:
            raise InvalidArgumentError(
                "peers: TLS needs both peers.tls_cert_file and peers.tls_key_file (got "
                f"tls_cert_file={cert_file!r}, tls_key_file={key_file!r}, tls_ca_file={ca_file!r})"
            )
        return cls(cert_file, key_file, ca_file)

    def wrap_server(self, sock: socket.socket, deadline: Deadline) -> ssl.SSLSocket:
        """The TLS handshake of an accepted socket; the socket is closed if it fails."""
        return _tls_handshake(self.server.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), deadline)

    def wrap_client(self, sock: socket.socket, deadline: Deadline) -> tuple[ssl.SSLSocket, bytes]:
        """(TLS socket, channel binding: SHA-256 of the certificate the server presented)."""
        tls = _tls_handshake(self.client.wrap_socket(sock, do_handshake_on_connect=False), deadline)
        der = tls.getpeercert(binary_form=True)
        if not der:
            tls.close()
            raise AuthenticationError("peer presented no TLS certificate")
        return tls, hashlib.sha256(der).digest()


def _tls_handshake(sock: ssl.SSLSocket, deadline: Deadline) -> ssl.SSLSocket:
    try:
        sock.settimeout(deadline.remaining())
        sock.do_handshake()
    except BaseException:
        sock.close()
        raise
    return sock


class Identity:
    """What this node declares in a handshake."""

    def __init__(self, node_id: str, fingerprint: bytes, blob_bytes: int, secret: bytes, caps: int = 0) -> None:
        self.node_id = node_id
        self.fingerprint = fingerprint
        self.blob_bytes = blob_bytes
        self.secret = secret
        self.caps = caps  # P.CAP_* bits this member offers (set before it connects or serves)


class Connection:
    """One TCP connection carrying frames. Not thread-safe: one user at a time."""

    def __init__(self, sock: socket.socket, addr) -> None:
        self.sock = sock
        self.addr = addr
        self.authenticated = False
        self.peer_id = ""
        self.peer_caps = 0  # P.CAP_* bits the peer offered in the handshake
        self.tls_binding = b""  # SHA-256 of the server's TLS certificate; empty over plain TCP
        self.algo = P.CRC32
        self.closed = False
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._hdr = bytearray(P.HEADER_BYTES)
        self._trailer = bytearray(P.TRAILER_BYTES)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    # -- raw I/O ----------------------------------------------------------------------------
    def send(self, data, deadline: Deadline) -> None:
        self.sock.settimeout(deadline.remaining())
        self.sock.sendall(data)

    def recv_into(self, view: memoryview, deadline: Deadline) -> None:
        off, n = 0, len(view)
        while off < n:
            self.sock.settimeout(deadline.remaining())
            got = self.sock.recv_into(view[off:])
            if got == 0:
                raise ConnectionError("peer closed the connection")
            off += got

    def recv_bytes(self, n: int, deadline: Deadline) -> bytes:
        buf = bytearray(n)
        self.recv_into(memoryview(buf), deadline)
        return bytes(buf)

    # -- frames -----------------------------------------------------------------------------
    def send_frame(self, kind: int, rid: int, body: bytes, deadline: Deadline) -> None:
        self.send(P.encode_frame(kind, rid, body), deadline)

    def recv_header(self, deadline: Deadline) -> P.Header:
        self.recv_into(memoryview(self._hdr), deadline)
        return P.decode_header(self._hdr, self.authenticated)

    def recv_body(self, h: P.Header, deadline: Deadline) -> bytes:
        body = self.recv_bytes(h.body_len, deadline) if h.body_len else b""
        P.check_body(h, body)
        return body

    def recv_frame(self, deadline: Deadline, *expect: int) -> tuple[P.Header, bytes]:
        h = self.recv_header(deadline)
        body = self.recv_body(h, deadline)
        if h.kind == P.Kind.ERROR and P.Kind.ERROR not in expect:
            raise P.ProtocolError(f"peer error: {body.decode('utf-8', 'replace')}")
        if expect and h.kind not in expect:
            raise P.ProtocolError(f"expected frame kind {expect}, got {h.kind}")
        return h, body

    def request(self, kind: int, rid: int, body: bytes, deadline: Deadline, *expect: int):
        self.send_frame(kind, rid, body, deadline)
        h, reply = self.recv_frame(deadline, *expect)
        if h.request_id != rid:
            raise P.ProtocolError(f"reply to request {h.request_id}, expected {rid}")
        return h, reply

    # -- blobs ------------------------------------------------------------------------------
    def send_blob(self, rid: int, key: bytes, fingerprint: bytes, blob, deadline: Deadline) -> None:
        """BLOB frame: metadata, then the payload in pieces (each checksummed right after it is
        sent, while cache-hot), then the trailer with the checksum."""
        n = len(blob)
        self.send_frame(P.Kind.BLOB, rid, P.encode_blob_meta(key, fingerprint, n, self.algo), deadline)
        fn = P.checksum_fn(self.algo)
        crc = 0
        for off in range(0, n, PIECE_BYTES):
            piece = blob[off : off + PIECE_BYTES]
            self.send(piece, deadline)
            crc = fn(piece, crc)
        self.send(P.encode_trailer(crc), deadline)

    def recv_blob_payload(self, view: memoryview, length: int, algo: int, deadline: Deadline) -> None:
        """Receive ``length`` payload bytes into ``view`` and the trailer; ChecksumError if they
        do not match."""
        fn = P.checksum_fn(algo)
        crc = 0
        for off in range(0, length, PIECE_BYTES):
            piece = view[off : min(off + PIECE_BYTES, length)]
            self.recv_into(piece, deadline)
            crc = fn(piece, crc)
        self.recv_into(memoryview(self._trailer), deadline)
        if P.decode_trailer(self._trailer) != crc & 0xFFFFFFFF:
            raise P.ChecksumError("BLOB payload checksum mismatch")

    def drain_payload(self, length: int, algo: int, deadline: Deadline, scratch: bytearray) -> None:
        """Read and check a payload we cannot keep (the chunk arrived meanwhile, or no block)."""
        fn = P.checksum_fn(algo)
        crc = 0
        view = memoryview(scratch)
        off = 0
        while off < length:
            piece = view[: min(len(view), length - off)]
            self.recv_into(piece, deadline)
            crc = fn(piece, crc)
            off += len(piece)
        self.recv_into(memoryview(self._trailer), deadline)
        if P.decode_trailer(self._trailer) != crc & 0xFFFFFFFF:
            raise P.ChecksumError("BLOB payload checksum mismatch")


# -- handshake -------------------------------------------------------------------------------


def _check_compat(me: Identity, fingerprint: bytes, blob_bytes: int) -> str | None:
    if fingerprint != me.fingerprint:
        return f"layout fingerprint {fingerprint.hex()} differs from ours {me.fingerprint.hex()}"
    if blob_bytes != me.blob_bytes:
        return f"blob size {blob_bytes} differs from ours {me.blob_bytes}"
    return None


def client_handshake(conn: Connection, me: Identity, deadline: Deadline) -> None:
    hello = P.Hello(me.node_id, auth.new_nonce(), me.fingerprint, me.blob_bytes, P.LOCAL_ALGORITHMS_MASK | me.caps)
    hello_body = hello.encode()
    conn.send_frame(P.Kind.HELLO, 0, hello_body, deadline)
    _, body = conn.recv_frame(deadline, P.Kind.CHALLENGE)
    ch = P.Challenge.decode(body)
    unsigned = ch.encode_unsigned()
    if not auth.verify(auth.server_mac(me.secret, hello_body, unsigned, conn.tls_binding), ch.mac):
        raise AuthenticationError(f"peer {conn.addr} did not prove the cluster secret")
    problem = _check_compat(me, ch.fingerprint, ch.blob_bytes)
    if problem:
        raise AuthenticationError(f"peer {conn.addr}: {problem}")
    conn.send_frame(P.Kind.AUTH, 0, auth.client_mac(me.secret, hello_body, unsigned, conn.tls_binding), deadline)
    conn.recv_frame(deadline, P.Kind.AUTH_OK)
    conn.authenticated = True
    conn.peer_id = ch.node_id
    conn.peer_caps = ch.algorithms & P.CAPS_MASK
    conn.algo = P.pick_algorithm(P.LOCAL_ALGORITHMS_MASK, ch.algorithms)


def server_handshake(conn: Connection, me: Identity, deadline: Deadline, admit=None) -> None:
    """The server's half of the handshake. ``admit(conn, node_id) -> None | reason``, once the
    peer has proved the secret: a reason refuses the login (an ERROR frame naming it, then
    LoginRefusedError)."""
    _, hello_body = conn.recv_frame(deadline, P.Kind.HELLO)
    hello = P.Hello.decode(hello_body)
    ch = P.Challenge(me.node_id, auth.new_nonce(), me.fingerprint, me.blob_bytes, P.LOCAL_ALGORITHMS_MASK | me.caps)
    unsigned = ch.encode_unsigned()
    mac = auth.server_mac(me.secret, hello_body, unsigned, conn.tls_binding)
    conn.send_frame(P.Kind.CHALLENGE, 0, unsigned + mac, deadline)
    try:
        _, got = conn.recv_frame(deadline, P.Kind.AUTH)
    except (ConnectionError, P.ProtocolError) as e:
        # A client that cannot verify our MAC (another secret) hangs up here.
        raise AuthenticationError(f"peer {conn.addr} left the handshake: {e}") from None
    if len(got) != P.MAC_BYTES or not auth.verify(
        auth.client_mac(me.secret, hello_body, unsigned, conn.tls_binding), got
    ):
        try:
            conn.send_frame(P.Kind.ERROR, 0, P.encode_error("authentication failed"), deadline)
        except OSError:
            pass
        raise AuthenticationError(f"peer {conn.addr} did not prove the cluster secret")
    problem = _check_compat(me, hello.fingerprint, hello.blob_bytes)
    if problem:
        conn.send_frame(P.Kind.ERROR, 0, P.encode_error(problem), deadline)
        raise AuthenticationError(f"peer {conn.addr}: {problem}")
    refused = admit(conn, hello.node_id) if admit is not None else None
    if refused:
        try:
            conn.send_frame(P.Kind.ERROR, 0, P.encode_error(refused), deadline)
        except OSError:
            pass
        raise LoginRefusedError(f"peer {hello.node_id!r} at {conn.addr}: {refused}")
    conn.send_frame(P.Kind.AUTH_OK, 0, b"", deadline)
    conn.authenticated = True
    conn.peer_id = hello.node_id
    conn.peer_caps = hello.algorithms & P.CAPS_MASK
    conn.algo = P.pick_algorithm(P.LOCAL_ALGORITHMS_MASK, hello.algorithms)


def connect(
    host: str, port: int, me: Identity, deadline: Deadline, connect_timeout_s: float, tls: TlsSettings | None = None
) -> Connection:
    sock = socket.create_connection((host, port), timeout=min(connect_timeout_s, deadline.remaining()))
    binding = b""
    if tls is not None:
        sock, binding = tls.wrap_client(sock, deadline.sub(connect_timeout_s))
    conn = Connection(sock, (host, port))
    conn.tls_binding = binding
    try:
        client_handshake(conn, me, deadline)
    except BaseException:
        conn.close()
        raise
    return conn


class ConnectionPool:
    """Idle authenticated connections per peer address; a connection is checked out by one
    request at a time and returned only after a clean exchange."""

    def __init__(
        self, me: Identity, connect_timeout_s: float, max_idle_per_peer: int = 4, tls: TlsSettings | None = None
    ) -> None:
        self._me = me
        self._tls = tls
        self._connect_timeout_s = connect_timeout_s
        self._max_idle = max_idle_per_peer
        self._idle: dict[tuple[str, int], list[Connection]] = defaultdict(list)
        self._lock = threading.Lock()
        self._closed = False

    def get(self, host: str, port: int, deadline: Deadline) -> tuple[Connection, bool]:
        """(connection, whether it was reused from the idle list)."""
        with self._lock:
            if self._closed:
                raise ConnectionError("connection pool closed")
            idle = self._idle.get((host, port))
            if idle:
                return idle.pop(), True
        return connect(host, port, self._me, deadline, self._connect_timeout_s, self._tls), False

    def put(self, conn: Connection) -> None:
        with self._lock:
            idle = self._idle[conn.addr]
            if not self._closed and not conn.closed and len(idle) < self._max_idle:
                idle.append(conn)
                return
        conn.close()

    def drop(self, host: str, port: int) -> None:
        with self._lock:
            conns = self._idle.pop((host, port), [])
        for c in conns:
            c.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns = [c for lst in self._idle.values() for c in lst]
            self._idle.clear()
        for c in conns:
            c.close()

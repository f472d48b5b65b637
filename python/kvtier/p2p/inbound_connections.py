"""InboundConnections: the connections peers open to this member: accepted within the slots
(inbound_slots.py), TLS and the HMAC login, then each one's requests in its own thread."""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections import Counter

from kvtier.errors import KVTierError
from kvtier.p2p import protocol as P
from kvtier.p2p.config import PeerConfig
from kvtier.p2p.inbound_slots import InboundSlots
from kvtier.p2p.request_handlers import RequestHandlers
from kvtier.p2p.transport import (
    AuthenticationError,
    Connection,
    Deadline,
    Identity,
    LoginRefusedError,
    server_handshake,
)

log = logging.getLogger(__name__)


class InboundConnections:
    """The accept loop (:meth:`accept_loop`, run by the service's thread) and the thread of each
    accepted connection of a :class:`~kvtier.p2p.service.PeerService`: TLS where ``tls`` is set,
    the login as ``identity`` with admission into ``slots``, then requests for ``handlers``
    until the peer goes, stalls or loses its slot. ``conns`` (connection -> the thread serving
    it) and ``slots`` are the service's, as are ``lock``, ``stop``, ``counters`` and
    ``count_bad_peer``."""

    def __init__(
        self,
        config: PeerConfig,
        listener: socket.socket,
        tls,
        identity: Identity,
        slots: InboundSlots,
        conns: dict[Connection, threading.Thread],
        handlers: RequestHandlers,
        lock: threading.RLock,
        stop: threading.Event,
        counters: Counter,
        count_bad_peer,
    ) -> None:
        self.config = config
        self._listener = listener
        self._tls = tls
        self._me = identity
        self._slots = slots
        self._server_conns = conns
        self._handlers = handlers
        self._lock = lock
        self._stop = stop
        self.counters = counters
        self._count_bad_peer = count_bad_peer

    def accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                sock, addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                continue
            self.counters["connections_accepted"] += 1
            try:
                conn = Connection(sock, addr)
            except OSError:  # reset before we saw it
                sock.close()
                continue
            t = threading.Thread(target=self._serve_conn, args=(conn,), name="kvtier-p2p-conn", daemon=True)
            with self._lock:
                # Connections that lost their slot but whose thread is still unwinding count too.
                limit = self._slots.capacity + self._slots.pending_max
                ok = not self._stop.is_set() and len(self._server_conns) < limit and self._slots.accept(conn)
                if ok:
                    self._server_conns[conn] = t
            if not ok:
                self.counters["connections_refused"] += 1
                conn.close()
                continue
            t.start()

    def _serve_conn(self, conn: Connection) -> None:
        try:
            deadline = Deadline(2 * self.config.connect_timeout_s)
            if self._tls is not None and not self._start_tls(conn, deadline):
                return
            try:
                server_handshake(conn, self._me, deadline, admit=self._admit)
            except AuthenticationError:
                self.counters["auth_failures"] += 1
                return
            except LoginRefusedError as e:
                log.info("kvtier p2p: %s", e)
                return
            except P.ProtocolError:
                self.counters["protocol_errors"] += 1
                return
            while not self._stop.is_set():
                h = conn.recv_header(Deadline(self.config.idle_timeout_s))
                with self._lock:
                    if not self._slots.begin(conn, time.monotonic()):
                        return  # its slot went to another identity's login
                deadline = Deadline(self.config.request_timeout_s)
                body = conn.recv_body(h, deadline)
                self._handlers.handle(conn, h, body, deadline)
                with self._lock:
                    self._slots.end(conn, time.monotonic())
        except P.ProtocolError as e:
            self.counters["protocol_errors"] += 1
            self._count_bad_peer(conn.peer_id or "(unauthenticated)")
            log.info("kvtier p2p: dropped %s: %s", conn.addr, e)
        except (OSError, KVTierError, TimeoutError, ValueError):
            pass  # peer went away or stalled: just drop the connection
        finally:
            conn.close()
            with self._lock:
                self._slots.release(conn)
                self._server_conns.pop(conn, None)

    def _start_tls(self, conn: Connection, deadline: Deadline) -> bool:
        """Run the TLS handshake of an accepted connection; False (counted) if it failed."""
        try:
            conn.sock = self._tls.wrap_server(conn.sock, deadline)
        except (OSError, KVTierError, ValueError) as e:  # ssl.SSLError is an OSError
            self.counters["tls_failures"] += 1
            if isinstance(e, ssl.SSLError):
                log.info("kvtier p2p: TLS handshake with %s failed: %s", conn.addr, e)
            return False
        conn.tls_binding = self._tls.own_binding
        return not conn.closed

    def _admit(self, conn: Connection, node_id: str) -> str | None:
        """server_handshake's admission: a slot for ``node_id`` (see InboundSlots)."""
        with self._lock:
            refused, victim = self._slots.admit(conn, node_id, time.monotonic())
        if refused:
            self.counters["logins_refused"] += 1
        if victim is not None:
            self.counters["connections_evicted"] += 1
            victim.close()
        return refused

    def close_idle(self, now: float) -> None:
        """Close the admitted connections idle for longer than the slots allow."""
        with self._lock:
            idle = self._slots.expire(now)
        for conn in idle:
            self.counters["connections_idle_closed"] += 1
            conn.close()

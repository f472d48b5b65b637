"""The asking end of the lookup channel to the connector's worker (which answers in vllm_worker):
its Unix socket, the wire ops, the client, and the ``worker_*`` calls any process may make."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import struct
import tempfile
import threading
import time
from collections import deque
from multiprocessing.connection import Client

import numpy as np

from kvtier.errors import FailedPreconditionError, InvalidArgumentError

__all__ = [
    "lookup_socket_path",
    "worker_drain",
    "worker_lookup",
    "worker_persist",
    "worker_stats",
]


def lookup_socket_path(engine_id: str) -> str:
    """Where the worker of vLLM engine ``engine_id`` answers lookups and stats queries (a Unix
    socket in a directory only this user can enter)."""
    directory = os.path.join(tempfile.gettempdir(), f"kvtier-vllm-{os.getuid()}")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        # Someone else made it first: its sockets could answer (or overhear) our lookups.
        raise FailedPreconditionError(
            f"{directory} is not a directory owned by this user (uid {os.getuid()}); remove it"
        )
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(directory, 0o700)
    if "/" in engine_id or engine_id in ("", ".", ".."):
        raise InvalidArgumentError(f"engine_id {engine_id!r} cannot name a socket file")
    return os.path.join(directory, f"{engine_id}.sock")


def _authkey(engine_id: str) -> bytes:
    # The directory's permissions keep other users out; the key keeps other engines' clients out.
    return hashlib.blake2b(f"kvtier-vllm|{engine_id}|{os.getuid()}".encode(), digest_size=32).digest()


_OP_LOOKUP, _OP_STATS, _OP_DRAIN, _OP_PERSIST = b"L", b"S", b"D", b"P"


class _LookupClient:
    """The scheduler's end: one connection to the worker, reconnected after an error.

    Lookups are pipelined: :meth:`submit_lookup` sends one and returns a ticket at once,
    :meth:`lookup_result` collects its answer (the worker answers in order), waiting at most
    the given time, so the scheduler never blocks on a lookup that needs disk or a peer. The
    other calls wait for their answer (at most ``timeout_s``), after the lookups sent before them.
    A connection that fails fails every lookup outstanding on it (their tickets then raise).
    """

    def __init__(self, engine_id: str, timeout_s: float) -> None:
        self._path = lookup_socket_path(engine_id)
        self._key = _authkey(engine_id)
        self._timeout_s = timeout_s
        self._conn = None
        self._lock = threading.Lock()
        self._next_ticket = 0
        self._outstanding: deque[int] = deque()  # tickets sent on this connection, unanswered
        self._replies: dict[int, bytes] = {}  # answered, not yet collected
        self._abandoned: set[int] = set()  # answers nobody will collect: dropped on arrival

    def _connect(self) -> None:
        deadline = time.monotonic() + self._timeout_s
        while self._conn is None:
            try:
                self._conn = Client(self._path, family="AF_UNIX", authkey=self._key)
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _drop_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.close()
        self._conn = None
        self._outstanding.clear()  # their answers will never come: lookup_result raises
        self._abandoned.clear()

    def _receive_one(self, wait_s: float) -> bool:
        """Read the answer to the oldest outstanding message if it comes within ``wait_s``."""
        if not self._conn.poll(max(0.0, wait_s)):
            return False
        reply = self._conn.recv_bytes()
        ticket = self._outstanding.popleft()
        if ticket in self._abandoned:
            self._abandoned.discard(ticket)
        else:
            self._replies[ticket] = reply
        return True

    def _send(self, message: bytes) -> int:
        self._connect()
        ticket = self._next_ticket
        self._next_ticket += 1
        self._conn.send_bytes(message)
        self._outstanding.append(ticket)
        return ticket

    def _wait(self, ticket: int, wait_s: float) -> bytes | None:
        """The answer to ``ticket``, or None if it did not come within ``wait_s``."""
        deadline = time.monotonic() + wait_s
        while ticket not in self._replies:
            if ticket not in self._outstanding:
                raise ConnectionResetError("the connection to the kvtier worker failed before it answered")
            if not self._receive_one(deadline - time.monotonic()):
                return None
        return self._replies.pop(ticket)

    def _call(self, message: bytes) -> bytes:
        with self._lock:
            try:
                reply = self._wait(self._send(message), self._timeout_s)
                if reply is None:
                    raise TimeoutError(f"no answer from the kvtier worker in {self._timeout_s} s")
                return reply
            except BaseException:
                self._drop_connection()
                raise

    def submit_lookup(self, tokens: np.ndarray) -> int:
        """Send a lookup of ``tokens``; its ticket for :meth:`lookup_result`."""
        with self._lock:
            try:
                return self._send(_OP_LOOKUP + tokens.astype("<i4", copy=False).tobytes())
            except BaseException:
                self._drop_connection()
                raise

    def lookup_result(self, ticket: int, wait_s: float) -> tuple[int, bytes] | None:
        """``(hit_tokens, tier code per hit chunk)`` of lookup ``ticket``, or None if its answer
        has not come within ``wait_s`` (ask again, or :meth:`abandon` it)."""
        with self._lock:
            try:
                reply = self._wait(ticket, wait_s)
            except BaseException:
                self._drop_connection()
                raise
        if reply is None:
            return None
        (hit,) = struct.unpack_from("<q", reply)
        return hit, reply[8:]

    def abandon(self, ticket: int) -> None:
        """Nobody will collect ``ticket``'s answer: drop it when it comes."""
        with self._lock:
            if self._replies.pop(ticket, None) is None and ticket in self._outstanding:
                self._abandoned.add(ticket)

    def lookup(self, tokens: np.ndarray) -> tuple[int, bytes]:
        """``(hit_tokens, tier code per hit chunk)``, waiting at most ``timeout_s``."""
        ticket = self.submit_lookup(tokens)
        result = self.lookup_result(ticket, self._timeout_s)
        if result is None:
            with self._lock:
                self._drop_connection()
            raise TimeoutError(f"no answer from the kvtier worker in {self._timeout_s} s")
        return result

    def stats(self) -> dict:
        return json.loads(self._call(_OP_STATS))

    def drain(self) -> None:
        self._call(_OP_DRAIN)

    def persist(self) -> dict:
        return json.loads(self._call(_OP_PERSIST))

    def close(self) -> None:
        with self._lock:
            self._drop_connection()


def worker_stats(engine_id: str, timeout_s: float = 10.0) -> dict:
    """The connector's counters from the worker of vLLM engine ``engine_id`` (any process of
    this user on this host may ask): requests loaded and saved, tokens, failed blocks, hits by
    tier, and the KVCache's own stats under ``"cache"`` (peers under ``cache["peers"]``)."""
    client = _LookupClient(engine_id, timeout_s)
    try:
        return client.stats()
    finally:
        client.close()


def worker_drain(engine_id: str, timeout_s: float = 30.0) -> None:
    """Wait until the worker of engine ``engine_id`` has no store or disk write-back in flight
    (before stopping an engine whose disk tier should keep its chunks, for instance)."""
    client = _LookupClient(engine_id, timeout_s)
    try:
        client.drain()
    finally:
        client.close()


def worker_persist(engine_id: str, timeout_s: float = 60.0) -> dict:
    """Write the chunks the worker of engine ``engine_id`` holds in its CPU tier and not yet on
    disk to its disk tier (:meth:`kvtier.KVCache.persist`; its counts), so that a restart on the
    same ``disk_dir`` finds them. vLLM's shutdown may kill the worker before it closes the
    cache: the timer (``disk.persist_interval_s``) bounds what a kill loses, and this call, made
    before a stop, loses nothing. ``{}`` without a disk tier."""
    client = _LookupClient(engine_id, timeout_s)
    try:
        return client.persist()
    finally:
        client.close()


def worker_lookup(engine_id: str, tokens, timeout_s: float = 10.0) -> int:
    """Leading tokens of ``tokens`` that the worker of engine ``engine_id`` finds in any tier
    (local or peers), a multiple of the chunk size; loads nothing."""
    client = _LookupClient(engine_id, timeout_s)
    try:
        return client.lookup(np.asarray(tokens, dtype=np.int64))[0]
    finally:
        client.close()

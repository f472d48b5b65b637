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


def lookup_socket_path(engine_id: str, rank: int = 0) -> str:
    """Where worker ``rank`` of vLLM engine ``engine_id`` answers lookups and stats queries (a
    Unix socket in a directory only this user can enter). ``rank`` is the worker's shard
    (:attr:`kvtier.layout.Shard.rank`) when tensor or pipeline parallel splits the model."""
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
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise InvalidArgumentError(f"rank must be a non-negative int, got {rank!r}")
    return os.path.join(directory, f"{engine_id}.sock" if rank == 0 else f"{engine_id}.r{rank}.sock")


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

    def __init__(self, engine_id: str, timeout_s: float, rank: int = 0) -> None:
        self._path = lookup_socket_path(engine_id, rank)
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


class _ShardedLookup:
    """Lookups asked of every worker of a model split over ``world_size`` workers (tensor and
    pipeline parallel): one round, all ranks asked at once; a chunk is a hit only where every
    rank holds its shard of it, so the answer is the shortest hit, and its tier codes are
    rank 0's for those chunks. Same interface as :class:`_LookupClient`'s lookup calls."""

    def __init__(self, engine_id: str, timeout_s: float, world_size: int) -> None:
        self._clients = [_LookupClient(engine_id, timeout_s, rank) for rank in range(world_size)]
        self._next_ticket = 0
        # ticket -> per rank: its client's ticket, or its answer once collected
        self._pending: dict[int, list] = {}

    def submit_lookup(self, tokens: np.ndarray) -> int:
        tickets: list = []
        try:
            for client in self._clients:
                tickets.append(("t", client.submit_lookup(tokens)))
        except BaseException:
            for client, (_, t) in zip(self._clients, tickets):
                client.abandon(t)
            raise
        ticket = self._next_ticket
        self._next_ticket += 1
        self._pending[ticket] = tickets
        return ticket

    def lookup_result(self, ticket: int, wait_s: float) -> tuple[int, bytes] | None:
        parts = self._pending[ticket]
        deadline = time.monotonic() + wait_s
        try:
            for i, (client, part) in enumerate(zip(self._clients, parts)):
                if part[0] == "t":
                    got = client.lookup_result(part[1], max(0.0, deadline - time.monotonic()))
                    if got is None:
                        return None
                    parts[i] = ("r", got)
        except BaseException:
            self.abandon(ticket)
            raise
        del self._pending[ticket]
        results = [part[1] for part in parts]
        hit = min(r[0] for r in results)
        codes = results[0][1]
        chunks = len(codes) * hit // results[0][0] if results[0][0] else 0
        return hit, codes[:chunks]

    def abandon(self, ticket: int) -> None:
        for client, part in zip(self._clients, self._pending.pop(ticket, ())):
            if part[0] == "t":
                client.abandon(part[1])

    def lookup(self, tokens: np.ndarray) -> tuple[int, bytes]:
        ticket = self.submit_lookup(tokens)
        timeout_s = self._clients[0]._timeout_s
        result = self.lookup_result(ticket, timeout_s)
        if result is None:
            self.abandon(ticket)
            raise TimeoutError(f"no answer from every kvtier worker in {timeout_s} s")
        return result

    def close(self) -> None:
        for client in self._clients:
            client.close()


def _lookup_client(engine_id: str, timeout_s: float, world_size: int = 1):
    """The scheduler's lookup channel: one worker's, or every rank's of a split model."""
    if world_size == 1:
        return _LookupClient(engine_id, timeout_s)
    return _ShardedLookup(engine_id, timeout_s, world_size)


def worker_stats(engine_id: str, timeout_s: float = 10.0, rank: int = 0) -> dict:
    """The connector's counters from worker ``rank`` of vLLM engine ``engine_id`` (any process
    of this user on this host may ask): requests loaded and saved, tokens, failed blocks, hits by
    tier, and the KVCache's own stats under ``"cache"`` (peers under ``cache["peers"]``)."""
    client = _LookupClient(engine_id, timeout_s, rank)
    try:
        return client.stats()
    finally:
        client.close()


def worker_drain(engine_id: str, timeout_s: float = 30.0, world_size: int = 1) -> None:
    """Wait until the workers (ranks ``0 .. world_size - 1``) of engine ``engine_id`` have no
    store or disk write-back in flight (before stopping an engine whose disk tier should keep
    its chunks, for instance)."""
    for rank in range(world_size):
        client = _LookupClient(engine_id, timeout_s, rank)
        try:
            client.drain()
        finally:
            client.close()


def worker_persist(engine_id: str, timeout_s: float = 60.0, world_size: int = 1) -> dict:
    """Write the chunks the workers (ranks ``0 .. world_size - 1``) of engine ``engine_id`` hold
    in their CPU tier and not yet on disk to their disk tier (:meth:`kvtier.KVCache.persist`;
    rank 0's counts, each rank's under ``"ranks"`` when there are several), so that a restart
    on the same ``disk_dir`` finds them. vLLM's shutdown may kill the worker before it closes
    the cache: the timer (``disk.persist_interval_s``) bounds what a kill loses, and this call,
    made before a stop, loses nothing. ``{}`` without a disk tier."""
    results = []
    for rank in range(world_size):
        client = _LookupClient(engine_id, timeout_s, rank)
        try:
            results.append(client.persist())
        finally:
            client.close()
    out = dict(results[0])
    if world_size > 1:
        out["ranks"] = results
    return out


def worker_lookup(engine_id: str, tokens, timeout_s: float = 10.0, world_size: int = 1) -> int:
    """Leading tokens of ``tokens`` that the workers of engine ``engine_id`` find in any tier
    (local or peers), a multiple of the chunk size; with ``world_size`` ranks, the tokens every
    rank finds (as the scheduler asks). Loads nothing."""
    client = _lookup_client(engine_id, timeout_s, world_size)
    try:
        return client.lookup(np.asarray(tokens, dtype=np.int64))[0]
    finally:
        client.close()

"""The vLLM connector's lookup channel (kvtier.integrations.vllm_lookup) against a worker stand-in
that answers from another thread: lookups are pipelined and answered in order, a lookup not yet
answered reports None within its wait instead of blocking, an abandoned answer is dropped, and a
connection that fails fails every lookup outstanding on it. Needs no vLLM."""

from __future__ import annotations

import queue
import socket
import struct
import threading
import uuid
from multiprocessing.connection import Listener

import numpy as np
import pytest
from kvtier.integrations.vllm_lookup import _OP_LOOKUP, _OP_STATS, _authkey, _LookupClient, lookup_socket_path


class Worker:
    """Answers each lookup with (number of tokens asked, one tier code per token), in order, once
    the test releases it (``release()``): a slow disk or peer lookup, made to wait on demand."""

    def __init__(self) -> None:
        self.engine_id = f"test-{uuid.uuid4().hex[:12]}"
        self.path = lookup_socket_path(self.engine_id)
        self.listener = Listener(self.path, family="AF_UNIX", authkey=_authkey(self.engine_id))
        self.gate: queue.Queue = queue.Queue()
        self.conn = None
        self.accepted = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            self.conn = self.listener.accept()
            self.accepted.set()
            while True:
                message = self.conn.recv_bytes()
                if message[:1] == _OP_LOOKUP:
                    if self.gate.get(timeout=30) == "hang up":
                        return
                    n = (len(message) - 1) // 4
                    self.conn.send_bytes(struct.pack("<q", n) + bytes([1]) * n)
                elif message[:1] == _OP_STATS:
                    self.conn.send_bytes(b'{"ok": 1}')
        except (EOFError, OSError, queue.Empty):
            return
        finally:
            if self.conn is not None:
                self.conn.close()  # here, not from the test's thread while this one reads

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            self.gate.put(None)

    def hang_up(self) -> None:
        """Drop the client: the socket is shut down, so the serving thread's read ends (EOF) and
        that thread closes the connection (closing it from here races with its read)."""
        assert self.accepted.wait(10), "the client never connected"
        with socket.fromfd(self.conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.shutdown(socket.SHUT_RDWR)
        self.gate.put("hang up")  # a lookup it holds back ends too
        self.thread.join(10)
        assert not self.thread.is_alive(), "the stand-in worker did not stop"

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def worker():
    w = Worker()
    yield w
    w.close()


def tokens(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64)


def test_lookups_are_pipelined_and_answered_in_order(worker):
    client = _LookupClient(worker.engine_id, timeout_s=10)
    first, second = client.submit_lookup(tokens(3)), client.submit_lookup(tokens(5))
    assert client.lookup_result(second, 0.05) is None  # nothing answered yet: no blocking
    worker.release(2)
    assert client.lookup_result(second, 10) == (5, b"\x01" * 5)  # the first's answer is kept
    assert client.lookup_result(first, 0) == (3, b"\x01" * 3)
    assert client.stats() == {"ok": 1}  # a synchronous call after pipelined lookups
    client.close()


def test_an_abandoned_answer_is_dropped_not_handed_to_the_next_lookup(worker):
    client = _LookupClient(worker.engine_id, timeout_s=10)
    gone = client.submit_lookup(tokens(7))
    client.abandon(gone)
    kept = client.submit_lookup(tokens(2))
    worker.release(2)
    assert client.lookup_result(kept, 10) == (2, b"\x01\x01")
    worker.release()
    assert client.lookup(tokens(4)) == (4, b"\x01" * 4)  # the synchronous form, same channel
    client.close()


def test_a_failed_connection_fails_its_outstanding_lookups(worker):
    client = _LookupClient(worker.engine_id, timeout_s=10)
    ticket = client.submit_lookup(tokens(3))
    worker.hang_up()
    with pytest.raises((EOFError, OSError)):
        client.lookup_result(ticket, 10)
    with pytest.raises(ConnectionResetError):  # its answer can never come
        client.lookup_result(ticket, 0)
    client.close()

"""KeyJournal: the file of chunk keys a member holds on disk, so that a restarted member rebuilds
its digest."""

from __future__ import annotations

import contextlib
import logging
import os
import threading

log = logging.getLogger(__name__)


class KeyJournal:
    """Append-only file of the chunk keys this member holds on disk, so that a restarted member
    rebuilds its digest (the core cannot list its keys). Entries of evicted chunks are pruned by
    asking the tier; the file is rewritten compacted at start.

    Bookkeeping beside the cache: a failed write (a full disk, say) never raises; it is counted in
    ``errors`` and logged once, and the digest merely loses those keys after a restart."""

    NAME = "p2p-keys.journal"

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, self.NAME)
        self._lock = threading.Lock()
        self._f = None
        self.errors = 0

    def _failed(self, what: str, e: OSError) -> None:
        self.errors += 1
        if self.errors == 1:
            log.warning("peer key journal %s: %s failed (%s); counted in journal_errors", self.path, what, e)

    def read(self) -> list[bytes]:
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return []
        except OSError as e:
            self._failed("read", e)
            return []
        raw = raw[: len(raw) // 16 * 16]  # a torn last entry is dropped
        return [raw[i : i + 16] for i in range(0, len(raw), 16)]

    def rewrite(self, keys) -> None:
        tmp = self.path + ".tmp"
        with self._lock:
            try:
                with open(tmp, "wb") as f:
                    f.write(b"".join(keys))
                os.replace(tmp, self.path)
            except OSError as e:
                self._failed("rewrite", e)
                with contextlib.suppress(OSError):
                    os.unlink(tmp)

    def append(self, keys) -> None:
        with self._lock:
            try:
                if self._f is None:
                    self._f = open(self.path, "ab")  # noqa: SIM115 - kept open, closed in close()
                self._f.write(b"".join(keys))
                self._f.flush()
            except OSError as e:
                self._failed("append", e)
                self._drop_file()

    def _drop_file(self) -> None:
        # A buffered file whose flush failed would retry the same bytes at close: drop it.
        f, self._f = self._f, None
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()

    def close(self) -> None:
        with self._lock:
            try:
                if self._f is not None:
                    self._f.close()
            except OSError as e:
                self._failed("close", e)
            self._f = None

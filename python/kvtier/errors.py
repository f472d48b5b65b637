"""kvtier's exception classes: one per core status code, raised by kvtier._core and the Python layer."""

from __future__ import annotations


class KVTierError(Exception):
    """Base class of every error kvtier raises on purpose."""


class InvalidArgumentError(KVTierError, ValueError):
    """An argument is wrong; nothing was changed."""


class NotFoundError(KVTierError, KeyError):
    """No such key, block or file."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class AlreadyExistsError(KVTierError):
    """The object already exists."""


class ResourceExhaustedError(KVTierError, MemoryError):
    """Out of blocks, bytes, slots or queue entries."""


class FailedPreconditionError(KVTierError, RuntimeError):
    """The object is not in a state that allows the call (double free, pinned block, ...)."""


class InProgressError(KVTierError):
    """Asynchronous work has started and has not finished."""


class DeadlineExceededError(KVTierError, TimeoutError):
    """A wait ran out of time."""


class KVTierIOError(KVTierError, OSError):
    """The OS or a device failed an operation."""


class CorruptionError(KVTierError):
    """Bytes failed a checksum, magic or layout-fingerprint check."""


class UnavailableError(KVTierError, RuntimeError):
    """The feature or device is absent here (no GPU, no io_uring, ...)."""


class InternalError(KVTierError, RuntimeError):
    """A bug in kvtier: please report it."""


class CacheGeometryError(FailedPreconditionError):
    """A cache directory holds chunks of another geometry (chunk size, layout): it was
    left as it is. Open it with its own settings, use another directory, or wipe it on purpose
    (``kvtier cache reset DIR``, or ``disk.reset_on_mismatch: true``)."""


# Index = csrc/common/status.h StatusCode value.
_BY_CODE: dict[int, type[KVTierError]] = {
    1: InvalidArgumentError,
    2: NotFoundError,
    3: AlreadyExistsError,
    4: ResourceExhaustedError,
    5: FailedPreconditionError,
    6: InProgressError,
    7: DeadlineExceededError,
    8: KVTierIOError,
    9: CorruptionError,
    10: UnavailableError,
    11: InternalError,
    12: CacheGeometryError,
}


def error_for_code(code: int) -> type[KVTierError]:
    """The exception class for a core StatusCode (used by kvtier._core's translator)."""
    return _BY_CODE.get(code, InternalError)


__all__ = [
    "AlreadyExistsError",
    "CacheGeometryError",
    "CorruptionError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InProgressError",
    "InternalError",
    "InvalidArgumentError",
    "KVTierError",
    "KVTierIOError",
    "NotFoundError",
    "ResourceExhaustedError",
    "UnavailableError",
    "error_for_code",
]

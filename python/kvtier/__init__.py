"""kvtier: a tiered KV-cache engine for LLM inference (GPU, pinned CPU, NVMe, peers)."""

from __future__ import annotations

from kvtier import _core
from kvtier.errors import (
    CorruptionError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    KVTierError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)

__version__: str = _core.__version__

__all__ = [
    "__version__",
    "KVTierError",
    "InvalidArgumentError",
    "NotFoundError",
    "ResourceExhaustedError",
    "FailedPreconditionError",
    "DeadlineExceededError",
    "CorruptionError",
    "UnavailableError",
]

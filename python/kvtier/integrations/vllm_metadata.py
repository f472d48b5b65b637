"""What the connector's scheduler side hands its worker side each step (loads, saves, preempted
and rewritten blocks), and the encoding of prompt tokens they carry."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

__all__ = ["KVTierConnectorMetadata"]


@dataclass
class _LoadSpec:
    req_id: str
    tokens: bytes  # int32 LE prompt tokens up to the end of the hit
    skip_chunks: int  # leading chunks vLLM already holds (its own prefix cache)
    block_ids: list[list[int]]  # per KV cache group, the request's blocks covering the hit from block 0


@dataclass
class _SaveSpec:
    req_id: str
    tokens: bytes  # int32 LE prompt tokens up to the end of the last full chunk computed
    block_ids: list[list[int]]  # per KV cache group, the blocks of those tokens


@dataclass
class KVTierConnectorMetadata(KVConnectorMetadata):
    """One step's work for the worker: loads (``loads``: this step's forward reads them;
    ``async_loads``: their requests wait, unscheduled, until ``get_finished`` reports them),
    saves, requests preempted since last step, and ``rewritten``: blocks this step fills from
    scratch (computed, or loaded), whose bytes stop being a failed load's leftovers."""

    loads: list[_LoadSpec] = field(default_factory=list)
    async_loads: list[_LoadSpec] = field(default_factory=list)
    saves: list[_SaveSpec] = field(default_factory=list)
    preempted: set[str] = field(default_factory=set)
    rewritten: list[int] = field(default_factory=list)


def _tokens_bytes(tokens: np.ndarray) -> bytes:
    return tokens.astype("<i4", copy=False).tobytes()


def _tokens_array(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, dtype="<i4").astype(np.int64)

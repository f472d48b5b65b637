"""Policy hooks: Python classes that replace a built-in decision without rebuilding kvtier.

Every hook is called once per batch of chunks, never per byte, and with no kvtier lock held, so
a hook may read stats or call the cache. Four protocols:

- :class:`EvictionPolicy` — which unreferenced GPU-pool chunks to evict when pages run short
  (``PagedKVPool(eviction_policy=...)``; built-in: least recently used). The CPU tier's order is a
  C++ built-in chosen by name (``"lru"``, ``"s3fifo"``, ``"lfu"``): a Python call per eviction on
  the hot path of every store would cost more than it decides.
- :class:`AdmissionPolicy` — which chunks evicted from the CPU tier are written to disk
  (``KVCache(admission_policy=...)``; built-in: seen by at least ``disk_admit_min_seen`` requests).
- :class:`PrefetchPolicy` — how many chunks found on disk by ``lookup`` to start reading into the
  CPU tier before ``load`` asks for them (``KVCache(prefetch_policy=...)``; built-in: all of them).
- :class:`kvtier.planner.LoadPlanner` — load or recompute (see kvtier.planner); with
  ``plan_split`` (``SplitCostModelPlanner``), recompute a head while the tail after it loads.

Worked examples are in docs/policies.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol, TypeVar, runtime_checkable

from kvtier.planner import CostModelPlanner, LoadPlanner, SplitCostModelPlanner

__all__ = [
    "AdmissionPolicy",
    "ChunkInfo",
    "CostModelPlanner",
    "EvictionPolicy",
    "LRUEviction",
    "LoadPlanner",
    "PrefetchAll",
    "PrefetchPolicy",
    "SeenAtLeast",
    "SplitCostModelPlanner",
    "pick_victims",
]


@dataclass(frozen=True)
class ChunkInfo:
    """What an eviction policy knows of a cached GPU chunk.

    Attributes:
        key: the 16-byte chunk key.
        pages: how many pages it holds.
        last_use: the pool's logical clock at its last use (larger = more recent).
        uses: requests that used it (its commit counts as one).
    """

    key: bytes
    pages: int
    last_use: int
    uses: int


@runtime_checkable
class EvictionPolicy(Protocol):
    """Picks GPU-pool chunks to evict.

    ``candidates`` are the unreferenced cached chunks, least recently used first; return the keys
    to evict, in order, freeing at least ``pages_needed`` pages if you can (the pool evicts only
    keys from ``candidates`` and stops once enough pages are free).
    """

    def choose_victims(self, candidates: list[ChunkInfo], pages_needed: int) -> list[bytes]: ...


@runtime_checkable
class AdmissionPolicy(Protocol):
    """Decides, per batch of chunks evicted from the CPU tier, which are written to disk.

    ``seen[i]`` counts the requests that carried ``keys[i]`` while it was cached in the CPU tier.
    Return one truth value per key.
    """

    def admit(self, keys: list[bytes], seen: list[int]) -> list[bool]: ...


@runtime_checkable
class PrefetchPolicy(Protocol):
    """After a lookup found ``hit_chunks`` leading chunks, ``tiers[i]`` being where chunk i is
    ("cpu" or "disk"), return how many of the disk chunks to start reading into the CPU tier now."""

    def prefetch(self, hit_chunks: int, tiers: list[str]) -> int: ...


class LRUEviction:
    """The built-in GPU-pool order: least recently used first."""

    def choose_victims(self, candidates: list[ChunkInfo], pages_needed: int) -> list[bytes]:
        out, freed = [], 0
        for c in candidates:
            if freed >= pages_needed:
                break
            out.append(c.key)
            freed += c.pages
        return out


_Chunk = TypeVar("_Chunk")


def pick_victims(
    candidates: Iterable[_Chunk],
    pages_needed: int,
    pages_of: Callable[[_Chunk], int],
    policy: EvictionPolicy | None = None,
) -> list[_Chunk]:
    """The chunks a GPU pool evicts to free ``pages_needed`` pages: ``candidates`` are its
    unreferenced chunks, least recently used first (each with ``key``, ``last_use``, ``uses``).
    Without a policy, the leading ones (LRU, read lazily: the pool stops at enough pages); with
    one, the candidates it names, each once, until enough pages are free. The engine's pool and
    the simulator's both evict through this, so a policy decides alike in each."""
    victims: list[_Chunk] = []
    freed = 0
    if policy is None:
        for c in candidates:
            if freed >= pages_needed:
                break
            victims.append(c)
            freed += pages_of(c)
        return victims
    listed = list(candidates)
    by_key = {c.key: c for c in listed}
    chosen = policy.choose_victims([ChunkInfo(c.key, pages_of(c), c.last_use, c.uses) for c in listed], pages_needed)
    for k in chosen:
        c = by_key.pop(k, None)  # only offered candidates, each once
        if c is None or freed >= pages_needed:
            continue
        victims.append(c)
        freed += pages_of(c)
    return victims


@dataclass
class SeenAtLeast:
    """Admit a chunk to disk once ``n`` requests carried it (the built-in rule, as a Python policy)."""

    n: int = 2

    def admit(self, keys: list[bytes], seen: list[int]) -> list[bool]:
        return [s >= self.n for s in seen]


class PrefetchAll:
    """Read every disk chunk of a hit into the CPU tier as soon as the lookup finds it."""

    def prefetch(self, hit_chunks: int, tiers: list[str]) -> int:
        return sum(1 for t in tiers if t == "disk")

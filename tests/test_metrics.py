"""Tests for kvtier.metrics.Metrics: counters from stats deltas (monotonic), gauges, latency
histograms, the text exposition, an HTTP scrape, isolation between instances, and the clear
error without prometheus-client."""

from __future__ import annotations

import pathlib
import re
import socket
import sys
import threading
import urllib.request

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kvtier.errors import InvalidArgumentError, KVTierIOError, UnavailableError
from kvtier.metrics import (
    COUNTER_SOURCES,
    GAUGE_SOURCES,
    LATENCY_BUCKETS,
    SPECS,
    Metrics,
)

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "metrics.md"


def stats_dict(**flat) -> dict:
    """A KVCache.stats()-shaped dict from dotted keys: stats_dict(**{"index.hit_chunks": 3})."""
    out: dict = {}
    for dotted, value in flat.items():
        *parents, leaf = dotted.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        return response.read().decode()


# -- counters from stats -------------------------------------------------------------------------
def test_counters_follow_stats_deltas():
    m = Metrics()
    m.update_from_stats(stats_dict(**{"index.hit_chunks": 5, "bytes_offloaded": 1000}))
    m.update_from_stats(stats_dict(**{"index.hit_chunks": 8, "bytes_offloaded": 1000}))
    assert m.value("hits_total", tier="cpu") == 8
    assert m.value("kvtier_bytes_total", path="offload") == 1000  # full names work too
    m.update_from_stats(stats_dict(**{"index.hit_chunks": 8}))  # no change, a key absent
    assert m.value("hits_total", tier="cpu") == 8
    assert m.value("bytes_total", path="offload") == 1000


def test_a_stats_counter_that_goes_down_is_a_restart_and_counters_stay_monotonic():
    m = Metrics()
    m.update_from_stats({"chunks_stored": 10})
    m.update_from_stats({"chunks_stored": 3})  # a new cache behind the same Metrics
    assert m.value("chunks_total", event="stored") == 13
    m.update_from_stats({"chunks_stored": 4})
    assert m.value("chunks_total", event="stored") == 14


@settings(max_examples=50, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from([k for k, _, _ in COUNTER_SOURCES]),
                                st.integers(0, 10**12), max_size=8), max_size=12))  # fmt: skip
def test_counters_never_decrease(updates):
    m = Metrics()
    before = {}
    for update in updates:
        m.update_from_stats(stats_dict(**update))
        now = m.snapshot()
        for name, series in before.items():
            if name.endswith("_total"):
                for labels, value in series.items():
                    assert now[name][labels] >= value
        before = now


def test_every_stats_key_maps_to_its_series():
    assert len({(name, labels) for _, name, labels in COUNTER_SOURCES}) == len(COUNTER_SOURCES)
    m = Metrics()
    m.update_from_stats(stats_dict(**{k: i + 1 for i, (k, _, _) in enumerate(COUNTER_SOURCES)}))
    for i, (_, name, labels) in enumerate(COUNTER_SOURCES):
        spec = next(s for s in SPECS if s.name == name)
        assert m.value(name, **dict(zip(spec.labels, labels))) == i + 1


def test_absent_and_non_numeric_keys_are_skipped():
    m = Metrics()
    m.update_from_stats({"index": {"hit_chunks": "many", "evictions": None}, "disk": "broken"})
    m.update_from_stats({})
    assert m.value("hits_total", tier="cpu") == 0
    assert m.value("evictions_total", tier="cpu") == 0
    with pytest.raises(InvalidArgumentError, match="stats must be a dict"):
        m.update_from_stats([("index", 1)])


def test_gauges_and_info_from_stats():
    m = Metrics()
    stats = stats_dict(
        **{
            "capacity_chunks": 64,
            "blocks.used_blocks": 10,
            "disk.slots_total": 1000,
            "disk.slots_used": 7,
            "disk.nospace": True,
            "disk.backend": "io_uring",
            "chunk_bytes": 4096,
            "in_flight": 2,
            "method": "staged",
            "pinned": True,
        }
    )
    m.update_from_stats(stats)
    assert m.value("capacity_chunks", tier="cpu") == 64
    assert m.value("used_chunks", tier="cpu") == 10
    assert m.value("capacity_chunks", tier="disk") == 1000
    assert m.value("used_chunks", tier="disk") == 7
    assert m.value("disk_nospace") == 1
    assert m.value("chunk_bytes") == 4096 and m.value("in_flight") == 2
    assert m.value("info", method="staged", pinned="true", disk_backend="io_uring") == 1
    stats["blocks"]["used_blocks"] = 3  # gauges go down as well as up
    stats["disk"]["nospace"] = False
    m.update_from_stats(stats)
    assert m.value("used_chunks", tier="cpu") == 3 and m.value("disk_nospace") == 0
    assert {s for _, s, _ in GAUGE_SOURCES} <= {s.name for s in SPECS if s.kind == "gauge"}


def test_stats_of_a_real_cache():
    torch = pytest.importorskip("torch")
    from kvtier import KVCache, Layout

    tensors = [torch.randn(2, 16, 4, 2, 8) for _ in range(2)]
    layout = Layout.from_vllm(tensors, chunk_tokens=8)  # 2 pages a chunk, 16 pages
    m = Metrics()
    with KVCache(layout, cpu_bytes=8 * layout.chunk_bytes, method="cpu") as cache:
        tokens = list(range(32))
        cache.store(tokens, list(range(8))).wait()
        assert cache.lookup(tokens) == 32
        assert cache.lookup([7] * 16) == 0
        m.update_from_stats(cache.stats())
        cache.load(tokens, list(range(8, 16))).wait()
        for i in range(10):  # new prompts until the pool evicts
            if cache.stats()["index"]["evictions"]:
                break
            cache.store(list(range(1000 * (i + 1), 1000 * (i + 1) + 64)), list(range(16))).wait()
        stats = cache.stats()
        m.update_from_stats(stats)
    assert m.value("hits_total", tier="cpu") == stats["index"]["hit_chunks"] == 8
    assert m.value("misses_total", tier="cpu") == stats["index"]["miss_chunks"] == 1
    assert m.value("operations_total", op="lookup") == 2
    assert m.value("operations_total", op="load") == 1
    assert m.value("operations_total", op="store") == stats["store_calls"]
    assert m.value("chunks_total", event="stored") == stats["chunks_stored"]
    assert m.value("chunks_total", event="loaded") == 4
    assert m.value("bytes_total", path="offload") == stats["bytes_offloaded"]
    assert m.value("bytes_total", path="load") == stats["bytes_loaded"] == 4 * layout.chunk_bytes
    assert m.value("evictions_total", tier="cpu") == stats["index"]["evictions"] > 0
    assert m.value("admissions_total", tier="cpu") == stats["index"]["inserts"]
    assert m.value("capacity_chunks", tier="cpu") == stats["capacity_chunks"]
    assert m.value("info", method="cpu", pinned="false", disk_backend="none") == 1


# -- latency -------------------------------------------------------------------------------------
def test_latency_histogram_buckets():
    m = Metrics()
    for seconds in (5e-6, 1e-5, 0.003, 10.0, 60.0):
        m.observe_latency("lookup", seconds)
    assert m.value("latency_seconds_count", op="lookup") == 5
    assert m.value("latency_seconds_sum", op="lookup") == pytest.approx(70.003015)
    text = m.render().decode()
    assert 'kvtier_latency_seconds_bucket{le="1e-05",op="lookup"} 2.0' in text  # le: inclusive
    assert 'kvtier_latency_seconds_bucket{le="0.0025",op="lookup"} 2.0' in text
    assert 'kvtier_latency_seconds_bucket{le="0.005",op="lookup"} 3.0' in text
    assert 'kvtier_latency_seconds_bucket{le="10.0",op="lookup"} 4.0' in text
    assert 'kvtier_latency_seconds_bucket{le="+Inf",op="lookup"} 5.0' in text
    assert LATENCY_BUCKETS[0] == 1e-5 and LATENCY_BUCKETS[-1] == 10.0


def test_time_context_manager_records_also_on_error():
    m = Metrics()
    with m.time("store"):
        pass
    with pytest.raises(RuntimeError), m.time("store"):
        raise RuntimeError("boom")
    assert m.value("latency_seconds_count", op="store") == 2


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: m.observe_latency("evict", 0.1), "op: invalid value 'evict'; allowed: one of"),
        (lambda m: m.observe_latency("load", -1), "seconds: invalid value -1"),
        (lambda m: m.observe_latency("load", float("nan")), "seconds: invalid value nan"),
        (lambda m: m.observe_latency("load", True), "seconds: invalid value True"),
        (lambda m: m.time("fly"), "op: invalid value 'fly'"),
        (lambda m: m.set_bandwidth("nvlink", 1e9), "path: invalid value 'nvlink'; allowed"),
        (lambda m: m.set_bandwidth("load", -1), "bytes_per_second: invalid value -1"),
        (lambda m: m.observe_transfer("load", 10, 0), "seconds: invalid value 0"),
        (lambda m: m.value("nope"), "name: unknown metric 'nope'"),
        (lambda m: m.value("hits_total"), "labels: hits_total takes ['tier']"),
        (lambda m: m.start_http_server(-1), "port: invalid value -1"),
        (lambda m: Metrics(namespace="kv tier"), "namespace: invalid value 'kv tier'"),
    ],
)
def test_bad_arguments_are_named(call, message):
    m = Metrics()
    with pytest.raises(InvalidArgumentError) as e:
        call(m)
    assert message in str(e.value)


def test_bandwidth_gauges():
    m = Metrics()
    m.set_bandwidth("disk_read", 6.5e9)
    m.observe_transfer("load", 2_000_000, 0.001)
    assert m.value("bandwidth_bytes_per_second", path="disk_read") == 6.5e9
    assert m.value("bandwidth_bytes_per_second", path="load") == pytest.approx(2e9)


# -- exposition ----------------------------------------------------------------------------------
def test_render_contains_every_metric_name():
    text = Metrics().render().decode()
    for spec in SPECS:  # older prometheus-client releases drop "_total" from the TYPE line
        stem = f"kvtier_{spec.name}".removesuffix("_total")
        assert re.search(rf"^# TYPE {stem}(_total)? {spec.kind}$", text, re.MULTILINE), stem
    assert 'kvtier_hits_total{tier="disk"} 0.0' in text  # series exist from the start
    assert 'kvtier_latency_seconds_count{op="load"} 0.0' in text


def test_namespace_prefixes_every_name():
    m = Metrics(namespace="serving_kv")
    m.update_from_stats({"index": {"hit_chunks": 2}})
    text = m.render().decode()
    assert 'serving_kv_hits_total{tier="cpu"} 2.0' in text
    assert "kvtier_" not in text


def test_instances_do_not_clash_nor_touch_the_global_registry():
    import prometheus_client

    a, b = Metrics(), Metrics()
    a.update_from_stats({"chunks_loaded": 5})
    assert b.value("chunks_total", event="loaded") == 0
    assert 'kvtier_chunks_total{event="loaded"} 5.0' in a.render().decode()
    assert 'kvtier_chunks_total{event="loaded"} 0.0' in b.render().decode()
    assert a.registry is not b.registry
    assert b"kvtier_" not in prometheus_client.generate_latest(prometheus_client.REGISTRY)


def test_http_scrape_returns_the_metrics():
    m = Metrics()
    m.update_from_stats({"index": {"hit_chunks": 3}, "bytes_loaded": 4096})
    with m.start_http_server(0) as server:
        assert server.port > 0 and server.url.startswith("http://127.0.0.1:")
        text = scrape(server.url)
    for spec in SPECS:
        assert f"kvtier_{spec.name.removesuffix('_total')}" in text
    assert 'kvtier_hits_total{tier="cpu"} 3.0' in text
    assert 'kvtier_bytes_total{path="load"} 4096.0' in text
    assert server.server is None  # closed: the port is free again
    with socket.socket() as s:  # SO_REUSEADDR: only a listening socket would still block it
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", server.port))


def test_scrape_pulls_stats_fn_each_time():
    calls = {"n": 0}

    def stats():
        calls["n"] += 1
        return {"index": {"lookups": calls["n"] * 10}}

    with Metrics(stats_fn=stats) as m:
        server = m.start_http_server(0)
        assert m.servers == [server]
        assert 'kvtier_operations_total{op="lookup"} 10.0' in scrape(server.url)
        assert 'kvtier_operations_total{op="lookup"} 20.0' in scrape(server.url)
    assert m.servers == [] and server.server is None  # Metrics.close() stopped it


def test_a_failing_stats_fn_is_counted_and_the_scrape_still_works():
    def stats():
        raise RuntimeError("cache closed")

    m = Metrics(stats_fn=stats)
    text = m.render().decode()
    assert "kvtier_stats_errors_total 1.0" in text
    assert m.value("stats_errors_total") == 1


def test_port_in_use_is_a_clear_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(KVTierIOError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            Metrics().start_http_server(port)


def test_from_config_starts_the_configured_endpoint():
    from kvtier.config import KVTierConfig

    cfg = KVTierConfig.load(env={}, metrics={"prometheus_port": 0, "namespace": "kvx"})
    with Metrics.from_config(cfg) as m:
        (server,) = m.servers
        assert "kvx_hits_total" in scrape(server.url)
    assert Metrics.from_config(KVTierConfig()).servers == []


def test_concurrent_updates_and_scrapes():
    m = Metrics()
    errors = []

    def work(i):
        try:
            for n in range(200):
                m.observe_latency("load", 1e-4)
                m.update_from_stats({"chunks_loaded": n})
                if n % 50 == 0:
                    m.render()
        except Exception as e:  # noqa: BLE001 -- reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert m.value("latency_seconds_count", op="load") == 800


# -- without prometheus-client -------------------------------------------------------------------
def test_without_prometheus_client_metrics_still_count_and_render_says_why(monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # "import" now raises
    m = Metrics()
    m.update_from_stats({"index": {"hit_chunks": 4}})
    m.observe_latency("load", 0.01)
    assert m.value("hits_total", tier="cpu") == 4
    assert m.snapshot()["kvtier_latency_seconds_count"][(("op", "load"),)] == 1
    for call in (m.render, lambda: m.start_http_server(0), lambda: m.registry):
        with pytest.raises(UnavailableError) as e:
            call()
        assert "prometheus-client" in str(e.value)
        assert "pip install prometheus-client" in str(e.value)


# -- docs ----------------------------------------------------------------------------------------
def test_docs_list_every_metric_and_stats_key():
    text = DOCS.read_text()
    for spec in SPECS:
        assert f"`kvtier_{spec.name}`" in text, spec.name
    for key, _, _ in (*COUNTER_SOURCES, *GAUGE_SOURCES):
        assert f"`{key}`" in text, key

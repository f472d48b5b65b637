"""One config builds the whole cache, with its Prometheus endpoint serving the cache's stats."""

from __future__ import annotations

import urllib.request

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("prometheus_client")

import kvtier
from kvtier import open_cache
from kvtier.config import KVTierConfig


def test_open_cache_from_config_serves_metrics(tmp_path):
    kv = [torch.zeros(2, 32, 16, 2, 16) for _ in range(2)]
    layout = kvtier.Layout.from_vllm(kv, chunk_tokens=32)
    cfg = KVTierConfig.load(
        env={},
        cpu={"bytes": 1 << 20},
        disk={"dir": str(tmp_path), "bytes": 8 << 20},
        metrics={"prometheus_port": 0},
        model={"model_id": "m", "chunk_tokens": 32},
    )
    cache = open_cache(layout, cfg)
    try:
        toks = list(range(64))
        cache.store(toks, list(range(4))).wait()
        assert cache.lookup(toks) == 64
        assert cache.stats()["disk"]["backend"] in ("io_uring", "posix")
        (server,) = cache.metrics.servers
        body = urllib.request.urlopen(server.url, timeout=10).read().decode()
        assert "kvtier_hits_total" in body and "kvtier_bytes_total" in body
        lookups = [
            line
            for line in body.splitlines()
            if line.startswith("kvtier_latency_seconds_count") and 'op="lookup"' in line
        ]
        assert lookups and float(lookups[0].split()[-1]) >= 1
    finally:
        cache.metrics.close()
        cache.close()


def test_the_old_name_in_kvtier_config_still_works_and_warns():
    import kvtier.config

    with pytest.warns(DeprecationWarning, match="kvtier.open_cache"):
        assert kvtier.config.open_cache is open_cache
    with pytest.warns(DeprecationWarning):
        from kvtier.config import open_cache as old
    assert old is open_cache

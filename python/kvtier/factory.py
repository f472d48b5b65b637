"""open_cache: a KVCache and its metrics built from one KVTierConfig. It sits above both the
cache and the config (the config package builds no cache, so the two import one way)."""

from __future__ import annotations

from kvtier.cache import KVCache
from kvtier.config import KVTierConfig
from kvtier.metrics import Metrics

__all__ = ["open_cache"]


def open_cache(layout, config: KVTierConfig | None = None, **overrides) -> KVCache:
    """A :class:`kvtier.KVCache` for ``layout`` built from one config (YAML / ``KVTIER_*`` env /
    overrides, see :meth:`KVTierConfig.load`), with its metrics attached as ``cache.metrics``
    (a :class:`kvtier.metrics.Metrics` reading ``cache.stats()`` on every scrape) and its
    Prometheus endpoint started when ``metrics.prometheus_port`` is set. ``cache.close()``
    stops the endpoint too.

    Example::

        cache = open_cache(layout, KVTierConfig.load("kvtier.yaml"))
        print(cache.metrics.servers[0].url)   # http://127.0.0.1:9400/metrics
    """
    cfg = config if config is not None else KVTierConfig.load(**overrides)
    if config is not None and overrides:
        cfg = cfg.replace(**overrides)
    cache = KVCache(layout, **cfg.cache_kwargs())
    cache.metrics = Metrics.from_config(cfg, stats_fn=cache.stats)
    return cache

"""KVTierConfig: the one validated configuration of a kvtier engine, read from a YAML file,
``KVTIER_*`` environment variables and keyword overrides.

Precedence, lowest first: defaults < YAML file < environment < keyword overrides. Every wrong
value raises :class:`kvtier.errors.InvalidArgumentError` naming the key as a dotted path
(``disk.queue_depth``), the value given, where it came from and what is allowed; an unknown key
is an error that lists the close matches. docs/configuration.md lists every key.

Example::

    cfg = KVTierConfig.load("kvtier.yaml", cpu_bytes="8GiB")   # KVTIER_* variables apply too
    cache = kvtier.KVCache(layout, **cfg.cache_kwargs())

The package re-exports the names of its modules, one concern each (each imports only those
above it):

- key_errors: the errors of a wrong value and of an unknown key
- sizes, addresses: parse_size and parse_address, the readers of every size and "host:port"
- checks: the value checkers (_Check), one per kind of value
- rules: the rules over several keys
- sections: the cpu, disk, gpu, model, planner, metrics and events sections (each key declared once)
- peers: the peer service's keys and the ``peers:`` section (PeersSection)
- schema: every key with its variable (config_keys, ENV_VARS) and CACHE_FIELDS
- cache_config: CacheConfig, the settings of one KVCache
- layers: reading a YAML file, the environment and keyword overrides
- kvtier_config: KVTierConfig (kvtier.open_cache builds a KVCache from one)
"""

from __future__ import annotations

from typing import Any

from kvtier.config.addresses import parse_address
from kvtier.config.cache_config import CacheConfig
from kvtier.config.kvtier_config import KVTierConfig
from kvtier.config.layers import CONFIG_FILE_ENV
from kvtier.config.peers import PeersSection
from kvtier.config.peers import _PeerSchema as _PeerSchema  # kvtier.p2p.config builds PeerConfig from it
from kvtier.config.peers import _rebuild_peers as _rebuild_peers  # pickles of a PeersSection made before the split
from kvtier.config.schema import CACHE_FIELDS, ENV_PREFIX, ENV_VARS, config_keys
from kvtier.config.sections import (
    DISK_BACKENDS,
    EVICTION_POLICIES,
    METHODS,
    CpuConfig,
    DiskConfig,
    EventsConfig,
    GpuConfig,
    MetricsConfig,
    ModelConfig,
    PlannerConfig,
)
from kvtier.config.sections import _with_attributes_doc as _with_attributes_doc  # used by kvtier.p2p.config
from kvtier.config.sizes import SIZE_FORMS, parse_size

__all__ = [
    "CACHE_FIELDS",
    "CONFIG_FILE_ENV",
    "DISK_BACKENDS",
    "ENV_PREFIX",
    "ENV_VARS",
    "EVICTION_POLICIES",
    "METHODS",
    "SIZE_FORMS",
    "CacheConfig",
    "CpuConfig",
    "DiskConfig",
    "EventsConfig",
    "GpuConfig",
    "KVTierConfig",
    "MetricsConfig",
    "ModelConfig",
    "PeersSection",
    "PlannerConfig",
    "config_keys",
    "parse_address",
    "parse_size",
]


def __getattr__(name: str) -> Any:
    if name == "PeersConfig":
        import warnings

        warnings.warn(
            "kvtier.config.PeersConfig is renamed PeersSection (the `peers:` section of a config "
            "file; kvtier.p2p.PeerConfig is a peer service's settings); the old name goes in the "
            "next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return PeersSection
    if name == "open_cache":
        import sys
        import warnings

        warnings.warn(
            "kvtier.config.open_cache is kvtier.open_cache now (the config package builds no cache); "
            "the old name goes in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return sys.modules["kvtier.factory"].open_cache  # loaded by `import kvtier`, which ran first
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

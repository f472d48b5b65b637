"""The key schema: every section and top-level key with its type, default, KVTIER_* variable,
allowed values and doc (config_keys), and CACHE_FIELDS, the keys that are CacheConfig's fields."""

from __future__ import annotations

import dataclasses
from typing import Any

from kvtier.config.checks import _Check, _Float
from kvtier.config.peers import PeersSection
from kvtier.config.sections import (
    CodecConfig,
    CpuConfig,
    DiskConfig,
    EventsConfig,
    GpuConfig,
    MetricsConfig,
    ModelConfig,
    PlannerConfig,
    _plain,
)

ENV_PREFIX = "KVTIER_"


_SECTIONS: dict[str, type] = {
    "cpu": CpuConfig,
    "codec": CodecConfig,
    "disk": DiskConfig,
    "gpu": GpuConfig,
    "model": ModelConfig,
    "planner": PlannerConfig,
    "metrics": MetricsConfig,
    "events": EventsConfig,
    "peers": PeersSection,
}
_TOP_LEVEL = {"timeout_s": (30.0, _Float(), "default deadline of every wait, in seconds")}


def _section_keys(section: str) -> dict[str, tuple[Any, _Check, str, str]]:
    """key -> (default, checker, doc, env name) of one section, in declaration order."""
    cls = _SECTIONS[section]
    if cls is PeersSection:
        items = [(k, d, c, doc, None) for k, (d, c, doc) in PeersSection.KNOWN.items()]
    else:
        items = [
            (f.name, f.default, f.metadata["check"], f.metadata["doc"], f.metadata["env"])
            for f in dataclasses.fields(cls)
        ]
    return {k: (d, c, doc, env or f"{ENV_PREFIX}{section}_{k}".upper()) for k, d, c, doc, env in items}


def config_keys() -> dict[str, dict[str, Any]]:
    """Every config key (dotted path): its type, default, env variable, allowed values and doc."""
    out: dict[str, dict[str, Any]] = {}
    for section in _SECTIONS:
        for key, (default, check, doc, env) in _section_keys(section).items():
            out[f"{section}.{key}"] = {
                "type": check.type_name,
                "default": _plain(default),
                "env": env,
                "allowed": check.allowed,
                "doc": doc,
            }
    for key, (default, check, doc) in _TOP_LEVEL.items():
        out[key] = {
            "type": check.type_name,
            "default": default,
            "env": f"{ENV_PREFIX}{key}".upper(),
            "allowed": check.allowed,
            "doc": doc,
        }
    return out


# env variable -> dotted key, and flat keyword override (env name without the prefix) -> dotted key.
ENV_VARS: dict[str, str] = {info["env"]: dotted for dotted, info in config_keys().items()}
_FLAT_OVERRIDES: dict[str, str] = {env[len(ENV_PREFIX) :].lower(): dotted for env, dotted in ENV_VARS.items()}
# CacheConfig's fields, in their order: field name -> the config key whose checker, default and
# doc it has. A cache setting is declared once, as a config key; its line here makes it a keyword
# of CacheConfig and KVCache, of cache_kwargs() and of the loader's overrides.
CACHE_FIELDS: dict[str, str] = {
    "cpu_bytes": "cpu.bytes",
    "model_id": "model.model_id",
    "tenant_salt": "model.tenant_salt",
    "method": "cpu.method",
    "staging_bytes": "cpu.staging_bytes",
    "cpu_threads": "cpu.threads",
    "cpu_prefault": "cpu.prefault",
    "timeout_s": "timeout_s",
    "disk_dir": "disk.dir",
    "disk_bytes": "disk.bytes",
    "disk_backend": "disk.backend",
    "disk_admit_min_seen": "disk.admit_min_seen",
    "disk_queue_depth": "disk.queue_depth",
    "disk_io_timeout_s": "disk.io_timeout_s",
    "eviction_policy": "cpu.eviction_policy",
    "deterministic_writeback": "disk.deterministic_writeback",
    "disk_write_through": "disk.write_through",
    "disk_max_writebacks_in_flight": "disk.max_writebacks_in_flight",
    "verify_stores": "cpu.verify_stores",
    "disk_reset_on_mismatch": "disk.reset_on_mismatch",
    "disk_persist_on_close": "disk.persist_on_close",
    "disk_persist_interval_s": "disk.persist_interval_s",
    "events_capacity": "events.capacity",
    "codec_name": "codec.name",
    "codec_fp8_scale_dtype": "codec.fp8_scale_dtype",
    "codec_zstd_level": "codec.zstd_level",
    "codec_slot_fraction": "codec.slot_fraction",
    "codec_device": "codec.device",
}
# CacheConfig fields whose default, None, means the value of the key's KVTIER_* variable (unset
# or empty: the key's default), so that a KVCache built without the loader follows it too.
_CACHE_FROM_ENV = frozenset({"verify_stores"})
_FLAT_OVERRIDES.update(CACHE_FIELDS)

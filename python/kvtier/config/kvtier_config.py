"""KVTierConfig, the whole engine's validated config, built from its layers (defaults < YAML <
environment < overrides). kvtier.open_cache builds a KVCache from one."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kvtier.config.cache_config import CacheConfig
from kvtier.config.checks import _checked
from kvtier.config.key_errors import _invalid, _unknown
from kvtier.config.layers import CONFIG_FILE_ENV, _flatten, _read_env, _read_overrides, _read_yaml, _yaml
from kvtier.config.peers import PeersSection
from kvtier.config.rules import _check_rules
from kvtier.config.schema import _SECTIONS, _TOP_LEVEL, CACHE_FIELDS, _section_keys, config_keys
from kvtier.config.sections import (
    CodecConfig,
    CpuConfig,
    DiskConfig,
    EventsConfig,
    GpuConfig,
    MetricsConfig,
    ModelConfig,
    PlannerConfig,
)
from kvtier.errors import InvalidArgumentError


@dataclass(frozen=True)
class KVTierConfig:
    """The whole engine's settings, validated; build it with :meth:`load`.

    Sections are frozen dataclasses (``cfg.cpu.bytes``, ``cfg.disk.dir``, ...); ``peers`` is a
    read-only mapping passed through to the peer service. A section may also be given as a dict:
    ``KVTierConfig(cpu={"bytes": "8GiB"})``.
    """

    cpu: CpuConfig = field(default_factory=CpuConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    disk: DiskConfig = field(default_factory=DiskConfig)
    gpu: GpuConfig = field(default_factory=GpuConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    peers: PeersSection = field(default_factory=PeersSection)
    timeout_s: float = _TOP_LEVEL["timeout_s"][0]

    def __post_init__(self) -> None:
        for name, cls in _SECTIONS.items():
            value = getattr(self, name)
            if isinstance(value, cls):
                continue
            if not isinstance(value, Mapping):
                raise _invalid(name, value, f"a mapping of {name} keys ({', '.join(_section_keys(name))})")
            known = _section_keys(name)
            if cls is not PeersSection:
                for key in value:
                    if key not in known:
                        known_keys = [f"{name}.{k}" for k in known]
                        raise _unknown("config key", f"{name}.{key}", known_keys, None, f"{name}.")
            object.__setattr__(self, name, cls(**value))
        for key, (_, check, _) in _TOP_LEVEL.items():
            object.__setattr__(self, key, _checked(key, check, getattr(self, key)))
        _check_rules({dotted: self.get(dotted) for dotted in config_keys()})

    def get(self, dotted: str) -> Any:
        """The value of one key, by its dotted path (``cfg.get("disk.queue_depth")``)."""
        section, _, key = dotted.partition(".")
        if not key:
            return getattr(self, section)
        return getattr(self, section)[key] if section == "peers" else getattr(getattr(self, section), key)

    # -- building ----------------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        path: str | os.PathLike | None = None,
        env: Mapping[str, str] | None = os.environ,
        **overrides: Any,
    ) -> KVTierConfig:
        """Defaults, then the YAML file, then ``KVTIER_*`` variables of ``env``, then ``overrides``.

        Args:
            path: a YAML file of sections (``cpu: {bytes: 8GiB}``); None: the file named by
                ``KVTIER_CONFIG`` in ``env``, if any.
            env: environment to read ``KVTIER_*`` variables from (None: none).
            overrides: a section as a dict or section object (``disk={"dir": "/nvme"}``), a flat
                key as its variable name without the prefix (``cpu_bytes="8GiB"``,
                ``model_id="llama"``, ``timeout_s=5``) or as a keyword of ``KVCache``
                (``method="cpu"``), or a dotted key (``**{"cpu.bytes": 1 << 30}``).
        Raises:
            InvalidArgumentError: a wrong value or unknown key, named with where it came from.
        """
        layers: list[dict[str, tuple[Any, str]]] = []
        if path is None and env is not None and env.get(CONFIG_FILE_ENV):
            path = env[CONFIG_FILE_ENV]
        if path is not None:
            layers.append(_read_yaml(path))
        if env is not None:
            layers.append(_read_env(env))
        layers.append(_read_overrides(overrides))
        return cls._from_layers(layers)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "dict") -> KVTierConfig:
        """A config from nested plain data (as ``to_dict()`` returns), unknown keys refused."""
        return cls._from_layers([_flatten(data, source)])

    def replace(self, **overrides: Any) -> KVTierConfig:
        """A copy with ``overrides`` (same forms as :meth:`load`) applied on top."""
        return self._from_layers([_flatten(self.to_dict(), "the config replaced"), _read_overrides(overrides)])

    @classmethod
    def _from_layers(cls, layers: list[dict[str, tuple[Any, str]]]) -> KVTierConfig:
        merged: dict[str, tuple[Any, str]] = {}
        for layer in layers:
            merged.update(layer)
        nested: dict[str, Any] = {name: {} for name in _SECTIONS}
        top: dict[str, Any] = {}
        for dotted, (value, _) in merged.items():
            section, _, key = dotted.partition(".")
            if key:
                nested[section][key] = value
            else:
                top[section] = value
        try:
            return cls(**nested, **top)
        except InvalidArgumentError as e:  # name where the wrong value came from
            key = getattr(e, "key", None)
            if key in merged and hasattr(e, "allowed"):
                raise _invalid(key, e.value, e.allowed, merged[key][1]) from None
            raise

    # -- views -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Nested plain data (sizes in bytes), loadable again by :meth:`from_dict` or YAML."""
        out: dict[str, Any] = {name: getattr(self, name).to_dict() for name in _SECTIONS}
        out["timeout_s"] = self.timeout_s
        return out

    def to_yaml(self) -> str:
        """The config as YAML text; ``load()`` of that text gives an equal config."""
        yaml = _yaml()
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    def cache_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`CacheConfig` (and so of ``KVCache``)."""
        return {name: self.get(dotted) for name, dotted in CACHE_FIELDS.items()}

    def cache_config(self) -> CacheConfig:
        """The :class:`CacheConfig` of this config (``KVCache(layout, cfg.cache_config())``)."""
        return CacheConfig(**self.cache_kwargs())

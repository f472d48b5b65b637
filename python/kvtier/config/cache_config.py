"""CacheConfig, the settings of one KVCache: its fields are made from the config keys named in
CACHE_FIELDS, with their checkers, defaults and docs."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from kvtier.config.checks import _checked
from kvtier.config.key_errors import _invalid, _Rejected
from kvtier.config.rules import _check_rules
from kvtier.config.schema import (
    _CACHE_FROM_ENV,
    _SECTIONS,
    _TOP_LEVEL,
    CACHE_FIELDS,
    _section_keys,
    config_keys,
)
from kvtier.config.sections import _plain, _with_attributes_doc


def _with_cache_fields(cls: type) -> type:
    """Adds CacheConfig's fields, each from its config key (CACHE_FIELDS), and their docs."""
    keys = config_keys()
    lines = []
    for name, dotted in CACHE_FIELDS.items():
        section, _, key = dotted.partition(".")
        if key:
            f = next(f for f in dataclasses.fields(_SECTIONS[section]) if f.name == key)
            default, check, doc, type_, show = (
                f.default,
                f.metadata["check"],
                f.metadata["doc"],
                f.type,
                f.repr,
            )
        else:
            default, check, doc = _TOP_LEVEL[dotted]
            type_, show = "float", True
        env = keys[dotted]["env"]
        if name in _CACHE_FROM_ENV:
            default, type_ = None, f"{type_} | None"
            doc += f" (None: {env}, or {_plain(keys[dotted]['default'])!r} when it is unset)"
        cls.__annotations__[name] = type_
        setattr(
            cls,
            name,
            field(default=default, repr=show, metadata={"key": dotted, "check": check, "doc": doc}),
        )
        lines.append((name, f"{doc}. Config key ``{dotted}``, variable ``{env}``."))
    cls.__doc__ = _with_attributes_doc(cls.__doc__, lines)
    return cls


@dataclass(frozen=True)
@_with_cache_fields
class CacheConfig:
    """The settings of one :class:`kvtier.KVCache` (``kvtier.CacheConfig``): the cache keys of
    :class:`KVTierConfig` under the names of KVCache's keywords (CACHE_FIELDS), with the same
    checks and defaults. Python values only: sizes as ints of bytes, booleans as bools (a
    config file or the environment takes text forms; see :meth:`KVTierConfig.cache_config`). A
    wrong value raises InvalidArgumentError naming the field, the value and what is allowed."""

    def __post_init__(self) -> None:
        values: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            raw = getattr(self, f.name)
            if raw is None and f.name in _CACHE_FROM_ENV:
                value = _from_environ(f.metadata["key"])
            else:
                value = _checked(f.name, f.metadata["check"], raw, typed=True)
            object.__setattr__(self, f.name, value)
            values[f.metadata["key"]] = value
        _check_rules(values, _CACHE_NAMES.__getitem__)


_CACHE_NAMES = {dotted: name for name, dotted in CACHE_FIELDS.items()}


def _from_environ(dotted: str) -> Any:
    """A key's value from its KVTIER_* variable in os.environ; its default when unset or empty."""
    info = config_keys()[dotted]
    raw = os.environ.get(info["env"], "")
    if not raw.strip():
        return info["default"]
    section, _, key = dotted.partition(".")
    check = _section_keys(section)[key][1] if key else _TOP_LEVEL[dotted][1]
    try:
        return check(raw)
    except _Rejected:
        raise _invalid(dotted, raw, check.allowed, f"environment {info['env']}") from None

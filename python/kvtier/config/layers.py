"""Where a config's values come from: a YAML file, the KVTIER_* environment and keyword
overrides, each read into one layer {dotted key: (value, where it came from)}."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from kvtier.config.key_errors import _unknown
from kvtier.config.schema import _FLAT_OVERRIDES, _SECTIONS, _TOP_LEVEL, ENV_PREFIX, ENV_VARS, _section_keys
from kvtier.config.sections import _Section
from kvtier.errors import InvalidArgumentError, UnavailableError

# The variable that names a YAML file when load() gets no path.
CONFIG_FILE_ENV = "KVTIER_CONFIG"
# KVTIER_* variables that belong to the build and the test suite, not to the engine's config.
_ENV_NOT_CONFIG = frozenset({CONFIG_FILE_ENV, "KVTIER_CUDA", "KVTIER_LIBURING"})
_ENV_NOT_CONFIG_PREFIXES = ("KVTIER_TEST_", "KVTIER_BUILD_", "KVTIER_BENCH_")


def _yaml():
    try:
        import yaml
    except ImportError as e:
        raise UnavailableError(f"reading or writing YAML config needs PyYAML: pip install pyyaml ({e})") from None
    return yaml


def _read_yaml(path: str | os.PathLike) -> dict[str, tuple[Any, str]]:
    yaml = _yaml()
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise InvalidArgumentError(f"config file {name!r} does not exist") from None
    except IsADirectoryError:
        raise InvalidArgumentError(f"config file {name!r} is a directory") from None
    except yaml.YAMLError as e:
        raise InvalidArgumentError(f"config file {name!r} is not valid YAML: {e}") from None
    if data is None:  # an empty file
        return {}
    return _flatten(data, name)


def _flatten(data: Any, source: str) -> dict[str, tuple[Any, str]]:
    """Nested sections -> {dotted key: (value, source)}, unknown keys refused."""
    if not isinstance(data, Mapping):
        raise InvalidArgumentError(
            f"config from {source} must be a mapping of sections ({', '.join(_SECTIONS)}) and "
            f"timeout_s, got {type(data).__name__}"
        )
    top_names = [*_SECTIONS, *_TOP_LEVEL]
    out: dict[str, tuple[Any, str]] = {}
    for name, value in data.items():
        if name in _TOP_LEVEL:
            out[name] = (value, source)
            continue
        if name not in _SECTIONS:
            raise _unknown("config section", str(name), top_names, source)
        if value is None:  # "disk:" with nothing under it
            continue
        if isinstance(value, _Section):
            value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        if not isinstance(value, Mapping):
            known = ", ".join(_section_keys(name))
            raise InvalidArgumentError(
                f"{name}: invalid value {value!r} (from {source}); allowed: a mapping of {name} keys ({known})"
            )
        known = _section_keys(name)
        for key, v in value.items():
            # peers passes keys it does not know through to the peer service
            if not isinstance(key, str) or (key not in known and name != "peers"):
                known_keys = [f"{name}.{k}" for k in known]
                raise _unknown("config key", f"{name}.{key}", known_keys, source, f"{name}.")
            out[f"{name}.{key}"] = (v, source)
    return out


def _read_env(env: Mapping[str, str]) -> dict[str, tuple[Any, str]]:
    out: dict[str, tuple[Any, str]] = {}
    for var, value in env.items():
        if not var.startswith(ENV_PREFIX) or var in _ENV_NOT_CONFIG or var.startswith(_ENV_NOT_CONFIG_PREFIXES):
            continue
        dotted = ENV_VARS.get(var)
        if dotted is None:
            raise _unknown(
                "environment variable",
                var,
                sorted(ENV_VARS),
                None,
                prefix=ENV_PREFIX,
                hint="every KVTIER_* variable must be a config key (see docs/configuration.md)",
            )
        out[dotted] = (value, f"environment {var}")
    return out


def _read_overrides(overrides: Mapping[str, Any]) -> dict[str, tuple[Any, str]]:
    out: dict[str, tuple[Any, str]] = {}
    for name, value in overrides.items():
        source = f"keyword {name}"
        if name in _SECTIONS:
            out.update(_flatten({name: value}, source))
        elif name in _FLAT_OVERRIDES:
            out[_FLAT_OVERRIDES[name]] = (value, source)
        elif "." in name and name.partition(".")[0] in _SECTIONS:
            out.update(_flatten({name.partition(".")[0]: {name.partition(".")[2]: value}}, source))
        else:
            known = [*_SECTIONS, *_FLAT_OVERRIDES]
            raise _unknown(
                "config override",
                name,
                known,
                None,
                hint="known: sections, " + ", ".join(_FLAT_OVERRIDES),
            )
    return out

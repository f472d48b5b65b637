"""Value checkers: one _Check per kind of value (int, float, size, choice, bool, text, path,
salt, address, optional), and _checked, which names the key of a refused value."""

from __future__ import annotations

import math
import os
import re
from typing import Any, ClassVar

from kvtier.config.addresses import _ADDRESS_FORMS, _split_address
from kvtier.config.key_errors import _invalid, _Rejected
from kvtier.config.sizes import SIZE_FORMS, _parse_size


class _Check:
    """Parses one value or rejects it.

    ``typed=False`` (config files, the environment, keyword overrides of the loader): text forms
    are read too (``"8GiB"``, ``"64"``, ``"yes"``, ``"null"``). ``typed=True`` (the Python
    settings objects, :class:`CacheConfig` and :class:`PeerConfig`): numbers, sizes and booleans
    must be given as Python ints, floats and bools. ``allowed`` and ``typed_allowed`` say what
    each accepts.
    """

    allowed: str = ""
    type_name: str = ""

    @property
    def typed_allowed(self) -> str:
        return self.allowed

    def __call__(self, value: Any, typed: bool = False) -> Any:
        raise NotImplementedError


class _Int(_Check):
    def __init__(self, lo: int, hi: int | None = None) -> None:
        self.lo, self.hi = lo, hi
        self.allowed = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
        self.type_name = "int"

    def __call__(self, value: Any, typed: bool = False) -> int:
        if isinstance(value, str) and not typed:
            try:
                value = int(value.strip())
            except ValueError:
                raise _Rejected from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Rejected
        if value < self.lo or (self.hi is not None and value > self.hi):
            raise _Rejected
        return value


class _Float(_Check):
    """A finite number > ``lo`` (``lo`` 0) or >= ``lo``, <= ``hi`` (< ``hi`` with ``hi_open``);
    ``zero_ok``: 0 also, meaning off."""

    def __init__(
        self,
        lo: float = 0.0,
        zero_ok: bool = False,
        hi: float | None = None,
        hi_open: bool = False,
    ) -> None:
        self.lo, self.zero_ok, self.hi, self.hi_open = lo, zero_ok, hi, hi_open
        self.allowed = "a number > 0" if lo == 0 else f"a number >= {lo}"
        if hi is not None:
            self.allowed += f" and {'<' if hi_open else '<='} {hi:g}"
        if zero_ok:
            self.allowed = f"0 (off) or {self.allowed}"
        self.type_name = "float"

    def __call__(self, value: Any, typed: bool = False) -> float:
        if isinstance(value, str) and not typed:
            try:
                value = float(value.strip())
            except ValueError:
                raise _Rejected from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _Rejected
        if self.zero_ok and value == 0:
            return 0.0
        if value <= 0 or value < self.lo:
            raise _Rejected
        if self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi):
            raise _Rejected
        return float(value)


class _Size(_Check):
    def __init__(self, lo: int) -> None:
        self.lo = lo
        at_least = "" if lo == 0 else f" of at least {lo} byte" + ("s" if lo != 1 else "")
        self.allowed = f"a size{at_least}: {SIZE_FORMS}"
        self.type_name = "size"

    @property
    def typed_allowed(self) -> str:
        return f"an int number of bytes >= {self.lo}"

    def __call__(self, value: Any, typed: bool = False) -> int:
        if typed and (isinstance(value, bool) or not isinstance(value, int)):
            raise _Rejected
        n = _parse_size(value)
        if n < self.lo:
            raise _Rejected
        return n


class _Choice(_Check):
    def __init__(self, options: tuple[str, ...]) -> None:
        self.options = options
        self.allowed = "one of " + ", ".join(repr(o) for o in options)
        self.type_name = " | ".join(options)

    def __call__(self, value: Any, typed: bool = False) -> str:
        if isinstance(value, str) and value.strip().lower() in self.options:
            return value.strip().lower()
        raise _Rejected


class _Bool(_Check):
    allowed = "true or false (also 1/0, yes/no, on/off)"
    typed_allowed = "True or False"  # type: ignore[assignment]
    type_name = "bool"
    _WORDS: ClassVar[dict[str, bool]] = {
        "1": True,
        "true": True,
        "yes": True,
        "on": True,
        "0": False,
        "false": False,
        "no": False,
        "off": False,
    }

    def __call__(self, value: Any, typed: bool = False) -> bool:
        if isinstance(value, bool):
            return value
        if typed:
            raise _Rejected
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in self._WORDS:
            return self._WORDS[value.strip().lower()]
        raise _Rejected


class _Text(_Check):
    def __init__(
        self,
        pattern: str | None = None,
        what: str = "a non-empty string",
        max_bytes: int | None = None,
    ) -> None:
        self.pattern = re.compile(pattern) if pattern else None
        self.max_bytes = max_bytes
        self.allowed = what
        self.type_name = "str"

    def __call__(self, value: Any, typed: bool = False) -> str:
        if not isinstance(value, str) or not value:
            raise _Rejected
        if self.pattern is not None and not self.pattern.fullmatch(value):
            raise _Rejected
        if self.max_bytes is not None and len(value.encode()) > self.max_bytes:
            raise _Rejected
        return value


class _Dir(_Check):
    allowed = "an existing directory"
    type_name = "path"

    def __call__(self, value: Any, typed: bool = False) -> str:
        if not isinstance(value, (str, os.PathLike)) or not str(value):
            raise _Rejected
        path = os.path.expanduser(os.fspath(value))
        if not os.path.isdir(path):
            raise _Rejected
        return path


class _File(_Check):
    allowed = "a file path"
    type_name = "path"

    def __call__(self, value: Any, typed: bool = False) -> str:
        if not isinstance(value, (str, os.PathLike)) or not str(value):
            raise _Rejected
        return os.path.expanduser(os.fspath(value))


class _Salt(_Check):
    allowed = "a string or bytes"
    type_name = "str | bytes"

    def __call__(self, value: Any, typed: bool = False) -> str | bytes:
        if isinstance(value, str):
            return value
        if isinstance(value, (bytes, bytearray, memoryview)):
            return bytes(value)
        raise _Rejected


class _Address(_Check):
    allowed = _ADDRESS_FORMS
    type_name = "host:port"

    def __call__(self, value: Any, typed: bool = False) -> str:
        _split_address(value)
        return value.strip()


class _AddressList(_Check):
    """A list of addresses; a comma-separated string is one too (the environment's and
    ``kvtier peer --seeds``' form)."""

    allowed = f"a list of {_ADDRESS_FORMS} (in the environment: comma-separated)"
    type_name = "list of host:port"

    def __call__(self, value: Any, typed: bool = False) -> tuple[str, ...]:
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        if not isinstance(value, (list, tuple)):
            raise _Rejected
        return tuple(_Address()(v) for v in value)


class _Optional(_Check):
    """None, or the inner value. ``none_words``: "", "none" and "null" strings also mean None
    where text is read (the environment cannot spell null otherwise)."""

    def __init__(
        self,
        inner: _Check,
        meaning: str = "unset",
        none_words: tuple[str, ...] = ("", "none", "null"),
    ):
        self.inner, self.none_words, self.meaning = inner, none_words, meaning
        self.allowed = f"{inner.allowed}, or null ({meaning})"
        self.type_name = f"{inner.type_name} or null"

    @property
    def typed_allowed(self) -> str:
        return f"{self.inner.typed_allowed}, or None ({self.meaning})"

    def __call__(self, value: Any, typed: bool = False) -> Any:
        if value is None:
            return None
        if not typed and isinstance(value, str) and value.strip().lower() in self.none_words:
            return None
        return self.inner(value, typed)


def _checked(key: str, check: _Check, value: Any, typed: bool = False) -> Any:
    """``check(value)``, or the InvalidArgumentError naming ``key``, the value and what is
    allowed."""
    try:
        return check(value, typed)
    except _Rejected:
        raise _invalid(key, value, check.typed_allowed if typed else check.allowed) from None

"""The errors of a config: a wrong value (naming its key, the value and what is allowed) and an
unknown key (with the close matches); _Rejected is a checker's refusal before the key is known."""

from __future__ import annotations

import difflib
from typing import Any

from kvtier.errors import InvalidArgumentError


def _invalid(key: str, value: Any, allowed: str, source: str | None = None) -> InvalidArgumentError:
    """The error for a wrong value, carrying key, value and allowed (a loader adds the source)."""
    where = f" (from {source})" if source else ""
    err = InvalidArgumentError(f"{key}: invalid value {value!r}{where}; allowed: {allowed}")
    err.key, err.value, err.allowed = key, value, allowed
    return err


def _unknown(
    what: str, name: str, known: list[str], source: str | None, prefix: str = "", hint: str = ""
) -> InvalidArgumentError:
    """The error for an unknown key, with close matches (difflib, compared without the prefix)."""
    where = f" (from {source})" if source else ""
    stems = [k[len(prefix) :] for k in known]
    close = [prefix + c for c in difflib.get_close_matches(name[len(prefix) :], stems, n=3, cutoff=0.6)]
    if close:
        suggestion = "did you mean " + " or ".join(repr(c) for c in close) + "?"
    else:
        suggestion = hint or "known: " + ", ".join(known)
    err = InvalidArgumentError(f"unknown {what} {name!r}{where}; {suggestion}")
    err.key, err.close_matches = name, close
    return err


class _Rejected(Exception):
    """A checker refused a value; the caller turns it into an InvalidArgumentError with the key."""

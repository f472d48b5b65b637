"""Request traces for the simulator: the Mooncake format, a token-id format, and a generator.

A trace becomes a list of :class:`Request`: arrival time, prompt length, output length, and the
ids of the prompt's full chunks. A chunk id names the whole prefix up to the chunk's end (like
kvtier's chained chunk keys), so two requests share chunk ``i`` only if they share every token
before it.

Formats (one JSON object a line; blank lines are skipped):

- **Mooncake** (FAST'25 trace release): ``timestamp`` (ms), ``input_length``, ``output_length``,
  ``hash_ids`` (one id per ``block_tokens``-token block, 512 in the release; equal ids at equal
  positions mean a reusable prefix block). A block holds ``block_tokens / chunk_tokens`` chunks;
  the last, partial block only its full chunks.
- **Tokens**: ``tokens`` (token ids), optional ``timestamp`` (ms) and ``output_length``.

A bad line raises :class:`TraceError` naming the file, the line number and the field.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ChunkInterner",
    "Request",
    "TraceError",
    "load_trace",
    "parse_mooncake",
    "parse_tokens",
    "synthetic_trace",
    "trace_summary",
]


class TraceError(ValueError):
    """A trace line that cannot be used; the message names the line and the field."""


@dataclass(frozen=True)
class Request:
    """One request of a trace.

    Attributes:
        arrival_s: arrival time in seconds from the trace's start.
        input_length: prompt tokens.
        output_length: tokens to generate (reported, not simulated: TTFT ends at the first).
        chunks: ids of the prompt's full chunks, in order (prefix-chained).
        line: the trace line it came from (1-based; 0 for generated requests).
    """

    arrival_s: float
    input_length: int
    output_length: int
    chunks: tuple[int, ...]
    line: int = 0


class ChunkInterner:
    """Gives each distinct prefix (parent chunk id, this chunk's content) one integer id."""

    def __init__(self) -> None:
        self._ids: dict = {}

    def chain(self, parts) -> tuple[int, ...]:
        """Ids of the chunks whose contents are ``parts`` (hashable), each chained to the last."""
        ids = self._ids
        out = []
        parent = -1
        for p in parts:
            key = (parent, p)
            cid = ids.get(key)
            if cid is None:
                cid = ids[key] = len(ids)
            out.append(cid)
            parent = cid
        return tuple(out)

    def __len__(self) -> int:
        return len(self._ids)


def _field(obj: dict, name: str, where: str, *, kind=int, required: bool = True, default=None):
    if name not in obj:
        if required:
            raise TraceError(f"{where}: missing field {name!r}")
        return default
    v = obj[name]
    if kind is int and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
        raise TraceError(f"{where}: field {name!r} must be a non-negative integer, got {v!r}")
    if kind is float and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0):
        raise TraceError(f"{where}: field {name!r} must be a non-negative number, got {v!r}")
    return v


def _lines(path: Path):
    if not path.is_file():
        raise TraceError(f"cannot open trace {str(path)!r}: no such file")
    with open(path, encoding="utf-8") as f:
        for i, text in enumerate(f, start=1):
            text = text.strip()
            if not text:
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise TraceError(f"{path}:{i}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise TraceError(f"{path}:{i}: expected a JSON object, got {type(obj).__name__}")
            yield i, obj


def parse_mooncake(
    obj: dict, where: str, interner: ChunkInterner, *, block_tokens: int, chunk_tokens: int, line: int = 0
) -> Request:
    """One Mooncake trace record -> :class:`Request`."""
    ts = _field(obj, "timestamp", where, kind=float)
    n = _field(obj, "input_length", where)
    out = _field(obj, "output_length", where, required=False, default=0)
    ids = obj.get("hash_ids")
    if ids is None:
        raise TraceError(f"{where}: missing field 'hash_ids'")
    if not isinstance(ids, list) or any(isinstance(h, bool) or not isinstance(h, int) for h in ids):
        raise TraceError(f"{where}: field 'hash_ids' must be a list of integers")
    need = -(-n // block_tokens)
    if len(ids) < need:
        raise TraceError(
            f"{where}: field 'hash_ids' has {len(ids)} blocks but input_length={n} "
            f"needs {need} blocks of {block_tokens} tokens"
        )
    per_block = block_tokens // chunk_tokens
    full = n // chunk_tokens
    parts = [(h, j) for h in ids[:need] for j in range(per_block)][:full]
    return Request(ts / 1000.0, n, out, interner.chain(parts), line)


def parse_tokens(
    obj: dict, where: str, interner: ChunkInterner, *, chunk_tokens: int, line: int = 0, default_ts: float = 0.0
) -> Request:
    """One token-id record -> :class:`Request`."""
    toks = obj.get("tokens")
    if toks is None:
        raise TraceError(f"{where}: missing field 'tokens'")
    if (
        not isinstance(toks, list)
        or not toks
        or any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in toks)
    ):
        raise TraceError(f"{where}: field 'tokens' must be a non-empty list of non-negative integers")
    ts = _field(obj, "timestamp", where, kind=float, required=False, default=default_ts)
    out = _field(obj, "output_length", where, required=False, default=0)
    full = len(toks) // chunk_tokens
    parts = [tuple(toks[i * chunk_tokens : (i + 1) * chunk_tokens]) for i in range(full)]
    return Request(ts / 1000.0, len(toks), out, interner.chain(parts), line)


def load_trace(
    path, *, chunk_tokens: int = 512, block_tokens: int = 512, fmt: str = "auto", limit: int | None = None
) -> list[Request]:
    """Read a trace file (Mooncake or token-id JSONL; ``fmt="auto"`` looks at each line's fields).

    Args:
        chunk_tokens: the simulated cache's chunk size; must divide ``block_tokens`` (Mooncake).
        block_tokens: tokens per Mooncake hash block (512 in the published traces).
        limit: read at most this many requests.
    Raises:
        TraceError: a bad line (file, line number and field named) or an empty trace.
    """
    path = Path(path)
    if fmt not in ("auto", "mooncake", "tokens"):
        raise ValueError(f"fmt must be 'auto', 'mooncake' or 'tokens', got {fmt!r}")
    if chunk_tokens <= 0 or block_tokens <= 0 or block_tokens % chunk_tokens:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be positive and divide block_tokens={block_tokens}")
    interner = ChunkInterner()
    out: list[Request] = []
    last_ts = 0.0
    for i, obj in _lines(path):
        where = f"{path}:{i}"
        kind = fmt if fmt != "auto" else ("mooncake" if "hash_ids" in obj else "tokens" if "tokens" in obj else "")
        if not kind:
            raise TraceError(f"{where}: neither 'hash_ids' (Mooncake) nor 'tokens' field found")
        if kind == "mooncake":
            r = parse_mooncake(obj, where, interner, block_tokens=block_tokens, chunk_tokens=chunk_tokens, line=i)
        else:
            r = parse_tokens(obj, where, interner, chunk_tokens=chunk_tokens, line=i, default_ts=last_ts * 1000.0)
        if r.arrival_s < last_ts:
            raise TraceError(
                f"{where}: field 'timestamp' goes back in time ({r.arrival_s * 1000:g} ms after {last_ts * 1000:g} ms)"
            )
        last_ts = r.arrival_s
        out.append(r)
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise TraceError(f"{path}: the trace holds no requests")
    return out


def synthetic_trace(
    n: int,
    *,
    seed: int = 0,
    rate_per_s: float = 4.0,
    prefixes: int = 200,
    zipf_s: float = 1.1,
    prefix_chunks: tuple[int, int] = (4, 40),
    suffix_chunks: tuple[int, int] = (1, 16),
    chunk_tokens: int = 512,
    turns: float = 0.3,
) -> list[Request]:
    """A Mooncake-like trace: Poisson arrivals; each request a shared prefix (document or system
    prompt, drawn Zipf-like from ``prefixes``), sometimes the previous turn of a conversation on it
    (probability ``turns``), then fresh chunks. Deterministic for a seed."""
    rng = random.Random(seed)
    weights = [1.0 / (i + 1) ** zipf_s for i in range(prefixes)]
    total = sum(weights)
    cum, acc = [], 0.0
    for w in weights:
        acc += w / total
        cum.append(acc)
    plen = [rng.randint(*prefix_chunks) for _ in range(prefixes)]
    last_turn: dict[int, tuple[int, ...]] = {}
    interner = ChunkInterner()
    fresh = 1 << 40
    t = 0.0
    out = []
    import bisect

    for _ in range(n):
        t += rng.expovariate(rate_per_s)
        p = min(bisect.bisect_left(cum, rng.random()), prefixes - 1)
        parts: list = [("p", p, j) for j in range(plen[p])]
        if p in last_turn and rng.random() < turns:
            parts = list(last_turn[p])
        k = rng.randint(*suffix_chunks)
        parts.extend(("f", fresh + j) for j in range(k))
        fresh += k
        last_turn[p] = tuple(parts)
        n_tok = len(parts) * chunk_tokens + rng.randint(0, chunk_tokens - 1)
        out.append(Request(t, n_tok, rng.randint(1, 200), interner.chain(parts), 0))
    return out


def trace_summary(reqs: list[Request]) -> dict:
    """Requests, chunks, distinct chunks, span in seconds."""
    distinct: set[int] = set()
    chunks = 0
    for r in reqs:
        chunks += len(r.chunks)
        distinct.update(r.chunks)
    return {
        "requests": len(reqs),
        "chunks": chunks,
        "distinct_chunks": len(distinct),
        "span_s": reqs[-1].arrival_s - reqs[0].arrival_s if reqs else 0.0,
    }

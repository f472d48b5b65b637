"""A generated hot-prefix workload, for comparing routing policies (`kvtier sim --trace hot_prefix`).
Seeded and deterministic.

- **System prompts**: ``system_prompts`` shared prefixes of ``system_tokens`` tokens; a new
  session opens with one of them, drawn with Zipf popularity (exponent ``zipf_s``), or with
  probability ``no_system`` with none.
- **Multi-turn sessions**: a session has a geometric number of turns (mean ``turns_mean``); each
  follow-up prompt is the previous prompt, its answer (``output_tokens``) and a new user turn
  (``turn_tokens``), so it extends the previous prompt. A session also ends once its prompt would
  pass ``max_tokens``. An arrival continues an open session (drawn uniformly) with probability
  ``1 - 1 / turns_mean``, else opens a new one.
- First user turns (``first_tokens``) and follow-up turns are new content.

A chunk is shared only when all its tokens are: the chunk in which a shared part ends and new
tokens begin gets content of its own. Arrivals are Poisson at ``rate_per_s``;
:func:`hot_prefix_at_load` sets the rate as a fraction of a cluster's capacity, the requests per
second its instances prefill from scratch (no cache: the same for every policy)::

    from kvtier.sim import SimConfig
    from kvtier.sim.hot_prefix import HotPrefix, hot_prefix_at_load
    reqs = hot_prefix_at_load(2000, 0.7, SimConfig(instances=8), seed=1)
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

from kvtier.errors import InvalidArgumentError
from kvtier.sim.trace import ChunkInterner, Request

__all__ = ["HotPrefix", "capacity_rps", "hot_prefix_at_load", "hot_prefix_requests"]


@dataclass(frozen=True)
class HotPrefix:
    """The generator's shape (see the module's text)."""

    system_prompts: int = 8
    system_tokens: int = 2048
    zipf_s: float = 1.1
    no_system: float = 0.1
    first_tokens: int = 512
    turn_tokens: int = 256
    output_tokens: int = 256
    turns_mean: float = 4.0
    max_tokens: int = 16384
    rate_per_s: float = 1.0

    def __post_init__(self) -> None:
        for name in ("system_prompts", "system_tokens", "first_tokens", "turn_tokens", "max_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise InvalidArgumentError(f"{name} must be a positive int, got {v!r}")
        if isinstance(self.output_tokens, bool) or not isinstance(self.output_tokens, int) or self.output_tokens < 0:
            raise InvalidArgumentError(f"output_tokens must be an int >= 0, got {self.output_tokens!r}")
        if not self.zipf_s >= 0:
            raise InvalidArgumentError(f"zipf_s must be >= 0, got {self.zipf_s!r}")
        if not 0 <= self.no_system <= 1:
            raise InvalidArgumentError(f"no_system must be in [0, 1], got {self.no_system!r}")
        if not self.turns_mean >= 1:
            raise InvalidArgumentError(f"turns_mean must be >= 1, got {self.turns_mean!r}")
        if not (self.rate_per_s > 0 and math.isfinite(self.rate_per_s)):
            raise InvalidArgumentError(f"rate_per_s must be a positive number, got {self.rate_per_s!r}")


def _chunk_parts(segments: list[tuple], chunk_tokens: int) -> list[tuple]:
    """Content of each full chunk of a prompt made of ``segments`` ((id, tokens) in order): the
    (id, start, end) pieces it covers."""
    out, cur, fill = [], [], 0
    for sid, length in segments:
        pos = 0
        while pos < length:
            take = min(length - pos, chunk_tokens - fill)
            cur.append((sid, pos, pos + take))
            pos += take
            fill += take
            if fill == chunk_tokens:
                out.append(tuple(cur))
                cur, fill = [], 0
    return out


def hot_prefix_requests(
    n: int, *, seed: int = 0, chunk_tokens: int = 256, config: HotPrefix | None = None
) -> list[Request]:
    """``n`` requests of the workload, in arrival order."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise InvalidArgumentError(f"n must be an int >= 0, got {n!r}")
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens <= 0:
        raise InvalidArgumentError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
    g = config or HotPrefix()
    rng = random.Random(seed)
    weights = [1.0 / (k + 1) ** g.zipf_s for k in range(g.system_prompts)]
    interner = ChunkInterner()
    follow = 1.0 - 1.0 / g.turns_mean
    open_sessions: list[dict] = []
    fresh = 0
    t = 0.0
    out = []
    for _ in range(n):
        t += rng.expovariate(g.rate_per_s)
        if open_sessions and rng.random() < follow:
            i = rng.randrange(len(open_sessions))
            s = open_sessions[i]
            fresh += 2
            segs = [*s["segments"], (("answer", fresh), g.output_tokens), (("turn", fresh + 1), g.turn_tokens)]
            segs = [x for x in segs if x[1]]
            s["segments"] = segs
            s["left"] -= 1
        else:
            fresh += 1
            segs = []
            if rng.random() >= g.no_system:
                k = rng.choices(range(g.system_prompts), weights)[0]
                segs.append((("system", k), g.system_tokens))
            segs.append((("first", fresh), g.first_tokens))
            turns = 1
            while rng.random() < follow:
                turns += 1
            s = {"segments": segs, "left": turns - 1}
            i = len(open_sessions)
            open_sessions.append(s)
        tokens = sum(x[1] for x in segs)
        nxt = tokens + g.output_tokens + g.turn_tokens
        if s["left"] <= 0 or nxt > g.max_tokens:
            open_sessions[i] = open_sessions[-1]
            open_sessions.pop()
        chunks = interner.chain(_chunk_parts(segs, chunk_tokens))
        out.append(Request(arrival_s=t, input_length=tokens, output_length=g.output_tokens, chunks=chunks))
    return out


def capacity_rps(requests: list[Request], cfg) -> float:
    """Requests per second the cluster of ``cfg`` (a SimConfig) prefills from scratch: its
    instances over the mean cold prefill of ``requests`` (the cost model's)."""
    from kvtier.sim.engine import prefill_step_s

    if not requests:
        raise InvalidArgumentError("capacity_rps needs at least one request")
    mean = sum(prefill_step_s(cfg.hardware, cfg.model, 0, r.input_length) for r in requests) / len(requests)
    return cfg.instances / mean


def hot_prefix_at_load(n: int, load: float, cfg, *, seed: int = 0, config: HotPrefix | None = None) -> list[Request]:
    """The workload with arrivals at ``load`` (0 < load) times :func:`capacity_rps` for ``cfg``."""
    if isinstance(load, bool) or not isinstance(load, (int, float)) or not (load > 0 and math.isfinite(load)):
        raise InvalidArgumentError(f"load must be a positive fraction of capacity, got {load!r}")
    g = replace(config or HotPrefix(), rate_per_s=1.0)
    reqs = hot_prefix_requests(n, seed=seed, chunk_tokens=cfg.chunk_tokens, config=g)
    if not reqs:
        return reqs
    rate = load * capacity_rps(reqs, cfg)
    return [replace(r, arrival_s=r.arrival_s / rate) for r in reqs]

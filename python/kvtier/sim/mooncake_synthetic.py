"""A generated request trace in Mooncake's format, for `kvtier sim --trace synthetic` and for
anyone without a published trace at hand. Seeded and deterministic.

Each record is what Mooncake's FAST'25 trace release holds (``timestamp`` in ms,
``input_length``, ``output_length``, ``hash_ids``: one id a ``block_tokens``-token block, equal
ids at equal positions for equal prefixes), so ``kvtier.sim.trace`` reads it as it reads theirs.
The reuse in it has three sources:

- **System prompts**: a few shared prefixes, drawn with Zipf popularity, each opening a session.
- **Multi-turn sessions**: a follow-up request is its session's previous prompt, the answer to it
  (its ``output_length`` tokens) and a new user turn, so it reuses every full block of the
  previous prompt. A session's next turn is due an exponential think time after its last one;
  an arrival continues the most overdue session (or, with none due, opens a new one).
- Everything else (first user turns, follow-up turns) is new content: fresh block ids.

Arrivals are Poisson. A block is shared only when it is full of shared tokens: the block in which
a system prompt or a previous prompt ends also holds new tokens, so it gets a fresh id.

Example::

    from kvtier.sim import MooncakeSynthetic, synthetic_requests, write_mooncake_trace
    write_mooncake_trace("trace.jsonl", 4000, seed=0)          # the file, for any tool
    reqs = synthetic_requests(4000, seed=0, chunk_tokens=256)  # what `--trace synthetic` replays
    busier = MooncakeSynthetic(rate_per_s=8.0).records(1000)   # dicts, one a request
"""

from __future__ import annotations

import bisect
import heapq
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from kvtier.sim.trace import ChunkInterner, Request, parse_mooncake

__all__ = ["MooncakeSynthetic", "synthetic_requests", "write_mooncake_trace"]


@dataclass(frozen=True)
class MooncakeSynthetic:
    """The generator's knobs; the defaults give a trace of the scale of Mooncake's published
    synthetic one (about 4 requests a second, prompts of about 15k tokens on average).

    Lengths are in tokens. ``*_median`` / ``*_sigma``: log-normal lengths (the median and the
    standard deviation of the log), at least ``tokens_min``.
    """

    rate_per_s: float = 4.0
    block_tokens: int = 512
    system_prompts: int = 6
    system_tokens: tuple[int, int] = (1000, 6000)  # uniform
    system_zipf_s: float = 1.2
    first_turn_median: float = 6000.0
    first_turn_sigma: float = 1.0
    turn_median: float = 400.0
    turn_sigma: float = 0.8
    output_median: float = 250.0
    output_sigma: float = 0.8
    output_max: int = 2000
    continue_p: float = 0.6  # an arrival is a session's next turn with this probability (if one is due)
    think_s: float = 60.0  # mean time from a turn to the session's next one (exponential)
    end_p: float = 0.2  # a session ends after a turn with this probability
    idle_s: float = 1800.0  # a session whose next turn was due this long ago has ended
    max_input_tokens: int = 65536  # a session whose next prompt would be longer ends
    tokens_min: int = 16

    def __post_init__(self) -> None:
        problems = []
        for name in ("rate_per_s", "think_s", "idle_s", "first_turn_median", "turn_median", "output_median"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                problems.append(f"{name} must be a positive number, got {v!r}")
        for name in ("block_tokens", "system_prompts", "output_max", "tokens_min"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)!r}")
        lo, hi = self.system_tokens
        if not 1 <= lo <= hi:
            problems.append(f"system_tokens must be (low, high) with 1 <= low <= high, got {self.system_tokens!r}")
        for name in ("continue_p", "end_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.max_input_tokens < hi + self.tokens_min:
            problems.append(
                f"max_input_tokens={self.max_input_tokens} must hold the longest system prompt "
                f"({hi}) and a first turn ({self.tokens_min})"
            )
        if problems:
            raise ValueError("MooncakeSynthetic: " + "; ".join(problems))

    def records(self, n: int, *, seed: int = 0) -> list[dict]:
        """``n`` trace records (dicts, in arrival order), the same for the same seed."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive number of requests, got {n!r}")
        rng = random.Random(seed)
        ids = _BlockIds()
        sys_len = [rng.randint(*self.system_tokens) for _ in range(self.system_prompts)]
        sys_ids = [ids.fresh(length // self.block_tokens) for length in sys_len]
        sys_cum = _cumulative([1.0 / (i + 1) ** self.system_zipf_s for i in range(self.system_prompts)])
        due: list[tuple[float, int, _Session]] = []  # (next turn's time, tie-break, session): a heap
        t = 0.0
        out = []
        for i in range(n):
            t += rng.expovariate(self.rate_per_s)
            while due and due[0][0] < t - self.idle_s:
                heapq.heappop(due)
            length, shared = 0, []
            if due and due[0][0] <= t and rng.random() < self.continue_p:
                _, _, s = heapq.heappop(due)  # the session whose next turn is the most overdue
                length = s.input_length + s.output_length + self._length(rng, self.turn_median, self.turn_sigma)
                shared = s.hash_ids[: s.input_length // self.block_tokens]
            if not shared or length > self.max_input_tokens:  # a new session
                p = _draw(rng, sys_cum)
                length = min(
                    sys_len[p] + self._length(rng, self.first_turn_median, self.first_turn_sigma), self.max_input_tokens
                )
                shared = sys_ids[p]
            hash_ids = shared + ids.fresh(-(-length // self.block_tokens) - len(shared))
            output = min(self._length(rng, self.output_median, self.output_sigma), self.output_max)
            if rng.random() >= self.end_p:
                heapq.heappush(due, (t + rng.expovariate(1.0 / self.think_s), i, _Session(length, output, hash_ids)))
            out.append(
                {"timestamp": int(t * 1000.0), "input_length": length, "output_length": output, "hash_ids": hash_ids}
            )
        return out

    def _length(self, rng: random.Random, median: float, sigma: float) -> int:
        return max(self.tokens_min, round(rng.lognormvariate(math.log(median), sigma)))


@dataclass(frozen=True)
class _Session:
    input_length: int
    output_length: int
    hash_ids: list[int]


class _BlockIds:
    """Hash ids in order of first use, as in Mooncake's release."""

    def __init__(self) -> None:
        self._next = 0

    def fresh(self, k: int) -> list[int]:
        start, self._next = self._next, self._next + k
        return list(range(start, start + k))


def _cumulative(weights: list[float]) -> list[float]:
    total = sum(weights)
    acc, out = 0.0, []
    for w in weights:
        acc += w / total
        out.append(acc)
    return out


def _draw(rng: random.Random, cum: list[float]) -> int:
    """An index drawn by the normalised cumulative weights ``cum``."""
    return min(bisect.bisect_left(cum, rng.random()), len(cum) - 1)


def synthetic_requests(
    n: int, *, seed: int = 0, chunk_tokens: int = 512, config: MooncakeSynthetic | None = None
) -> list[Request]:
    """The generated trace as the simulator's requests, read by the Mooncake reader
    (``parse_mooncake``) as a trace file's lines are. ``chunk_tokens`` must divide the
    generator's ``block_tokens``."""
    gen = config or MooncakeSynthetic()
    if chunk_tokens <= 0 or gen.block_tokens % chunk_tokens:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be positive and divide block_tokens={gen.block_tokens}")
    interner = ChunkInterner()
    return [
        parse_mooncake(
            r, f"synthetic:{n} request {i}", interner, block_tokens=gen.block_tokens, chunk_tokens=chunk_tokens, line=i
        )
        for i, r in enumerate(gen.records(n, seed=seed), start=1)
    ]


def write_mooncake_trace(path, n: int, *, seed: int = 0, config: MooncakeSynthetic | None = None) -> Path:
    """Write ``n`` generated records to ``path`` as JSONL (Mooncake's format); returns the path."""
    path = Path(path)
    with open(path, "w", encoding="utf-8") as f:
        for r in (config or MooncakeSynthetic()).records(n, seed=seed):
            f.write(json.dumps(r, separators=(", ", ": ")) + "\n")
    return path

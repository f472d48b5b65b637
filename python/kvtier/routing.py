"""Routing policies: which instance serves a request, from where its KV is and how busy each is.

A policy sees one :class:`Candidate` per instance (its queued work in seconds and the leading
chunks of the request it holds, by tier) and returns the index of the one it picks. The same
objects route the simulator (``kvtier.sim``) and any router that keeps such state.

Built-in policies (:data:`POLICIES`):

- ``round_robin``: instances in turn.
- ``least_loaded``: the least queued work; ties to the instance picked least recently.
- ``cache_aware``: the longest prefix cached on the instance itself (GPU, CPU or disk; chunks its
  peers hold do not count); ties by load, then least recently picked.
- ``kv_load``: the weighted score of llm-d's prefix-cache scorer and Dynamo's KV router, priced
  in seconds: ``saved_s - balance * max(0, queued_s - least_queued_s - slack_s)``, where
  ``saved_s`` is the time the prefix it holds saves (recomputing those tokens minus loading them
  from their tier, by a :class:`PrefixCost`; a ``peer`` chunk, one the instance would pull from
  another instance, saves its recompute less the pull) and ``least_queued_s`` the shortest queue of the
  candidates. A queue at most ``slack_s`` longer than the shortest one counts as none, so a
  session stays where its prefix is while queues are short; beyond that each queued second costs
  ``balance`` seconds. Defaults: :data:`DEFAULT_BALANCE`, :data:`DEFAULT_SLACK_S`. With
  ``balance`` 1 and ``slack_s`` 0 it picks the instance with the earliest estimated first token.

:class:`Dispatcher` is the decision itself (candidates built, the pick checked, recency kept),
one code path for the simulator and kvtier's router (``kvtier.router``); :func:`bind_policy`
builds a policy for either and hands ``kv_load`` its caller's cost model.

Custom policies: subclass :class:`RoutingPolicy`, or pass a callable
``f(request, candidates) -> index`` to :func:`make_policy` (or register it by name with
:func:`register_policy`)::

    from kvtier.routing import make_policy
    policy = make_policy(lambda req, cands: min(range(len(cands)), key=lambda i: cands[i].queued_s))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from kvtier.errors import InvalidArgumentError

__all__ = [
    "DEFAULT_BALANCE",
    "DEFAULT_SLACK_S",
    "POLICIES",
    "TIERS",
    "CacheAware",
    "Candidate",
    "Dispatcher",
    "FunctionPolicy",
    "KvLoad",
    "LeastLoaded",
    "LinearPrefixCost",
    "PrefixCost",
    "RoundRobin",
    "RouteRequest",
    "RoutingPolicy",
    "bind_policy",
    "make_policy",
    "register_policy",
]

TIERS = ("gpu", "cpu", "disk", "peer")
# kv_load's defaults (the simulator's and the router's): a queued second weighs half a second of
# prefill saved, and queues within 50 ms of the shortest count as none (docs/sim.md, "Routing").
DEFAULT_BALANCE = 0.5
DEFAULT_SLACK_S = 0.05


@dataclass(frozen=True)
class RouteRequest:
    """What a policy knows of a request: its prompt tokens and its chunks (prefix-chained ids)."""

    num_tokens: int
    chunks: tuple = ()


@dataclass
class Candidate:
    """One instance as a policy sees it.

    Attributes:
        index: the instance's position (what :meth:`RoutingPolicy.choose` returns).
        queued_s: seconds of work queued ahead of a request arriving now (0 when idle).
        prefix: leading chunks of the request cached there, by tier (``gpu``, ``cpu``, ``disk``,
            ``peer``); tiers not listed hold none. ``peer`` counts the chunks after the
            instance's own run that it would pull from other instances (when they share as
            peers). Filled only for policies whose ``needs_prefix`` is true.
        last_picked: a counter of when it was last picked (0: never); lower is longer ago.
    """

    index: int
    queued_s: float = 0.0
    prefix: dict = field(default_factory=dict)
    last_picked: int = 0

    @property
    def cached_chunks(self) -> int:
        """Leading chunks it would not recompute: its own and those it would pull from peers."""
        return sum(self.prefix.values())

    @property
    def local_chunks(self) -> int:
        """Leading chunks held on the instance itself (GPU, CPU, disk)."""
        return sum(n for t, n in self.prefix.items() if t != "peer")


class PrefixCost(Protocol):
    """Prices a cached prefix: seconds it saves against recomputing it."""

    def saved_s(self, num_tokens: int, prefix: dict) -> float: ...


@dataclass(frozen=True)
class LinearPrefixCost:
    """A cost model with constant per-chunk prices (seconds): recomputing a chunk, loading one
    from each tier into the GPU. Saved seconds = cached chunks * recompute - their loads."""

    recompute_chunk_s: float
    load_chunk_s: dict = field(default_factory=lambda: {"gpu": 0.0})

    def __post_init__(self) -> None:
        if self.recompute_chunk_s < 0:
            raise InvalidArgumentError(f"recompute_chunk_s must be >= 0, got {self.recompute_chunk_s!r}")
        for k, v in self.load_chunk_s.items():
            if k not in TIERS:
                raise InvalidArgumentError(f"load_chunk_s: unknown tier {k!r} (tiers: {TIERS})")
            if v < 0:
                raise InvalidArgumentError(f"load_chunk_s[{k!r}] must be >= 0, got {v!r}")

    def saved_s(self, num_tokens: int, prefix: dict) -> float:
        return sum(n * (self.recompute_chunk_s - self.load_chunk_s.get(t, 0.0)) for t, n in prefix.items())


class RoutingPolicy:
    """Base of the policies. ``choose`` returns the index (into ``candidates``) of the pick;
    ``needs_prefix``: whether the caller must fill :attr:`Candidate.prefix`."""

    name = "custom"
    needs_prefix = False

    def choose(self, request: RouteRequest, candidates: Sequence[Candidate]) -> int:
        raise NotImplementedError

    def reset(self) -> None:
        """Forget any state (a new run)."""


class RoundRobin(RoutingPolicy):
    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, request, candidates):
        i = self._next % len(candidates)
        self._next += 1
        return i

    def reset(self) -> None:
        self._next = 0


def _argmin(candidates: Sequence[Candidate], key) -> int:
    return min(range(len(candidates)), key=lambda i: key(candidates[i]))


class LeastLoaded(RoutingPolicy):
    name = "least_loaded"

    def choose(self, request, candidates):
        return _argmin(candidates, lambda c: (c.queued_s, c.last_picked))


class CacheAware(RoutingPolicy):
    name = "cache_aware"
    needs_prefix = True

    def choose(self, request, candidates):
        return _argmin(candidates, lambda c: (-c.local_chunks, c.queued_s, c.last_picked))


class KvLoad(RoutingPolicy):
    """``saved_s - balance * max(0, queued_s - least_queued_s - slack_s)``, best wins; ties to
    the longer prefix held on the instance itself, then less queued work, then least recently
    picked. ``cost`` prices the prefixes (bound by the simulator when None), peer pulls
    included: an idle instance that would pull a prefix can beat a busy one that holds it.

    ``balance``: seconds of prefill saved that one queued second is worth giving up.
    ``slack_s``: how much longer than the shortest queue an instance's queue may be and still
    count as none (sticky sessions while queues are short; 0: every queued second counts)."""

    name = "kv_load"
    needs_prefix = True

    def __init__(
        self, balance: float = DEFAULT_BALANCE, cost: PrefixCost | None = None, *, slack_s: float = DEFAULT_SLACK_S
    ) -> None:
        if isinstance(balance, bool) or not isinstance(balance, (int, float)) or not balance >= 0:
            raise InvalidArgumentError(f"balance must be >= 0, got {balance!r}")
        if isinstance(slack_s, bool) or not isinstance(slack_s, (int, float)) or not 0 <= slack_s < float("inf"):
            raise InvalidArgumentError(f"slack_s must be a finite number of seconds >= 0, got {slack_s!r}")
        self.balance = float(balance)
        self.slack_s = float(slack_s)
        self.cost = cost

    def score(self, request: RouteRequest, c: Candidate, least_queued_s: float = 0.0) -> float:
        """The candidate's score; ``least_queued_s``: the shortest queue among the candidates."""
        if self.cost is None:
            raise InvalidArgumentError("kv_load needs a cost model: KvLoad(cost=...) or the simulator's")
        queued = max(0.0, c.queued_s - least_queued_s - self.slack_s)
        return self.cost.saved_s(request.num_tokens, c.prefix) - self.balance * queued

    def choose(self, request, candidates):
        q0 = min(c.queued_s for c in candidates)
        return _argmin(candidates, lambda c: (-self.score(request, c, q0), -c.local_chunks, c.queued_s, c.last_picked))


class FunctionPolicy(RoutingPolicy):
    """A callable ``f(request, candidates) -> index`` as a policy (prefixes filled for it)."""

    needs_prefix = True

    def __init__(self, fn: Callable, name: str | None = None) -> None:
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "custom")

    def choose(self, request, candidates):
        return self.fn(request, candidates)


POLICIES: dict[str, Callable[..., RoutingPolicy]] = {
    "round_robin": RoundRobin,
    "least_loaded": LeastLoaded,
    "cache_aware": CacheAware,
    "kv_load": KvLoad,
}


def register_policy(name: str, factory: Callable[..., RoutingPolicy | Callable]) -> None:
    """Make ``name`` usable wherever a policy name is (e.g. ``SimConfig.routing``)."""
    if not isinstance(name, str) or not name:
        raise InvalidArgumentError(f"policy name must be a non-empty string, got {name!r}")
    POLICIES[name] = factory


def make_policy(spec, **kwargs) -> RoutingPolicy:
    """A policy from a name of :data:`POLICIES` (``kwargs`` go to its factory), a
    :class:`RoutingPolicy` (returned as is) or a callable ``f(request, candidates) -> index``."""
    if isinstance(spec, RoutingPolicy):
        return spec
    if isinstance(spec, str):
        if spec not in POLICIES:
            raise InvalidArgumentError(f"routing: unknown policy {spec!r} (known: {sorted(POLICIES)})")
        p = POLICIES[spec](**kwargs)
        if not isinstance(p, RoutingPolicy):
            p = FunctionPolicy(p, name=spec)
        return p
    if callable(spec):
        return FunctionPolicy(spec)
    raise InvalidArgumentError(f"routing: expected a policy name, a RoutingPolicy or a callable, got {spec!r}")


def bind_policy(
    spec,
    *,
    balance: float = DEFAULT_BALANCE,
    slack_s: float = DEFAULT_SLACK_S,
    cost: PrefixCost | None = None,
) -> RoutingPolicy:
    """A fresh policy from ``spec`` (as :func:`make_policy`; a name of ``kv_load`` gets
    ``balance`` and ``slack_s``), reset, and given ``cost`` if it has a ``cost`` still unset
    (kv_load)."""
    p = make_policy(spec, **({"balance": balance, "slack_s": slack_s} if spec == "kv_load" else {}))
    p.reset()
    if getattr(p, "cost", False) is None:
        p.cost = cost
    return p


class Dispatcher:
    """One routing decision, made the same way by the simulator and by kvtier's router: a
    :class:`Candidate` per instance from its queued seconds and (when the policy asks) the
    request's prefix cached there, the policy's pick checked, and when each instance was last
    picked (the policies' tie-break). With one instance the policy is not asked.

    Example::

        d = Dispatcher(bind_policy("least_loaded"), 3)
        d.pick(RouteRequest(512), [0.2, 0.0, 0.1], lambda i: {})  # -> 1
    """

    def __init__(self, policy: RoutingPolicy, instances: int) -> None:
        if isinstance(instances, bool) or not isinstance(instances, int) or instances <= 0:
            raise InvalidArgumentError(f"instances must be a positive int, got {instances!r}")
        self.policy = policy
        self.instances = instances
        self._picks = 0
        self._picked = [0] * instances  # when each instance was last picked (0: never)

    def candidates(self, queued_s: Sequence[float], prefix_of: Callable[[int], dict]) -> list[Candidate]:
        """What the policy sees; ``prefix_of(i)`` is called only when it asks for prefixes."""
        need = self.policy.needs_prefix
        return [
            Candidate(index=i, queued_s=q, prefix=prefix_of(i) if need else {}, last_picked=self._picked[i])
            for i, q in enumerate(queued_s)
        ]

    def pick(self, request: RouteRequest, queued_s: Sequence[float], prefix_of: Callable[[int], dict]) -> int:
        """The index of the instance that serves ``request``; ``queued_s[i]``: seconds of work
        queued at instance ``i``."""
        if len(queued_s) != self.instances:
            raise InvalidArgumentError(f"queued_s has {len(queued_s)} values for {self.instances} instances")
        if self.instances == 1:
            return 0
        cands = self.candidates(queued_s, prefix_of)
        k = self.policy.choose(request, cands)
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < len(cands):
            raise InvalidArgumentError(
                f"routing policy {self.policy.name!r} returned {k!r}, not an index from 0 to {len(cands) - 1}"
            )
        i = cands[k].index
        self._picks += 1
        self._picked[i] = self._picks
        return i

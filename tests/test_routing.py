"""kvtier.routing: each policy's choice on hand-built candidates, the cost pricing, the hook."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kvtier.errors import InvalidArgumentError
from kvtier.routing import (
    DEFAULT_BALANCE,
    DEFAULT_SLACK_S,
    POLICIES,
    CacheAware,
    Candidate,
    KvLoad,
    LeastLoaded,
    LinearPrefixCost,
    RoundRobin,
    RouteRequest,
    RoutingPolicy,
    bind_policy,
    make_policy,
    register_policy,
)

REQ = RouteRequest(num_tokens=4096, chunks=tuple(range(16)))
# recomputing a chunk: 10 ms; loading one: GPU 0, CPU 2 ms, disk 15 ms, peer 6 ms
COST = LinearPrefixCost(0.010, {"gpu": 0.0, "cpu": 0.002, "disk": 0.015, "peer": 0.006})


def cands(*specs):
    return [Candidate(index=i, queued_s=q, prefix=dict(p), last_picked=lp) for i, (q, p, lp) in enumerate(specs)]


def test_round_robin_cycles_and_resets():
    p = RoundRobin()
    c = cands((0, {}, 0), (0, {}, 0), (0, {}, 0))
    assert [p.choose(REQ, c) for _ in range(5)] == [0, 1, 2, 0, 1]
    p.reset()
    assert p.choose(REQ, c) == 0


def test_least_loaded_picks_least_queued_then_least_recently_picked():
    c = cands((0.5, {"gpu": 16}, 1), (0.1, {}, 5), (0.3, {}, 0))
    assert LeastLoaded().choose(REQ, c) == 1
    c = cands((0.0, {}, 7), (0.0, {}, 2), (0.0, {}, 4))
    assert LeastLoaded().choose(REQ, c) == 1


def test_cache_aware_takes_longest_prefix_whatever_the_tier_ties_by_load():
    c = cands((9.0, {"disk": 10}, 0), (0.0, {"gpu": 8}, 0), (0.0, {}, 0))
    assert CacheAware().choose(REQ, c) == 0  # 10 chunks on a busy disk beat 8 on an idle GPU
    c = cands((0.4, {"gpu": 8}, 0), (0.2, {"cpu": 8}, 0))
    assert CacheAware().choose(REQ, c) == 1


def test_kv_load_prices_tiers():
    # same length: GPU saves more than CPU, CPU more than disk
    p = KvLoad(balance=1.0, cost=COST, slack_s=0.0)
    assert p.choose(REQ, cands((0, {"disk": 8}, 0), (0, {"cpu": 8}, 0), (0, {"gpu": 8}, 0))) == 2
    assert p.choose(REQ, cands((0, {"disk": 8}, 0), (0, {"cpu": 8}, 0))) == 1
    assert p.score(REQ, cands((0.05, {"gpu": 4, "cpu": 2}, 0))[0]) == pytest.approx(4 * 0.010 + 2 * 0.008 - 0.05)
    # the queue counts from the shortest one, less the slack
    q = KvLoad(balance=1.0, cost=COST, slack_s=0.01)
    c = cands((0.05, {"gpu": 4, "cpu": 2}, 0))[0]
    assert q.score(REQ, c, 0.02) == pytest.approx(4 * 0.010 + 2 * 0.008 - (0.05 - 0.02 - 0.01))
    assert q.score(REQ, c, 0.045) == pytest.approx(4 * 0.010 + 2 * 0.008)


def test_kv_load_weighs_queue_against_saved_seconds():
    # instance 0 holds 8 GPU chunks (saves 80 ms) but has 100 ms queued; instance 1 is idle, empty
    c = cands((0.100, {"gpu": 8}, 0), (0.0, {}, 0))
    assert KvLoad(balance=1.0, cost=COST, slack_s=0.0).choose(REQ, c) == 1  # 80 - 100 < 0
    assert KvLoad(balance=0.5, cost=COST, slack_s=0.0).choose(REQ, c) == 0  # 80 - 50 > 0
    assert KvLoad(balance=0.0, cost=COST, slack_s=0.0).choose(REQ, c) == 0  # cache only
    assert KvLoad(balance=1.0, cost=COST, slack_s=0.03).choose(REQ, c) == 0  # 80 - (100 - 30) > 0


def test_kv_load_slack_keeps_the_prefix_while_queues_are_short():
    # 2 GPU chunks save 20 ms; the holder has 40 ms more queued than an idle, empty instance
    c = cands((0.040, {"gpu": 2}, 0), (0.0, {}, 0))
    assert KvLoad(balance=1.0, cost=COST, slack_s=0.0).choose(REQ, c) == 1
    assert KvLoad(balance=1.0, cost=COST, slack_s=0.05).choose(REQ, c) == 0  # 40 ms is within the slack
    # only the queue beyond the shortest one counts: everyone 1 s behind changes nothing
    late = cands((1.040, {"gpu": 2}, 0), (1.0, {}, 0))
    assert KvLoad(balance=1.0, cost=COST, slack_s=0.05).choose(REQ, late) == 0
    # within the slack and with nothing cached anywhere: the least queued (least_loaded)
    assert KvLoad(cost=COST).choose(REQ, cands((0.04, {}, 0), (0.01, {}, 0), (0.03, {}, 0))) == 1


def test_kv_load_equal_scores_go_to_the_longer_prefix():
    # a cost model where loading a disk chunk takes as long as recomputing it: 4 disk chunks
    # and no cache score the same, and the cached copy wins the tie
    cost = LinearPrefixCost(0.010, {"gpu": 0.0, "cpu": 0.002, "disk": 0.010})
    assert KvLoad(balance=1.0, cost=cost).choose(REQ, cands((0.0, {}, 0), (0.0, {"disk": 4}, 5))) == 1


def test_kv_load_ties_go_to_less_queue_then_least_recently_picked():
    p = KvLoad(balance=0.0, cost=COST)
    assert p.choose(REQ, cands((0.3, {}, 0), (0.1, {}, 0))) == 1
    assert p.choose(REQ, cands((0.0, {}, 9), (0.0, {}, 3))) == 1


@given(
    st.lists(
        st.tuples(
            st.floats(0, 10),
            st.fixed_dictionaries({"gpu": st.integers(0, 16), "cpu": st.integers(0, 16), "disk": st.integers(0, 16)}),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_kv_load_with_balance_one_is_the_earliest_estimated_finish(specs):
    c = cands(*[(q, p, 0) for q, p in specs])
    k = KvLoad(balance=1.0, cost=COST, slack_s=0.0).choose(REQ, c)
    finish = [x.queued_s - COST.saved_s(REQ.num_tokens, x.prefix) for x in c]
    assert finish[k] == pytest.approx(min(finish), abs=1e-9)


@given(st.lists(st.tuples(st.floats(0, 10), st.integers(0, 16)), min_size=1, max_size=8))
def test_kv_load_with_no_prefix_anywhere_is_least_loaded(specs):
    c = cands(*[(q, {}, lp) for q, lp in specs])
    assert KvLoad(cost=COST).choose(REQ, c) == LeastLoaded().choose(REQ, c)


def test_hook_callable_and_subclass():
    calls = []

    def last(req, candidates):
        calls.append((req, len(candidates)))
        return len(candidates) - 1

    p = make_policy(last)
    assert p.name == "last" and p.needs_prefix
    assert p.choose(REQ, cands((0, {}, 0), (0, {}, 0), (0, {}, 0))) == 2
    assert calls == [(REQ, 3)]

    class Busiest(RoutingPolicy):
        name = "busiest"

        def choose(self, request, candidates):
            return max(range(len(candidates)), key=lambda i: candidates[i].queued_s)

    b = Busiest()
    assert make_policy(b) is b
    assert b.choose(REQ, cands((0.1, {}, 0), (0.9, {}, 0))) == 1


def test_register_policy_by_name():
    register_policy("always_first", lambda: lambda req, c: 0)
    try:
        p = make_policy("always_first")
        assert p.name == "always_first"
        assert p.choose(REQ, cands((5, {}, 0), (0, {}, 0))) == 0
    finally:
        del POLICIES["always_first"]


def test_make_policy_builtins_and_kwargs():
    assert isinstance(make_policy("least_loaded"), LeastLoaded)
    p = make_policy("kv_load", balance=0.25, slack_s=0.1)
    assert isinstance(p, KvLoad) and p.balance == 0.25 and p.slack_s == 0.1
    d = KvLoad()
    assert (d.balance, d.slack_s) == (DEFAULT_BALANCE, DEFAULT_SLACK_S)
    b = bind_policy("kv_load", balance=0.75, slack_s=0.0, cost=COST)
    assert (b.balance, b.slack_s, b.cost) == (0.75, 0.0, COST)


def test_bad_input_names_the_value():
    with pytest.raises(InvalidArgumentError, match="nope"):
        make_policy("nope")
    with pytest.raises(InvalidArgumentError, match="balance"):
        KvLoad(balance=-1)
    for bad in (-0.1, float("inf"), float("nan"), True):
        with pytest.raises(InvalidArgumentError, match="slack_s"):
            KvLoad(slack_s=bad)
    with pytest.raises(InvalidArgumentError, match="42"):
        make_policy(42)
    with pytest.raises(InvalidArgumentError, match="tape"):
        LinearPrefixCost(0.01, {"tape": 0.1})
    with pytest.raises(InvalidArgumentError, match="cost model"):
        KvLoad().choose(REQ, cands((0, {}, 0)))

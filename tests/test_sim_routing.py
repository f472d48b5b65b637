"""The simulator routes through kvtier.routing's objects; the hot-prefix generator's traces."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kvtier.cli import main
from kvtier.errors import InvalidArgumentError
from kvtier.routing import DEFAULT_BALANCE, DEFAULT_SLACK_S, Candidate, KvLoad, LeastLoaded, RoutingPolicy
from kvtier.sim import SimConfig, Simulator
from kvtier.sim.engine import SimPrefixCost
from kvtier.sim.hot_prefix import HotPrefix, capacity_rps, hot_prefix_at_load, hot_prefix_requests
from kvtier.sim.trace import Request

GIB = 1 << 30
CFG = SimConfig(gpu_bytes=1 * GIB, cpu_bytes=4 * GIB, instances=4)


# -- the generator -----------------------------------------------------------------------------
def test_generator_is_deterministic_per_seed():
    a = hot_prefix_requests(300, seed=3)
    assert a == hot_prefix_requests(300, seed=3)
    assert a != hot_prefix_requests(300, seed=4)


def test_most_requests_open_with_a_few_shared_system_prompts():
    g = HotPrefix(system_prompts=4, system_tokens=1024, no_system=0.1)
    reqs = hot_prefix_requests(1000, seed=0, chunk_tokens=256, config=g)
    heads = {}
    for r in reqs:
        heads[r.chunks[:4]] = heads.get(r.chunks[:4], 0) + 1
    top = sorted(heads.values(), reverse=True)[:4]
    assert sum(top) >= 0.8 * len(reqs)  # 4 prefixes carry most requests
    assert top[0] > top[-1]  # Zipf: the first is the most popular


def test_follow_up_turns_extend_the_previous_prompt():
    g = HotPrefix(turns_mean=4.0)
    reqs = hot_prefix_requests(500, seed=1, chunk_tokens=256, config=g)
    by_chunks = {r.chunks for r in reqs}
    extended = 0
    for r in reqs:
        # the previous turn's full chunks (input + answer + turn = output_tokens + turn_tokens more)
        prev_len = (r.input_length - g.output_tokens - g.turn_tokens) // 256
        if prev_len > 0 and any(p[:prev_len] == r.chunks[:prev_len] and len(p) == prev_len for p in by_chunks):
            extended += 1
    assert extended >= 0.5 * len(reqs)  # 1 - 1/turns_mean of arrivals are follow-ups
    assert max(r.input_length for r in reqs) > g.system_tokens + g.first_tokens + g.turn_tokens


@settings(max_examples=20, deadline=None)
@given(st.floats(0.3, 0.9), st.integers(0, 50))
def test_arrival_rate_is_the_asked_fraction_of_capacity(load, seed):
    reqs = hot_prefix_at_load(400, load, CFG, seed=seed)
    assert all(b.arrival_s >= a.arrival_s for a, b in itertools.pairwise(reqs))
    rate = len(reqs) / reqs[-1].arrival_s
    assert rate == pytest.approx(load * capacity_rps(reqs, CFG), rel=0.25)


def test_generator_rejects_bad_input():
    with pytest.raises(InvalidArgumentError, match="system_prompts"):
        HotPrefix(system_prompts=0)
    with pytest.raises(InvalidArgumentError, match="load"):
        hot_prefix_at_load(10, 0.0, CFG)
    with pytest.raises(InvalidArgumentError, match="turns_mean"):
        HotPrefix(turns_mean=0.5)


# -- the simulator uses the policy objects ----------------------------------------------------
def test_sim_hands_candidates_with_prefix_by_tier_to_a_custom_policy():
    seen = []

    class Spy(RoutingPolicy):
        name = "spy"
        needs_prefix = True

        def choose(self, request, candidates):
            seen.append((request.num_tokens, [(c.index, dict(c.prefix)) for c in candidates]))
            return 0

    reqs = [Request(0.0, 1024, 1, (1, 2, 3, 4)), Request(10.0, 1024, 1, (1, 2, 3, 4))]
    res = Simulator(replace(CFG, routing=Spy())).run(reqs)
    assert res.to_dict()["config"]["routing"] == "spy"
    assert len(seen) == 2 and seen[0][0] == 1024
    assert all(p == {} for _, p in seen[0][1])  # nothing cached yet
    assert seen[1][1][0][1] == {"gpu": 4} and all(p == {} for _, p in seen[1][1][1:])


def test_sim_accepts_a_callable_and_checks_its_answer():
    reqs = hot_prefix_requests(50, seed=0)
    picks = []
    res = Simulator(replace(CFG, routing=lambda r, c: picks.append(len(c)) or 3)).run(reqs)
    assert picks == [4] * 50 and res.requests == 50
    with pytest.raises(InvalidArgumentError, match="returned 7"):
        Simulator(replace(CFG, routing=lambda r, c: 7)).run(reqs)


def test_builtin_names_build_policy_objects_and_kv_load_gets_the_cost_model():
    s = Simulator(replace(CFG, routing="kv_load", routing_balance=0.3, routing_slack_s=0.2))
    assert isinstance(s.policy, KvLoad) and (s.policy.balance, s.policy.slack_s) == (0.3, 0.2)
    assert isinstance(s.policy.cost, SimPrefixCost)
    assert isinstance(Simulator(replace(CFG, routing="least_loaded")).policy, LeastLoaded)
    with pytest.raises(InvalidArgumentError, match="bogus"):
        replace(CFG, routing="bogus")
    with pytest.raises(InvalidArgumentError, match="routing_balance"):
        replace(CFG, routing_balance=-1.0)
    with pytest.raises(InvalidArgumentError, match="routing_slack_s"):
        replace(CFG, routing_slack_s=-0.01)


def test_sim_prefix_cost_prices_gpu_over_cpu_over_disk():
    cfg = replace(CFG, disk_bytes=4 * GIB)
    c = SimPrefixCost(cfg.hardware, cfg.model, cfg.chunk_tokens, cfg.chunk_bytes)
    gpu, cpu, disk = (c.saved_s(4096, {t: 8}) for t in ("gpu", "cpu", "disk"))
    assert gpu > cpu > disk
    assert c.saved_s(4096, {}) == 0.0


def test_kv_load_sends_follow_ups_to_the_prefix_when_idle():
    # one session's turns, far apart: kv_load keeps them on the instance that holds the prefix
    reqs = hot_prefix_requests(200, seed=2, config=HotPrefix(rate_per_s=0.01))
    kv = Simulator(replace(CFG, routing="kv_load")).run(reqs)
    ll = Simulator(replace(CFG, routing="least_loaded")).run(reqs)
    assert kv.hit_ratio() > ll.hit_ratio()


def test_candidates_queue_is_work_ahead():
    s = Simulator(replace(CFG, routing="least_loaded"))
    s.instances[2].free_at = 5.0
    c = s.candidates(Request(3.0, 256, 1, (1,)), 3.0)
    assert [x.queued_s for x in c] == [0.0, 0.0, 2.0, 0.0]
    assert all(isinstance(x, Candidate) and x.prefix == {} for x in c)  # least_loaded needs none


# -- the command line --------------------------------------------------------------------------
def test_cli_hot_prefix_trace_defaults_to_kv_load(tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["sim", "--trace", "hot_prefix:200", "--instances", "4", "--no-ablation", "--load", "0.5"]
    assert main([*argv, "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    conf = doc["runs"]["all tiers"]["config"]
    assert conf["routing"] == "kv_load"
    assert (conf["routing_balance"], conf["routing_slack_s"]) == (DEFAULT_BALANCE, DEFAULT_SLACK_S)
    assert doc["load"] == 0.5 and doc["seed"] == 0
    assert doc["summary"]["requests"] == 200
    assert main(["sim", "--trace", "hot_prefix:0", "--no-ablation"]) == 2
    assert "hot_prefix:N" in capsys.readouterr().err
    assert main(["sim", "--trace", "hot_prefix:10", "--no-ablation", "--load", "-1"]) == 2
    assert main(["sim", "--trace", "hot_prefix:10", "--no-ablation", "--balance", "-1"]) == 2
    assert main(["sim", "--trace", "hot_prefix:10", "--no-ablation", "--queue-slack", "-1"]) == 2
    assert main([*argv, "--balance", "1", "--queue-slack", "0", "--json", str(out)]) == 0
    conf = json.loads(out.read_text())["runs"]["all tiers"]["config"]
    assert (conf["routing_balance"], conf["routing_slack_s"]) == (1.0, 0.0)

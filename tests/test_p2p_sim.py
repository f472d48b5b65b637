"""The membership and directory logic at (small) scale, over the in-process simulator."""

from __future__ import annotations

from kvtier.p2p.sim import run_scale


def test_sim_converges_and_lookups_stay_constant():
    small, large = run_scale(20, seed=1, steady_rounds=10), run_scale(60, seed=1, steady_rounds=10)
    for r in (small, large):
        assert r["join_known_by_all_rounds"] is not None and r["join_known_by_all_rounds"] <= 10
        assert r["death_known_by_all_rounds"] is not None
        assert r["death_known_by_all_rounds"] <= 3 * r["suspicion_timeout_periods"] + 10
        assert r["new_chunk_in_all_digests_rounds"] is not None
        for case in r["lookups"].values():
            assert case["found_rate"] == 1.0
    # A lookup asks a bounded number of peers, whatever the cluster size.
    for name in small["lookups"]:
        assert large["lookups"][name]["messages_per_request"] <= 2 * (4 + 4)
        assert large["lookups"][name]["messages_per_request"] <= small["lookups"][name]["messages_per_request"] + 1.0

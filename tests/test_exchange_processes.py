"""The exchange across real processes on loopback: exact means, and peers that are
killed (SIGKILL) or stalled (SIGSTOP) at precise points of a round."""

from __future__ import annotations

import time

import pytest

from starling.exchange.harness import Cluster

RUN = "run-processes"
NUMEL = 600_000  # 2.4 MB of fp32: several 1 MiB chunks per shard with 2-3 owners


def cluster(reachable: int, client_only: list[str], tls: bool = True) -> Cluster:
    """`reachable` healthy owners, then one client-only peer per fault name."""
    configs = [{"run_id": RUN, "seed": i, "tls": tls} for i in range(reachable)]
    for j, fault in enumerate(client_only):
        configs.append(
            {"run_id": RUN, "seed": 100 + j, "tls": tls, "reachable": False, "fault": fault}
        )
    return Cluster(configs)


@pytest.mark.parametrize(("owners", "client_only"), [(2, 0), (2, 1), (5, 1)])
def test_fp32_mean_is_exact_across_processes(owners: int, client_only: int) -> None:
    with cluster(owners, ["none"] * client_only) as peers:
        count = owners + client_only
        spec = peers.spec(0, "fp32", NUMEL, deadline_s=60)
        tokens = [100 * (i + 1) for i in range(count)]
        results = peers.run_round(spec, tokens)
        expected = {node_id: tokens[i] for i, node_id in enumerate(peers.node_ids)}
        for result in results:
            assert result is not None
            assert result["missing_shards"] == []
            assert result["contributors"] == expected
            assert result["max_abs_err"] <= 1e-6
            # Nobody waited for the deadline: everyone delivered.
            assert result["finished_at"] < spec.deadline - 30


FAULTS = {
    # fault -> whether the faulty peer's contribution is in the mean
    "die-before-push": False,
    "die-mid-push": False,
    "stall-mid-push": False,
    "die-after-push": True,
    "forge-signature": False,
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_failing_contributor_is_excluded_and_the_round_completes(fault: str) -> None:
    deadline_s = 8.0
    with cluster(3, [fault]) as peers:
        faulty = 3
        spec = peers.spec(0, "fp32", NUMEL, deadline_s=deadline_s)
        tokens = [100, 200, 300, 400]
        # A stalled peer never answers: wait for it no longer than the healthy ones may take.
        results = peers.run_round(spec, tokens, timeout=deadline_s + 8.0)
        healthy = {peers.node_ids[i]: tokens[i] for i in range(3)}
        expected = dict(healthy)
        if FAULTS[fault]:
            expected[peers.node_ids[faulty]] = tokens[faulty]
        for index in range(3):
            result = results[index]
            assert result is not None, peers.stderr_tail(index)
            assert result["missing_shards"] == []
            assert result["contributors"] == dict(sorted(expected.items()))
            assert result["max_abs_err"] <= 1e-6  # the mean of exactly the listed ones
            # Within the deadline (plus the all-gather after the commit at the deadline).
            assert result["finished_at"] <= spec.deadline + 5.0
            for shard in result["shards"]:
                # Each shard either averaged the faulty peer's slice or says why not.
                listed = peers.node_ids[faulty] in shard["contributors"]
                assert listed != (peers.node_ids[faulty] in shard["excluded"])
        if fault == "forge-signature":
            result = results[faulty]
            assert result is not None
            assert all("UNAUTHENTICATED" in s["push_error"] for s in result["shards"])
            assert result["missing_shards"] == []  # it still receives the mean
        elif fault == "stall-mid-push":
            assert results[faulty] is None
            peers.kill(faulty)
        else:
            assert results[faulty] is None  # really dead
            assert peers.processes[faulty].wait(timeout=10) == -9


def test_a_dead_owner_is_reported_and_the_other_shards_complete() -> None:
    with cluster(3, []) as peers:
        dead = 2
        spec = peers.spec(0, "fp32", NUMEL, deadline_s=5.0)
        spec = type(spec)(**{**spec.__dict__, "gather_timeout_s": 3.0})
        peers.kill(dead)
        started = time.time()
        results = peers.run_round(spec, [100, 200, 300])
        dead_id = peers.node_ids[dead]
        dead_shard = [o.node_id for o in spec.owners].index(dead_id)
        for index in range(2):
            result = results[index]
            assert result is not None
            assert result["missing_shards"] == [dead_shard]
            assert result["failed_owners"] == [dead_id]
            committed = [s for s in result["shards"] if s["committed"]]
            assert len(committed) == 2
            survivors = {peers.node_ids[i] for i in range(2)}
            for shard in committed:
                assert set(shard["contributors"]) == survivors
                assert shard["excluded"] == {dead_id: "no contribution before the deadline"}
            assert result["finished_at"] <= spec.deadline + spec.gather_timeout_s + 3.0
        assert time.time() - started < 30

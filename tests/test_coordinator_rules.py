"""The round rules (coordinator/rounds.py) on their own, and the coordinator over TLS
with its health service and reflection."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from starling.coordination import CoordinatorClient, JoinUrl
from starling.coordinator import rounds
from starling.identity import CertificatePinError

from .coordinator_support import CoordinatorThread, Node, copy_run, make_template


def plan(owners: list[str], participants: list[str], **extra) -> dict:
    peer = {"address": "", "cert_fingerprint": "", "public_key": "00"}
    return {
        "codec": "fp32",
        "bounds": list(range(0, 4096 * (len(owners) + 1), 4096)),
        "owners": [{"node_id": o, **peer} for o in owners],
        "participants": [{"node_id": p, **peer} for p in participants],
        "tokens": {p: 10 for p in participants},
        "deadline": 0.0,
        "gather_timeout_s": 1.0,
        "reassigned": {},
        "skipped": {},
        **extra,
    }


def held(*pairs: tuple[str, int]) -> list[dict]:
    return [{"node_id": n, "tokens": t, "payload_hash": "ab"} for n, t in pairs]


def test_a_contributor_is_in_every_shard_or_in_none() -> None:
    p = plan(["a", "b"], ["a", "b", "c"])
    reports = {
        0: ("a", held(("a", 10), ("b", 10), ("c", 10))),
        1: ("b", held(("a", 10), ("b", 10))),
    }
    record = rounds.commit_record(3, p, reports, opened=100.0, now=112.5, wire_bytes=999)
    assert record["contributors"] == {"a": 10, "b": 10}
    assert record["excluded"] == {"c": "shard 1: missing"}
    assert record["tokens"] == 20 and record["bytes"] == 999 and record["duration_s"] == 12.5
    assert [s["status"] for s in record["shards"]] == ["committed", "committed"]


def test_skipped_and_reassigned_shards_are_recorded() -> None:
    p = plan(
        ["a", "coord"],
        ["a", "b"],
        reassigned={"1": "owner b did not report: reassigned"},
    )
    reports = {0: ("a", held(("a", 10), ("b", 10))), 1: ("coord", held(("a", 10)))}
    record = rounds.commit_record(0, p, reports, 0.0, 1.0, 0)
    assert record["contributors"] == {"a": 10}
    assert record["shards"][1]["status"] == "reassigned"
    assert "owner b" in record["shards"][1]["detail"]
    skipped = plan(["a", "b"], ["a", "b"], skipped={"1": "owner b did not report: skipped"})
    record = rounds.commit_record(0, skipped, {0: ("a", held(("a", 10), ("b", 10)))}, 0, 1, 0)
    assert record["contributors"] == {"a": 10, "b": 10}  # a skipped shard excludes nobody
    assert record["shards"][1]["status"] == "skipped" and record["shards"][1]["held"] == []
    everything = plan(["a"], ["a"], skipped={"0": "gone"})
    record = rounds.commit_record(0, everything, {}, 0, 1, 0)
    assert record["contributors"] == {} and record["excluded"] == {"a": "every shard was skipped"}


def test_a_withdrawal_or_departure_counts_only_where_the_plan_lists_it() -> None:
    # c withdrew (Coordinator.Withdraw): both owners leave it out, a fault, not a loss.
    why = "withdrew: training diverged (NaN or Inf in the weights)"
    p = plan(["a", "b"], ["a", "b", "c"], withdrawn={"c": why})
    reports = {0: ("a", held(("a", 10), ("b", 10))), 1: ("b", held(("a", 10), ("b", 10)))}
    exclusions = {0: {"c": why}, 1: {"c": why}}
    record = rounds.commit_record(0, p, reports, 0, 1, 0, exclusions=exclusions)
    assert record["contributors"] == {"a": 10, "b": 10}
    assert record["excluded"] == {"c": f"shard 0: {why}"}
    assert record["lost"] == {} and rounds.offenders(record) == {}
    # An owner that drops an honest contribution as "withdrew" when the plan does not
    # say so lost it, and it counts against that owner as any lost contribution does.
    p = plan(["a", "b"], ["a", "b", "c"])
    reports = {
        0: ("a", held(("a", 10), ("b", 10), ("c", 10))),
        1: ("b", held(("a", 10), ("b", 10))),
    }
    for made_up in (why, "left the run"):
        record = rounds.commit_record(0, p, reports, 0, 1, 0, exclusions={1: {"c": made_up}})
        assert record["contributors"] == {"a": 10, "b": 10}
        assert record["excluded"] == {"c": "shard 1: missing"}
        assert record["lost"] == {"c": ["b"]}
    # A departure the plan lists (c's lease expired during the exchange) is a fault.
    p = plan(["a", "b"], ["a", "b", "c"], gone=["c"])
    record = rounds.commit_record(0, p, reports, 0, 1, 0, exclusions={1: {"c": "left the run"}})
    assert record["excluded"] == {"c": "shard 1: left the run"} and record["lost"] == {}


def test_an_owner_barred_for_a_false_report_is_out_of_the_round_everywhere() -> None:
    why = "its report as a shard owner was false: reported b as an offender, but ..."
    p = plan(["coord", "b"], ["a", "b", "liar"], barred={"liar": why})
    reports = {
        0: ("coord", held(("a", 10), ("b", 10), ("liar", 10))),
        1: ("b", held(("a", 10), ("b", 10), ("liar", 10))),
    }
    record = rounds.commit_record(0, p, reports, 0, 1, 0)
    assert record["contributors"] == {"a": 10, "b": 10}
    assert record["excluded"] == {"liar": why}
    assert rounds.offenders(record) == {}  # a lie is not a poisoned contribution


def test_a_contributor_weighted_differently_in_two_shards_is_excluded() -> None:
    p = plan(["a", "b"], ["a", "b"])
    reports = {0: ("a", held(("a", 10), ("b", 10))), 1: ("b", held(("a", 10), ("b", 99)))}
    record = rounds.commit_record(0, p, reports, 0, 1, 0)
    assert record["contributors"] == {"a": 10}
    assert "different token counts" in record["excluded"]["b"]


def test_a_contributor_declaring_more_tokens_than_it_reported_is_rejected() -> None:
    p = plan(["a", "b"], ["a", "b", "c"])  # the coordinator counted 10 tokens for each
    inflated = held(("a", 10), ("b", 9), ("c", 10_000))
    record = rounds.commit_record(0, p, {0: ("a", inflated), 1: ("b", inflated)}, 0, 1, 0)
    assert record["contributors"] == {"a": 10, "b": 9}  # under the count: its own loss
    assert record["excluded"]["c"] == (
        "whole update: rejected: declares 10,000 tokens; the coordinator counted 10 in this round"
    )
    assert rounds.offenders(record) == {"c": record["excluded"]["c"]}  # an offence


def test_each_shards_verifier_is_another_reachable_owner_and_only_when_there_are_two() -> None:
    from starling.coordinator.store import Node

    def node(node_id: str, reachable: bool = True) -> Node:
        address = "127.0.0.1:1" if reachable else ""
        return Node(
            node_id, b"\0", address, "", reachable, "cpu", 0, 0.0, 0.0, "", 0.0, 0.0, 0.0,
            "active", "training", 0, False, 0, 0,
        )  # fmt: skip

    coordinator = {"node_id": "coord", "address": "", "cert_fingerprint": "", "public_key": ""}
    tokens = {"a": 1, "b": 1, "c": 1}
    nodes = [node("a"), node("b"), node("c", reachable=False)]
    made = rounds.exchange_plan(1 << 16, "int4", nodes, tokens, coordinator, 2, 0.0, 1.0, True)
    owners = [o["node_id"] for o in made["owners"]]
    verifiers = [v["node_id"] for v in made["verifiers"]]
    assert owners == ["a", "b", "a", "b"] and verifiers == ["b", "a", "b", "a"]
    alone = rounds.exchange_plan(1 << 16, "int4", nodes[:1], tokens, coordinator, 2, 0.0, 1.0, True)
    assert alone["verifiers"] == [None, None]  # one owner: nobody to check it
    off = rounds.exchange_plan(1 << 16, "int4", nodes, tokens, coordinator, 2, 0.0, 1.0, False)
    assert off["verifiers"] == [None] * 4


def test_a_verified_shard_keeps_only_contributions_its_owner_and_verifier_agree_on() -> None:
    peer = {"address": "", "cert_fingerprint": "", "public_key": "00"}
    p = plan(["a", "b"], ["a", "b", "c", "d"], verifiers=[{"node_id": "b", **peer}, None])
    owner = held(("a", 10), ("b", 10), ("c", 10), ("d", 10))
    verifier = held(("a", 10), ("b", 10), ("c", 10))
    verifier[2]["payload_hash"] = "cd"  # c sent the verifier another contribution
    reports = {0: ("a", owner), 1: ("b", held(("a", 10), ("b", 10), ("c", 10), ("d", 10)))}
    record = rounds.commit_record(
        0, p, reports, 0, 1, 0, {}, {0: ("b", verifier)}, {0: {"d": "incomplete at the deadline"}}
    )
    assert record["contributors"] == {"a": 10, "b": 10}
    assert record["excluded"] == {
        "c": "shard 0: its owner and verifier hold different contributions",
        "d": "shard 0 (verifier): incomplete at the deadline",
    }
    first, second = record["shards"]
    assert (first["verifier"], second["verifier"]) == ("b", "")
    assert first["mean_hash"] == first["mean_status"] == ""  # settled after the commit


def test_a_reducer_that_alone_keeps_losing_contributions_is_demoted() -> None:
    """Censorship by omission: an owner (or verifier) claims a contribution never
    arrived. No signature proves it false, so nobody is punished, but a reducer that
    alone loses contributions that reached two or more other nodes' shards, in 3 of the
    last 50 rounds and from 2 or more contributors, owns no shard while that stands."""
    peer = {"address": "", "cert_fingerprint": "", "public_key": "00"}
    everyone = ["a", "b", "c", "d"]  # shard s: owned by everyone[s], verified by the next
    verifiers = [{"node_id": v, **peer} for v in ("b", "c", "d", "a")]

    def commit(round_: int, by_owner: dict[int, str] | None = None, **by_verifier: str) -> dict:
        """A round of 4 shards in which the owner of shard s lost `by_owner[s]` (not
        there by the deadline) and the verifier of shard `int(k[1:])` lost
        `by_verifier[k]` (missing)."""
        by_owner = by_owner or {}
        lost_at_verifier = {int(k[1:]): v for k, v in by_verifier.items()}

        def holding(gone: str | None) -> list[dict]:
            return held(*[(n, 10) for n in everyone if n != gone])

        reports = {s: (o, holding(by_owner.get(s))) for s, o in enumerate(everyone)}
        verifier_reports = {
            s: (verifiers[s]["node_id"], holding(lost_at_verifier.get(s))) for s in range(4)
        }
        exclusions = {s: {v: "no contribution before the deadline"} for s, v in by_owner.items()}
        p = plan(everyone, everyone, verifiers=verifiers)
        return rounds.commit_record(round_, p, reports, 0, 1, 0, exclusions, verifier_reports, {})

    record = commit(5, {3: "b"})
    assert record["excluded"] == {"b": "shard 3: no contribution before the deadline"}
    assert record["lost"] == {"b": ["d"]}
    assert rounds.lost_contributions(record) == [("d", "b")]
    assert rounds.lost_contributions(commit(6, s3="c")) == [("a", "c")]  # a verifies shard 3
    # d owns shard 3 and verifies shard 2: a censor drops its victim in both roles.
    both_roles = commit(7, {3: "b"}, s2="b")
    assert both_roles["lost"] == {"b": ["d"]}
    assert rounds.lost_contributions(both_roles) == [("d", "b")]
    assert rounds.lost_contributions(commit(8)) == []
    # Lost by two reducers (d and b): it did not reach everyone, and blames neither.
    assert rounds.lost_contributions(commit(9, {3: "c", 1: "c"})) == []

    def judged(*records: dict) -> dict[str, str]:
        return rounds.unreliable_reducers(
            {r["round"]: rounds.lost_contributions(r) for r in records}
        )

    # d loses b, then c, then b: 3 rounds, 2 victims.
    history = [commit(1, {3: "b"}), commit(2), commit(3, {3: "c"}), commit(4, s2="b")]
    demoted = judged(*history)
    assert list(demoted) == ["d"] and "2 nodes" in demoted["d"] and "rounds 1, 3, 4" in demoted["d"]
    # Two such rounds, or one victim only (a slow contributor, or a censor aimed at one
    # node): not enough.
    assert judged(*history[:3]) == {}
    assert judged(*[commit(r, {3: "b"}) for r in range(5)]) == {}

    # A reducer that withheld its evidence of a disputed contribution which the other
    # reducer showed lost it alone too (the coordinator's verdict names it); an
    # undecided dispute with nobody named counts against nobody.
    def disputed(round_: int, victim: str, withheld: str | None) -> dict:
        record = commit(round_)
        outcome = {"shard": 3, "contributor": victim, "verdict": "undecided: ..."}
        record["disputes"] = [outcome | ({"withheld": withheld} if withheld else {})]
        return record

    assert rounds.lost_contributions(disputed(1, "b", "d")) == [("d", "b")]
    assert rounds.lost_contributions(disputed(1, "b", None)) == []
    withholding = [disputed(1, "b", "d"), disputed(2, "c", "d"), commit(3, {3: "a"})]
    assert list(judged(*withholding)) == ["d"]
    assert judged(*withholding[:2]) == {}

    # A demoted node contributes but owns and verifies no shard.
    from starling.coordinator.store import Node

    def node(node_id: str) -> Node:
        return Node(
            node_id, b"\0", "127.0.0.1:1", "", True, "cpu", 0, 0.0, 0.0, "", 0.0, 0.0, 0.0,
            "active", "training", 0, False, 0, 0,
        )  # fmt: skip

    coordinator = {"node_id": "coord", "address": "", "cert_fingerprint": "", "public_key": ""}
    nodes = [node(n) for n in everyone]
    made = rounds.exchange_plan(
        1 << 16, "int4", nodes, dict.fromkeys(everyone, 1), coordinator, 1, 0.0, 1.0, True, demoted
    )
    assert [o["node_id"] for o in made["owners"]] == ["a", "b", "c"]
    assert [v["node_id"] for v in made["verifiers"]] == ["b", "c", "a"]
    assert [p["node_id"] for p in made["participants"]] == everyone
    assert made["demoted"] == demoted


def test_a_mean_is_verified_by_equal_hashes_disputed_by_different_ones() -> None:
    settle = rounds.settled_mean
    assert settle("a", "b", {"a": "11", "b": "11"}, overdue=False) == ("11", "verified")
    assert settle("a", "b", {"a": "11", "b": "22"}, overdue=False) == ("", "disputed")
    assert settle("a", "b", {"a": "11"}, overdue=False) is None  # b may still report
    assert settle("a", "b", {"a": "11"}, overdue=True) == (
        "11",
        "unverified: verifier b did not report its mean",
    )
    assert settle("a", "b", {"b": "22"}, overdue=True)[0] == "22"
    assert settle("a", "b", {}, overdue=True) == ("", "void: neither owner reported its mean")


def test_rounds_close_on_the_budget_or_when_everyone_is_done() -> None:
    assert rounds.should_close(100, {"a": (60, False), "b": (40, False)}, {"a", "b"})
    assert not rounds.should_close(100, {"a": (60, True)}, {"a", "b"})
    assert rounds.should_close(0, {"a": (5, True), "b": (7, True)}, {"a", "b"})
    assert not rounds.should_close(0, {"a": (5, True)}, {"a", "b"})  # b is still training
    assert not rounds.should_close(0, {}, set())


def test_tokens_of_a_node_rejected_in_the_last_commit_do_not_close_the_round() -> None:
    tokens = {"honest": (60, False), "poisoner": (50, False)}
    assert rounds.should_close(100, tokens, {"honest", "poisoner"})
    assert not rounds.should_close(100, tokens, {"honest", "poisoner"}, {"poisoner"})
    assert rounds.counted_tokens(tokens, {"poisoner"}) == 60
    more = {**tokens, "honest": (100, False)}
    assert rounds.should_close(100, more, {"honest", "poisoner"}, {"poisoner"})
    # Nobody else trained: the probation's tokens count, or the round waits for its deadline.
    alone = {"poisoner": (120, False), "idle": (0, False)}
    assert rounds.counted_tokens(alone, {"poisoner"}) == 120
    assert rounds.should_close(100, alone, {"poisoner", "idle"}, {"poisoner"})
    # Fixed inner steps: everyone's `done` counts as before.
    assert rounds.should_close(0, {"a": (5, True), "b": (7, True)}, {"a", "b"}, {"b"})


def test_fingerprints_need_a_strict_majority_of_the_contributors() -> None:
    assert rounds.agreed_fingerprint({"a": "x"}, ["a", "b", "c"]) is None
    assert rounds.agreed_fingerprint({"a": "x", "b": "x"}, ["a", "b", "c"]) == "x"
    assert rounds.agreed_fingerprint({"a": "x", "b": "y"}, ["a", "b"]) is None
    assert rounds.agreed_fingerprint({"z": "x", "a": "y"}, ["a"]) == "y"  # z: not a contributor


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_template(tmp_path_factory.mktemp("tls"))


def test_tls_pinned_by_the_join_url_health_and_reflection(template: Path, tmp_path: Path) -> None:
    coordinator = CoordinatorThread(copy_run(template, tmp_path / "run"), tls=True)
    try:
        url = coordinator.url
        assert url.fingerprint == coordinator.coordinator.run.certificate.fingerprint
        assert str(url).startswith("starling://127.0.0.1:") and "?fp=sha256:" in str(url)
        node = Node(url)
        try:
            assert node.join().node_id == node.node_id
            assert [p.node_id for p in coordinator.status().peers] == [node.node_id]
        finally:
            node.close()
        wrong = JoinUrl(url.host, url.port, "sha256:" + "0" * 64)
        with pytest.raises(CertificatePinError):
            CoordinatorClient(wrong)
        with CoordinatorClient(url) as client:
            stub = health_pb2_grpc.HealthStub(client.channel)
            check = stub.Check(health_pb2.HealthCheckRequest(service="starling.v1.Coordinator"))
            assert check.status == health_pb2.HealthCheckResponse.SERVING
            reflect = reflection_pb2_grpc.ServerReflectionStub(client.channel)
            answers = reflect.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
            names = {s.name for a in answers for s in a.list_services_response.service}
            assert "starling.v1.Coordinator" in names
            # A plaintext client cannot talk to a TLS coordinator.
            plain = grpc.insecure_channel(url.address)
            with pytest.raises(grpc.RpcError):
                health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=3)
            plain.close()
    finally:
        coordinator.stop()


def test_the_owners_gram_matrices_add_up_over_shards_and_must_match_the_verifiers() -> None:
    import numpy as np

    peer = {"address": "", "cert_fingerprint": "", "public_key": "00"}
    p = plan(["a", "b"], ["a", "b", "c"], verifiers=[{"node_id": "b", **peer}, None])
    reports = {
        0: ("a", held(("a", 10), ("b", 10), ("c", 10))),
        1: ("b", held(("a", 10), ("b", 10))),  # c missed shard 1: judged without it
    }
    first = [4.0, 1.0, 2.0, 1.0, 9.0, 3.0, 2.0, 3.0, 16.0]
    second = [1.0, 0.5, 0.5, 4.0]
    verifier = {0: ("b", held(("a", 10), ("b", 10), ("c", 10)))}
    ids, total = rounds.summed_gram(p, reports, {0: first, 1: second}, verifier, {0: first})
    assert ids == ["a", "b"]
    assert np.array_equal(total, np.array([[5.0, 1.5], [1.5, 13.0]]))
    lying = list(first)
    lying[1] = lying[3] = -1.0  # the verifier says a and b point apart
    assert "different Gram matrices" in rounds.summed_gram(
        p, reports, {0: first, 1: second}, verifier, {0: lying}
    )
    assert rounds.summed_gram(p, reports, {0: first}, verifier, {0: first}) == (
        "shard 1 has no Gram matrix"
    )

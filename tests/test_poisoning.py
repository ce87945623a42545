"""A poisoned node among honest ones, all real processes on loopback: the shard owners
exclude its contributions in the same round, the commit says why, honest nodes are
never excluded, and the coordinator bans it after repeated offences."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .coordinator_support import wait_for
from .test_node_e2e import assert_agree, e2e  # noqa: F401  (the fixture)

POISONED_NODE = Path(__file__).resolve().parents[1] / "bench" / "poisoned_node.py"
HONEST = ("a", "b", "c")


def node_id(run, name: str) -> str:
    return json.loads((run.root / name / "summary.json").read_text())["node_id"]


def run_until_banned(e2e, kind: str, marker: str) -> tuple[Any, set[str], str]:  # noqa: F811
    """Three honest nodes (3 rounds each) and "liar", a node poisoned by `kind`: waits
    until the coordinator has banned the liar (its exit status 3) and the honest nodes
    are done, and checks the liar's log shows `marker` (it did lie). Returns the run,
    the honest node ids and the liar's."""
    run = e2e(min_nodes=4)
    for name in HONEST:
        run.join(name, "--max-rounds", "3")
    run.join("liar", launcher=(str(POISONED_NODE), kind))
    assert run.nodes["liar"].wait(300) == 3, run.log("liar")  # refused once banned
    assert "this node is banned" in run.log("liar")
    for name in HONEST:
        assert run.nodes[name].wait(300) == 0, run.log(name)
    assert marker in run.log("liar"), run.log("liar")
    return run, {node_id(run, n) for n in HONEST}, node_id(run, "liar")


def test_a_sign_flipping_node_is_excluded_every_round_then_banned(e2e) -> None:  # noqa: F811
    run = e2e(
        min_nodes=4, extra_toml="\n[defences]\nscreen_direction = true\nban_after_offences = 3\n"
    )
    for name in HONEST:
        run.join(name, "--max-rounds", "5")
    run.join("mallory", launcher=(str(POISONED_NODE), "sign_flip"))
    assert run.nodes["mallory"].wait(300) == 3  # refused once banned
    assert "refused by the coordinator: this node is banned" in run.log("mallory")
    assert "Traceback" not in run.log("mallory")
    for name in HONEST:
        assert run.nodes[name].wait(300) == 0, run.log(name)
    honest = {node_id(run, n) for n in HONEST}
    mallory = node_id(run, "mallory")
    commits = run.commits()
    poisoned_rounds = [r for r, c in commits.items() if mallory in c["excluded"]]
    assert len(poisoned_rounds) == 3, commits  # three offences, then banned
    for round_, commit in commits.items():
        assert set(commit["contributors"]) == honest, (round_, commit)  # never an honest one out
        if round_ in poisoned_rounds:
            reason = commit["excluded"][mallory]
            assert "rejected: direction disagrees" in reason, reason
            # The commit keeps every whole-update cosine (the evidence across rounds).
            cosines = commit["direction"]
            assert set(cosines) == honest | {mallory}, cosines
            assert cosines[mallory] < 0 < min(cosines[n] for n in honest), cosines
    wait_for(lambda: run.status() is not None, 10, "status")
    import sqlite3

    db = sqlite3.connect(f"file:{run.run_dir / 'coordinator.db'}?mode=ro", uri=True)
    state, reason, offences = db.execute(
        "SELECT state, state_reason, offences FROM nodes WHERE node_id = ?", (mallory,)
    ).fetchone()
    db.close()
    assert (state, offences) == ("banned", 3) and reason.startswith("rejected in 3 rounds")
    assert_agree(run.fingerprints("a"), run.fingerprints("b"))
    assert_agree(run.fingerprints("a"), run.fingerprints("c"))
    # Started again with its identity, it is refused at the join itself, before it
    # fetched anything: the same message and exit code, no traceback.
    assert run.join("mallory").wait(120) == 3, run.log("mallory")
    assert "refused by the coordinator: this node is banned" in run.log("mallory")
    assert "Traceback" not in run.log("mallory")


def test_a_rejected_node_does_not_close_the_next_round_with_its_tokens(e2e) -> None:  # noqa: F811
    # Rounds close at a token budget (640 steps of 512 tokens); mallory is never banned.
    # In a round after a commit that rejected it, its tokens do not count toward the
    # budget (rounds.counted_tokens), so the honest nodes' reported tokens reach it on
    # their own; in the others a quarter or so of the budget is mallory's.
    budget = 640 * 512
    run = e2e(
        min_nodes=4,
        round_tokens=budget,
        extra_toml="\n[defences]\nscreen_direction = true\nban_after_offences = 0\n",
    )
    for name in HONEST:
        run.join(name, "--max-rounds", "8")
    run.join("mallory", launcher=(str(POISONED_NODE), "sign_flip"))
    for name in HONEST:
        assert run.nodes[name].wait(300) == 0, run.log(name)
    honest = {node_id(run, n) for n in HONEST}
    commits = run.commits()  # mallory still runs: its id is the one not honest
    everyone = {n for c in commits.values() for n in (*c["contributors"], *c["excluded"])}
    (mallory,) = everyone - honest
    rejected = {r for r, c in commits.items() if "rejected" in c["excluded"].get(mallory, "")}
    on_probation = sorted(r + 1 for r in rejected if r + 1 in commits)
    assert on_probation, commits
    reported = run.reported_tokens()
    for round_ in on_probation:
        # What closed the round is the tokens reported to the coordinator, not those of
        # the contributions that reached the mean: on a loaded machine an honest node's
        # contribution can miss the exchange deadline after its tokens counted.
        counted = {n: t for n, t in reported[round_].items() if n != mallory}
        assert sum(counted.values()) >= budget, (round_, reported[round_], commits[round_])
    assert "Traceback" not in run.log("mallory")


def test_a_node_that_declares_more_tokens_than_it_reported_is_rejected_then_banned(
    e2e,  # noqa: F811
) -> None:
    # Its update is honest; only its headers' weight (1,000× its count) lies.
    run, honest, liar = run_until_banned(e2e, "inflate", "declared")
    commits = run.commits()
    rejected = 0
    for round_, commit in commits.items():
        assert set(commit["contributors"]) == honest, (round_, commit)
        if liar in commit["excluded"]:
            reason = commit["excluded"][liar]
            assert "rejected: declares" in reason and "the coordinator counted" in reason, reason
            rejected += 1
        assert commit["tokens"] == sum(commit["contributors"].values())
    assert rejected == 3, commits  # three offences, then banned


def test_an_owner_that_frames_an_honest_contributor_is_banned_and_the_contributor_kept(
    e2e,  # noqa: F811
) -> None:
    """A lying owner reports an honest contributor of its shard as a norm outlier. The
    coordinator audits the report against the signed contributions behind it, finds the
    claim false, bans the owner and reassigns its shard; the framed node stays in."""
    run, honest, liar = run_until_banned(e2e, "frame", "FRAMED")
    commits = run.commits()
    for round_, commit in commits.items():
        assert set(commit["contributors"]) == honest, (round_, commit)  # the framed kept
        assert not set(commit["excluded"]) & honest, (round_, commit)
    first = commits[min(commits)]
    assert "its report as a shard owner was false" in first["excluded"][liar]
    voided = [s for s in first["shards"] if "as an offender, but" in s["detail"]]
    assert voided and all(s["status"] == "reassigned" for s in voided), first["shards"]
    assert "its contribution passes every check" in voided[0]["detail"]
    import sqlite3

    db = sqlite3.connect(f"file:{run.run_dir / 'coordinator.db'}?mode=ro", uri=True)
    rows = dict(db.execute("SELECT node_id, state FROM nodes").fetchall())
    offences = dict(db.execute("SELECT node_id, offences FROM nodes").fetchall())
    db.close()
    assert rows[liar] == "banned"
    assert all(offences[n] == 0 for n in honest), offences  # nobody framed was counted
    assert_agree(run.fingerprints("a"), run.fingerprints("b"))
    assert_agree(run.fingerprints("a"), run.fingerprints("c"))


def test_an_owner_that_serves_a_wrong_mean_is_outvoted_by_the_recomputation_and_banned(
    e2e,  # noqa: F811
) -> None:
    """A lying owner commits, signs and serves the negated mean of every shard it owns or
    verifies. Each such shard's other owner reports another hash; the coordinator
    recomputes the mean from the signed contributions, records the right hash and bans
    the liar; honest nodes take the mean from the honest owner and stay in agreement."""
    run, honest, liar = run_until_banned(e2e, "wrong_mean", "WRONG MEAN")
    commits = run.commits()
    first = commits[min(commits)]
    lied = [s for s in first["shards"] if liar in (s["owner"], s["verifier"])]
    assert lied, first["shards"]
    for shard in lied:  # the liar's hash lost; the right one is recorded
        assert shard["mean_status"] == f"recomputed: {liar} served a wrong mean", shard
        assert len(shard["mean_hash"]) == 64, shard
    for shard in first["shards"]:
        if shard not in lied:
            assert shard["mean_status"] == "verified", shard
    for round_, commit in commits.items():
        assert honest <= set(commit["contributors"]), (round_, commit)
        assert not set(commit["excluded"]) & honest, (round_, commit)
        if round_ > min(commits):
            assert liar not in commit["contributors"], (round_, commit)  # banned
    owned = [s for s in lied if s["owner"] == liar]
    for name in HONEST:  # each took the liar's own shards from their verifiers
        taken = [line for line in run.log(name).splitlines() if "mean taken from" in line]
        assert len(taken) >= len(owned), run.log(name)
    import sqlite3

    db = sqlite3.connect(f"file:{run.run_dir / 'coordinator.db'}?mode=ro", uri=True)
    state, reason = db.execute(
        "SELECT state, state_reason FROM nodes WHERE node_id = ?", (liar,)
    ).fetchone()
    db.close()
    assert state == "banned" and "served a wrong mean" in reason, reason
    assert_agree(run.fingerprints("a"), run.fingerprints("b"))
    assert_agree(run.fingerprints("a"), run.fingerprints("c"))


def run_until_demoted(e2e, kind: str, marker: str) -> dict[str, Any]:  # noqa: F811
    """Three honest nodes and "reducer", a node poisoned by `kind` that keeps one honest
    contribution (another each round) out of the round on its word alone, for 7
    rounds each. Checks that the coordinator demotes it within 6 rounds, after 3 or
    more rounds with a victim, that from then on every participant's contribution
    counts (its own included) and it reduces no shard, and that it is neither banned
    nor counted an offence. Returns the commits, plans, node ids and the first round
    it was demoted."""
    run = e2e(min_nodes=4)
    for name in HONEST:
        run.join(name, "--max-rounds", "7")
    run.join("reducer", "--max-rounds", "7", launcher=(str(POISONED_NODE), kind))
    for name in (*HONEST, "reducer"):
        assert run.nodes[name].wait(300) == 0, run.log(name)
    assert marker in run.log("reducer"), run.log("reducer")
    honest = {node_id(run, n) for n in HONEST}
    reducer = node_id(run, "reducer")
    import sqlite3

    db = sqlite3.connect(f"file:{run.run_dir / 'coordinator.db'}?mode=ro", uri=True)
    plans = {r: json.loads(p) for r, p in db.execute("SELECT round, plan FROM rounds") if p}
    state, offences = db.execute(
        "SELECT state, offences FROM nodes WHERE node_id = ?", (reducer,)
    ).fetchone()
    db.close()
    commits = run.commits()
    demoted = sorted(r for r, p in plans.items() if reducer in p.get("demoted", {}))
    assert demoted and demoted[0] <= 5, plans
    assert "lost the contributions of" in plans[demoted[0]]["demoted"][reducer]
    victimised = [r for r in commits if r < demoted[0] and set(commits[r]["excluded"]) & honest]
    assert len(victimised) >= 3, commits  # what it took to be demoted
    for round_, commit in commits.items():
        if round_ >= demoted[0]:  # from demotion on: nobody out, it reduces nothing
            participants = {p["node_id"] for p in plans[round_]["participants"]}
            assert set(commit["contributors"]) == participants, (round_, commit)
            assert honest <= participants, plans[round_]
            reducers = [s["owner"] for s in commit["shards"]] + [
                s["verifier"] for s in commit["shards"]
            ]
            assert reducer not in reducers, (round_, commit["shards"])
    after = [r for r in commits if r >= demoted[0] and reducer in commits[r]["contributors"]]
    assert after, commits  # its own contributions count after its demotion
    assert state != "banned" and offences == 0  # not punished: it may only be faulty
    assert_agree(run.fingerprints("a"), run.fingerprints("b"))
    assert_agree(run.fingerprints("a"), run.fingerprints("c"))
    return {
        "commits": commits,
        "honest": honest,
        "reducer": reducer,
        "victimised": victimised,
    }


def test_a_reducer_that_censors_contributors_is_demoted_and_they_are_kept_again(
    e2e,  # noqa: F811
) -> None:
    """A censoring reducer acknowledges one honest contributor's push on each shard it
    owns or verifies (another one each round) and reports it as never arrived. Nothing
    signed proves that false, so nobody is banned; but after 3 such rounds, with 2
    victims that reached the other reducers, the coordinator plans no shard for it, and
    from then on every honest contribution counts again, the censor's own included."""
    seen = run_until_demoted(e2e, "omit", "OMITTED")
    for round_ in seen["victimised"]:
        excluded = seen["commits"][round_]["excluded"]
        for victim in set(excluded) & seen["honest"]:
            reason = excluded[victim]
            assert "missing" in reason or "no contribution before the deadline" in reason


def test_a_reducer_that_misreports_and_withholds_its_evidence_is_demoted(
    e2e,  # noqa: F811
) -> None:
    """A lying reducer misreports one honest contribution's hash (another each round)
    and then refuses to serve its evidence, so that no verdict can convict it: each
    dispute is undecided, the other reducer showed what it reported, and the verdict
    names the silent one as having withheld it. That counts as a contribution lost by it
    alone: after 3 such rounds it reduces no shard, and nobody is framed again."""
    seen = run_until_demoted(e2e, "withhold", "WITHHELD")
    reducer = seen["reducer"]
    for round_ in seen["victimised"]:
        commit = seen["commits"][round_]
        (victim,) = set(commit["disputed"])
        assert victim in seen["honest"], commit
        assert "owner and verifier hold different contributions" in commit["excluded"][victim]
        assert commit["disputes"], commit
        for outcome in commit["disputes"]:
            assert outcome["withheld"] == reducer, outcome
            assert f"undecided: {reducer} did not serve its evidence" in outcome["verdict"]
            assert "showed the contribution it reported" in outcome["verdict"]


def test_a_reducer_that_misreports_a_contribution_is_caught_by_its_evidence_and_banned(
    e2e,  # noqa: F811
) -> None:
    """A lying reducer reports one honest contributor's contribution (another each
    round) with another payload hash on every shard it owns or verifies: the owner and
    verifier disagree, so the contributor is out of that round. After the commit the
    coordinator asks both for the signed contribution each reported; the liar cannot
    show one with the hash it claimed, and is banned; the contributor is not."""
    run, honest, liar = run_until_banned(e2e, "misreport", "MISREPORTED")
    commits = run.commits()
    first = commits[min(commits)]
    victims = set(first["disputed"])
    assert len(victims) == 1 and victims <= honest, first
    (victim,) = victims
    assert "its owner and verifier hold different contributions" in first["excluded"][victim]
    verdicts = first["disputes"]
    assert len(verdicts) == len(first["disputed"][victim]) >= 1, first
    for verdict in verdicts:
        assert verdict["contributor"] == victim
        assert verdict["verdict"].startswith(f"{liar} reported a contribution of {victim}")
    for round_, commit in commits.items():
        if round_ > min(commits):  # banned: out of the run, no honest node out
            assert liar not in commit["contributors"], (round_, commit)
            assert not set(commit["excluded"]) & honest, (round_, commit)
    import sqlite3

    db = sqlite3.connect(f"file:{run.run_dir / 'coordinator.db'}?mode=ro", uri=True)
    states = dict(db.execute("SELECT node_id, state FROM nodes"))
    reason = db.execute("SELECT state_reason FROM nodes WHERE node_id = ?", (liar,)).fetchone()[0]
    db.close()
    assert states[liar] == "banned" and "that it cannot show" in reason, reason
    assert all(states[n] != "banned" for n in honest), states
    assert_agree(run.fingerprints("a"), run.fingerprints("b"))
    assert_agree(run.fingerprints("a"), run.fingerprints("c"))

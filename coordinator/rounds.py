"""Round decisions as pure functions of the stored state: when a round closes, who
owns which shard, which shards are reassigned or skipped, and what a commit lists.

Kept apart from the gRPC service so the rules read on their own and can be tested
without a network."""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Collection
from typing import Any

import numpy as np

from starling.exchange.owner import DEPARTED, REJECTED, WITHDREW
from starling.exchange.plan import ShardPlan
from starling.train import TrainConfig, lr_following_ends

from .store import Node

# A reducer (a shard's owner or verifier) that alone lost contributions which other
# reducers received, in LOST_ROUNDS of the last RELIABILITY_WINDOW rounds and from at
# least LOST_VICTIMS different contributors, reduces no shard while that stays true
# (see `unreliable_reducers`).
RELIABILITY_WINDOW = 50
LOST_ROUNDS = 3
LOST_VICTIMS = 2
# What a reducer reports for a contribution that did not reach it (as opposed to one it
# rejected, or one from a participant that left).
LOSSES = ("missing", "no contribution before the deadline")


def peer_info(node: Node) -> dict[str, Any]:
    return {
        "node_id": node.node_id,
        "address": node.address if node.reachable else "",
        "cert_fingerprint": node.cert_fingerprint,
        "public_key": node.public_key.hex(),
    }


def should_close(
    budget: int,
    tokens: dict[str, tuple[int, bool]],
    active_since_open: set[str],
    on_probation: Collection[str] = (),
) -> bool:
    """With a token budget: once the reported tokens reach it, not counting those of
    nodes `on_probation` (rejected as poisoned in the last commit) unless nobody else
    reported any. With fixed inner steps (budget 0): once every node that was active
    when the round opened reported done (nodes that joined later start with the next
    round)."""
    if budget > 0:
        return counted_tokens(tokens, on_probation) >= budget
    done = {n for n, (t, d) in tokens.items() if d and t > 0}
    return bool(done) and active_since_open <= done


def budget_round_ends(base: int, schedule: TrainConfig, power: float) -> list[int]:
    """Where each round ends, in steps of the nodes' inner schedule, when budget rounds
    follow the inner lr (`[round] sync_power`): as many rounds as budgets of `base` tokens
    fill the schedule, split by starling.train.lr_following_ends, the rule `starling
    simulate --sync-power` splits its steps by. A run so sends about as many bytes as
    with `base`. One pass over the schedule's steps: taken once, at start."""
    # Rounds close on whole steps, so a budget of `base` tokens spans ⌈base / batch⌉ of
    # them (as `starling simulate --round-tokens` counts a round's steps).
    steps_per_round = -(-base // schedule.batch_tokens)
    rounds = min(schedule.steps, -(-schedule.steps // steps_per_round))
    return lr_following_ends(schedule, rounds, power)


def lr_following_budget(base: int, run_tokens: int, batch_tokens: int, ends: list[int]) -> int:
    """A round's token budget from the run's progress: up to the next round's end in
    `ends` (budget_round_ends). A round that closed past its end (nodes report whole
    steps, and the last report crosses the budget) shortens the next one, so the ends,
    not the overshoots, set the rounds; past the schedule's last step, `base`."""
    step = run_tokens // batch_tokens
    following = bisect.bisect_right(ends, step)
    return (ends[following] - step) * batch_tokens if following < len(ends) else base


def counted_tokens(tokens: dict[str, tuple[int, bool]], on_probation: Collection[str]) -> int:
    """The tokens that count toward a round's budget. The budget is what a round's
    update is made of: a node whose last update was rejected would, if its tokens
    counted, close rounds on tokens that are likely to be cut again, and every honest
    node would train a smaller share of each round (2 of 8 sign-flipping nodes, never
    banned: 6/8 of the budget in each commit). Its contribution is still judged, and
    counts again once a commit keeps it. Where only nodes on probation reported, all
    count, so that the round does not wait for its deadline."""
    trusted = [t for n, (t, _) in tokens.items() if n not in on_probation and t > 0]
    return sum(trusted) if trusted else sum(t for t, _ in tokens.values())


def exchange_plan(
    numel: int,
    codec: str,
    contributors: list[Node],
    tokens: dict[str, int],
    coordinator: dict[str, Any],
    shards_per_owner: int,
    deadline: float,
    gather_timeout_s: float,
    verify: bool = False,
    demoted: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Shards over the flat θ, owned in turn by the reachable contributors (sorted by
    node id) that are not `demoted` (node id → why); the coordinator owns everything
    when none is left. With `verify` and at least two owners, shard s's verifier (its
    second owner) is the owner after its own in that list."""
    demoted = demoted or {}
    owners = [
        peer_info(n) for n in contributors if n.reachable and n.address and n.node_id not in demoted
    ]
    if not owners:
        owners = [coordinator]
    plan = ShardPlan.even(numel, len(owners) * shards_per_owner)
    verifying = verify and len(owners) >= 2
    return {
        "codec": codec,
        "bounds": list(plan.bounds),
        "owners": [owners[s % len(owners)] for s in range(plan.num_shards)],
        "verifiers": [
            owners[(s + 1) % len(owners)] if verifying else None for s in range(plan.num_shards)
        ],
        "unverified": {},  # shard -> why its verifier was dropped
        "participants": [peer_info(n) for n in contributors],
        "tokens": {n.node_id: tokens[n.node_id] for n in contributors},
        "deadline": deadline,
        "gather_timeout_s": gather_timeout_s,
        "reassigned": {},  # shard -> why
        "skipped": {},  # shard -> why
        "demoted": {n.node_id: demoted[n.node_id] for n in contributors if n.node_id in demoted},
    }


def commit_record(
    round_: int,
    plan: dict[str, Any],
    reports: dict[int, tuple[str, list[dict[str, Any]]]],
    opened: float,
    now: float,
    wire_bytes: int,
    exclusions: dict[int, dict[str, str]] | None = None,
    verifier_reports: dict[int, tuple[str, list[dict[str, Any]]]] | None = None,
    verifier_exclusions: dict[int, dict[str, str]] | None = None,
    judged: dict[str, str] | None = None,
    direction: dict[str, float] | None = None,
) -> dict[str, Any]:
    """All-or-nothing per contributor: the mean includes exactly the participants whose
    slice reached every shard that committed, with the same token weight everywhere,
    and, in a shard with a verifier, the same contribution (tokens and payload hash) at
    its owner and at its verifier (so that the two compute the same mean).
    `exclusions`: shard → node id → why its owner (`verifier_exclusions`: its verifier)
    left that participant out. `judged`: node id → why the coordinator's whole-update
    direction check rejected it (an offence); `direction`: node id → its whole-update
    cosine (kept for the evidence across rounds)."""
    exclusions = exclusions or {}
    verifier_reports = verifier_reports or {}
    verifier_exclusions = verifier_exclusions or {}
    participants = [p["node_id"] for p in plan["participants"]]
    # Owners whose report an audit found false are out of the round (see the service).
    excluded: dict[str, str] = dict(plan.get("barred", {}))
    for node_id, why in (judged or {}).items():
        excluded.setdefault(node_id, f"whole update: {REJECTED}: {why}")
    include = set(participants) - set(excluded)
    weights: dict[str, Counter[int]] = {n: Counter() for n in participants}
    lost: dict[str, set[str]] = {}  # participant → the reducers it did not reach
    disputed: dict[str, list[int]] = {}  # participant → shards whose reducers disagree on it
    shards = []
    for shard in range(len(plan["bounds"]) - 1):
        key = str(shard)
        owner = plan["owners"][shard]["node_id"]
        if key in plan["skipped"]:
            held: list[dict[str, Any]] = []
            status, detail = "skipped", plan["skipped"][key]
        else:
            _, held = reports[shard]
            status = "reassigned" if key in plan["reassigned"] else "committed"
            detail = plan["reassigned"].get(key, "")
            holders = {h["node_id"] for h in held}
            for node_id in sorted(set(participants) - holders):
                why = _claimed(plan, node_id, exclusions.get(shard, {}).get(node_id, "missing"))
                if why in LOSSES:
                    lost.setdefault(node_id, set()).add(owner)
                if node_id in include:
                    excluded.setdefault(node_id, f"shard {shard}: {why}")
            include &= holders
            if verifier(plan, shard):
                include &= _agreed(
                    plan,
                    shard,
                    held,
                    verifier_reports,
                    verifier_exclusions,
                    excluded,
                    disputed,
                    lost,
                )
            for h in held:
                if h["node_id"] in weights:
                    weights[h["node_id"]][int(h["tokens"])] += 1
        shards.append(
            {
                "shard": shard,
                "owner": owner,
                "status": status,
                "detail": detail,
                "held": held,
                "verifier": "" if status == "skipped" else _node_id(verifier(plan, shard)),
                "mean_hash": "",  # hex, once settled (see the service's _settle_means)
                "mean_status": "",
            }
        )
    counted = plan.get("tokens", {})
    for node_id in sorted(include):
        if len(weights[node_id]) > 1:  # a contributor must weigh the same in every shard
            include.discard(node_id)
            excluded[node_id] = "different token counts in different shards"
        elif weights[node_id] and next(iter(weights[node_id])) > counted.get(node_id, math.inf):
            # Its signed headers weigh it by more tokens than it reported training: an
            # honest-looking update at 1,000× its weight would steer the mean as a 1,000×
            # scaled one would, unseen by the norm check. Honest nodes declare the count.
            include.discard(node_id)
            excluded[node_id] = (
                f"whole update: {REJECTED}: declares {next(iter(weights[node_id])):,} tokens; "
                f"the coordinator counted {counted[node_id]:,} in this round"
            )
    contributors = {n: next(iter(weights[n])) if weights[n] else 0 for n in sorted(include)}
    if all(s["status"] == "skipped" for s in shards):
        contributors = {}
        excluded = {n: "every shard was skipped" for n in participants}
    return {
        "round": round_,
        "contributors": contributors,
        "tokens": sum(contributors.values()),
        "bytes": wire_bytes,
        "duration_s": now - opened,
        "fingerprint": "",
        "shards": shards,
        "excluded": {n: excluded[n] for n in sorted(excluded) if n not in contributors},
        "lost": {n: sorted(lost[n]) for n in sorted(lost)},
        # Resolved after the commit from both reducers' evidence (the service's
        # _resolve_dispute): the verdicts are appended to "disputes".
        "disputed": disputed,
        "disputes": [],
        "committed": now,
        "direction": {n: round(c, 6) for n, c in sorted((direction or {}).items())},
    }


def verifier(plan: dict[str, Any], shard: int) -> dict[str, Any] | None:
    """The peer that reduces shard `shard` beside its owner, or None (no verifier was
    planned, or it was dropped and the shard commits on its owner's word)."""
    verifiers = plan.get("verifiers") or []
    return verifiers[shard] if shard < len(verifiers) else None


def _node_id(peer: dict[str, Any] | None) -> str:
    return peer["node_id"] if peer else ""


def _claimed(plan: dict[str, Any], node_id: str, why: str) -> str:
    """A reducer's reason for leaving a participant out, where a departure or a
    withdrawal that the plan does not list counts as what it is, a contribution the
    reducer lost (a censor must not hide its losses behind a fault it makes up)."""
    if why == DEPARTED and node_id not in plan.get("gone", []):
        return "missing"
    if why.startswith(WITHDREW) and node_id not in plan.get("withdrawn", {}):
        return "missing"
    return why


def _agreed(
    plan: dict[str, Any],
    shard: int,
    held: list[dict[str, Any]],
    verifier_reports: dict[int, tuple[str, list[dict[str, Any]]]],
    verifier_exclusions: dict[int, dict[str, str]],
    excluded: dict[str, str],
    disputed: dict[str, list[int]],
    lost: dict[str, set[str]],
) -> set[str]:
    """The owner's holders that the verifier holds with the same tokens and payload
    hash; the others are recorded in `excluded` with the reason (and in `disputed`
    where the two hold different contributions of one sender, in `lost` where the
    verifier says it never got one)."""
    second, verifier_held = verifier_reports[shard]
    theirs = {h["node_id"]: (int(h["tokens"]), h["payload_hash"]) for h in verifier_held}
    agreed = set()
    for h in held:
        node_id = h["node_id"]
        if node_id not in theirs:
            why = _claimed(
                plan, node_id, verifier_exclusions.get(shard, {}).get(node_id, "missing")
            )
            if why in LOSSES:
                lost.setdefault(node_id, set()).add(second)
            excluded.setdefault(node_id, f"shard {shard} (verifier): {why}")
        elif theirs[node_id] != (int(h["tokens"]), h["payload_hash"]):
            disputed.setdefault(node_id, []).append(shard)
            excluded.setdefault(
                node_id, f"shard {shard}: its owner and verifier hold different contributions"
            )
        else:
            agreed.add(node_id)
    return agreed


def summed_gram(
    plan: dict[str, Any],
    reports: dict[int, tuple[str, list[dict[str, Any]]]],
    grams: dict[int, list[float]],
    verifier_reports: dict[int, tuple[str, list[dict[str, Any]]]],
    verifier_grams: dict[int, list[float]],
) -> tuple[list[str], np.ndarray] | str:
    """The Gram matrix of the whole pseudo-gradients of the contributors held in every
    shard that was not skipped (node ids in order, n × n float64): the sum of the
    owners' per-shard matrices. Where a shard's verifier reported too, its matrix must
    agree with the owner's (else a lying owner could steer the judgement). A reason
    string instead when direction cannot be judged this round."""
    shards = [s for s in range(len(plan["bounds"]) - 1) if str(s) not in plan["skipped"]]
    if not shards:
        return "no shard committed"
    matrices = {}
    for shard in shards:
        ids = [h["node_id"] for h in reports[shard][1]]
        matrix = _matrix(grams.get(shard, []), len(ids))
        if matrix is None:
            return f"shard {shard} has no Gram matrix"
        matrices[shard] = (ids, matrix)
        if verifier(plan, shard) and shard in verifier_reports:
            theirs = [h["node_id"] for h in verifier_reports[shard][1]]
            other = _matrix(verifier_grams.get(shard, []), len(theirs))
            if other is None or not _agree(ids, matrix, theirs, other):
                return f"the owner and the verifier of shard {shard} report different Gram matrices"
    common = set.intersection(*(set(ids) for ids, _ in matrices.values()))
    order = sorted(common)
    total = np.zeros((len(order), len(order)))
    for ids, matrix in matrices.values():
        index = [ids.index(n) for n in order]
        total += matrix[np.ix_(index, index)]
    return order, total


def _matrix(flat: list[float], n: int) -> np.ndarray | None:
    if len(flat) != n * n or not all(math.isfinite(x) for x in flat):
        return None
    return np.asarray(flat, dtype=np.float64).reshape(n, n)


def _agree(ids: list[str], matrix: np.ndarray, theirs: list[str], other: np.ndarray) -> bool:
    """The two matrices' entries of the contributors both hold, equal within 1e-6
    relative (both reducers take the same float64 dot products of the same values)."""
    both = sorted(set(ids) & set(theirs))
    a = matrix[np.ix_([ids.index(n) for n in both], [ids.index(n) for n in both])]
    b = other[np.ix_([theirs.index(n) for n in both], [theirs.index(n) for n in both])]
    return bool(np.all(np.abs(a - b) <= 1e-6 * (np.abs(a) + np.abs(b)) + 1e-30))


def settled_mean(
    owner: str, verifier: str, hashes: dict[str, str], overdue: bool
) -> tuple[str, str] | None:
    """(mean hash, status) of a verified shard from the mean hashes its two owners
    reported (node id → hex): "verified" when they agree; once `overdue`, one owner's
    word ("unverified") or nothing ("void"). ("", "disputed") when they disagree: the
    coordinator recomputes. None: wait for the reports."""
    mine, theirs = hashes.get(owner), hashes.get(verifier)
    if mine is not None and theirs is not None:
        return (mine, "verified") if mine == theirs else ("", "disputed")
    if not overdue:
        return None
    if mine is not None:
        return mine, f"unverified: verifier {verifier} did not report its mean"
    if theirs is not None:
        return theirs, f"unverified: owner {owner} did not report its mean"
    return "", "void: neither owner reported its mean"


def lost_contributions(record: dict[str, Any]) -> list[tuple[str, str]]:
    """(reducer, contributor) for each contribution that one reducer alone did not get
    (`missing`, or not there by the deadline, at every shard it owns or verifies) while
    at least two other nodes' shards held it. A contributor too slow for the deadline
    misses several reducers; one that reached everyone else points at the reducer (or
    at the link between them, which makes it as poor a reducer). Also each disputed
    contribution whose evidence one reducer withheld while the other showed it: the
    contributor was out of the round on that reducer's word alone."""
    out = [(d["withheld"], d["contributor"]) for d in record.get("disputes", []) if "withheld" in d]
    for contributor, reducers in record.get("lost", {}).items():
        if len(reducers) != 1 or reducers[0] == contributor:
            continue
        reached = {
            s["owner"]
            for s in record["shards"]
            if s["owner"] not in (reducers[0], contributor)
            and any(h["node_id"] == contributor for h in s["held"])
        }
        if len(reached) >= 2:
            out.append((reducers[0], contributor))
    return out


def unreliable_reducers(lost: dict[int, list[tuple[str, str]]]) -> dict[str, str]:
    """From `lost` (round → its `lost_contributions`, over the window): the reducers
    that alone lost contributions other reducers received in at least LOST_ROUNDS
    rounds and from at least LOST_VICTIMS contributors, with why: node id → reason. An
    owner that claims an honest contributor's push never arrived (censorship: no
    signature proves it false) is one; so is an honest owner whose downlink cannot keep
    up. Neither reduces while its record stands; neither is punished, since the one
    cannot be told from the other. A censor that aims at one contributor only is not
    caught."""
    rounds_by: dict[str, set[int]] = {}
    victims_by: dict[str, set[str]] = {}
    for round_, pairs in lost.items():
        for reducer, contributor in pairs:
            rounds_by.setdefault(reducer, set()).add(round_)
            victims_by.setdefault(reducer, set()).add(contributor)
    return {
        reducer: (
            f"lost the contributions of {len(victims_by[reducer])} nodes that other reducers "
            f"received, in rounds {', '.join(map(str, sorted(held)))}"
        )
        for reducer, held in sorted(rounds_by.items())
        if len(held) >= LOST_ROUNDS and len(victims_by[reducer]) >= LOST_VICTIMS
    }


def offenders(record: dict[str, Any]) -> dict[str, str]:
    """The nodes a commit excluded for a poisoned contribution (not for a fault such
    as a missed deadline), and why."""
    return {
        node_id: reason
        for node_id, reason in record["excluded"].items()
        if reason.split(": ", 1)[-1].startswith(REJECTED)
    }


def agreed_fingerprint(reports: dict[str, str], contributors: list[str]) -> str | None:
    """The fingerprint a strict majority of the contributors reported, if any."""
    counts = Counter(reports[n] for n in contributors if n in reports)
    if not counts:
        return None
    fingerprint, votes = counts.most_common(1)[0]
    return fingerprint if votes * 2 > len(contributors) else None

"""A node's side of one round's exchange, as the coordinator runs it: contribute to every
shard, report the shards this node owns, apply the coordinator's all-or-nothing
decision, push again to the owner that replaced a dead one, and gather the means.

    state = client.get_round(r)                         # phase "exchange": has a plan
    outcome = exchange_round(client, peer, state, payloads, tokens)
    outcome.mean, outcome.commit                         # the mean and its commit record
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import grpc
import torch

from starling.coordination import RETRY_MAX_DELAY_S, CoordinatorClient
from starling.exchange import (
    ExchangeError,
    ExchangePeer,
    PeerEndpoint,
    RoundResult,
    RoundSpec,
    ShardPlan,
)
from starling.exchange.owner import DEPARTED
from starling.v1 import coordinator_pb2 as pb
from starling.v1 import peer_pb2

REPORT_GRACE_S = 5.0  # the coordinator waits this long past the deadline for reports
# How long a node waits for the coordinator to settle the hash of each verified shard's
# mean after the commit: its grace for the owners' reports (30 s) plus a recomputation.
MEAN_WAIT_S = 90.0
POLL_S = 10.0  # one long poll of the round's state
SERVED_WAIT_S = 30.0  # how long an owner's exchange report waits for the others' fetches
T = TypeVar("T")

log = logging.getLogger("starling.node")


@dataclass
class ExchangeOutcome:
    mean: torch.Tensor  # (numel,) fp32 mean of Δ over exactly the commit's contributors
    commit: pb.Commit  # the coordinator's record: whose contributions are in it
    skipped: list[int]  # shards that did not commit: their slice of θ does not move
    missing: list[int]  # committed shards whose mean this node could not fetch
    results: list[RoundResult]  # the exchange as this node saw it (bytes, timings)
    bytes_sent: int
    bytes_received: int


def spec_from_state(run_id: str, state: pb.RoundState) -> RoundSpec:
    plan = state.plan

    def endpoint(peer: pb.PeerInfo) -> PeerEndpoint:
        return PeerEndpoint(
            peer.node_id, peer.address, peer.cert_fingerprint or None, peer.public_key
        )

    return RoundSpec(
        run_id=run_id,
        round=state.round,
        codec=plan.codec,
        plan=ShardPlan(tuple(plan.bounds)),
        owners=tuple(endpoint(o) for o in plan.owners),
        participants={p.node_id: p.public_key for p in plan.participants},
        deadline=plan.deadline_unix,
        gather_timeout_s=plan.gather_timeout_s,
        decision="external",
        verifiers=tuple(endpoint(v) if v.node_id else None for v in plan.verifiers),
    )


def exchange_round(
    client: CoordinatorClient,
    peer: ExchangePeer,
    state: pb.RoundState,
    payloads: list[bytes] | None,
    tokens: int,
) -> ExchangeOutcome:
    """Runs this node's part of round `state.round` until the commit is known and every
    committed shard's mean is here (or could not be fetched: see `missing`). No
    payloads: this node withdrew from the round (Coordinator.Withdraw); it still
    reduces its shards and gathers the mean."""
    spec = spec_from_state(client.run_id, state)
    owners = [o.node_id for o in spec.owners]
    reporter = _ShardReporter(client, peer)
    # Open before the exclusions below (an exclusion reaches only open shards).
    peer.open_round(spec)
    not_waited: set[str] = set()
    _stop_waiting(peer, state, not_waited)
    with ThreadPoolExecutor(4) as pool:
        runs: list[tuple[list[int], Future[RoundResult]]] = [
            (list(range(len(owners))), pool.submit(peer.all_reduce, spec, payloads, tokens))
        ]
        reporter.report(spec, pool)
        while state.phase != "committed":
            state = _poll(client, spec, state.version)
            if state.phase not in ("exchange", "committed"):
                raise RuntimeError(f"round {spec.round} is in phase {state.phase!r}")
            _stop_waiting(peer, state, not_waited)
            new_spec = spec_from_state(client.run_id, state)
            moved = [s for s, o in enumerate(new_spec.owners) if o.node_id != owners[s]]
            if moved:  # dead owners' shards, reassigned: push those slices again
                peer.supersede(spec.round, moved, [owners[s] for s in moved])
                spec = new_spec
                owners = [o.node_id for o in spec.owners]
                runs.append((moved, pool.submit(peer.all_reduce, spec, payloads, tokens, moved)))
                reporter.report(spec, pool)
        commit = state.commit
        mine = spec.reduced_by(peer.identity.node_id)
        if mine:
            peer.decide(spec.round, {c.node_id for c in commit.contributors}, mine)
            for entry in commit.shards:
                verified = entry.verifier and entry.status != "skipped" and commit.contributors
                if entry.shard in mine and verified:
                    pool.submit(_report_mean, client, peer, spec, entry.shard)
        results = [(shards, run.result()) for shards, run in runs]
    skipped = sorted(s.shard for s in commit.shards if s.status == "skipped")
    mean = torch.zeros(spec.plan.numel)
    fetched: dict[int, bytes] = {}  # shard → the hash of the mean fetched
    for shards, result in reversed(results):  # the latest owner of a shard wins
        for outcome in result.shards:
            if outcome.committed and outcome.shard in shards and outcome.shard not in fetched:
                start, end = spec.plan.range(outcome.shard)
                mean[start:end] = result.mean[start:end]
                fetched[outcome.shard] = outcome.mean_hash
                if outcome.served_by:
                    log.warning(
                        "round %d: shard %d's mean taken from %s (its owner %s unreachable)",
                        spec.round, outcome.shard, outcome.served_by[:12], outcome.owner[:12],
                    )  # fmt: skip
    if commit.contributors and any(e.verifier for e in commit.shards):
        state, skipped = check_means(client, peer, spec, state, mean, fetched, skipped)
        commit = state.commit
    missing = sorted(set(range(spec.plan.num_shards)) - set(fetched) - set(skipped))
    if not commit.contributors:  # nothing moved (every participant withdrew): no mean
        missing = []
    traffic = peer.traffic(spec.round)
    sent = sum(t.sent for t in traffic.values())
    received = sum(t.received for t in traffic.values())
    failed = sorted({o for _, r in results for o in r.failed_owners})
    for _, result in results:
        for outcome in result.shards:
            if outcome.push_error is not None:
                log.warning(
                    "round %d: our contribution to shard %d (owner %s) failed: %s",
                    spec.round,
                    outcome.shard,
                    outcome.owner[:12],
                    outcome.push_error,
                )
    exchange_s = sum(r.wall_s for _, r in results)
    # The report waits (in the background) until the others fetched the means this node
    # owns, so the bytes it served them are counted too.
    others = set(spec.participants) - {client.identity.node_id if client.identity else ""}
    threading.Thread(
        target=_report_exchange,
        args=(client, peer, spec.round, others, exchange_s, failed),
        name="exchange-report",
        daemon=True,
    ).start()
    return ExchangeOutcome(mean, commit, skipped, missing, [r for _, r in results], sent, received)


def _stop_waiting(peer: ExchangePeer, state: pb.RoundState, done: set[str]) -> None:
    """Stops this node's shards of the round waiting for the participants the plan lists
    as gone (left, expired) or withdrawn, once each (`done` holds those excluded)."""
    reasons = {node_id: DEPARTED for node_id in state.plan.gone}
    reasons.update((w.node_id, w.reason) for w in state.plan.withdrawn)
    for node_id in sorted(set(reasons) - done):
        peer.exclude(state.round, node_id, reasons[node_id])
        done.add(node_id)


def check_means(
    client: CoordinatorClient,
    peer: ExchangePeer,
    spec: RoundSpec,
    state: pb.RoundState,
    mean: torch.Tensor,
    fetched: dict[int, bytes],
    skipped: list[int],
) -> tuple[pb.RoundState, list[int]]:
    """Checks the mean of each verified shard (`fetched`: shard → the hash of the one in
    `mean`, shape (numel,)) against the hash the coordinator settled for it, once it has
    (RoundState.commit), and fetches it from the shard's other owner where they differ
    or where the first could not serve it. A shard whose mean is void joins `skipped`.
    Updates `mean` and `fetched` in place; returns the settled round state and the
    shards that do not move. A shard whose settled mean nobody serves is left out of
    `fetched` (missing)."""
    until = time.time() + MEAN_WAIT_S

    def unsettled(state: pb.RoundState) -> bool:
        return any(
            e.verifier and e.status != "skipped" and not e.mean_status for e in state.commit.shards
        )

    while unsettled(state) and time.time() < until:
        poll = functools.partial(client.get_round, spec.round, state.version, POLL_S)
        state = _retrying(poll, until)
    skipped = list(skipped)
    for entry in state.commit.shards:
        shard = entry.shard
        if not entry.verifier or entry.status == "skipped" or not entry.mean_status:
            continue  # unverified, or never settled: the mean as fetched stands
        if entry.mean_status.startswith("void"):
            log.warning("round %d: shard %d's mean is %s", spec.round, shard, entry.mean_status)
            fetched.pop(shard, None)
            skipped.append(shard)
            continue
        if fetched.get(shard) == entry.mean_hash:
            continue
        fetched.pop(shard, None)
        for endpoint in (spec.verifier(shard), spec.owners[shard]):
            if endpoint is None:
                continue
            try:
                header, values = peer.fetch_mean(spec, shard, endpoint)
            except ExchangeError as err:
                log.warning(
                    "round %d: shard %d from %s: %s", spec.round, shard, endpoint.node_id[:12], err
                )
                continue
            if header.payload_hash == entry.mean_hash:
                start, end = spec.plan.range(shard)
                mean[start:end] = values
                fetched[shard] = entry.mean_hash
                log.warning(
                    "round %d: shard %d's mean taken from %s (%s)",
                    spec.round, shard, endpoint.node_id[:12], entry.mean_status,
                )  # fmt: skip
                break
    return state, sorted(set(skipped))


def _report_mean(
    client: CoordinatorClient, peer: ExchangePeer, spec: RoundSpec, shard: int
) -> None:
    """Tells the coordinator which mean this node committed for a verified shard."""
    until = spec.deadline + spec.gather_timeout_s
    try:
        header = peer.committed_mean(spec.round, shard, max(1.0, until - time.time()))
        _retrying(lambda: client.report_mean(spec.round, shard, header), until)
    except (grpc.RpcError, TimeoutError) as err:
        log.warning("round %d: could not report shard %d's mean: %s", spec.round, shard, err)


def _report_exchange(
    client: CoordinatorClient,
    peer: ExchangePeer,
    round_: int,
    others: set[str],
    exchange_s: float,
    failed: list[str],
) -> None:
    try:
        peer.wait_served(round_, others, SERVED_WAIT_S)
        traffic = peer.traffic(round_)
        client.report_exchange(
            pb.ReportExchangeRequest(
                round=round_,
                bytes_sent=sum(t.sent for t in traffic.values()),
                bytes_received=sum(t.received for t in traffic.values()),
                exchange_s=exchange_s,
                failed_owners=failed,
            )
        )
    except (grpc.RpcError, RuntimeError, ValueError):
        pass  # accounting only: the round is committed either way (or the node stopped)


# RESOURCE_EXHAUSTED: the coordinator's request budget (an honest node in rounds of well
# under a second, each with its reports as owner and verifier, can reach it): back off.
RETRYABLE = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
)


def _retrying(call: Callable[[], T], until: float) -> T:
    """`call`, again with backoff while the coordinator is unreachable (restarting),
    until the unix time `until`."""
    delay = 0.2
    while True:
        try:
            return call()
        except grpc.RpcError as err:
            if err.code() not in RETRYABLE or time.time() + delay > until:
                raise
        threading.Event().wait(delay)  # a plain pause between attempts
        delay = min(delay * 2, RETRY_MAX_DELAY_S)


def _poll(client: CoordinatorClient, spec: RoundSpec, version: int) -> pb.RoundState:
    until = spec.deadline + spec.gather_timeout_s
    return _retrying(
        lambda: client.get_round(spec.round, known_version=version, wait_s=POLL_S), until
    )


class _ShardReporter:
    """Once the shards this node owns or verifies close, tells the coordinator whom each holds
    (in a worker: the caller goes on waiting for the decision)."""

    def __init__(self, client: CoordinatorClient, peer: ExchangePeer) -> None:
        self.client = client
        self.peer = peer
        self.reported: set[int] = set()
        self.lock = threading.Lock()

    def report(self, spec: RoundSpec, pool: ThreadPoolExecutor) -> None:
        # Open the shards first: all_reduce opens them too, but in another worker, and a
        # report that ran before it found no shard of the round, held nobody and so
        # excluded every participant ("missing": seen in 1 of 150 rounds).
        self.peer.open_round(spec)
        with self.lock:
            node_id = self.peer.identity.node_id
            mine = [s for s in spec.reduced_by(node_id) if s not in self.reported]
            self.reported.update(mine)
        if mine:
            pool.submit(self._report, spec, mine)

    def _report(self, spec: RoundSpec, shards: list[int]) -> None:
        timeout = spec.deadline - time.time() + REPORT_GRACE_S
        held = self.peer.holders(spec.round, max(timeout, 1.0))
        excluded = self.peer.excluded(spec.round)
        grams = self.peer.grams(spec.round)
        for shard in shards:
            contributors = [
                peer_pb2.Contributor(node_id=n, tokens=t, payload_hash=h)
                for n, (t, h) in sorted(held.get(shard, {}).items())
            ]
            exclusions = [
                peer_pb2.Exclusion(node_id=n, reason=r)
                for n, r in sorted(excluded.get(shard, {}).items())
            ]
            until = spec.deadline + spec.gather_timeout_s
            report = functools.partial(
                self.client.report_shard,
                spec.round,
                shard,
                contributors,
                exclusions,
                grams.get(shard),
            )
            try:
                _retrying(report, until)
            except grpc.RpcError:
                pass  # decided without this report (e.g. the shard was reassigned)

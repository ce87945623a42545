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

from starling.coordination import CoordinatorClient
from starling.exchange import ExchangePeer, PeerEndpoint, RoundResult, RoundSpec, ShardPlan
from starling.v1 import coordinator_pb2 as pb
from starling.v1 import peer_pb2

REPORT_GRACE_S = 5.0  # the coordinator waits this long past the deadline for reports
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
    return RoundSpec(
        run_id=run_id,
        round=state.round,
        codec=plan.codec,
        plan=ShardPlan(tuple(plan.bounds)),
        owners=tuple(
            PeerEndpoint(o.node_id, o.address, o.cert_fingerprint or None, o.public_key)
            for o in plan.owners
        ),
        participants={p.node_id: p.public_key for p in plan.participants},
        deadline=plan.deadline_unix,
        gather_timeout_s=plan.gather_timeout_s,
        decision="external",
    )


def exchange_round(
    client: CoordinatorClient,
    peer: ExchangePeer,
    state: pb.RoundState,
    payloads: list[bytes],
    tokens: int,
) -> ExchangeOutcome:
    """Runs this node's part of round `state.round` until the commit is known and every
    committed shard's mean is here (or could not be fetched: see `missing`)."""
    spec = spec_from_state(client.run_id, state)
    owners = [o.node_id for o in spec.owners]
    reporter = _ShardReporter(client, peer)
    with ThreadPoolExecutor(4) as pool:
        runs: list[tuple[list[int], Future[RoundResult]]] = [
            (list(range(len(owners))), pool.submit(peer.all_reduce, spec, payloads, tokens))
        ]
        reporter.report(spec, pool)
        while state.phase != "committed":
            state = _poll(client, spec, state.version)
            if state.phase not in ("exchange", "committed"):
                raise RuntimeError(f"round {spec.round} is in phase {state.phase!r}")
            new_spec = spec_from_state(client.run_id, state)
            moved = [s for s, o in enumerate(new_spec.owners) if o.node_id != owners[s]]
            if moved:  # dead owners' shards, reassigned: push those slices again
                peer.supersede(spec.round, moved, [owners[s] for s in moved])
                spec = new_spec
                owners = [o.node_id for o in spec.owners]
                runs.append((moved, pool.submit(peer.all_reduce, spec, payloads, tokens, moved)))
                reporter.report(spec, pool)
        commit = state.commit
        if spec.shards_of(peer.identity.node_id):
            peer.decide(spec.round, {c.node_id for c in commit.contributors})
        results = [(shards, run.result()) for shards, run in runs]
    skipped = sorted(s.shard for s in commit.shards if s.status == "skipped")
    mean = torch.zeros(spec.plan.numel)
    fetched: set[int] = set()
    for shards, result in reversed(results):  # the latest owner of a shard wins
        for outcome in result.shards:
            if outcome.committed and outcome.shard in shards and outcome.shard not in fetched:
                start, end = spec.plan.range(outcome.shard)
                mean[start:end] = result.mean[start:end]
                fetched.add(outcome.shard)
    missing = sorted(set(range(spec.plan.num_shards)) - fetched - set(skipped))
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


RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


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
        delay = min(delay * 2, 2.0)


def _poll(client: CoordinatorClient, spec: RoundSpec, version: int) -> pb.RoundState:
    until = spec.deadline + spec.gather_timeout_s
    return _retrying(
        lambda: client.get_round(spec.round, known_version=version, wait_s=POLL_S), until
    )


class _ShardReporter:
    """Once this node's shards of a round close, tells the coordinator whom each holds
    (in a worker: the caller goes on waiting for the decision)."""

    def __init__(self, client: CoordinatorClient, peer: ExchangePeer) -> None:
        self.client = client
        self.peer = peer
        self.reported: set[int] = set()
        self.lock = threading.Lock()

    def report(self, spec: RoundSpec, pool: ThreadPoolExecutor) -> None:
        with self.lock:
            mine = [s for s in spec.shards_of(self.peer.identity.node_id) if s not in self.reported]
            self.reported.update(mine)
        if mine:
            pool.submit(self._report, spec, mine)

    def _report(self, spec: RoundSpec, shards: list[int]) -> None:
        timeout = spec.deadline - time.time() + REPORT_GRACE_S
        held = self.peer.holders(spec.round, max(timeout, 1.0))
        excluded = self.peer.excluded(spec.round)
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
                self.client.report_shard, spec.round, shard, contributors, exclusions
            )
            try:
                _retrying(report, until)
            except grpc.RpcError:
                pass  # decided without this report (e.g. the shard was reassigned)

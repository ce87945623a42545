"""The coordinator over real gRPC sockets: membership, leases, the round lifecycle with
the exchange, owner reassignment, fingerprints and checkpoints."""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from starling.checkpoint import state_blob
from starling.codecs import ErrorFeedback, make_codec
from starling.coordinator import rounds
from starling.diloco import GlobalState, OuterConfig
from starling.exchange import encode_shards
from starling.exchange.harness import payload_of
from starling.node.rounds import exchange_round, spec_from_state
from starling.runconfig import RunConfig
from starling.train import lr_multiplier, round_lengths

from .coordinator_support import CoordinatorThread, Node, copy_run, make_template, wait_for


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_template(tmp_path_factory.mktemp("coordinator"))


@pytest.fixture
def serve(template: Path, tmp_path: Path) -> Iterator:
    started: list[CoordinatorThread] = []
    nodes: list[Node] = []

    def start(**sections: dict) -> tuple[CoordinatorThread, Path]:
        run_dir = copy_run(template, tmp_path / f"run{len(started)}", **sections)
        coordinator = CoordinatorThread(run_dir)
        started.append(coordinator)
        return coordinator, run_dir

    def node(coordinator: CoordinatorThread, **kwargs) -> Node:
        n = Node(coordinator.url, **kwargs)
        nodes.append(n)
        return n

    start.node = node  # type: ignore[attr-defined]
    yield start
    for n in nodes:
        n.close()
    for c in started:
        c.stop()


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def test_join_heartbeat_expiry_and_rejoin(serve) -> None:
    coordinator, _ = serve(membership={"heartbeat_s": 0.2, "lease_s": 1.0})
    node = serve.node(coordinator)
    client_only = serve.node(coordinator, reachable=False)
    joined = node.join()
    assert joined.node_id == node.node_id and joined.reachable
    assert joined.run.run_id == node.run_id and joined.run.numel > 0
    refused = client_only.join()
    assert not refused.reachable and "client-only" in refused.reachability_detail
    assert node.client.heartbeat("training").lease_s == 1.0
    peers = {p.node_id: p for p in coordinator.status().peers}
    assert set(peers) == {node.node_id, client_only.node_id}
    assert peers[node.node_id].reachable and not peers[client_only.node_id].reachable
    # Silent past the lease: expired, and refused until it joins again.
    wait_for(
        lambda: node.node_id not in {p.node_id for p in coordinator.status().peers},
        10,
        "the silent node to expire",
    )
    assert code_of(lambda: node.client.heartbeat()) == grpc.StatusCode.PERMISSION_DENIED
    node.join()
    assert node.client.heartbeat().lease_s == 1.0
    assert node.client.leave("done").tokens_trained == 0
    assert code_of(lambda: node.client.heartbeat()) == grpc.StatusCode.PERMISSION_DENIED


def test_data_leases_are_exclusive_and_return_to_the_pool(serve) -> None:
    coordinator, run_dir = serve(membership={"data_lease_s": 1.0, "lease_s": 30.0})
    a, b = serve.node(coordinator), serve.node(coordinator)
    a.join()
    b.join()
    lease_a = a.client.acquire_lease()
    assert a.client.acquire_lease().file == lease_a.file  # the same lease, renewed
    lease_b = b.client.acquire_lease()
    assert lease_b.file != lease_a.file
    # More nodes than shards: every shard is held, so the least-shared one is shared.
    shards = len(json.loads(a.client.get_run().manifest_json)["splits"]["train"])
    extra = [serve.node(coordinator) for _ in range(shards)]
    for node in extra:
        node.join()
    files = [node.client.acquire_lease().file for node in extra]
    held = coordinator.call(_leases(coordinator))
    assert sorted(held) == sorted({lease_a.file, lease_b.file, *files})
    assert sorted(len(holders) for holders in held.values()) == [1] * (shards - 2) + [2, 2]
    for node in extra:
        node.client.leave("done")
    # The lease lapses (a heartbeat would renew it): the shard goes back to the pool and
    # is the first free one again.
    wait_for(lambda: lease_a.file not in coordinator.call(_leases(coordinator)), 10, "expiry")
    c = serve.node(coordinator)
    c.join()
    assert c.client.acquire_lease().file == lease_a.file
    data = a.client.fetch_file("data/" + lease_a.file)
    assert hashlib.sha256(data).hexdigest() == lease_a.sha256
    # The run's description, tokenizer and manifest for a joiner.
    run = a.client.get_run()
    tokenizer = a.client.fetch_file("tokenizer.json")
    assert hashlib.sha256(tokenizer).hexdigest() == run.tokenizer_sha256
    assert lease_a.file in run.manifest_json and "[outer]" in run.config_toml
    # Progress reports are kept for the dashboard.
    from starling.v1 import coordinator_pb2 as pb

    a.client.report_progress(pb.ReportProgressRequest(loss=3.5, tokens_per_s=1200.0))
    rows = coordinator.call(_async(lambda: coordinator.coordinator.store.progress()))
    assert [(r["node_id"], r["loss"], r["tokens_per_s"]) for r in rows] == [
        (a.node_id, 3.5, 1200.0)
    ]
    assert code_of(lambda: a.client.fetch_file("../coordinator.db")) == grpc.StatusCode.NOT_FOUND


def test_a_node_that_finished_its_shard_hands_it_back_for_another(serve) -> None:
    coordinator, _ = serve(membership={"data_lease_s": 30.0, "lease_s": 30.0})
    a, b = serve.node(coordinator), serve.node(coordinator)
    a.join()
    b.join()
    first, held_by_b = a.client.acquire_lease(), b.client.acquire_lease()
    second = a.client.acquire_lease(finished=first.file)
    assert second.file not in {first.file, held_by_b.file}  # a free, untrained one
    assert a.client.acquire_lease().file == second.file  # and it is renewed as usual
    leases = coordinator.call(_leases(coordinator))
    assert leases[second.file] == [a.node_id] and first.file not in leases
    # A name that is no training shard of the run: refused, and the lease kept.
    for bad in ("train/none.bin", "../coordinator.db", "x" * 5000):
        assert (
            code_of(lambda bad=bad: a.client.acquire_lease(finished=bad))
            == grpc.StatusCode.INVALID_ARGUMENT
        )
    assert coordinator.call(_leases(coordinator))[second.file] == [a.node_id]


async def _leases(coordinator: CoordinatorThread) -> dict[str, list[str]]:
    return coordinator.coordinator.store.leases()


def _delta(node: Node, numel: int, round_: int) -> torch.Tensor:
    # Nodes' pseudo-gradients agree in direction (the owners screen out ones that do not).
    seed = int(node.node_id[:8], 16) + round_
    return payload_of(seed, numel) * 1e-2


def close_round(nodes: list[Node], tokens: list[int], round_: int | None = None):
    """Waits for round `round_` (default: the current one) to train, has every node
    report its tokens, and returns the round's state once it is exchanging."""
    state = wait_for(
        lambda: (s := nodes[0].client.get_round(round_)).phase == "training" and s,
        30,
        "a round",
    )
    for node, n in zip(nodes, tokens, strict=True):
        lease = node.client.acquire_lease()
        node.client.report_tokens(state.round, lease.file, n, done=True)
    return wait_for(
        lambda: (s := nodes[0].client.get_round(state.round)).phase == "exchange" and s,
        30,
        "the round to close",
    )


def run_round(nodes: list[Node], tokens: list[int], numel: int):
    """Every node trains (reports tokens), then exchanges; returns the outcomes."""
    from concurrent.futures import ThreadPoolExecutor

    state = close_round(nodes, tokens)
    spec = spec_from_state(nodes[0].run_id, state)

    def one(index: int):
        node = nodes[index]
        payloads, _ = encode_shards(
            spec.plan, _delta(node, numel, state.round), ErrorFeedback(make_codec(spec.codec))
        )
        return exchange_round(node.client, node.peer, state, payloads, tokens[index])

    with ThreadPoolExecutor(len(nodes)) as pool:
        return [f.result(timeout=120) for f in [pool.submit(one, i) for i in range(len(nodes))]]


def test_round_lifecycle_commit_fingerprints_and_checkpoint(serve) -> None:
    coordinator, run_dir = serve(
        round={"tokens": 600, "exchange_deadline_s": 20.0},
        outer={"codec": "fp32"},
        checkpoints={"every": 1, "keep": 2},
    )
    nodes = [serve.node(coordinator) for _ in range(2)] + [serve.node(coordinator, reachable=False)]
    for node in nodes:
        node.join()
    numel = nodes[0].client.get_run().numel
    tokens = [100, 200, 300]
    outcomes = run_round(nodes, tokens, numel)
    commit = outcomes[0].commit
    assert {c.node_id: c.tokens for c in commit.contributors} == {
        n.node_id: t for n, t in zip(nodes, tokens, strict=True)
    }
    assert commit.tokens == 600 and not commit.excluded
    assert [s.status for s in commit.shards] == ["committed", "committed"]
    owners = {s.owner for s in commit.shards}
    assert owners == {nodes[0].node_id, nodes[1].node_id}  # the reachable ones
    pairs = zip(nodes, tokens, strict=True)
    expected = sum(_delta(n, numel, 0).double() * t for n, t in pairs) / 600
    for outcome in outcomes:
        assert outcome.skipped == [] and outcome.missing == []
        assert (outcome.mean.double() - expected).abs().max().item() <= 1e-6
    # Each shard's second owner (the other reachable node) reduced it too: the commit
    # records the mean's hash both signed, and it is the hash of the mean every node holds.
    for entry in commit.shards:
        assert {entry.owner, entry.verifier} == owners and entry.mean_status == "verified"
        for outcome in outcomes:
            assert outcome.results[0].shards[entry.shard].mean_hash == entry.mean_hash
    assert_mean_reports_are_checked(nodes, commit)
    # Everyone applies the same outer step: fingerprints agree; a liar must resync.
    run = nodes[0].client.get_run()
    blob0 = nodes[0].client.fetch_file(
        f"checkpoints/{run.latest_checkpoint.round}/state.safetensors"
    )
    from starling.checkpoint import state_from_blob

    params, momentum = state_from_blob(blob0, numel)
    state = GlobalState(params, momentum)
    state.outer_step(outcomes[0].mean, OuterConfig())
    fingerprint = state.fingerprint()
    assert nodes[0].client.report_fingerprint(0, fingerprint).expected == ""  # 1 of 3
    agreed = nodes[1].client.report_fingerprint(0, fingerprint)
    assert agreed.expected == fingerprint and not agreed.resync
    liar = nodes[2].client.report_fingerprint(0, "0" * 64)
    assert liar.resync and nodes[2].client.heartbeat().resync
    assert not nodes[0].client.heartbeat().resync
    round0 = nodes[0].client.get_round(0)
    assert round0.commit.fingerprint == fingerprint and round0.checkpoint_due
    assert round0.commit.bytes > 0
    # Checkpoint 1 (the state after round 0): corrupt uploads refused, the good one kept.
    blob = state_blob(state.params, state.momentum)
    bad = bytearray(blob)
    bad[-1] ^= 0xFF
    uploader = nodes[0].client
    assert code_of(lambda: uploader.upload_checkpoint(1, bytes(bad), fingerprint)) == (
        grpc.StatusCode.DATA_LOSS
    )
    assert code_of(lambda: uploader.upload_checkpoint(1, blob, "1" * 64)) == (
        grpc.StatusCode.DATA_LOSS
    )
    assert code_of(lambda: uploader.upload_checkpoint(5, blob, fingerprint)) == (
        grpc.StatusCode.FAILED_PRECONDITION
    )
    info = uploader.upload_checkpoint(1, blob, fingerprint)
    assert info.sha256 == hashlib.sha256(blob).hexdigest() and info.fingerprint == fingerprint
    assert code_of(lambda: uploader.upload_checkpoint(1, blob, fingerprint)) == (
        grpc.StatusCode.ALREADY_EXISTS
    )
    assert nodes[1].client.fetch_file("checkpoints/1/state.safetensors") == blob
    status = coordinator.status()
    assert status.latest_checkpoint.round == 1 and status.last_commit.round == 0
    assert status.tokens_trained == 600
    assert not nodes[0].client.get_round(0).checkpoint_due
    # A report that comes in before a majority agreed learns the agreement one round
    # later: the reply for round 1 carries round 0's agreed fingerprint.
    run_round(nodes, tokens, numel)
    first = nodes[2].client.report_fingerprint(1, "1" * 64)
    assert first.expected == "" and not first.resync
    assert first.previous_expected == fingerprint


def assert_mean_reports_are_checked(nodes: list[Node], commit) -> None:
    """ReportMean refuses what is not a reducer's own signed mean of a committed shard."""
    from starling.v1 import peer_pb2

    owner = nodes[0]
    shard = next(e.shard for e in commit.shards if e.owner == owner.node_id)
    header = owner.peer.committed_mean(0, shard, 10.0)
    assert owner.client.report_mean(0, shard, header).settled  # again: the same answer

    def changed(**fields) -> peer_pb2.MeanHeader:
        copy = peer_pb2.MeanHeader()
        copy.CopyFrom(header)
        for name, value in fields.items():
            setattr(copy, name, value)
        return copy

    refused = grpc.StatusCode
    report = owner.client.report_mean
    assert code_of(lambda: report(7, shard, header)) == refused.FAILED_PRECONDITION
    assert code_of(lambda: report(0, 9, header)) == refused.INVALID_ARGUMENT
    assert code_of(lambda: report(0, shard, changed(round=1))) == refused.INVALID_ARGUMENT
    assert code_of(lambda: report(0, shard, changed(payload_hash=b"short"))) == (
        refused.INVALID_ARGUMENT
    )
    forged = changed(payload_hash=bytes(32))  # signed over another hash
    assert code_of(lambda: report(0, shard, forged)) == refused.UNAUTHENTICATED
    client_only = nodes[2].client  # reduces nothing
    assert code_of(lambda: client_only.report_mean(0, shard, header)) == refused.PERMISSION_DENIED


def test_a_dead_owners_shard_is_reassigned_to_the_coordinator(serve) -> None:
    coordinator, _ = serve(
        round={"tokens": 300, "exchange_deadline_s": 3.0},
        outer={"codec": "fp32"},
        membership={"heartbeat_s": 0.3, "lease_s": 2.0},
    )
    nodes = [serve.node(coordinator) for _ in range(3)]
    for node in nodes:
        node.join()
    for node in nodes[:2]:
        node.keep_alive(0.3)
    numel = nodes[0].client.get_run().numel
    dead = nodes[2]
    # The third owner trains, then its process is gone before the exchange: no pushes,
    # no owner service, no heartbeats.
    state = wait_for(
        lambda: (s := nodes[0].client.get_round()).phase == "training" and s, 30, "a round"
    )
    for node in nodes:
        node.client.report_tokens(state.round, node.client.acquire_lease().file, 100, True)
    dead.peer.close()
    state = wait_for(
        lambda: (s := nodes[0].client.get_round(0)).phase == "exchange" and s, 30, "the close"
    )
    spec = spec_from_state(nodes[0].run_id, state)
    dead_shard = [o.node_id for o in spec.owners].index(dead.node_id)
    from concurrent.futures import ThreadPoolExecutor

    def one(node: Node):
        payloads, _ = encode_shards(
            spec.plan, _delta(node, numel, 0), ErrorFeedback(make_codec(spec.codec))
        )
        return exchange_round(node.client, node.peer, state, payloads, 100)

    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(one, nodes[:2], timeout=120))
    commit = outcomes[0].commit
    contributors = {c.node_id for c in commit.contributors}
    excluded = {e.node_id: e.reason for e in commit.excluded}
    assert contributors == {nodes[0].node_id, nodes[1].node_id}, excluded
    assert [e.node_id for e in commit.excluded] == [dead.node_id]
    # The shard, then its owner's reason (a fault: missing, left, no contribution in time).
    reason = commit.excluded[0].reason
    assert reason.startswith("shard ") and "rejected" not in reason, reason
    shard = commit.shards[dead_shard]
    assert shard.status == "reassigned" and dead.node_id in shard.detail
    # Its lease expired during the exchange: the plan names it, so nobody waited for it.
    assert list(nodes[0].client.get_round(0).plan.gone) == [dead.node_id]
    assert shard.owner == coordinator.coordinator.run.identity.node_id
    expected = (_delta(nodes[0], numel, 0).double() + _delta(nodes[1], numel, 0).double()) / 2
    for outcome in outcomes:
        assert outcome.missing == [] and outcome.skipped == []
        assert (outcome.mean.double() - expected).abs().max().item() <= 1e-6


def _raw_call(node: Node, method: str, raw: bytes, response):
    call = node.client.channel.unary_unary(
        f"/starling.v1.Coordinator/{method}",
        request_serializer=None,
        response_deserializer=response.FromString,
    )
    return call(raw, timeout=10)


def test_signatures_replays_clocks_and_stale_rounds_are_refused(serve) -> None:
    from starling.coordination import append_auth, sign_request, split_auth
    from starling.identity import request_message
    from starling.v1 import coordinator_pb2 as pb

    coordinator, _ = serve()
    node, stranger = serve.node(coordinator), serve.node(coordinator)
    node.join()
    run_id = node.run_id
    request = pb.HeartbeatRequest(phase="training")

    def signed(**auth_changes) -> bytes:
        body, auth = split_auth(sign_request(node.identity, "Heartbeat", run_id, 0, request))
        for key, value in auth_changes.items():
            setattr(auth, key, value)
        if auth_changes and "signature" not in auth_changes:  # re-sign what was changed
            message = request_message(
                "Heartbeat",
                run_id,
                auth.round,
                auth.node_id,
                auth.timestamp_ms,
                auth.nonce,
                hashlib.sha256(body).digest(),
            )
            auth.signature = node.identity.sign(message)
        return append_auth(body, auth)

    def code(raw: bytes, method: str = "Heartbeat") -> grpc.StatusCode:
        return code_of(lambda: _raw_call(node, method, raw, pb.HeartbeatResponse))

    good = signed()
    assert _raw_call(node, "Heartbeat", good, pb.HeartbeatResponse).lease_s > 0
    assert code(good) == grpc.StatusCode.ALREADY_EXISTS  # the same bytes again: a replay
    assert code(signed(signature=b"\0" * 64)) == grpc.StatusCode.UNAUTHENTICATED
    body, auth = split_auth(signed())
    assert code(append_auth(pb.HeartbeatRequest(phase="other").SerializeToString(), auth)) == (
        grpc.StatusCode.UNAUTHENTICATED  # the body changed under the signature
    )
    import time

    old = int((time.time() - 120) * 1000)
    assert code(signed(timestamp_ms=old)) == grpc.StatusCode.UNAUTHENTICATED  # 2 min off
    # Signed for another method: useless here.
    other = sign_request(node.identity, "Leave", run_id, 0, request)
    assert code(other) == grpc.StatusCode.UNAUTHENTICATED
    # Unsigned, auth not last, garbage.
    assert code(request.SerializeToString()) == grpc.StatusCode.INVALID_ARGUMENT
    assert code(good + request.SerializeToString()) == grpc.StatusCode.INVALID_ARGUMENT
    assert code(b"\xff\xff\xff") == grpc.StatusCode.INVALID_ARGUMENT
    assert code(signed(nonce=b"short")) == grpc.StatusCode.INVALID_ARGUMENT
    # A round far ahead of the current one; a node that never joined.
    assert code(signed(round=50)) == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(lambda: stranger.client.heartbeat()) == grpc.StatusCode.PERMISSION_DENIED
    # Reports for a round that is not in that phase.
    lease = node.client.acquire_lease()
    assert code_of(lambda: node.client.report_tokens(7, lease.file, 10)) == (
        grpc.StatusCode.FAILED_PRECONDITION
    )
    assert code_of(lambda: node.client.report_fingerprint(0, "a" * 64)) == (
        grpc.StatusCode.FAILED_PRECONDITION
    )
    assert code_of(lambda: node.client.report_shard(0, 0, [])) == (
        grpc.StatusCode.FAILED_PRECONDITION
    )
    # A Join whose node id is not its key's.
    join = pb.JoinRequest(public_key=stranger.identity.public_key)
    assert code(sign_request(node.identity, "Join", run_id, 0, join), "Join") == (
        grpc.StatusCode.UNAUTHENTICATED
    )


def test_stale_rounds_are_refused(serve) -> None:
    from starling.coordination import sign_request
    from starling.v1 import coordinator_pb2 as pb

    coordinator, _ = serve()
    node = serve.node(coordinator)
    node.join()
    wait_for(lambda: node.client.get_round().phase == "training", 10, "round 0")

    async def jump() -> None:  # as if the run had committed 20 rounds since
        store = coordinator.coordinator.store
        current = store.current_round()
        with store.transaction():
            store.put_round(type(current)(**{**current.__dict__, "round": 20}))

    coordinator.call(jump())
    raw = sign_request(node.identity, "Heartbeat", node.run_id, 3, pb.HeartbeatRequest())
    assert code_of(lambda: _raw_call(node, "Heartbeat", raw, pb.HeartbeatResponse)) == (
        grpc.StatusCode.FAILED_PRECONDITION
    )
    node.client.round = 20
    assert node.client.heartbeat().round == 20
    # A node that joins now signs round 0: it may join, ask the round and leave, and
    # nothing else until it signs a current round.
    late = serve.node(coordinator)
    assert late.client.round == 0
    late.join()
    assert late.client.get_round().round == 20
    raw = sign_request(late.identity, "ReportTokens", late.run_id, 0, pb.ReportTokensRequest())
    assert code_of(lambda: _raw_call(late, "ReportTokens", raw, pb.ReportTokensResponse)) == (
        grpc.StatusCode.FAILED_PRECONDITION
    )
    late.client.leave()


def test_token_join_policy(serve) -> None:
    from starling.coordinator.rundir import create_join_token

    coordinator, _ = serve(run={"join_policy": "token"})
    store = coordinator.coordinator.store
    token_id, token = coordinator.call(_async(lambda: create_join_token(store, "alice", 3600)))
    _, expired = coordinator.call(_async(lambda: create_join_token(store, "old", 0.001)))
    node = serve.node(coordinator)
    assert code_of(lambda: node.join()) == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(lambda: node.join("stk_wrong")) == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(lambda: node.join(expired)) == grpc.StatusCode.PERMISSION_DENIED
    assert node.join(token).node_id == node.node_id

    def revoke() -> bool:
        with store.transaction():
            return store.revoke_join_token(token_id)

    assert coordinator.call(_async(revoke))
    other = serve.node(coordinator)
    assert code_of(lambda: other.join(token)) == grpc.StatusCode.PERMISSION_DENIED


async def _async(function):
    return function()


def test_round_budgets_follow_the_inner_lr_with_sync_power(serve) -> None:
    # 100 schedule steps of 512 tokens (10 of warmup, then a cosine decay); rounds of
    # 2,048 tokens on average.
    coordinator, run_dir = serve(
        run={"target_tokens": 51_200},
        train={"batch_tokens": 512, "warmup_steps": 10, "schedule": "cosine"},
        round={"tokens": 2048, "sync_power": 1.0},
    )
    node = serve.node(coordinator)
    node.join()
    schedule = RunConfig.load(run_dir / "run.toml").inner_schedule()
    assert schedule.steps == 100
    ends = rounds.budget_round_ends(2048, schedule, 1.0)
    # 25 rounds (the bytes of 2,048-token rounds), ending where `starling simulate
    # --sync-power 1` ends its rounds over the same schedule, the last at its end.
    weights = [lr_multiplier(step, schedule) for step in range(100)]
    assert ends == list(itertools.accumulate(round_lengths(100, 25, weights)))
    assert len(ends) == 25 and ends[-1] == 100
    # Rounds close on whole steps: 2,000 tokens take 4 steps of 512, as in the simulator
    # (`--round-tokens 2000`), so again 25 rounds (not ⌈51,200 / 2,000⌉ = 26).
    assert len(rounds.budget_round_ends(2000, schedule, 1.0)) == 25
    assert len(rounds.budget_round_ends(513, schedule, 1.0)) == 50
    assert rounds.budget_round_ends(10**6, schedule, 1.0) == [100]  # one round: the run

    def budget(step: int) -> int:
        return rounds.lr_following_budget(2048, 512 * step, 512, ends)

    # The warmup's small lr: round 0 spans more steps than an average round.
    assert budget(0) == 512 * ends[0] > 2048
    assert node.client.get_round(0).budget == budget(0)
    # Near the end the lr is 10× smaller: rounds are longer.
    assert budget(ends[2]) < 2048 < budget(ends[20])
    # A round that closed a step past its end: the next one ends where it would have.
    assert budget(ends[5] + 1) == 512 * (ends[6] - ends[5] - 1)
    assert budget(100) == budget(120) == 2048  # past the schedule: the base budget


def test_the_coordinator_reduces_when_no_node_is_reachable(serve) -> None:
    coordinator, _ = serve(round={"tokens": 200, "exchange_deadline_s": 20.0})
    nodes = [serve.node(coordinator, reachable=False) for _ in range(2)]
    for node in nodes:
        assert not node.join().reachable
    numel = nodes[0].client.get_run().numel
    outcomes = run_round(nodes, [50, 150], numel)
    commit = outcomes[0].commit
    me = coordinator.coordinator.run.identity.node_id
    assert [s.owner for s in commit.shards] == [me]  # owner of last resort
    assert {c.node_id: c.tokens for c in commit.contributors} == {
        nodes[0].node_id: 50,
        nodes[1].node_id: 150,
    }
    # int4 (the run's codec): the mean is within the codec's bound of the exact one.
    exact = (_delta(nodes[0], numel, 0) * 50 + _delta(nodes[1], numel, 0) * 150) / 200
    for outcome in outcomes:
        assert outcome.missing == []
        assert (outcome.mean - exact).abs().max().item() <= 2 * exact.abs().max().item() / 7
    assert torch.equal(outcomes[0].mean, outcomes[1].mean)


@pytest.mark.parametrize("reachable", [True, False])
def test_a_participant_that_withdraws_is_not_waited_for(serve, reachable: bool) -> None:
    # A node whose training diverged sends nothing: it withdraws, so the owners (its
    # peers, or the coordinator when none is reachable) commit without it long before
    # the exchange deadline, and it still reduces its own shards and takes the mean.
    import time
    from concurrent.futures import ThreadPoolExecutor

    coordinator, _ = serve(
        round={"tokens": 300, "exchange_deadline_s": 120.0}, outer={"codec": "fp32"}
    )
    nodes = [serve.node(coordinator, reachable=reachable) for _ in range(3)]
    bystander = serve.node(coordinator)  # joined, but trains nothing this round
    for node in [*nodes, bystander]:
        node.join()
    numel = nodes[0].client.get_run().numel
    state = wait_for(
        lambda: (s := nodes[0].client.get_round()).phase == "training" and s, 30, "a round"
    )
    withdrawing = nodes[2]
    # Only a round in its exchange can be withdrawn from.
    assert (
        code_of(lambda: withdrawing.client.withdraw(state.round, "diverged"))
        == grpc.StatusCode.FAILED_PRECONDITION
    )
    for node in nodes:
        node.client.report_tokens(state.round, node.client.acquire_lease().file, 100, True)
    state = wait_for(
        lambda: (s := nodes[0].client.get_round(state.round)).phase == "exchange" and s,
        30,
        "the close",
    )
    assert code_of(lambda: withdrawing.client.withdraw(state.round, "  ")) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    assert code_of(lambda: bystander.client.withdraw(state.round, "diverged")) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    reason = "training diverged (NaN or Inf in the weights)"
    version = withdrawing.client.withdraw(state.round, reason).version
    assert version > state.version
    assert withdrawing.client.withdraw(state.round, "again").version == version  # idempotent
    withdrawn = nodes[0].client.get_round(state.round).plan.withdrawn
    assert [(w.node_id, w.reason) for w in withdrawn] == [
        (withdrawing.node_id, f"withdrew: {reason}")
    ]

    def one(node: Node):
        if node is withdrawing:
            return exchange_round(node.client, node.peer, state, None, 0)
        payloads, _ = encode_shards(
            spec.plan, _delta(node, numel, state.round), ErrorFeedback(make_codec(spec.codec))
        )
        return exchange_round(node.client, node.peer, state, payloads, 100)

    spec = spec_from_state(nodes[0].run_id, state)
    if reachable:  # every node reduces a shard: the withdrawn one's too
        assert withdrawing.node_id in {o.node_id for o in spec.owners}
    with ThreadPoolExecutor(3) as pool:
        outcomes = [f.result(timeout=60) for f in [pool.submit(one, n) for n in nodes]]
    assert time.time() < state.plan.deadline_unix  # committed without waiting for it
    commit = outcomes[0].commit
    assert {c.node_id for c in commit.contributors} == {nodes[0].node_id, nodes[1].node_id}
    assert [e.node_id for e in commit.excluded] == [withdrawing.node_id]
    assert commit.excluded[0].reason.endswith(f": withdrew: {reason}"), commit.excluded
    honest = [_delta(n, numel, state.round).double() for n in nodes[:2]]
    expected = (honest[0] + honest[1]) / 2
    for outcome in outcomes:
        assert outcome.missing == [] and outcome.skipped == []
        assert (outcome.mean.double() - expected).abs().max().item() <= 1e-6
    assert torch.equal(outcomes[0].mean, outcomes[2].mean)

    # A round every participant withdraws from (they all diverged): it commits at once
    # with nobody in it, and nothing is missing: no mean moved anything.
    state = close_round(nodes, [100] * 3, state.round + 1)
    for node in nodes:
        node.client.withdraw(state.round, reason)

    def sit_out(node: Node):
        return exchange_round(node.client, node.peer, state, None, 0)

    with ThreadPoolExecutor(3) as pool:
        outcomes = [f.result(timeout=60) for f in [pool.submit(sit_out, n) for n in nodes]]
    assert time.time() < state.plan.deadline_unix
    for outcome in outcomes:
        assert not outcome.commit.contributors and outcome.missing == [], outcome
        assert len(outcome.commit.excluded) == 3

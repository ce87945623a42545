"""kill -9 of a real `starling coordinator serve` process at several points of a run,
then a restart: membership, round, commits and checkpoint hashes are as they were, and
nodes carry on by themselves."""

from __future__ import annotations

import hashlib
import json
import random
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from starling.checkpoint import state_blob, state_from_blob
from starling.codecs import ErrorFeedback, make_codec
from starling.diloco import GlobalState, OuterConfig
from starling.exchange import encode_shards
from starling.node.rounds import exchange_round, spec_from_state
from starling.v1 import coordinator_pb2 as pb

from .coordinator_support import CoordinatorProcess, Node, copy_run, make_template, wait_for
from .test_coordinator import _delta


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_template(tmp_path_factory.mktemp("restart"))


def durable_state(run_dir: Path) -> dict:
    """What must survive: members, rounds with their plans and commits, checkpoints,
    tokens (last-seen times and lease expiries move on, by design)."""
    db = sqlite3.connect(f"file:{run_dir / 'coordinator.db'}?mode=ro", uri=True)
    try:
        return {
            "nodes": db.execute(
                "SELECT node_id, public_key, address, reachable, state, rounds_contributed, "
                "tokens_trained FROM nodes ORDER BY node_id"
            ).fetchall(),
            "rounds": db.execute(
                "SELECT round, phase, plan, commit_record FROM rounds ORDER BY round"
            ).fetchall(),
            "checkpoints": db.execute(
                "SELECT round, sha256, fingerprint FROM checkpoints ORDER BY round"
            ).fetchall(),
            "tokens": db.execute("SELECT * FROM round_tokens ORDER BY round, node_id").fetchall(),
        }
    finally:
        db.close()


def assert_preserved(before: dict, after: dict) -> None:
    """Everything durable at the kill is there after the restart: the same members,
    every committed round's record, the checkpoints; open rounds may have moved on."""
    assert after["nodes"] == before["nodes"]
    rounds_after = {r[0]: r for r in after["rounds"]}
    for r in before["rounds"]:
        if r[1] == "committed":
            assert rounds_after[r[0]] == r
        else:
            assert r[0] in rounds_after  # the open round is still there
    assert after["checkpoints"] == before["checkpoints"]
    assert set(before["tokens"]) <= set(after["tokens"])


def checkpoint_hashes(run_dir: Path) -> dict[str, str]:
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((run_dir / "checkpoints").rglob("*"))
        if p.is_file()
    }


def train_and_exchange(nodes: list[Node], numel: int) -> pb.RoundState:
    """One round: tokens reported, then the exchange; returns the committed state."""
    state = wait_for(
        lambda: (s := nodes[0].client.get_round()).phase == "training" and s, 30, "a round"
    )
    for node in nodes:
        node.client.round = state.round
        node.client.report_tokens(state.round, node.client.acquire_lease().file, 100, True)
    state = wait_for(
        lambda: (s := nodes[0].client.get_round(state.round)).phase == "exchange" and s,
        30,
        "the close",
    )
    outcomes = exchange_all(nodes, state, numel)
    return nodes[0].client.get_round(state.round), outcomes[0].mean


def exchange_all(nodes: list[Node], state: pb.RoundState, numel: int) -> list:
    """Every node's part of the round `state` (phase exchange), 100 tokens each."""
    spec = spec_from_state(nodes[0].run_id, state)

    def one(node: Node):
        payloads, _ = encode_shards(
            spec.plan, _delta(node, numel, state.round), ErrorFeedback(make_codec(spec.codec))
        )
        return exchange_round(node.client, node.peer, state, payloads, 100)

    with ThreadPoolExecutor(len(nodes)) as pool:
        return list(pool.map(one, nodes, timeout=120))


def test_kill9_at_several_points_loses_nothing_committed(template: Path, tmp_path: Path) -> None:
    run_dir = copy_run(
        template,
        tmp_path / "run",
        round={"tokens": 200, "exchange_deadline_s": 10.0},
        outer={"codec": "fp32"},
        checkpoints={"every": 1, "keep": 3},
        membership={"heartbeat_s": 0.5, "lease_s": 60.0},
    )
    coordinator = CoordinatorProcess(run_dir)
    url, port = coordinator.url, coordinator.url.port
    nodes = [Node(url), Node(url)]
    try:
        for node in nodes:
            node.join()
        numel = nodes[0].client.get_run().numel
        blob0 = nodes[0].client.fetch_file("checkpoints/0/state.safetensors")
        state = GlobalState(*state_from_blob(blob0, numel))

        # Point 1: right after a commit (idle). Point 2: during a checkpoint upload.
        committed, mean = train_and_exchange(nodes, numel)
        assert committed.phase == "committed" and len(committed.commit.contributors) == 2
        state.outer_step(mean, OuterConfig())
        for node in nodes:
            node.client.report_fingerprint(0, state.fingerprint())
        coordinator.kill()
        before, hashes = durable_state(run_dir), checkpoint_hashes(run_dir)
        coordinator = CoordinatorProcess(run_dir, port)
        assert_preserved(before, durable_state(run_dir))
        assert checkpoint_hashes(run_dir) == hashes
        # Nodes carry on by themselves: their next signed request goes through.
        assert nodes[0].client.heartbeat().round >= 0

        blob = state_blob(state.params, state.momentum)
        uploading = threading.Event()
        release = threading.Event()

        def slow_chunks():
            from starling.coordination import sign_request
            from starling.exchange.framing import length_delimited

            header = pb.CheckpointHeader(
                round=1,
                size=len(blob),
                sha256=hashlib.sha256(blob).hexdigest(),
                fingerprint=state.fingerprint(),
            )
            signed = sign_request(nodes[0].identity, "UploadCheckpoint", nodes[0].run_id, 0, header)
            yield length_delimited(1, signed)
            yield pb.CheckpointChunk(data=blob[:1000]).SerializeToString()
            uploading.set()
            release.wait(30)  # the coordinator dies while this upload is half done

        upload = nodes[0].client.channel.stream_unary(
            "/starling.v1.Coordinator/UploadCheckpoint",
            request_serializer=None,
            response_deserializer=pb.CheckpointInfo.FromString,
        )
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(lambda: upload(slow_chunks(), timeout=60))
            assert uploading.wait(30)
            coordinator.kill()
            before = durable_state(run_dir)
            release.set()
            with pytest.raises(grpc.RpcError):
                future.result(60)
        coordinator = CoordinatorProcess(run_dir, port)
        assert_preserved(before, durable_state(run_dir))
        assert checkpoint_hashes(run_dir) == hashes  # the half upload left nothing behind
        info = nodes[1].client.upload_checkpoint(1, blob, state.fingerprint())  # uploads again
        assert info.round == 1

        # Point 3: in the middle of an exchange (after the close, before the commit): a
        # third participant trained but never pushes, so owners hold the round open until
        # its deadline; the coordinator dies then. The exchange finishes after the restart
        # (nodes retry while it is down) and commits without the straggler.
        straggler = Node(url)
        straggler.join()
        state = wait_for(
            lambda: (s := nodes[0].client.get_round()).phase == "training" and s, 30, "a round"
        )
        for node in (straggler, nodes[0]):
            node.client.round = state.round
            node.client.report_tokens(state.round, node.client.acquire_lease().file, 100, True)
        state = wait_for(
            lambda: (s := nodes[0].client.get_round(state.round)).phase == "exchange" and s,
            30,
            "the close",
        )
        spec = spec_from_state(nodes[0].run_id, state)
        assert set(spec.participants) == {straggler.node_id, nodes[0].node_id}

        def exchange(node: Node):
            payloads, _ = encode_shards(
                spec.plan, _delta(node, numel, state.round), ErrorFeedback(make_codec(spec.codec))
            )
            return exchange_round(node.client, node.peer, state, payloads, 100)

        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(exchange, nodes[0])
            coordinator.kill()
            before = durable_state(run_dir)
            coordinator = CoordinatorProcess(run_dir, port)
            assert_preserved(before, durable_state(run_dir))
            outcome = running.result(120)
        assert [c.node_id for c in outcome.commit.contributors] == [nodes[0].node_id]
        assert [e.node_id for e in outcome.commit.excluded] == [straggler.node_id]
        straggler.client.leave("test")
        straggler.close()

        # Point 4: random instants of whole rounds.
        rng = random.Random(0)
        for _ in range(2):
            with ThreadPoolExecutor(1) as pool:
                running = pool.submit(train_and_exchange, nodes, numel)
                threading.Event().wait(rng.uniform(0.0, 1.0))
                coordinator.kill()
                before = durable_state(run_dir)
                coordinator = CoordinatorProcess(run_dir, port)
                assert_preserved(before, durable_state(run_dir))
                try:
                    running.result(120)  # may finish (nodes retry) or fail mid-way
                except grpc.RpcError:
                    pass
            committed, _ = train_and_exchange_after_restart(nodes, numel)
            assert committed.phase == "committed"
    finally:
        for node in nodes:
            node.close()
        coordinator.stop()


def train_and_exchange_after_restart(nodes: list[Node], numel: int):
    """After a restart the round in flight may still be training, exchanging (its
    plan names owners that must be pushed to again) or committed already."""
    state = nodes[0].client.get_round()
    if state.phase == "exchange":
        exchange_all(nodes, state, numel)
        return nodes[0].client.get_round(state.round), None
    return train_and_exchange(nodes, numel)


def test_a_dispute_left_undecided_by_a_kill_is_decided_after_the_restart(
    template: Path, tmp_path: Path
) -> None:
    """A dispute (owner and verifier reported different contributions of one sender) is
    decided after its commit, from both reducers' evidence; a coordinator killed before
    the verdict decides it when it starts again. The dispute is written into a real
    commit while the coordinator is down; both reducers still hold the same signed
    contribution, so the verdict is that there is none."""
    run_dir = copy_run(
        template,
        tmp_path / "run",
        round={"tokens": 200, "exchange_deadline_s": 10.0},
        outer={"codec": "fp32"},
        membership={"heartbeat_s": 0.5, "lease_s": 60.0},
    )
    coordinator = CoordinatorProcess(run_dir)
    port = coordinator.url.port
    nodes = [Node(coordinator.url), Node(coordinator.url)]
    try:
        for node in nodes:
            node.join()
        numel = nodes[0].client.get_run().numel
        committed, _ = train_and_exchange(nodes, numel)
        assert committed.phase == "committed" and len(committed.commit.contributors) == 2
        coordinator.kill()
        db = sqlite3.connect(run_dir / "coordinator.db")
        (raw,) = db.execute(
            "SELECT commit_record FROM rounds WHERE round = ?", (committed.round,)
        ).fetchone()
        record = json.loads(raw)
        assert record["shards"][0]["verifier"], record["shards"]  # two reducers
        sender = nodes[1].node_id
        record["disputed"], record["disputes"] = {sender: [0]}, []
        with db:
            db.execute(
                "UPDATE rounds SET commit_record = ? WHERE round = ?",
                (json.dumps(record), committed.round),
            )
        db.close()
        coordinator = CoordinatorProcess(run_dir, port)

        def verdicts() -> list:
            ro = sqlite3.connect(f"file:{run_dir / 'coordinator.db'}?mode=ro", uri=True)
            try:
                (stored,) = ro.execute(
                    "SELECT commit_record FROM rounds WHERE round = ?", (committed.round,)
                ).fetchone()
            finally:
                ro.close()
            return json.loads(stored)["disputes"]

        (verdict,) = wait_for(verdicts, 60, "the verdict")
        assert verdict == {"shard": 0, "contributor": sender, "verdict": "no dispute"}
    finally:
        for node in nodes:
            node.close()
        coordinator.stop()

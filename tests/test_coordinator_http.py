"""The coordinator's HTTP side on a real socket, with the coordinator's gRPC service in
this process: the public read-only endpoints, precise error codes, checkpoint downloads
that cannot leave the checkpoints, the admin actions behind the admin token, progress
reports with the training loss, old databases, and the dashboard's arithmetic."""

from __future__ import annotations

import hashlib
import http.client
import json
import math
import re
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from starling.coordination import run_state, run_throughput
from starling.coordinator.api import fp32_equivalent_bytes
from starling.coordinator.http import StatusHttpServer
from starling.coordinator.rundir import create_join_token
from starling.coordinator.store import Store
from starling.v1 import coordinator_pb2 as pb

from .coordinator_support import CoordinatorThread, Node, copy_run, make_template


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_template(tmp_path_factory.mktemp("http"))


@dataclass
class Served:
    coordinator: CoordinatorThread
    http: StatusHttpServer
    run_dir: Path
    nodes: list[Node] = field(default_factory=list)

    def request(
        self, method: str, path: str, body: bytes | None = None, **headers: str
    ) -> tuple[int, dict[str, str], bytes]:
        """One request on a fresh connection; the path goes out exactly as given."""
        connection = http.client.HTTPConnection("127.0.0.1", self.http.port, timeout=10)
        try:
            return _exchange(connection, method, path, body, headers)
        finally:
            connection.close()

    def json(self, path: str) -> Any:
        code, _, body = self.request("GET", path)
        assert code == 200, (path, body)
        return json.loads(body)

    @property
    def admin_token(self) -> str:
        return (self.run_dir / "admin_token").read_text().strip()


def _exchange(
    connection: http.client.HTTPConnection,
    method: str,
    path: str,
    body: bytes | None,
    headers: dict[str, str],
) -> tuple[int, dict[str, str], bytes]:
    connection.request(method, path, body=body, headers=headers)
    response = connection.getresponse()
    return response.status, dict(response.getheaders()), response.read()


@pytest.fixture
def served(template: Path, tmp_path: Path) -> Iterator[Served]:
    run_dir = copy_run(template, tmp_path / "run", membership={"lease_s": 30.0})
    coordinator = CoordinatorThread(run_dir)

    async def make() -> StatusHttpServer:  # built on the coordinator's loop
        return StatusHttpServer(coordinator.coordinator, "127.0.0.1", 0)

    server = coordinator.call(make())
    server.start()
    served = Served(coordinator, server, run_dir)
    yield served
    for node in served.nodes:
        node.close()
    server.stop()
    coordinator.stop()


def join(served: Served) -> Node:
    node = Node(served.coordinator.url)
    served.nodes.append(node)
    node.join()
    return node


def test_the_public_endpoints_before_any_node_joined(served: Served) -> None:
    code, headers, page = served.request("GET", "/")
    assert code == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert "connect-src 'self'" in headers["Content-Security-Policy"]
    # Self-contained: no script, style, font or image from anywhere else.
    assert b"<title>" in page and b"<script>" in page
    external = rb"""(src|href)\s*=\s*["']?(https?:)?//|@import|url\(\s*["']?https?:"""
    assert not re.search(external, page)
    assert served.request("GET", "/?utm_source=chat")[0] == 200  # a shared link still opens
    assert served.json("/healthz") == {"ok": True}

    status = served.json("/api/status")
    assert status["state"] == "waiting" and status["round"] == 0 and status["phase"] == "waiting"
    assert status["rounds_committed"] == 0 and status["val_loss"] is None
    assert status["eta_s"] is None and status["tokens_per_s"] is None
    assert status["model"]["preset"] == "tiny" and status["model"]["parameters"] > 0
    assert status["nodes"]["active"] == 0 and status["latest_checkpoint"]["round"] == 0
    assert status["join_url"] == str(served.coordinator.url)
    assert served.json("/api/peers")["peers"] == []
    assert served.json("/api/rounds") == {"now": pytest.approx(status["now"], abs=60),
                                          "current": None, "rounds": []}  # fmt: skip
    assert served.json("/api/loss")["points"] == []
    [ckpt] = served.json("/api/checkpoints")["checkpoints"]
    assert ckpt["round"] == 0 and ckpt["url"] == "/checkpoints/0/state.safetensors"

    # HEAD: the headers of the GET, no body.
    code, headers, body = served.request("HEAD", "/api/status")
    assert code == 200 and int(headers["Content-Length"]) > 0 and body == b""

    # /metrics in Prometheus' text format, read by prometheus-client's parser.
    code, headers, text = served.request("GET", "/metrics")
    assert code == 200 and headers["Content-Type"].startswith("text/plain; version=")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }
    assert samples["starling_round_phase", (("phase", "waiting"),)] == 1
    assert samples["starling_nodes", (("state", "active"),)] == 0
    assert samples["starling_checkpoints", ()] == 1
    assert samples["starling_rounds_committed_total", ()] == 0
    assert not any(name == "starling_validation_loss" for name, _ in samples)  # unknown yet
    assert samples["starling_http_requests_total", (("code", "200"), ("endpoint", "status"))] >= 1


@pytest.mark.parametrize(
    "method, path, code, needle",
    [
        ("GET", "/nope", 404, "no such page"),
        ("GET", "/api/status/", 404, "no such page"),
        ("GET", "/api", 404, "no such page"),
        ("POST", "/api/status", 405, "use GET"),
        ("DELETE", "/api/peers", 405, "use GET"),
        ("PUT", "/", 405, "use GET"),
        ("GET", "/api/admin/nodes/abc/ban", 405, "use POST"),
        ("GET", "/api/peers?limit=0", 400, "limit must be in 1..1000"),
        ("GET", "/api/peers?limit=ten", 400, "limit must be an integer"),
        ("GET", "/api/peers?state=sleeping", 400, "state must be one of"),
        ("GET", "/api/peers?limit=1&limit=2", 400, "given twice"),
        ("GET", "/api/rounds?limit=201", 400, "limit must be in 1..200"),
        ("GET", "/api/loss?after=-2", 400, "after must be in"),
        ("GET", "/api/status?verbose=1", 400, "unknown query parameter 'verbose'"),
        ("GET", "/api/loss?after", 400, "after must be an integer"),
    ],
)
def test_bad_requests_get_precise_codes(
    served: Served, method: str, path: str, code: int, needle: str
) -> None:
    got, headers, body = served.request(method, path)
    assert got == code, body
    assert headers["Content-Type"] == "application/json"
    assert needle in json.loads(body)["error"]
    if code == 405:
        assert headers["Allow"] in ("GET, HEAD", "POST")


def test_checkpoints_download_and_nothing_else_does(served: Served) -> None:
    state = served.run_dir / "checkpoints" / "000000" / "state.safetensors"
    [ckpt] = served.json("/api/checkpoints")["checkpoints"]
    code, headers, body = served.request("GET", ckpt["url"])
    assert code == 200 and body == state.read_bytes()
    assert headers["Content-Type"] == "application/octet-stream"
    assert int(headers["Content-Length"]) == ckpt["size"] == len(body)
    assert hashlib.sha256(body).hexdigest() == ckpt["sha256"] == headers["ETag"].strip('"')
    assert "filename=" in headers["Content-Disposition"]
    code, headers, body = served.request("HEAD", ckpt["url"])
    assert code == 200 and int(headers["Content-Length"]) == ckpt["size"] and body == b""
    manifest = served.json(ckpt["manifest_url"])
    assert manifest["round"] == 0 and manifest["sha256"] == ckpt["sha256"]
    secret = served.admin_token.encode()
    for path in (
        "/checkpoints/0/../../admin_token",
        "/checkpoints/../coordinator.db",
        "/checkpoints/0/%2e%2e/%2e%2e/admin_token",
        "/checkpoints/0/..%2F..%2Fadmin_token",
        "/checkpoints/0/identity.key",
        "/checkpoints/000000/../../run.toml",
        "/checkpoints/-1/state.safetensors",
        "/checkpoints/7/state.safetensors",  # a round with no checkpoint
        "//etc/passwd",
    ):
        code, _, body = served.request("GET", path)
        assert code == 404, path
        assert secret not in body and b"root:" not in body


def test_progress_reports_keep_the_training_loss_and_refuse_nonsense(served: Served) -> None:
    node = join(served)
    node.client.report_progress(
        pb.ReportProgressRequest(
            round=0, loss=3.25, tokens_per_s=1500.0, utilization=0.5, train_loss=3.5,
            round_tokens=2048, bytes_sent=10, bytes_received=20,
        )
    )  # fmt: skip
    rows = served.coordinator.call(_async(lambda: served.coordinator.coordinator.store.progress()))
    assert [(r["train_loss"], r["round_tokens"]) for r in rows] == [(3.5, 2048)]
    for bad in (
        {"loss": math.nan},
        {"train_loss": math.inf},
        {"tokens_per_s": -1.0},
        {"utilization": 1.5},
    ):
        with pytest.raises(grpc.RpcError) as refused:
            node.client.report_progress(pb.ReportProgressRequest(round=0, **bad))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
    [peer] = served.json("/api/peers")["peers"]
    assert peer["node_id"] == node.node_id and peer["train_loss"] == 3.5
    assert peer["tokens_per_s"] == 1500.0 and peer["role"] == "owner"
    assert peer["status"] == "active" and peer["utilization"] == 0.5
    status = served.json("/api/status")
    assert status["val_loss"] == 3.25 and status["train_loss"] == 3.5
    assert status["nodes"]["active"] == 1 and status["state"] == "training"


def test_admin_actions_need_the_admin_token(served: Served) -> None:
    node = join(served)
    ban = f"/api/admin/nodes/{node.node_id}/ban"
    reason = json.dumps({"reason": "sent NaNs"}).encode()
    code, headers, _ = served.request("POST", ban, reason)
    assert code == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert served.request("POST", ban, reason, Authorization="Basic dXNlcjpwdw==")[0] == 401
    assert served.request("POST", ban, reason, Authorization="Bearer not-the-token")[0] == 403
    node.client.heartbeat()  # still a member
    admin = {"Authorization": f"Bearer {served.admin_token}"}
    assert served.request("POST", ban, b"{not json", **admin)[0] == 400
    assert served.request("POST", ban, b'{"reason": 7}', **admin)[0] == 400
    assert served.request("POST", ban, b"x" * 5000, **admin)[0] == 413
    assert served.request("POST", "/api/admin/nodes/0123abcd/ban", reason, **admin)[0] == 404

    code, _, body = served.request("POST", ban, reason, **admin)
    assert code == 200 and json.loads(body)["state"] == "banned"
    with pytest.raises(grpc.RpcError) as refused:
        node.client.heartbeat()
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert refused.value.details() == "this node is banned: sent NaNs"  # not "join again"
    with pytest.raises(grpc.RpcError) as refused:
        node.join()
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    [peer] = served.json("/api/peers")["peers"]
    assert peer["status"] == "banned" and peer["status_detail"] == "sent NaNs"
    assert served.json("/api/peers?state=active")["peers"] == []
    assert served.json("/api/status")["nodes"]["banned"] == 1

    async def new_token() -> tuple[str, str]:  # the store only from the loop
        return create_join_token(served.coordinator.coordinator.store, "alice", 3600)

    token_id, token = served.coordinator.call(new_token())
    revoke = f"/api/admin/tokens/{token_id}/revoke"
    assert served.request("POST", revoke)[0] == 401
    code, _, body = served.request("POST", revoke, **admin)
    assert code == 200 and json.loads(body) == {"token_id": token_id, "revoked": True}
    digest = hashlib.sha256(token.encode()).hexdigest()
    store = served.coordinator.coordinator.store
    assert not served.coordinator.call(_async(lambda: store.valid_join_token(digest, 0.0)))
    assert served.request("POST", "/api/admin/tokens/nope/revoke", **admin)[0] == 404


def test_one_keep_alive_connection_survives_refused_requests(served: Served) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", served.http.port, timeout=10)
    try:
        for method, path, body, expected in (
            ("GET", "/api/status", None, 200),
            ("POST", "/api/admin/nodes/x/ban", b'{"reason": "unread body"}', 401),
            ("POST", "/api/status", b"{}", 405),
            ("GET", "/api/peers?limit=x", None, 400),
            ("GET", "/api/checkpoints", None, 200),
        ):
            code, headers, _ = _exchange(connection, method, path, body, {})
            assert code == expected, (method, path)
            assert headers.get("Connection") != "close"
    finally:
        connection.close()


def test_an_old_database_gains_the_new_columns(tmp_path: Path) -> None:
    # The progress and nodes tables as the first coordinators created them.
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema_version', '1');
        CREATE TABLE nodes (node_id TEXT PRIMARY KEY, public_key BLOB NOT NULL,
            address TEXT NOT NULL, cert_fingerprint TEXT NOT NULL, reachable INTEGER NOT NULL,
            device TEXT NOT NULL, memory_bytes INTEGER NOT NULL, upload_mbps REAL NOT NULL,
            download_mbps REAL NOT NULL, software TEXT NOT NULL, joined REAL NOT NULL,
            last_seen REAL NOT NULL, expires REAL NOT NULL, state TEXT NOT NULL,
            phase TEXT NOT NULL DEFAULT '', state_round INTEGER NOT NULL DEFAULT 0,
            resync INTEGER NOT NULL DEFAULT 0, rounds_contributed INTEGER NOT NULL DEFAULT 0,
            tokens_trained INTEGER NOT NULL DEFAULT 0);
        INSERT INTO nodes (node_id, public_key, address, cert_fingerprint, reachable, device,
            memory_bytes, upload_mbps, download_mbps, software, joined, last_seen, expires,
            state) VALUES ('n1', x'00', '', '', 0, 'cpu', 0, 0, 0, 'old', 1, 2, 3, 'left');
        CREATE TABLE progress (id INTEGER PRIMARY KEY AUTOINCREMENT, node_id TEXT NOT NULL,
            time REAL NOT NULL, round INTEGER NOT NULL, loss REAL NOT NULL,
            tokens_per_s REAL NOT NULL, bytes_sent INTEGER NOT NULL,
            bytes_received INTEGER NOT NULL, utilization REAL NOT NULL);
        INSERT INTO progress (node_id, time, round, loss, tokens_per_s, bytes_sent,
            bytes_received, utilization) VALUES ('n1', 1.0, 0, 4.5, 100.0, 1, 2, 0.5);
        """
    )
    db.commit()
    db.close()
    store = Store(path)
    try:
        [row] = store.progress()
        assert row["loss"] == 4.5 and row["train_loss"] == 0 and row["round_tokens"] == 0
        # Rows without a training loss (older nodes) count for validation loss only.
        assert store.progress_by_round()[0]["train_loss"] is None
        node = store.node("n1")
        assert node is not None and node.state == "left" and node.state_reason == ""
        with store.transaction():
            store.add_progress(
                "n1",
                2.0,
                {"round": 1, "loss": 4.0, "tokens_per_s": 1.0, "bytes_sent": 0,
                 "bytes_received": 0, "utilization": 0.1, "train_loss": 4.2,
                 "round_tokens": 512},
            )  # fmt: skip
        assert store.progress_by_round()[1]["train_loss"] == 4.2
    finally:
        store.close()
    Store(path).close()  # opening it again changes nothing


def test_the_run_pace_and_state() -> None:
    # (commit time, tokens, duration): commit to commit sets the pace.
    assert run_throughput([]) is None
    assert run_throughput([(100.0, 600, 3.0)]) == 200.0  # one commit: its own duration
    assert run_throughput([(100.0, 600, 3.0), (102.0, 600, 3.0), (104.0, 600, 3.0)]) == 300.0
    assert run_throughput([(100.0, 600, 0.0), (100.0, 600, 0.0)]) is None
    assert run_state("waiting", 0, 0, 100) == "waiting"
    assert run_state("training", 2, 10, 100) == "training"
    assert run_state("committed", 2, 10, 100) == "training"  # the next round opens now
    assert run_state("exchange", 2, 10, 100) == "exchanging"
    assert run_state("training", 0, 10, 100) == "waiting"
    assert run_state("training", 2, 100, 100) == "finished"


def test_the_fp32_equivalent_of_a_round_counts_each_transfer_at_each_end() -> None:
    peer = lambda name: {"node_id": name}  # noqa: E731
    # Two shards of 10 and 6 parameters owned by a and b; c is client-only.
    plan = {
        "bounds": [0, 10, 16],
        "owners": [peer("a"), peer("b")],
        "participants": [peer("a"), peer("b"), peer("c")],
    }
    # Shard 0: b and c each send 40 bytes up and get 40 back (counted at their end),
    # and a receives and serves those same bytes (counted at its end): 4 × 80.
    # Shard 1: a and c with b, 24 bytes each way: 4 × 48.
    assert fp32_equivalent_bytes(plan, {"a", "b", "c"}) == 4 * 80 + 4 * 48
    # Only c reported: its own transfers, each counted once.
    assert fp32_equivalent_bytes(plan, {"c"}) == 80 + 48
    # The coordinator as the owner (it reports nothing): each node's transfers only.
    solo = {"bounds": [0, 16], "owners": [peer("coord")], "participants": [peer("a")]}
    assert fp32_equivalent_bytes(solo, {"a"}) == 2 * 64


def _async(read: Any) -> Any:
    async def call() -> Any:
        return read()

    return call()

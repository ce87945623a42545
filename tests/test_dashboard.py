"""The dashboard against a live run, all real: a `starling coordinator serve` process
with its HTTP port, three `starling node join` processes (two shard owners, one
client-only) training the tiny preset, and headless Chromium loading the page.

The JSON API, /metrics (parsed by prometheus-client's parser) and `starling status` are
checked against what the run did; the page must render the header, a non-empty loss
chart and one peer row per node, update in place when a round commits, make no
request off its own server, and fit a phone's width. Screenshots of both widths are
saved in test-artifacts/ (dashboard.png, dashboard-phone.png)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from starling.identity import Identity

from .browser import Browser
from .conftest import run_cli
from .coordinator_support import CORPUS, micro_run_toml, wait_for

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
INNER_STEPS = 4
BATCH_TOKENS = 512
TARGET_TOKENS = 400_000

# After [run], [model] and [data] (micro_run_toml).
CONFIG = f"""
[round]
inner_steps = {INNER_STEPS}
deadline_s = 60.0
exchange_deadline_s = 8.0

[train]
batch_tokens = {BATCH_TOKENS}
micro_batch_size = 8
lr = 0.003
warmup_steps = 2

[checkpoints]
every = 2
keep = 3

[membership]
heartbeat_s = 0.5
lease_s = 6.0
min_nodes = 3
"""


@dataclass
class LiveRun:
    root: Path
    run_dir: Path
    join_url: str
    dashboard: str  # http://127.0.0.1:PORT/
    coordinator: subprocess.Popen[str]
    nodes: dict[str, subprocess.Popen[str]] = field(default_factory=dict)

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.dashboard + path.lstrip("/"), timeout=10) as r:
            return json.loads(r.read())

    def node_id(self, name: str) -> str:
        return Identity.load_or_create(self.root / name / "identity.key").node_id

    def log(self, name: str) -> str:
        return (self.root / name / "node.log").read_text()


@pytest.fixture(scope="module")
def live_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveRun]:
    root = tmp_path_factory.mktemp("dashboard")
    (root / "corpus.txt").write_text(CORPUS)
    corpus = root / "corpus.txt"
    (root / "run.toml").write_text(micro_run_toml("dashboard-e2e", TARGET_TOKENS, corpus) + CONFIG)
    init = run_cli("coordinator", "init", str(root / "run"), "--config", str(root / "run.toml"))
    assert init.returncode == 0, init.stderr
    coordinator = subprocess.Popen(
        [sys.executable, "-m", "starling", "coordinator", "serve", str(root / "run")]
        + ["--grpc-port", "0", "--http-port", "0"],
        stdout=subprocess.PIPE,
        stderr=(root / "coordinator.log").open("w"),
        text=True,
    )
    assert coordinator.stdout is not None
    join_url = coordinator.stdout.readline().strip()
    dashboard = coordinator.stdout.readline().strip().removeprefix("dashboard ")
    run = LiveRun(root, root / "run", join_url, dashboard, coordinator)
    try:
        assert join_url.startswith("starling://"), (root / "coordinator.log").read_text()
        assert dashboard.startswith("http://127.0.0.1:"), dashboard
        for name, options in {
            "owner-a": ["--metrics-port", "0"],
            "owner-b": [],
            "client": ["--client-only"],
        }.items():
            (root / name).mkdir()
            log = (root / name / "node.log").open("w")
            run.nodes[name] = subprocess.Popen(
                [sys.executable, "-m", "starling", "node", "join", join_url]
                + ["--work-dir", str(root / name), "--device", "cpu", *options],
                stdout=log,
                stderr=log,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
                text=True,
            )
        # A few commits with their validation reports, and a checkpoint after θ₀.
        wait_for(
            lambda: (
                (s := run.get("/api/status"))["rounds_committed"] >= 3
                and s["val_loss"] is not None
                and s["latest_checkpoint"]["round"] > 0
            ),
            150,
            "3 commits, a validation report and a checkpoint",
        )
        yield run
    finally:
        for process in [*run.nodes.values(), coordinator]:
            if process.poll() is None:
                process.kill()
                process.wait(10)


def test_the_json_api_and_metrics_describe_the_live_run(live_run: LiveRun) -> None:
    status = live_run.get("/api/status")
    assert status["run"] == "dashboard-e2e" and status["join_url"] == live_run.join_url
    assert status["model"]["preset"] == "tiny" and status["model"]["layers"] == 1
    assert status["codec"] == "int4" and status["state"] in ("training", "exchanging")
    committed = status["rounds_committed"]
    assert committed >= 3 and status["round"] >= committed - 1
    assert status["target_tokens"] == TARGET_TOKENS
    assert status["progress"] == pytest.approx(status["tokens_trained"] / TARGET_TOKENS)
    assert status["tokens_per_s"] > 0 and status["eta_s"] > 0
    # A byte-level model starts near ln(257) nats per token and learns this corpus fast.
    assert 0 < status["val_loss"] < math.log(257) and 0 < status["train_loss"] < 6
    assert status["nodes"] == {
        "active": 3, "owners": 2, "client_only": 1, "catching_up": 0,
        "left": 0, "expired": 0, "banned": 0,
    }  # fmt: skip

    ids = {name: live_run.node_id(name) for name in live_run.nodes}
    peers = live_run.get("/api/peers")
    by_id = {p["node_id"]: p for p in peers["peers"]}
    assert set(by_id) == set(ids.values())
    assert by_id[ids["client"]]["role"] == "client-only"
    assert by_id[ids["owner-a"]]["role"] == by_id[ids["owner-b"]]["role"] == "owner"
    for peer in by_id.values():
        assert peer["status"] in ("active", "catching up") and peer["device"] == "cpu"
        assert peer["rounds_contributed"] >= 1 and peer["tokens_per_s"] > 0
        assert peer["bytes_sent"] > 0 and peer["bytes_received"] > 0
        assert peer["train_loss"] is not None and peer["last_seen_s"] < 10
    totals = peers["totals"]
    assert totals["active"] == 3 and totals["owners"] == 2 and totals["client_only"] == 1
    assert totals["bytes_sent"] == sum(p["bytes_sent"] for p in by_id.values())

    rounds = live_run.get("/api/rounds?limit=3")["rounds"]
    assert len(rounds) == 3
    newest = rounds[0]["round"]
    assert [r["round"] for r in rounds] == [newest, newest - 1, newest - 2]
    for r in rounds:
        # Every node did its inner steps: 3 contributors of 4 × 512 tokens, none excluded.
        assert {c["node_id"]: c["tokens"] for c in r["contributors"]} == dict.fromkeys(
            ids.values(), INNER_STEPS * BATCH_TOKENS
        )
        assert r["tokens"] == 3 * INNER_STEPS * BATCH_TOKENS and r["excluded"] == []
        assert r["codec"] == "int4" and r["duration_s"] > 0
    for r in rounds[1:]:  # the nodes' byte counts arrive just after a commit
        # int4 is about 0.53 bytes per parameter against fp32's 4: measured, ~6-8x.
        assert r["bytes"] > 0 and 3 < r["compression_ratio"] < 10, r

    # Older rounds have the fingerprint a majority of nodes reported (the newest may not yet).
    assert all(re.fullmatch("[0-9a-f]{64}", r["fingerprint"] or "") for r in rounds[1:])

    points = live_run.get("/api/loss")["points"]
    assert [p["round"] for p in points] == list(range(len(points))) and len(points) >= 3
    tokens = 0
    for point in points:
        tokens += 3 * INNER_STEPS * BATCH_TOKENS
        assert point["tokens"] == tokens  # committed tokens, cumulative
    reported = [p for p in points if p["val_loss"] is not None]
    assert reported[-1]["val_loss"] < reported[0]["val_loss"]  # it learns
    # The nodes' training loss and tokens per round (ReportProgress fields 7 and 8).
    assert all(p["train_loss"] is not None and p["train_loss"] > 0 for p in reported)
    newer = live_run.get(f"/api/loss?after={points[-2]['round']}")["points"]
    assert newer[0]["round"] == points[-1]["round"]  # only rounds after `after`

    checkpoints = live_run.get("/api/checkpoints")["checkpoints"]
    assert checkpoints[0]["round"] == 0 and checkpoints[-1]["round"] > 0
    latest = checkpoints[-1]
    with urllib.request.urlopen(live_run.dashboard + latest["url"].lstrip("/"), timeout=10) as r:
        assert r.headers["Content-Type"] == "application/octet-stream"
        assert int(r.headers["Content-Length"]) == latest["size"]
        blob = r.read()
    assert hashlib.sha256(blob).hexdigest() == latest["sha256"] and len(blob) == latest["size"]
    manifest = live_run.get(latest["manifest_url"])
    assert manifest["round"] == latest["round"] and manifest["fingerprint"] == latest["fingerprint"]

    # /metrics, parsed by prometheus-client's own parser.
    metrics = scrape(live_run.dashboard + "metrics")
    assert metrics["starling_rounds_committed_total", ()] >= committed
    assert metrics["starling_nodes", (("state", "active"),)] == 3
    assert metrics["starling_active_nodes", (("role", "client-only"),)] == 1
    assert metrics["starling_target_tokens", ()] == TARGET_TOKENS
    assert metrics["starling_checkpoints", ()] >= 2
    assert 0 < metrics["starling_validation_loss", ()] < math.log(257)
    assert metrics["starling_wire_bytes_sent_total", ()] > 0
    assert metrics["starling_round_duration_seconds", ()] > 0
    assert sum(v for (name, labels), v in metrics.items() if name == "starling_round_phase") == 1
    assert metrics["starling_http_requests_total", (("code", "200"), ("endpoint", "status"))] >= 1
    # The node's own /metrics (node/metrics.py): tokens/s, loss, bytes, phase, utilization.
    port = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", live_run.log("owner-a"))
    assert port, live_run.log("owner-a")[-2000:]
    node = scrape(f"http://127.0.0.1:{port.group(1)}/metrics")
    assert node["starling_node_tokens_per_second", ()] > 0
    assert node["starling_node_loss", ()] > 0
    assert node["starling_node_bytes_sent", ()] > 0 and node["starling_node_bytes_received", ()] > 0
    assert 0 < node["starling_node_utilization", ()] <= 1
    assert node["starling_node_diverged_rounds", ()] == 0
    assert sum(v for (name, _), v in node.items() if name == "starling_node_phase") == 1

    # `starling status` prints the same summary, from the join URL (gRPC) or the dashboard.
    for url in (live_run.join_url, live_run.dashboard):
        result = run_cli("status", url, "--json", timeout=60)
        assert result.returncode == 0, result.stderr
        summary = json.loads(result.stdout)
        assert summary["run"] == "dashboard-e2e" and summary["state"] in ("training", "exchanging")
        assert summary["model"] == status["model"] and summary["join_url"] == live_run.join_url
        assert summary["rounds_committed"] >= committed and summary["nodes"]["active"] == 3
        human = run_cli("status", url, timeout=60)
        assert human.returncode == 0, human.stderr
        for text in ("dashboard-e2e", "tiny", f"of {TARGET_TOKENS:,}", "ETA", "client-only"):
            assert text in human.stdout, human.stdout


def test_the_page_renders_the_run_and_follows_it_in_chromium(
    live_run: LiveRun, tmp_path: Path
) -> None:
    browser = Browser(tmp_path / "profile", tmp_path / "chromium.log")
    try:
        browser.viewport(1440, 900)
        browser.open(live_run.dashboard)
        browser.wait_until("document.body.dataset.refreshes >= 1", 30, "the first refresh")
        # The header.
        assert browser.evaluate("document.getElementById('run-name').textContent") == (
            "dashboard-e2e"
        )
        model = browser.evaluate("document.getElementById('run-model').textContent")
        assert "tiny" in model and "parameters" in model and "int4" in model
        trained = browser.evaluate("document.getElementById('tokens-trained').textContent")
        assert int(trained.replace(",", "")) > 0
        assert browser.evaluate(
            "parseFloat(document.getElementById('progress-bar').style.width) > 0"
        )
        assert live_run.join_url in browser.evaluate(
            "document.getElementById('join-command').textContent"
        )
        # A loss chart with a drawn validation curve of several points.
        browser.wait_until(
            "(document.querySelector('#loss-chart path.line-val')?.getAttribute('d') || '')"
            ".split('L').length >= 3",
            30,
            "a validation-loss curve of 3 points",
        )
        assert browser.evaluate("+document.querySelector('#loss-chart svg').dataset.points") >= 6
        # One row per node, the client-only one marked so.
        assert browser.evaluate("document.querySelectorAll('#peers-body tr.peer-row').length") == 3
        roles = browser.evaluate(
            "[...document.querySelectorAll('#peers-body .badge')].map(b => b.textContent)"
        )
        assert sorted(roles) == ["client-only", "owner", "owner"]

        # A new commit shows up in place: no reload (the marker survives), more rounds.
        browser.evaluate("window.__sameDocument = true")
        before = _page_round_state(browser)
        browser.wait_until(
            f"+document.getElementById('rounds-committed').textContent.replace(/,/g, '') > "
            f"{before['committed']} && +document.querySelector('#rounds-body tr.round-row')"
            f".dataset.round > {before['newest']} && "
            f"+document.querySelector('#loss-chart svg').dataset.points > {before['points']}",
            60,
            "the page to show a newly committed round",
        )
        assert browser.evaluate("window.__sameDocument === true")
        assert browser.evaluate("performance.getEntriesByType('navigation').length") == 1

        # Offline-capable: every request went to the coordinator itself (no CDN).
        origin = live_run.dashboard.rstrip("/")
        foreign = [u for u in browser.requests() if not u.startswith((origin, "data:"))]
        assert foreign == [] and len(browser.requests()) > 5
        # The loss chart against wall-clock time (x labels turn into clock times), and back.
        axis = "[...document.querySelectorAll('#loss-chart .axis text')].map(t => t.textContent)"
        browser.evaluate("document.querySelector('#loss-axis [data-x=time]').click()")
        assert any(":" in label for label in browser.evaluate(axis))
        browser.evaluate("document.querySelector('#loss-axis [data-x=tokens]').click()")
        assert not any(":" in label for label in browser.evaluate(axis))
        assert browser.errors() == []
        browser.screenshot(ARTIFACTS / "dashboard.png")

        # A phone: nothing wider than the screen (tables scroll inside their cards).
        browser.viewport(390, 844, scale=2, mobile=True)
        browser.wait_until("document.documentElement.clientWidth === 390", 10, "the phone width")
        refreshes = browser.evaluate("+document.body.dataset.refreshes")
        browser.wait_until(
            f"+document.body.dataset.refreshes > {refreshes}", 15, "a refresh at phone width"
        )
        assert browser.evaluate("document.documentElement.scrollWidth") <= 390
        assert browser.evaluate("document.querySelectorAll('#peers-body tr.peer-row').length") == 3
        browser.screenshot(ARTIFACTS / "dashboard-phone.png")
        assert browser.errors() == []
    finally:
        browser.close()


def _page_round_state(browser: Browser) -> dict[str, int]:
    return browser.evaluate(
        """({
            committed: +document.getElementById('rounds-committed').textContent.replace(/,/g, ''),
            newest: +document.querySelector('#rounds-body tr.round-row').dataset.round,
            points: +document.querySelector('#loss-chart svg').dataset.points,
        })"""
    )


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics page: (name, sorted labels) → value."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }

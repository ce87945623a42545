"""End to end, all real processes: `starling coordinator serve` and `starling node join`
on loopback, training the `tiny` preset — loss falls and fingerprints agree, a late
joiner catches up, a node killed mid-exchange does not stop the run, Ctrl-C leaves
cleanly, and the coordinator's kill -9 and restart is survived."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from starling.coordination import CoordinatorClient

from .conftest import run_cli
from .coordinator_support import micro_run_toml, wait_for

# After [run], [model] and [data] (micro_run_toml).
CONFIG = """
[round]
inner_steps = {inner_steps}
tokens = {round_tokens}
deadline_s = 120.0
exchange_deadline_s = 8.0

[outer]
overlap = {overlap}

[train]
batch_tokens = 512
micro_batch_size = 8
lr = 0.003
warmup_steps = 2
optimizer = "{optimizer}"

[checkpoints]
every = {every}
keep = 3

[membership]
heartbeat_s = 0.5
lease_s = {lease}
data_lease_s = 30.0
min_nodes = {min_nodes}
"""


class Run:
    """A coordinator process serving a fresh run, and node processes joining it."""

    def __init__(
        self,
        root: Path,
        every: int = 1,
        lease: float = 6.0,
        min_nodes: int = 2,
        overlap: bool = False,
        round_tokens: int = 0,
        extra_toml: str = "",
        inner_steps: int = 3,
        optimizer: str = "adamw",
    ):
        from .coordinator_support import CORPUS

        self.root = root
        (root / "corpus.txt").write_text(CORPUS)
        config = root / "run.toml"
        config.write_text(
            micro_run_toml("e2e", 10_000_000, root / "corpus.txt")
            + CONFIG.format(
                every=every,
                lease=lease,
                min_nodes=min_nodes,
                overlap="true" if overlap else "false",
                round_tokens=round_tokens,
                inner_steps=inner_steps,
                optimizer=optimizer,
            )
            + extra_toml
        )
        self.run_dir = root / "run"
        init = run_cli("coordinator", "init", str(self.run_dir), "--config", str(config))
        assert init.returncode == 0, init.stderr
        self.nodes: dict[str, subprocess.Popen[str]] = {}
        self.port = 0
        self.serve()

    def serve(self) -> None:
        self.coordinator = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "starling",
                "coordinator",
                "serve",
                str(self.run_dir),
                "--grpc-port",
                str(self.port),
            ],
            stdout=subprocess.PIPE,
            stderr=(self.root / "coordinator.log").open("a"),
            text=True,
            start_new_session=True,
        )
        assert self.coordinator.stdout is not None
        self.url = self.coordinator.stdout.readline().strip()
        assert self.url.startswith("starling://"), (self.root / "coordinator.log").read_text()
        self.port = int(self.url.rsplit(":", 1)[1])

    def join(
        self, name: str, *options: str, launcher: tuple[str, ...] = ("-m", "starling")
    ) -> subprocess.Popen[str]:
        work = self.root / name
        work.mkdir(exist_ok=True)
        log = (work / "node.log").open("w")
        process = subprocess.Popen(
            [
                sys.executable,
                *launcher,
                "node",
                "join",
                self.url,
                "--work-dir",
                str(work),
                "--device",
                "cpu",
                "--summary-json",
                str(work / "summary.json"),
                *options,
            ],
            stdout=log,
            stderr=log,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            text=True,
            start_new_session=True,
        )
        self.nodes[name] = process
        return process

    def log(self, name: str) -> str:
        return (self.root / name / "node.log").read_text()

    def fingerprints(self, name: str) -> dict[int, str]:
        found = list((self.root / name).glob("runs/*/fingerprints.jsonl"))
        if not found:
            return {}
        lines = found[0].read_text().splitlines()
        return {json.loads(x)["round"]: json.loads(x)["fingerprint"] for x in lines}

    def status(self) -> dict:
        with CoordinatorClient(self.url) as client:
            from starling.coordination import status_json

            return status_json(client.get_status())

    def commits(self) -> dict[int, dict]:
        """The coordinator's commit records by round, read from its database."""
        import sqlite3

        db = sqlite3.connect(f"file:{self.run_dir / 'coordinator.db'}?mode=ro", uri=True)
        try:
            rows = db.execute("SELECT round, commit_record FROM rounds").fetchall()
        finally:
            db.close()
        return {r: json.loads(record) for r, record in rows if record is not None}

    def plan(self, round_: int) -> dict:
        """The coordinator's exchange plan of round `round_`, read from its database."""
        import sqlite3

        db = sqlite3.connect(f"file:{self.run_dir / 'coordinator.db'}?mode=ro", uri=True)
        try:
            (plan,) = db.execute("SELECT plan FROM rounds WHERE round = ?", (round_,)).fetchone()
        finally:
            db.close()
        return json.loads(plan)

    def reported_tokens(self) -> dict[int, dict[str, int]]:
        """The tokens each node reported to the coordinator, by round and node id."""
        import sqlite3

        db = sqlite3.connect(f"file:{self.run_dir / 'coordinator.db'}?mode=ro", uri=True)
        try:
            rows = db.execute("SELECT round, node_id, tokens FROM round_tokens").fetchall()
        finally:
            db.close()
        reported: dict[int, dict[str, int]] = {}
        for round_, node, tokens in rows:
            reported.setdefault(round_, {})[node] = tokens
        return reported

    def committed(self) -> int:
        """Rounds committed so far."""
        commit = self.status()["last_commit"]
        return 0 if commit is None else commit["round"] + 1

    def close(self) -> None:
        for process in [*self.nodes.values(), self.coordinator]:
            if process.poll() is None:
                # Each node runs in its own session: kill its whole process group (a
                # torchrun launcher's workers too).
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)


@pytest.fixture
def e2e(tmp_path: Path):
    runs: list[Run] = []

    def make(**kwargs) -> Run:
        run = Run(tmp_path, **kwargs)
        runs.append(run)
        return run

    yield make
    for run in runs:
        run.close()


def test_the_demo_trains_and_every_node_agrees(tmp_path: Path) -> None:
    result = run_cli(
        "demo",
        "--nodes",
        "3",
        "--rounds",
        "3",
        "--inner-steps",
        "5",
        "--work-dir",
        str(tmp_path),
        "--json",
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["rounds_committed"] == 3 and summary["nodes"] == 3
    assert summary["fingerprints_agree"] is True
    assert summary["final_val_loss"] < summary["initial_val_loss"] - 0.5
    assert summary["wire_bytes_per_node"] > 0
    run_dir = Path(summary["run_dir"])
    assert (run_dir / "checkpoints" / "000003" / "state.safetensors").is_file()


def test_a_late_joiner_catches_up_and_agrees(e2e) -> None:
    # No checkpoint after θ₀: the joiner must apply missed means. It takes a few seconds
    # to start (3.5 s from spawn to its first contribution in a loaded CI run, when
    # rounds of 60 inner steps took 0.4 s and round 0's mean had left the last 8 rounds'
    # that owners keep): rounds of 150 inner steps (about a second on the micro model)
    # keep it there, and a and b run long enough to be there when it contributes.
    run = e2e(every=100, inner_steps=150)
    for name in ("a", "b"):
        run.join(name, "--max-rounds", "12")
    wait_for(lambda: run.committed() >= 1, 180, "a committed round")
    late = run.join("late", "--max-rounds", "2")
    assert late.wait(240) == 0, run.log("late")
    assert "caught up with round 0" in run.log("late")
    for name in ("a", "b"):
        assert run.nodes[name].wait(240) == 0, run.log(name)
        # A round (150 steps of 512 tokens) is more than a pass over a 16,384-token
        # shard: each node hands its shard back for a new one between rounds.
        shards = re.findall(r"leased data shard (\S+)", run.log(name))
        assert len(set(shards)) >= 3, shards
    mine, theirs = run.fingerprints("late"), run.fingerprints("a")
    assert_agree(run.fingerprints("b"), theirs)
    assert len(mine) >= 3  # rounds caught up on, then contributed to
    # a and b may stop one round before the late node does: that last round has
    # no other witness, but every round the others hold must agree.
    shared = [round_ for round_ in mine if round_ in theirs]
    assert len(shared) >= 3, (mine, theirs)
    for round_ in shared:
        assert theirs[round_] == mine[round_], f"round {round_}"
    assert all(round_ > max(theirs) for round_ in mine if round_ not in theirs)


def test_a_node_killed_mid_exchange_does_not_stop_the_run(e2e) -> None:
    run = e2e(lease=3.0)
    run.join("a", "--metrics-port", "0")
    for name in ("b", "victim"):
        run.join(name)
    wait_for(lambda: run.committed() >= 1, 180, "a first round")
    wait_for(lambda: run.status()["phase"] == "exchange", 120, "an exchange")
    run.nodes["victim"].send_signal(signal.SIGKILL)
    killed_at = run.committed()
    wait_for(lambda: run.committed() >= killed_at + 3, 240, "3 more rounds")
    status = run.status()
    active = {p["node_id"] for p in status["peers"]}
    assert len(active) == 2  # the victim expired
    assert len(status["last_commit"]["contributors"]) == 2
    assert_agree(run.fingerprints("a"), run.fingerprints("b"))
    # The node's Prometheus metrics, parsed by prometheus-client's own parser.
    # (a node's figures trail the coordinator's commit by its apply)
    wait_for(
        lambda: scrape_metrics(run.log("a"))["starling_node_rounds_contributed"] >= 3,
        60,
        "node a's metrics to show 3 contributed rounds",
    )
    metrics = scrape_metrics(run.log("a"))
    assert metrics["starling_node_bytes_sent"] > 0
    assert metrics["starling_node_round"] >= killed_at
    assert 0 < metrics["starling_node_utilization"] <= 1
    assert 0 < metrics["starling_node_val_loss"] < 10


def scrape_metrics(log: str) -> dict[str, float]:
    import re
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    port = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", log)
    assert port, log[-2000:]
    url = f"http://127.0.0.1:{port.group(1)}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.labels:
                values[sample.name] = sample.value
    return values


def assert_agree(first: dict[int, str], second: dict[int, str]) -> None:
    """Two nodes' fingerprints agree on every round both applied (one may be a round
    ahead of the other when read)."""
    common = set(first) & set(second)
    assert len(common) >= 2
    for round_ in common:
        assert first[round_] == second[round_], f"round {round_}"


def test_ctrl_c_leaves_cleanly_and_a_coordinator_restart_is_survived(e2e) -> None:
    run = e2e()
    for name in ("a", "b"):
        run.join(name)
    wait_for(lambda: run.committed() >= 2, 180, "2 rounds")
    # kill -9 the coordinator mid-run and restart it on the same port: nodes carry on.
    run.coordinator.send_signal(signal.SIGKILL)
    run.coordinator.wait(10)
    run.serve()
    after_restart = run.committed()
    wait_for(lambda: run.committed() >= after_restart + 2, 240, "2 rounds after the restart")
    assert_agree(run.fingerprints("a"), run.fingerprints("b"))
    # Ctrl-C: the node finishes its step, leaves and exits 0; nothing committed is lost.
    committed = run.committed()
    run.nodes["a"].send_signal(signal.SIGINT)
    assert run.nodes["a"].wait(120) == 0, run.log("a")
    assert "left the run" in run.log("a")
    summary = json.loads((run.root / "a" / "summary.json").read_text())
    assert summary["rounds_contributed"] >= 3
    status = run.status()
    assert all(p["node_id"] != summary["node_id"] for p in status["peers"])
    assert run.committed() >= committed


@pytest.mark.parametrize(
    "args, message",
    [
        (["node", "join", "http://example.com"], "must start with starling://"),
        (["node", "join", "starling://example.com:7443"], "no certificate fingerprint"),
        (["node", "join", "starling://127.0.0.1:1", "--max-rounds", "0"], "--max-rounds"),
        (["node", "join", "starling://127.0.0.1:1", "--upload-mbps", "-3"], "--upload-mbps"),
        (["demo", "--nodes", "0"], "at least 1"),
        (["demo", "--device", "cpu,tpu"], "unknown device 'tpu'"),
        (["demo", "--device", "cpu,mps"], "MPS backend is not available"),
    ],
)
def test_node_and_demo_bad_input_is_one_error_line(args: list[str], message: str) -> None:
    result = run_cli(*args, timeout=60)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_overlapped_rounds_train_while_the_previous_round_exchanges(e2e) -> None:
    # 40 inner steps a round, each followed by a rest of 9 times its length (a tenth of
    # the node's time trains): a round lasts seconds, the exchange on loopback a tenth
    # of one, so each node folds round r's mean in early in round r+1.
    run = e2e(overlap=True, inner_steps=40)
    for name in ("a", "b"):
        run.join(name, "--max-rounds", "4", "--compute-share", "0.1")
    for name in ("a", "b"):
        assert run.nodes[name].wait(240) == 0, run.log(name)
    log = (run.root / "coordinator.log").read_text()
    # Round r+1 opens when round r closes, before r commits.
    assert log.index("round 1 open") < log.index("round 0 committed")
    first, second = run.fingerprints("a"), run.fingerprints("b")
    assert sorted(first) == [0, 1, 2, 3]
    assert_agree(first, second)
    for name in ("a", "b"):
        assert json.loads((run.root / name / "summary.json").read_text())["rounds_contributed"] == 4
        (timings,) = (run.root / name).glob("runs/*/rounds.jsonl")
        rounds = [json.loads(line) for line in timings.read_text().splitlines()]
        folded = {r["round"]: r.get("folded_at_step") for r in rounds}
        # Round 0 had no mean to wait for; the others took theirs between two steps.
        assert folded[0] is None, folded
        assert any(step is not None and step < 40 for step in folded.values()), folded


def test_a_slow_node_trains_fewer_steps_and_weighs_by_its_tokens(e2e) -> None:
    # Rounds close at a global token budget (640 steps of 512 tokens, a few seconds): a
    # node that trains a fifth of the time does fewer inner steps, and the mean weighs
    # it by its tokens.
    run = e2e(min_nodes=3, round_tokens=640 * 512)
    for name in ("fast1", "fast2"):
        run.join(name, "--max-rounds", "4")
    run.join("slow", "--compute-share", "0.2")
    for name in ("fast1", "fast2"):
        assert run.nodes[name].wait(240) == 0, run.log(name)
    commits = run.commits()
    ids = {
        name: json.loads((run.root / name / "summary.json").read_text())["node_id"]
        for name in ("fast1", "fast2")
    }
    totals = {"slow": 0, "fast1": 0, "fast2": 0}
    shared = 0
    for round_, commit in commits.items():
        tokens = commit["contributors"]
        assert commit["tokens"] == sum(tokens.values())
        # Each node's headers declare what the coordinator counted for it, never more
        # (the steps it took after the round closed reached no report).
        assert not [why for why in commit["excluded"].values() if "declares" in why], commit
        # Round 0 is a warm-up (nodes start training as they finish loading); a round one
        # of them missed (catching up) says nothing about speed.
        if round_ == 0 or len(tokens) < 3:
            continue
        shared += 1
        for node, count in tokens.items():
            name = next((n for n, i in ids.items() if i == node), "slow")
            totals[name] += count
    assert shared >= 2, commits
    # Over the rounds all three trained in, the slow node did far fewer inner steps.
    assert totals["slow"] < 0.6 * min(totals["fast1"], totals["fast2"]), (totals, commits)
    assert_agree(run.fingerprints("slow"), run.fingerprints("fast1"))
    assert_agree(run.fingerprints("fast2"), run.fingerprints("fast1"))


FAULTY_NODE = Path(__file__).with_name("faulty_node.py")


def test_a_node_whose_state_disagrees_resyncs_and_agrees_again(e2e) -> None:
    run = e2e(min_nodes=3)
    for name in ("a", "b"):
        run.join(name, "--max-rounds", "6")
    # Its global state is corrupted right after it applies round 1 (as a flipped bit in
    # memory would): its fingerprint for round 1 disagrees with the agreed one.
    run.join("faulty", "--max-rounds", "5", launcher=(str(FAULTY_NODE), "2"))
    assert run.nodes["faulty"].wait(300) == 0, run.log("faulty")
    assert "resync" in run.log("faulty")
    for name in ("a", "b"):
        assert run.nodes[name].wait(300) == 0, run.log(name)
    honest, faulty = run.fingerprints("a"), run.fingerprints("faulty")
    # The coordinator saw the corruption: the honest nodes' reports for round 1 agree.
    import sqlite3

    db = sqlite3.connect(f"file:{run.run_dir / 'coordinator.db'}?mode=ro", uri=True)
    reports = dict(db.execute("SELECT node_id, fingerprint FROM fingerprints WHERE round = 1"))
    db.close()
    ids = {n: json.loads((run.root / n / "summary.json").read_text())["node_id"] for n in "ab"}
    assert reports[ids["a"]] == reports[ids["b"]] == honest[1]
    # Its report of round 1 was the corrupted state; which record keeps it depends on who
    # reported first (CI saw both). If the others had agreed already, the coordinator
    # refused it at once: the node did not log it (it took a peer's state and logged
    # that), and the coordinator's row keeps it. If it came first, the node logged it,
    # and a resync from the checkpoint before round 1 may apply round 1 again and report
    # again, which replaces the row.
    lines = next((run.root / "faulty").glob("runs/*/fingerprints.jsonl")).read_text()
    logged = [json.loads(line) for line in lines.splitlines()]  # in the order reported
    first_of_round_1 = next((e["fingerprint"] for e in logged if e["round"] == 1), None)
    faulty_id = json.loads((run.root / "faulty" / "summary.json").read_text())["node_id"]
    corrupted = {reports[faulty_id], first_of_round_1} - {honest[1], None}
    assert len(corrupted) == 1, (reports[faulty_id], first_of_round_1, honest[1])
    # It learns in the reply to its report of round 1, by heartbeat, or at the latest in
    # the reply to its report of round 2 (which carries round 1's agreed fingerprint;
    # before it had that, CI saw the flag come as late as round 4 or not within 5 rounds,
    # when its reports came first); it takes the agreed state (a checkpoint or a peer's,
    # then the missed means), and from there on agrees again.
    import re

    taken = [int(r) for r in re.findall(r"took the global state at round (\d+)", run.log("faulty"))]
    assert taken and taken[-1] <= 4, run.log("faulty")
    later = [r for r in faulty if r >= taken[-1]]
    assert later, faulty
    for round_ in later:
        assert faulty[round_] == honest[round_], f"round {round_}"


DIVERGING_NODE = Path(__file__).with_name("diverging_node.py")


@pytest.mark.parametrize("overlap", [False, True])
def test_a_node_whose_training_diverges_sits_the_round_out_and_recovers(e2e, overlap: bool) -> None:
    run = e2e(overlap=overlap)
    run.join("a")  # stopped below, once the diverging node has its rounds
    # NaN weights and moments after its 5th inner step (3 a round): in its second round.
    run.join("diverging", "--max-rounds", "4", launcher=(str(DIVERGING_NODE), "5"))
    assert run.nodes["diverging"].wait(300) == 0, run.log("diverging")
    run.nodes["a"].send_signal(signal.SIGINT)
    assert run.nodes["a"].wait(120) == 0, run.log("a")
    log = run.log("diverging")
    assert "training diverged (NaN or Inf in the weights): not contributing" in log, log
    summary = json.loads((run.root / "diverging" / "summary.json").read_text())
    # One round sat out; the fresh optimizer kept the NaN moments from the rounds after.
    assert summary["diverged_rounds"] == 1 and summary["rounds_contributed"] == 4, summary
    # The round it sat out committed without it, from the other node's contribution: it
    # withdrew, so the owners did not wait for it until the exchange deadline.
    sat_out = int(re.findall(r"round (\d+): training diverged", log)[0])
    commit = run.commits()[sat_out]
    assert summary["node_id"] not in commit["contributors"], commit
    assert len(commit["contributors"]) == 1, commit
    why = commit["excluded"][summary["node_id"]]  # "shard s: " and the owner's reason
    assert why.endswith(": withdrew: training diverged (NaN or Inf in the weights)"), commit
    assert commit["committed"] < run.plan(sat_out)["deadline"], commit
    # It still took that round's mean itself (no catch-up from the others' means).
    assert "caught up" not in log, log
    assert_agree(run.fingerprints("a"), run.fingerprints("diverging"))


def test_a_torchrun_node_whose_training_diverges_restarts_every_rank(e2e) -> None:
    # Both ranks' weight shards and moments turn NaN after their 5th inner step (in round
    # 1): rank 0 sees it in the gathered update, sits the round out, and restarts every
    # rank's optimizer (the RESET command) before loading θ; without that, the NaN
    # moments of rank 1's shard would diverge again the next round.
    run = e2e()
    run.join("a")  # stopped below
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")
    run.join("diverging", "--max-rounds", "3", launcher=(*torchrun, str(DIVERGING_NODE), "5"))
    assert run.nodes["diverging"].wait(300) == 0, run.log("diverging")
    run.nodes["a"].send_signal(signal.SIGINT)
    assert run.nodes["a"].wait(120) == 0, run.log("a")
    summary = json.loads((run.root / "diverging" / "summary.json").read_text())
    assert summary["diverged_rounds"] == 1 and summary["rounds_contributed"] == 3, summary
    assert_agree(run.fingerprints("a"), run.fingerprints("diverging"))


@pytest.mark.parametrize("overlap, optimizer", [(False, "adamw"), (True, "adamw"), (False, "muon")])
def test_a_multi_process_node_trains_fsdp_shards_under_torchrun(
    e2e, overlap: bool, optimizer: str
) -> None:
    # A two-rank node (torchrun, FSDP with gloo on this CPU) beside a one-process node:
    # only its rank 0 talks to the network; each rank trains its own micro-batches, so
    # it brings twice the tokens per inner step, and every state agrees. With overlap
    # its exchange worker sets the AdamW's batch while the training thread drives the
    # ranks: the ranks must hear it between two steps, never inside one. With Muon each
    # rank gathers the hidden matrices whole to orthogonalize them.
    run = e2e(overlap=overlap, optimizer=optimizer)
    run.join("single", "--max-rounds", "3")
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")
    run.join("fsdp", "--max-rounds", "3", launcher=(*torchrun, "-m", "starling"))
    for name in ("single", "fsdp"):
        assert run.nodes[name].wait(300) == 0, run.log(name)
    summaries = {
        name: json.loads((run.root / name / "summary.json").read_text())
        for name in ("single", "fsdp")
    }
    ids = {name: summary["node_id"] for name, summary in summaries.items()}
    commits = run.commits()
    for round_ in range(3):
        tokens = commits[round_]["contributors"]
        assert tokens == {ids["single"]: 3 * 512, ids["fsdp"]: 2 * 3 * 512}
    # The run's default: a node's AdamW assumes the batch of the round's contributors
    # (two here), a sharded node's too (its ranks' halves reduced by FSDP).
    for summary in summaries.values():
        assert summary["moment_batches"] == 2.0 and summary["optimizer"] == optimizer
    single, fsdp = run.fingerprints("single"), run.fingerprints("fsdp")
    assert sorted(fsdp) == [0, 1, 2]
    assert_agree(single, fsdp)


def test_on_a_terminal_the_node_shows_a_live_view(e2e) -> None:
    import pty
    import re
    import select

    run = e2e()
    run.join("plain", "--max-rounds", "2")
    # The node's stderr is a terminal (a pseudo-terminal this test reads): rich's live
    # view instead of log lines.
    leader, follower = pty.openpty()
    command = [sys.executable, "-m", "starling", "node", "join", run.url, "--device", "cpu"]
    command += ["--work-dir", str(run.root / "tty"), "--max-rounds", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TERM": "xterm", "COLUMNS": "120"}
    process = subprocess.Popen(
        command,
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env=env,
        start_new_session=True,
    )
    os.close(follower)
    run.nodes["tty"] = process  # type: ignore[assignment]
    screen = b""
    deadline = time.monotonic() + 240
    while process.poll() is None and time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 1.0)
        if ready:
            try:
                screen += os.read(leader, 65536)
            except OSError:  # the terminal closed: the process is gone
                break
    assert process.wait(60) == 0
    os.close(leader)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.decode(errors="replace"))
    for label in ("round", "inner steps", "tokens/s", "traffic", "peers", "Mbit/s"):
        assert label in text, text[-3000:]
    assert "█" in text  # the inner-step progress bar
    assert "rounds contributed 2" in text
    assert "left after 2 rounds" in text

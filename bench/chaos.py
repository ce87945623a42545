"""Chaos benchmark: a real run (coordinator and node processes on loopback) with nodes
killed -9 at random points and/or poisoned nodes, against the same run without faults.

    python bench/chaos.py --nodes 6 --kill 2 --rounds 10 --json
    python bench/chaos.py --nodes 8 --poison sign_flip --direction on --rounds 12 --json
    python bench/chaos.py --nodes 6 --poison frame --rounds 4 --json   # a lying owner
    python bench/chaos.py --nodes 6 --poison wrong_mean --rounds 4 --json   # another
    python bench/chaos.py --nodes 6 --poison omit --rounds 8 --json   # a censoring one
    python bench/chaos.py --nodes 6 --poison misreport --rounds 4 --json   # a false hash
    python bench/chaos.py --nodes 6 --poison withhold --rounds 8 --json   # and no evidence
    python bench/chaos.py --nodes 8 --poison scale --defences off --json   # control
    python bench/chaos.py --nodes 6 --poison diverge --rounds 10 --json   # a fault: withdraws

Every node runs through bench/poisoned_node.py (honest ones with kind "none"), which
writes each payload it pushes and each mean it gathers; from those the bench checks
every committed mean against the token-weighted mean of exactly the contributions its
commit lists. Poisoned runs set ban_after_offences = 0 so that the poisoned nodes stay
in and every round is a trial (tests/test_poisoning.py covers the ban).

Prints one JSON object: rounds_planned, rounds_committed, max_round_s (the longest
exchange phase, from round close to commit), deadline_s, contributions_excluded (reason
→ count), false_exclusions (honest contributions rejected as poisoned) out of
honest_contributions (false_positive_rate), honest_excluded (honest contributions left
out for any reason, faults included), demoted_rounds (rounds a reducer owned no shard
for losing alone contributions other reducers received: poisoned or honest),
poisoned_contributions / poisoned_rejected / detection_rate (counted in rounds with at
least 3 honest contributions: fewer cannot be screened), poisoned_pushes (the owners'
answers to each stale, replayed, copied or framing message: those refused on arrival
never show in a commit), mean_statuses (how each verified shard's mean hash was settled:
verified, recomputed, unverified, void), poisoned_banned (poisoned nodes the coordinator
banned), wire_bytes_per_round and node_bytes_sent_per_round /
node_bytes_received_per_round, final_val_loss (the honest nodes' loss after the last
planned round, or the last before it), baseline_val_loss, loss_ratio, and the
two runs' mean losses over the same rounds before the nodes finish (compared_rounds,
val_loss_same_rounds, baseline_val_loss_same_rounds, loss_ratio_same_rounds),
mean_exact, mean_max_abs_err (over the means the honest nodes applied), wall_s. With
--kill-coordinator: coordinator_restarts (each: state_identical, restart_s from the kill
until the new coordinator serves, reconnect_s from the kill until every running node was
heard from, reconnect_after_serving_s), max_reconnect_s, max_reconnect_after_serving_s.
`--model tiny` runs the `tiny` preset's width and depth instead of the micro model's.
`--optimizer muon` trains the nodes with Muon on the hidden matrices ([train] optimizer).
`--defences off` turns the screen, the second owner per shard ([defences] verify_means)
and the demotion of reducers that lose contributions (demote_reducers) off: the control
that shows the damage.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from poisoned_node import KINDS  # bench/, beside this script
from safetensors.torch import load_file

from starling.codecs import make_codec, mean_codec
from starling.coordination import JoinUrl
from starling.exchange.owner import weighted_mean_f64
from starling.identity import Identity
from starling.train import OPTIMIZERS, TrainConfig

HERE = Path(__file__).resolve().parent
NODE = HERE / "poisoned_node.py"
BATCH_TOKENS = 1024
# The inner AdamW peak lr every run here used (its figures in docs/benchmarks.md were
# measured at it); --lr measures the defences at another.
DEFAULT_LR = 3e-3
JOINER_SETTLE_S = 60.0  # after the churn, how long joiners still running get to enter a commit
MIN_HONEST = 3  # honest contributions a round needs for its poisoned ones to count
POISONS = tuple(k for k in KINDS if k != "none")
# [model] for --model: "micro" (the default: 2 layers of width 64, 64-token sequences,
# so that 8 nodes and a coordinator share a 2-core CPU) or the `tiny` preset's width and
# depth (4 layers of width 96), with the same 64-token sequences (the batch geometry).
MODELS = {
    "micro": "\n".join(
        ['preset = "tiny"', "dim = 64", "n_layers = 2", "n_heads = 4", "n_kv_heads = 4"]
        + ["max_seq_len = 64"]
    ),
    "tiny": 'preset = "tiny"\nmax_seq_len = 64',
}

CONFIG = """
[run]
name = "chaos"
seed = {seed}
target_tokens = 1000000000

[model]
{model}

[data]
source = "embedded"
tokenizer = "bytes"
shard_tokens = 65536

[round]
# A token budget per round: when nodes die, the survivors train longer to reach it.
tokens = {round_tokens}
inner_steps = {inner_steps}
deadline_s = 120.0
exchange_deadline_s = {deadline_s}

[outer]
codec = "{codec}"

[train]
batch_tokens = {batch_tokens}
micro_batch_size = 16
lr = {lr}
warmup_steps = 5
optimizer = "{optimizer}"
{beta2}
{moment_batches}
[checkpoints]
# Every round: a node that falls behind after the others left resyncs from the latest
# checkpoint (the means of rounds whose owners left are gone).
every = 1

[membership]
heartbeat_s = 0.5
lease_s = 6.0
data_lease_s = 30.0
min_nodes = {nodes}

[defences]
screen = {screen}
screen_direction = {direction}
verify_means = {screen}
demote_reducers = {screen}
ban_after_offences = 0
requests_per_s = {requests_per_s}
"""


class Scenario:
    """One run: a coordinator process and node processes under `root`."""

    def __init__(self, root: Path, args: argparse.Namespace, faults: bool) -> None:
        self.root = root
        self.args = args
        self.started = time.monotonic()
        root.mkdir(parents=True)
        config = root / "run.toml"
        config.write_text(
            CONFIG.format(
                seed=args.seed,
                model=MODELS[getattr(args, "model", "micro")],
                inner_steps=args.inner_steps,
                round_tokens=(
                    args.nodes * args.inner_steps * BATCH_TOKENS
                    if getattr(args, "round_tokens", None) is None
                    else args.round_tokens
                ),
                deadline_s=args.deadline_s,
                codec=args.codec,
                nodes=args.nodes,
                batch_tokens=BATCH_TOKENS,
                screen="true" if args.defences == "on" else "false",
                # On by default, as in runs (see [defences] in starling.runconfig): only
                # the direction check catches sign_flip.
                direction="true"
                if args.defences == "on" and getattr(args, "direction", "on") == "on"
                else "false",
                requests_per_s=getattr(args, "requests_per_s", 50.0),
                # The inner AdamW's β2: the run's default (TrainConfig) unless given.
                beta2=f"beta2 = {args.beta2}" if getattr(args, "beta2", None) else "",
                # Each node's AdamW assumes a batch this many times its step's (1:
                # plain AdamW; unset: the run default, the round's contributors).
                moment_batches=f"moment_batches = {float(args.moment_batches)}"
                if getattr(args, "moment_batches", None)
                else "",
                lr=getattr(args, "lr", DEFAULT_LR),
                optimizer=getattr(args, "optimizer", TrainConfig.optimizer),
            )
        )
        self.run_dir = root / "run"
        starling = [sys.executable, "-m", "starling"]
        init = subprocess.run(
            [*starling, "coordinator", "init", str(self.run_dir), "--config", str(config)],
            capture_output=True,
            text=True,
        )
        if init.returncode != 0:
            raise SystemExit(f"coordinator init failed: {init.stderr[-2000:]}")
        self.coordinator = self._serve(0)
        assert self.coordinator.stdout is not None
        self.url = self.coordinator.stdout.readline().strip()
        if not self.url.startswith("starling://"):
            raise SystemExit(f"coordinator did not start: {(root / 'coordinator.log').read_text()}")
        self.port = JoinUrl.parse(self.url).port
        self.poisoned = set(range(args.poisoned)) if faults and args.poison else set()
        self.nodes: dict[int, subprocess.Popen[str]] = {}
        # Churn runs until it ends, whatever the rounds.
        max_rounds = 1_000_000 if faults and getattr(args, "churn_minutes", 0) else None
        for index in range(args.nodes):
            kind = args.poison if index in self.poisoned else "none"
            self.nodes[index] = self._join(index, kind, max_rounds)

    def _serve(self, port: int) -> subprocess.Popen[str]:
        starling = [sys.executable, "-m", "starling"]
        return subprocess.Popen(
            [*starling, "coordinator", "serve", str(self.run_dir), "--grpc-port", str(port)],
            stdout=subprocess.PIPE,
            stderr=(self.root / "coordinator.log").open("a"),
            text=True,
            start_new_session=True,
        )

    def kill_coordinator(self, times: int, rng: random.Random) -> list[dict[str, Any]]:
        """Kills the coordinator -9 `times` times, each after a random round and a random
        part of a round, and restarts it on the same port at once. Each time: whether
        everything committed before the kill (membership, rounds, commit records,
        checkpoint hashes) reads the same after the restart, and how long until every
        node still running was heard from again."""
        restarts = []
        targets = sorted(rng.randint(1, max(1, self.args.rounds - 3)) for _ in range(times))
        for target in targets:
            wait_for_commits(self, target, 600)
            time.sleep(rng.uniform(0, 1.0))
            os.killpg(self.coordinator.pid, signal.SIGKILL)
            self.coordinator.wait(10)
            before = self.snapshot()
            killed_at = time.time()
            self.coordinator = self._serve(self.port)
            assert self.coordinator.stdout is not None
            if not self.coordinator.stdout.readline().startswith("starling://"):
                raise SystemExit("the coordinator did not restart")
            # Serving again: most of a restart on this shared CPU is the new process
            # importing torch while the nodes train (~1.5 s on an idle machine).
            serving_s = time.time() - killed_at
            after = self.snapshot()
            reconnect_s = self._reconnect_s(killed_at, before["active"])
            restarts.append(
                {
                    "after_commits": len(before["commits"]),
                    "state_identical": _same_committed(before, after),
                    "restart_s": round(serving_s, 2),
                    "reconnect_s": reconnect_s,
                    # The server answers just before it prints its URL: a node heard
                    # from by then reconnected at once (0).
                    "reconnect_after_serving_s": (
                        None if reconnect_s is None else max(0.0, round(reconnect_s - serving_s, 2))
                    ),
                }
            )
        return restarts

    def snapshot(self) -> dict[str, Any]:
        rows = self.db("SELECT round, commit_record FROM rounds WHERE commit_record IS NOT NULL")
        return {
            "active": {n for (n,) in self.db("SELECT node_id FROM nodes WHERE state = 'active'")},
            "members": dict(self.db("SELECT node_id, public_key FROM nodes")),
            "commits": dict(rows),
            "checkpoints": dict(self.db("SELECT round, sha256 FROM checkpoints")),
            "round": self.db("SELECT max(round) FROM rounds")[0][0],
        }

    def _reconnect_s(self, killed_at: float, active: set[str]) -> float | None:
        """Seconds from the kill until every node that was active and is still running
        has made a request of the new coordinator (its last_seen moves past the kill)."""
        running = {i for i, p in self.nodes.items() if p.poll() is None}
        ids = self.node_ids()
        waiting = {ids[i] for i in running if i in ids} & active
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            seen = dict(self.db("SELECT node_id, last_seen FROM nodes"))
            if all(seen.get(n, 0) > killed_at for n in waiting):
                return round(max((seen[n] for n in waiting), default=killed_at) - killed_at, 2)
            time.sleep(0.1)
        return None

    def churn(self, minutes: float, every_s: float, rng: random.Random) -> dict[str, Any]:
        """For `minutes`, every ~`every_s` seconds (0.5 to 1.5 of it, at random) either
        starts a new honest node or kills -9 a running one (never below two). Returns the
        longest time without a commit while churning, and the coordinator's memory."""
        # The baseline is the coordinator once warm: past the third commit it has stored
        # a checkpoint (every round here) and opened its own peer service, which leave
        # their buffers with the allocator (+17 MB over the first seconds). Growth under
        # churn is counted from there; the minute-by-minute samples show whether it
        # levels off (a 10-minute run: +4% by the second minute, then flat).
        wait_for_commits(self, 3, 600)
        rss_start = rss_bytes(self.coordinator.pid)
        started = time.time()
        end = time.monotonic() + minutes * 60
        events: Counter[str] = Counter()
        rss_by_minute: list[float] = []  # MB: growth that levels off is not a leak
        while time.monotonic() < end:
            time.sleep(rng.uniform(0.5, 1.5) * every_s)
            alive = [i for i, p in self.nodes.items() if p.poll() is None]
            if len(alive) > 2 and (rng.random() < 0.5 or len(alive) >= 2 * self.args.nodes):
                victim = rng.choice(alive)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.nodes[victim].pid, signal.SIGKILL)
                events["killed"] += 1
            else:
                index = max(self.nodes) + 1
                self.nodes[index] = self._join(index, "none", max_rounds=1_000_000)
                events["started"] += 1
            minute = int((time.time() - started) // 60)
            if minute >= len(rss_by_minute):  # the first sample of each minute
                rss_by_minute.append(round(rss_bytes(self.coordinator.pid) / 2**20, 1))
        ended = time.time()
        rss_end = rss_bytes(self.coordinator.pid)
        commits = sorted(
            json.loads(c)["committed"]
            for (c,) in self.db("SELECT commit_record FROM rounds WHERE commit_record IS NOT NULL")
        )
        joiners_started, joiners_contributed = self._joiners_contributed(JOINER_SETTLE_S)
        inside = [started] + [c for c in commits if started <= c <= ended] + [ended]
        gaps = [b - a for a, b in zip(inside, inside[1:], strict=False)]
        return {
            "churn_minutes": minutes,
            "churn_events": dict(events),
            "churn_rounds_committed": len(inside) - 2,
            "churn_joiners_started": joiners_started,
            "churn_joiners_contributed": joiners_contributed,
            "churn_max_gap_s": round(max(gaps), 2),
            "coordinator_rss_start_mb": round(rss_start / 2**20, 1),
            "coordinator_rss_end_mb": round(rss_end / 2**20, 1),
            "coordinator_rss_growth": round(rss_end / rss_start - 1, 4),
            "coordinator_rss_mb_by_minute": rss_by_minute,
        }

    def _joiners_contributed(self, settle_s: float) -> tuple[int, int]:
        """(joiners started, joiners that made it into a commit). A joiner that cannot
        start (as when the coordinator refused round 0 past round 8) never shows. One
        started in the churn's last seconds is still importing torch when it ends (about
        4 s to its first round here, several times that on a loaded CI machine), so the
        count waits up to `settle_s`, with no more churn, for every joiner still running
        to enter a commit."""
        first = self.args.nodes  # indices below this are the nodes the run started with
        deadline = time.monotonic() + settle_s
        while True:
            ids = self.node_ids()
            contributed: set[str] = set()
            for (c,) in self.db("SELECT commit_record FROM rounds WHERE commit_record IS NOT NULL"):
                contributed |= set(json.loads(c)["contributors"])
            running = {i for i, p in self.nodes.items() if i >= first and p.poll() is None}
            waiting = [i for i in running if ids.get(i) not in contributed]
            if not waiting or time.monotonic() > deadline:
                joiners = {ids[i] for i in self.nodes if i >= first and i in ids}
                return len(self.nodes) - first, len(joiners & contributed)
            time.sleep(0.5)

    def _join(self, index: int, kind: str, max_rounds: int | None = None) -> subprocess.Popen[str]:
        work = self.root / f"node{index}"
        work.mkdir()
        log = (work / "node.log").open("w")
        return subprocess.Popen(
            [
                sys.executable,
                str(NODE),
                kind,
                "node",
                "join",
                self.url,
                "--work-dir",
                str(work),
                "--device",
                "cpu",
                "--max-rounds",
                str(self.args.rounds if max_rounds is None else max_rounds),
                "--summary-json",
                str(work / "summary.json"),
            ],
            stdout=log,
            stderr=log,
            env={
                **os.environ,
                "OMP_NUM_THREADS": "1",
                "STARLING_CHAOS_DUMP": str(self.root / "dump"),
            },
            text=True,
            start_new_session=True,
        )

    def db(self, query: str, *params: Any) -> list[tuple]:
        path = self.run_dir / "coordinator.db"
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        try:
            return db.execute(query, params).fetchall()
        finally:
            db.close()

    def committed(self) -> int:
        rows = self.db("SELECT count(*) FROM rounds WHERE commit_record IS NOT NULL")
        return int(rows[0][0])

    def kill_at_random(self, victims: list[int], rng: random.Random) -> list[dict]:
        """Kills each victim with SIGKILL once a random round has committed, after a
        random part of a round's duration: before, during or after its push, while it
        owns a shard, or around a commit."""
        kills = []
        targets = sorted((rng.randint(1, max(1, self.args.rounds - 3)), v) for v in victims)
        round_s = None
        for target, victim in targets:
            start = time.monotonic()
            while self.committed() < target:
                if time.monotonic() - start > 600:
                    return kills
                time.sleep(0.05)
            if round_s is None:
                round_s = self.round_s()
            time.sleep(rng.uniform(0, round_s))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.nodes[victim].pid, signal.SIGKILL)
            kills.append({"node": victim, "after_commits": self.committed()})
        return kills

    def round_s(self) -> float:
        """The mean time between commits so far (not counting the nodes' start-up,
        which can take longer than many rounds); 1 s before two commits."""
        times = sorted(
            json.loads(c)["committed"]
            for (c,) in self.db("SELECT commit_record FROM rounds WHERE commit_record IS NOT NULL")
        )
        return (times[-1] - times[0]) / (len(times) - 1) if len(times) >= 2 else 1.0

    def wait(self, timeout: float) -> None:
        """Until the honest nodes finish their rounds; then the poisoned ones are
        stopped (their rejected rounds do not count toward --max-rounds, so they would
        go on alone, in rounds too small to screen)."""
        deadline = time.monotonic() + timeout
        for index, process in self.nodes.items():
            if index not in self.poisoned:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(max(1.0, deadline - time.monotonic()))
        for index in self.poisoned:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.nodes[index].pid, signal.SIGKILL)

    def close(self) -> None:
        for process in [*self.nodes.values(), self.coordinator]:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)

    def node_ids(self) -> dict[int, str]:
        """Node index → node id, from each node's identity key (killed ones too)."""
        keys = {i: self.root / f"node{i}" / "identity.key" for i in self.nodes}
        return {i: Identity.load_or_create(k).node_id for i, k in keys.items() if k.is_file()}


def _same_committed(before: dict[str, Any], after: dict[str, Any]) -> bool:
    """Everything committed before a kill reads the same after the restart (later
    rounds may have committed meanwhile)."""
    kept = before["checkpoints"]  # old ones may be pruned meanwhile; the newest is kept
    return (
        before["members"].items() <= after["members"].items()
        and before["commits"].items() <= after["commits"].items()
        and all(after["checkpoints"].get(r, h) == h for r, h in kept.items())
        and (not kept or max(kept) in after["checkpoints"])
        and after["round"] >= before["round"]
    )


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def wait_for_commits(scenario: Scenario, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while scenario.committed() < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"fewer than {count} rounds committed within {timeout} s")
        if scenario.coordinator.poll() is not None:
            raise SystemExit("the coordinator died")
        time.sleep(0.1)


def measure(scenario: Scenario) -> dict[str, Any]:
    rows = scenario.db("SELECT round, plan, commit_record FROM rounds ORDER BY round")
    commits = [(r, json.loads(p), json.loads(c)) for r, p, c in rows if c is not None]
    ids = scenario.node_ids()
    poisoned_ids = {ids[i] for i in scenario.poisoned if i in ids}
    excluded: Counter[str] = Counter()
    false_exclusions = poisoned_total = poisoned_rejected = honest_total = honest_out = 0
    demoted: Counter[str] = Counter()  # rounds a reducer was kept from reducing, by kind
    longest = 0.0
    for _, plan, commit in commits:
        for node_id in plan.get("demoted", {}):
            demoted["poisoned" if node_id in poisoned_ids else "honest"] += 1
        exchange_opened = plan["deadline"] - scenario.args.deadline_s
        longest = max(longest, commit["committed"] - exchange_opened)
        participants = {p["node_id"] for p in plan["participants"]}
        honest = participants - poisoned_ids
        honest_total += len(honest)
        honest_out += len(honest - set(commit["contributors"]))
        # A trial: a poisoned contribution in a round the screen can judge (at least
        # three honest contributions to compare it with).
        if len(honest) >= MIN_HONEST:
            for node_id in participants & poisoned_ids:
                poisoned_total += 1
                poisoned_rejected += node_id not in commit["contributors"]
        for node_id, reason in commit["excluded"].items():
            excluded[_reason_class(reason)] += 1
            if "rejected" in reason and node_id not in poisoned_ids:
                false_exclusions += 1
    # What the owners answered each poisoned message (bench/poisoned_node.py's POISON
    # lines): stale and replayed messages are refused on arrival, so they never show in
    # a commit.
    poisoned_pushes: Counter[str] = Counter()
    for index in scenario.poisoned:
        log = scenario.root / f"node{index}" / "node.log"
        for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
            if line.startswith("POISON "):
                poisoned_pushes[json.loads(line[len("POISON ") :])["status"]] += 1
    # Every node evaluates the same global state after a round: one loss per round. Only
    # the honest nodes' evaluations count: once they have done their rounds, poisoned
    # ones may commit a round or two among themselves, unscreened (under four
    # contributions), and that state is not the run's result.
    evaluated = scenario.db("SELECT round, loss, node_id FROM progress WHERE loss > 0 ORDER BY id")
    by_round = {r: loss for r, loss, node_id in evaluated if node_id not in poisoned_ids}
    # The final loss is the one after the last planned round (both runs are compared
    # after as many rounds): past it, only nodes that are still short of --rounds
    # contributions (one with a rejected round) go on, a few or one alone, training a
    # whole round's budget on their own shards (measured: 1.21 -> 1.41 in one round).
    last = scenario.args.rounds - 1
    if not getattr(scenario.args, "churn_minutes", 0) and any(r <= last for r in by_round):
        by_round_final = {r: loss for r, loss in by_round.items() if r <= last}
    else:
        by_round_final = by_round
    losses = [max(by_round_final.items())] if by_round_final else []
    error = mean_error(scenario, commits, poisoned_ids)
    statuses = Counter(
        s["mean_status"].split(":")[0]
        for _, _, c in commits
        for s in c["shards"]
        if s.get("verifier")
    )
    banned = scenario.db("SELECT node_id FROM nodes WHERE state = 'banned'")
    return {
        "rounds_committed": sum(1 for _, _, c in commits if c["contributors"]),
        "max_round_s": round(longest, 2),
        "contributions_excluded": dict(excluded),
        "false_exclusions": false_exclusions,
        "honest_contributions": honest_total,
        # Honest contributions left out for any reason, faults included (a censoring
        # reducer's victims are faults: nothing proves the push arrived).
        "honest_excluded": honest_out,
        "demoted_rounds": dict(demoted),
        "poisoned_contributions": poisoned_total,
        "poisoned_rejected": poisoned_rejected,
        "poisoned_pushes": dict(poisoned_pushes),
        "mean_statuses": dict(statuses),
        "poisoned_banned": len({n for (n,) in banned} & poisoned_ids),
        "final_val_loss": losses[0][1] if losses else None,
        "final_round": losses[0][0] if losses else None,
        "val_loss_by_round": by_round,
        # Bytes every contributor sent and received, per committed round (the median:
        # a round's count arrives after its commit, the last one's may be missing).
        "wire_bytes_per_round": statistics.median(
            [c["bytes"] for _, _, c in commits if c["bytes"] > 0] or [0]
        ),
        # What one node sends and receives in a round (the median over nodes and rounds).
        "node_bytes_sent_per_round": statistics.median(
            [b for (b,) in scenario.db("SELECT bytes_sent FROM exchange_reports")] or [0]
        ),
        "node_bytes_received_per_round": statistics.median(
            [b for (b,) in scenario.db("SELECT bytes_received FROM exchange_reports")] or [0]
        ),
        "mean_max_abs_err": error,
    }


def _reason_class(reason: str) -> str:
    """ "shard 3: rejected: direction disagrees ... (cosine ...)" → "rejected: direction
    disagrees"; "shard 0: missing" → "missing"; "rejected: norm 104.8x the round's
    median" → "rejected: norm Nx the round's"; node ids → "<node>"."""
    reason = re.sub(r"^shard \d+( \(verifier\))?: ", "", reason)
    reason = re.split(r" \(|; |, the |: not ", reason)[0]
    reason = re.sub(r"\b[0-9a-f]{32}\b", "<node>", reason)
    return " ".join(re.sub(r"\b\d+(\.\d+)?", "N", reason).split()[:5])


def mean_error(
    scenario: Scenario, commits: list[tuple[int, dict, dict]], poisoned: set[str]
) -> float | None:
    """Max abs difference between every mean an honest node applied and the codec's
    encoding of the exact token-weighted mean of the contributions its commit lists,
    over all shards that committed; None when nothing could be checked."""
    dump = scenario.root / "dump"
    codec = make_codec(scenario.args.codec)
    worst = None
    for round_, plan, commit in commits:
        contributors = commit["contributors"]
        means = [
            m
            for m in sorted((dump / str(round_)).glob("mean-*.safetensors"))
            if m.stem.removeprefix("mean-") not in poisoned
        ]
        if not contributors or not means:
            continue
        gathered = [load_file(str(m)) for m in means]  # {"mean", "fetched": shard ids}
        bounds = plan["bounds"]
        for shard in commit["shards"]:
            if shard["status"] == "skipped":
                continue
            s = shard["shard"]
            lo, hi = bounds[s], bounds[s + 1]
            values, tokens = [], []
            for node_id in sorted(contributors):
                path = dump / str(round_) / str(s) / f"{node_id}.bin"
                values.append(codec.decode(path.read_bytes(), hi - lo))
                tokens.append(contributors[node_id])
            exact = weighted_mean_f64(values, tokens)
            encoding = mean_codec(codec, len(values))
            expected = encoding.decode(encoding.encode(exact), hi - lo)
            for node_mean in gathered:
                if s not in node_mean["fetched"].tolist():
                    continue  # skipped or lost for this node: its slice of θ did not move
                err = float((node_mean["mean"][lo:hi] - expected).abs().max())
                worst = err if worst is None else max(worst, err)
    return worst


def run_scenario(root: Path, args: argparse.Namespace, faults: bool) -> dict[str, Any]:
    scenario = Scenario(root, args, faults)
    try:
        kills: list[dict] = []
        churn: dict[str, Any] = {}
        if faults and args.churn_minutes:
            churn = scenario.churn(args.churn_minutes, args.churn_every_s, random.Random(args.seed))
            scenario.close()  # churn runs until it ends, not to a number of rounds
        restarts: list[dict[str, Any]] = []
        if faults and args.kill_coordinator:
            restarts = scenario.kill_coordinator(args.kill_coordinator, random.Random(args.seed))
        if faults and args.kill:
            honest = [i for i in range(args.nodes) if i not in scenario.poisoned]
            rng = random.Random(args.seed)
            victims = rng.sample(honest[1:], min(args.kill, len(honest) - 1))
            kills = scenario.kill_at_random(victims, rng)
        scenario.wait(args.timeout)
        result = measure(scenario)
        result["kills"] = kills
        if restarts:
            result["coordinator_restarts"] = restarts
            result["coordinator_state_identical"] = all(r["state_identical"] for r in restarts)
            seconds = [r["reconnect_s"] for r in restarts]
            result["max_reconnect_s"] = None if None in seconds else max(seconds)
            after_serving = [r["reconnect_after_serving_s"] for r in restarts]
            result["max_reconnect_after_serving_s"] = (
                None if None in after_serving else max(after_serving)
            )
        return {**result, **churn}
    finally:
        scenario.close()


def same_round_losses(
    faulty: dict[str, Any], baseline: dict[str, Any], rounds: int
) -> dict[str, Any]:
    """The two runs' mean validation loss over the same five rounds: the last ones both
    committed before the nodes start to finish (a node stops after --rounds rounds of its
    own, so the last rounds of a run have fewer nodes and the loss there swings). Runs
    that committed different numbers of rounds are compared like for like."""
    mine, theirs = faulty.pop("val_loss_by_round"), baseline.pop("val_loss_by_round", {})
    window = sorted(r for r in set(mine) & set(theirs) if r <= rounds - 2)[-5:]
    if not window:
        return {"compared_rounds": None, "loss_ratio_same_rounds": None}
    ours = statistics.fmean(mine[r] for r in window)
    clean = statistics.fmean(theirs[r] for r in window)
    return {
        "compared_rounds": [window[0], window[-1]],
        "val_loss_same_rounds": ours,
        "baseline_val_loss_same_rounds": clean,
        "loss_ratio_same_rounds": ours / clean,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=6)
    parser.add_argument("--kill", type=int, default=0, help="nodes killed -9 at random points")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument(
        "--churn-minutes", type=float, default=0.0, help="start or kill a node every few s"
    )
    parser.add_argument("--churn-every-s", type=float, default=5.0)
    parser.add_argument(
        "--kill-coordinator", type=int, default=0, help="kill -9 and restart it this often"
    )
    parser.add_argument("--poison", choices=POISONS, help="what the poisoned nodes send")
    parser.add_argument("--poisoned", type=int, default=1, help="how many nodes are poisoned")
    parser.add_argument("--defences", choices=("on", "off"), default="on")
    parser.add_argument(
        "--direction",
        choices=("on", "off"),
        default="on",
        help="the screen's direction check ([defences] screen_direction, on in runs too)",
    )
    parser.add_argument(
        "--baseline", choices=("on", "off"), default="on", help="also run without faults"
    )
    parser.add_argument("--codec", default="fp32")
    parser.add_argument("--model", choices=sorted(MODELS), default="micro")
    parser.add_argument("--inner-steps", type=int, default=10)
    parser.add_argument(
        "--round-tokens",
        type=int,
        help="a round's token budget (default: nodes × inner steps × batch, so survivors "
        "of a kill train longer); 0: every node does --inner-steps, the tokens fall with it",
    )
    parser.add_argument(
        "--beta2", type=float, help="the inner AdamW's beta2 (default: the run default's)"
    )
    parser.add_argument(
        "--moment-batches",
        type=float,
        help="[train] moment_batches: each node's AdamW assumes a batch this many times "
        "its step's (default: the run default's, the contributors to each round; 1: AdamW)",
    )
    parser.add_argument(
        "--lr",
        type=float,
        default=DEFAULT_LR,
        help=f"the inner AdamW's peak learning rate (default {DEFAULT_LR})",
    )
    parser.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default=TrainConfig.optimizer,
        help="[train] optimizer: the nodes' inner optimizer (muon: Muon on the hidden matrices)",
    )
    parser.add_argument("--deadline-s", type=float, default=15.0, help="exchange deadline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900.0, help="per run, seconds")
    parser.add_argument("--work-dir", type=Path, help="keep the runs here (default: temp)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.nodes < 2:
        parser.error("--nodes must be at least 2")
    if args.kill < 0 or args.kill >= args.nodes - args.poisoned:
        parser.error("--kill must leave at least one honest node alive")
    if args.poison and not 1 <= args.poisoned < args.nodes:
        parser.error("--poisoned must be at least 1 and leave an honest node")
    if args.rounds < 2:
        parser.error("--rounds must be at least 2")
    if args.beta2 is not None and not 0 < args.beta2 < 1:
        parser.error("--beta2 must be in (0, 1)")
    if not args.lr > 0:
        parser.error("--lr must be positive")
    if args.moment_batches is not None and not args.moment_batches >= 1:
        parser.error("--moment-batches must be ≥ 1")
    if args.kill_coordinator < 0:
        parser.error("--kill-coordinator must be ≥ 0")
    if args.round_tokens is not None and args.round_tokens < 0:
        parser.error("--round-tokens must be ≥ 0")
    if args.churn_minutes < 0 or args.churn_every_s <= 0:
        parser.error("--churn-minutes must be ≥ 0 and --churn-every-s positive")
    make_codec(args.codec)

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="starling-chaos-") as tmp:
        root = args.work_dir or Path(tmp)
        baseline: dict[str, Any] = {}
        if args.baseline == "on":
            clean = argparse.Namespace(**{**vars(args), "defences": "on"})
            baseline = run_scenario(root / "baseline", clean, faults=False)
        faulty = run_scenario(root / "faults", args, faults=True)
    err = faulty["mean_max_abs_err"]
    same_round = same_round_losses(faulty, baseline, args.rounds)
    result = {
        "nodes": args.nodes,
        "kill": args.kill,
        "poison": args.poison,
        "poisoned": args.poisoned if args.poison else 0,
        "defences": args.defences,
        "codec": args.codec,
        "rounds_planned": args.rounds,
        **faulty,
        "deadline_s": args.deadline_s,
        "detection_rate": (
            faulty["poisoned_rejected"] / faulty["poisoned_contributions"]
            if faulty["poisoned_contributions"]
            else None
        ),
        "false_positive_rate": (
            faulty["false_exclusions"] / faulty["honest_contributions"]
            if faulty["honest_contributions"]
            else None
        ),
        "baseline_val_loss": baseline.get("final_val_loss"),
        "baseline_rounds_committed": baseline.get("rounds_committed"),
        "baseline_false_exclusions": baseline.get("false_exclusions"),
        "loss_ratio": (
            faulty["final_val_loss"] / baseline["final_val_loss"]
            if faulty["final_val_loss"] and baseline.get("final_val_loss")
            else None
        ),
        **same_round,
        "mean_exact": err is not None and err <= 1e-6,
        "wall_s": round(time.monotonic() - started, 1),
    }
    print(json.dumps(result) if args.json else json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

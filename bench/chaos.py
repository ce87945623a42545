"""Chaos benchmark: a real run (coordinator and node processes on loopback) with nodes
killed -9 at random points and/or poisoned nodes, against the same run without faults.

    python bench/chaos.py --nodes 6 --kill 2 --rounds 10 --json
    python bench/chaos.py --nodes 8 --poison sign_flip --poisoned 1 --rounds 12 --json
    python bench/chaos.py --nodes 8 --poison scale --defences off --json   # control

Every node runs through bench/poisoned_node.py (honest ones with kind "none"), which
writes each payload it pushes and each mean it gathers; from those the bench checks
every committed mean against the token-weighted mean of exactly the contributions its
commit lists. Poisoned runs set ban_after_offences = 0 so that the poisoned nodes stay
in and every round is a trial (tests/test_poisoning.py covers the ban).

Prints one JSON object: rounds_planned, rounds_committed, max_round_s (the longest
exchange phase, from round close to commit), deadline_s, contributions_excluded
(reason → count), false_exclusions (honest contributions rejected as poisoned),
poisoned_contributions / poisoned_rejected / detection_rate, final_val_loss,
baseline_val_loss, loss_ratio, mean_exact, mean_max_abs_err, wall_s.
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
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from starling.codecs import make_codec
from starling.exchange.owner import weighted_mean_f64
from starling.identity import Identity

HERE = Path(__file__).resolve().parent
NODE = HERE / "poisoned_node.py"
BATCH_TOKENS = 1024
KINDS = ("nan", "scale", "sign_flip", "noise", "shape", "stale", "replay", "copy")

CONFIG = """
[run]
name = "chaos"
seed = {seed}
target_tokens = 1000000000

[model]
preset = "tiny"
dim = 64
n_layers = 2
n_heads = 4
n_kv_heads = 4
max_seq_len = 64

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
lr = 0.003
warmup_steps = 5

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
ban_after_offences = 0
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
                inner_steps=args.inner_steps,
                round_tokens=args.nodes * args.inner_steps * BATCH_TOKENS,
                deadline_s=args.deadline_s,
                codec=args.codec,
                nodes=args.nodes,
                batch_tokens=BATCH_TOKENS,
                screen="true" if args.defences == "on" else "false",
                # Judged by direction only where poison is measured: off by default in
                # runs (see [defences] in starling.runconfig).
                direction="true" if args.defences == "on" and args.poison else "false",
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
        self.coordinator = subprocess.Popen(
            [*starling, "coordinator", "serve", str(self.run_dir), "--grpc-port", "0"],
            stdout=subprocess.PIPE,
            stderr=(root / "coordinator.log").open("w"),
            text=True,
            start_new_session=True,
        )
        assert self.coordinator.stdout is not None
        self.url = self.coordinator.stdout.readline().strip()
        if not self.url.startswith("starling://"):
            raise SystemExit(f"coordinator did not start: {(root / 'coordinator.log').read_text()}")
        self.poisoned = set(range(args.poisoned)) if faults and args.poison else set()
        self.nodes: dict[int, subprocess.Popen[str]] = {}
        for index in range(args.nodes):
            kind = args.poison if index in self.poisoned else "none"
            self.nodes[index] = self._join(index, kind)

    def _join(self, index: int, kind: str) -> subprocess.Popen[str]:
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
                str(self.args.rounds),
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
                round_s = (time.monotonic() - self.started) / max(self.committed(), 1)
            time.sleep(rng.uniform(0, round_s))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.nodes[victim].pid, signal.SIGKILL)
            kills.append({"node": victim, "after_commits": self.committed()})
        return kills

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for process in self.nodes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(max(1.0, deadline - time.monotonic()))

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


def measure(scenario: Scenario) -> dict[str, Any]:
    rows = scenario.db("SELECT round, plan, commit_record FROM rounds ORDER BY round")
    commits = [(r, json.loads(p), json.loads(c)) for r, p, c in rows if c is not None]
    ids = scenario.node_ids()
    poisoned_ids = {ids[i] for i in scenario.poisoned if i in ids}
    excluded: Counter[str] = Counter()
    false_exclusions = poisoned_total = poisoned_rejected = 0
    longest = 0.0
    for _, plan, commit in commits:
        exchange_opened = plan["deadline"] - scenario.args.deadline_s
        longest = max(longest, commit["committed"] - exchange_opened)
        participants = {p["node_id"] for p in plan["participants"]}
        for node_id in participants & poisoned_ids:
            poisoned_total += 1
            poisoned_rejected += node_id not in commit["contributors"]
        for node_id, reason in commit["excluded"].items():
            excluded[_reason_class(reason)] += 1
            if "rejected" in reason and node_id not in poisoned_ids:
                false_exclusions += 1
    losses = scenario.db(
        "SELECT round, loss FROM progress WHERE loss > 0 ORDER BY round DESC, id DESC LIMIT 1"
    )
    error = mean_error(scenario, commits)
    return {
        "rounds_committed": sum(1 for _, _, c in commits if c["contributors"]),
        "max_round_s": round(longest, 2),
        "contributions_excluded": dict(excluded),
        "false_exclusions": false_exclusions,
        "poisoned_contributions": poisoned_total,
        "poisoned_rejected": poisoned_rejected,
        "final_val_loss": losses[0][1] if losses else None,
        "final_round": losses[0][0] if losses else None,
        "mean_max_abs_err": error,
    }


def _reason_class(reason: str) -> str:
    """ "shard 3: rejected: direction disagrees ... (cosine ...)" → "rejected: direction
    disagrees"; "shard 0: missing" → "missing"."""
    reason = re.sub(r"^shard \d+: ", "", reason)
    reason = re.split(r" \(|; |, the |: not ", reason)[0]
    return " ".join(reason.split()[:5])


def mean_error(scenario: Scenario, commits: list[tuple[int, dict, dict]]) -> float | None:
    """Max abs difference between every gathered mean and the codec's encoding of the
    exact token-weighted mean of the contributions its commit lists, over all shards
    that committed; None when nothing could be checked."""
    dump = scenario.root / "dump"
    codec = make_codec(scenario.args.codec)
    worst = None
    for round_, plan, commit in commits:
        contributors = commit["contributors"]
        means = sorted((dump / str(round_)).glob("mean-*.safetensors"))
        if not contributors or not means:
            continue
        gathered = [load_file(str(m))["mean"] for m in means]
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
            expected = codec.decode(codec.encode(exact), hi - lo)
            for mean in gathered:
                err = float((mean[lo:hi] - expected).abs().max())
                worst = err if worst is None else max(worst, err)
    return worst


def run_scenario(root: Path, args: argparse.Namespace, faults: bool) -> dict[str, Any]:
    scenario = Scenario(root, args, faults)
    try:
        kills: list[dict] = []
        if faults and args.kill:
            honest = [i for i in range(args.nodes) if i not in scenario.poisoned]
            rng = random.Random(args.seed)
            victims = rng.sample(honest[1:], min(args.kill, len(honest) - 1))
            kills = scenario.kill_at_random(victims, rng)
        scenario.wait(args.timeout)
        result = measure(scenario)
        result["kills"] = kills
        return result
    finally:
        scenario.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=6)
    parser.add_argument("--kill", type=int, default=0, help="nodes killed -9 at random points")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--poison", choices=KINDS, help="what the poisoned nodes send")
    parser.add_argument("--poisoned", type=int, default=1, help="how many nodes are poisoned")
    parser.add_argument("--defences", choices=("on", "off"), default="on")
    parser.add_argument("--codec", default="fp32")
    parser.add_argument("--inner-steps", type=int, default=10)
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
    make_codec(args.codec)

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="starling-chaos-") as tmp:
        root = args.work_dir or Path(tmp)
        baseline = run_scenario(
            root / "baseline", argparse.Namespace(**{**vars(args), "defences": "on"}), faults=False
        )
        faulty = run_scenario(root / "faults", args, faults=True)
    err = faulty["mean_max_abs_err"]
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
        "baseline_val_loss": baseline["final_val_loss"],
        "baseline_rounds_committed": baseline["rounds_committed"],
        "baseline_false_exclusions": baseline["false_exclusions"],
        "loss_ratio": (
            faulty["final_val_loss"] / baseline["final_val_loss"]
            if faulty["final_val_loss"] and baseline["final_val_loss"]
            else None
        ),
        "mean_exact": err is not None and err <= 1e-6,
        "wall_s": round(time.monotonic() - started, 1),
    }
    print(json.dumps(result) if args.json else json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""Flood benchmark: how much one peer flooding the coordinator with requests slows an
honest run's rounds, with the request limits on (starling.serving) and off.

    python bench/flood.py --json

A real run (a coordinator process and honest node processes on loopback) commits a
few rounds to warm up, then `--rounds` rounds in quiet, then `--rounds` rounds while a
flooder (its own process, at the lowest CPU priority: on a real network it would have
its own machine, so here it must not take the nodes' CPU, only the coordinator's) makes
public calls as fast as its `--flood-threads` threads can over one connection.
`--flood-call checkpoint` (default) downloads the initial checkpoint (FetchFile, about
1 MB: disk, hashing and sending); `status` asks GetStatus (database reads). Then the
same with the limits off (requests_per_s so high it never binds): the control that
shows what the limits buy.

Prints one JSON object with, for each of "limited" and "unlimited": quiet_round_s and
flood_round_s (median time from one commit to the next), rise (flood / quiet - 1),
quiet_exchange_s / flood_exchange_s (median round duration from its opening to its
commit, as the coordinator records it), flood_requests, flood_refused (answered
RESOURCE_EXHAUSTED), flood_served_per_s; and wall_s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
import chaos  # noqa: E402  (a sibling script)
from chaos import Scenario  # noqa: E402

from starling.coordination import JoinUrl  # noqa: E402
from starling.v1 import coordinator_pb2 as pb  # noqa: E402

UNLIMITED = 1e9  # requests/s: a limit that never binds


def commits(scenario: Scenario) -> list[tuple[int, float, float]]:
    """(round, committed unix time, duration from open to commit) of every commit."""
    rows = scenario.db("SELECT round, commit_record FROM rounds WHERE commit_record IS NOT NULL")
    found = []
    for round_, record in rows:
        commit = json.loads(record)
        found.append((round_, commit["committed"], commit["duration_s"]))
    return sorted(found)


def wait_for_commits(scenario: Scenario, count: int, timeout: float) -> list:
    """chaos.wait_for_commits, then the commits."""
    chaos.wait_for_commits(scenario, count, timeout)
    return commits(scenario)


CHECKPOINT_0 = pb.FetchFileRequest(path="checkpoints/0/state.safetensors").SerializeToString()


class Flooder:
    """Threads making one public call back to back over one connection until stopped."""

    def __init__(self, address: str, threads: int, call: str) -> None:
        options = [("grpc.use_local_subchannel_pool", 1)]  # its own connection
        self.channel = grpc.insecure_channel(address, options=options)
        if call == "status":
            status = self.channel.unary_unary("/starling.v1.Coordinator/GetStatus")
            self.call = lambda: status(b"", timeout=5)
        else:
            fetch = self.channel.unary_stream("/starling.v1.Coordinator/FetchFile")
            self.call = lambda: sum(len(chunk) for chunk in fetch(CHECKPOINT_0, timeout=5))
        self.stop = threading.Event()
        self.codes: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        local: Counter[str] = Counter()
        while not self.stop.is_set():
            try:
                self.call()
                local["OK"] += 1
            except grpc.RpcError as err:
                local[err.code().name] += 1
        with self.lock:
            self.codes.update(local)

    def run_until_stdin_closes(self) -> None:
        """The flooder process: floods until its parent closes our stdin, then prints
        {"codes": {...}, "seconds": s}."""
        started = time.monotonic()
        for thread in self.threads:
            thread.start()
        sys.stdin.read()
        self.stop.set()
        for thread in self.threads:
            thread.join(10)
        self.channel.close()
        print(json.dumps({"codes": dict(self.codes), "seconds": time.monotonic() - started}))


class FloodProcess:
    """A Flooder in a child process at nice 19."""

    def __init__(self, address: str, threads: int, call: str) -> None:
        self.command = [sys.executable, __file__, "--flood-at", address]
        self.command += ["--flood-threads", str(threads), "--flood-call", call]

    def __enter__(self) -> FloodProcess:
        self.process = subprocess.Popen(
            self.command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: os.nice(19),
        )
        return self

    def __exit__(self, *exc: object) -> None:
        out, _ = self.process.communicate(timeout=60)
        report = json.loads(out.strip().splitlines()[-1])
        self.codes: Counter[str] = Counter(report["codes"])
        self.seconds = float(report["seconds"])


def measure(root: Path, args: argparse.Namespace, limited: bool) -> dict[str, Any]:
    run_args = argparse.Namespace(
        nodes=args.nodes,
        rounds=100000,  # the nodes run until the bench is done
        seed=args.seed,
        inner_steps=args.inner_steps,
        deadline_s=15.0,
        codec="fp32",
        defences="on",
        poison=None,
        poisoned=0,
        requests_per_s=50.0 if limited else UNLIMITED,
        # Fixed inner steps (no token budget): a round closes when every node has done
        # its steps, so round times do not hinge on which node happens to be fastest.
        round_tokens=0,
    )
    scenario = Scenario(root, run_args, faults=False)
    address = JoinUrl.parse(scenario.url).address
    try:
        warm = len(wait_for_commits(scenario, args.warmup, args.timeout))
        quiet = wait_for_commits(scenario, warm + args.rounds + 1, args.timeout)
        with FloodProcess(address, args.flood_threads, args.flood_call) as flooder:
            start = len(wait_for_commits(scenario, len(quiet) + 1, args.timeout))
            flooded = wait_for_commits(scenario, start + args.rounds + 1, args.timeout)
        alive = scenario.coordinator.poll() is None
    finally:
        scenario.close()
    quiet_part = quiet[warm - 1 :]
    flood_part = flooded[start - 1 : start + args.rounds + 1]

    def interval(part: list) -> float:
        return statistics.median(b[1] - a[1] for a, b in zip(part, part[1:], strict=False))

    def duration(part: list) -> float:
        return statistics.median(c[2] for c in part[1:])

    quiet_s, flood_s = interval(quiet_part), interval(flood_part)
    served = flooder.codes.get("OK", 0)
    return {
        "requests_per_s_limit": run_args.requests_per_s,
        "rounds_measured": args.rounds,
        "quiet_round_s": round(quiet_s, 3),
        "flood_round_s": round(flood_s, 3),
        "rise": round(flood_s / quiet_s - 1, 3),
        "quiet_exchange_s": round(duration(quiet_part), 3),
        "flood_exchange_s": round(duration(flood_part), 3),
        "flood_requests": sum(flooder.codes.values()),
        "flood_refused": flooder.codes.get("RESOURCE_EXHAUSTED", 0),
        "flood_codes": dict(flooder.codes),
        "flood_served_per_s": round(served / flooder.seconds, 1),
        "coordinator_alive": alive,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=10, help="rounds measured per phase")
    parser.add_argument("--warmup", type=int, default=2, help="rounds before measuring")
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument("--flood-threads", type=int, default=4)
    parser.add_argument("--flood-call", choices=("checkpoint", "status"), default="checkpoint")
    parser.add_argument("--limits", choices=("both", "on", "off"), default="both")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600.0, help="per phase, seconds")
    parser.add_argument("--work-dir", type=Path, help="keep the runs here (default: temp)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--flood-at", help=argparse.SUPPRESS)  # the flooder process
    args = parser.parse_args()
    if args.flood_at:
        Flooder(args.flood_at, args.flood_threads, args.flood_call).run_until_stdin_closes()
        return
    if args.nodes < 2:
        parser.error("--nodes must be at least 2")
    if args.rounds < 2 or args.warmup < 1:
        parser.error("--rounds must be at least 2 and --warmup at least 1")
    if args.flood_threads < 1:
        parser.error("--flood-threads must be at least 1")
    started = time.monotonic()
    result: dict[str, Any] = {
        "nodes": args.nodes,
        "flood_threads": args.flood_threads,
        "flood_call": args.flood_call,
    }
    with tempfile.TemporaryDirectory(prefix="starling-flood-") as tmp:
        root = args.work_dir or Path(tmp)
        if args.limits in ("both", "on"):
            result["limited"] = measure(root / "limited", args, limited=True)
        if args.limits in ("both", "off"):
            result["unlimited"] = measure(root / "unlimited", args, limited=False)
    result["wall_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(result) if args.json else json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""Coordinator load: N simulated nodes heartbeating and reporting progress against a
real `starling coordinator serve` process; latency of every signed request.

    python bench/coordinator_load.py --nodes 2000 --heartbeat-s 5 --duration 60 --json

Each simulated node has its own Ed25519 identity and signs every request, as a real node
does; nodes join (client-only: no dial-back), then each sends a Heartbeat and a
ReportProgress every `heartbeat-s` seconds, spread evenly over the interval. Client
processes (--procs) share the 2 cores with the coordinator, so the figures include the
load generator's own CPU. Goal (issue 5): 2,000 nodes at a 5 s heartbeat with p99 under
50 ms on a 2-core machine.

The last output line is {"nodes", "heartbeat_s", "requests", "rate_per_s", "p50_ms",
"p90_ms", "p99_ms", "max_ms", "errors", "coordinator_rss_mb", ...}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from starling.coordination import JoinUrl, method_path, sign_request
from starling.exchange.transport import GRPC_OPTIONS
from starling.identity import Identity
from starling.runconfig import RunConfig
from starling.v1 import coordinator_pb2 as pb

CHANNELS_PER_PROC = 8


def make_run(root: Path, heartbeat_s: float) -> Path:
    from starling.coordinator.rundir import init_run

    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(f"Document {i} about starlings." for i in range(2000)))
    config = RunConfig.from_dict(
        {
            "data": {"source": str(corpus), "tokenizer": "bytes", "shard_tokens": 4096},
            "model": {"preset": "tiny", "dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 2},
            # Leases outlast the join phase, during which the simulated nodes are silent.
            "membership": {"heartbeat_s": heartbeat_s, "lease_s": max(6 * heartbeat_s, 120.0)},
        }
    )
    init_run(root / "run", config)
    return root / "run"


async def _worker_main(
    url: str, run_id: str, count: int, heartbeat_s: float, start_at: float, duration: float
) -> dict[str, Any]:
    address = JoinUrl.parse(url).address
    channels = [
        grpc.aio.insecure_channel(address, options=GRPC_OPTIONS) for _ in range(CHANNELS_PER_PROC)
    ]
    calls = {
        name: [
            c.unary_unary(method_path(name), request_serializer=None, response_deserializer=r)
            for c in channels
        ]
        for name, r in (
            ("Join", pb.JoinResponse.FromString),
            ("Heartbeat", pb.HeartbeatResponse.FromString),
            ("ReportProgress", pb.ReportProgressResponse.FromString),
        )
    }
    identities = [Identity.generate() for _ in range(count)]
    latencies: list[float] = []
    errors: dict[str, int] = {}

    async def send(index: int, method: str, request: Any, record: bool) -> None:
        raw = sign_request(identities[index], method, run_id, 0, request)
        started = time.perf_counter()
        try:
            await calls[method][index % CHANNELS_PER_PROC](raw, timeout=30)
        except grpc.aio.AioRpcError as err:
            errors[err.code().name] = errors.get(err.code().name, 0) + 1
            return
        if record:
            latencies.append(time.perf_counter() - started)

    join = pb.JoinRequest(capabilities=pb.Capabilities(device="cpu", software="load"))
    window = asyncio.Semaphore(32)

    async def join_one(index: int) -> None:
        async with window:
            request = pb.JoinRequest()
            request.CopyFrom(join)
            request.public_key = identities[index].public_key
            await send(index, "Join", request, record=False)

    await asyncio.gather(*(join_one(i) for i in range(count)))
    await asyncio.sleep(max(0.0, start_at - time.time()))
    end = start_at + duration
    progress = pb.ReportProgressRequest(loss=3.2, tokens_per_s=1500.0, utilization=0.9)

    async def node_loop(index: int) -> None:
        # Spread the nodes evenly over one heartbeat interval.
        await asyncio.sleep(heartbeat_s * index / count)
        while time.time() < end:
            tick = time.monotonic()
            await send(index, "Heartbeat", pb.HeartbeatRequest(phase="training"), True)
            await send(index, "ReportProgress", progress, True)
            await asyncio.sleep(max(0.0, heartbeat_s - (time.monotonic() - tick)))

    await asyncio.gather(*(node_loop(i) for i in range(count)))
    for channel in channels:
        await channel.close()
    return {"latencies": latencies, "errors": errors}


def _worker(args: tuple, queue: Any) -> None:
    queue.put(asyncio.run(_worker_main(*args)))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=2000)
    parser.add_argument("--heartbeat-s", type=float, default=5.0)
    parser.add_argument("--duration", type=float, default=60.0, help="measured seconds")
    parser.add_argument("--procs", type=int, default=2, help="load-generating processes")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.nodes < 1 or args.heartbeat_s <= 0 or args.duration <= 0 or args.procs < 1:
        parser.error("need --nodes >= 1, --heartbeat-s > 0, --duration > 0, --procs >= 1")
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = make_run(Path(tmp), args.heartbeat_s)
        server = subprocess.Popen(
            [sys.executable, "-m", "starling", "coordinator", "serve", str(run_dir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            assert server.stdout is not None
            url = server.stdout.readline().strip()
            import sqlite3

            db = sqlite3.connect(run_dir / "coordinator.db")
            run_id = db.execute("SELECT value FROM meta WHERE key = 'run_id'").fetchone()[0]
            db.close()
            rss_before = rss_mb(server.pid)
            # Joining 2,000 nodes takes a while; the measured window starts after it.
            start_at = time.time() + 10.0 + args.nodes / 200
            context = multiprocessing.get_context("spawn")
            queue = context.Queue()
            shares = [
                args.nodes // args.procs + (i < args.nodes % args.procs) for i in range(args.procs)
            ]
            workers = [
                context.Process(
                    target=_worker,
                    args=((url, run_id, n, args.heartbeat_s, start_at, args.duration), queue),
                )
                for n in shares
            ]
            for w in workers:
                w.start()
            results = [queue.get(timeout=args.duration + 600) for _ in workers]
            for w in workers:
                w.join(60)
            rss_after = rss_mb(server.pid)
        finally:
            server.terminate()
            server.wait(30)
    latencies = sorted(x for r in results for x in r["latencies"])
    errors: dict[str, int] = {}
    for r in results:
        for code, n in r["errors"].items():
            errors[code] = errors.get(code, 0) + n

    def pct(p: float) -> float:
        return (
            latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000 if latencies else 0.0
        )

    result = {
        "nodes": args.nodes,
        "heartbeat_s": args.heartbeat_s,
        "duration_s": args.duration,
        "requests": len(latencies),
        "rate_per_s": len(latencies) / args.duration,
        "p50_ms": round(pct(0.50), 2),
        "p90_ms": round(pct(0.90), 2),
        "p99_ms": round(pct(0.99), 2),
        "max_ms": round(latencies[-1] * 1000, 2) if latencies else 0.0,
        "mean_ms": round(statistics.fmean(latencies) * 1000, 2) if latencies else 0.0,
        "errors": errors,
        "coordinator_rss_mb": {"start": round(rss_before, 1), "end": round(rss_after, 1)},
        "goal": {"nodes": 2000, "heartbeat_s": 5.0, "p99_ms": 50.0},
        "cpus": os.cpu_count(),
        "wall_s": round(time.time() - started, 1),
    }
    if not args.json:
        print(
            f"{args.nodes} nodes: p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms",
            file=sys.stderr,
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()

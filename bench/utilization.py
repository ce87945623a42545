"""Compute utilization of a real run: a `starling coordinator serve` process and N
`starling node join` processes on this machine, every node's links capped by
Starling's bandwidth limiter.

    python bench/utilization.py --nodes 4 --upload-mbps 20 --json

Per node and round (from each node's rounds.jsonl): compute time (its inner steps),
exchange time, and the round's period: from its first inner step to the next round's
first inner step. The exposed time (not training) is period − compute. Utilization =
compute / period. The first round is a warm-up and is left out.

This CPU computes far slower than a GPU, which flatters any utilization figure. The
GPU-equivalent figure keeps every measured non-compute time and shrinks compute by the
ratio of this CPU's tokens/s to a GPU's on the same model — the same as slowing the
link by that ratio, but without shrinking the fixed per-round costs (round trips,
waiting for the round to close), so it never flatters. The GPU's tokens/s is estimated
as MFU × peak FLOP/s / (6 × parameters), with the RTX 4090's 82.6 TFLOP/s (dense bf16
tensor cores with fp32 accumulation, NVIDIA Ada Lovelace whitepaper) at --gpu-mfu
(default 0.4), or given directly with --gpu-tokens-per-s.

A GPU round of --gpu-inner-steps steps (default: the steps run here) computes
steps × step time; its exposed time is the measured exposed time plus, with overlap, any
part of the measured exchange that the shorter GPU round could not hide. Since neither
grows with the round's length (the payload is the same), the report also gives the
inner steps per round a GPU needs for 95%.

With --overlap every node trains round r+1 while round r is exchanged and applied
(one-step-delayed outer updates), which hides the exchange behind compute, and folds
round r's mean in as soon as it is applied: each node reports after how many inner
steps of the next round it did (folded_at_step; null: at the round's close), and the
overall gpu_overlap_steps is that on the GPU (the mean exchange over a GPU inner step,
rounded up): `starling simulate --overlap --overlap-steps N` says what it costs.

The last output line is a JSON object {"config", "nodes": [...], "overall": {...}}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RTX_4090_BF16_FLOPS = 82.6e12
BATCH_TOKENS = 2048  # tokens per inner step (the run's batch)

CONFIG = """
[run]
name = "utilization"
target_tokens = {target}

[model]
preset = "{model}"

[round]
inner_steps = {inner_steps}
tokens = {round_tokens}
deadline_s = 600.0
exchange_deadline_s = 120.0

[outer]
codec = "{codec}"
overlap = {overlap}

[train]
batch_tokens = {batch_tokens}
micro_batch_size = 8
lr = 0.003
warmup_steps = 10

[checkpoints]
every = 1000

[membership]
heartbeat_s = 1.0
lease_s = 30.0
min_nodes = {nodes}

[defences]
verify_means = {verify}
"""


def starling(*args: str) -> list[str]:
    return [sys.executable, "-m", "starling", *args]


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    config = root / "run.toml"
    per_round = args.round_tokens or args.nodes * args.inner_steps * BATCH_TOKENS
    target = (args.rounds + 2) * per_round
    config.write_text(
        CONFIG.format(
            target=target,
            model=args.model,
            inner_steps=args.inner_steps,
            round_tokens=args.round_tokens,
            batch_tokens=BATCH_TOKENS,
            codec=args.codec,
            nodes=args.nodes,
            overlap="true" if args.overlap else "false",
            verify="true" if args.verify_means == "on" else "false",
        )
    )
    run_dir = root / "run"
    subprocess.run(
        starling("coordinator", "init", str(run_dir), "--config", str(config)),
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    coordinator = subprocess.Popen(
        starling("coordinator", "serve", str(run_dir)),
        stdout=subprocess.PIPE,
        stderr=(root / "coordinator.log").open("w"),
        text=True,
    )
    nodes: list[subprocess.Popen[str]] = []
    try:
        assert coordinator.stdout is not None
        url = coordinator.stdout.readline().strip()
        for i in range(args.nodes):
            work = root / f"node{i}"
            work.mkdir()
            caps = ["--upload-mbps", str(args.upload_mbps)]
            caps += ["--download-mbps", str(args.download_mbps or args.upload_mbps)]
            nodes.append(
                subprocess.Popen(
                    starling(
                        "node",
                        "join",
                        url,
                        "--work-dir",
                        str(work),
                        "--device",
                        "cpu",
                        "--max-rounds",
                        str(args.rounds + 1),
                        *caps,
                    ),
                    stdout=subprocess.DEVNULL,
                    stderr=(work / "node.log").open("w"),
                    env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
                )
            )
        for node in nodes:
            if node.wait(timeout=args.timeout) != 0:
                raise RuntimeError(f"a node failed: see {root}/node*/node.log")
    finally:
        for process in [*nodes, coordinator]:
            if process.poll() is None:
                process.terminate()
                process.wait(30)
    per_node = []
    for i in range(args.nodes):
        log = next((root / f"node{i}").glob("runs/*/rounds.jsonl"))
        rounds = [json.loads(line) for line in log.read_text().splitlines()]
        per_node.append(sorted(rounds, key=lambda r: r["round"])[1:])  # round 0: warm-up
    return {"per_node": per_node, "numel": _numel(run_dir)}


def _numel(run_dir: Path) -> int:
    import sqlite3

    db = sqlite3.connect(run_dir / "coordinator.db")
    try:
        return int(db.execute("SELECT value FROM meta WHERE key = 'numel'").fetchone()[0])
    finally:
        db.close()


def gpu_utilization(step_s: float, steps: int, exposed_s: float, exchange_s: float, overlap: bool):
    """Compute utilization of a GPU round of `steps` inner steps of `step_s` seconds each.

    `exposed_s` is the measured time per round the node was not training. With overlap
    the exchange runs behind the next round's compute; a GPU round shorter than the
    exchange leaves the rest of it exposed as well (counted on top of the measured
    exposed time, which never makes the figure better than measured). Without overlap
    the measured exposed time already holds the whole exchange."""
    compute = step_s * steps
    exposed = exposed_s + (max(0.0, exchange_s - compute) if overlap else 0.0)
    return compute / (compute + exposed)


def steps_for(target: float, step_s: float, exposed_s: float, exchange_s: float, overlap: bool):
    """The fewest GPU inner steps per round that reach `target` utilization (the
    utilization grows with the round's length, so a doubling then bisection search)."""
    high = 1
    while gpu_utilization(step_s, high, exposed_s, exchange_s, overlap) < target:
        high *= 2
    low = high // 2
    while high - low > 1:
        middle = (low + high) // 2
        if gpu_utilization(step_s, middle, exposed_s, exchange_s, overlap) >= target:
            high = middle
        else:
            low = middle
    return high


def summarize(per_node: list[list[dict]], numel: int, args: argparse.Namespace) -> dict:
    gpu_tps = args.gpu_tokens_per_s or args.gpu_mfu * RTX_4090_BF16_FLOPS / (6 * numel)
    gpu_step_s = BATCH_TOKENS / gpu_tps  # one inner step (the run's batch) on the GPU
    nodes = []
    for index, rounds in enumerate(per_node):
        # Whole periods: from each round's first inner step to the next one's, so the
        # gaps (waiting for the close, exchange, apply) of every counted round are in.
        wall = rounds[-1]["train_started"] - rounds[0]["train_started"]
        rounds = rounds[:-1]
        compute = sum(r["compute_s"] for r in rounds)
        tokens = sum(r["tokens"] for r in rounds)
        exchange = sum(r["exchange_s"] for r in rounds)
        exposed = wall - compute
        per_round = {
            "exposed_s": exposed / len(rounds),
            "exchange_s": exchange / len(rounds),
        }
        gpu_steps = args.gpu_inner_steps or args.inner_steps
        nodes.append(
            {
                "node": index,
                "rounds": len(rounds),
                "compute_s": round(compute, 2),
                "exchange_s": round(exchange, 2),
                "exposed_s": round(exposed, 2),
                "exposed_s_per_round": round(per_round["exposed_s"], 3),
                "wall_s": round(wall, 2),
                "utilization": round(compute / wall, 4),
                "cpu_tokens_per_s": round(tokens / compute, 1),
                "gpu_equivalent_utilization": round(
                    gpu_utilization(gpu_step_s, gpu_steps, **per_round, overlap=args.overlap), 4
                ),
                "inner_steps_for_95pct_on_gpu": steps_for(
                    0.95, gpu_step_s, **per_round, overlap=args.overlap
                ),
                "bytes_sent_per_round": int(statistics.fmean(r["bytes_sent"] for r in rounds)),
                "folded_at_step": [r.get("folded_at_step") for r in rounds],
            }
        )
    mean_exchange_s = statistics.fmean(n["exchange_s"] / n["rounds"] for n in nodes)
    tokens_per_step = BATCH_TOKENS
    gpu_steps = args.gpu_inner_steps or args.inner_steps
    return {
        "nodes": nodes,
        "overall": {
            "utilization": round(statistics.fmean(n["utilization"] for n in nodes), 4),
            "gpu_equivalent_utilization": round(
                statistics.fmean(n["gpu_equivalent_utilization"] for n in nodes), 4
            ),
            "gpu_inner_steps_per_round": gpu_steps,
            "gpu_round_tokens": int(gpu_steps * tokens_per_step),
            "gpu_round_s": round(gpu_steps * tokens_per_step / gpu_tps, 3),
            "inner_steps_for_95pct_on_gpu": max(n["inner_steps_for_95pct_on_gpu"] for n in nodes),
            "gpu_tokens_per_s_assumed": round(gpu_tps),
            "gpu_assumption": (
                f"{args.gpu_tokens_per_s} tokens/s given"
                if args.gpu_tokens_per_s
                else f"RTX 4090, {RTX_4090_BF16_FLOPS / 1e12} TFLOP/s bf16 (fp32 accumulate), "
                f"MFU {args.gpu_mfu}, 6 FLOPs per parameter per token"
            ),
            "parameters": numel,
            "overlap": args.overlap,
            "gpu_overlap_steps": max(1, math.ceil(mean_exchange_s / gpu_step_s))
            if args.overlap
            else None,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--upload-mbps", type=float, default=20.0)
    parser.add_argument("--download-mbps", type=float, default=None)
    parser.add_argument("--rounds", type=int, default=4, help="measured rounds (+1 warm-up)")
    parser.add_argument("--inner-steps", type=int, default=20)
    parser.add_argument(
        "--round-tokens",
        type=int,
        default=0,
        help="close rounds at this global token budget (nodes never wait for stragglers); "
        "0: every node does --inner-steps",
    )
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--codec", default="int4")
    parser.add_argument(
        "--overlap", action="store_true", help="train round r+1 while round r is exchanged"
    )
    parser.add_argument(
        "--verify-means",
        choices=("on", "off"),
        default="on",
        help="a second owner per shard ([defences] verify_means; on by default in runs)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per node")
    parser.add_argument(
        "--gpu-inner-steps",
        type=int,
        default=None,
        help="inner steps per round for the GPU-equivalent figure (default: --inner-steps)",
    )
    parser.add_argument("--gpu-mfu", type=float, default=0.4)
    parser.add_argument("--gpu-tokens-per-s", type=float, default=None)
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.nodes < 1 or args.rounds < 2 or args.inner_steps < 1 or args.upload_mbps <= 0:
        parser.error("need --nodes, --inner-steps >= 1, --rounds >= 2 and --upload-mbps > 0")
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        measured = run(args, Path(tmp))
    report = summarize(measured["per_node"], measured["numel"], args)
    report["config"] = {k: v for k, v in vars(args).items() if k != "json"}
    report["cpus"] = os.cpu_count()
    report["wall_s"] = round(time.time() - started, 1)
    if not args.json:
        overall = report["overall"]
        print(
            f"utilization {overall['utilization']:.1%} (CPU), "
            f"{overall['gpu_equivalent_utilization']:.1%} GPU-equivalent",
            file=sys.stderr,
        )
    print(json.dumps(report))


if __name__ == "__main__":
    main()

"""`starling demo`: a whole run on this machine — a coordinator and N nodes as separate
processes, real gRPC on loopback, the embedded corpus — with a summary at the end.

The demo drives the same commands a run host and volunteers type (`starling coordinator
init/serve`, `starling node join`), as child processes; it only reads what they publish
(the join URL, the status service, checkpoints and the nodes' summaries)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console

from starling.checkpoint import read_state_checkpoint, state_from_blob
from starling.coordination import CoordinatorClient
from starling.data import TokenDataset, evaluation_batches
from starling.diloco import load_flat_parameters
from starling.model import ModelConfig, build_model
from starling.train import InnerTrainer, TrainConfig, select_device

app = typer.Typer(invoke_without_command=True)
err_console = Console(stderr=True)

# Rounds of 20 inner steps of 2,048 tokens per node: about 15 s a round with 3 nodes
# on a 2-core CPU, and the loss visibly falls within a few rounds.
DEMO_CONFIG = """
[run]
name = "starling-demo"
target_tokens = {target}

[round]
inner_steps = {inner_steps}
deadline_s = 300.0
exchange_deadline_s = 60.0

[train]
batch_tokens = 2048
micro_batch_size = 8
lr = 0.003
warmup_steps = 10
eval_batches = 4

[checkpoints]
every = 1
keep = 2

[membership]
heartbeat_s = 1.0
lease_s = 15.0
data_lease_s = 60.0
min_nodes = {nodes}
"""


@app.callback()
def demo_command(
    nodes: Annotated[int, typer.Option(help="Node processes to start.")] = 3,
    rounds: Annotated[int, typer.Option(help="Rounds every node contributes to.")] = 8,
    inner_steps: Annotated[int, typer.Option(help="Inner steps per round (H).")] = 20,
    work_dir: Annotated[
        Path | None, typer.Option(help="Where the run goes (default: a new temp dir).")
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Non-interactive; a JSON summary as the last line.")
    ] = False,
    device: Annotated[
        str,
        typer.Option(
            help="The nodes' device, or a comma list taken in turn (cuda,cpu: node 0 on "
            "the GPU, node 1 on the CPU, ...): a mixed run shows bit-identical states."
        ),
    ] = "cpu",
) -> None:
    """Run a coordinator and N nodes on this machine on the embedded corpus."""
    if nodes < 1 or rounds < 1 or inner_steps < 1:
        raise ValueError("--nodes, --rounds and --inner-steps must be at least 1")
    devices = [d.strip() for d in device.split(",")]
    for name in devices:
        select_device(name)  # a clear error now, not in a node's log later
    root = work_dir or Path(tempfile.mkdtemp(prefix="starling-demo-"))
    summary = run_demo(root, nodes, rounds, inner_steps, quiet=json_output, devices=devices)
    if json_output:
        print(json.dumps(summary))


def _starling(*args: str) -> list[str]:
    return [sys.executable, "-m", "starling", *args]


def run_demo(
    root: Path,
    nodes: int,
    rounds: int,
    inner_steps: int,
    quiet: bool,
    devices: list[str] | None = None,
) -> dict[str, Any]:
    devices = devices or ["cpu"]
    started = time.monotonic()
    root.mkdir(parents=True, exist_ok=True)
    run_dir = root / "run"
    config = root / "demo.toml"
    target = nodes * rounds * inner_steps * 2048
    config.write_text(DEMO_CONFIG.format(target=target, inner_steps=inner_steps, nodes=nodes))
    say = err_console.print
    say(f"creating the run in {run_dir}")
    subprocess.run(
        _starling("coordinator", "init", str(run_dir), "--config", str(config)),
        check=True,
        stdout=subprocess.DEVNULL,
    )
    children: list[subprocess.Popen[str]] = []

    def stop_all(*_: object) -> None:
        for child in children:
            if child.poll() is None:
                child.terminate()

    def interrupted(signum: int, frame: object) -> None:
        stop_all()
        sys.exit(130)

    previous = {sig: signal.signal(sig, interrupted) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        coordinator_log = (root / "coordinator.log").open("w")
        coordinator = subprocess.Popen(
            _starling("coordinator", "serve", str(run_dir), "--http-port", "0"),
            stdout=subprocess.PIPE,
            stderr=coordinator_log,
            text=True,
        )
        children.append(coordinator)
        assert coordinator.stdout is not None
        url = coordinator.stdout.readline().strip()
        dashboard = coordinator.stdout.readline().strip().removeprefix("dashboard ")
        if not url.startswith("starling://"):
            raise RuntimeError(f"the coordinator did not start: see {root / 'coordinator.log'}")
        say(f"coordinator: {url}")
        say(f"dashboard:   {dashboard}")
        node_dirs = [root / "nodes" / f"node{i}" for i in range(nodes)]
        for i, node_dir in enumerate(node_dirs):
            node_dir.mkdir(parents=True, exist_ok=True)
            log = (node_dir / "node.log").open("w")
            children.append(
                subprocess.Popen(
                    _starling(
                        "node",
                        "join",
                        url,
                        "--work-dir",
                        str(node_dir),
                        "--max-rounds",
                        str(rounds),
                        "--device",
                        devices[i % len(devices)],
                        "--summary-json",
                        str(node_dir / "summary.json"),
                    ),
                    stdout=log,
                    stderr=log,
                    env={**os.environ, "OMP_NUM_THREADS": "1"},
                    text=True,
                )
            )
        say(f"{nodes} nodes joining; each contributes to {rounds} rounds of {inner_steps} steps")
        last_round = -1
        with CoordinatorClient(url) as client:
            while any(c.poll() is None for c in children[1:]):
                status = client.get_status()
                if status.HasField("last_commit") and status.last_commit.round > last_round:
                    last_round = status.last_commit.round
                    commit = status.last_commit
                    say(
                        f"round {commit.round} committed: {len(commit.contributors)} "
                        f"contributors, {commit.tokens:,} tokens, "
                        f"{commit.duration_s:.1f} s"
                    )
                time.sleep(0.5)  # a progress display's refresh, not synchronisation
            failed = [i for i, c in enumerate(children[1:]) if c.returncode != 0]
            if failed:
                raise RuntimeError(f"nodes {failed} failed: see {root / 'nodes'}/*/node.log")
            status = client.get_status()
        coordinator.terminate()
        coordinator.wait(30)
    finally:
        stop_all()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    summaries = [json.loads((d / "summary.json").read_text()) for d in node_dirs]
    fingerprints = _fingerprints(node_dirs)
    latest = status.latest_checkpoint
    agree = all(len(set(by_node.values())) == 1 for by_node in fingerprints.values())
    last = fingerprints.get(latest.round - 1, {})
    agree = agree and bool(last) and set(last.values()) == {latest.fingerprint}
    initial_loss = _val_loss(run_dir, 0)
    final_loss = _val_loss(run_dir, latest.round)
    summary = {
        "rounds_committed": status.last_commit.round + 1 if status.HasField("last_commit") else 0,
        "nodes": nodes,
        "devices": [devices[i % len(devices)] for i in range(nodes)],
        "initial_val_loss": initial_loss,
        "final_val_loss": final_loss,
        "fingerprints_agree": agree,
        "wire_bytes_per_node": sum(s["bytes_sent"] + s["bytes_received"] for s in summaries)
        / nodes,
        "final_checkpoint": {"round": latest.round, "sha256": latest.sha256},
        "wall_s": time.monotonic() - started,
        "run_dir": str(run_dir),
    }
    say(
        f"done: {summary['rounds_committed']} rounds, validation loss "
        f"{initial_loss:.4f} → {final_loss:.4f}, fingerprints "
        f"{'agree' if agree else 'DISAGREE'}; run kept in {run_dir}"
    )
    return summary


def _fingerprints(node_dirs: list[Path]) -> dict[int, dict[str, str]]:
    """round -> node -> fingerprint, from each node's log of applied rounds."""
    rounds: dict[int, dict[str, str]] = {}
    for node_dir in node_dirs:
        for log in node_dir.glob("runs/*/fingerprints.jsonl"):
            for line in log.read_text().splitlines():
                entry = json.loads(line)
                rounds.setdefault(entry["round"], {})[node_dir.name] = entry["fingerprint"]
    return rounds


def _val_loss(run_dir: Path, round_: int) -> float:
    """Validation loss of checkpoint `round_` on the run's held-out split."""
    blob, manifest = read_state_checkpoint(run_dir / "checkpoints" / f"{round_:06d}")
    params, _ = state_from_blob(blob)
    model = build_model(ModelConfig.from_dict(manifest["model"]))
    load_flat_parameters(model, params)
    data = TokenDataset(run_dir / "data")
    cfg = TrainConfig(seq_len=model.config.max_seq_len, device="cpu")
    batches = evaluation_batches(data.split("val"), cfg.seq_len, cfg.micro_batch_size, 8)
    return InnerTrainer(model, cfg, torch.device("cpu")).evaluate(batches)

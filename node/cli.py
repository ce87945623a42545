"""`starling node join URL`: the volunteer's command. Registered with the core CLI
through the `starling.commands` entry point (the core never imports the node)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import Annotated

import grpc
import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from starling.train import select_device

from .daemon import NodeDaemon, NodeOptions, NodeStatus
from .distributed import NodeGroup, launched_by_torchrun, run_follower

app = typer.Typer(help="Contribute to a run: join it with this machine.", no_args_is_help=True)
err_console = Console(stderr=True)


def default_work_dir() -> Path:
    return Path.home() / ".cache" / "starling" / "node"


@app.command("join")
def join_command(
    url: Annotated[str, typer.Argument(help="The run's join URL (starling://host:port?fp=...).")],
    work_dir: Annotated[
        Path | None, typer.Option(help="Identity and caches (default ~/.cache/starling/node).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
    upload_mbps: Annotated[float | None, typer.Option(help="Upload cap in Mbit/s.")] = None,
    download_mbps: Annotated[float | None, typer.Option(help="Download cap in Mbit/s.")] = None,
    max_rounds: Annotated[
        int | None, typer.Option(help="Leave after contributing to N rounds.")
    ] = None,
    token: Annotated[str, typer.Option(help="Join token (runs with a token policy).")] = "",
    peer_port: Annotated[int, typer.Option(help="Peer service port (0: a free one).")] = 0,
    advertise_host: Annotated[
        str | None, typer.Option(help="Address other peers dial (default: auto).")
    ] = None,
    client_only: Annotated[
        bool, typer.Option(help="Only dial out (behind NAT): own no shard.")
    ] = False,
    summary_json: Annotated[
        Path | None, typer.Option(help="Write a JSON summary here on exit.")
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Serve Prometheus metrics here (0: a free port).")
    ] = None,
    metrics_host: Annotated[
        str, typer.Option(help="Address the metrics listen on (0.0.0.0: every interface).")
    ] = "127.0.0.1",
    compute_share: Annotated[
        float,
        typer.Option(
            help="Train at most this fraction of the time (0 < f <= 1), e.g. 0.5 on a "
            "machine that is also used for other work."
        ),
    ] = 1.0,
) -> None:
    """Join a run and train until stopped: Ctrl-C or SIGTERM finishes the current
    exchange, leaves the run and exits 0."""
    if max_rounds is not None and max_rounds < 1:
        raise ValueError("--max-rounds must be at least 1")
    for name, port in (("--peer-port", peer_port), ("--metrics-port", metrics_port or 0)):
        if not 0 <= port < 65536:
            raise ValueError(f"{name} must be in 0..65535")
    if not 0 < compute_share <= 1:
        raise ValueError("--compute-share must be in (0, 1]")
    for name, cap in (("--upload-mbps", upload_mbps), ("--download-mbps", download_mbps)):
        if cap is not None and cap <= 0:
            raise ValueError(f"{name} must be positive")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr
    )
    options = NodeOptions(
        url=url,
        work_dir=work_dir or default_work_dir(),
        device=device,
        upload_mbps=upload_mbps,
        download_mbps=download_mbps,
        max_rounds=max_rounds,
        token=token,
        peer_port=peer_port,
        advertise_host=advertise_host,
        client_only=client_only,
        compute_share=compute_share,
    )
    if not launched_by_torchrun():
        _run_node(options, summary_json, metrics_port, metrics_host)
        return
    # torchrun --nproc-per-node N -m starling node join URL: rank 0 is the node (network,
    # exchange, outer step); the other ranks only train their FSDP shards.
    group = NodeGroup(select_device(device))
    try:
        if group.rank == 0:
            _run_node(replace(options, node_group=group), summary_json, metrics_port, metrics_host)
        else:
            run_follower(group)
    finally:
        group.stop()
    # Everything is written and the group is gone; skip the interpreter's finalization,
    # which can race gloo's C++ worker threads and abort a clean exit
    # (pytorch/pytorch#179291: "terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _run_node(
    options: NodeOptions, summary_json: Path | None, metrics_port: int | None, metrics_host: str
) -> None:
    view = _LiveView() if err_console.is_terminal else None
    metrics = None
    if metrics_port is not None:
        from .metrics import NodeMetrics

        metrics = NodeMetrics(metrics_port, metrics_host)
        logging.getLogger("starling.node").info(
            "metrics on http://%s:%d/metrics", metrics_host, metrics.port
        )

    def on_update(status: NodeStatus) -> None:
        if view is not None:
            view.update(status)
        if metrics is not None:
            metrics.update(status)

    daemon = NodeDaemon(options, on_update=on_update)

    def stop(signum: int, frame: FrameType | None) -> None:
        err_console.print("stopping: finishing the current step, then leaving the run")
        daemon.stop()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    refused = None
    try:
        with view.live if view is not None else contextlib.nullcontext():
            daemon.run_forever()
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.PERMISSION_DENIED:
            raise
        refused = err.details()  # banned, or the join token revoked: retrying cannot help
    if metrics is not None:
        metrics.close()
    summary = daemon.summary()
    if summary_json is not None:
        summary_json.write_text(json.dumps(summary))
    if refused is not None:
        err_console.print(f"refused by the coordinator: {refused}")
        raise typer.Exit(3)
    err_console.print(f"left after {summary['rounds_contributed']} rounds")


class _LiveView:
    """Round, phase, inner-step progress, tokens/s, loss, traffic, peers, recent events."""

    def __init__(self) -> None:
        self.live = Live(self._render(NodeStatus()), console=err_console, refresh_per_second=4)
        self.lock = threading.Lock()

    def update(self, status: NodeStatus) -> None:
        with self.lock:
            self.live.update(self._render(status))

    def _render(self, status: NodeStatus) -> Table:
        table = Table.grid(padding=(0, 2))
        done = status.step / status.steps if status.steps else 0.0
        bar = "█" * int(20 * min(done, 1.0))
        loss = "-" if status.loss is None else f"{status.loss:.4f}"
        table.add_row("round", f"{status.round}  ({status.phase})")
        table.add_row("inner steps", f"{bar:<20} {status.step}/{status.steps}")
        table.add_row("tokens/s", f"{status.tokens_per_s:,.0f}   loss {loss}")
        table.add_row(
            "traffic",
            f"↑ {status.bytes_sent / 1e6:,.1f} MB ({status.upload_mbps:,.1f} Mbit/s)  "
            f"↓ {status.bytes_received / 1e6:,.1f} MB ({status.download_mbps:,.1f} Mbit/s)",
        )
        table.add_row("peers", f"{status.peers}   rounds contributed {status.rounds_contributed}")
        for event in status.events[-4:]:
            table.add_row("", event)
        return table

"""`starling coordinator ...`: init, serve, token. Registered with the core CLI through
the `starling.commands` entry point (the core never imports the coordinator)."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from starling.progress import PrepareProgress
from starling.runconfig import RunConfig

from .heap import configure_heap
from .rundir import RunDir, create_join_token, init_run, parse_duration
from .service import Coordinator
from .store import Store

app = typer.Typer(help="Host a run: init, serve, join tokens.", no_args_is_help=True)
token_app = typer.Typer(help="Join tokens for runs whose policy is `token`.", no_args_is_help=True)
app.add_typer(token_app, name="token")
err_console = Console(stderr=True)


@app.command("init")
def init_command(
    run_dir: Annotated[Path, typer.Argument(help="The run directory to create.")],
    config: Annotated[
        Path | None, typer.Option(help="Run config (TOML); defaults: embedded corpus, tiny.")
    ] = None,
    host: Annotated[
        list[str] | None,
        typer.Option(help="Host names / IPs to put in the TLS certificate (repeatable)."),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print a JSON summary.")] = False,
) -> None:
    """Create a run directory: config, tokenizer + data shards, θ₀ as checkpoint 0,
    identity, TLS certificate, database and admin token."""
    run_config = RunConfig() if config is None else RunConfig.load(config)
    with PrepareProgress(err_console) as progress:
        summary = init_run(run_dir, run_config, hosts=host or [], progress=progress.update)
    err_console.print(
        f"run {summary['name']} ({summary['run_id']}) created in {run_dir}: "
        f"{summary['parameters']:,} parameters, {summary['train_tokens']:,} training tokens "
        f"in {summary['data_shards']} data shards; admin token in {run_dir / 'admin_token'}"
    )
    if json_output:
        print(json.dumps(summary))


@app.command("serve")
def serve_command(
    run_dir: Annotated[Path, typer.Argument(help="A directory made by `coordinator init`.")],
    grpc_port: Annotated[int, typer.Option(help="gRPC port (0: a free one).")] = 0,
    http_port: Annotated[
        int | None, typer.Option(help="Dashboard / JSON API port (0: a free one).")
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    advertise_host: Annotated[
        str | None, typer.Option(help="Host name nodes dial (default: --host).")
    ] = None,
    tls: Annotated[
        bool | None,
        typer.Option("--tls/--no-tls", help="Default: TLS unless serving on loopback only."),
    ] = None,
) -> None:
    """Serve the run: prints the join URL on a line of its own and writes it to
    RUN_DIR/join_url. SIGTERM or Ctrl-C stops cleanly (everything is already durable)."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr
    )
    if not 0 <= grpc_port < 65536 or (http_port is not None and not 0 <= http_port < 65536):
        raise ValueError("ports must be in 0..65535")
    run = RunDir.open(run_dir)
    configure_heap()  # before gRPC and the event loop start their threads
    asyncio.run(_serve(run, host, grpc_port, http_port, advertise_host, tls))


async def _serve(
    run: RunDir,
    host: str,
    grpc_port: int,
    http_port: int | None,
    advertise_host: str | None,
    tls: bool | None,
) -> None:
    from .http import StatusHttpServer

    coordinator = Coordinator(run, host, grpc_port, advertise_host, tls)
    await coordinator.start()
    http = None
    if http_port is not None:
        http = StatusHttpServer(coordinator, host, http_port)
        http.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # The join URL alone on its line, unwrapped (not through rich): people copy it.
    print(coordinator.join_url, flush=True)
    if http is not None:
        print(f"dashboard http://{coordinator.advertise_host or host}:{http.port}/", flush=True)
    await stop.wait()
    if http is not None:
        http.stop()
    await coordinator.stop()


@token_app.command("create")
def token_create(
    run_dir: Annotated[Path, typer.Argument(help="The run directory.")],
    expires: Annotated[str, typer.Option(help="Lifetime: 90s, 15m, 12h, 7d.")] = "7d",
    label: Annotated[str, typer.Option(help="A note for the list.")] = "",
) -> None:
    """Create a join token (printed once; only its hash is stored)."""
    ttl = parse_duration(expires)
    store = _store(run_dir)
    try:
        token_id, token = create_join_token(store, label, ttl)
    finally:
        store.close()
    err_console.print(f"token {token_id} expires in {expires}")
    print(token)


@token_app.command("list")
def token_list(
    run_dir: Annotated[Path, typer.Argument(help="The run directory.")],
    json_output: Annotated[bool, typer.Option("--json", help="One JSON list.")] = False,
) -> None:
    """List join tokens (ids, labels, expiry, revoked) — never the tokens themselves."""
    store = _store(run_dir)
    try:
        tokens = store.join_tokens()
    finally:
        store.close()
    if json_output:
        print(json.dumps(tokens))
        return
    import time

    for t in tokens:
        left = t["expires"] - time.time()
        state = "revoked" if t["revoked"] else ("expired" if left <= 0 else f"{left / 3600:.1f} h")
        print(f"{t['token_id']}  {state:>10}  {t['label']}")


@token_app.command("revoke")
def token_revoke(
    run_dir: Annotated[Path, typer.Argument(help="The run directory.")],
    token_id: Annotated[str, typer.Argument(help="The token's id (from `token list`).")],
) -> None:
    """Revoke a join token: nodes can no longer join with it."""
    store = _store(run_dir)
    try:
        with store.transaction():
            found = store.revoke_join_token(token_id)
    finally:
        store.close()
    if not found:
        raise ValueError(f"no token with id {token_id!r} (see `starling coordinator token list`)")
    err_console.print(f"token {token_id} revoked")


def _store(run_dir: Path) -> Store:
    run = RunDir.open(run_dir)  # checks it is a run directory
    return run.store()


@app.command("health")
def health_command(
    run_dir: Annotated[Path, typer.Argument(help="The run directory being served.")],
    host: Annotated[
        str, typer.Option(help="Where to reach the coordinator (default: this machine).")
    ] = "127.0.0.1",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the answer.")] = 5.0,
) -> None:
    """Exit 0 when the coordinator serving RUN_DIR answers gRPC's health check with
    SERVING (a container health check); 1 otherwise. Dials RUN_DIR/join_url's port on
    --host with TLS pinned to its fingerprint."""
    from dataclasses import replace

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from starling.coordination import SERVICE, JoinUrl, open_coordinator_channel

    url_file = run_dir / "join_url"
    if not url_file.is_file():
        raise ValueError(f"{url_file} does not exist: is the run being served?")
    url = replace(JoinUrl.parse(url_file.read_text().strip()), host=host)
    try:
        with open_coordinator_channel(url, connect_timeout=timeout) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=timeout)
    except (grpc.RpcError, OSError, ConnectionError) as err:
        err_console.print(f"unhealthy: {err}")
        raise typer.Exit(1) from None
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    print("SERVING" if serving else health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    raise typer.Exit(0 if serving else 1)

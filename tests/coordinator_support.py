"""Helpers for the coordinator tests: a run directory made once per session, a
coordinator serving it on a real socket (in a thread of this process, or as a real
`starling coordinator serve` process), and nodes that talk to it over gRPC."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from starling.coordination import CoordinatorClient, JoinUrl
from starling.coordinator.rundir import CONFIG_FILE, RunDir, init_run
from starling.coordinator.service import Coordinator
from starling.exchange import ExchangePeer, PeerConfig
from starling.identity import Identity, create_tls_certificate
from starling.runconfig import RunConfig
from starling.v1 import coordinator_pb2 as pb

# A small corpus (fast init) with enough documents for a held-out split and a few shards.
CORPUS = "\n\n".join(
    f"Paragraph {i}: the starling flies over field {i % 7} and sings {i * 13 % 97} notes."
    for i in range(3000)
)


def micro_run_toml(name: str, target_tokens: int, corpus: Path) -> str:
    """The [run], [model] and [data] sections of a run small enough for end-to-end tests
    with real processes: a one-layer, 32-wide model on the byte tokenizer."""
    return f"""
[run]
name = "{name}"
target_tokens = {target_tokens}

[model]
preset = "tiny"
dim = 32
n_layers = 1
n_heads = 2
n_kv_heads = 2
max_seq_len = 64

[data]
source = "{corpus}"
tokenizer = "bytes"
shard_tokens = 16384
"""


def make_template(root: Path) -> Path:
    corpus = root / "corpus.txt"
    corpus.write_text(CORPUS)
    config = RunConfig.from_dict(
        {
            "data": {
                "source": str(corpus),
                "tokenizer": "bytes",
                "val_fraction": 0.05,
                "shard_tokens": 16384,
            },
            "model": {
                "preset": "tiny",
                "dim": 32,
                "n_layers": 1,
                "n_heads": 2,
                "n_kv_heads": 2,
                "ffn_dim": 64,
                "max_seq_len": 64,
            },
        }
    )
    run_dir = root / "template"
    init_run(run_dir, config)
    return run_dir


def copy_run(template: Path, target: Path, **sections: dict[str, Any]) -> Path:
    """A copy of the template run with some config sections overridden."""
    shutil.copytree(template, target)
    import tomllib

    data = tomllib.loads((target / CONFIG_FILE).read_text())
    # The warmup init pinned is a quarter of the template's schedule: pinned again for
    # the copy's (its target tokens or batch may differ), unless the copy gives one.
    data.get("train", {}).pop("warmup_steps", None)
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    config = RunConfig.from_dict(data).with_warmup_pinned()
    (target / CONFIG_FILE).write_text(config.to_toml())
    return target


class CoordinatorThread:
    """A Coordinator on its own event loop in a thread, serving a real socket."""

    def __init__(self, run_dir: Path, port: int = 0, **kwargs: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.coordinator = Coordinator(RunDir.open(run_dir), port=port, **kwargs)
        self.call(self.coordinator.start())
        self.url = self.coordinator.join_url

    def call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(60)

    def status(self) -> pb.RunStatus:
        async def read() -> pb.RunStatus:
            return self.coordinator.status()

        return self.call(read())

    def stop(self) -> None:
        self.call(self.coordinator.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class CoordinatorProcess:
    """`starling coordinator serve` as a real process (to kill -9)."""

    def __init__(self, run_dir: Path, grpc_port: int = 0) -> None:
        self.run_dir = run_dir
        (run_dir / "join_url").unlink(missing_ok=True)
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "starling",
                "coordinator",
                "serve",
                str(run_dir),
                "--grpc-port",
                str(grpc_port),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()  # the join URL, first line
        if not line.startswith("starling://"):
            raise RuntimeError(f"coordinator did not start: {line!r} {self.stderr()}")
        self.url = JoinUrl.parse(line)

    def stderr(self) -> str:
        if self.process.poll() is None:
            return ""
        assert self.process.stderr is not None
        return self.process.stderr.read()[-3000:]

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(20)


class Node:
    """A participant: identity, exchange peer (owner service unless client-only) and a
    signed coordinator client."""

    def __init__(self, url: JoinUrl, reachable: bool = True, tls: bool = False) -> None:
        self.identity = Identity.generate()
        self.client = CoordinatorClient(url, self.identity)
        self.run_id = self.client.run_id
        certificate = create_tls_certificate(["127.0.0.1"]) if tls else None
        self.peer = ExchangePeer(
            self.identity, PeerConfig(self.run_id, reachable=reachable), certificate
        )
        self.lease: pb.DataLease | None = None
        self._stop = threading.Event()
        self._beats: threading.Thread | None = None

    def keep_alive(self, interval_s: float) -> None:
        """Heartbeats in the background until close() (a real node's heartbeat loop)."""

        def beat() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.client.heartbeat("exchanging")
                except grpc.RpcError:
                    pass

        self._beats = threading.Thread(target=beat, daemon=True)
        self._beats.start()

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    def join(self, token: str = "") -> pb.JoinResponse:
        endpoint = self.peer.endpoint
        response = self.client.join(
            pb.Capabilities(device="cpu", memory_bytes=1 << 30, software="test"),
            advertise_address="" if endpoint is None else endpoint.address,
            cert_fingerprint="" if endpoint is None else endpoint.cert_fingerprint or "",
            join_token=token,
        )
        return response

    def close(self) -> None:
        self._stop.set()
        if self._beats is not None:
            self._beats.join(10)
        self.client.close()
        self.peer.close()


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Polls `predicate` until it returns something truthy; fails after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)

"""One exchange peer in its own process, driven by JSON lines: for the multi-process
tests and bench/exchange.py, which need real processes to kill, stall and time.

    python -m starling.exchange.harness '{"run_id": "r", "seed": 3, "numel": 1000}'

prints {"event": "ready", "node_id", "public_key", "address", "fingerprint"}, then reads
commands on stdin, one JSON object a line:
    {"cmd": "round", "spec": {...}, "tokens": N, "seeds": {node_id: seed}, "start_at": T}
        → {"event": "result", ...}: contributes its payload (a seeded normal vector),
          and reports what it received, with the error against the exact weighted mean
          of exactly the contributors listed.
    {"cmd": "quit"}
Faults (config "fault"): die-before-push, die-mid-push, die-after-push (SIGKILL itself),
stall-mid-push (SIGSTOP itself), forge-signature.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import torch

from starling.codecs import ErrorFeedback, make_codec
from starling.exchange.client import ExchangeClient
from starling.exchange.owner import OwnerService
from starling.exchange.peer import ExchangePeer, PeerConfig
from starling.exchange.plan import PeerEndpoint, RoundSpec, ShardPlan, encode_shards
from starling.exchange.transport import BandwidthLimits, keep_freed_memory
from starling.identity import Identity, create_tls_certificate
from starling.v1 import peer_pb2

FAULTS = (
    "none",
    "die-before-push",
    "die-mid-push",
    "die-after-push",
    "stall-mid-push",
    "forge-signature",
)


SHARED_SEED = (1 << 31) - 1


@functools.lru_cache(maxsize=8)
def payload_of(seed: int, numel: int) -> torch.Tensor:
    """The contribution of the peer with this seed, shape (numel,): a direction every
    peer shares plus N(0, 1) values of its own. Like the pseudo-gradients of one round,
    contributions agree in direction; the owners' screening (starling.robust) excludes
    ones that do not."""
    shared = torch.randn(numel, generator=torch.Generator().manual_seed(SHARED_SEED))
    return shared.add_(torch.randn(numel, generator=torch.Generator().manual_seed(seed)))


def spec_to_json(spec: RoundSpec) -> dict[str, Any]:
    return {
        "run_id": spec.run_id,
        "round": spec.round,
        "codec": spec.codec,
        "bounds": list(spec.plan.bounds),
        "owners": [
            {
                "node_id": o.node_id,
                "address": o.address,
                "fingerprint": o.cert_fingerprint,
                "public_key": o.public_key.hex() if o.public_key else None,
            }
            for o in spec.owners
        ],
        "participants": {n: k.hex() for n, k in spec.participants.items()},
        "deadline": spec.deadline,
        "gather_timeout_s": spec.gather_timeout_s,
    }


def spec_from_json(data: dict[str, Any]) -> RoundSpec:
    owners = tuple(
        PeerEndpoint(
            o["node_id"],
            o["address"],
            o["fingerprint"],
            bytes.fromhex(o["public_key"]) if o["public_key"] else None,
        )
        for o in data["owners"]
    )
    return RoundSpec(
        run_id=data["run_id"],
        round=data["round"],
        codec=data["codec"],
        plan=ShardPlan(tuple(data["bounds"])),
        owners=owners,
        participants={n: bytes.fromhex(k) for n, k in data["participants"].items()},
        deadline=data["deadline"],
        gather_timeout_s=data["gather_timeout_s"],
    )


class FaultyClient(ExchangeClient):
    """An ExchangeClient that misbehaves on purpose at a precise point."""

    fault = "none"
    remote_pushes_left = 0

    async def _stream(
        self, round_: int, peer: str, header: peer_pb2.ContributionHeader, payload: bytes
    ) -> AsyncIterator[bytes]:
        if self.fault == "forge-signature":
            header.signature = bytes(64)
        sent = 0
        half = len(payload) // 2
        async for message in super()._stream(round_, peer, header, payload):
            yield message
            sent += len(message)
            if sent >= half and self.fault == "die-mid-push":
                os.kill(os.getpid(), signal.SIGKILL)
            if sent >= half and self.fault == "stall-mid-push":
                os.kill(os.getpid(), signal.SIGSTOP)

    async def _push(
        self,
        spec: RoundSpec,
        shard: int,
        tokens: int,
        payload: bytes,
        local: OwnerService | None,
        window: asyncio.Semaphore | None = None,
        to: PeerEndpoint | None = None,
    ) -> None:
        await super()._push(spec, shard, tokens, payload, local, window, to)
        if to is None and spec.owners[shard].node_id != self.identity.node_id:
            self.remote_pushes_left -= 1
            if self.remote_pushes_left == 0 and self.fault == "die-after-push":
                os.kill(os.getpid(), signal.SIGKILL)


def emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def run_round(peer: ExchangePeer, config: dict[str, Any], command: dict[str, Any]) -> None:
    spec = spec_from_json(command["spec"])
    fault = config.get("fault", "none")
    client = peer.client
    if isinstance(client, FaultyClient):
        client.remote_pushes_left = sum(o.node_id != peer.identity.node_id for o in spec.owners)
    peer.open_round(spec)
    delta = payload_of(config["seed"], spec.plan.numel)
    start_at = command.get("start_at", time.time())
    time.sleep(max(0.0, start_at - time.time()))  # every peer starts the round together
    started = time.time()
    if fault == "die-before-push":
        os.kill(os.getpid(), signal.SIGKILL)
    payloads, _ = encode_shards(spec.plan, delta, ErrorFeedback(make_codec(spec.codec)))
    result = peer.all_reduce(spec, payloads, command["tokens"])
    wall_s = time.time() - started
    max_abs_err = None
    if not result.missing_shards and command.get("check", True):
        max_abs_err = 0.0
        inputs = {n: payload_of(command["seeds"][n], spec.plan.numel) for n in command["seeds"]}
        for outcome in result.shards:
            # The exact weighted mean of exactly the contributors this shard lists.
            start, end = spec.plan.range(outcome.shard)
            total = torch.zeros(end - start, dtype=torch.float64)
            for node_id, tokens in outcome.contributors.items():
                total += inputs[node_id][start:end].double() * tokens
            exact = total / sum(outcome.contributors.values())
            err = (result.mean[start:end].double() - exact).abs().max().item()
            max_abs_err = max(max_abs_err, err)
    emit(
        {
            "event": "result",
            "round": spec.round,
            "wall_s": wall_s,
            "finished_at": time.time(),
            "missing_shards": result.missing_shards,
            "failed_owners": sorted(result.failed_owners),
            "contributors": result.contributors,
            "shards": [
                {
                    "shard": o.shard,
                    "committed": o.committed,
                    "pushed": o.pushed,
                    "push_error": o.push_error,
                    "error": o.error,
                    "contributors": o.contributors,
                    "excluded": o.excluded,
                    "push_done_s": o.push_done_s,
                    "mean_done_s": o.mean_done_s,
                }
                for o in result.shards
            ],
            "max_abs_err": max_abs_err,
            "traffic": {p: [t.sent, t.received] for p, t in peer.traffic(spec.round).items()},
        }
    )


def main() -> None:
    config = json.loads(sys.argv[1])
    # Several peers share this machine's cores: one intra-op thread each, as a node
    # alone on its machine would have them all.
    torch.set_num_threads(config.get("threads", 1))
    if config.get("keep_freed_memory", True):
        keep_freed_memory()
    if config.get("fault", "none") not in FAULTS:
        raise SystemExit(f"unknown fault {config['fault']!r}: use one of {FAULTS}")
    identity = Identity.generate()
    tls = create_tls_certificate([config.get("host", "127.0.0.1")]) if config.get("tls") else None
    limits = BandwidthLimits(config.get("upload_mbps"), config.get("download_mbps"))
    peer_config = PeerConfig(
        run_id=config["run_id"],
        host=config.get("host", "127.0.0.1"),
        reachable=config.get("reachable", True),
        limits=limits,
        streams=config.get("streams", 1),
    )
    with ExchangePeer(identity, peer_config, tls) as peer:
        if config.get("fault", "none") != "none":
            faulty = FaultyClient(
                identity, peer.ledger, peer.upload, peer.download, streams=peer_config.streams
            )
            faulty.fault = config["fault"]
            peer.client = faulty
        endpoint = peer.endpoint
        emit(
            {
                "event": "ready",
                "node_id": identity.node_id,
                "public_key": identity.public_key.hex(),
                "address": endpoint.address if endpoint else None,
                "fingerprint": endpoint.cert_fingerprint if endpoint else None,
            }
        )
        for line in sys.stdin:
            command = json.loads(line)
            if command["cmd"] == "quit":
                break
            if command["cmd"] == "round":
                run_round(peer, config, command)


if __name__ == "__main__":
    main()


class Cluster:
    """K harness processes on this machine, and the rounds they run together."""

    def __init__(self, configs: list[dict[str, Any]], ready_timeout: float = 60.0) -> None:
        self.configs = configs
        self.processes: list[subprocess.Popen[str]] = []
        self.lines: list[queue.Queue[str | None]] = []
        self.ready: list[dict[str, Any]] = []
        try:
            for config in configs:
                self._spawn(config)
            deadline = time.monotonic() + ready_timeout
            for index in range(len(configs)):
                event = self.next_event(index, deadline - time.monotonic())
                if event is None or event.get("event") != "ready":
                    raise RuntimeError(f"peer {index} did not start: {self.stderr_tail(index)}")
                self.ready.append(event)
        except BaseException:
            self.close()
            raise

    def _spawn(self, config: dict[str, Any]) -> None:
        # "launcher": a command prefix, e.g. ["ip", "netns", "exec", "hm_h0"] (a shaped link)
        launcher = config.get("launcher", [])
        command = [*launcher, sys.executable, "-m", "starling.exchange.harness", json.dumps(config)]
        log = tempfile.TemporaryFile(mode="w+")
        process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True
        )
        process.stderr_log = log  # type: ignore[attr-defined]
        lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                lines.put(line)
            lines.put(None)  # end of output: the process exited (or was killed)

        threading.Thread(target=pump, daemon=True).start()
        self.processes.append(process)
        self.lines.append(lines)

    def next_event(self, index: int, timeout: float) -> dict[str, Any] | None:
        """The peer's next JSON event, or None if it exited or the timeout passed."""
        try:
            line = self.lines[index].get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None
        return None if line is None else json.loads(line)

    def stderr_tail(self, index: int, chars: int = 2000) -> str:
        log = self.processes[index].stderr_log  # type: ignore[attr-defined]
        log.seek(0)
        return str(log.read())[-chars:]

    @property
    def node_ids(self) -> list[str]:
        return [r["node_id"] for r in self.ready]

    def endpoint(self, index: int) -> PeerEndpoint | None:
        ready = self.ready[index]
        if ready["address"] is None:
            return None
        key = bytes.fromhex(ready["public_key"])
        return PeerEndpoint(ready["node_id"], ready["address"], ready["fingerprint"], key)

    def spec(
        self,
        round_: int,
        codec: str,
        numel: int,
        deadline_s: float,
        gather_timeout_s: float = 30.0,
        participants: list[int] | None = None,
    ) -> RoundSpec:
        """A round over the given peers (default all), one shard per reachable peer."""
        members = range(len(self.ready)) if participants is None else participants
        owners = [e for i in range(len(self.ready)) if (e := self.endpoint(i)) is not None]
        return RoundSpec(
            run_id=self.configs[0]["run_id"],
            round=round_,
            codec=codec,
            plan=ShardPlan.even(numel, len(owners)),
            owners=tuple(owners),
            participants={
                self.ready[i]["node_id"]: bytes.fromhex(self.ready[i]["public_key"])
                for i in members
            },
            deadline=time.time() + deadline_s,
            gather_timeout_s=gather_timeout_s,
        )

    def run_round(
        self,
        spec: RoundSpec,
        tokens: list[int],
        start_delay: float = 0.3,
        check: bool = True,
        timeout: float | None = None,
    ) -> list[dict[str, Any] | None]:
        """Starts the round on every live peer at the same instant; returns each peer's
        result (None for a peer that died or did not answer in time)."""
        start_at = time.time() + start_delay
        seeds = {r["node_id"]: c["seed"] for r, c in zip(self.ready, self.configs, strict=True)}
        members = [i for i, r in enumerate(self.ready) if r["node_id"] in spec.participants]
        for i in members:
            command = {
                "cmd": "round",
                "spec": spec_to_json(spec),
                "tokens": tokens[i],
                "seeds": {
                    self.ready[j]["node_id"]: seeds[self.ready[j]["node_id"]] for j in members
                },
                "start_at": start_at,
                "check": check,
            }
            self._send(i, command)
        if timeout is None:
            timeout = spec.deadline + spec.gather_timeout_s + 60.0 - time.time()
        end = time.monotonic() + timeout
        results: list[dict[str, Any] | None] = [None] * len(self.ready)
        for i in members:
            results[i] = self.next_event(i, end - time.monotonic())
        return results

    def _send(self, index: int, command: dict[str, Any]) -> None:
        process = self.processes[index]
        if process.poll() is not None or process.stdin is None:
            return
        try:
            process.stdin.write(json.dumps(command) + "\n")
            process.stdin.flush()
        except BrokenPipeError:
            pass  # it died: its result will be None

    def kill(self, index: int) -> None:
        process = self.processes[index]
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)  # a stopped process dies only once resumed
            process.kill()
        process.wait()

    def close(self) -> None:
        for index, process in enumerate(self.processes):
            self._send(index, {"cmd": "quit"})
            if process.stdin is not None:
                try:
                    process.stdin.close()
                except BrokenPipeError:
                    pass
        for index, process in enumerate(self.processes):
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill(index)
            process.stderr_log.close()  # type: ignore[attr-defined]

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

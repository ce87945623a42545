"""Baselines for bench/exchange.py: an fp32 average of K tensors with gloo and with hivemind.

Every peer is its own OS process (this file, run as `_worker`), started and paced by the
parent through JSON lines: the worker speaks on stdout, the parent answers on stdin. Before
each round the parent waits until every peer has re-copied its input and said "ready", then
tells all of them "go": that is the barrier. Each peer times from "go" to the averaged tensor
being in place, and a round's time is the max over peers: the round is over when the last
peer has its result. The barrier is outside the network, so it adds no bytes to the link.

    run_gloo(4, 100, rounds=3, warmup=1, upload_mbps=None, seed=0)
    python bench/exchange_baselines.py --system hivemind --peers 4 --megabytes 20 --upload-mbps 100

With upload_mbps, every peer runs in its own network namespace (hm_h0..) behind a tbf-shaped
link (the same rate up and down), made by ../shared/tools/netns_setup.sh; that needs root.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
NETNS_SETUP = REPO_ROOT.parent / "shared" / "tools" / "netns_setup.sh"
NETNS_IFACE = "hm0"  # each namespace's link to the bridge (netns_setup.sh)
MSG_PREFIX = "@@bench "  # marks protocol lines on a worker's stdout; other lines are ignored
SETUP_TIMEOUT_S = 300.0  # import torch/hivemind, build payloads, connect: 4 peers on 2 cores
TAIL_CHARS = 2000  # how much of a failed worker's stderr goes into the error


@dataclass(frozen=True)
class Host:
    """Where one peer runs: a network namespace (None: this one) and the address it binds."""

    netns: str | None
    addr: str


# --- public entry points -----------------------------------------------------------------


def run_gloo(
    peers: int, megabytes: float, rounds: int, warmup: int, upload_mbps: float | None, seed: int
) -> dict[str, Any]:
    """torch.distributed gloo: all_reduce(SUM) then divide by K, fp32."""
    return _run("gloo", peers, megabytes, rounds, warmup, upload_mbps, seed)


def run_hivemind(
    peers: int, megabytes: float, rounds: int, warmup: int, upload_mbps: float | None, seed: int
) -> dict[str, Any]:
    """hivemind DecentralizedAverager (butterfly all-reduce, NoCompression), one group of K."""
    return _run("hivemind", peers, megabytes, rounds, warmup, upload_mbps, seed)


def analytic_bytes_per_peer(peers: int, numel: int) -> int:
    """Bytes one peer sends per round in a ring or butterfly all-reduce: 2(K-1)/K of fp32."""
    return 2 * (peers - 1) * numel * 4 // peers


# --- parent: launch, pace, collect ---------------------------------------------------------


def _run(
    system: str,
    peers: int,
    megabytes: float,
    rounds: int,
    warmup: int,
    upload_mbps: float | None,
    seed: int,
) -> dict[str, Any]:
    if peers < 2 or rounds < 1 or warmup < 0 or megabytes <= 0:
        raise ValueError(
            "need peers >= 2, rounds >= 1, warmup >= 0, megabytes > 0; "
            f"got {peers=} {rounds=} {warmup=} {megabytes=}"
        )
    numel = int(megabytes * 1e6 / 4)
    round_timeout_s = _round_timeout_s(peers, numel, upload_mbps)
    with shaped_links(peers, upload_mbps) as hosts:
        cmds = [
            _worker_cmd(system, rank, hosts, numel, seed, rounds, warmup, round_timeout_s)
            for rank in range(peers)
        ]
        with _Peers(cmds, _worker_env(peers, upload_mbps is not None)) as group:
            per_round, tx_bytes = _drive(group, warmup + rounds, round_timeout_s)
    timed = per_round[warmup:]
    times = [max(p["time_s"] for p in r) for r in timed]  # the round ends with its last peer
    measured = upload_mbps is not None
    return {
        "system": system,
        "codec": "fp32",
        "peers": peers,
        "megabytes": megabytes,
        "median_s": statistics.median(times),
        "times_s": times,
        # hivemind: the all-reduce alone, after matchmaking; gloo has no matchmaking
        "allreduce_s": statistics.median(max(p["allreduce_s"] for p in r) for r in timed),
        "max_abs_err": max(p["err"] for r in timed for p in r),
        "bytes_sent_per_peer": (
            int(statistics.mean(tx_bytes) / rounds)
            if measured
            else analytic_bytes_per_peer(peers, numel)
        ),
        "bytes_measured": measured,
        "link": "netns-tbf" if measured else "loopback",
    }


def _round_timeout_s(peers: int, numel: int, upload_mbps: float | None) -> float:
    """Generous per-round deadline (s) so that a hang fails instead of blocking forever."""
    wire_s = 0.0
    if upload_mbps is not None:  # bits to send / bits per second on the capped uplink
        wire_s = analytic_bytes_per_peer(peers, numel) * 8 / (upload_mbps * 1e6)
    return 60.0 + numel * 4 / 2e6 + 5 * wire_s  # + 0.5 s per MB: slow CPUs, 2 cores shared


def _drive(
    group: _Peers, total_rounds: int, round_timeout_s: float
) -> tuple[list[list[dict]], list[int]]:
    """Hand out rank 0's address, run the rounds behind a barrier, return per-round reports."""
    addr = group.recv(0, "addr", SETUP_TIMEOUT_S)["addr"]
    for rank in range(1, group.size):
        group.send(rank, {"addr": addr})
    per_round: list[list[dict]] = []  # [round][rank] -> that peer's report
    for r in range(total_rounds):
        # the first "ready" also waits for everyone to connect (and hivemind to bootstrap)
        group.recv_all("ready", SETUP_TIMEOUT_S if r == 0 else round_timeout_s)
        group.send_all({"go": r})
        per_round.append(group.recv_all("round", round_timeout_s))
    group.send_all({"finish": True})  # all peers are done: now read the byte counters
    tx_bytes = [m["tx_bytes"] for m in group.recv_all("tx_bytes", round_timeout_s)]
    return per_round, tx_bytes


def _worker_cmd(
    system: str,
    rank: int,
    hosts: list[Host],
    numel: int,
    seed: int,
    rounds: int,
    warmup: int,
    round_timeout_s: float,
) -> list[str]:
    host = hosts[rank]
    prefix = ["ip", "netns", "exec", host.netns] if host.netns else []
    return prefix + [
        sys.executable, str(Path(__file__).resolve()), "_worker",
        "--system", system, "--rank", str(rank), "--peers", str(len(hosts)),
        "--numel", str(numel), "--seed", str(seed), "--host", host.addr,
        "--rounds", str(rounds), "--warmup", str(warmup),
        "--round-timeout-s", str(round_timeout_s),
    ] + (["--count-tx"] if host.netns else [])  # fmt: skip


def _worker_env(peers: int, netns: bool) -> dict[str, str]:
    env = dict(os.environ)
    # K peers share this machine's cores as if each were its own host: split them, or the
    # peers' thread pools fight over the same cores
    threads = str(max(1, (os.cpu_count() or 1) // peers))
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    env["GLOO_SOCKET_IFNAME"] = NETNS_IFACE if netns else "lo"  # else gloo resolves hostname
    return env


# --- parent: the shaped network ------------------------------------------------------------


@contextlib.contextmanager
def shaped_links(peers: int, upload_mbps: float | None) -> Iterator[list[Host]]:
    """Loopback, or K namespaces with tbf-shaped links that are always torn down again."""
    if upload_mbps is None:
        yield [Host(None, "127.0.0.1")] * peers
        return
    _check_netns_possible()
    rate = f"{upload_mbps:g}mbit"  # tc: mbit = 10^6 bit/s
    try:
        _netns_setup("up", str(peers), rate)
        yield [Host(f"hm_h{i}", f"10.77.0.{i + 1}") for i in range(peers)]
    finally:
        _netns_setup("down", str(peers))


def _check_netns_possible() -> None:
    if not NETNS_SETUP.is_file():
        raise RuntimeError(
            f"upload_mbps needs {NETNS_SETUP} (the shared tools folder), which is missing "
            "on this machine; run on loopback (upload_mbps=None)"
        )
    if os.geteuid() != 0:
        raise RuntimeError("upload_mbps shapes links with network namespaces and tc: run as root")
    existing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    if "hm_sw" in existing or "hm_h" in existing:
        raise RuntimeError(
            "network namespaces hm_* already exist: another benchmark is using them, "
            f"or a run left them behind ({NETNS_SETUP} down N)"
        )


def _netns_setup(*args: str) -> None:
    proc = subprocess.run(["bash", str(NETNS_SETUP), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"netns_setup.sh {' '.join(args)} failed: {proc.stderr[-TAIL_CHARS:]}")


# --- parent: the worker processes ----------------------------------------------------------


class _Peers:
    """K worker processes, each in its own process group (hivemind forks helpers and p2pd)."""

    def __init__(self, cmds: list[list[str]], env: dict[str, str]) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        self.logs: list[IO[bytes]] = []
        self.inbox: list[queue.Queue[dict | None]] = []
        try:
            for cmd in cmds:
                self._spawn(cmd, env)
        except BaseException:
            self.close()
            raise

    @property
    def size(self) -> int:
        return len(self.procs)

    def _spawn(self, cmd: list[str], env: dict[str, str]) -> None:
        log = tempfile.TemporaryFile()  # a file, not a pipe: hivemind logs enough to fill one
        self.logs.append(log)
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            env=env,
            text=True,
            start_new_session=True,
        )
        self.procs.append(proc)
        inbox: queue.Queue[dict | None] = queue.Queue()
        self.inbox.append(inbox)
        threading.Thread(target=_pump, args=(proc.stdout, inbox), daemon=True).start()

    def send(self, rank: int, msg: dict) -> None:
        stdin = self.procs[rank].stdin
        assert stdin is not None
        try:
            stdin.write(json.dumps(msg) + "\n")
            stdin.flush()
        except BrokenPipeError:
            raise self._failure([rank], f"exited before it got {msg}") from None

    def send_all(self, msg: dict) -> None:
        for rank in range(self.size):
            self.send(rank, msg)

    def recv(self, rank: int, key: str, timeout_s: float) -> dict:
        return self.recv_from([rank], key, timeout_s)[0]

    def recv_all(self, key: str, timeout_s: float) -> list[dict]:
        return self.recv_from(list(range(self.size)), key, timeout_s)

    def recv_from(self, ranks: list[int], key: str, timeout_s: float) -> list[dict]:
        """One message holding `key` from each of `ranks`, all within one deadline."""
        deadline = time.monotonic() + timeout_s
        msgs: list[dict] = []
        for rank in ranks:
            try:
                msg = self._next(rank, deadline)
            except TimeoutError:
                # name every peer still silent: the one we waited on may only be its victim
                late = [i for i in ranks[len(msgs) :] if self.inbox[i].empty()] or [rank]
                raise self._failure(late, f"sent no {key!r} within {timeout_s:.0f} s") from None
            if msg is None:
                code = self.procs[rank].wait()
                raise self._failure([rank], f"exited with code {code} before sending {key!r}")
            if key not in msg:
                raise self._failure([rank], f"sent {msg} when {key!r} was expected")
            msgs.append(msg)
        return msgs

    def _next(self, rank: int, deadline: float) -> dict | None:
        """The peer's next message; None once it has exited; TimeoutError past the deadline."""
        inbox, proc = self.inbox[rank], self.procs[rank]
        while True:
            # short waits: a dead peer's forked helpers may hold its stdout open (no EOF)
            with contextlib.suppress(queue.Empty):
                return inbox.get(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            if proc.poll() is not None:  # exited: its last line may still be in the pump
                with contextlib.suppress(queue.Empty):
                    return inbox.get(timeout=2.0)
                return None
            if time.monotonic() >= deadline:
                raise TimeoutError

    def _failure(self, ranks: list[int], what: str) -> RuntimeError:
        # their stderr, and that of any other peer that crashed (often the real cause)
        crashed = [
            i for i, p in enumerate(self.procs) if i not in ranks and p.poll() not in (0, None)
        ]
        tails = "".join(
            f"\n--- peer {i} stderr (tail) ---\n{self._tail(i)}" for i in ranks + crashed
        )
        who = f"peer {ranks[0]}" if len(ranks) == 1 else f"peers {ranks}"
        return RuntimeError(f"{who} {what}{tails}")

    def _tail(self, rank: int) -> str:
        log = self.logs[rank]
        log.seek(0, os.SEEK_END)
        log.seek(max(0, log.tell() - TAIL_CHARS))
        return log.read().decode(errors="replace")

    def close(self, grace_s: float = 30.0) -> None:
        """EOF to every peer (they exit on it), then kill whatever is left of each group."""
        for proc in self.procs:
            with contextlib.suppress(OSError):
                assert proc.stdin is not None
                proc.stdin.close()
        deadline = time.monotonic() + grace_s
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            # the group id is the peer's pid (start_new_session); takes stray hivemind children
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for log in self.logs:
            log.close()

    def __enter__(self) -> _Peers:
        return self

    def __exit__(self, *exc: object) -> None:
        # after a failure nobody waits politely: peers may be stuck inside a collective
        self.close(grace_s=30.0 if exc[0] is None else 2.0)


def _pump(stream: IO[str], inbox: queue.Queue[dict | None]) -> None:
    """Move a worker's protocol lines into its inbox; None marks end of stream."""
    for line in stream:
        if line.startswith(MSG_PREFIX):
            inbox.put(json.loads(line[len(MSG_PREFIX) :]))
    inbox.put(None)


# --- worker --------------------------------------------------------------------------------


def _say(msg: dict) -> None:
    print(MSG_PREFIX + json.dumps(msg), flush=True)


def _hear(key: str) -> dict:
    line = sys.stdin.readline()
    if not line:  # the parent is gone or gave up on us
        raise SystemExit(f"parent closed stdin while {key!r} was expected")
    msg = json.loads(line)
    if key not in msg:
        raise SystemExit(f"got {msg} while {key!r} was expected")
    return msg


def _payload(seed: int, numel: int) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(seed))


def _exact_mean(seed: int, peers: int, numel: int) -> torch.Tensor:
    """The float64 mean of all K payloads, built one payload at a time (numel float64)."""
    total = torch.zeros(numel, dtype=torch.float64)
    for i in range(peers):
        total += _payload(seed + i, numel)
    return total / peers


def _max_abs_err(result: torch.Tensor, exact: torch.Tensor, chunk: int = 1 << 22) -> float:
    """max |result - exact| in float64, in chunks of 4M values (32 MB temporaries)."""
    err = 0.0
    for start in range(0, result.numel(), chunk):
        part = result[start : start + chunk].double() - exact[start : start + chunk]
        err = max(err, part.abs().max().item())
    return err


def _tx_bytes() -> int:
    """Bytes this namespace's link has sent (L2 frames: what tbf shapes)."""
    return int(Path(f"/sys/class/net/{NETNS_IFACE}/statistics/tx_bytes").read_text())


class GlooPeer:
    """One rank of a gloo process group; rank 0 hosts the TCPStore on a kernel-chosen port."""

    def __init__(self, rank: int, peers: int, host: str, numel: int, timeout_s: float) -> None:
        import torch.distributed as dist

        self.dist, self.peers = dist, peers
        setup = datetime.timedelta(seconds=SETUP_TIMEOUT_S)
        if rank == 0:
            # port 0: the store binds, then we publish the port it got (no free-port race);
            # wait_for_workers=False, or this blocks before the others know where to connect
            store = dist.TCPStore(host, 0, peers, True, setup, wait_for_workers=False)
            _say({"addr": [host, store.port]})
        else:
            master, port = _hear("addr")["addr"]
            store = dist.TCPStore(master, port, peers, False, setup)
        op_timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(
            "gloo", store=store, rank=rank, world_size=peers, timeout=op_timeout
        )
        self.tensor = torch.empty(numel)

    def load(self, payload: torch.Tensor) -> None:
        self.tensor.copy_(payload)  # all_reduce works in place: start each round afresh

    def average(self) -> float:
        """Returns the all-reduce's own time (s): here, all of it."""
        start = time.perf_counter()
        self.dist.all_reduce(self.tensor, op=self.dist.ReduceOp.SUM)
        self.tensor.div_(self.peers)
        return time.perf_counter() - start

    def error(self, exact: torch.Tensor) -> float:
        return _max_abs_err(self.tensor, exact)

    def close(self) -> None:
        self.dist.destroy_process_group()


class HivemindPeer:
    """A DHT node and a DecentralizedAverager that only ever forms the full group of K."""

    POLL_S = 0.001  # how often we look at the step's stage to time its all-reduce part

    def __init__(self, rank: int, peers: int, host: str, numel: int, timeout_s: float) -> None:
        import hivemind
        from hivemind.compression import NoCompression

        listen = [f"/ip4/{host}/tcp/0"]  # port 0: the daemon picks, the DHT tells us
        if rank == 0:
            self.dht = hivemind.DHT(host_maddrs=listen, start=True)
            _say({"addr": [str(m) for m in self.dht.get_visible_maddrs()]})
        else:
            initial = _hear("addr")["addr"]
            self.dht = hivemind.DHT(initial_peers=initial, host_maddrs=listen, start=True)
        self.timeout_s = timeout_s
        self.averager = hivemind.averaging.DecentralizedAverager(
            [torch.zeros(numel)],  # moved to shared memory; the averager process writes into it
            self.dht,
            start=True,
            prefix="exchange_bench",
            target_group_size=peers,  # the group starts as soon as all K have joined
            min_group_size=peers,
            compression=NoCompression(),  # fp32 on the wire
            allreduce_timeout=timeout_s,
        )

    def load(self, payload: torch.Tensor) -> None:
        with self.averager.get_tensors() as tensors:
            tensors[0].copy_(payload)

    def average(self) -> float:
        """One step() as a user sees it; returns the time (s) from all-reduce start to done."""
        from hivemind.averaging.control import AveragingStage

        control = self.averager.step(timeout=self.timeout_s, wait=False)
        began = None
        while not control.done():
            if began is None and control.stage == AveragingStage.RUNNING_ALLREDUCE:
                began = time.perf_counter()
            time.sleep(self.POLL_S)
        control.result()  # raises if the step failed
        end = time.perf_counter()
        return end - (began if began is not None else end)

    def error(self, exact: torch.Tensor) -> float:
        with self.averager.get_tensors() as tensors:
            return _max_abs_err(tensors[0], exact)

    def close(self) -> None:
        self.averager.shutdown()
        self.dht.shutdown()


def _worker(args: argparse.Namespace) -> None:
    payload = _payload(args.seed + args.rank, args.numel)
    exact = _exact_mean(args.seed, args.peers, args.numel)
    kind: type[GlooPeer | HivemindPeer] = HivemindPeer if args.system == "hivemind" else GlooPeer
    peer = kind(args.rank, args.peers, args.host, args.numel, args.round_timeout_s)
    tx_start = 0
    for r in range(args.warmup + args.rounds):
        peer.load(payload)
        if r == args.warmup and args.count_tx:
            tx_start = _tx_bytes()
        _say({"ready": r})
        _hear("go")
        start = time.perf_counter()
        allreduce_s = peer.average()
        elapsed = time.perf_counter() - start
        _say({"round": r, "time_s": elapsed, "allreduce_s": allreduce_s, "err": peer.error(exact)})
    _hear("finish")  # every peer has its result, so every byte of the timed rounds is sent
    _say({"tx_bytes": _tx_bytes() - tx_start if args.count_tx else 0})
    peer.close()


def _worker_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="exchange_baselines.py _worker")
    p.add_argument("--system", choices=["gloo", "hivemind"], required=True)
    for name in ("--rank", "--peers", "--numel", "--seed", "--rounds", "--warmup"):
        p.add_argument(name, type=int, required=True)
    p.add_argument("--host", required=True)
    p.add_argument("--round-timeout-s", type=float, required=True)
    p.add_argument("--count-tx", action="store_true", help="read tx_bytes of hm0 (netns)")
    _worker(p.parse_args(argv))


def _worker_entry(argv: list[str]) -> None:
    try:
        _worker_main(argv)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        # take our hivemind helpers (averager, DHT, p2pd) down with us, even when the parent
        # is gone and cannot; only when we lead our own group, as _Peers starts us
        if os.getpgid(0) == os.getpid():
            os.killpg(0, signal.SIGKILL)
        os._exit(1)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds the finally blocks: peers killed, netns removed


def main() -> None:
    if sys.argv[1:2] == ["_worker"]:
        _worker_entry(sys.argv[2:])
        return
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--system", choices=["gloo", "hivemind"], required=True)
    p.add_argument("--peers", type=int, default=4)
    p.add_argument("--megabytes", type=float, default=100.0, help="fp32 payload per peer, 1e6 B")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--upload-mbps", type=float, default=None, help="cap each link (netns, root)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    run = run_gloo if a.system == "gloo" else run_hivemind
    print(json.dumps(run(a.peers, a.megabytes, a.rounds, a.warmup, a.upload_mbps, a.seed)))


if __name__ == "__main__":
    main()

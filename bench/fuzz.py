"""Fuzz benchmark: every gRPC method of the coordinator and of the Peer service (the
coordinator's own peer and a node's) gets malformed messages while a real run (a
coordinator process and honest node processes on loopback) keeps committing rounds.

    python bench/fuzz.py --messages 10000 --json

Kinds of message, in turn for every method:
  random      random bytes (0 to 4 KiB)
  empty       no bytes at all
  truncated   a well-formed (signed) message cut short
  bitflip     a well-formed (signed) message with 1 to 8 bits flipped
  wrong_type  a well-formed message of another method's type, signed for this one
  oversize    one byte over the largest message a server accepts
  absurd      re-signed so that it passes authentication, with absurd values: declared
              shapes and sizes of 2^64 - 1, negative and non-finite floats, 64 KiB
              strings, thousands of repeated entries
  nesting     length-delimited fields (or groups) nested 100 to 10,000 deep

Streaming methods get the mutated message first (a header), then a data chunk.
Every call has a 5 s client deadline; "answered" means a status from the server within
1 s. The long poll (GetRound's `wait_s`, up to 30 s by design) is only fuzzed with
values that must not wait (negative, NaN, -inf).

Prints one JSON object: messages, by_method and by_kind (count), statuses (code →
count), imprecise (UNKNOWN, INTERNAL or UNAVAILABLE answers: a server that did not say
what was wrong, or fell over; an owner's "round r is not open yet", its documented
retry-later answer, excepted), slow (answered after more than 1 s), max_latency_s,
p99_latency_s, max_latency_s_by_kind (the slowest answer of each kind: gRPC's tarpit
holds its own refusals, e.g. oversize, 100-500 ms on purpose; see
starling.exchange.transport.SERVER_OPTIONS), crashes (server processes that died),
unhandled (tracebacks and unexpected-error lines in the servers' logs),
rounds_committed_during (rounds the honest nodes committed while the fuzzer ran),
examples (one call per imprecise or slow status), wall_s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sqlite3
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chaos import Scenario  # noqa: E402  (a sibling script)

from starling.coordination import JoinUrl, sign_request  # noqa: E402
from starling.exchange.framing import length_delimited  # noqa: E402
from starling.exchange.transport import MAX_MESSAGE_BYTES  # noqa: E402
from starling.identity import Identity, contribution_message  # noqa: E402
from starling.v1 import coordinator_pb2, peer_pb2  # noqa: E402

KINDS = ("random", "empty", "truncated", "bitflip", "wrong_type", "oversize", "absurd", "nesting")
ANSWER_S = 1.0  # the bar: a status within this
CLIENT_TIMEOUT_S = 5.0  # beyond it the call counts as unanswered
PUBLIC = {"GetRun", "GetStatus", "FetchFile"}  # coordinator methods that are not signed
IMPRECISE = {"UNKNOWN", "INTERNAL", "UNAVAILABLE"}
# ... except the owners' documented answer to a round they have not opened (yet): the
# sender retries it until its deadline.
RETRY_LATER = "is not open yet"
# A fresh connection every this many messages: on loopback each connection is a peer
# of its own to the servers' request limits (starling.serving), which would otherwise
# answer most of a fast fuzzer's messages RESOURCE_EXHAUSTED, unread (bench/flood.py
# measures the limits).
PER_CONNECTION = 100
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.use_local_subchannel_pool", 1),  # its own connection, not a shared one
]
LOG_ALARMS = ("Traceback", "Unexpected error", "Exception in callback", "never retrieved")


@dataclass(frozen=True)
class Target:
    """One method of one server."""

    label: str  # e.g. "coordinator/Join", "node-peer/PushContribution"
    address: str
    path: str  # "/starling.v1.Coordinator/Join"
    name: str
    request: type[Message]
    client_streaming: bool
    server_streaming: bool
    signed: bool
    peer: bool


def targets(coordinator: str, peers: dict[str, str]) -> list[Target]:
    found = []
    services = [("coordinator", coordinator, coordinator_pb2, "Coordinator")]
    services += [(label, address, peer_pb2, "Peer") for label, address in peers.items()]
    for label, address, module, service_name in services:
        service = module.DESCRIPTOR.services_by_name[service_name]
        for method in service.methods:
            found.append(
                Target(
                    label=f"{label}/{method.name}",
                    address=address,
                    path=f"/{service.full_name}/{method.name}",
                    name=method.name,
                    request=message_factory.GetMessageClass(method.input_type),
                    client_streaming=method.client_streaming,
                    server_streaming=method.server_streaming,
                    signed=service_name == "Coordinator" and method.name not in PUBLIC,
                    peer=service_name == "Peer",
                )
            )
    return found


class Fuzzer:
    """Builds the malformed messages: well-formed ones from the descriptors, then broken."""

    def __init__(self, rng: random.Random, run_id: str, identity: Identity) -> None:
        self.rng = rng
        self.run_id = run_id
        self.identity = identity
        self.round = 0

    # --- well-formed messages --------------------------------------------------------

    def fill(self, message: Message, absurd: bool, depth: int = 0) -> Message:
        """Sets every field of `message` to a random (or absurd) value."""
        rng = self.rng
        for field in message.DESCRIPTOR.fields:
            if field.containing_oneof is not None and rng.random() < 0.5:
                continue
            repeats = 1
            if field.is_repeated:
                repeats = rng.choice([0, 1, 3, 2000 if absurd and depth == 0 else 2])
            for _ in range(repeats):
                if field.type == FieldDescriptor.TYPE_MESSAGE:
                    if depth >= 3 or field.message_type.GetOptions().map_entry:
                        continue
                    child = (
                        getattr(message, field.name).add()
                        if field.is_repeated
                        else getattr(message, field.name)
                    )
                    self.fill(child, absurd, depth + 1)
                    continue
                value = self.scalar(field, absurd)
                if field.is_repeated:
                    getattr(message, field.name).append(value)
                else:
                    setattr(message, field.name, value)
        return message

    def scalar(self, field: FieldDescriptor, absurd: bool) -> Any:
        rng, t = self.rng, field.type
        if field.name == "run_id" and rng.random() < 0.8:
            return self.run_id
        if field.name in ("sender", "node_id", "requester") and rng.random() < 0.8:
            return self.identity.node_id
        if field.name == "wait_s":  # a long poll: only values that must not wait
            return rng.choice([-1.0, -math.inf, math.nan, 0.0])
        F = FieldDescriptor
        if t in (F.TYPE_UINT64, F.TYPE_FIXED64):
            return rng.choice([2**64 - 1, 2**63, 2**40]) if absurd else rng.randint(0, 1000)
        if t in (F.TYPE_UINT32, F.TYPE_FIXED32):
            return rng.choice([2**32 - 1, 2**31]) if absurd else rng.randint(0, 100)
        if t in (F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64):
            return rng.choice([-(2**63), 2**63 - 1, -1]) if absurd else rng.randint(-5, 1000)
        if t in (F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32):
            return rng.choice([-(2**31), 2**31 - 1, -1]) if absurd else rng.randint(-5, 100)
        if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
            values = [math.nan, math.inf, -math.inf, -1e308, 1e308, -0.0]
            return rng.choice(values) if absurd else rng.uniform(-10, 1000)
        if t == FieldDescriptor.TYPE_BOOL:
            return rng.random() < 0.5
        if t == FieldDescriptor.TYPE_ENUM:
            return rng.choice([v.number for v in field.enum_type.values])
        if t == FieldDescriptor.TYPE_STRING:
            if absurd:
                return rng.choice(["x" * 65536, "../../etc/passwd", "\u202e\x00\ud7ff", "%s%n"])
            return rng.choice(["", "a", "round", "checkpoints/1.safetensors", os.urandom(4).hex()])
        if t == FieldDescriptor.TYPE_BYTES:
            return os.urandom(65536 if absurd else rng.choice([0, 16, 32, 64]))
        raise AssertionError(f"unhandled field type {t}")

    def well_formed(self, target: Target, request: type[Message], absurd: bool) -> bytes:
        """One request of `request`'s type, filled, signed the way `target` expects
        (coordinator requests with the Auth field; a peer push's header by its own
        signature field), trimmed to stay under the size limit."""
        message = self.fill(request(), absurd)
        if isinstance(message, peer_pb2.ContributionChunk) and message.HasField("header"):
            header = message.header
            fields = (header.run_id, header.round, header.sender, header.shard)
            rest = (header.codec_id, header.numel, header.tokens, header.payload_hash)
            header.signature = self.identity.sign(contribution_message(*fields, *rest))
        body = message.SerializeToString()
        if len(body) > MAX_MESSAGE_BYTES // 2:  # too big to be about anything but size
            message = request()
            body = message.SerializeToString()
        if not target.signed:
            return body
        if target.name == "UploadCheckpoint":  # the header is signed, inside the chunk
            header = self.fill(coordinator_pb2.CheckpointHeader(), absurd)
            signed = sign_request(self.identity, target.name, self.run_id, self.round, header)
            return length_delimited(1, signed)
        return sign_request(self.identity, target.name, self.run_id, self.round, message)

    # --- broken ones -----------------------------------------------------------------

    def message(self, kind: str, target: Target, others: list[Target]) -> bytes:
        rng = self.rng
        if kind == "random":
            return os.urandom(rng.randint(1, 4096))
        if kind == "empty":
            return b""
        if kind == "oversize":
            return b"\x12" + os.urandom(MAX_MESSAGE_BYTES)  # one byte over the limit
        if kind == "nesting":
            depth = rng.choice([100, 1000, 10000])
            if rng.random() < 0.5:  # start-group tags of field 1, never closed
                return b"\x0b" * depth
            nested = b""
            for _ in range(depth):
                nested = length_delimited(rng.choice([1, 2, 15]), nested)
            return nested
        if kind == "wrong_type":
            other = rng.choice([o for o in others if o.request is not target.request])
            return self.well_formed(target, other.request, absurd=False)
        if kind == "absurd":
            return self.well_formed(target, target.request, absurd=True)
        valid = self.well_formed(target, target.request, absurd=False)
        if kind == "truncated":
            return valid[: rng.randrange(len(valid))] if valid else b"\x0a"
        if kind == "bitflip":
            flipped = bytearray(valid or b"\x00")
            for _ in range(rng.randint(1, 8)):
                flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
            return bytes(flipped)
        raise AssertionError(kind)


def call(channel: grpc.Channel, target: Target, first: bytes) -> tuple[str, float, str]:
    """Sends one malformed request (streams: it, then a data chunk); returns the status
    code's name, the seconds until the status, and its detail."""
    started = time.monotonic()
    try:
        if target.client_streaming:
            method = channel.stream_unary(target.path)
            method(iter([first, b"\x12\x04abcd"]), timeout=CLIENT_TIMEOUT_S)
        elif target.server_streaming:
            for _ in channel.unary_stream(target.path)(first, timeout=CLIENT_TIMEOUT_S):
                pass
        else:
            channel.unary_unary(target.path)(first, timeout=CLIENT_TIMEOUT_S)
        code, detail = "OK", ""
    except grpc.RpcError as err:
        code, detail = err.code().name, err.details() or ""
    return code, time.monotonic() - started, detail[:200]


def fuzz(scenario: Scenario, args: argparse.Namespace) -> dict[str, Any]:
    db = sqlite3.connect(f"file:{scenario.run_dir / 'coordinator.db'}?mode=ro", uri=True)
    run_id = db.execute("SELECT value FROM meta WHERE key = 'run_id'").fetchone()[0]
    peer_port = db.execute("SELECT value FROM meta WHERE key = 'peer_port'").fetchone()[0]
    node_address = wait_for_node_address(db)
    coordinator_address = JoinUrl.parse(scenario.url).address
    peers = {"coordinator-peer": f"127.0.0.1:{peer_port}", "node-peer": node_address}
    all_targets = targets(coordinator_address, peers)
    rng = random.Random(args.seed)
    fuzzer = Fuzzer(rng, run_id, Identity.generate())
    jobs = []
    for i in range(args.messages):
        target = all_targets[i % len(all_targets)]
        kind = KINDS[(i // len(all_targets)) % len(KINDS)]
        if i % 50 == 0:
            fuzzer.round = current_round(db)
        jobs.append((target, kind, fuzzer.message(kind, target, all_targets), i // PER_CONNECTION))
    channels: dict[tuple[str, int], grpc.Channel] = {}
    lock = threading.Lock()

    def send(job: tuple[Target, str, bytes, int]) -> tuple[str, float, str]:
        target, _, first, connection = job
        with lock:
            key = (target.address, connection)
            if key not in channels:
                channels[key] = grpc.insecure_channel(target.address, options=CHANNEL_OPTIONS)
        return call(channels[key], target, first)

    started_unix = time.time()
    started = time.monotonic()
    with ThreadPoolExecutor(args.concurrency) as pool:
        results = list(pool.map(send, jobs))
    for channel in channels.values():
        channel.close()
    wall = time.monotonic() - started
    ended_unix = time.time()
    commits = [
        json.loads(c)["committed"]
        for (c,) in db.execute("SELECT commit_record FROM rounds WHERE commit_record IS NOT NULL")
    ]
    db.close()
    statuses: Counter[str] = Counter()
    by_method: Counter[str] = Counter()
    by_kind: Counter[str] = Counter()
    latencies = []
    slowest_by_kind: dict[str, float] = {}
    imprecise = slow = 0
    examples: dict[str, dict[str, Any]] = {}
    for (target, kind, _, _), (code, latency, detail) in zip(jobs, results, strict=True):
        statuses[code] += 1
        by_method[target.label] += 1
        by_kind[kind] += 1
        latencies.append(latency)
        slowest_by_kind[kind] = max(slowest_by_kind.get(kind, 0.0), latency)
        bad = code in IMPRECISE and not (code == "UNAVAILABLE" and RETRY_LATER in detail)
        imprecise += bad
        slow += latency > ANSWER_S
        if bad or latency > ANSWER_S:
            examples.setdefault(
                f"{target.label} {kind} {code}",
                {"latency_s": round(latency, 3), "detail": detail},
            )
    latencies.sort()
    return {
        "messages": len(jobs),
        "methods": len(all_targets),
        "by_method": dict(by_method),
        "by_kind": dict(by_kind),
        "statuses": dict(statuses.most_common()),
        "imprecise": imprecise,
        "slow": slow,
        "max_latency_s": round(latencies[-1], 3),
        "p99_latency_s": round(latencies[int(0.99 * (len(latencies) - 1))], 3),
        "max_latency_s_by_kind": {k: round(v, 3) for k, v in sorted(slowest_by_kind.items())},
        "fuzz_s": round(wall, 1),
        "rounds_committed_during": sum(started_unix <= c <= ended_unix for c in commits),
        "examples": dict(list(examples.items())[:20]),
    }


def wait_for_node_address(db: sqlite3.Connection, timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = db.execute(
            "SELECT address FROM nodes WHERE state = 'active' AND address != '' LIMIT 1"
        ).fetchone()
        if row is not None:
            return str(row[0])
        time.sleep(0.1)
    raise SystemExit("no node joined the run")


def current_round(db: sqlite3.Connection) -> int:
    row = db.execute("SELECT max(round) FROM rounds").fetchone()
    return int(row[0] or 0)


def log_alarms(root: Path) -> dict[str, list[str]]:
    """Lines in the servers' logs that mean an exception escaped a handler."""
    found: dict[str, list[str]] = {}
    for log in [root / "coordinator.log", *sorted(root.glob("node*/node.log"))]:
        lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
        alarms = [line[:300] for line in lines if any(a in line for a in LOG_ALARMS)]
        if alarms:
            found[str(log.relative_to(root))] = alarms[:5]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10000)
    parser.add_argument("--nodes", type=int, default=3, help="honest nodes running a round")
    parser.add_argument("--concurrency", type=int, default=4, help="calls in flight")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, help="keep the run here (default: temp)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.messages < 1:
        parser.error("--messages must be at least 1")
    if args.nodes < 2:
        parser.error("--nodes must be at least 2")
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    started = time.monotonic()
    run_args = argparse.Namespace(
        nodes=args.nodes,
        rounds=100000,  # the nodes run until the fuzzer is done
        seed=args.seed,
        inner_steps=3,
        deadline_s=15.0,
        codec="fp32",
        defences="on",
        poison=None,
        poisoned=0,
    )
    with tempfile.TemporaryDirectory(prefix="starling-fuzz-") as tmp:
        root = (args.work_dir or Path(tmp)) / "fuzz"
        scenario = Scenario(root, run_args, faults=False)
        try:
            result = fuzz(scenario, args)
            processes = {"coordinator": scenario.coordinator}
            processes.update({f"node{i}": p for i, p in scenario.nodes.items()})
            died = [name for name, p in processes.items() if p.poll() is not None]
            result["crashes"] = sorted(died)
        finally:
            scenario.close()
        alarms = log_alarms(root)
    result["unhandled"] = sum(len(lines) for lines in alarms.values())
    result["unhandled_lines"] = alarms
    result["wall_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(result) if args.json else json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

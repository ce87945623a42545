"""Talking to a run's coordinator: join URLs, signed requests, and the client.

A join URL names the coordinator and pins its TLS certificate:
    starling://host:port?fp=sha256:<64 hex>
(plaintext `starling://127.0.0.1:port` is accepted on loopback only).

Signed requests (proto/starling/v1/coordinator.proto): the request is serialized, then
its `Auth` (field 15) is appended as the last field on the wire. The signature covers
identity.request_message(method, run, round, node, timestamp, nonce, SHA-256 of the
bytes before the auth field), so the coordinator verifies exactly the bytes it received,
whatever protobuf library produced them.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from .exchange.framing import length_delimited
from .exchange.transport import GRPC_OPTIONS, PlaintextRefused, is_loopback
from .identity import TLS_SERVER_NAME, Identity, fetch_pinned_certificate, request_message
from .v1 import coordinator_pb2 as pb
from .v1 import peer_pb2

AUTH_FIELD = 15
# A restarted coordinator is back in seconds: gRPC's own reconnect backoff (1 s growing
# 1.6× to 120 s) left a node's channel waiting ~10 s for its next attempt. Nodes retry an
# unreachable coordinator at most RETRY_MAX_DELAY_S apart and their channels redial as
# often (gRPC adds ±20% jitter, so a crowd of nodes does not reconnect in step; a refused
# dial costs the restarting host one RST). With a 2 s cap a node came back up to ~4 s
# after the coordinator was serving again: the next retry waited for the channel's next
# dial.
RETRY_MAX_DELAY_S = 1.0
COORDINATOR_CHANNEL_OPTIONS = GRPC_OPTIONS + [
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", int(RETRY_MAX_DELAY_S * 1000)),
]
SERVICE = "starling.v1.Coordinator"
FILE_CHUNK_BYTES = 1 << 20
M = TypeVar("M", bound=Message)


class JoinUrlError(ValueError):
    """A join URL that cannot be used."""


class AuthError(ValueError):
    """A request whose auth field is missing or malformed."""


@dataclass(frozen=True)
class JoinUrl:
    host: str
    port: int
    fingerprint: str | None  # "sha256:<hex>"; None for plaintext on loopback

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def __str__(self) -> str:
        query = f"?fp={self.fingerprint}" if self.fingerprint else ""
        return f"starling://{self.address}{query}"

    @classmethod
    def parse(cls, text: str) -> JoinUrl:
        parsed = urllib.parse.urlsplit(text.strip())
        if parsed.scheme != "starling":
            raise JoinUrlError(f"join URL {text!r} must start with starling://")
        try:
            host, port = parsed.hostname, parsed.port
        except ValueError:
            raise JoinUrlError(f"join URL {text!r} has a bad port") from None
        if not host or port is None:
            raise JoinUrlError(f"join URL {text!r} must name host:port")
        query = urllib.parse.parse_qs(parsed.query)
        fingerprint = query.get("fp", [None])[0]
        if fingerprint is not None:
            digest = fingerprint.removeprefix("sha256:")
            if not fingerprint.startswith("sha256:") or len(digest) != 64:
                raise JoinUrlError(f"join URL {text!r}: fp must be sha256:<64 hex digits>")
            try:
                bytes.fromhex(digest)
            except ValueError:
                raise JoinUrlError(f"join URL {text!r}: fp is not hexadecimal") from None
        elif not is_loopback(host):
            raise JoinUrlError(
                f"join URL {text!r} has no certificate fingerprint (?fp=sha256:...): "
                "plaintext is only allowed on loopback"
            )
        return cls(host, port, fingerprint)


# --- the wire form of signed requests --------------------------------------------------


def _read_varint(raw: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(raw) or shift > 63:
            raise AuthError("truncated or oversized varint")
        byte = raw[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def top_level_fields(raw: bytes) -> Iterator[tuple[int, int, int, int]]:
    """(field number, start of the key, start of the value, end) of each top-level field
    of a serialized protobuf message."""
    pos = 0
    while pos < len(raw):
        start = pos
        key, pos = _read_varint(raw, pos)
        number, wire = key >> 3, key & 7
        value_start = pos
        if wire == 0:
            _, pos = _read_varint(raw, pos)
        elif wire == 1:
            pos += 8
        elif wire == 2:
            length, value_start = _read_varint(raw, pos)
            pos = value_start + length
        elif wire == 5:
            pos += 4
        else:
            raise AuthError(f"unsupported wire type {wire}")
        if pos > len(raw) or number == 0:
            raise AuthError("truncated message")
        yield number, start, value_start, pos


def append_auth(body: bytes, auth: pb.Auth) -> bytes:
    encoded = auth.SerializeToString()
    return body + length_delimited(AUTH_FIELD, encoded)


def split_auth(raw: bytes) -> tuple[bytes, pb.Auth]:
    """(the signed body, the auth) of a request; auth must be present once, last."""
    for number, start, value_start, end in top_level_fields(raw):
        if number == AUTH_FIELD:
            if end != len(raw):
                raise AuthError("the auth field must be the last field of the request")
            auth = pb.Auth()
            try:
                auth.ParseFromString(raw[value_start:end])
            except Exception:  # protobuf's DecodeError: a malformed auth
                raise AuthError("malformed auth field") from None
            return raw[:start], auth
    raise AuthError("the request is not signed (no auth field)")


def field_value(raw: bytes, number: int) -> bytes | None:
    """The bytes of a length-delimited top-level field (e.g. a stream's header)."""
    for field, _, value_start, end in top_level_fields(raw):
        if field == number:
            return raw[value_start:end]
    return None


def sign_request(
    identity: Identity, method: str, run_id: str, round_: int, request: Message
) -> bytes:
    body = request.SerializeToString(deterministic=True)
    timestamp_ms = int(time.time() * 1000)
    nonce = os.urandom(16)
    message = request_message(
        method, run_id, round_, identity.node_id, timestamp_ms, nonce, hashlib.sha256(body).digest()
    )
    auth = pb.Auth(
        node_id=identity.node_id,
        round=round_,
        timestamp_ms=timestamp_ms,
        nonce=nonce,
        signature=identity.sign(message),
    )
    return append_auth(body, auth)


def method_path(name: str) -> str:
    return f"/{SERVICE}/{name}"


# --- the client ------------------------------------------------------------------------


def open_coordinator_channel(url: JoinUrl, connect_timeout: float = 10.0) -> grpc.Channel:
    """A blocking channel to the coordinator, TLS pinned to the URL's fingerprint."""
    if url.fingerprint is None:
        if not is_loopback(url.host):
            raise PlaintextRefused(f"{url.address} has no certificate fingerprint")
        return grpc.insecure_channel(url.address, options=COORDINATOR_CHANNEL_OPTIONS)
    pem = fetch_pinned_certificate(url.host, url.port, url.fingerprint, connect_timeout)
    credentials = grpc.ssl_channel_credentials(root_certificates=pem)
    options = COORDINATOR_CHANNEL_OPTIONS + [("grpc.ssl_target_name_override", TLS_SERVER_NAME)]
    return grpc.secure_channel(url.address, credentials, options=options)


class CoordinatorClient:
    """Blocking client of the coordinator service: every node request is signed.

    `round` is the latest round this node knows (it goes into every signature); callers
    update it as rounds advance. Calls raise grpc.RpcError with the coordinator's status
    code; a request refused as signed before a coordinator restart (ABORTED) is re-signed
    and sent once more."""

    def __init__(
        self,
        url: JoinUrl | str,
        identity: Identity | None = None,
        timeout: float = 30.0,
        connect_timeout: float = 10.0,
    ) -> None:
        self.url = JoinUrl.parse(url) if isinstance(url, str) else url
        self.identity = identity
        self.timeout = timeout
        self.channel = open_coordinator_channel(self.url, connect_timeout)
        self.round = 0
        self._run_id: str | None = None

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> CoordinatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def run_id(self) -> str:
        if self._run_id is None:
            self._run_id = self.get_run().run_id
        return self._run_id

    # --- public (unsigned) ---------------------------------------------------------

    def get_run(self) -> pb.RunInfo:
        info = self._unary("GetRun", pb.GetRunRequest(), pb.RunInfo)
        self._run_id = info.run_id
        return info

    def get_status(self) -> pb.RunStatus:
        return self._unary("GetStatus", pb.GetStatusRequest(), pb.RunStatus)

    def fetch_file(self, path: str, destination: Path | None = None) -> bytes:
        """The whole file, checked against the SHA-256 in its header; also written to
        `destination` (atomically) when given."""
        call = self.channel.unary_stream(
            method_path("FetchFile"),
            request_serializer=pb.FetchFileRequest.SerializeToString,
            response_deserializer=pb.FileChunk.FromString,
        )
        header: pb.FileHeader | None = None
        parts: list[bytes] = []
        digest = hashlib.sha256()
        for chunk in call(pb.FetchFileRequest(path=path), timeout=max(self.timeout, 600.0)):
            if chunk.WhichOneof("kind") == "header":
                header = chunk.header
            else:
                digest.update(chunk.data)
                parts.append(chunk.data)
        data = b"".join(parts)
        if header is None or len(data) != header.size or digest.hexdigest() != header.sha256:
            raise ConnectionError(f"{path}: the download does not match its size and SHA-256")
        if destination is not None:
            destination.parent.mkdir(parents=True, exist_ok=True)
            tmp = destination.with_name(f".{destination.name}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, destination)
        return data

    # --- signed ---------------------------------------------------------------------

    def join(
        self,
        capabilities: pb.Capabilities,
        advertise_address: str = "",
        cert_fingerprint: str = "",
        join_token: str = "",
    ) -> pb.JoinResponse:
        identity = self._identity()
        request = pb.JoinRequest(
            public_key=identity.public_key,
            capabilities=capabilities,
            advertise_address=advertise_address,
            cert_fingerprint=cert_fingerprint,
            join_token=join_token,
        )
        return self._signed("Join", request, pb.JoinResponse)

    def heartbeat(self, phase: str = "", state_round: int = 0) -> pb.HeartbeatResponse:
        request = pb.HeartbeatRequest(phase=phase, state_round=state_round)
        return self._signed("Heartbeat", request, pb.HeartbeatResponse)

    def leave(self, reason: str = "") -> pb.LeaveResponse:
        return self._signed("Leave", pb.LeaveRequest(reason=reason), pb.LeaveResponse)

    def acquire_lease(self, finished: str = "") -> pb.DataLease:
        """The node's data lease (renewed); with `finished`, another shard than that one."""
        request = pb.AcquireLeaseRequest(finished=finished)
        return self._signed("AcquireLease", request, pb.DataLease)

    def report_tokens(
        self, round_: int, file: str, tokens: int, done: bool = False
    ) -> pb.ReportTokensResponse:
        request = pb.ReportTokensRequest(round=round_, file=file, tokens=tokens, done=done)
        return self._signed("ReportTokens", request, pb.ReportTokensResponse)

    def get_round(
        self,
        round_: int | None = None,
        known_version: int = 0,
        wait_s: float = 0.0,
    ) -> pb.RoundState:
        request = pb.GetRoundRequest(
            round=round_ or 0,
            current=round_ is None,
            known_version=known_version,
            wait_s=wait_s,
        )
        return self._signed("GetRound", request, pb.RoundState, extra_timeout=wait_s)

    def report_shard(
        self,
        round_: int,
        shard: int,
        held: list[peer_pb2.Contributor],
        excluded: list[peer_pb2.Exclusion] | None = None,
        gram: list[float] | None = None,
    ) -> pb.ReportShardResponse:
        request = pb.ReportShardRequest(
            round=round_, shard=shard, held=held, excluded=excluded or [], gram=gram or []
        )
        return self._signed("ReportShard", request, pb.ReportShardResponse)

    def report_mean(
        self, round_: int, shard: int, header: peer_pb2.MeanHeader
    ) -> pb.ReportMeanResponse:
        request = pb.ReportMeanRequest(round=round_, shard=shard, header=header)
        return self._signed("ReportMean", request, pb.ReportMeanResponse)

    def report_exchange(self, request: pb.ReportExchangeRequest) -> pb.ReportExchangeResponse:
        return self._signed("ReportExchange", request, pb.ReportExchangeResponse)

    def withdraw(self, round_: int, reason: str) -> pb.WithdrawResponse:
        """Takes this node's contribution back from round `round_`'s exchange (it sends
        none): the owners stop waiting for it."""
        return self._signed(
            "Withdraw", pb.WithdrawRequest(round=round_, reason=reason), pb.WithdrawResponse
        )

    def report_fingerprint(self, round_: int, fingerprint: str) -> pb.ReportFingerprintResponse:
        request = pb.ReportFingerprintRequest(round=round_, fingerprint=fingerprint)
        return self._signed("ReportFingerprint", request, pb.ReportFingerprintResponse)

    def report_progress(self, request: pb.ReportProgressRequest) -> pb.ReportProgressResponse:
        return self._signed("ReportProgress", request, pb.ReportProgressResponse)

    def upload_checkpoint(self, round_: int, blob: bytes, fingerprint: str) -> pb.CheckpointInfo:
        """Streams a safetensors state (tensors "params" and "momentum") as checkpoint
        `round_` (the state after `round_` commits)."""
        identity = self._identity()
        header = pb.CheckpointHeader(
            round=round_,
            size=len(blob),
            sha256=hashlib.sha256(blob).hexdigest(),
            fingerprint=fingerprint,
        )
        signed_header = sign_request(identity, "UploadCheckpoint", self.run_id, self.round, header)

        def chunks() -> Iterator[bytes]:
            # CheckpointChunk{header}: field 1, length-delimited, holding the signed header.
            yield length_delimited(1, signed_header)
            view = memoryview(blob)
            for offset in range(0, len(blob), FILE_CHUNK_BYTES):
                yield pb.CheckpointChunk(
                    data=bytes(view[offset : offset + FILE_CHUNK_BYTES])
                ).SerializeToString()

        call = self.channel.stream_unary(
            method_path("UploadCheckpoint"),
            request_serializer=None,
            response_deserializer=pb.CheckpointInfo.FromString,
        )
        return call(chunks(), timeout=max(self.timeout, 600.0))

    # --- internals ------------------------------------------------------------------

    def _identity(self) -> Identity:
        if self.identity is None:
            raise ValueError("this client has no identity: it can only read public data")
        return self.identity

    def _unary(self, method: str, request: Message, response: type[M]) -> M:
        call = self.channel.unary_unary(
            method_path(method),
            request_serializer=type(request).SerializeToString,
            response_deserializer=response.FromString,
        )
        result: M = call(request, timeout=self.timeout)
        return result

    def _signed(
        self, method: str, request: Message, response: type[M], extra_timeout: float = 0.0
    ) -> M:
        identity = self._identity()
        call = self.channel.unary_unary(
            method_path(method), request_serializer=None, response_deserializer=response.FromString
        )
        for attempt in (1, 2):
            raw = sign_request(identity, method, self.run_id, self.round, request)
            try:
                result: M = call(raw, timeout=self.timeout + extra_timeout)
                return result
            except grpc.RpcError as err:
                if attempt == 2 or err.code() != grpc.StatusCode.ABORTED:
                    raise
        raise AssertionError("unreachable")


# --- the run's summary (`starling status`, the dashboard's header) ---------------------

# How many of the newest commits set the run's pace (tokens/s, and so the ETA).
THROUGHPUT_WINDOW = 10


def run_throughput(commits: list[tuple[float, int, float]]) -> float | None:
    """Committed tokens per second from recent commits, each (commit unix time, tokens,
    duration s), oldest first. Over two or more: the tokens committed after the first
    over the time from the first commit to the last (commit to commit is the run's pace
    whether rounds queue or overlap). One commit: its tokens over its own duration.
    None when there is nothing to go by."""
    if len(commits) >= 2:
        span = commits[-1][0] - commits[0][0]
        tokens = sum(t for _, t, _ in commits[1:])
        return tokens / span if span > 0 else None
    if commits and commits[0][2] > 0:
        return commits[0][1] / commits[0][2]
    return None


def run_state(phase: str, active_nodes: int, tokens_trained: int, target_tokens: int) -> str:
    """One word for the run: finished (target reached), waiting (before the first round,
    or nobody left to train), exchanging (the current round's exchange) or training (a
    round training, or just committed: the next one opens at the coordinator's next
    tick)."""
    if target_tokens and tokens_trained >= target_tokens:
        return "finished"
    if phase == "waiting" or active_nodes == 0:
        return "waiting"
    return "exchanging" if phase == "exchange" else "training"


def run_summary(info: pb.RunInfo) -> dict[str, Any]:
    """The run's model and exchange settings, read from its RunInfo (config + manifest)."""
    # Imported here: the run config pulls in the model (torch), which `starling status`
    # needs only for this.
    from .data.shards import Manifest
    from .runconfig import RunConfig

    config = RunConfig.from_toml(info.config_toml)
    vocab_size = Manifest.from_dict(json.loads(info.manifest_json)).vocab_size
    model = config.model_config(vocab_size)
    return {
        "model": {
            "preset": config.model.preset,
            "parameters": info.numel,
            "dim": model.dim,
            "layers": model.n_layers,
            "heads": model.n_heads,
            "kv_heads": model.n_kv_heads,
            "ffn_dim": model.ffn_dim,
            "vocab_size": vocab_size,
            "seq_len": model.max_seq_len,
        },
        "codec": config.outer.codec,
        "overlap": config.outer.overlap,
    }


def commit_json(commit: pb.Commit) -> dict[str, Any]:
    return {
        "round": commit.round,
        "contributors": {c.node_id: c.tokens for c in commit.contributors},
        "tokens": commit.tokens,
        "bytes": commit.bytes,
        "duration_s": commit.duration_s,
        "fingerprint": commit.fingerprint or None,
        "excluded": {e.node_id: e.reason for e in commit.excluded},
        "shards": [
            {"shard": s.shard, "owner": s.owner, "status": s.status, "detail": s.detail}
            for s in commit.shards
        ],
        "committed": commit.committed_unix,
    }


def status_json(status: pb.RunStatus, info: pb.RunInfo | None = None) -> dict[str, Any]:
    """`starling status --json` and the dashboard's `/api/status`: the run's summary as
    plain JSON. From the gRPC RunStatus alone, what it cannot tell (loss, the pace over
    several commits, departed nodes) is None; the coordinator's /api/status fills it."""
    last_commit = commit_json(status.last_commit) if status.HasField("last_commit") else None
    latest = None
    if status.HasField("latest_checkpoint"):
        ckpt = status.latest_checkpoint
        latest = {"round": ckpt.round, "sha256": ckpt.sha256, "size": ckpt.size}
    peers = [
        {
            "node_id": p.node_id,
            "device": p.device,
            "reachable": p.reachable,
            "state": p.state,
            "last_seen_s": round(p.last_seen_s, 3),
            "rounds_contributed": p.rounds_contributed,
            "tokens_trained": p.tokens_trained,
            "resync": p.resync,
        }
        for p in status.peers
    ]
    pace = None
    if last_commit is not None:
        pace = run_throughput(
            [(last_commit["committed"], last_commit["tokens"], last_commit["duration_s"])]
        )
    remaining = max(0, status.target_tokens - status.tokens_trained)
    return {
        "run": status.name,
        "run_id": status.run_id,
        "join_url": status.join_url,
        **(run_summary(info) if info is not None else dict.fromkeys(("model", "codec", "overlap"))),
        "state": run_state(status.phase, len(peers), status.tokens_trained, status.target_tokens),
        "round": status.round,
        "phase": status.phase,
        "tokens_trained": status.tokens_trained,
        "target_tokens": status.target_tokens,
        "progress": min(1.0, status.tokens_trained / status.target_tokens)
        if status.target_tokens
        else None,
        "tokens_per_s": pace,
        "eta_s": remaining / pace if pace else None,
        "rounds_committed": 0 if last_commit is None else last_commit["round"] + 1,
        "val_loss": None,
        "train_loss": None,
        "nodes": {
            "active": len(peers),
            "owners": sum(p["reachable"] for p in peers),
            "client_only": sum(not p["reachable"] for p in peers),
            "catching_up": sum(p["resync"] for p in peers),
        },
        "peers": peers,
        "last_commit": last_commit,
        "latest_checkpoint": latest,
    }

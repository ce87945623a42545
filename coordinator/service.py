"""The coordinator's gRPC service (proto/starling/v1/coordinator.proto) and its round
driver, on one asyncio loop. Durable state lives in the Store (SQLite); what is only in
memory (nonces, long-poll waiters) is rebuilt or refused safely after a restart."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import shutil
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from starling.checkpoint import CheckpointError, save_state_checkpoint, state_from_blob
from starling.coordination import (
    FILE_CHUNK_BYTES,
    SERVICE,
    AuthError,
    JoinUrl,
    field_value,
    split_auth,
)
from starling.diloco import GlobalState
from starling.exchange import ExchangePeer, PeerConfig, PeerEndpoint, RoundSpec, ShardPlan
from starling.exchange.audit import (
    Evidence,
    ForgedEvidence,
    IncompleteEvidence,
    disputed_contribution,
    false_rejections,
    recompute_mean,
)
from starling.exchange.client import ExchangeError
from starling.exchange.owner import DEPARTED, REJECTED, WITHDREW
from starling.exchange.transport import SERVER_OPTIONS, is_loopback
from starling.identity import (
    PUBLIC_KEY_BYTES,
    CertificatePinError,
    fetch_pinned_certificate,
    mean_message,
    node_id_of,
    request_message,
    verify,
)
from starling.robust import (
    DIRECTION_WINDOW,
    direction_outliers,
    history_direction_outliers,
    persistent_direction_outliers,
    whole_update_cosines,
)
from starling.serving import RequestLimits, RequestThrottle, guarded
from starling.v1 import coordinator_pb2 as pb
from starling.v1 import peer_pb2

from . import rounds
from .heap import release_free_heap
from .rundir import JOIN_URL_FILE, RunDir, checkpoint_dir
from .store import Checkpoint, Node, Round, Store

log = logging.getLogger("starling.coordinator")

CLOCK_SKEW_S = 60.0  # signed timestamps further off than this are refused
STALE_ROUNDS = 8  # an auth round this far behind the current one must resync first
# Requests that act on no round's state, so a stale round does not refuse them: a joiner
# signs round 0 (it holds no state yet) and learns the current round from GetRound; a
# node that fell far behind must still be able to ask, or to leave. Refusing GetRound
# left every node that joined after round 8 unable to start.
ROUND_FREE = frozenset({"Join", "GetRound", "Leave"})
LONG_POLL_MAX_S = 30.0
REPORT_GRACE_S = 5.0  # owners' reports may arrive this long after the exchange deadline
# An audited owner has this long to serve the evidence behind its report: every
# contribution to one shard, so it is a shard's worth of uploads at its uplink.
AUDIT_TIMEOUT_S = 60.0
# A verified shard's two owners report their means this long after the commit at the
# latest (computing one takes them well under a second); past it, one owner's word
# stands, or none.
MEAN_GRACE_S = 30.0
# After a restart, the newest committed rounds whose mean hashes may still be unsettled
# (every verified shard settles within MEAN_GRACE_S of its commit, or a recomputation).
SETTLED_ROUNDS = 8
TICK_S = 0.2
DIAL_BACK_TIMEOUT_S = 3.0
MAX_REPORTED_TOKENS = 1 << 40
MAX_REASON_CHARS = 200


class Refused(Exception):
    """A request refused with a precise status code."""

    def __init__(self, code: grpc.StatusCode, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


class ReplayGuard:
    """Signed timestamps within ±60 s, each nonce once within that window, and nothing
    signed before this process started (its nonces of earlier requests are gone)."""

    def __init__(self, started: float) -> None:
        self.started_ms = int(started * 1000)
        self._seen: dict[bytes, float] = {}  # nonce -> when it may be forgotten
        self._last_prune = 0.0

    def check(self, auth: pb.Auth, now: float) -> None:
        skew = auth.timestamp_ms / 1000 - now
        if abs(skew) > CLOCK_SKEW_S:
            raise Refused(
                grpc.StatusCode.UNAUTHENTICATED,
                f"request timestamp is {skew:+.0f} s off the coordinator's clock (limit "
                f"±{CLOCK_SKEW_S:.0f} s): fix the clock and re-sign",
            )
        if auth.timestamp_ms < self.started_ms:
            raise Refused(
                grpc.StatusCode.ABORTED, "signed before the coordinator restarted: re-sign"
            )
        if len(auth.nonce) != 16:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "auth nonce must be 16 bytes")
        if auth.nonce in self._seen:
            raise Refused(grpc.StatusCode.ALREADY_EXISTS, "replayed request (nonce seen before)")
        self._seen[auth.nonce] = now + 2 * CLOCK_SKEW_S
        if now - self._last_prune > CLOCK_SKEW_S:
            self._seen = {n: t for n, t in self._seen.items() if t > now}
            self._last_prune = now


Handler = Callable[[Any, Node | None, grpc.aio.ServicerContext], Awaitable[Message]]


class Coordinator:
    """Serves one run directory. `await start()`, then `await stop()`."""

    def __init__(
        self,
        run: RunDir,
        host: str = "127.0.0.1",
        port: int = 0,
        advertise_host: str | None = None,
        tls: bool | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.run = run
        self.config = run.config
        self.host = host
        self.port = port
        self.advertise_host = advertise_host or (host if host not in ("0.0.0.0", "::") else None)
        # TLS by default off loopback; plaintext only when every address is loopback.
        self.tls = tls if tls is not None else not is_loopback(self.advertise_host or host)
        self.clock = clock
        self.store: Store = run.store()
        run_id = self.store.get_meta("run_id")
        numel = self.store.get_meta("numel")
        if run_id is None or numel is None:
            raise ValueError(f"{run.path}: the database lacks the run id or numel")
        self.run_id = run_id
        self.numel = int(numel)
        self.guard = ReplayGuard(clock())
        defences = self.config.defences
        self.request_limits = RequestLimits(defences.requests_per_s, defences.request_burst)
        self.throttle = RequestThrottle(self.request_limits)
        # Budgets that follow the inner lr ([round] sync_power, which the config allows
        # with budget rounds only) end the rounds at these steps of the nodes' inner
        # schedule (one pass over its steps, at start only).
        self._schedule = self.config.inner_schedule()
        self._round_ends = (
            rounds.budget_round_ends(
                self.config.round.tokens, self._schedule, self.config.round.sync_power
            )
            if self.config.round.sync_power
            else []
        )
        # Served with every Join and GetRun; the file never changes while serving.
        self._manifest_json = (run.path / "data" / "manifest.json").read_text(encoding="utf-8")
        self.peer: ExchangePeer | None = None
        self._server: grpc.aio.Server | None = None
        # Background tasks (reports, audits, recomputations, disputes), until they end:
        # held here because the event loop keeps only weak references to them.
        self._tasks: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()
        self._owned_rounds: set[tuple[int, int]] = set()  # (round, plan generation) reported
        # (round, shard, owner) → None while its report's offences are audited, then
        # (why the report is void, or "" when it holds; whether the lie is proven).
        self._audits: dict[tuple[int, int, str], tuple[str, bool] | None] = {}
        # (round, shard) → None while the mean its owners disagree on is recomputed,
        # then (the recomputed hash, hex, or "" when it could not be; the liars: node
        # id → why).
        self._recomputes: dict[tuple[int, int], tuple[str, dict[str, str]] | None] = {}
        # Committed rounds with a verified shard whose mean hash is not settled yet
        # (after a restart: the newest few, checked once).
        newest = self.store.last_committed_round()
        self._unsettled = set(range(max(0, newest - SETTLED_ROUNDS + 1), newest + 1))
        self._uploading: set[int] = set()  # checkpoint rounds being received
        self._demoted: set[str] = set()  # reducers kept from reducing (only to log changes)
        self._lost: dict[int, list[tuple[str, str]]] = {}  # round → rounds.lost_contributions
        self._probation: tuple[int, frozenset[str]] = (-1, frozenset())  # (commit, nodes)
        self.bound_port: int | None = None

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        self._remove_orphan_checkpoints()
        host_for_peer = self.advertise_host or "127.0.0.1"
        # The same peer port across restarts: plans already published name it.
        peer_port = int(self.store.get_meta("peer_port") or 0)
        try:
            self.peer = await self._start_peer(host_for_peer, peer_port)
        except RuntimeError:  # taken by now: a fresh port (open plans re-open below)
            self.peer = await self._start_peer(host_for_peer, 0)
        with self.store.transaction():
            self.store.set_meta("peer_port", str(self.peer.port))
        self._server = grpc.aio.server(options=SERVER_OPTIONS)
        self._server.add_generic_rpc_handlers((self._handlers(),))
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, self._server)
        reflection.enable_server_reflection(
            (SERVICE, reflection.SERVICE_NAME, health.SERVICE_NAME), self._server
        )
        address = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        if self.tls:
            cert = self.run.certificate
            credentials = grpc.ssl_server_credentials([(cert.key_pem, cert.cert_pem)])
            self.bound_port = self._server.add_secure_port(address, credentials)
        else:
            self.bound_port = self._server.add_insecure_port(address)
        await self._server.start()
        await health_servicer.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        (self.run.path / JOIN_URL_FILE).write_text(str(self.join_url) + "\n")
        self._spawn(self._drive())
        for record in self.store.commits(SETTLED_ROUNDS):
            self._resolve_disputes(record)
        # A round that was in its exchange when we died: our own shards' reductions were
        # in memory, so re-open them (contributors re-push on retry) before the tick.
        current = self.store.current_round()
        if current is not None and current.phase == "exchange" and current.plan is not None:
            await self._own_shards(current)

    async def _start_peer(self, advertise_host: str, port: int) -> ExchangePeer:
        config = PeerConfig(
            self.run_id,
            host=self.host,
            port=port,
            advertise_host=advertise_host,
            screen=self.config.defences.screen,
            # Direction is judged over the whole update, on the coordinator, from the
            # owners' Gram matrices: not per shard.
            screen_direction=False,
            gram=self.config.defences.screen_direction,
            request_limits=self.request_limits,
        )
        tls = self.run.certificate if self.tls else None
        return await asyncio.to_thread(ExchangePeer, self.run.identity, config, tls)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    async def stop(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.stop(1.0)
        if self.peer is not None:
            await asyncio.to_thread(self.peer.close)
        self.store.close()

    @property
    def join_url(self) -> JoinUrl:
        assert self.bound_port is not None
        host = self.advertise_host or socket.gethostname()
        return JoinUrl(
            host, self.bound_port, self.run.certificate.fingerprint if self.tls else None
        )

    def _coordinator_peer(self) -> dict[str, Any]:
        assert self.peer is not None and self.peer.endpoint is not None
        endpoint = self.peer.endpoint
        return {
            "node_id": endpoint.node_id,
            "address": endpoint.address,
            "cert_fingerprint": endpoint.cert_fingerprint or "",
            "public_key": self.run.identity.public_key.hex(),
        }

    # --- request plumbing -------------------------------------------------------------

    def _handlers(self) -> grpc.GenericRpcHandler:
        signed: dict[str, tuple[type[Message], Handler]] = {
            "Join": (pb.JoinRequest, self._join),
            "Heartbeat": (pb.HeartbeatRequest, self._heartbeat),
            "Leave": (pb.LeaveRequest, self._leave),
            "AcquireLease": (pb.AcquireLeaseRequest, self._acquire_lease),
            "ReportTokens": (pb.ReportTokensRequest, self._report_tokens),
            "GetRound": (pb.GetRoundRequest, self._get_round),
            "ReportShard": (pb.ReportShardRequest, self._report_shard),
            "ReportMean": (pb.ReportMeanRequest, self._report_mean),
            "ReportExchange": (pb.ReportExchangeRequest, self._report_exchange),
            "Withdraw": (pb.WithdrawRequest, self._withdraw),
            "ReportFingerprint": (pb.ReportFingerprintRequest, self._report_fingerprint),
            "ReportProgress": (pb.ReportProgressRequest, self._report_progress),
        }
        handlers: dict[str, grpc.RpcMethodHandler] = {}
        for name, (request_type, handler) in signed.items():
            handlers[name] = grpc.unary_unary_rpc_method_handler(
                self._signed_unary(name, request_type, handler),
                request_deserializer=None,  # raw bytes: the signature covers them
                response_serializer=lambda m: m.SerializeToString(),
            )
        handlers["GetRun"] = grpc.unary_unary_rpc_method_handler(
            self._public(self._get_run),
            request_deserializer=pb.GetRunRequest.FromString,
            response_serializer=pb.RunInfo.SerializeToString,
        )
        handlers["GetStatus"] = grpc.unary_unary_rpc_method_handler(
            self._public(self._get_status),
            request_deserializer=pb.GetStatusRequest.FromString,
            response_serializer=pb.RunStatus.SerializeToString,
        )
        handlers["FetchFile"] = grpc.unary_stream_rpc_method_handler(
            self._fetch_file,
            request_deserializer=pb.FetchFileRequest.FromString,
            response_serializer=pb.FileChunk.SerializeToString,
        )
        handlers["UploadCheckpoint"] = grpc.stream_unary_rpc_method_handler(
            self._upload_checkpoint,
            request_deserializer=None,
            response_serializer=pb.CheckpointInfo.SerializeToString,
        )
        # Whole files (data shards, checkpoints) cost ten calls of the budget: a node
        # fetches a few when it joins and one data shard in many rounds.
        costs = {"FetchFile": 10.0, "UploadCheckpoint": 10.0}
        return grpc.method_handlers_generic_handler(
            SERVICE, guarded(handlers, self.throttle, costs)
        )

    def _public(
        self, handler: Callable[[Any], Awaitable[Message]]
    ) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Message]]:
        return _refusals_abort(lambda request, context: handler(request))

    def _signed_unary(
        self, method: str, request_type: type[Message], handler: Handler
    ) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[Message]]:
        async def call(raw: bytes, context: grpc.aio.ServicerContext) -> Message:
            request, node = self._verified(method, request_type, raw)
            return await handler(request, node, context)

        return _refusals_abort(call)

    def _verified(
        self, method: str, request_type: type[Message], raw: bytes
    ) -> tuple[Any, Node | None]:
        """Parses, checks the signature, the clock, the nonce and the round; returns the
        request and its (known, active) node (None for a Join)."""
        try:
            body, auth = split_auth(raw)
            request = request_type.FromString(body)
        except (AuthError, DecodeError) as err:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {err}") from None
        node: Node | None = None
        if method == "Join":
            public_key = request.public_key
            if len(public_key) != PUBLIC_KEY_BYTES:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "public key must be 32 bytes")
            if node_id_of(public_key) != auth.node_id:
                raise Refused(
                    grpc.StatusCode.UNAUTHENTICATED, "node id does not match the public key"
                )
            banned = self.store.node(auth.node_id)
            if banned is not None and banned.state == "banned":
                raise Refused(grpc.StatusCode.PERMISSION_DENIED, "this node is banned")
        else:
            node = self.store.node(auth.node_id)
            if node is None:
                raise Refused(grpc.StatusCode.PERMISSION_DENIED, "unknown node: join first")
            public_key = node.public_key
        message = request_message(
            method,
            self.run_id,
            auth.round,
            auth.node_id,
            auth.timestamp_ms,
            auth.nonce,
            hashlib.sha256(body).digest(),
        )
        if not verify(public_key, message, auth.signature):
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "bad signature")
        self.guard.check(auth, self.clock())
        if node is not None and node.state == "banned":  # by the admin: joining will not help
            raise Refused(
                grpc.StatusCode.PERMISSION_DENIED, f"this node is banned: {node.state_reason}"
            )
        if node is not None and node.state != "active":
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, f"node is {node.state}: join again")
        current = self.store.current_round()
        current_round = 0 if current is None else current.round
        if method not in ROUND_FREE and auth.round + STALE_ROUNDS < current_round:
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"stale round {auth.round} (current {current_round}): resync the state",
            )
        if auth.round > current_round + 1:
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"round {auth.round} is ahead of the current round {current_round}",
            )
        return request, node

    def _notify(self) -> None:
        """Wakes every long poll (they re-read the state)."""
        self._changed.set()
        self._changed = asyncio.Event()

    # --- membership ---------------------------------------------------------------------

    async def _join(
        self, request: pb.JoinRequest, _: Node | None, context: grpc.aio.ServicerContext
    ) -> pb.JoinResponse:
        now = self.clock()
        if self.config.run.join_policy == "token":
            digest = hashlib.sha256(request.join_token.encode()).hexdigest()
            if not request.join_token or not self.store.valid_join_token(digest, now):
                raise Refused(
                    grpc.StatusCode.PERMISSION_DENIED,
                    "this run needs a valid join token (missing, wrong, expired or revoked)",
                )
        reachable, detail = await self._dial_back(
            request.advertise_address, request.cert_fingerprint
        )
        caps = request.capabilities
        node_id = node_id_of(request.public_key)
        lease_s = self.config.membership.lease_s
        with self.store.transaction():
            self.store.upsert_node(
                Node(
                    node_id=node_id,
                    public_key=request.public_key,
                    address=request.advertise_address,
                    cert_fingerprint=request.cert_fingerprint,
                    reachable=reachable,
                    device=caps.device[:200],
                    memory_bytes=caps.memory_bytes,
                    upload_mbps=caps.upload_mbps,
                    download_mbps=caps.download_mbps,
                    software=caps.software[:100],
                    joined=now,
                    last_seen=now,
                    expires=now + lease_s,
                    state="active",
                    phase="joined",
                    state_round=0,
                    resync=False,
                    rounds_contributed=0,
                    tokens_trained=0,
                )
            )
        log.info("join %s reachable=%s %s", node_id, reachable, detail)
        await self._advance()  # the first round opens as soon as enough nodes are in
        self._notify()
        return pb.JoinResponse(
            node_id=node_id,
            reachable=reachable,
            reachability_detail=detail,
            heartbeat_interval_s=self.config.membership.heartbeat_s,
            lease_s=lease_s,
            run=await self._get_run(pb.GetRunRequest()),
        )

    async def _dial_back(self, address: str, fingerprint: str) -> tuple[bool, str]:
        """Whether we can reach the node's peer service at `address` (and it presents the
        certificate it claims): only then may it own shards."""
        if not address:
            return False, "no advertised address: client-only"
        try:
            endpoint = PeerEndpoint("dial-back", address, fingerprint or None)
            host, port = endpoint.host, endpoint.port
        except (ValueError, IndexError):
            return False, f"bad advertised address {address!r}: client-only"
        try:
            if fingerprint:
                await asyncio.to_thread(
                    fetch_pinned_certificate, host, port, fingerprint, DIAL_BACK_TIMEOUT_S
                )
            elif is_loopback(host):
                await asyncio.to_thread(
                    lambda: socket.create_connection((host, port), DIAL_BACK_TIMEOUT_S).close()
                )
            else:
                return False, "no certificate fingerprint off loopback: client-only"
        except CertificatePinError as err:
            return False, f"certificate mismatch at {address}: {err}"
        except OSError as err:
            return False, f"could not dial {address} back ({err}): client-only"
        return True, "dialled back"

    async def _heartbeat(
        self, request: pb.HeartbeatRequest, node: Node | None, _: grpc.aio.ServicerContext
    ) -> pb.HeartbeatResponse:
        assert node is not None
        now = self.clock()
        lease_s = self.config.membership.lease_s
        with self.store.transaction():
            self.store.heartbeat(
                node.node_id, now, now + lease_s, request.phase[:40], request.state_round
            )
        current = self.store.current_round()
        return pb.HeartbeatResponse(
            lease_s=lease_s,
            round=0 if current is None else current.round,
            round_phase="" if current is None else current.phase,
            resync=node.resync,
        )

    async def _leave(
        self, request: pb.LeaveRequest, node: Node | None, _: grpc.aio.ServicerContext
    ) -> pb.LeaveResponse:
        assert node is not None
        with self.store.transaction():
            self.store.set_node_state(node.node_id, "left")
        log.info("leave %s (%s)", node.node_id, request.reason[:200])
        await self._mark_gone()
        self._notify()
        return pb.LeaveResponse(tokens_trained=node.tokens_trained)

    # --- run description and files --------------------------------------------------------

    async def _get_run(self, _: pb.GetRunRequest) -> pb.RunInfo:
        return self.run_info()

    def run_info(self) -> pb.RunInfo:
        latest = self.store.checkpoints()[-1]
        return pb.RunInfo(
            run_id=self.run_id,
            name=self.config.run.name,
            config_toml=self.config.to_toml(),
            manifest_json=self._manifest_json,
            tokenizer_sha256=self.run.manifest.tokenizer_sha256,
            latest_checkpoint=_checkpoint_info(latest),
            numel=self.numel,
            coordinator_node_id=self.run.identity.node_id,
            coordinator_public_key=self.run.identity.public_key,
        )

    async def _fetch_file(
        self, request: pb.FetchFileRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.FileChunk]:
        try:
            path = self.run.public_file(request.path)
            data = await asyncio.to_thread(path.read_bytes)
        except (KeyError, FileNotFoundError):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no such file {request.path!r}")
            return
        digest = await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())
        yield pb.FileChunk(header=pb.FileHeader(path=request.path, size=len(data), sha256=digest))
        for offset in range(0, len(data), FILE_CHUNK_BYTES):
            yield pb.FileChunk(data=data[offset : offset + FILE_CHUNK_BYTES])

    # --- data leases and tokens -----------------------------------------------------------

    async def _acquire_lease(
        self, request: pb.AcquireLeaseRequest, node: Node | None, _: grpc.aio.ServicerContext
    ) -> pb.DataLease:
        assert node is not None
        now = self.clock()
        lease_s = self.config.membership.data_lease_s
        if request.finished and not self.store.is_shard(request.finished):
            raise Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"finished names no training shard of this run: {request.finished[:100]!r}",
            )
        with self.store.transaction():
            row = self.store.lease_shard(node.node_id, now, now + lease_s, request.finished)
        if row is None:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, "the run has no data shards")
        return pb.DataLease(
            file=row["file"],
            tokens=row["tokens"],
            sha256=row["sha256"],
            lease_s=lease_s,
            tokens_trained=row["tokens_trained"],
        )

    async def _report_tokens(
        self, request: pb.ReportTokensRequest, node: Node | None, _: grpc.aio.ServicerContext
    ) -> pb.ReportTokensResponse:
        assert node is not None
        now = self.clock()
        current = self.store.current_round()
        if current is None or current.round != request.round or current.phase != "training":
            state = "none" if current is None else f"{current.round} ({current.phase})"
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"round {request.round} is not training (current round {state})",
            )
        if request.tokens > MAX_REPORTED_TOKENS:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "implausible token count")
        if not self.store.lease_of(node.node_id, request.file, now):
            raise Refused(
                grpc.StatusCode.PERMISSION_DENIED, f"no live lease on data shard {request.file!r}"
            )
        with self.store.transaction():
            total = self.store.add_tokens(
                node.node_id, request.file, request.round, request.tokens, request.done
            )
            # Reporting tokens is a sign of life too.
            lease_s = self.config.membership.lease_s
            self.store.heartbeat(node.node_id, now, now + lease_s, "training", node.state_round)
        await self._advance()
        after = self.store.round(request.round)
        assert after is not None
        return pb.ReportTokensResponse(
            round_tokens=total, round_budget=current.budget, closed=after.phase != "training"
        )

    # --- rounds ---------------------------------------------------------------------------

    async def _get_round(
        self, request: pb.GetRoundRequest, _: Node | None, __: grpc.aio.ServicerContext
    ) -> pb.RoundState:
        if not math.isfinite(request.wait_s):  # NaN would wait until the round changes
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "wait_s must be a finite number")
        deadline = time.monotonic() + min(max(request.wait_s, 0.0), LONG_POLL_MAX_S)
        while True:
            changed = self._changed
            current = self.store.current_round()
            round_ = current if request.current else self.store.round(request.round)
            if round_ is None and not request.current:
                if current is None or request.round > current.round + 1:
                    raise Refused(grpc.StatusCode.NOT_FOUND, f"no round {request.round}")
            if round_ is not None and round_.version != request.known_version:
                return self._round_state(round_)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return pb.RoundState() if round_ is None else self._round_state(round_)
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                pass

    def _round_state(self, round_: Round) -> pb.RoundState:
        state = pb.RoundState(
            round=round_.round,
            phase=round_.phase,
            version=round_.version,
            deadline_unix=round_.deadline,
            budget=round_.budget,
            tokens=self.store.round_token_total(round_.round),
            checkpoint_due=self._checkpoint_due(round_),
        )
        if round_.plan is not None:
            state.plan.CopyFrom(_plan_message(round_.plan))
        if round_.commit is not None:
            state.commit.CopyFrom(_commit_message(round_.commit))
        return state

    def _checkpoint_due(self, round_: Round) -> bool:
        if round_.commit is None or not round_.commit["contributors"]:
            return False
        after = round_.round + 1
        if after % self.config.checkpoints.every:
            return False
        return after not in {c.round for c in self.store.checkpoints()}

    async def _report_shard(
        self, request: pb.ReportShardRequest, node: Node | None, _: grpc.aio.ServicerContext
    ) -> pb.ReportShardResponse:
        assert node is not None
        round_ = self.store.round(request.round)
        if round_ is None or round_.phase != "exchange" or round_.plan is None:
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION, f"round {request.round} is not exchanging"
            )
        plan = round_.plan
        if request.shard >= len(plan["owners"]):
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"no shard {request.shard}")
        verifier = rounds.verifier(plan, request.shard)
        as_verifier = verifier is not None and verifier["node_id"] == node.node_id
        if plan["owners"][request.shard]["node_id"] != node.node_id and not as_verifier:
            raise Refused(
                grpc.StatusCode.PERMISSION_DENIED,
                f"neither the owner nor the verifier of shard {request.shard}",
            )
        participants = {p["node_id"] for p in plan["participants"]}
        held = []
        for contributor in request.held:
            if contributor.node_id not in participants:
                raise Refused(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{contributor.node_id} is not a participant of round {request.round}",
                )
            held.append(
                {
                    "node_id": contributor.node_id,
                    "tokens": contributor.tokens,
                    "payload_hash": contributor.payload_hash.hex(),
                }
            )
        excluded = {e.node_id: e.reason[:MAX_REASON_CHARS] for e in request.excluded}
        if not set(excluded) <= participants:
            raise Refused(
                grpc.StatusCode.INVALID_ARGUMENT, "excludes a node that is not a participant"
            )
        gram = list(request.gram)
        if gram and (len(gram) != len(held) ** 2 or not all(math.isfinite(x) for x in gram)):
            raise Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                "gram must hold len(held)² finite values, row-major",
            )
        with self.store.transaction():
            self.store.put_shard_report(
                request.round, request.shard, node.node_id, held, excluded, as_verifier, gram
            )
        await self._advance()
        after = self.store.round(request.round)
        return pb.ReportShardResponse(decided=after is not None and after.phase == "committed")

    async def _report_exchange(
        self, request: pb.ReportExchangeRequest, node: Node | None, _: grpc.aio.ServicerContext
    ) -> pb.ReportExchangeResponse:
        assert node is not None
        round_ = self.store.round(request.round)
        if round_ is None or round_.plan is None:
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION, f"round {request.round} has no exchange"
            )
        if node.node_id not in {p["node_id"] for p in round_.plan["participants"]}:
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, "not a participant of that round")
        with self.store.transaction():
            self.store.put_exchange_report(
                request.round,
                node.node_id,
                request.bytes_sent,
                request.bytes_received,
                request.exchange_s,
                list(request.failed_owners),
            )
            if round_.commit is not None:
                commit = {**round_.commit, "bytes": self._wire_bytes(request.round)}
                self._put(round_, commit=commit, bump=False)
        return pb.ReportExchangeResponse(ok=True)

    async def _withdraw(
        self, request: pb.WithdrawRequest, node: Node | None, _: grpc.aio.ServicerContext
    ) -> pb.WithdrawResponse:
        """A participant that will send nothing this round (its training diverged): the
        owners stop waiting for it at once instead of at the exchange deadline."""
        assert node is not None
        # The owners' reports name it "withdrew: <reason>", kept to MAX_REASON_CHARS.
        reason = request.reason.strip()[: MAX_REASON_CHARS - len(WITHDREW)]
        if not reason:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "a withdrawal needs a reason")
        round_ = self.store.round(request.round)
        if round_ is None or round_.phase != "exchange" or round_.plan is None:
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION, f"round {request.round} is not exchanging"
            )
        if node.node_id not in {p["node_id"] for p in round_.plan["participants"]}:
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, "not a participant of that round")
        withdrawn = dict(round_.plan.get("withdrawn", {}))
        if node.node_id not in withdrawn:
            withdrawn[node.node_id] = WITHDREW + reason
            with self.store.transaction():
                round_ = self._put(round_, plan={**round_.plan, "withdrawn": withdrawn})
            if self.peer is not None:  # the coordinator reduces shards too
                await asyncio.to_thread(
                    self.peer.exclude, request.round, node.node_id, withdrawn[node.node_id]
                )
            log.info("round %d: %s %s", request.round, node.node_id, withdrawn[node.node_id])
            self._notify()
        return pb.WithdrawResponse(version=round_.version)

    async def _report_fingerprint(
        self, request: pb.ReportFingerprintRequest, node: Node | None, _: grpc.aio.ServicerContext
    ) -> pb.ReportFingerprintResponse:
        assert node is not None
        round_ = self.store.round(request.round)
        if round_ is None or round_.commit is None:
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION, f"round {request.round} is not committed"
            )
        if len(request.fingerprint) != 64:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "fingerprint must be 64 hex digits")
        with self.store.transaction():
            self.store.put_fingerprint(request.round, node.node_id, request.fingerprint)
            commit = round_.commit
            if not commit["fingerprint"]:
                agreed = rounds.agreed_fingerprint(
                    self.store.fingerprints(request.round), list(commit["contributors"])
                )
                if agreed is not None:
                    commit = {**commit, "fingerprint": agreed}
                    self._put(round_, commit=commit)
                    # Everyone who reported otherwise must resync.
                    for other, fp in self.store.fingerprints(request.round).items():
                        self.store.set_resync(other, fp != agreed)
            expected = commit["fingerprint"]
            resync = bool(expected) and expected != request.fingerprint
            if expected:
                self.store.set_resync(node.node_id, resync)
        previous = self.store.round(request.round - 1) if request.round > 0 else None
        previous_expected = previous.commit["fingerprint"] if previous and previous.commit else ""
        self._notify()
        return pb.ReportFingerprintResponse(
            expected=expected, resync=resync, previous_expected=previous_expected
        )

    async def _report_progress(
        self, request: pb.ReportProgressRequest, node: Node | None, _: grpc.aio.ServicerContext
    ) -> pb.ReportProgressResponse:
        assert node is not None
        values = {
            "round": request.round,
            "loss": request.loss,
            "tokens_per_s": request.tokens_per_s,
            "bytes_sent": request.bytes_sent,
            "bytes_received": request.bytes_received,
            "utilization": request.utilization,
            "train_loss": request.train_loss,
            "round_tokens": request.round_tokens,
        }
        # Dashboard figures: a diverged node's NaN would break the charts (and SQLite
        # stores NaN as NULL), an absurd one their scale.
        for name in ("loss", "tokens_per_s", "utilization", "train_loss"):
            if not math.isfinite(values[name]) or values[name] < 0:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{name} must be finite and >= 0")
        if request.utilization > 1.0 or request.round_tokens > MAX_REPORTED_TOKENS:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "implausible progress figures")
        with self.store.transaction():
            self.store.add_progress(node.node_id, self.clock(), values)
        return pb.ReportProgressResponse(ok=True)

    # --- checkpoints ------------------------------------------------------------------------

    async def _upload_checkpoint(
        self, chunks: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> pb.CheckpointInfo:
        return await _refusals_abort(lambda c, _: self._receive_checkpoint(c))(chunks, context)

    async def _receive_checkpoint(self, chunks: AsyncIterator[bytes]) -> pb.CheckpointInfo:
        round_holder: list[int] = []
        try:
            return await self._receive_checkpoint_once(chunks, round_holder)
        finally:
            for round_ in round_holder:
                self._uploading.discard(round_)

    async def _receive_checkpoint_once(
        self, chunks: AsyncIterator[bytes], uploading: list[int]
    ) -> pb.CheckpointInfo:
        first = await anext(aiter(chunks), None)
        header_raw = None if first is None else _safe_field(first, 1)
        if header_raw is None:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "the upload must start with a header")
        header, node = self._verified("UploadCheckpoint", pb.CheckpointHeader, header_raw)
        assert node is not None
        limit = 8 * self.numel + 65536  # two fp32 vectors plus the safetensors header
        if header.size > limit:
            raise Refused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"declared {header.size} bytes; a state of this run is at most {limit}",
            )
        if header.round in {c.round for c in self.store.checkpoints()}:
            raise Refused(grpc.StatusCode.ALREADY_EXISTS, f"checkpoint {header.round} is stored")
        if header.round in self._uploading:
            raise Refused(
                grpc.StatusCode.ALREADY_EXISTS, f"checkpoint {header.round} is being uploaded"
            )
        committed = self.store.round(header.round - 1) if header.round > 0 else None
        if committed is None or committed.commit is None or not committed.commit["fingerprint"]:
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"round {header.round - 1} has no commit with an agreed fingerprint yet",
            )
        if header.fingerprint != committed.commit["fingerprint"]:
            raise Refused(
                grpc.StatusCode.DATA_LOSS,
                "the checkpoint's fingerprint is not the one the round committed",
            )
        self._uploading.add(header.round)
        uploading.append(header.round)
        parts: list[bytes] = []
        received = 0
        async for raw in chunks:
            try:
                chunk = pb.CheckpointChunk.FromString(raw)
            except DecodeError:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "malformed chunk") from None
            if chunk.WhichOneof("kind") != "data":
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "a second header in the upload")
            received += len(chunk.data)
            if received > header.size:
                raise Refused(
                    grpc.StatusCode.RESOURCE_EXHAUSTED, "more bytes than the header declared"
                )
            parts.append(chunk.data)
        if received != header.size:
            raise Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"received {received} bytes, the header declared {header.size}",
            )
        blob = b"".join(parts)
        await asyncio.to_thread(self._check_state, blob, header)
        # Files in a worker thread; the database only ever from this loop (one
        # connection: a transaction from another thread would interleave with ours).
        info = await asyncio.to_thread(self._write_checkpoint, blob, header)
        with self.store.transaction():
            self.store.add_checkpoint(info)
            kept = sorted(c.round for c in self.store.checkpoints() if c.round > 0)
            dropped = kept[: -self.config.checkpoints.keep]
            for old in dropped:
                self.store.remove_checkpoint(old)
        for old in dropped:
            await asyncio.to_thread(
                shutil.rmtree, checkpoint_dir(self.run.path, old), ignore_errors=True
            )
        log.info("checkpoint %d stored (%s)", header.round, header.sha256[:12])
        self._notify()
        return _checkpoint_info(info)

    def _check_state(self, blob: bytes, header: pb.CheckpointHeader) -> None:
        if hashlib.sha256(blob).hexdigest() != header.sha256:
            raise Refused(grpc.StatusCode.DATA_LOSS, "the upload does not match its SHA-256")
        try:
            params, momentum = state_from_blob(blob, self.numel)
        except CheckpointError as err:
            raise Refused(grpc.StatusCode.DATA_LOSS, f"not a state of this run: {err}") from None
        if GlobalState(params, momentum).fingerprint() != header.fingerprint:
            raise Refused(
                grpc.StatusCode.DATA_LOSS, "the state does not match its declared fingerprint"
            )

    def _write_checkpoint(self, blob: bytes, header: pb.CheckpointHeader) -> Checkpoint:
        """The files, in a temporary folder renamed into place; the caller then adds the
        database row: a crash in between leaves an orphan folder that the next start
        removes."""
        final = checkpoint_dir(self.run.path, header.round)
        staging = final.with_name(f".{final.name}.tmp")
        if staging.exists():
            shutil.rmtree(staging)
        ckpt0 = json.loads((checkpoint_dir(self.run.path, 0) / "checkpoint.json").read_text())
        save_state_checkpoint(
            staging,
            blob,
            {
                "run_id": self.run_id,
                "round": header.round,
                "fingerprint": header.fingerprint,
                "model": ckpt0["model"],
            },
        )
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        return Checkpoint(header.round, header.sha256, header.size, header.fingerprint, time.time())

    def _remove_orphan_checkpoints(self) -> None:
        stored = {checkpoint_dir(self.run.path, c.round).name for c in self.store.checkpoints()}
        root = self.run.path / "checkpoints"
        for entry in root.iterdir():
            if entry.name not in stored:
                shutil.rmtree(entry, ignore_errors=True)

    # --- admin actions (the dashboard's authenticated POSTs) ---------------------------------

    def ban_node(self, node_id: str, reason: str) -> str | None:
        """Bans a node: every request it signs is refused from now on and it cannot join
        again; a contribution it already delivered to this round may still count.
        Returns the reason recorded; None for an unknown node."""
        if self.store.node(node_id) is None:
            return None
        reason = reason or "banned by the run's admin"
        with self.store.transaction():
            self.store.set_node_state(node_id, "banned", reason)
        log.info("banned %s by the admin: %s", node_id, reason)
        self._notify()
        return reason

    def revoke_join_token(self, token_id: str) -> bool:
        with self.store.transaction():
            found = self.store.revoke_join_token(token_id)
        if found:
            log.info("join token %s revoked by the admin", token_id)
        return found

    # --- status -------------------------------------------------------------------------------

    async def _get_status(self, _: pb.GetStatusRequest) -> pb.RunStatus:
        return self.status()

    def status(self) -> pb.RunStatus:
        now = self.clock()
        current = self.store.current_round()
        status = pb.RunStatus(
            run_id=self.run_id,
            name=self.config.run.name,
            round=0 if current is None else current.round,
            phase="waiting" if current is None else current.phase,
            tokens_trained=self.store.tokens_trained(),
            target_tokens=self.config.run.target_tokens,
            join_url=str(self.join_url) if self.bound_port is not None else "",
        )
        for node in self.store.nodes("active"):
            status.peers.append(
                pb.PeerStatus(
                    node_id=node.node_id,
                    device=node.device,
                    reachable=node.reachable,
                    state=node.state,
                    last_seen_s=max(0.0, now - node.last_seen),
                    rounds_contributed=node.rounds_contributed,
                    tokens_trained=node.tokens_trained,
                    resync=node.resync,
                )
            )
        commits = self.store.commits(1)
        if commits:
            status.last_commit.CopyFrom(_commit_message(commits[0]))
        status.latest_checkpoint.CopyFrom(_checkpoint_info(self.store.checkpoints()[-1]))
        return status

    # --- the round driver -----------------------------------------------------------------------

    async def _drive(self) -> None:
        while True:
            try:
                await self._advance()
            except Exception:  # a bug must not stop the run: log it and keep ticking
                log.exception("round driver")
            await asyncio.sleep(TICK_S)

    async def _advance(self) -> None:
        """One step of the round state machine: expiries, then open / close / commit."""
        now = self.clock()
        with self.store.transaction():
            expired = self.store.expire_nodes(now)
            self.store.expire_leases(now)
        if expired:
            log.info("expired %s", ", ".join(expired))
            await self._mark_gone()
            self._notify()
        current = self.store.current_round()
        if current is None or current.phase == "committed":
            active = self.store.nodes("active")
            # min_nodes gates the first round only: a run carries on with whoever is left.
            needed = self.config.membership.min_nodes if current is None else 1
            if len(active) >= needed:
                self._open(0 if current is None else current.round + 1, now)
        elif current.phase == "training":
            # Overlap: round r+1 trains while round r is exchanged; r+1 closes only once
            # r has committed (at most one exchange in flight).
            previous = self.store.round(current.round - 1) if current.round > 0 else None
            if previous is not None and previous.phase == "exchange":
                await self._maybe_commit(previous, now)
            else:
                await self._maybe_close(current, now)
        elif current.phase == "exchange":
            await self._maybe_commit(current, now)
        await self._settle_means(now)

    def _active_ids(self) -> set[str]:
        return {n.node_id for n in self.store.nodes("active")}

    async def _mark_gone(self) -> None:
        """Lists the participants of the rounds being exchanged that are no longer active
        (left, expired, banned) in their plans, so that owners stop waiting for them."""
        current = self.store.current_round()
        if current is None:
            return
        active = self._active_ids()
        for number in (current.round - 1, current.round):
            round_ = self.store.round(number) if number >= 0 else None
            if round_ is None or round_.phase != "exchange" or round_.plan is None:
                continue
            participants = {p["node_id"] for p in round_.plan["participants"]}
            gone = sorted((participants - active) | set(round_.plan.get("gone", [])))
            if gone == round_.plan.get("gone", []):
                continue
            with self.store.transaction():
                self._put(round_, plan={**round_.plan, "gone": gone})
            if self.peer is not None:
                for node_id in gone:
                    await asyncio.to_thread(self.peer.exclude, number, node_id, DEPARTED)

    def _put(self, round_: Round, bump: bool = True, **changes: Any) -> Round:
        values = {**round_.__dict__, **changes}
        if bump:
            values["version"] = round_.version + 1
        updated = Round(**values)
        self.store.put_round(updated)
        return updated

    def _open(self, number: int, now: float) -> None:
        budget = self.config.round.tokens
        if self._round_ends:
            budget = rounds.lr_following_budget(
                budget, self.store.tokens_trained(), self._schedule.batch_tokens, self._round_ends
            )
        with self.store.transaction():
            self.store.put_round(
                Round(
                    number,
                    "training",
                    1,
                    now,
                    now + self.config.round.deadline_s,
                    budget,
                    None,
                    None,
                )
            )
        log.info("round %d open", number)
        self._notify()

    def _unreliable_reducers(self) -> dict[str, str]:
        """rounds.unreliable_reducers over the last RELIABILITY_WINDOW rounds, from each
        commit's lost contributions, worked out once per commit (a commit record grows
        with nodes × shards: not parsed again at every close)."""
        newest = self.store.last_committed_round()
        window = range(max(0, newest - rounds.RELIABILITY_WINDOW + 1), newest + 1)
        for number in window:
            if number not in self._lost:
                round_ = self.store.round(number)
                commit = round_.commit if round_ is not None else None
                self._lost[number] = [] if commit is None else rounds.lost_contributions(commit)
        for old in [n for n in self._lost if n not in window]:
            del self._lost[old]
        return rounds.unreliable_reducers(self._lost)

    def _on_probation(self) -> frozenset[str]:
        """The nodes the newest commit rejected as poisoned (rounds.counted_tokens: their
        tokens do not count toward the budget), worked out once per commit."""
        newest = self.store.last_committed_round()
        if self._probation[0] != newest:
            round_ = self.store.round(newest) if newest >= 0 else None
            commit = round_.commit if round_ is not None else None
            offenders = frozenset() if commit is None else frozenset(rounds.offenders(commit))
            self._probation = (newest, offenders)
        return self._probation[1]

    async def _maybe_close(self, round_: Round, now: float) -> None:
        tokens = self.store.round_tokens(round_.round)
        active = {n.node_id: n for n in self.store.nodes("active")}
        since_open = {n for n, node in active.items() if node.joined <= round_.opened}
        closing = rounds.should_close(round_.budget, tokens, since_open, self._on_probation())
        if not closing and now < round_.deadline:
            return
        contributors = [active[n] for n, (t, _) in tokens.items() if t > 0 and n in active]
        if not contributors:
            with self.store.transaction():  # nobody trained: give the round more time
                self._put(round_, deadline=now + self.config.round.deadline_s)
            self._notify()
            return
        demoted = self._unreliable_reducers() if self.config.defences.demote_reducers else {}
        for node_id in sorted(set(demoted) - self._demoted):
            log.warning(
                "%s reduces no shard from round %d: it %s", node_id, round_.round, demoted[node_id]
            )
        self._demoted = set(demoted)
        plan = rounds.exchange_plan(
            self.numel,
            self.config.outer.codec,
            contributors,
            {n: t for n, (t, _) in tokens.items()},
            self._coordinator_peer(),
            self.config.round.shards_per_owner,
            now + self.config.round.exchange_deadline_s,
            # Means are served only after the decision, which may wait for one
            # reassignment (a second exchange deadline) and two report graces.
            gather_timeout_s=2 * (self.config.round.exchange_deadline_s + REPORT_GRACE_S),
            verify=self.config.defences.verify_means,
            demoted=demoted,
        )
        with self.store.transaction():
            updated = self._put(round_, phase="exchange", plan=plan)
        log.info("round %d closed: %d contributors", round_.round, len(contributors))
        await self._own_shards(updated)
        if self.config.outer.overlap:
            self._open(round_.round + 1, now)  # nodes train on while this one exchanges
        self._notify()

    def _spec(self, round_: Round) -> RoundSpec:
        plan = round_.plan
        assert plan is not None
        return RoundSpec(
            run_id=self.run_id,
            round=round_.round,
            codec=plan["codec"],
            plan=ShardPlan(tuple(plan["bounds"])),
            owners=tuple(_endpoint(o) for o in plan["owners"]),
            participants={
                p["node_id"]: bytes.fromhex(p["public_key"]) for p in plan["participants"]
            },
            deadline=plan["deadline"],
            gather_timeout_s=plan["gather_timeout_s"],
            decision="external",
            verifiers=tuple(
                None if v is None else _endpoint(v) for v in plan.get("verifiers") or []
            ),
        )

    async def _own_shards(self, round_: Round) -> None:
        """Opens the shards this coordinator owns (last resort) and reports what it holds
        once they close."""
        assert self.peer is not None and round_.plan is not None
        spec = self._spec(round_)
        mine = spec.shards_of(self.run.identity.node_id)
        key = (round_.round, len(round_.plan["reassigned"]))
        if not mine or key in self._owned_rounds:
            return
        self._owned_rounds.add(key)
        for old in [k for k in self._owned_rounds if k[0] < round_.round - SETTLED_ROUNDS]:
            self._owned_rounds.discard(old)
        await asyncio.to_thread(self.peer.open_round, spec)
        # Not waited for: the participants gone already (left or expired; listed in the
        # plan first, which is what makes the claim one the commit accepts) and those
        # that withdrew, as the plan lists them after the open (an exclusion during it
        # may have found no shard to leave them out of).
        await self._mark_gone()
        latest = self.store.round(spec.round)
        plan = round_.plan if latest is None or latest.plan is None else latest.plan
        reasons = {node_id: DEPARTED for node_id in plan.get("gone", [])}
        reasons.update(plan.get("withdrawn", {}))
        for node_id, reason in sorted(reasons.items()):
            await asyncio.to_thread(self.peer.exclude, spec.round, node_id, reason)

        async def report() -> None:
            assert self.peer is not None
            timeout = spec.deadline - self.clock() + REPORT_GRACE_S
            held = await asyncio.to_thread(self.peer.holders, spec.round, max(timeout, 1.0))
            excluded = await asyncio.to_thread(self.peer.excluded, spec.round)
            grams = await asyncio.to_thread(self.peer.grams, spec.round)
            with self.store.transaction():
                for shard in mine:
                    self.store.put_shard_report(
                        spec.round,
                        shard,
                        self.run.identity.node_id,
                        [
                            {"node_id": n, "tokens": t, "payload_hash": h.hex()}
                            for n, (t, h) in sorted(held.get(shard, {}).items())
                        ],
                        excluded.get(shard, {}),
                        gram=grams.get(shard),
                    )
            await self._advance()

        self._spawn(report())

    async def _maybe_commit(self, round_: Round, now: float) -> None:
        plan = round_.plan
        assert plan is not None
        reports = self.store.shard_reports(round_.round)
        verifier_reports = self.store.shard_reports(round_.round, verifier=True)
        shards = [s for s in range(len(plan["owners"])) if str(s) not in plan["skipped"]]
        missing = [s for s in shards if s not in reports]
        unverified = [s for s in shards if rounds.verifier(plan, s) and s not in verifier_reports]
        if (missing or unverified) and now < plan["deadline"] + REPORT_GRACE_S:
            # A report is waited for until the deadline and its grace, unless its
            # reporter is gone already (its lease expired, or it left): then at once.
            awaited = {plan["owners"][s]["node_id"] for s in missing}
            awaited |= {plan["verifiers"][s]["node_id"] for s in unverified}
            active = self._active_ids()
            if awaited & (active | {self.run.identity.node_id}):
                return
        if unverified and not missing:
            # A verifier that did not report is dropped: its shard commits on its
            # owner's word alone (a shard the coordinator takes over needs none either).
            plan = json.loads(json.dumps(plan))
            for shard in unverified:
                why = f"verifier {plan['verifiers'][shard]['node_id']} did not report"
                _drop_verifier(plan, shard, why)
            with self.store.transaction():
                round_ = self._put(round_, plan=plan)
            log.info("round %d: shards %s unverified", round_.round, unverified)
        if missing:
            plan = json.loads(json.dumps(plan))
            reassigned = False
            me = self._coordinator_peer()
            for shard in missing:
                owner = plan["owners"][shard]["node_id"]
                if str(shard) in plan["reassigned"] or owner == me["node_id"]:
                    plan["skipped"][str(shard)] = f"owner {owner} did not report: skipped"
                else:
                    plan["owners"][shard] = me
                    plan["reassigned"][str(shard)] = f"owner {owner} did not report: reassigned"
                    reassigned = True
                _drop_verifier(plan, shard, f"owner {owner} did not report")
            if reassigned:
                plan["deadline"] = now + self.config.round.exchange_deadline_s
            with self.store.transaction():
                updated = self._put(round_, plan=plan)
            log.info("round %d: shards %s reassigned or skipped", round_.round, missing)
            if reassigned:
                await self._own_shards(updated)
            self._notify()
            return
        verdicts = self._audited(round_, reports, verifier_reports)
        if verdicts is None:
            return  # audits under way: each calls _advance when it ends
        if verdicts:
            await self._void_reports(round_, reports, verifier_reports, verdicts, now)
            return
        judged, cosines = self._judged_direction(round_, reports, verifier_reports)
        record = rounds.commit_record(
            round_.round,
            plan,
            reports,
            round_.opened,
            now,
            self._wire_bytes(round_.round),
            self.store.shard_exclusions(round_.round),
            verifier_reports,
            self.store.shard_exclusions(round_.round, verifier=True),
            judged,
            cosines,
        )
        with self.store.transaction():
            self._put(round_, phase="committed", commit=record)
            self._unsettled.add(round_.round)
            self.store.credit_contributors(list(record["contributors"]))
            for node_id, reason in rounds.offenders(record).items():
                count = self.store.add_offence(node_id)
                log.warning("round %d: %s rejected (%d): %s", round_.round, node_id, count, reason)
                ban_after = self.config.defences.ban_after_offences
                if ban_after and count >= ban_after:
                    self.store.set_node_state(
                        node_id, "banned", f"rejected in {count} rounds; last: {reason}"
                    )
                    log.warning("banned %s: rejected in %d rounds", node_id, count)
        log.info(
            "round %d committed: %d contributors, %d tokens",
            round_.round,
            len(record["contributors"]),
            record["tokens"],
        )
        self._resolve_disputes(record)
        release_free_heap()
        spec = self._spec(round_)
        if spec.shards_of(self.run.identity.node_id):
            assert self.peer is not None
            try:
                await asyncio.to_thread(self.peer.decide, round_.round, set(record["contributors"]))
            except ValueError as err:  # a shard we owned but skipped
                log.warning("round %d: %s", round_.round, err)
        self._notify()

    def _audited(
        self,
        round_: Round,
        reports: dict[int, tuple[str, list[dict[str, Any]]]],
        verifier_reports: dict[int, tuple[str, list[dict[str, Any]]]],
    ) -> dict[str, tuple[str, bool]] | None:
        """Owner → (why its reports are void, whether the lie is proven), for owners (or
        verifiers) that reported offences the evidence does not bear out
        (starling.exchange.audit); None while an audit runs. Reports with no offence in
        them are not audited, nor this coordinator's own."""
        me = self._coordinator_peer()["node_id"]
        verdicts: dict[str, tuple[str, bool]] = {}
        pending = False
        for as_verifier, by in ((False, reports), (True, verifier_reports)):
            exclusions = self.store.shard_exclusions(round_.round, as_verifier)
            for shard, excluded in sorted(exclusions.items()):
                claimed = {n: why for n, why in excluded.items() if why.startswith(REJECTED)}
                reporter = by[shard][0]  # exclusions come from the same reports
                if not claimed or reporter == me or self.peer is None:
                    continue
                key = (round_.round, shard, reporter)
                if key not in self._audits:
                    self._audits[key] = None
                    audit = self._audit(round_, shard, reporter, claimed)
                    self._spawn(audit)
                verdict = self._audits[key]
                if verdict is None:
                    pending = True
                elif verdict[0]:
                    verdicts.setdefault(reporter, verdict)
        for old in [k for k in self._audits if k[0] < round_.round - 8]:
            del self._audits[old]
        return None if pending else verdicts

    def _judged_direction(
        self,
        round_: Round,
        reports: dict[int, tuple[str, list[dict[str, Any]]]],
        verifier_reports: dict[int, tuple[str, list[dict[str, Any]]]],
    ) -> tuple[dict[str, str], dict[str, float]]:
        """With [defences] screen_direction: (node id → why its whole pseudo-gradient
        points against the others', in this round or over the last rounds; node id →
        its whole-update cosine, for the commit), from the sum of the owners' Gram
        matrices (robust.direction_outliers, robust.persistent_direction_outliers)."""
        if not self.config.defences.screen_direction or round_.plan is None:
            return {}, {}
        plan = round_.plan
        summed = rounds.summed_gram(
            plan,
            reports,
            self.store.shard_grams(round_.round),
            verifier_reports,
            self.store.shard_grams(round_.round, verifier=True),
        )
        if isinstance(summed, str):
            log.warning("round %d: direction not judged: %s", round_.round, summed)
            return {}, {}
        ids, matrix = summed
        tokens = {p["node_id"]: int(plan["tokens"][p["node_id"]]) for p in plan["participants"]}
        judged = direction_outliers(ids, matrix, tokens, plan["bounds"][-1])
        cosines = whole_update_cosines(ids, matrix, tokens)
        history = []  # what the commits of the rounds before recorded, oldest first
        for earlier in range(max(0, round_.round - DIRECTION_WINDOW + 1), round_.round):
            past = self.store.round(earlier)
            if past is not None and past.commit is not None:
                history.append(past.commit.get("direction", {}))
        for node_id, why in persistent_direction_outliers(cosines, history).items():
            judged.setdefault(node_id, why)
        if not cosines:  # too few contributions to judge this round: history alone
            judged.update(history_direction_outliers(ids, history))
        return judged, cosines

    async def _audit(
        self, round_: Round, shard: int, reporter: str, claimed: dict[str, str]
    ) -> None:
        assert self.peer is not None
        spec = self._spec(round_)
        verifier = spec.verifier(shard)
        owner = verifier if verifier and verifier.node_id == reporter else spec.owners[shard]
        screening = self.config.defences.screen
        direction = False  # owners do not judge direction: the coordinator does, whole
        try:
            evidence = await asyncio.to_thread(
                self.peer.fetch_evidence, owner, spec.round, shard, AUDIT_TIMEOUT_S
            )
            false = await asyncio.to_thread(
                false_rejections, spec, shard, evidence, claimed, screening, direction
            )
            verdict = "; ".join(f"reported {n} as an offender, but {w}" for n, w in false.items())
            proven = bool(false)
        except ForgedEvidence as err:
            verdict, proven = f"served forged evidence: {err}", True
        except ExchangeError as err:
            verdict, proven = f"did not serve the evidence for its report: {err}", False
        self._audits[(spec.round, shard, owner.node_id)] = (verdict, proven)
        if verdict:
            log.warning(
                "round %d: owner %s of shard %d %s", spec.round, owner.node_id, shard, verdict
            )
        await self._advance()

    async def _void_reports(
        self,
        round_: Round,
        reports: dict[int, tuple[str, list[dict[str, Any]]]],
        verifier_reports: dict[int, tuple[str, list[dict[str, Any]]]],
        verdicts: dict[str, tuple[str, bool]],
        now: float,
    ) -> None:
        """Every report of an owner whose report was false is void: its shards go to this
        coordinator (or are skipped, if reassigned once already) and are pushed again,
        and the shards it verifies lose their verifier; the owner is out of the round,
        and banned when the lie is proven (a claim its own signed evidence contradicts),
        never the contributor it framed."""
        assert round_.plan is not None
        plan = json.loads(json.dumps(round_.plan))
        me = self._coordinator_peer()
        barred = plan.setdefault("barred", {})
        with self.store.transaction():
            for shard, (owner, _) in sorted(reports.items()):
                if owner not in verdicts:
                    continue
                why = f"owner {owner} {verdicts[owner][0]}"
                self.store.delete_shard_report(round_.round, shard)
                if str(shard) in plan["reassigned"]:
                    plan["skipped"][str(shard)] = f"{why}: skipped"
                else:
                    plan["owners"][shard] = me
                    plan["reassigned"][str(shard)] = f"{why}: reassigned"
                _drop_verifier(plan, shard, "its owner's report was false")
            for shard, (verifier, _) in sorted(verifier_reports.items()):
                if verifier in verdicts:
                    self.store.delete_shard_report(round_.round, shard, verifier=True)
                    _drop_verifier(plan, shard, f"verifier {verifier} {verdicts[verifier][0]}")
            for owner, (verdict, proven) in verdicts.items():
                barred[owner] = f"its report as a shard owner was false: {verdict}"
                if proven:
                    self.store.set_node_state(owner, "banned", f"a lying shard owner: {verdict}")
                    log.warning("banned %s: a lying shard owner", owner)
            plan["deadline"] = now + self.config.round.exchange_deadline_s
            updated = self._put(round_, plan=plan)
        await self._own_shards(updated)
        self._notify()

    # --- settling the mean of each verified shard ---------------------------------------

    async def _report_mean(
        self, request: pb.ReportMeanRequest, node: Node | None, _: grpc.aio.ServicerContext
    ) -> pb.ReportMeanResponse:
        assert node is not None
        round_ = self.store.round(request.round)
        if round_ is None or round_.commit is None or round_.plan is None:
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION, f"round {request.round} is not committed"
            )
        shards = round_.commit["shards"]
        if request.shard >= len(shards):
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"no shard {request.shard}")
        entry = shards[request.shard]
        verifier = entry.get("verifier", "")  # "" in records from before verifiers
        if not verifier or node.node_id not in (entry["owner"], verifier):
            raise Refused(
                grpc.StatusCode.PERMISSION_DENIED,
                f"neither the owner nor the verifier of verified shard {request.shard}",
            )
        header = request.header
        if (header.run_id, header.round, header.shard, header.owner) != (
            self.run_id,
            request.round,
            request.shard,
            node.node_id,
        ):
            raise Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                "the header names another run, round, shard or owner",
            )
        if len(header.payload_hash) != 32:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "payload_hash must be 32 bytes")
        contributors = [(c.node_id, c.tokens, c.payload_hash) for c in header.contributors]
        signed = mean_message(
            header.run_id, header.round, header.shard, header.codec_id, header.numel,
            header.payload_hash, contributors,
        )  # fmt: skip
        if not verify(node.public_key, signed, header.owner_signature):
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "the mean's signature does not verify")
        with self.store.transaction():
            self.store.put_mean_report(
                request.round, request.shard, node.node_id, header.SerializeToString()
            )
        await self._settle_means(self.clock())
        after = self.store.round(request.round)
        commit = after.commit if after is not None else None
        settled = commit is not None and bool(commit["shards"][request.shard]["mean_status"])
        return pb.ReportMeanResponse(settled=settled)

    async def _settle_means(self, now: float) -> None:
        """Settles the mean hash of every verified shard of the committed rounds not yet
        settled whose owners reported (rounds.settled_mean); starts a recomputation where
        the two disagree, and bans the owner whose signed mean it shows wrong."""
        for number in sorted(self._unsettled):
            round_ = self.store.round(number)
            if round_ is None or round_.commit is None:
                self._unsettled.discard(number)
                continue
            commit = json.loads(json.dumps(round_.commit))
            changed = pending = False
            for entry in commit["shards"]:
                if not entry.get("verifier") or entry["mean_status"]:
                    continue
                settled = self._settled(round_, entry, now)
                if settled is None:
                    pending = True
                    continue
                entry["mean_hash"], entry["mean_status"] = settled
                changed = True
            if changed:
                with self.store.transaction():
                    self._put(round_, commit=commit)
                self._notify()
            if not pending:
                self._unsettled.discard(number)
        for old in [k for k in self._recomputes if k[0] not in self._unsettled]:
            del self._recomputes[old]

    def _settled(self, round_: Round, entry: dict[str, Any], now: float) -> tuple[str, str] | None:
        shard = entry["shard"]
        owners = (entry["owner"], entry["verifier"])
        headers = {
            n: peer_pb2.MeanHeader.FromString(raw)
            for n, raw in self.store.mean_reports(round_.round, shard).items()
        }
        committed = {h["node_id"]: (h["tokens"], h["payload_hash"]) for h in entry["held"]}
        included = set(round_.commit["contributors"])  # type: ignore[index]
        expected = sorted((n, *committed[n]) for n in included)
        hashes = {}
        for node_id, header in headers.items():
            listed = [(c.node_id, c.tokens, c.payload_hash.hex()) for c in header.contributors]
            # A mean signed over other contributions than the commit's is a wrong mean.
            hashes[node_id] = header.payload_hash.hex() if listed == expected else "wrong list"
        overdue = now > round_.commit["committed"] + MEAN_GRACE_S  # type: ignore[index]
        if not overdue and len(hashes) == 1:  # the other is not waited for once it is gone
            active = self._active_ids()
            overdue = not set(owners) - set(hashes) <= active
        settled = rounds.settled_mean(*owners, hashes, overdue)
        if settled is None or settled[1] != "disputed":
            return settled
        key = (round_.round, shard)
        if key not in self._recomputes:
            self._recomputes[key] = None
            self._spawn(self._recompute(round_, shard, hashes))
            log.warning("round %d: the two owners of shard %d disagree on its mean", *key)
        verdict = self._recomputes[key]
        if verdict is None:
            return None
        recomputed, liars = verdict
        if not recomputed:
            return "", "void: the owners disagree and the mean could not be recomputed"
        with self.store.transaction():
            for liar, why in liars.items():
                self.store.set_node_state(liar, "banned", why)
                log.warning("banned %s: %s", liar, why)
        return recomputed, "recomputed: " + "; ".join(
            f"{n} served a wrong mean" for n in sorted(liars)
        )

    async def _recompute(self, round_: Round, shard: int, hashes: dict[str, str]) -> None:
        """Recomputes the disputed mean from the signed contributions one of its owners
        kept (the other's, if the first cannot serve them)."""
        assert self.peer is not None and round_.commit is not None
        spec = self._spec(round_)
        entry = round_.commit["shards"][shard]
        held = {h["node_id"]: h for h in entry["held"]}
        contributors = {
            n: (int(held[n]["tokens"]), bytes.fromhex(held[n]["payload_hash"]))
            for n in round_.commit["contributors"]
        }
        recomputed, why = "", ""
        for endpoint in (spec.owners[shard], spec.verifier(shard)):
            assert endpoint is not None
            try:
                evidence = await asyncio.to_thread(
                    self.peer.fetch_evidence, endpoint, spec.round, shard, AUDIT_TIMEOUT_S
                )
                digest = await asyncio.to_thread(
                    recompute_mean, spec, shard, evidence, contributors
                )
            except (ExchangeError, ForgedEvidence, IncompleteEvidence) as err:
                why += f"{endpoint.node_id}: {err}; "
                continue
            recomputed = digest.hex()
            break
        liars = {
            n: f"served a wrong mean for shard {shard} of round {spec.round} "
            f"(signed {h[:16]}, recomputed {recomputed[:16]})"
            for n, h in hashes.items()
            if recomputed and h != recomputed
        }
        if not recomputed:
            log.warning("round %d: shard %d's mean not recomputed: %s", spec.round, shard, why)
        self._recomputes[(spec.round, shard)] = (recomputed, liars)
        await self._advance()

    def _resolve_disputes(self, record: dict[str, Any]) -> None:
        """Starts a resolution for each dispute of a commit that has no verdict yet
        (after the commit; at start, for the newest commits: a restart loses those in
        flight)."""
        decided = {(d["contributor"], d["shard"]) for d in record.get("disputes", [])}
        for contributor, shards in record.get("disputed", {}).items():
            for shard in shards:
                if (contributor, shard) not in decided:
                    task = self._resolve_dispute(record["round"], shard, contributor)
                    self._spawn(task)

    async def _resolve_dispute(self, number: int, shard: int, contributor: str) -> None:
        """A shard's owner and verifier reported different contributions of
        `contributor`: each must show the signed contribution it reported. Bans the
        reducer that cannot (it framed the contributor) or, if both can, the
        contributor (it signed two); records the verdict in the commit's `disputes`.
        A reducer that serves no evidence while the other shows what it reported is
        not banned (a crashed node serves none either) but `withheld` it: that counts
        as the contribution lost by it alone (rounds.lost_contributions), so a liar
        that keeps refusing is demoted like a censor."""
        assert self.peer is not None
        round_ = self.store.round(number)
        assert round_ is not None and round_.commit is not None
        spec = self._spec(round_)
        owner, verifier = spec.owners[shard], spec.verifier(shard)
        assert verifier is not None
        verifier_report = self.store.shard_reports(number, verifier=True).get(shard)
        assert verifier_report is not None  # the dispute was found in it
        reported = {
            owner.node_id: round_.commit["shards"][shard]["held"],
            verifier.node_id: verifier_report[1],
        }
        claims = {
            reducer: (int(h["tokens"]), bytes.fromhex(h["payload_hash"]))
            for reducer, held in reported.items()
            for h in held
            if h["node_id"] == contributor
        }
        evidence: dict[str, list[Evidence]] = {}
        unserved: dict[str, str] = {}  # node id → why its evidence could not be fetched
        for endpoint in (owner, verifier):
            try:
                evidence[endpoint.node_id] = await asyncio.to_thread(
                    self.peer.fetch_evidence, endpoint, number, shard, AUDIT_TIMEOUT_S
                )
            except ExchangeError as err:
                unserved[endpoint.node_id] = str(err)
        liars = disputed_contribution(spec, shard, contributor, claims, evidence)
        findings = [f"{n} {why}" for n, why in sorted(liars.items())]
        findings += [
            f"undecided: {n} did not serve its evidence ({why})" for n, why in unserved.items()
        ]
        # One side withheld, the other showed its claim (then it is not among the liars).
        withheld = next(iter(unserved)) if len(unserved) == 1 and not liars else None
        if withheld:
            (shown,) = evidence
            findings.append(f"{shown} showed the contribution it reported")
        verdict = "; ".join(findings) or "no dispute"
        log.warning(
            "round %d, shard %d, contribution of %s: %s", number, shard, contributor, verdict
        )
        with self.store.transaction():
            for liar, why in liars.items():
                self.store.set_node_state(liar, "banned", why)
                log.warning("banned %s: %s", liar, why)
            latest = self.store.round(number)
            assert latest is not None and latest.commit is not None
            commit = json.loads(json.dumps(latest.commit))
            outcome = {"shard": shard, "contributor": contributor, "verdict": verdict}
            if withheld:
                outcome["withheld"] = withheld
            commit.setdefault("disputes", []).append(outcome)
            self._put(latest, commit=commit)
        self._lost.pop(number, None)  # its losses now count the withheld evidence too
        self._notify()

    def _wire_bytes(self, round_: int) -> int:
        return sum(
            int(r["bytes_sent"]) + int(r["bytes_received"])
            for r in self.store.exchange_reports(round_)
        )


def _refusals_abort(
    handler: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]],
) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
    """The handler, with a Refused turned into the call's status code and detail."""

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await handler(request, context)
        except Refused as refused:
            await context.abort(refused.code, refused.detail)
            raise AssertionError("unreachable") from None

    return call


def _safe_field(raw: bytes, number: int) -> bytes | None:
    try:
        return field_value(raw, number)
    except AuthError:
        return None


def _endpoint(peer: dict[str, Any]) -> PeerEndpoint:
    return PeerEndpoint(
        peer["node_id"],
        peer["address"],
        peer["cert_fingerprint"] or None,
        bytes.fromhex(peer["public_key"]),
    )


def _peer_message(peer: dict[str, Any]) -> pb.PeerInfo:
    return pb.PeerInfo(
        node_id=peer["node_id"],
        address=peer["address"],
        cert_fingerprint=peer["cert_fingerprint"],
        public_key=bytes.fromhex(peer["public_key"]),
    )


def _drop_verifier(plan: dict[str, Any], shard: int, why: str) -> None:
    """Shard `shard` commits on its owner's word alone from now on."""
    if rounds.verifier(plan, shard) is not None:
        plan["verifiers"][shard] = None
        plan.setdefault("unverified", {})[str(shard)] = why


def _plan_message(plan: dict[str, Any]) -> pb.ExchangePlan:
    return pb.ExchangePlan(
        codec=plan["codec"],
        bounds=plan["bounds"],
        owners=[_peer_message(o) for o in plan["owners"]],
        participants=[_peer_message(p) for p in plan["participants"]],
        deadline_unix=plan["deadline"],
        reassigned=sorted(int(s) for s in plan["reassigned"]),
        gather_timeout_s=plan["gather_timeout_s"],
        verifiers=[
            pb.PeerInfo() if v is None else _peer_message(v) for v in plan.get("verifiers") or []
        ],
        gone=plan.get("gone", []),
        withdrawn=[
            peer_pb2.Exclusion(node_id=n, reason=r)
            for n, r in sorted(plan.get("withdrawn", {}).items())
        ],
    )


def _commit_message(commit: dict[str, Any]) -> pb.Commit:
    return pb.Commit(
        round=commit["round"],
        contributors=[
            peer_pb2.Contributor(node_id=n, tokens=t) for n, t in commit["contributors"].items()
        ],
        tokens=commit["tokens"],
        bytes=commit["bytes"],
        duration_s=commit["duration_s"],
        fingerprint=commit["fingerprint"],
        shards=[
            pb.ShardCommit(
                shard=s["shard"],
                owner=s["owner"],
                status=s["status"],
                detail=s["detail"],
                held=[
                    peer_pb2.Contributor(
                        node_id=h["node_id"],
                        tokens=h["tokens"],
                        payload_hash=bytes.fromhex(h["payload_hash"]),
                    )
                    for h in s["held"]
                ],
                verifier=s.get("verifier", ""),
                mean_hash=bytes.fromhex(s.get("mean_hash", "")),
                mean_status=s.get("mean_status", ""),
            )
            for s in commit["shards"]
        ],
        excluded=[peer_pb2.Exclusion(node_id=n, reason=r) for n, r in commit["excluded"].items()],
        committed_unix=commit["committed"],
    )


def _checkpoint_info(ckpt: Checkpoint) -> pb.CheckpointInfo:
    return pb.CheckpointInfo(
        round=ckpt.round,
        sha256=ckpt.sha256,
        size=ckpt.size,
        fingerprint=ckpt.fingerprint,
        created_unix=ckpt.created,
    )

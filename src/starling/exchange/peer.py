"""One node's exchange: its owner service (when reachable) and its client, on an asyncio
loop in a background thread, behind a blocking API for the training loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Collection, Coroutine
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from safetensors.torch import save as save_safetensors

from starling.exchange.audit import Evidence
from starling.exchange.client import ExchangeClient, GlobalStateDownload, RoundResult
from starling.exchange.framing import add_peer_service
from starling.exchange.owner import OwnerService
from starling.exchange.plan import PeerEndpoint, RoundSpec
from starling.exchange.transport import (
    SERVER_OPTIONS,
    BandwidthLimits,
    RateLimiter,
    Traffic,
    TrafficLedger,
)
from starling.identity import Identity, TlsCertificate
from starling.serving import DEFAULT_REQUEST_LIMITS, RequestLimits, RequestThrottle
from starling.v1 import peer_pb2

T = TypeVar("T")
PEER_SERVICE = peer_pb2.DESCRIPTOR.services_by_name["Peer"].full_name


async def create_server(
    service: OwnerService,
    host: str,
    port: int,
    tls: TlsCertificate | None,
    request_limits: RequestLimits | None = DEFAULT_REQUEST_LIMITS,
) -> tuple[grpc.aio.Server, int]:
    """A started gRPC server for the Peer service (plus health and reflection) on
    host:port (port 0: any free one), each peer held to `request_limits` (None: no
    limit); returns it with the bound port."""
    server = grpc.aio.server(options=SERVER_OPTIONS)
    throttle = None if request_limits is None else RequestThrottle(request_limits)
    add_peer_service(service, server, throttle)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (PEER_SERVICE, reflection.SERVICE_NAME, health.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if tls is None:
        bound = server.add_insecure_port(address)
    else:
        credentials = grpc.ssl_server_credentials([(tls.key_pem, tls.cert_pem)])
        bound = server.add_secure_port(address, credentials)
    await server.start()
    await health_servicer.set(PEER_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    return server, bound


@dataclass(frozen=True)
class PeerConfig:
    run_id: str
    host: str = "127.0.0.1"  # where the owner service listens ("0.0.0.0": everywhere)
    port: int = 0  # 0: a free ephemeral port
    advertise_host: str | None = None  # what others dial (default: host)
    reachable: bool = True  # False: client-only (behind NAT), owns no shard, no server
    limits: BandwidthLimits = BandwidthLimits()
    keep_rounds: int = 8  # committed means kept for nodes that fell behind
    # Pushes (then fetches) in flight at once. 1: one flow per link at a time, in turn,
    # which keeps shaped links busiest (bench/exchange.py); more: a slow owner holds up
    # the others less.
    streams: int = 1
    screen: bool = True  # owners screen contributions (starling.robust) before the mean
    screen_direction: bool = True  # ... including the per-shard direction check
    gram: bool = False  # report each shard's Gram matrix (the whole-update direction check)
    # What one peer may ask of this owner service (starling.serving); None: no limit.
    request_limits: RequestLimits | None = DEFAULT_REQUEST_LIMITS

    def __post_init__(self) -> None:
        if not self.run_id:
            raise ValueError("a peer needs a run id")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port {self.port} is out of range")
        if self.keep_rounds < 1:
            raise ValueError("keep_rounds must be at least 1")
        if self.streams < 1:
            raise ValueError("streams must be at least 1")


class ExchangePeer:
    """Use as a context manager; every method blocks the calling thread only."""

    def __init__(self, identity: Identity, config: PeerConfig, tls: TlsCertificate | None) -> None:
        self.identity = identity
        self.config = config
        self.tls = tls
        self.ledger = TrafficLedger()
        self.upload = RateLimiter(config.limits.upload_mbps)
        self.download = RateLimiter(config.limits.download_mbps)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.owner: OwnerService | None = None
        self._server: grpc.aio.Server | None = None
        self.port: int | None = None
        self.client = self._run(self._make_client())
        if config.reachable:
            self.port = self._run(self._serve())

    def __enter__(self) -> ExchangePeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def endpoint(self) -> PeerEndpoint | None:
        """How others reach this peer's owner service (None when client-only)."""
        if self.port is None:
            return None
        host = self.config.advertise_host or self.config.host
        host = f"[{host}]" if ":" in host else host
        fingerprint = None if self.tls is None else self.tls.fingerprint
        return PeerEndpoint(
            self.identity.node_id, f"{host}:{self.port}", fingerprint, self.identity.public_key
        )

    def open_round(self, spec: RoundSpec) -> None:
        """Prepares to own this node's shards of `spec` (no-op for client-only peers)."""
        if self.owner is not None:
            owner = self.owner
            self._run(_call(lambda: owner.open_round(spec)))

    def exclude(self, round_: int, node_id: str, reason: str) -> None:
        if self.owner is not None:
            owner = self.owner
            self._run(_call(lambda: owner.exclude(round_, node_id, reason)))

    def holders(self, round_: int, timeout: float) -> dict[int, dict[str, tuple[int, bytes]]]:
        """Per shard this node owns in `round_`: the contributors it holds (tokens,
        payload hash), once closed."""
        if self.owner is None:
            return {}
        return self._run(self.owner.holders(round_, timeout))

    def grams(self, round_: int) -> dict[int, list[float]]:
        """Per shard this node reduces in `round_`: its Gram matrix (see OwnerService)."""
        if self.owner is None:
            return {}
        owner = self.owner
        return self._run(_call(lambda: owner.grams(round_)))

    def excluded(self, round_: int) -> dict[int, dict[str, str]]:
        """Per shard this node owns in `round_`: the participants left out, and why."""
        if self.owner is None:
            return {}
        owner = self.owner
        return self._run(_call(lambda: owner.excluded(round_)))

    def decide(self, round_: int, include: set[str], shards: Collection[int] | None = None) -> None:
        """Commits this node's shards of an "external"-decision round over `include`
        (only `shards`, when given)."""
        if self.owner is not None:
            owner = self.owner
            self._run(owner.decide(round_, include, shards))

    def committed_mean(self, round_: int, shard: int, timeout: float) -> peer_pb2.MeanHeader:
        """The signed header of the mean this node committed for `shard` (as owner or
        verifier), once committed: what it reports to the coordinator."""
        assert self.owner is not None
        return self._run(self.owner.wait_mean(round_, shard, timeout)).header

    def fetch_mean(
        self, spec: RoundSpec, shard: int, endpoint: PeerEndpoint
    ) -> tuple[peer_pb2.MeanHeader, torch.Tensor]:
        """`shard`'s committed mean as `endpoint` (its owner or verifier) serves it,
        checked against its signature; ExchangeError if it cannot be had."""
        return self._run(self.client.fetch_checked_mean(spec, shard, endpoint, self.owner))

    def all_reduce(
        self,
        spec: RoundSpec,
        payloads: list[bytes] | None,
        tokens: int,
        shards: Collection[int] | None = None,
    ) -> RoundResult:
        """Contributes payloads[s] to every shard s (or to `shards` only: a reassigned
        dead owner's; none when withdrawn) and gathers the committed means, reducing
        the shards this node owns or verifies. See ExchangeClient.all_reduce."""
        self.open_round(spec)
        return self._run(self.client.all_reduce(spec, payloads, tokens, self.owner, shards))

    def gather(self, spec: RoundSpec) -> RoundResult:
        return self._run(self.client.gather(spec, self.owner))

    def set_state(self, round_: int, params: torch.Tensor, momentum: torch.Tensor) -> None:
        """The global state this peer serves to joiners (fp32 θ and outer momentum)."""
        from starling.diloco import GlobalState

        if self.owner is None:
            return
        state = GlobalState(params, momentum)
        blob = save_safetensors({"params": state.params, "momentum": state.momentum})
        self._run(self.owner.set_state(round_, blob, state.fingerprint()))

    def wait_served(self, round_: int, requesters: set[str], timeout: float) -> bool:
        """True once every requester fetched this peer's committed means of `round_`
        (at once for a peer that owns none); False at the timeout."""
        if self.owner is None:
            return True
        return self._run(self.owner.wait_served(round_, requesters, timeout))

    def fetch_state(self, endpoint: PeerEndpoint) -> GlobalStateDownload:
        return self._run(self.client.fetch_state(endpoint, self.config.run_id))

    def supersede(self, round_: int, shards: list[int], old_owners: list[str]) -> None:
        """Stops fetching the means of `shards` from the owners they were moved from."""
        self._run(_call(lambda: self.client.supersede(round_, shards, old_owners)))

    def fetch_evidence(
        self, endpoint: PeerEndpoint, round_: int, shard: int, timeout: float
    ) -> list[Evidence]:
        return self._run(
            self.client.fetch_evidence(endpoint, self.config.run_id, round_, shard, timeout)
        )

    def traffic(self, round_: int) -> dict[str, Traffic]:
        """Bytes sent to / received from each peer in `round_`, client and owner alike."""
        return self._run(_call(lambda: self.ledger.of_round(round_)))

    def close(self, grace: float = 1.0) -> None:
        if self._loop.is_closed():
            return
        self._run(self._shutdown(grace))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    # --- internals ------------------------------------------------------------------

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return future.result()

    async def _make_client(self) -> ExchangeClient:
        return ExchangeClient(
            self.identity, self.ledger, self.upload, self.download, streams=self.config.streams
        )

    async def _serve(self) -> int:
        self.owner = OwnerService(
            self.identity,
            self.config.run_id,
            self.ledger,
            self.upload,
            self.download,
            self.config.keep_rounds,
            self.config.screen,
            self.config.screen_direction,
            self.config.gram,
        )
        self._server, port = await create_server(
            self.owner, self.config.host, self.config.port, self.tls, self.config.request_limits
        )
        return port

    async def _shutdown(self, grace: float) -> None:
        await self.client.close()
        if self._server is not None:
            await self._server.stop(grace)


async def _call(function: Callable[[], T]) -> T:
    """Runs a plain function on the loop thread (the owner's state lives there)."""
    return function()

"""The participant's side of a round: push each shard's slice to its owner, fetch every
shard's committed mean (the all-gather), and download global state from a peer."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import torch

from starling.checkpoint import CheckpointError, state_from_blob
from starling.codecs import CodecError, make_codec, mean_codec
from starling.exchange.audit import Evidence
from starling.exchange.framing import PeerCalls, data_message, unpack
from starling.exchange.owner import ExchangeAbort, OwnerService
from starling.exchange.plan import PeerEndpoint, RoundSpec
from starling.exchange.transport import (
    CHUNK_BYTES,
    PlaintextRefused,
    RateLimiter,
    Traffic,
    TrafficLedger,
    channel_credentials,
    open_channel,
)
from starling.identity import (
    CertificatePinError,
    Identity,
    contribution_message,
    mean_message,
    payload_hash,
    payload_hasher,
    verify,
)
from starling.v1 import peer_pb2

T = TypeVar("T")
# Status codes worth retrying until the deadline: the owner is not up yet, or has not
# opened the round yet (participants and owners learn of a round at slightly
# different times).
RETRYABLE = {grpc.StatusCode.UNAVAILABLE}
# Seconds of failed attempts to reach a peer that serves a committed mean after which it
# counts as gone (it died after the commit): a live one answers within a second, or holds
# the call open until its mean is ready. Then the shard's other reducer is asked, and if
# it is gone too the mean is lost here (node.daemon: take a peer's state, or the shard
# does not move). Waiting out the gather timeout instead stalled every node under churn.
UNREACHABLE_S = 5.0
# What gRPC reports to a client still writing its stream when the server has already
# answered (an owner that had not opened the round yet refuses right after the header,
# while the data chunks are on their way): the server's own status is lost, so the push
# is tried again like an UNAVAILABLE one. Seen once rounds followed each other closely.
LOST_STATUS = (grpc.StatusCode.INTERNAL, "Internal error from Core")


class ExchangeError(Exception):
    """A shard that could not be pushed or fetched, with the owner to blame."""

    def __init__(self, owner: str, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.owner = owner
        self.code = code


@dataclass
class ShardOutcome:
    shard: int
    owner: str
    pushed: bool = False  # our contribution is in this shard's mean
    push_error: str | None = None
    committed: bool = False  # we hold this shard's committed mean
    error: str | None = None
    contributors: dict[str, int] = field(default_factory=dict)  # node id -> tokens
    excluded: dict[str, str] = field(default_factory=dict)  # node id -> reason
    push_done_s: float | None = None  # seconds from the round's start: our push ended
    mean_done_s: float | None = None  # ... we held the decoded mean
    mean_hash: bytes = b""  # BLAKE3 of the mean's payload as the owner served it
    verifier_push_error: str | None = None  # our push to the shard's second owner failed
    served_by: str = ""  # the verifier that served the mean, when the owner could not


@dataclass
class RoundResult:
    """One round as this participant saw it. `mean` is the flat fp32 mean of Δ (zeros in
    shards that did not commit: see `missing_shards`)."""

    round: int
    mean: torch.Tensor
    shards: list[ShardOutcome]
    traffic: dict[str, Traffic]
    wall_s: float

    @property
    def missing_shards(self) -> list[int]:
        return [o.shard for o in self.shards if not o.committed]

    @property
    def failed_owners(self) -> set[str]:
        """Owners whose shard could not be fetched: the signal to reassign the shard."""
        return {o.owner for o in self.shards if not o.committed}

    @property
    def contributors(self) -> dict[str, int]:
        """Participants whose contribution is in every committed shard."""
        committed = [o for o in self.shards if o.committed]
        if not committed:
            return {}
        common = set(committed[0].contributors)
        for outcome in committed[1:]:
            common &= set(outcome.contributors)
        return {n: committed[0].contributors[n] for n in sorted(common)}


@dataclass(frozen=True)
class GlobalStateDownload:
    round: int
    params: torch.Tensor
    momentum: torch.Tensor
    fingerprint: str
    sha256: bytes


class ExchangeClient:
    """Dials owners (never accepts connections: a client-only peer needs nothing else)."""

    def __init__(
        self,
        identity: Identity,
        ledger: TrafficLedger,
        upload: RateLimiter,
        download: RateLimiter,
        connect_timeout: float = 10.0,
        streams: int = 1,
    ) -> None:
        self.identity = identity
        self.ledger = ledger
        self.upload = upload
        self.download = download
        self.connect_timeout = connect_timeout
        self.streams = streams  # pushes (then fetches) in flight at once
        # (round, shard, owner) → fetches of that shard's mean from that owner in flight,
        # so that a fetch from an owner the shard was taken from (it died, stalled or
        # lied: see supersede) stops instead of holding the fetch window until its long
        # poll times out.
        self._fetching: dict[tuple[int, int, str], set[asyncio.Task[Any]]] = {}
        self._superseded: set[tuple[int, int, str]] = set()  # (round, shard, old owner)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._calls_by_address: dict[str, PeerCalls] = {}

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        self._calls_by_address.clear()

    async def all_reduce(
        self,
        spec: RoundSpec,
        payloads: list[bytes] | None,
        tokens: int,
        local: OwnerService | None = None,
        shards: Collection[int] | None = None,
    ) -> RoundResult:
        """Pushes payloads[s] (our encoded slice of shard s) to every shard's owner, then
        gathers every committed mean. Shards run concurrently; each shard's fetch starts
        as soon as its push is done. `shards` limits the round to some shards (a dead
        owner's shards, reassigned: the same payloads go to the new owners); the result
        then lists only those, and `mean` holds zeros elsewhere. No payloads: a
        participant that withdrew (Coordinator.Withdraw) pushes nothing and only
        gathers."""
        started = time.monotonic()
        if payloads is not None and len(payloads) != spec.plan.num_shards:
            raise ValueError(f"{len(payloads)} payloads for {spec.plan.num_shards} shards")
        selected = range(spec.plan.num_shards) if shards is None else sorted(set(shards))
        outcomes = [ShardOutcome(s, spec.owners[s].node_id) for s in selected]
        mean = torch.zeros(spec.plan.numel) if shards is not None else torch.empty(spec.plan.numel)

        # Schedule: peer i pushes to the owners after it in the owner list, in turn
        # (i+1, i+2, ...), then fetches in the reverse turn. When all peers do so, every
        # uplink and every downlink carries one flow at a time (a permutation per step,
        # as a ring all-reduce does): flows that compete for one shaped link leave it
        # partly idle while TCP sorts out their shares. `self.streams` > 1 lets one slow
        # owner delay the others less, at that price. Our pushes go out before we serve
        # our own shard's mean: every owner's commit waits for them.
        order = _rotated(outcomes, self.identity.node_id)
        serving_gate = local.hold_serving(spec.round) if local is not None else None
        window = asyncio.Semaphore(self.streams)

        async def push(outcome: ShardOutcome) -> None:
            assert payloads is not None
            try:
                await self._push(
                    spec, outcome.shard, tokens, payloads[outcome.shard], local, window
                )
            except ExchangeError as err:
                outcome.push_error = str(err)
            outcome.push_done_s = time.monotonic() - started

        async def fetch(outcome: ShardOutcome) -> None:
            await self._gather_superseded(spec, outcome, mean, local, window)
            outcome.pushed = self.identity.node_id in outcome.contributors
            outcome.mean_done_s = time.monotonic() - started

        async def push_to_verifier(outcome: ShardOutcome) -> None:
            verifier = spec.verifier(outcome.shard)
            assert verifier is not None and payloads is not None
            try:
                await self._push(
                    spec, outcome.shard, tokens, payloads[outcome.shard], local, window, verifier
                )
            except ExchangeError as err:
                outcome.verifier_push_error = str(err)

        # The second owners get the same slices, queued behind the owners' for the stream
        # window (its waiters are served in turn): when the uplink is the bottleneck,
        # the owners' copies go first. Independent tasks, not after every owner push:
        # a push to a dead owner retries until the deadline, and the verifiers must not
        # wait for it. A re-push to a reassigned shard (`shards` given) goes to its new
        # owner only: the coordinator drops the verifier of a shard it takes over.
        pushed = order if payloads is not None else []
        verified = [o for o in pushed if shards is None and spec.verifier(o.shard) is not None]
        try:
            await asyncio.gather(
                *(push(o) for o in pushed), *(push_to_verifier(o) for o in verified)
            )
        finally:
            if serving_gate is not None:
                serving_gate.set()
        await asyncio.gather(*(fetch(o) for o in reversed(order)))
        _zero_missing(spec, outcomes, mean)
        traffic = self.ledger.of_round(spec.round)
        return RoundResult(spec.round, mean, outcomes, traffic, time.monotonic() - started)

    def supersede(self, round_: int, shards: Collection[int], old_owners: Collection[str]) -> None:
        """The coordinator moved `shards` of `round_` away from `old_owners`: fetches of
        their means from those owners stop now (each shard is then missing from that
        fetch's result; the new owner's fetch supplies it)."""
        for shard, owner in zip(shards, old_owners, strict=True):
            self._superseded.add((round_, shard, owner))
            for task in self._fetching.get((round_, shard, owner), set()):
                task.cancel()
        for old in [k for k in self._superseded if k[0] < round_ - 8]:
            self._superseded.discard(old)

    async def _gather_superseded(
        self,
        spec: RoundSpec,
        outcome: ShardOutcome,
        mean: torch.Tensor,
        local: OwnerService | None,
        window: asyncio.Semaphore | None,
    ) -> None:
        """_gather_shard, cancelled by supersede() when the shard moves to another owner."""
        key = (spec.round, outcome.shard, outcome.owner)
        if key in self._superseded:
            outcome.error = "the shard was reassigned"
            return
        task = asyncio.current_task()
        assert task is not None
        self._fetching.setdefault(key, set()).add(task)
        try:
            await self._gather_shard(spec, outcome, mean, local, window)
        except asyncio.CancelledError:
            if key not in self._superseded:
                raise
            task.uncancel()
            outcome.error = "the shard was reassigned"
        finally:
            self._fetching[key].discard(task)
            if not self._fetching[key]:
                del self._fetching[key]

    async def gather(self, spec: RoundSpec, local: OwnerService | None = None) -> RoundResult:
        """Fetches every shard's committed mean of `spec.round` without contributing: how
        a node that fell behind catches up on a round it missed."""
        started = time.monotonic()
        outcomes = [ShardOutcome(s, spec.owners[s].node_id) for s in range(spec.plan.num_shards)]
        mean = torch.empty(spec.plan.numel, dtype=torch.float32)
        window = asyncio.Semaphore(self.streams)

        async def fetch(outcome: ShardOutcome) -> None:
            await self._gather_shard(spec, outcome, mean, local, window)

        await asyncio.gather(
            *(fetch(o) for o in reversed(_rotated(outcomes, self.identity.node_id)))
        )
        _zero_missing(spec, outcomes, mean)
        traffic = self.ledger.of_round(spec.round)
        return RoundResult(spec.round, mean, outcomes, traffic, time.monotonic() - started)

    async def fetch_state(self, endpoint: PeerEndpoint, run_id: str) -> GlobalStateDownload:
        """The global state `endpoint` holds, checked against its hash and fingerprint."""
        from starling.diloco import GlobalState

        request = peer_pb2.FetchStateRequest(run_id=run_id, requester=self.identity.node_id)
        try:
            calls = await self._calls(endpoint)
            call = calls.fetch_state(request, timeout=600.0)
            header, blob, sha = await self._read_stream(call, "state", -1, endpoint.node_id)
        except grpc.aio.AioRpcError as err:
            raise ExchangeError(endpoint.node_id, err.details() or "", err.code()) from None
        except (OSError, ConnectionError) as err:
            raise ExchangeError(endpoint.node_id, str(err)) from None
        assert isinstance(header, peer_pb2.StateHeader)
        if sha != header.sha256:
            raise ExchangeError(endpoint.node_id, "global state does not match its hash")
        try:
            # A peer may serve anything: exactly two fp32 vectors of one length, or refused.
            params, momentum = state_from_blob(bytes(blob))
        except CheckpointError as err:
            raise ExchangeError(endpoint.node_id, f"global state refused: {err}") from None
        state = GlobalState(params, momentum)
        if state.fingerprint() != header.fingerprint:
            raise ExchangeError(endpoint.node_id, "global state does not match its fingerprint")
        return GlobalStateDownload(
            header.round, state.params, state.momentum, header.fingerprint, header.sha256
        )

    async def fetch_evidence(
        self, endpoint: PeerEndpoint, run_id: str, round_: int, shard: int, timeout: float
    ) -> list[Evidence]:
        """The signed contributions behind `endpoint`'s report of `shard` (an audit),
        in the owner's order; their authenticity is the auditor's to check."""
        request = peer_pb2.FetchEvidenceRequest(run_id=run_id, round=round_, shard=shard)
        evidence: list[Evidence] = []
        header: peer_pb2.ContributionHeader | None = None
        payload = bytearray()
        try:
            calls = await self._calls(endpoint)
            async for item in calls.fetch_evidence(request, timeout=timeout):
                message, data, size = unpack(item)
                self.ledger.received(round_, endpoint.node_id, size)
                if message is not None:
                    if header is not None:
                        evidence.append(Evidence(header, bytes(payload)))
                    header, payload = message.header, bytearray()
                elif header is None or len(payload) + len(data or b"") > header.payload_bytes:
                    raise ExchangeError(endpoint.node_id, "evidence stream out of order")
                else:
                    payload += data or b""
        except grpc.aio.AioRpcError as err:
            raise ExchangeError(endpoint.node_id, err.details() or "", err.code()) from None
        except (OSError, ConnectionError) as err:
            raise ExchangeError(endpoint.node_id, str(err)) from None
        if header is not None:
            evidence.append(Evidence(header, bytes(payload)))
        return evidence

    # --- internals ------------------------------------------------------------------

    async def _calls(self, endpoint: PeerEndpoint) -> PeerCalls:
        calls = self._calls_by_address.get(endpoint.address)
        if calls is None:
            credentials = await asyncio.to_thread(
                channel_credentials, endpoint, self.connect_timeout
            )
            if endpoint.address not in self._channels:
                self._channels[endpoint.address] = open_channel(endpoint, credentials)
            calls = PeerCalls(self._channels[endpoint.address])
            self._calls_by_address[endpoint.address] = calls
        return calls

    async def _retry(
        self,
        deadline: float,
        owner: str,
        attempt: Callable[[], Awaitable[T]],
        window: asyncio.Semaphore | None = None,
        unreachable_s: float | None = None,
    ) -> T:
        """Runs `attempt` until it succeeds, a non-retryable status, or the deadline
        (unix seconds), with jittered exponential backoff from 50 ms to 2 s. Each attempt
        holds a slot of `window` (the streams in flight); the backoff does not, so an
        owner that is down does not hold up the shards behind it. With `unreachable_s`,
        gives up once every attempt for that long failed as retryable (a dead owner: a
        live one opens its round within a second, or holds the call open)."""
        delay = 0.05
        failing_since: float | None = None
        while True:
            try:
                if window is None:
                    return await attempt()
                async with window:
                    return await attempt()
            except grpc.aio.AioRpcError as err:
                code, details = err.code(), err.details() or ""
            except (CertificatePinError, PlaintextRefused) as err:  # retrying cannot help
                raise ExchangeError(owner, str(err), grpc.StatusCode.UNAUTHENTICATED) from None
            except (OSError, ConnectionError) as err:  # fetching the pinned certificate
                code, details = grpc.StatusCode.UNAVAILABLE, str(err)
            remaining = deadline - time.time()
            retryable = code in RETRYABLE or (code, details) == LOST_STATUS
            failing_since = failing_since or time.time()
            given_up = unreachable_s is not None and time.time() - failing_since > unreachable_s
            if not retryable or remaining <= delay or given_up:
                raise ExchangeError(owner, f"{code.name}: {details}", code)
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(2.0, delay * 2)

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
        """Pushes our slice of `shard` to its owner (or to `to`: its verifier)."""
        owner = to or spec.owners[shard]
        if local is not None and owner.node_id == self.identity.node_id:
            try:
                async with window or contextlib.nullcontext():
                    await local.contribute_local(spec.round, shard, tokens, payload)
            except ExchangeAbort as err:
                raise ExchangeError(owner.node_id, f"{err.code.name}: {err}", err.code) from None
            return
        header: peer_pb2.ContributionHeader | None = None

        async def attempt() -> None:
            nonlocal header
            if header is None:  # hashing and signing inside the attempt's stream slot
                header = await asyncio.to_thread(self._header, spec, shard, tokens, payload)
            calls = await self._calls(owner)
            call = calls.push_contribution(
                self._stream(spec.round, owner.node_id, header, payload),
                timeout=max(0.1, spec.deadline - time.time()),
            )
            await call

        await self._retry(spec.deadline, owner.node_id, attempt, window)

    def _header(
        self, spec: RoundSpec, shard: int, tokens: int, payload: bytes
    ) -> peer_pb2.ContributionHeader:
        codec = make_codec(spec.codec)
        sha = payload_hash(payload)
        numel = spec.plan.size(shard)
        node_id = self.identity.node_id
        message = contribution_message(
            spec.run_id, spec.round, node_id, shard, codec.codec_id, numel, tokens, sha
        )
        return peer_pb2.ContributionHeader(
            run_id=spec.run_id,
            round=spec.round,
            sender=node_id,
            shard=shard,
            codec_id=codec.codec_id,
            numel=numel,
            tokens=tokens,
            payload_bytes=len(payload),
            payload_hash=sha,
            signature=self.identity.sign(message),
        )

    async def _stream(
        self, round_: int, peer: str, header: peer_pb2.ContributionHeader, payload: bytes
    ) -> AsyncIterator[bytes]:
        """The PushContribution stream, serialized here (see framing): a header, then
        each chunk built when gRPC asks for it, so only one chunk is copied at a time."""
        first = peer_pb2.ContributionChunk(header=header).SerializeToString()
        self.ledger.sent(round_, peer, len(first))
        yield first
        view = memoryview(payload)
        for start in range(0, len(view), CHUNK_BYTES):
            message = data_message(view[start : start + CHUNK_BYTES])
            await self.upload.consume(len(message))
            self.ledger.sent(round_, peer, len(message))
            yield message

    async def _read_stream(
        self,
        call: AsyncIterator[peer_pb2.MeanChunk | memoryview]
        | AsyncIterator[peer_pb2.StateChunk | memoryview],
        what: str,
        round_: int,
        peer: str,
    ) -> tuple[peer_pb2.MeanHeader | peer_pb2.StateHeader | None, bytearray, bytes]:
        """Reads a header-then-chunks stream into one buffer, counting and pacing bytes;
        returns the header, the buffer and its hash (hashed as it arrives): BLAKE3 for
        means, SHA-256 for the global state (a file, like checkpoints)."""
        header = None
        buffer = bytearray()
        hasher: Any = payload_hasher() if what == "mean" else hashlib.sha256()
        async for item in call:
            message, data, size = unpack(item)
            self.ledger.received(round_, peer, size)
            await self.download.consume(size)
            if message is not None:
                if header is not None:
                    raise ExchangeError(peer, f"{what} stream has two headers")
                header = message.header
                declared = header.payload_bytes if what == "mean" else header.total_bytes
                buffer = bytearray(declared)
                filled = 0
                continue
            if header is None or data is None:
                raise ExchangeError(peer, f"{what} stream does not start with a header")
            if filled + len(data) > len(buffer):
                raise ExchangeError(peer, f"{what} stream longer than declared")
            buffer[filled : filled + len(data)] = data
            hasher.update(data)
            filled += len(data)
        if header is None or filled != len(buffer):
            raise ExchangeError(peer, f"{what} stream ended early")
        return header, buffer, hasher.digest()

    async def _gather_shard(
        self,
        spec: RoundSpec,
        outcome: ShardOutcome,
        mean: torch.Tensor,
        local: OwnerService | None,
        window: asyncio.Semaphore | None = None,
    ) -> None:
        shard = outcome.shard
        verifier = spec.verifier(shard)
        try:
            # An owner that cannot be reached: its verifier serves the same mean, and the
            # node checks whichever it got against the settled hash (check_means).
            header, values = await self.fetch_checked_mean(
                spec, shard, spec.owners[shard], local, window
            )
        except ExchangeError as err:
            if verifier is None or err.code != grpc.StatusCode.UNAVAILABLE:
                outcome.error = str(err)
                return
            try:
                header, values = await self.fetch_checked_mean(spec, shard, verifier, local, window)
            except ExchangeError as second:
                outcome.error = f"{err}; its verifier: {second}"
                return
            outcome.served_by = verifier.node_id
        start, end = spec.plan.range(shard)
        mean[start:end] = values
        outcome.committed = True
        outcome.mean_hash = header.payload_hash
        outcome.contributors = {c.node_id: c.tokens for c in header.contributors}
        outcome.excluded = {e.node_id: e.reason for e in header.excluded}

    async def fetch_checked_mean(
        self,
        spec: RoundSpec,
        shard: int,
        endpoint: PeerEndpoint,
        local: OwnerService | None,
        window: asyncio.Semaphore | None = None,
    ) -> tuple[peer_pb2.MeanHeader, torch.Tensor]:
        """`shard`'s committed mean as `endpoint` (its owner or its verifier; this very
        node's owner service when it is `endpoint`) serves it: the signed header, whose
        payload_hash the payload matches, and the decoded values, shape (numel,).
        Raises ExchangeError, UNAVAILABLE once `endpoint` was unreachable for
        UNREACHABLE_S."""
        end_by = spec.deadline + spec.gather_timeout_s
        payload: bytes | bytearray
        try:
            if local is not None and endpoint.node_id == self.identity.node_id:
                committed = await local.wait_mean(spec.round, shard, end_by - time.time())
                if committed.payload is None:
                    raise ExchangeError(endpoint.node_id, "committed with no contributions")
                header, payload = committed.header, committed.payload
                sha = header.payload_hash  # computed by this very process
            else:
                header, payload, sha = await self._retry(
                    end_by,
                    endpoint.node_id,
                    lambda: self._fetch_mean(spec, shard, endpoint, end_by),
                    window,
                    UNREACHABLE_S,
                )
        except (ExchangeAbort, TimeoutError) as err:
            raise ExchangeError(endpoint.node_id, f"local owner: {err!r}") from None
        values = await asyncio.to_thread(
            self._check_mean, spec, shard, endpoint, header, payload, sha
        )
        return header, values

    async def _fetch_mean(
        self, spec: RoundSpec, shard: int, owner: PeerEndpoint, end_by: float
    ) -> tuple[peer_pb2.MeanHeader, bytes | bytearray, bytes]:
        calls = await self._calls(owner)
        request = peer_pb2.FetchMeanRequest(
            run_id=spec.run_id, round=spec.round, shard=shard, requester=self.identity.node_id
        )
        call = calls.fetch_mean(request, timeout=max(0.1, end_by - time.time()))
        header, payload, sha = await self._read_stream(call, "mean", spec.round, owner.node_id)
        assert isinstance(header, peer_pb2.MeanHeader)
        return header, payload, sha

    def _check_mean(
        self,
        spec: RoundSpec,
        shard: int,
        owner: PeerEndpoint,
        header: peer_pb2.MeanHeader,
        payload: bytes | bytearray,
        sha: bytes,
    ) -> torch.Tensor:
        """The mean as `owner` signed it, decoded; ExchangeError if anything is off."""
        codec = make_codec(spec.codec)
        numel = spec.plan.size(shard)
        if (header.run_id, header.round, header.shard) != (spec.run_id, spec.round, shard):
            raise ExchangeError(owner.node_id, "mean header names another run, round or shard")
        if header.codec_id != codec.codec_id or header.numel != numel:
            raise ExchangeError(owner.node_id, "mean header has the wrong codec or size")
        if sha != header.payload_hash:
            raise ExchangeError(owner.node_id, "mean payload does not match its hash")
        public_key = owner.public_key or spec.participants.get(owner.node_id)
        if public_key is not None:
            contributors = [(c.node_id, c.tokens, c.payload_hash) for c in header.contributors]
            signed = mean_message(
                spec.run_id, spec.round, shard, codec.codec_id, numel, header.payload_hash,
                contributors,
            )  # fmt: skip
            if not verify(public_key, signed, header.owner_signature):
                raise ExchangeError(owner.node_id, "owner's signature on the mean is invalid")
        if not header.contributors:
            raise ExchangeError(owner.node_id, "mean header lists no contributors")
        try:
            return mean_codec(codec, len(header.contributors)).decode(payload, numel)
        except CodecError as err:
            raise ExchangeError(owner.node_id, f"bad mean payload: {err}") from None


def _rotated(outcomes: list[ShardOutcome], node_id: str) -> list[ShardOutcome]:
    """The shards in the order this peer should push them: those owned by the owners
    after it in the owner list first (by position of its own shard, or of its node id
    among the owners' ids when it owns none), its own shard last."""
    owners = [o.owner for o in outcomes]
    if node_id in owners:
        position = owners.index(node_id) + 1
    else:  # client-only: spread client-only peers over the owners by their ids
        position = int(node_id[:8], 16) % max(1, len(outcomes))
    return outcomes[position:] + outcomes[:position]


def _zero_missing(spec: RoundSpec, outcomes: list[ShardOutcome], mean: torch.Tensor) -> None:
    for outcome in outcomes:
        if not outcome.committed:
            start, end = spec.plan.range(outcome.shard)
            mean[start:end] = 0.0

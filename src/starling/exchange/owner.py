"""The shard owner: receives contributions, verifies them, commits the token-weighted
mean at the deadline (or as soon as every participant delivered), and serves it.

Everything here runs on one asyncio loop; CPU work (hashing, decoding, averaging,
encoding) goes to worker threads, where torch and hashlib release the GIL.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass, field

import grpc
import torch

from starling.codecs import Codec, CodecError, make_codec, mean_codec
from starling.exchange.framing import stream_messages, unpack
from starling.exchange.plan import RoundSpec
from starling.exchange.transport import CHUNK_BYTES, RateLimiter, TrafficLedger
from starling.identity import (
    Identity,
    contribution_message,
    mean_message,
    payload_hash,
    payload_hasher,
    verify,
)
from starling.robust import gram, screen
from starling.v1 import peer_pb2, peer_pb2_grpc

HASH_BYTES = 32
# A contribution's weight (tokens in one round) stays below 2**29 so that its products
# with fp32 values are exact in float64 (see weighted_mean_f64).
MAX_TOKENS = (1 << 29) - 1
# No run gets near 2**32 rounds (136 years at one a second): a round number past it is a
# malformed request, not a round this owner has yet to open.
MAX_ROUND = 1 << 32
# Rounds an owner keeps the signed contributions behind its reports, for audits (the
# coordinator audits a report before it commits the round).
EVIDENCE_ROUNDS = 2
# Exclusion reasons that start with this mark an offence (a poisoned contribution), not
# a fault such as a missed deadline: the coordinator bans repeat offenders.
REJECTED = "rejected"
# The two faults a reducer may claim only where the round's plan backs them
# (ExchangePlan.gone, ExchangePlan.withdrawn); any other such claim is a lost contribution.
DEPARTED = "left the run"
WITHDREW = "withdrew: "  # followed by the node's reason (Coordinator.Withdraw)


class ExchangeAbort(Exception):
    """A request refused with a gRPC status code (raised by the shared checks; the
    servicer turns it into context.abort, local callers get it as is)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class CommittedMean:
    """A shard's committed mean as served: header + encoded payload (None when the shard
    committed with no contribution at all), and the FetchMean stream serialized once."""

    header: peer_pb2.MeanHeader
    payload: bytes | None
    messages: list[bytes]


@dataclass
class _Held:
    tokens: int
    payload_hash: bytes
    values: torch.Tensor  # decoded contribution, fp32, shape (numel,)


@dataclass
class _ShardReduction:
    spec: RoundSpec
    shard: int
    codec: Codec
    held: dict[str, _Held] = field(default_factory=dict)
    # Every sender whose contribution was accepted; unlike `held`, kept after the commit
    # frees the values, so a replay is refused as such before and after.
    accepted: set[str] = field(default_factory=set)
    receiving: set[str] = field(default_factory=set)
    excluded: dict[str, str] = field(default_factory=dict)
    closed: bool = False  # no contribution is accepted once closed
    closed_event: asyncio.Event = field(default_factory=asyncio.Event)
    committing: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)
    mean: CommittedMean | None = None
    # Every signed contribution received in full, held or refused, in arrival order
    # (sender → header, payload; b"" for one refused on its header): what an audit of
    # this owner's report recomputes from (FetchEvidence). Kept for EVIDENCE_ROUNDS.
    evidence: dict[str, tuple[peer_pb2.ContributionHeader, bytes]] = field(default_factory=dict)
    # The Gram matrix of the held contributions once screened (row-major, node-id order;
    # OwnerService.gram on): the coordinator's whole-update direction check adds these up.
    gram: list[float] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return self.spec.plan.size(self.shard)

    def waiting_for(self) -> set[str]:
        return set(self.spec.participants) - set(self.held) - set(self.excluded)


@dataclass(frozen=True)
class HeldState:
    """The global state a peer serves to joiners: one safetensors file, and the
    FetchState stream serialized once."""

    round: int
    messages: list[bytes]


class OwnerService(peer_pb2_grpc.PeerServicer):
    """The Peer service of one node (or of the coordinator)."""

    def __init__(
        self,
        identity: Identity,
        run_id: str,
        ledger: TrafficLedger,
        upload: RateLimiter,
        download: RateLimiter,
        keep_rounds: int = 8,
        screening: bool = True,
        screen_direction: bool = True,
        gram: bool = False,
    ) -> None:
        self.identity = identity
        # Off only for a control run that shows what poisoned updates do (bench/chaos.py).
        self.screening = screening
        # The per-shard direction check (robust.screen); runs judge direction over the
        # whole update on the coordinator instead, from the Gram matrices (`gram`).
        self.screen_direction = screen_direction
        self.gram = gram
        self.run_id = run_id
        self.ledger = ledger
        self.upload = upload
        self.download = download
        self.keep_rounds = keep_rounds
        self._specs: dict[int, RoundSpec] = {}
        self._reductions: dict[tuple[int, int], _ShardReduction] = {}
        # (round, shard) → requesters that received the whole committed mean.
        self._served: dict[tuple[int, int], set[str]] = {}
        self._served_changed = asyncio.Event()
        self._state: HeldState | None = None
        self._serving_gates: dict[int, asyncio.Event] = {}

    # --- what the node (or coordinator) calls, on the loop --------------------------

    def open_round(self, spec: RoundSpec) -> None:
        """Starts reducing the shards this node owns or verifies in `spec` (a verifier
        reduces the same contributions as the owner: see RoundSpec); commits each at the
        deadline at the latest. Forgets rounds older than `keep_rounds`. Opening a round
        again with a new owner map (a dead owner's shard reassigned here, with its own
        deadline) adds the shards newly owned and leaves the others as they are."""
        if spec.run_id != self.run_id:
            raise ValueError(f"round of run {spec.run_id!r}, this owner serves {self.run_id!r}")
        self._specs[spec.round] = spec
        loop = asyncio.get_running_loop()
        for shard in spec.reduced_by(self.identity.node_id):
            if (spec.round, shard) in self._reductions:
                continue
            reduction = _ShardReduction(spec, shard, make_codec(spec.codec))
            self._reductions[(spec.round, shard)] = reduction
            delay = max(0.0, spec.deadline - time.time())
            loop.call_later(delay, self._commit_soon, reduction)
        for (r, _), reduction in self._reductions.items():
            if r <= spec.round - EVIDENCE_ROUNDS:
                reduction.evidence.clear()
        for old in [r for r in self._specs if r <= spec.round - self.keep_rounds]:
            del self._specs[old]
            for key in [k for k in self._reductions if k[0] == old]:
                del self._reductions[key]
                self._served.pop(key, None)
        # The byte counts too (the client shares this ledger): a dict per round and
        # peer, kept for the life of the node before.
        self.ledger.forget_before(spec.round - self.keep_rounds + 1)

    def hold_serving(self, round_: int) -> asyncio.Event:
        """Holds back serving this round's means until the returned event is set (by
        this node's client once its own pushes are done, or at the deadline): a shared
        uplink should carry what every owner's commit is waiting for first."""
        gate = self._serving_gates.get(round_)
        if gate is None:
            gate = self._serving_gates[round_] = asyncio.Event()
            for old in [r for r in self._serving_gates if r <= round_ - self.keep_rounds]:
                del self._serving_gates[old]
        return gate

    def exclude(self, round_: int, node_id: str, reason: str) -> None:
        """Stops waiting for a participant (e.g. the coordinator saw it leave), so the
        shards can commit before the deadline."""
        for (r, _), reduction in self._reductions.items():
            if r == round_ and node_id not in reduction.held and not reduction.closed:
                reduction.excluded.setdefault(node_id, reason)
                if not reduction.waiting_for():
                    self._commit_soon(reduction)

    async def holders(self, round_: int, timeout: float) -> dict[int, dict[str, tuple[int, bytes]]]:
        """Once every shard this node owns in `round_` is closed: for each shard, the
        contributors it holds (node id -> (tokens, BLAKE3 payload hash)). What a round's
        decider (the coordinator) collects from every owner before calling decide()."""
        reductions = {s: r for (r_, s), r in self._reductions.items() if r_ == round_}
        async with asyncio.timeout(timeout):
            for reduction in reductions.values():
                await reduction.closed_event.wait()
        return {
            s: {n: (h.tokens, h.payload_hash) for n, h in r.held.items()}
            for s, r in reductions.items()
        }

    def grams(self, round_: int) -> dict[int, list[float]]:
        """Per shard this node reduces in `round_`: the Gram matrix of the contributions
        it holds, row-major in node-id order (read after holders(); empty unless `gram`)."""
        return {s: list(r.gram) for (r_, s), r in self._reductions.items() if r_ == round_}

    def excluded(self, round_: int) -> dict[int, dict[str, str]]:
        """Per shard this node owns in `round_`: the participants it left out, and why
        (read after holders())."""
        return {s: dict(r.excluded) for (r_, s), r in self._reductions.items() if r_ == round_}

    async def decide(
        self, round_: int, include: set[str], shards: Collection[int] | None = None
    ) -> None:
        """Commits this node's shards of `round_` (those in `shards`, when given: the
        ones it still reduces in the decided plan) over exactly `include` (the
        contributors complete in every shard of the round), so each contributor is in
        the whole mean or in none of it. Closes a shard still open."""
        for (r, shard), reduction in list(self._reductions.items()):
            if r == round_ and (shards is None or shard in shards):
                self._commit_soon(reduction)
                await reduction.closed_event.wait()
                missing = include - set(reduction.held)
                if missing:
                    raise ValueError(f"shard {reduction.shard} does not hold {sorted(missing)}")
                self._start_commit(reduction, include)

    async def contribute_local(self, round_: int, shard: int, tokens: int, payload: bytes) -> None:
        """This node's own contribution to a shard it owns: no network, same checks."""
        reduction = self._reduction(round_, shard)
        header = await asyncio.to_thread(self._signed_header, reduction, tokens, payload)
        self._check_header(header)
        await self._accept(reduction, header, payload)

    async def wait_mean(self, round_: int, shard: int, timeout: float) -> CommittedMean:
        reduction = self._reduction(round_, shard)
        await asyncio.wait_for(reduction.done.wait(), timeout)
        assert reduction.mean is not None
        return reduction.mean

    async def set_state(self, round_: int, blob: bytes, fingerprint: str) -> None:
        def serialize() -> list[bytes]:
            header = peer_pb2.StateHeader(
                run_id=self.run_id,
                round=round_,
                total_bytes=len(blob),
                sha256=hashlib.sha256(blob).digest(),
                fingerprint=fingerprint,
            )
            return stream_messages(peer_pb2.StateChunk(header=header), blob, CHUNK_BYTES)

        self._state = HeldState(round_, await asyncio.to_thread(serialize))

    @property
    def state(self) -> HeldState | None:
        return self._state

    # --- the gRPC methods -----------------------------------------------------------

    async def PushContribution(
        self,
        request_iterator: AsyncIterator[peer_pb2.ContributionChunk | memoryview],
        context: grpc.aio.ServicerContext,
    ) -> peer_pb2.PushReceipt:
        try:
            return await self._receive(request_iterator)
        except ExchangeAbort as err:
            await context.abort(err.code, str(err))
            raise AssertionError("unreachable") from err

    async def FetchMean(
        self, request: peer_pb2.FetchMeanRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        try:
            self._check_run(request.run_id)
            reduction = self._reduction(request.round, request.shard)
            spec = reduction.spec
            timeout = spec.deadline + spec.gather_timeout_s - time.time()
            try:
                await asyncio.wait_for(reduction.done.wait(), max(timeout, 0.0))
            except TimeoutError:
                raise ExchangeAbort(
                    grpc.StatusCode.DEADLINE_EXCEEDED, "shard never committed"
                ) from None
            mean = reduction.mean
            assert mean is not None
            if mean.payload is None:
                raise ExchangeAbort(grpc.StatusCode.ABORTED, "committed with no contributions")
        except ExchangeAbort as err:
            await context.abort(err.code, str(err))
            return
        gate = self._serving_gates.get(request.round)
        if gate is not None and not gate.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(gate.wait(), max(0.0, spec.deadline - time.time()))
        peer = request.requester or context.peer()
        for message in mean.messages:
            await self.upload.consume(len(message))
            self.ledger.sent(request.round, peer, len(message))
            yield message
        self._served.setdefault((request.round, request.shard), set()).add(peer)
        self._served_changed.set()

    async def wait_served(self, round_: int, requesters: set[str], timeout: float) -> bool:
        """Waits until every one of `requesters` received each committed mean this owner
        serves for `round_` (a leaving owner lingers for this: its means go with it). A
        verifier's means are fetched only when the owner's is wrong: not waited for.
        False at the timeout."""
        deadline = time.monotonic() + timeout
        while True:
            owed = [
                key
                for key, reduction in self._reductions.items()
                if key[0] == round_
                and reduction.spec.owners[key[1]].node_id == self.identity.node_id
                and reduction.mean is not None
                and reduction.mean.payload is not None
                and not requesters <= self._served.get(key, set())
            ]
            if not owed:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._served_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._served_changed.wait(), left)

    async def FetchState(
        self, request: peer_pb2.FetchStateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        state = self._state
        if request.run_id != self.run_id:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "not this peer's run")
            return
        if state is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "this peer holds no global state")
            return
        peer = request.requester or context.peer()
        for message in state.messages:
            await self.upload.consume(len(message))
            self.ledger.sent(state.round, peer, len(message))
            yield message

    async def FetchEvidence(
        self, request: peer_pb2.FetchEvidenceRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        try:
            self._check_run(request.run_id)
            reduction = self._reduction(request.round, request.shard)
            if not reduction.closed_event.is_set():
                raise ExchangeAbort(
                    grpc.StatusCode.FAILED_PRECONDITION, f"shard {request.shard} is still open"
                )
            if request.round <= max(self._specs) - EVIDENCE_ROUNDS:
                raise ExchangeAbort(
                    grpc.StatusCode.NOT_FOUND, f"evidence of round {request.round} is not kept"
                )
        except ExchangeAbort as err:
            await context.abort(err.code, str(err))
            return
        peer = context.peer()
        for header, payload in list(reduction.evidence.values()):
            first = peer_pb2.ContributionChunk(header=header)
            messages = stream_messages(first, payload, CHUNK_BYTES)
            for message in messages:
                await self.upload.consume(len(message))
                self.ledger.sent(request.round, peer, len(message))
                yield message

    # --- internals ------------------------------------------------------------------

    def _check_run(self, run_id: str) -> None:
        if run_id != self.run_id:
            raise ExchangeAbort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"run {run_id!r} is not this owner's run {self.run_id!r}",
            )

    def _reduction(self, round_: int, shard: int) -> _ShardReduction:
        reduction = self._reductions.get((round_, shard))
        if reduction is not None:
            return reduction
        if round_ in self._specs:
            raise ExchangeAbort(
                grpc.StatusCode.NOT_FOUND, f"shard {shard} of round {round_} is not owned here"
            )
        if round_ >= MAX_ROUND:
            raise ExchangeAbort(grpc.StatusCode.INVALID_ARGUMENT, f"round {round_} is absurd")
        # Later than any this owner opened: it may be the next one (or this owner fell
        # behind and resyncs), so the sender retries until its deadline.
        if not self._specs or round_ > max(self._specs):
            raise ExchangeAbort(grpc.StatusCode.UNAVAILABLE, f"round {round_} is not open yet")
        raise ExchangeAbort(grpc.StatusCode.NOT_FOUND, f"round {round_} is no longer kept")

    def _check_header(self, header: peer_pb2.ContributionHeader) -> _ShardReduction:
        """Everything that can be checked before a byte of payload arrives. Once the
        signature verifies, a header that does not fit the round (codec, length, size)
        is the sender's offence, recorded as such."""
        self._check_run(header.run_id)
        reduction = self._reduction(header.round, header.shard)
        spec = reduction.spec
        public_key = spec.participants.get(header.sender)
        if public_key is None:
            raise ExchangeAbort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{header.sender!r} is not a participant of round {header.round}",
            )
        if not signed_by(header, public_key):
            raise ExchangeAbort(grpc.StatusCode.UNAUTHENTICATED, "signature does not verify")
        if header.sender in reduction.accepted or header.sender in reduction.receiving:
            raise ExchangeAbort(
                grpc.StatusCode.ALREADY_EXISTS,
                f"{header.sender} already contributed to shard {header.shard}",
            )
        if reduction.closed:
            raise ExchangeAbort(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"shard {header.shard} already committed"
            )
        try:
            check_fits(header, reduction.codec, reduction.numel)
        except ExchangeAbort as err:
            if not reduction.closed:
                reduction.evidence.setdefault(header.sender, (header, b""))
            self._reject(reduction, header.sender, err)
            raise
        return reduction

    def _reject(self, reduction: _ShardReduction, sender: str, err: ExchangeAbort) -> None:
        """Excludes a signed contribution that is malformed (an offence, unlike a missed
        deadline) from the round, and commits early if nobody else is awaited."""
        if reduction.closed or sender in reduction.held:
            return
        # The first offence; it replaces a fault (a withdrawal or a departure sent while
        # the payload streamed in), which must not hide it.
        if not reduction.excluded.get(sender, "").startswith(REJECTED):
            reduction.excluded[sender] = f"{REJECTED}: {err}"
        if not reduction.waiting_for():
            self._commit_soon(reduction)

    async def _receive(
        self, request_iterator: AsyncIterator[peer_pb2.ContributionChunk | memoryview]
    ) -> peer_pb2.PushReceipt:
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        stream = aiter(request_iterator)
        try:
            first = await anext(stream)
        except StopAsyncIteration:
            raise ExchangeAbort(
                invalid, "empty stream: the first message must be a header"
            ) from None
        message, _, size = unpack(first)
        if message is None:
            raise ExchangeAbort(invalid, "the first message must be a header")
        header = message.header
        reduction = self._check_header(header)
        self.ledger.received(header.round, header.sender, size)
        reduction.receiving.add(header.sender)
        try:
            payload = await self._read_payload(stream, header, reduction.spec.deadline)
            await self._accept(reduction, header, payload)
        finally:
            reduction.receiving.discard(header.sender)
        return peer_pb2.PushReceipt(
            bytes_received=header.payload_bytes, contributions=len(reduction.held)
        )

    async def _read_payload(
        self,
        stream: AsyncIterator[peer_pb2.ContributionChunk | memoryview],
        header: peer_pb2.ContributionHeader,
        deadline: float,
    ) -> bytearray:
        buffer = bytearray(header.payload_bytes)
        hasher = payload_hasher()  # hashed as it arrives, while the chunk is in cache
        filled = 0
        try:
            async with asyncio.timeout(max(0.0, deadline - time.time())):
                async for item in stream:
                    _, data, size = unpack(item)
                    if data is None:
                        raise ExchangeAbort(
                            grpc.StatusCode.INVALID_ARGUMENT, "a second header in the stream"
                        )
                    n = len(data)
                    if filled + n > len(buffer):
                        raise ExchangeAbort(
                            grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"stream exceeds the declared {len(buffer)} bytes",
                        )
                    buffer[filled : filled + n] = data
                    hasher.update(data)
                    filled += n
                    self.ledger.received(header.round, header.sender, size)
                    await self.download.consume(size)
        except TimeoutError:
            raise ExchangeAbort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"round deadline passed after {filled} of {len(buffer)} bytes: excluded",
            ) from None
        if filled != len(buffer):
            raise ExchangeAbort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"stream ended after {filled} of the declared {len(buffer)} bytes",
            )
        if hasher.digest() != header.payload_hash:
            raise ExchangeAbort(grpc.StatusCode.DATA_LOSS, "payload does not match its hash")
        return buffer

    async def _accept(
        self,
        reduction: _ShardReduction,
        header: peer_pb2.ContributionHeader,
        payload: bytes | bytearray,
    ) -> None:
        """Decodes a complete, hash-checked payload and holds it for the mean (and as
        evidence, in the order the screen sees the held ones)."""

        def check_and_decode() -> torch.Tensor:
            try:
                return reduction.codec.decode(payload, reduction.numel)
            except CodecError as err:
                raise ExchangeAbort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"bad payload: {err}"
                ) from None

        try:
            values = await asyncio.to_thread(check_and_decode)
        except ExchangeAbort as err:
            if not reduction.closed:
                reduction.evidence.setdefault(header.sender, (header, bytes(payload)))
            self._reject(reduction, header.sender, err)
            raise
        if reduction.closed:
            raise ExchangeAbort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"shard {header.shard} committed before this contribution was checked",
            )
        if header.sender in reduction.excluded:
            raise ExchangeAbort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"excluded from this round: {reduction.excluded[header.sender]}",
            )
        reduction.held[header.sender] = _Held(header.tokens, header.payload_hash, values)
        reduction.evidence[header.sender] = (header, bytes(payload))
        reduction.accepted.add(header.sender)
        if not reduction.waiting_for():
            self._commit_soon(reduction)

    def _signed_header(
        self, reduction: _ShardReduction, tokens: int, payload: bytes
    ) -> peer_pb2.ContributionHeader:
        spec = reduction.spec
        sha = payload_hash(payload)
        fields = (spec.run_id, spec.round, self.identity.node_id, reduction.shard)
        rest = (reduction.codec.codec_id, reduction.numel, tokens, sha)
        return peer_pb2.ContributionHeader(
            run_id=spec.run_id,
            round=spec.round,
            sender=self.identity.node_id,
            shard=reduction.shard,
            codec_id=reduction.codec.codec_id,
            numel=reduction.numel,
            tokens=tokens,
            payload_bytes=len(payload),
            payload_hash=sha,
            signature=self.identity.sign(contribution_message(*fields, *rest)),
        )

    def _commit_soon(self, reduction: _ShardReduction) -> None:
        """Closes the shard to contributions (all delivered, excluded, or the deadline),
        screens what it holds, then commits it at once when owners decide, else waits
        for decide()."""
        if reduction.closed:
            return
        reduction.closed = True
        for node_id in reduction.waiting_for():
            reason = "incomplete at the deadline"
            if node_id not in reduction.receiving:
                reason = "no contribution before the deadline"
            reduction.excluded[node_id] = reason
        task = asyncio.get_running_loop().create_task(self._screen(reduction))
        task.add_done_callback(lambda t: t.exception())

    async def _screen(self, reduction: _ShardReduction) -> None:
        """Excludes poisoned contributions (robust.screen) before anything reads the
        shard's holders or its mean."""
        held = dict(reduction.held)  # arrival order: a copy arrives after its original
        try:
            if self.screening:
                offenders = await asyncio.to_thread(
                    screen,
                    {n: h.values for n, h in held.items()},
                    {n: h.payload_hash for n, h in held.items()},
                    self.screen_direction,
                    {n: h.tokens for n, h in held.items()},
                )
                for node_id, reason in offenders.items():
                    del reduction.held[node_id]
                    reduction.excluded[node_id] = f"{REJECTED}: {reason}"
            if self.gram:
                values = [reduction.held[n].values for n in sorted(reduction.held)]
                reduction.gram = await asyncio.to_thread(gram, values)
        finally:
            reduction.closed_event.set()
        if reduction.spec.decision == "owner":
            self._start_commit(reduction, set(reduction.held))

    def _start_commit(self, reduction: _ShardReduction, include: set[str]) -> None:
        if reduction.committing:
            return
        reduction.committing = True
        for node_id in set(reduction.held) - include:
            del reduction.held[node_id]
            reduction.excluded[node_id] = "not complete in every shard"
        task = asyncio.get_running_loop().create_task(self._commit(reduction))
        task.add_done_callback(lambda t: t.exception())  # errors surface in wait_mean

    async def _commit(self, reduction: _ShardReduction) -> None:
        ordered = sorted(reduction.held.items())
        payload = await asyncio.to_thread(_weighted_mean_payload, reduction, ordered)
        spec = reduction.spec
        contributors = [(node_id, h.tokens, h.payload_hash) for node_id, h in ordered]
        digest = payload_hash(payload) if payload is not None else b""
        codec_id, numel = reduction.codec.codec_id, reduction.numel
        signed = mean_message(
            spec.run_id, spec.round, reduction.shard, codec_id, numel, digest, contributors
        )
        header = peer_pb2.MeanHeader(
            run_id=spec.run_id,
            round=spec.round,
            shard=reduction.shard,
            codec_id=codec_id,
            numel=numel,
            payload_bytes=len(payload) if payload is not None else 0,
            payload_hash=digest,
            contributors=[
                peer_pb2.Contributor(node_id=n, tokens=t, payload_hash=s)
                for n, t, s in contributors
            ],
            excluded=[
                peer_pb2.Exclusion(node_id=n, reason=r)
                for n, r in sorted(reduction.excluded.items())
            ],
            owner=self.identity.node_id,
            owner_signature=self.identity.sign(signed),
        )
        messages = (
            []
            if payload is None
            else await asyncio.to_thread(
                stream_messages, peer_pb2.MeanChunk(header=header), payload, CHUNK_BYTES
            )
        )
        reduction.mean = CommittedMean(header, payload, messages)
        reduction.held.clear()  # the decoded contributions are no longer needed
        reduction.done.set()


def signed_by(header: peer_pb2.ContributionHeader, public_key: bytes) -> bool:
    """Whether the header's signature is its sender's (`public_key`) over its fields."""
    message = contribution_message(
        header.run_id,
        header.round,
        header.sender,
        header.shard,
        header.codec_id,
        header.numel,
        header.tokens,
        header.payload_hash,
    )
    return verify(public_key, message, header.signature)


def check_fits(header: peer_pb2.ContributionHeader, codec: Codec, numel: int) -> None:
    """A signed header that does not fit the round (codec, length, tokens, size): an
    offence of its sender."""
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    if header.codec_id != codec.codec_id:
        raise ExchangeAbort(invalid, f"codec {header.codec_id}, the run uses {codec.codec_id}")
    if header.numel != numel:
        raise ExchangeAbort(invalid, f"shard {header.shard} has {numel} values, not {header.numel}")
    if not 0 < header.tokens <= MAX_TOKENS:
        raise ExchangeAbort(invalid, f"tokens must be in 1..{MAX_TOKENS}, got {header.tokens}")
    if len(header.payload_hash) != HASH_BYTES:
        raise ExchangeAbort(invalid, "payload_hash must be 32 bytes")
    expected = codec.encoded_size(numel)
    if header.payload_bytes > expected:
        raise ExchangeAbort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"declares {header.payload_bytes} bytes; the codec's size is {expected}",
        )
    if header.payload_bytes != expected:
        raise ExchangeAbort(
            invalid, f"declares {header.payload_bytes} bytes; the codec's size is {expected}"
        )


def _weighted_mean_payload(
    reduction: _ShardReduction, ordered: list[tuple[str, _Held]]
) -> bytes | None:
    """The token-weighted mean of the held contributions, encoded with the run's codec
    for a mean of that many (codecs.mean_codec)."""
    if not ordered:
        return None
    mean = weighted_mean_f64([h.values for _, h in ordered], [h.tokens for _, h in ordered])
    return mean_codec(reduction.codec, len(ordered)).encode(mean)


def weighted_mean_f64(
    values: list[torch.Tensor], tokens: list[int], block: int = 1 << 16
) -> torch.Tensor:
    """sum(tokens_i · values_i) / sum(tokens_i), fp32 in, fp32 out, shape (numel,).

    Accumulated in float64 in the given order: every product of an fp32 value and a
    weight below 2**29 is exact in float64, so fused and unfused multiply-adds give
    the same bits and two owners on different hardware produce identical means. Done
    in cache-sized blocks of `block` values, because a full-length float64 accumulator
    costs several passes over memory per contribution."""
    numel = values[0].numel()
    total = float(sum(tokens))
    out = torch.empty(numel, dtype=torch.float32)
    scratch = torch.empty(min(block, numel), dtype=torch.float64)
    for start in range(0, numel, block):
        end = min(start + block, numel)
        acc = scratch[: end - start]
        acc.copy_(values[0][start:end]).mul_(tokens[0])
        for v, w in zip(values[1:], tokens[1:], strict=True):
            acc.add_(v[start:end], alpha=w)
        out[start:end] = acc.div_(total)
    return out

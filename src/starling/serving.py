"""What every Starling gRPC server puts in front of its own handlers (the coordinator's
and each peer's): a request that does not parse is answered INVALID_ARGUMENT with what
was wrong, and a peer that sends requests faster than its budget is answered
RESOURCE_EXHAUSTED before anything else is done for it.

Without the first, gRPC answers a deserializer's exception with UNKNOWN and logs a
traceback per message, so a fuzzer (bench/fuzz.py) fills the logs and the client
cannot tell a bad request from a server bug. Without the second, one peer's flood of
cheap calls (each a few hundred microseconds of the one event loop) delays everyone's
round.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

log = logging.getLogger("starling.serving")
WARN_EVERY_S = 60.0  # one log line per throttled peer per this long
TARPIT_MAX_S = 0.5  # the longest a refused call is held before its refusal
TARPIT_MAX_CALLS = 64  # refused calls held at once per peer; beyond, refused at once


@dataclass(frozen=True)
class RequestLimits:
    """Requests per second one peer may make of one server, on average, and the burst
    it may make at once after being idle. A round of a node makes a few dozen calls of a
    server (long polls, reports, one push and one fetch per shard), far under these."""

    per_s: float = 50.0
    burst: float = 200.0

    def __post_init__(self) -> None:
        if not self.per_s > 0 or not self.burst >= 1:
            raise ValueError(f"request limits need per_s > 0 and burst >= 1, got {self}")


DEFAULT_REQUEST_LIMITS = RequestLimits()


class Malformed:
    """Stands in for a request message that did not parse: the handler wrapper answers
    INVALID_ARGUMENT instead of calling the handler."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


class _MalformedInStream(Exception):
    pass


def peer_key(peer: str) -> str:
    """Whose budget a call spends: its address without the port ("ipv4:1.2.3.4:5678" →
    "1.2.3.4"), so that many connections from one host share one budget. Loopback peers
    are processes of this machine (tests, `starling simulate`, several nodes of one
    host), so there each connection is its own peer."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return peer  # unix sockets and the like: per connection
    host = rest.rsplit(":", 1)[0].strip("[]")
    try:
        if ipaddress.ip_address(host).is_loopback:
            return peer
    except ValueError:
        return peer
    return host


class RequestThrottle:
    """A token bucket per peer (see peer_key). Idle peers are forgotten, so memory stays
    bounded by the number of peers active within the last burst / per_s seconds."""

    def __init__(self, limits: RequestLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self._last_prune = clock()
        self._warned: dict[str, float] = {}  # key -> when we last logged it
        self._held: dict[str, int] = {}  # key -> refused calls being held (tarpit)
        self.refused = 0

    def admit(self, key: str, cost: float = 1.0) -> float:
        """0.0 if the call may go ahead (it spends `cost` tokens), else the seconds until
        it could."""
        now = self.clock()
        per_s, burst = self.limits.per_s, self.limits.burst
        cost = min(cost, burst)  # a call dearer than the burst could never go ahead
        tokens, at = self._buckets.get(key, (burst, now))
        tokens = min(burst, tokens + (now - at) * per_s)
        if tokens < cost:
            self._buckets[key] = (tokens, now)
            self.refused += 1
            if now - self._warned.get(key, -WARN_EVERY_S) >= WARN_EVERY_S:
                self._warned[key] = now
                log.warning("throttling %s: over %g requests/s", key, per_s)
            return (cost - tokens) / per_s
        self._buckets[key] = (tokens - cost, now)
        if now - self._last_prune > burst / per_s:
            self._prune(now)
        return 0.0

    async def tarpit(self, key: str, wait_s: float) -> None:
        """Holds a refused call for its wait (at most TARPIT_MAX_S) before the refusal
        goes out. Refusing at once would invite the next call at once: a flooder whose
        calls each wait for their answer (most clients) is slowed to its calls in flight
        per TARPIT_MAX_S, and the server spends its CPU on the honest peers instead of on
        refusals. A peer with TARPIT_MAX_CALLS calls held already is refused at once (a
        held call is memory)."""
        held = self._held.get(key, 0)
        if held >= TARPIT_MAX_CALLS:
            return
        self._held[key] = held + 1
        try:
            await asyncio.sleep(min(wait_s, TARPIT_MAX_S))
        finally:
            left = self._held[key] - 1
            if left:
                self._held[key] = left
            else:
                del self._held[key]

    def _prune(self, now: float) -> None:
        full_after = self.limits.burst / self.limits.per_s  # an idle bucket is full again
        self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < full_after}
        self._warned = {k: t for k, t in self._warned.items() if now - t < WARN_EVERY_S}
        self._last_prune = now

    def __len__(self) -> int:
        return len(self._buckets)


def guarded(
    handlers: Mapping[str, grpc.RpcMethodHandler],
    throttle: RequestThrottle | None,
    costs: Mapping[str, float] | None = None,
) -> dict[str, grpc.RpcMethodHandler]:
    """The handlers of an asyncio server with tolerant deserializers and, if given,
    the throttle in front; a call of method `name` spends costs[name] of the peer's
    budget (default 1): downloads of whole files cost more than a report."""
    costs = costs or {}
    return {
        name: _guard(handler, throttle, costs.get(name, 1.0)) for name, handler in handlers.items()
    }


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as err:  # protobuf's DecodeError, or a bad UTF-8 string
            return Malformed(f"{type(err).__name__}: {err}")

    return parse


async def _refuse_early(
    request: Any, context: grpc.aio.ServicerContext, throttle: RequestThrottle | None, cost: float
) -> None:
    if throttle is not None:
        key = peer_key(context.peer())
        wait_s = throttle.admit(key, cost)
        if wait_s > 0:
            limits = throttle.limits
            await throttle.tarpit(key, wait_s)
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"rate limited: at most {limits.per_s:g} requests/s per peer "
                f"(burst {limits.burst:g}); retry in {wait_s:.2f} s",
            )
    if isinstance(request, Malformed):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {request.error}")


def _guard(handler: grpc.RpcMethodHandler, throttle: RequestThrottle | None, cost: float) -> Any:
    deserializer = _tolerant(handler.request_deserializer)
    serializer = handler.response_serializer
    if handler.unary_unary is not None:
        unary_unary = handler.unary_unary

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await _refuse_early(request, context, throttle, cost)
            with _quiet_if_ended(context):
                return await unary_unary(request, context)

        return grpc.unary_unary_rpc_method_handler(call, deserializer, serializer)
    if handler.unary_stream is not None:
        unary_stream = handler.unary_stream

        async def serve(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await _refuse_early(request, context, throttle, cost)
            with _quiet_if_ended(context):
                async for item in unary_stream(request, context):
                    yield item

        return grpc.unary_stream_rpc_method_handler(serve, deserializer, serializer)
    if handler.stream_unary is not None:
        stream_unary = handler.stream_unary

        async def receive(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            await _refuse_early(None, context, throttle, cost)
            with _quiet_if_ended(context):
                try:
                    return await stream_unary(_checked(requests), context)
                except _MalformedInStream as err:
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT, f"malformed message: {err}"
                    )

        return grpc.stream_unary_rpc_method_handler(receive, deserializer, serializer)
    raise ValueError("no Starling service has bidirectional streams")


@contextlib.contextmanager
def _quiet_if_ended(context: grpc.aio.ServicerContext) -> Iterator[None]:
    """gRPC may end a call under a running handler (a message over the size limit, the
    client gone): the handler's answer then fails to send. That is a cancelled call,
    not a server bug, so it ends as one (gRPC logs it at debug level), not as an
    unexpected exception with a traceback."""
    try:
        yield
    except grpc.aio.AbortError:
        raise
    except Exception:
        if context.done():
            raise asyncio.CancelledError from None
        raise


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for item in requests:
        if isinstance(item, Malformed):
            raise _MalformedInStream(item.error)
        yield item

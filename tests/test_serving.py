"""starling.serving on real servers: malformed requests answered INVALID_ARGUMENT (not
UNKNOWN with a traceback), a request over the size limit RESOURCE_EXHAUSTED without an
unexpected exception, and a flooding peer throttled while another peer is served."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from starling.exchange import ExchangePeer, PeerConfig
from starling.exchange.transport import MAX_MESSAGE_BYTES
from starling.identity import Identity
from starling.serving import TARPIT_MAX_CALLS, RequestLimits, RequestThrottle, peer_key
from starling.v1 import coordinator_pb2 as pb
from starling.v1 import peer_pb2

from .coordinator_support import CoordinatorThread, copy_run, make_template

# Separate connections (grpc otherwise shares one between channels of a process).
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_send_message_length", -1)]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_throttle_allows_the_burst_then_the_rate_and_forgets_idle_peers() -> None:
    clock = Clock()
    throttle = RequestThrottle(RequestLimits(per_s=10.0, burst=5.0), clock)
    assert [throttle.admit("a") for _ in range(5)] == [0.0] * 5
    wait_s = throttle.admit("a")
    assert wait_s == pytest.approx(0.1)  # one token at 10/s
    assert throttle.admit("b") == 0.0  # another peer has its own bucket
    clock.now += 0.11  # a little over one token's time
    assert throttle.admit("a") == 0.0 and throttle.admit("a") > 0
    assert throttle.refused == 2
    clock.now += 10.0  # both idle long enough to be full again: forgotten
    throttle.admit("c")
    assert len(throttle) == 1


def test_refused_calls_are_held_for_their_wait_but_only_so_many_per_peer() -> None:
    throttle = RequestThrottle(RequestLimits(per_s=10.0, burst=5.0))

    async def hold(count: int) -> list[float]:
        async def one() -> float:
            started = time.monotonic()
            await throttle.tarpit("a", 0.3)
            return time.monotonic() - started

        return await asyncio.gather(*(one() for _ in range(count)))

    held = asyncio.run(hold(TARPIT_MAX_CALLS + 6))
    assert sum(h >= 0.29 for h in held) == TARPIT_MAX_CALLS  # held for the wait
    assert sum(h < 0.1 for h in held) == 6  # beyond the cap: refused at once
    assert throttle._held == {}  # nothing left behind


def test_request_limits_must_be_positive() -> None:
    for per_s, burst in ((0.0, 5.0), (10.0, 0.5), (float("nan"), 5.0)):
        with pytest.raises(ValueError):
            RequestLimits(per_s, burst)


def test_peers_are_keyed_by_host_except_on_loopback() -> None:
    assert peer_key("ipv4:203.0.113.7:51234") == "203.0.113.7"
    assert peer_key("ipv6:[2001:db8::1]:51234") == "2001:db8::1"
    assert peer_key("ipv4:127.0.0.1:51234") == "ipv4:127.0.0.1:51234"
    assert peer_key("ipv6:[::1]:4") == "ipv6:[::1]:4"
    assert peer_key("unix:/tmp/socket") == "unix:/tmp/socket"


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_template(tmp_path_factory.mktemp("serving"))


@pytest.fixture
def coordinator(template: Path, tmp_path: Path) -> Iterator[CoordinatorThread]:
    run_dir = copy_run(
        template, tmp_path / "run", defences={"requests_per_s": 5, "request_burst": 20}
    )
    started = CoordinatorThread(run_dir)
    yield started
    started.stop()


class Unexpected(logging.Handler):
    """Collects gRPC's 'Unexpected ... raised by servicer method' records."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR:
            self.records.append(record.getMessage())


@pytest.fixture
def unexpected() -> Iterator[Unexpected]:
    handler = Unexpected()
    logger = logging.getLogger("grpc._cython.cygrpc")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def status_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_the_coordinator_answers_malformed_and_oversize_requests_precisely(
    coordinator: CoordinatorThread, unexpected: Unexpected
) -> None:
    with grpc.insecure_channel(coordinator.url.address, options=OWN_CONNECTION) as channel:
        get_run = channel.unary_unary("/starling.v1.Coordinator/GetRun")
        code, detail = status_of(lambda: get_run(b"\xff\xff\xff", timeout=5))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "malformed request" in detail
        status = channel.unary_unary("/starling.v1.Coordinator/GetStatus")
        code, detail = status_of(lambda: status(b"\x0a\x02\xc3\x28", timeout=5))  # bad UTF-8
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "malformed request" in detail
        fetch = channel.unary_stream("/starling.v1.Coordinator/FetchFile")
        code, _ = status_of(lambda: list(fetch(b"\x0b" * 1000, timeout=5)))  # unclosed groups
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        upload = channel.stream_unary("/starling.v1.Coordinator/UploadCheckpoint")
        oversize = b"\x12" + bytes(MAX_MESSAGE_BYTES)
        code, _ = status_of(lambda: upload(iter([oversize, b"\x12\x01a"]), timeout=5))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Still serving, and nothing escaped a handler.
        assert pb.RunInfo.FromString(get_run(b"", timeout=5)).run_id
    assert unexpected.records == []


def test_a_flooding_peer_is_throttled_while_another_is_served(
    coordinator: CoordinatorThread,
) -> None:
    """Limits of 5 requests/s, burst 20: a connection making 60 calls at once gets most
    refused with RESOURCE_EXHAUSTED (each held for its wait, at most 0.5 s, before the
    refusal); a second connection is served meanwhile."""
    with (
        grpc.insecure_channel(coordinator.url.address, options=OWN_CONNECTION) as flood,
        grpc.insecure_channel(coordinator.url.address, options=OWN_CONNECTION) as honest,
    ):
        call = flood.unary_unary("/starling.v1.Coordinator/GetStatus")
        futures = [call.future(b"", timeout=10) for _ in range(60)]
        served = honest.unary_unary("/starling.v1.Coordinator/GetStatus")(b"", timeout=5)
        assert pb.RunStatus.FromString(served) is not None
        codes = [f.code() for f in futures]
        refusals = [f.details() for f in futures if f.code() != grpc.StatusCode.OK]
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert 20 <= codes.count(grpc.StatusCode.OK) <= 30  # the burst, and what 5/s refills
    assert all("rate limited" in r and "retry in" in r for r in refusals)
    assert coordinator.coordinator.throttle.refused >= 30


def test_a_peer_answers_malformed_requests_and_absurd_rounds_precisely(
    unexpected: Unexpected,
) -> None:
    with ExchangePeer(Identity.generate(), PeerConfig("run-serving"), None) as peer:
        assert peer.endpoint is not None
        address = peer.endpoint.address
        with grpc.insecure_channel(address, options=OWN_CONNECTION) as channel:
            fetch = channel.unary_stream("/starling.v1.Peer/FetchMean")
            code, detail = status_of(lambda: list(fetch(b"\xff\xff", timeout=5)))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "malformed request" in detail
            absurd = peer_pb2.FetchMeanRequest(run_id="run-serving", round=2**64 - 1)
            code, detail = status_of(lambda: list(fetch(absurd.SerializeToString(), timeout=5)))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "absurd" in detail
            push = channel.stream_unary("/starling.v1.Peer/PushContribution")
            header = peer_pb2.ContributionChunk(
                header=peer_pb2.ContributionHeader(run_id="run-serving", round=0)
            ).SerializeToString()
            # A second message that is neither canonical data nor a parsable chunk.
            code, _ = status_of(lambda: push(iter([header, b"\xff\xff\xff"]), timeout=5))
            assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAVAILABLE)
            code, detail = status_of(lambda: push(iter([b"\xff\xff\xff"]), timeout=5))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "malformed message" in detail
    assert unexpected.records == []

"""The gRPC plumbing of the exchange: options, chunking, pinned TLS channels, the
bandwidth limiter and the byte ledger."""

from __future__ import annotations

import asyncio
import ctypes
import ipaddress
import time
from collections import defaultdict
from dataclasses import dataclass

import grpc

from starling.exchange.plan import PeerEndpoint
from starling.identity import TLS_SERVER_NAME, fetch_pinned_certificate

CHUNK_BYTES = 1 << 20  # payload bytes per stream message: 1 MiB, a quarter of gRPC's default
# The largest message either side accepts: a chunk plus its framing, and headers that
# list thousands of contributors. Anything bigger is refused by gRPC (RESOURCE_EXHAUSTED).
MAX_MESSAGE_BYTES = CHUNK_BYTES + (256 << 10)

GRPC_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Keepalive pings find a dead peer on an idle stream (a long poll, a stalled
    # sender) in ~30 s instead of the OS's TCP timeout of minutes.
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Payloads are already compressed by the codec (or are fp32 noise, which gzip
    # cannot shrink): compressing them again would only burn CPU.
    ("grpc.default_compression_algorithm", grpc.Compression.NoCompression.value),
    # Large windows keep a fast link full; BDP probing grows them further.
    ("grpc.http2.lookahead_bytes", 4 << 20),
]
SERVER_OPTIONS = GRPC_OPTIONS + [
    # Accept the clients' keepalive pings (the default would answer them with GOAWAY).
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.max_concurrent_streams", 256),
    # A stream that gRPC itself refuses (a message over MAX_MESSAGE_BYTES, bad framing)
    # is "tarpitted": its reset waits a random 100-1,000 ms, to slow a client that
    # provokes errors. At the upper end that, plus the time to read the message, makes
    # an honest client with an oversize message (say, an older or newer version) wait
    # over a second for its RESOURCE_EXHAUSTED. Half a second still slows abuse (the
    # per-peer request limits in starling.serving do the rest) and keeps every answer
    # within bench/fuzz.py's 1 s bar.
    ("grpc.http.tarpit_max_duration_ms", 500),
]


def keep_freed_memory() -> bool:
    """Asks glibc to serve large allocations from its heap and keep freed memory there.

    By default every buffer above 32 MiB is a fresh mmap that the kernel zero-fills page
    by page on first touch, and is unmapped again when freed: a round of a 100 MB
    exchange then spends more time in page faults than in copying. A process that
    exchanges round after round (a node, the benchmark's peers) calls this once at
    start. Returns False where it does not apply (not glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # From glibc's malloc.h. One arena: the other threads' arenas are capped at 64 MiB
    # heaps and mmap anything larger whatever the threshold says.
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    return bool(
        libc.mallopt(m_arena_max, 1)
        and libc.mallopt(m_mmap_threshold, 1 << 30)
        and libc.mallopt(m_trim_threshold, (1 << 31) - 1)
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class PlaintextRefused(ConnectionError):
    """A peer without a certificate fingerprint off loopback."""


def channel_credentials(
    endpoint: PeerEndpoint, connect_timeout: float
) -> grpc.ChannelCredentials | None:
    """TLS credentials pinned to the endpoint's certificate fingerprint, or None for
    plaintext, which only loopback addresses get (tests and benchmarks on one machine).
    Blocking (fetching the certificate is a TLS handshake): call it from a worker thread."""
    if endpoint.cert_fingerprint is None:
        if not is_loopback(endpoint.host):
            raise PlaintextRefused(f"{endpoint.address} has no certificate fingerprint")
        return None
    pem = fetch_pinned_certificate(
        endpoint.host, endpoint.port, endpoint.cert_fingerprint, connect_timeout
    )
    return grpc.ssl_channel_credentials(root_certificates=pem)


def open_channel(
    endpoint: PeerEndpoint, credentials: grpc.ChannelCredentials | None
) -> grpc.aio.Channel:
    """A channel to the endpoint; must be called on the event loop's thread."""
    if credentials is None:
        return grpc.aio.insecure_channel(endpoint.address, options=GRPC_OPTIONS)
    options = GRPC_OPTIONS + [("grpc.ssl_target_name_override", TLS_SERVER_NAME)]
    return grpc.aio.secure_channel(endpoint.address, credentials, options=options)


class RateLimiter:
    """Caps a byte stream at `mbps` megabits per second (None: no cap), shared by every
    stream of the node in one direction. Each call reserves its bytes on a virtual
    clock and sleeps until they are due; idle time earns at most `burst_s` of credit."""

    def __init__(self, mbps: float | None, burst_s: float = 0.05) -> None:
        if mbps is not None and mbps <= 0:
            raise ValueError(f"a bandwidth cap must be > 0 Mbit/s, got {mbps}")
        self.bytes_per_s = None if mbps is None else mbps * 1e6 / 8
        self.burst_s = burst_s
        self._due = 0.0  # monotonic time at which everything reserved so far is sent

    async def consume(self, nbytes: int) -> None:
        if self.bytes_per_s is None or nbytes <= 0:
            return
        now = time.monotonic()
        self._due = max(self._due, now - self.burst_s) + nbytes / self.bytes_per_s
        if self._due > now:
            await asyncio.sleep(self._due - now)


@dataclass(frozen=True)
class BandwidthLimits:
    upload_mbps: float | None = None
    download_mbps: float | None = None


@dataclass
class Traffic:
    """Application bytes (serialized gRPC messages) one way or the other."""

    sent: int = 0
    received: int = 0


class TrafficLedger:
    """Bytes sent to and received from each peer, per round: the client's pushes and
    fetches and the owner's receipts and serving alike."""

    def __init__(self) -> None:
        self._rounds: dict[int, dict[str, Traffic]] = defaultdict(lambda: defaultdict(Traffic))

    def sent(self, round_: int, peer: str, nbytes: int) -> None:
        self._rounds[round_][peer].sent += nbytes

    def received(self, round_: int, peer: str, nbytes: int) -> None:
        self._rounds[round_][peer].received += nbytes

    def of_round(self, round_: int) -> dict[str, Traffic]:
        counts = self._rounds.get(round_, {})  # .get: asking must not add a round
        return {peer: Traffic(t.sent, t.received) for peer, t in counts.items()}

    def forget_before(self, round_: int) -> None:
        for old in [r for r in self._rounds if r < round_]:
            del self._rounds[old]

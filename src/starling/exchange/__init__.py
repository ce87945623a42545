"""The peer protocol: a sharded all-reduce of encoded pseudo-gradients over gRPC.

Every participant streams its encoded slice of each shard to the shard's owner; the
owner checks and averages them by tokens, re-encodes the mean and serves it to all
(all-gather). Used by the node daemon and by the coordinator (owner of last resort).
"""

from starling.exchange.client import (
    ExchangeClient,
    ExchangeError,
    GlobalStateDownload,
    RoundResult,
    ShardOutcome,
)
from starling.exchange.owner import CommittedMean, ExchangeAbort, OwnerService
from starling.exchange.peer import ExchangePeer, PeerConfig, create_server
from starling.exchange.plan import PeerEndpoint, RoundSpec, ShardPlan, encode_shards
from starling.exchange.transport import (
    CHUNK_BYTES,
    BandwidthLimits,
    RateLimiter,
    Traffic,
    TrafficLedger,
)

__all__ = [
    "CHUNK_BYTES",
    "BandwidthLimits",
    "CommittedMean",
    "ExchangeAbort",
    "ExchangeClient",
    "ExchangeError",
    "ExchangePeer",
    "GlobalStateDownload",
    "OwnerService",
    "PeerConfig",
    "PeerEndpoint",
    "RateLimiter",
    "RoundResult",
    "RoundSpec",
    "ShardOutcome",
    "ShardPlan",
    "Traffic",
    "TrafficLedger",
    "create_server",
    "encode_shards",
]

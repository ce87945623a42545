"""What a round of the sharded all-reduce is: the shard plan, who owns each shard, who
takes part, and when it ends. All of it comes from outside the exchange (the
coordinator; a static list in tests and benchmarks)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from starling.codecs import ErrorFeedback
from starling.identity import PUBLIC_KEY_BYTES, node_id_of


@dataclass(frozen=True)
class ShardPlan:
    """Contiguous ranges of the flattened parameter vector: shard s is
    [bounds[s], bounds[s+1])."""

    bounds: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.bounds) < 2 or self.bounds[0] != 0:
            raise ValueError("a shard plan needs bounds 0 = b0 < b1 < ... < numel")
        if any(b >= c for b, c in zip(self.bounds, self.bounds[1:], strict=False)):
            raise ValueError(f"shard bounds must increase strictly, got {self.bounds}")

    @classmethod
    def even(cls, numel: int, shards: int, align: int = 4096) -> ShardPlan:
        """`shards` near-equal ranges whose inner bounds fall on multiples of `align`
        (a multiple of every codec's block and chunk size, so blocks never straddle
        shards and a sharded encoding equals an unsharded one)."""
        if numel <= 0 or shards <= 0:
            raise ValueError(f"need numel > 0 and shards > 0, got {numel} and {shards}")
        units = math.ceil(numel / align)
        shards = min(shards, units)
        inner = [min(numel, round(units * s / shards) * align) for s in range(1, shards)]
        return cls((0, *inner, numel))

    @property
    def numel(self) -> int:
        return self.bounds[-1]

    @property
    def num_shards(self) -> int:
        return len(self.bounds) - 1

    def range(self, shard: int) -> tuple[int, int]:
        return self.bounds[shard], self.bounds[shard + 1]

    def size(self, shard: int) -> int:
        start, end = self.range(shard)
        return end - start


@dataclass(frozen=True)
class PeerEndpoint:
    """How to reach a shard owner. `cert_fingerprint` None means plaintext, which the
    exchange allows only for loopback addresses."""

    node_id: str
    address: str  # "host:port"
    cert_fingerprint: str | None = None
    # The owner's Ed25519 public key, to check its signature on the means it serves
    # (participants' keys are in the round spec; the coordinator's comes from here).
    public_key: bytes | None = None

    @property
    def host(self) -> str:
        return self.address.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])


@dataclass(frozen=True)
class RoundSpec:
    """One round of the exchange, as every participant and owner sees it."""

    run_id: str
    round: int
    codec: str  # the run's codec spec, e.g. "int4" (starling.codecs.make_codec)
    plan: ShardPlan
    owners: tuple[PeerEndpoint, ...]  # owners[s] reduces shard s
    participants: Mapping[str, bytes]  # node id -> raw Ed25519 public key
    deadline: float  # unix seconds: contributions complete after this are excluded
    # Seconds after the deadline that fetching the committed means may still take
    # (the all-gather happens after the commit, so it needs its own allowance).
    gather_timeout_s: float = 60.0
    # Who fixes each shard's list of contributors. "owner": each owner averages what it
    # holds when every participant delivered or at the deadline; a contributor that
    # died mid-round can then be in some shards' means and not others (each mean still
    # lists exactly whom it averaged). "external": owners close at that point and wait
    # for OwnerService.decide() with the contributors complete in every shard (the
    # coordinator's call), so each contributor is in the whole mean or in none of it.
    decision: str = "owner"
    # verifiers[s], when not None, is shard s's second owner: every participant pushes
    # it the same slice, it reduces them too, and the two means must agree by hash (a
    # lying owner shows). Empty: no shard has one.
    verifiers: tuple[PeerEndpoint | None, ...] = ()

    def __post_init__(self) -> None:
        if not self.run_id:
            raise ValueError("a round needs a run id")
        if self.decision not in ("owner", "external"):
            raise ValueError(f"decision must be 'owner' or 'external', got {self.decision!r}")
        if len(self.owners) != self.plan.num_shards:
            raise ValueError(f"{self.plan.num_shards} shards but {len(self.owners)} owners")
        for node_id, key in self.participants.items():
            if len(key) != PUBLIC_KEY_BYTES or node_id_of(key) != node_id:
                raise ValueError(f"participant {node_id} does not match its public key")
        if self.verifiers and len(self.verifiers) != self.plan.num_shards:
            raise ValueError(f"{self.plan.num_shards} shards but {len(self.verifiers)} verifiers")
        for shard, verifier in enumerate(self.verifiers):
            if verifier is not None and verifier.node_id == self.owners[shard].node_id:
                raise ValueError(f"shard {shard}'s verifier is its owner")

    def shards_of(self, node_id: str) -> list[int]:
        """The shards `node_id` owns (serves the mean of)."""
        return [s for s, owner in enumerate(self.owners) if owner.node_id == node_id]

    def verifier(self, shard: int) -> PeerEndpoint | None:
        return self.verifiers[shard] if self.verifiers else None

    def reduced_by(self, node_id: str) -> list[int]:
        """The shards `node_id` reduces, as owner or as verifier."""
        return [
            s
            for s, owner in enumerate(self.owners)
            if node_id in (owner.node_id, getattr(self.verifier(s), "node_id", None))
        ]


def encode_shards(
    plan: ShardPlan, delta: torch.Tensor, feedback: ErrorFeedback
) -> tuple[list[bytes], torch.Tensor]:
    """Encodes each shard's slice of the flat Δ (shape (numel,)) with error feedback
    over the whole vector. Returns the payloads and what receivers will decode
    (Δ as sent, shape (numel,))."""
    if delta.dim() != 1 or delta.numel() != plan.numel:
        raise ValueError(f"expected a flat tensor of {plan.numel} values, got {tuple(delta.shape)}")
    return feedback.encode_slices(delta, [plan.range(s) for s in range(plan.num_shards)])

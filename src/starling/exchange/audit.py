"""Auditing an owner's report: is every offence it claims true?

An owner that reports an honest contributor as an offender ("rejected: ...") would get
it excluded and, in time, banned. So before a round commits, the coordinator fetches the
signed contributions behind every report that claims an offence (Peer.FetchEvidence)
and recomputes each claim with the owner's own checks: the header against the round
(`check_fits`), the payload against the codec, then `robust.screen` over the decodable
contributions in the order the owner held them. The owner cannot forge evidence (each
contribution is signed by its sender and carries its payload's hash), so a claim the
evidence does not bear out is the owner's lie.

The same evidence settles a dispute over a mean: when a shard's owner and its verifier
report different mean hashes, the coordinator recomputes the mean from the signed
contributions the commit lists (`recompute_mean`); whichever owner signed another hash
lied. And a dispute over one contribution: when a shard's owner and verifier report
different tokens or payload hashes for one contributor, each must show that
contributor's signed contribution as it reported it (`disputed_contribution`); one
that cannot made it up, and if both can, the contributor signed two.
"""

from __future__ import annotations

from dataclasses import dataclass

from starling.codecs import CodecError, make_codec, mean_codec
from starling.exchange.owner import ExchangeAbort, check_fits, signed_by, weighted_mean_f64
from starling.exchange.plan import RoundSpec
from starling.identity import payload_hash
from starling.robust import screen
from starling.v1 import peer_pb2


class ForgedEvidence(Exception):
    """Evidence that no honest owner can serve: a header that does not verify, a payload
    that does not match its hash, another round's or shard's contribution."""


class IncompleteEvidence(Exception):
    """Evidence that lacks a contribution the commit lists (or holds another one in
    its place): the mean cannot be recomputed from it."""


@dataclass(frozen=True)
class Evidence:
    header: peer_pb2.ContributionHeader
    payload: bytes  # b"": refused on its header alone


def false_rejections(
    spec: RoundSpec,
    shard: int,
    evidence: list[Evidence],
    claimed: dict[str, str],
    screening: bool,
    direction: bool,
) -> dict[str, str]:
    """Node id → why the owner's claim (in `claimed`: node id → its reported reason)
    that the node's contribution to `shard` was an offence does not hold. Empty when
    every claim holds. Raises ForgedEvidence."""
    codec = make_codec(spec.codec)
    numel = spec.plan.size(shard)
    offences: dict[str, str] = {}
    decoded = {}
    header_only = set()  # refused on a header that fits: no offence can be shown
    for item in evidence:
        header = item.header
        _check_authentic(spec, shard, item)
        if header.sender in offences or header.sender in decoded or header.sender in header_only:
            raise ForgedEvidence(f"two contributions of {header.sender}")
        try:
            check_fits(header, codec, numel)
        except ExchangeAbort as err:
            offences[header.sender] = str(err)
            continue
        if not item.payload:
            header_only.add(header.sender)
            continue
        try:
            decoded[header.sender] = (codec.decode(item.payload, numel), header)
        except CodecError as err:
            offences[header.sender] = f"bad payload: {err}"
    if screening:
        offences |= screen(
            {n: values for n, (values, _) in decoded.items()},
            {n: h.payload_hash for n, (_, h) in decoded.items()},
            direction,
            {n: h.tokens for n, (_, h) in decoded.items()},
        )
    false = {}
    for node_id in sorted(claimed):
        if node_id in offences:
            continue
        if node_id in decoded:
            false[node_id] = "its contribution passes every check"
        elif node_id in header_only:
            false[node_id] = "its header fits the round, and nothing else was kept"
        else:
            false[node_id] = "no signed contribution of it in the evidence"
    return false


def recompute_mean(
    spec: RoundSpec,
    shard: int,
    evidence: list[Evidence],
    contributors: dict[str, tuple[int, bytes]],
) -> bytes:
    """The BLAKE3 hash of the encoded mean an honest owner commits for `shard` over
    exactly `contributors` (node id → (tokens, payload hash), as the commit lists them),
    from that owner's (or verifier's) evidence: the same decode, token-weighted mean in
    node-id order and re-encoding as OwnerService._commit. Raises ForgedEvidence or
    IncompleteEvidence."""
    codec = make_codec(spec.codec)
    numel = spec.plan.size(shard)
    found: dict[str, Evidence] = {}
    for item in evidence:
        _check_authentic(spec, shard, item)
        sender = item.header.sender
        if (
            sender in contributors
            and (item.header.tokens, item.header.payload_hash) == (contributors[sender])
        ):
            found[sender] = item
    missing = sorted(set(contributors) - set(found))
    if missing:
        raise IncompleteEvidence(f"no contribution of {', '.join(missing)} as committed")
    if not found:
        raise IncompleteEvidence("the commit lists no contribution")
    ordered = sorted(found)
    try:
        values = [codec.decode(found[n].payload, numel) for n in ordered]
    except CodecError as err:  # a committed contribution passed this very check
        raise ForgedEvidence(f"a committed contribution does not decode: {err}") from None
    mean = weighted_mean_f64(values, [found[n].header.tokens for n in ordered])
    return payload_hash(mean_codec(codec, len(ordered)).encode(mean))


def disputed_contribution(
    spec: RoundSpec,
    shard: int,
    contributor: str,
    claims: dict[str, tuple[int, bytes]],
    evidence: dict[str, list[Evidence]],
) -> dict[str, str]:
    """Who lied when the reducers of `shard` (node id → (tokens, payload hash) each
    reported for `contributor`, in `claims`) disagree: node id → why. A reducer whose
    evidence holds no authentic contribution of `contributor` in full with the tokens
    and hash it reported, or holds a forged one, lied about it; if every reducer shows
    one as it reported, the contributor signed different contributions to the same
    shard and round (no honest node does). A reducer absent from `evidence` served
    none: it is not judged, and then neither is the contributor (the caller decides
    what a withheld answer means). Empty when the claims agree."""
    if len(set(claims.values())) < 2:
        return {}
    liars = {}
    for reducer, claim in sorted(claims.items()):
        if reducer not in evidence:
            continue
        shown = [e for e in evidence[reducer] if e.header.sender == contributor]
        try:
            for item in shown:
                _check_authentic(spec, shard, item)
        except ForgedEvidence as err:
            liars[reducer] = (
                f"served forged evidence for shard {shard} of round {spec.round}: {err}"
            )
            continue
        if not any(
            item.payload and (item.header.tokens, item.header.payload_hash) == claim
            for item in shown
        ):
            liars[reducer] = (
                f"reported a contribution of {contributor} to shard {shard} of round "
                f"{spec.round} that it cannot show (hash {claim[1].hex()[:16]})"
            )
    if not liars and claims.keys() <= evidence.keys():
        liars[contributor] = (
            f"signed {len(claims)} different contributions to shard {shard} of round {spec.round}"
        )
    return liars


def _check_authentic(spec: RoundSpec, shard: int, item: Evidence) -> None:
    header = item.header
    public_key = spec.participants.get(header.sender)
    if header.run_id != spec.run_id or header.round != spec.round or header.shard != shard:
        raise ForgedEvidence(f"a contribution of {header.sender} to another round or shard")
    if public_key is None:
        raise ForgedEvidence(f"{header.sender} is not a participant")
    if not signed_by(header, public_key):
        raise ForgedEvidence(f"{header.sender}'s signature does not verify")
    if item.payload and (
        len(item.payload) != header.payload_bytes
        or payload_hash(item.payload) != header.payload_hash
    ):
        raise ForgedEvidence(f"{header.sender}'s payload does not match its header")

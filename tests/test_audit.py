"""The audit of an owner's report (starling.exchange.audit): every offence it claims is
recomputed from the signed contributions it received; false claims and forged evidence
are found, true ones confirmed. (tests/test_poisoning.py runs a lying owner end to end.)"""

from __future__ import annotations

import pytest
import torch

from starling.codecs import make_codec
from starling.exchange.audit import (
    Evidence,
    ForgedEvidence,
    IncompleteEvidence,
    disputed_contribution,
    false_rejections,
    recompute_mean,
)
from starling.exchange.owner import weighted_mean_f64
from starling.exchange.plan import PeerEndpoint, RoundSpec, ShardPlan
from starling.identity import Identity, contribution_message, payload_hash
from starling.v1 import peer_pb2

NUMEL = 8192
CODEC = make_codec("fp32")
NODES = [Identity.generate() for _ in range(5)]


def spec() -> RoundSpec:
    owner = NODES[0]
    return RoundSpec(
        run_id="run",
        round=3,
        codec="fp32",
        plan=ShardPlan((0, NUMEL)),
        owners=(PeerEndpoint(owner.node_id, "127.0.0.1:1"),),
        participants={n.node_id: n.public_key for n in NODES},
        deadline=0.0,
        decision="external",
    )


def contribution(
    node: Identity, values: torch.Tensor, numel: int = NUMEL, payload: bytes | None = None
) -> Evidence:
    encoded = CODEC.encode(values) if payload is None else payload
    digest = payload_hash(encoded)
    signed = contribution_message("run", 3, node.node_id, 0, CODEC.codec_id, numel, 100, digest)
    header = peer_pb2.ContributionHeader(
        run_id="run",
        round=3,
        sender=node.node_id,
        shard=0,
        codec_id=CODEC.codec_id,
        numel=numel,
        tokens=100,
        payload_bytes=len(encoded),
        payload_hash=digest,
        signature=node.sign(signed),
    )
    return Evidence(header, encoded)


def honest() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    common = torch.randn(NUMEL, generator=gen)
    return [common * 0.6 + torch.randn(NUMEL, generator=gen) for _ in NODES]


def audit(evidence: list[Evidence], claimed: list[int], direction: bool = False) -> dict:
    claims = {NODES[i].node_id: "rejected: ..." for i in claimed}
    return false_rejections(spec(), 0, evidence, claims, True, direction)


def test_a_framed_honest_contributor_is_a_false_claim() -> None:
    evidence = [contribution(n, v) for n, v in zip(NODES, honest(), strict=True)]
    assert audit(evidence, [2]) == {NODES[2].node_id: "its contribution passes every check"}
    assert audit(evidence, []) == {}


def test_true_offences_are_confirmed() -> None:
    values = honest()
    values[1] = values[1] * 100  # a norm outlier
    evidence = [contribution(n, v) for n, v in zip(NODES, values, strict=True)]
    evidence[4] = contribution(NODES[4], values[0], payload=evidence[0].payload)  # a copy
    assert audit(evidence, [1, 4]) == {}
    values = honest()
    values[2] = -values[2]  # sign-flipped: only the direction check catches it
    evidence = [contribution(n, v) for n, v in zip(NODES, values, strict=True)]
    assert audit(evidence, [2], direction=True) == {}
    assert audit(evidence, [2]) == {NODES[2].node_id: "its contribution passes every check"}


def test_refusals_on_the_header_or_the_payload_are_recomputed() -> None:
    values = honest()
    bad = bytearray(CODEC.encode(values[1]))
    bad[20:24] = torch.tensor([float("nan")]).numpy().tobytes()
    evidence = [
        contribution(NODES[0], values[0]),
        contribution(NODES[1], values[1], payload=bytes(bad)),  # a NaN: fails to decode
        Evidence(contribution(NODES[2], values[2][:-1], numel=NUMEL - 1).header, b""),
        Evidence(contribution(NODES[3], values[3]).header, b""),  # fits, no payload kept
    ]
    assert audit(evidence, [1, 2]) == {}
    assert audit(evidence, [3, 4]) == {
        NODES[3].node_id: "its header fits the round, and nothing else was kept",
        NODES[4].node_id: "no signed contribution of it in the evidence",
    }


@pytest.mark.parametrize("forgery", ["payload", "signature", "round", "duplicate"])
def test_forged_evidence_is_refused(forgery: str) -> None:
    evidence = [contribution(n, v) for n, v in zip(NODES, honest(), strict=True)]
    item = evidence[1]
    if forgery == "payload":
        evidence[1] = Evidence(item.header, CODEC.encode(torch.zeros(NUMEL)))
    elif forgery == "signature":
        header = peer_pb2.ContributionHeader()
        header.CopyFrom(item.header)
        header.tokens += 1
        evidence[1] = Evidence(header, item.payload)
    elif forgery == "round":
        header = peer_pb2.ContributionHeader()
        header.CopyFrom(item.header)
        header.round = 2
        evidence[1] = Evidence(header, item.payload)
    else:
        evidence.append(item)
    with pytest.raises(ForgedEvidence):
        audit(evidence, [1])


def test_a_disputed_mean_is_recomputed_from_exactly_the_committed_contributions() -> None:
    values = honest()
    evidence = [contribution(n, v) for n, v in zip(NODES, values, strict=True)]
    committed = {e.header.sender: (e.header.tokens, e.header.payload_hash) for e in evidence[:3]}
    ordered = sorted(range(3), key=lambda i: NODES[i].node_id)  # owners average in id order
    mean = weighted_mean_f64([values[i] for i in ordered], [100] * 3)
    right = payload_hash(CODEC.encode(mean))
    assert recompute_mean(spec(), 0, evidence, committed) == right  # the others are ignored
    assert recompute_mean(spec(), 0, evidence, committed) != payload_hash(CODEC.encode(-mean))
    with pytest.raises(IncompleteEvidence):  # one committed contribution is not there
        recompute_mean(spec(), 0, evidence[1:], committed)
    swapped = dict(committed)
    swapped[NODES[0].node_id] = (100, payload_hash(b"another payload"))
    with pytest.raises(IncompleteEvidence):  # the evidence holds another one in its place
        recompute_mean(spec(), 0, evidence, swapped)
    forged = Evidence(evidence[0].header, CODEC.encode(torch.zeros(NUMEL)))
    with pytest.raises(ForgedEvidence):
        recompute_mean(spec(), 0, [forged, *evidence[1:]], committed)


def test_a_dispute_over_one_contribution_convicts_whoever_cannot_show_what_it_reported() -> None:
    """Owner NODES[0] and verifier NODES[1] report different contributions of NODES[2]:
    each must show NODES[2]'s signed contribution as it reported it."""
    values = honest()
    real = contribution(NODES[2], values[2])
    other = contribution(NODES[2], values[3])  # NODES[2] signed a second contribution
    owner, verifier, sender = NODES[0].node_id, NODES[1].node_id, NODES[2].node_id

    def claim(e: Evidence) -> tuple[int, bytes]:
        return (e.header.tokens, e.header.payload_hash)

    def judge(claims: dict, evidence: dict) -> dict[str, str]:
        return disputed_contribution(spec(), 0, sender, claims, evidence)

    # The verifier made up a hash: it holds the real contribution, which does not match.
    fake = (100, bytes(32))
    liars = judge({owner: claim(real), verifier: fake}, {owner: [real], verifier: [real]})
    assert list(liars) == [verifier] and "that it cannot show" in liars[verifier]
    # The owner claims one it never received: nothing of the sender in its evidence.
    liars = judge({owner: claim(other), verifier: claim(real)}, {owner: [], verifier: [real]})
    assert list(liars) == [owner]
    # Both show a signed contribution as they reported it: the sender signed two.
    liars = judge({owner: claim(real), verifier: claim(other)}, {owner: [real], verifier: [other]})
    assert list(liars) == [sender] and "signed 2 different contributions" in liars[sender]
    # Evidence forged to match a false claim: a payload its header does not sign.
    forged = Evidence(real.header, other.payload)
    liars = judge({owner: claim(real), verifier: claim(other)}, {owner: [real], verifier: [forged]})
    assert list(liars) == [verifier] and "forged evidence" in liars[verifier]
    # A header alone (a contribution refused on its header) shows nothing.
    bare = Evidence(other.header, b"")
    liars = judge({owner: claim(real), verifier: claim(other)}, {owner: [real], verifier: [bare]})
    assert list(liars) == [verifier]
    assert judge({owner: claim(real), verifier: claim(real)}, {}) == {}  # no dispute
    # A reducer that served no evidence is not judged, nor is the sender then; one that
    # served evidence not bearing out its claim still is.
    assert judge({owner: claim(real), verifier: fake}, {owner: [real]}) == {}
    liars = judge({owner: claim(other), verifier: claim(real)}, {owner: [real]})
    assert list(liars) == [owner] and "that it cannot show" in liars[owner]
    assert judge({owner: claim(real), verifier: fake}, {}) == {}

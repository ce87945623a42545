"""The exchange on real gRPC servers on loopback sockets, several peers in one process
(each with its own event loop thread). Kills and stalls of real processes are in
test_exchange_processes.py."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from safetensors.torch import save as save_safetensors

from starling.codecs import CODEC_NAMES, ErrorFeedback, make_codec
from starling.exchange import (
    BandwidthLimits,
    ExchangeError,
    ExchangePeer,
    PeerConfig,
    PeerEndpoint,
    RateLimiter,
    RoundResult,
    RoundSpec,
    ShardPlan,
    encode_shards,
)
from starling.exchange.audit import false_rejections, recompute_mean
from starling.exchange.harness import payload_of
from starling.exchange.owner import weighted_mean_f64
from starling.exchange.transport import CHUNK_BYTES
from starling.identity import (
    Identity,
    contribution_message,
    create_tls_certificate,
    payload_hash,
)
from starling.v1 import peer_pb2, peer_pb2_grpc

RUN = "run-test"


@pytest.fixture
def make_peers() -> Iterator:
    made: list[ExchangePeer] = []

    def make(n: int, tls: bool = True, client_only: int = 0, **config) -> list[ExchangePeer]:
        for index in range(n):
            cert = create_tls_certificate(["127.0.0.1"]) if tls else None
            reachable = index < n - client_only
            peer_config = PeerConfig(RUN, reachable=reachable, **config)
            made.append(ExchangePeer(Identity.generate(), peer_config, cert))
        return made[-n:]

    yield make
    for peer in made:
        peer.close()


def spec_for(
    peers: list[ExchangePeer],
    round_: int,
    codec: str,
    numel: int,
    deadline_s: float = 30.0,
    members: list[ExchangePeer] | None = None,
) -> RoundSpec:
    owners = tuple(e for p in peers if (e := p.endpoint) is not None)
    members = peers if members is None else members
    return RoundSpec(
        run_id=RUN,
        round=round_,
        codec=codec,
        plan=ShardPlan.even(numel, len(owners), align=64),
        owners=owners,
        participants={p.identity.node_id: p.identity.public_key for p in members},
        deadline=time.time() + deadline_s,
        gather_timeout_s=10.0,
    )


def reduce_together(
    peers: list[ExchangePeer], spec: RoundSpec, deltas: list[torch.Tensor], tokens: list[int]
) -> list[RoundResult]:
    for peer in peers:
        peer.open_round(spec)
    codec = make_codec(spec.codec)
    payloads = [encode_shards(spec.plan, d, ErrorFeedback(codec))[0] for d in deltas]
    with ThreadPoolExecutor(len(peers)) as pool:
        futures = [
            pool.submit(p.all_reduce, spec, payloads[i], tokens[i]) for i, p in enumerate(peers)
        ]
        return [f.result(timeout=120) for f in futures]


def exact_mean(deltas: list[torch.Tensor], tokens: list[int]) -> torch.Tensor:
    return sum(d.double() * t for d, t in zip(deltas, tokens, strict=True)) / sum(tokens)


def test_fp32_mean_is_exact_over_tls_with_a_client_only_peer(make_peers) -> None:
    peers = make_peers(4, client_only=1)
    assert peers[-1].endpoint is None and peers[-1].port is None
    numel = 3 * CHUNK_BYTES // 4 + 12_345  # several chunks per shard, ragged end
    deltas = [payload_of(i, numel) for i in range(4)]
    tokens = [512, 1024, 256, 2048]
    spec = spec_for(peers, 0, "fp32", numel)
    assert spec.plan.num_shards == 3  # the client-only peer owns nothing
    results = reduce_together(peers, spec, deltas, tokens)
    expected = exact_mean(deltas, tokens)
    everyone = {p.identity.node_id: t for p, t in zip(peers, tokens, strict=True)}
    for result in results:
        assert result.missing_shards == []
        assert result.contributors == everyone
        assert all(o.pushed for o in result.shards)
        assert (result.mean.double() - expected).abs().max().item() <= 1e-6
    # Every peer holds bit-identical means.
    assert len({hashlib.sha256(r.mean.numpy().tobytes()).hexdigest() for r in results}) == 1

    # Byte counts: what A counted as sent to B is what B counted as received from A.
    traffic = {p.identity.node_id: p.traffic(0) for p in peers}
    owners = {e.node_id for e in spec.owners}
    for a in peers:
        for b in peers:
            ida, idb = a.identity.node_id, b.identity.node_id
            if ida == idb or (ida not in owners and idb not in owners):
                continue
            assert traffic[ida][idb].sent == traffic[idb][ida].received > 0
    # The client-only peer sent its three slices and received three means: fp32, so
    # each way at least the encoded payload, and framing costs well under 0.1%.
    client = traffic[peers[-1].identity.node_id]
    payload = sum(make_codec("fp32").encoded_size(spec.plan.size(s)) for s in range(3))
    assert payload <= sum(t.sent for t in client.values()) <= payload * 1.001
    assert payload <= sum(t.received for t in client.values()) <= payload * 1.001


@pytest.mark.parametrize("codec_name", [c for c in CODEC_NAMES if c != "fp32"])
def test_codec_means_stay_within_the_codecs_bound(make_peers, codec_name: str) -> None:
    peers = make_peers(3, tls=False)
    numel = 50_000
    deltas = [payload_of(10 + i, numel) * 0.01 for i in range(3)]
    tokens = [100, 300, 600]
    spec = spec_for(peers, 0, codec_name, numel)
    results = reduce_together(peers, spec, deltas, tokens)
    codec = make_codec(codec_name)
    # First encoding: each contribution within its bound; second: the owner's re-encoded
    # mean within the bound for the mean.
    expected = exact_mean(deltas, tokens).float()
    first = sum(codec.error_bound(d) * t for d, t in zip(deltas, tokens, strict=True)) / 1000
    bound = first + codec.error_bound(expected) + 1e-7
    for result in results:
        assert result.missing_shards == []
        error = (result.mean.double() - expected.double()).abs().max().item()
        assert error <= bound, f"{codec_name}: error {error} above bound {bound}"
    assert torch.equal(results[0].mean, results[1].mean)
    assert torch.equal(results[0].mean, results[2].mean)


@pytest.mark.parametrize("codec_name", ["topk", "topk2"])
def test_a_top_k_mean_keeps_every_contributors_entries(make_peers, codec_name: str) -> None:
    """The owner encodes the mean of three top-k contributions (8- or 2-bit values) with
    three times k per chunk at 8 bits (codecs.mean_codec), not k: every entry any
    contributor sent is in the mean every peer applies, off only by its 8-bit rounding."""
    peers = make_peers(3, tls=False)
    numel = 50_000
    deltas = [payload_of(20 + i, numel) * 0.01 for i in range(3)]
    tokens = [100, 300, 600]
    spec = spec_for(peers, 0, codec_name, numel)
    results = reduce_together(peers, spec, deltas, tokens)
    codec = make_codec(codec_name)
    sent = [encode_shards(spec.plan, d, ErrorFeedback(codec))[1] for d in deltas]
    expected = exact_mean(sent, tokens)
    support = expected != 0
    assert int(support.sum()) > 2.5 * sum(int((d != 0).sum()) for d in sent) / 3
    for result in results:
        mean = result.mean.double()
        assert torch.equal(mean != 0, support)
        # Within half an 8-bit step of its chunk's largest entry (4096 values a chunk).
        worst = (mean - expected).abs().max().item()
        assert worst <= expected.abs().max().item() / 254 + 1e-9


def test_external_decision_makes_each_contributor_all_or_nothing(make_peers) -> None:
    """A contributor that reached only one of three owners (it died mid-round) is left
    out of every shard once the decider intersects the owners' holders."""
    peers = make_peers(3, tls=False)
    partial = Identity.generate()
    numel = 30_000
    spec = spec_for(peers, 0, "fp32", numel, deadline_s=3.0)
    participants = {**spec.participants, partial.node_id: partial.public_key}
    spec = RoundSpec(**{**spec.__dict__, "participants": participants, "decision": "external"})
    for peer in peers:
        peer.open_round(spec)
    codec = make_codec("fp32")
    first_shard = codec.encode(payload_of(3, numel)[: spec.plan.size(0)].clone())
    raw = RawSender(peers[0], spec)
    assert raw.send(raw.header(partial, first_shard), [first_shard]) == grpc.StatusCode.OK
    raw.channel.close()

    deltas = [payload_of(i, numel) for i in range(3)]
    tokens = [10, 20, 30]
    with ThreadPoolExecutor(4) as pool:
        running = pool.submit(reduce_together, peers, spec, deltas, tokens)
        holders = [pool.submit(p.holders, 0, 30.0) for p in peers]
        held = [h.result(timeout=60) for h in holders]  # every owner closed at the deadline
        assert partial.node_id in held[0][0]
        complete = set.intersection(*(set(c) for h in held for c in h.values()))
        assert complete == {p.identity.node_id for p in peers}
        for peer in peers:
            peer.decide(0, complete)
        results = running.result(timeout=60)
    expected = exact_mean(deltas, tokens)
    for result in results:
        assert result.missing_shards == []
        assert (result.mean.double() - expected).abs().max().item() <= 1e-6
        for outcome in result.shards:
            assert set(outcome.contributors) == complete
            assert partial.node_id in outcome.excluded
        assert result.shards[0].excluded[partial.node_id] == "not complete in every shard"


def test_a_dead_owners_shard_is_reassigned_and_completes(make_peers) -> None:
    peers = make_peers(3)
    numel = 90_000
    deltas = [payload_of(i, numel) for i in range(2)]
    tokens = [3, 1]
    spec = spec_for(peers, 4, "fp32", numel, deadline_s=3.0, members=peers[:2])
    spec = RoundSpec(**{**spec.__dict__, "gather_timeout_s": 2.0})
    dead = peers[2]
    dead_shard = spec.shards_of(dead.identity.node_id)[0]
    dead.close()  # its server is gone: pushes to it are refused
    payloads = [encode_shards(spec.plan, d, ErrorFeedback(make_codec("fp32")))[0] for d in deltas]
    with ThreadPoolExecutor(2) as pool:
        first = [pool.submit(peers[i].all_reduce, spec, payloads[i], tokens[i]) for i in range(2)]
        results = [f.result(timeout=60) for f in first]
    for result in results:
        assert result.missing_shards == [dead_shard]
        assert result.failed_owners == {dead.identity.node_id}
    # The decider reassigns the shard to peer 0, with a new deadline for it alone.
    owners = list(spec.owners)
    owners[dead_shard] = peers[0].endpoint
    retry = RoundSpec(**{**spec.__dict__, "owners": tuple(owners), "deadline": time.time() + 20})
    with ThreadPoolExecutor(2) as pool:
        again = [
            pool.submit(peers[i].all_reduce, retry, payloads[i], tokens[i], [dead_shard])
            for i in range(2)
        ]
        retried = [f.result(timeout=60) for f in again]
    expected = exact_mean(deltas, tokens)
    start, end = spec.plan.range(dead_shard)
    for before, after in zip(results, retried, strict=True):
        assert [o.shard for o in after.shards] == [dead_shard]
        assert after.missing_shards == []
        merged = before.mean + after.mean  # zeros outside each result's shards
        assert (merged.double() - expected).abs().max().item() <= 1e-6
        assert set(after.shards[0].contributors) == {p.identity.node_id for p in peers[:2]}
    assert torch.equal(retried[0].mean[start:end], retried[1].mean[start:end])


def test_a_shards_verifier_reduces_the_same_contributions_to_the_same_signed_mean(
    make_peers,
) -> None:
    """With a second owner per shard, every participant pushes each slice twice; the
    owner and the verifier commit means with equal hashes, each signed by its reducer,
    and the evidence either keeps recomputes to that hash (what the coordinator does
    when they disagree)."""
    peers = make_peers(3)
    numel = 60_000
    spec = spec_for(peers, 2, "int4", numel, deadline_s=20.0)
    verifiers = tuple(spec.owners[(s + 1) % 3] for s in range(spec.plan.num_shards))
    spec = RoundSpec(**{**spec.__dict__, "verifiers": verifiers})
    deltas = [payload_of(i, numel) for i in range(3)]
    tokens = [5, 7, 11]
    results = reduce_together(peers, spec, deltas, tokens)
    for result in results:
        assert result.missing_shards == []
        assert all(o.push_error is None and o.verifier_push_error is None for o in result.shards)
    for shard in range(spec.plan.num_shards):
        hashes = {r.shards[shard].mean_hash for r in results}
        assert len(hashes) == 1, hashes  # every participant fetched the same mean
        verifier = spec.verifier(shard)
        assert verifier is not None
        header, values = peers[0].fetch_mean(spec, shard, verifier)
        assert header.owner == verifier.node_id and header.payload_hash in hashes
        start, end = spec.plan.range(shard)
        assert torch.equal(values, results[0].mean[start:end])
        committed = {c.node_id: (c.tokens, c.payload_hash) for c in header.contributors}
        for reducer in (spec.owners[shard], verifier):
            evidence = peers[0].fetch_evidence(reducer, 2, shard, timeout=20)
            assert recompute_mean(spec, shard, evidence, committed) in hashes
    # An owner gone after the commit: its shard's mean comes from the verifier (before,
    # the dead owner was retried until the gather timeout and the shard was lost).
    gone = spec.owners[1]
    peers[[p.identity.node_id for p in peers].index(gone.node_id)].close()
    late = make_peers(1, client_only=1)[0]
    caught_up = late.gather(spec)
    assert caught_up.missing_shards == [], [o.error for o in caught_up.shards]
    assert [o.served_by for o in caught_up.shards] == ["", spec.verifier(1).node_id, ""]
    assert torch.equal(caught_up.mean, results[0].mean)
    # Its verifier gone too: the mean is lost, and the node learns so once each was
    # unreachable for UNREACHABLE_S, not at the gather timeout (here 110 s away;
    # under churn every node stalled for it).
    verifier = spec.verifier(1)
    assert verifier is not None
    peers[[p.identity.node_id for p in peers].index(verifier.node_id)].close()
    distant = RoundSpec(**{**spec.__dict__, "deadline": time.time() + 100})
    with ThreadPoolExecutor(1) as pool:
        lost = pool.submit(late.gather, distant).result(timeout=60)
    assert lost.missing_shards == [1]
    assert "UNAVAILABLE" in (lost.shards[1].error or "")
    assert [o.served_by for o in lost.shards] == ["", "", spec.verifier(2).node_id]


def test_weighted_mean_is_exact_and_independent_of_blocking() -> None:
    values = [payload_of(i, 100_003) for i in range(5)]
    tokens = [1, 7, (1 << 29) - 1, 12345, 3]
    expected = exact_mean(values, tokens).float()
    for block in (1, 1000, 1 << 16, 1 << 20):
        assert torch.equal(weighted_mean_f64(values, tokens, block), expected)


def test_a_mean_of_an_earlier_round_is_kept_for_catch_up_then_forgotten(make_peers) -> None:
    peers = make_peers(2, tls=False, keep_rounds=2)
    numel = 10_000
    results = []
    specs = []
    for round_ in range(3):
        deltas = [torch.full((numel,), float(round_ + i)) for i in range(2)]
        specs.append(spec_for(peers, round_, "fp32", numel))
        results.append(reduce_together(peers, specs[-1], deltas, [1, 1]))
    late = make_peers(1, tls=False, client_only=1)[0]  # a node that missed rounds 1 and 2
    caught_up = late.gather(specs[1])
    assert caught_up.missing_shards == []
    assert torch.equal(caught_up.mean, results[1][0].mean)
    assert torch.equal(caught_up.mean, torch.full((numel,), 1.5))
    forgotten = late.gather(specs[0])
    assert forgotten.missing_shards == [0, 1]
    assert all("NOT_FOUND" in (o.error or "") for o in forgotten.shards)
    # The byte counts of a forgotten round go with it (they grew every round before).
    assert peers[0].traffic(0) == {}
    assert peers[0].traffic(1) and peers[0].traffic(2)


def test_global_state_streams_to_a_joiner_with_its_hash(make_peers) -> None:
    host, joiner = make_peers(2)
    assert host.endpoint is not None
    with pytest.raises(ExchangeError, match="no global state"):
        joiner.fetch_state(host.endpoint)
    numel = CHUNK_BYTES // 2 + 77  # the safetensors file spans several chunks
    params = torch.randn(numel)
    momentum = torch.randn(numel)
    host.set_state(5, params, momentum)
    download = joiner.fetch_state(host.endpoint)
    assert download.round == 5
    assert torch.equal(download.params, params) and torch.equal(download.momentum, momentum)
    from starling.diloco import GlobalState

    assert download.fingerprint == GlobalState(params, momentum).fingerprint()


@pytest.mark.parametrize(
    "blob",
    [
        b"not a safetensors file",
        save_safetensors({"params": torch.zeros(8)}),  # no momentum
        save_safetensors({"params": torch.zeros(8), "momentum": torch.zeros(1)}),
        save_safetensors({"params": torch.zeros(2, 4), "momentum": torch.zeros(2, 4)}),
        save_safetensors({"params": torch.zeros(8).double(), "momentum": torch.zeros(8).double()}),
    ],
    ids=["garbage", "no-momentum", "short-momentum", "matrices", "float64"],
)
def test_a_malformed_global_state_from_a_peer_is_refused(make_peers, blob: bytes) -> None:
    """A peer serves whatever it likes, hash and fingerprint included: anything but two fp32
    vectors of one length is an ExchangeError, which the resyncing node skips, never a
    crash."""
    host, joiner = make_peers(2)
    assert host.endpoint is not None and host.owner is not None
    host._run(host.owner.set_state(3, blob, "0" * 64))
    with pytest.raises(ExchangeError, match="global state refused"):
        joiner.fetch_state(host.endpoint)


def test_plaintext_is_refused_off_loopback(make_peers) -> None:
    (client,) = make_peers(1, client_only=1)
    stranger = PeerEndpoint(Identity.generate().node_id, "192.0.2.1:4040", None)
    with pytest.raises(ExchangeError, match="no certificate fingerprint"):
        client.fetch_state(stranger)


def test_rate_limiter_paces_bytes_at_the_cap(monkeypatch) -> None:
    clock = [100.0]
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        clock[0] += seconds

    monkeypatch.setattr("starling.exchange.transport.time.monotonic", lambda: clock[0])
    monkeypatch.setattr("starling.exchange.transport.asyncio.sleep", fake_sleep)
    limiter = RateLimiter(8.0, burst_s=0.0)  # 8 Mbit/s = 1 MB/s

    async def send() -> None:
        for _ in range(10):
            await limiter.consume(250_000)

    asyncio.run(send())
    assert clock[0] - 100.0 == pytest.approx(2.5)  # 2.5 MB at 1 MB/s
    assert all(s == pytest.approx(0.25) for s in slept)
    clock[0] += 60.0  # a long idle spell earns no more than the burst allowance
    asyncio.run(send())
    assert clock[0] - 162.5 == pytest.approx(2.5)
    unlimited = RateLimiter(None)
    asyncio.run(unlimited.consume(10**12))
    with pytest.raises(ValueError, match="> 0"):
        RateLimiter(0)
    assert BandwidthLimits(10, 20).download_mbps == 20


# --- malformed and hostile streams against one owner ---------------------------------


class RawSender:
    """Hand-built PushContribution streams at an owner, bypassing the client."""

    def __init__(self, owner: ExchangePeer, spec: RoundSpec) -> None:
        assert owner.endpoint is not None
        self.spec = spec
        self.channel = grpc.insecure_channel(owner.endpoint.address)
        self.stub = peer_pb2_grpc.PeerStub(self.channel)

    def header(
        self, identity: Identity, payload: bytes, **overrides
    ) -> peer_pb2.ContributionHeader:
        spec = self.spec
        fields = {
            "run_id": spec.run_id,
            "round": spec.round,
            "sender": identity.node_id,
            "shard": 0,
            "codec_id": 1,
            "numel": spec.plan.size(0),
            "tokens": 100,
            "payload_bytes": len(payload),
            "payload_hash": payload_hash(payload),
        }
        fields.update(overrides)
        message = contribution_message(
            fields["run_id"], fields["round"], fields["sender"], fields["shard"],
            fields["codec_id"], fields["numel"], fields["tokens"], fields["payload_hash"],
        )  # fmt: skip
        return peer_pb2.ContributionHeader(signature=identity.sign(message), **fields)

    def push(self, messages: list[peer_pb2.ContributionChunk]) -> grpc.StatusCode:
        try:
            self.stub.PushContribution(iter(messages), timeout=20)
        except grpc.RpcError as err:
            return err.code()
        return grpc.StatusCode.OK

    def send(self, header: peer_pb2.ContributionHeader, data: list[bytes]) -> grpc.StatusCode:
        messages = [peer_pb2.ContributionChunk(header=header)]
        return self.push(messages + [peer_pb2.ContributionChunk(data=d) for d in data])


def one_owner_round(owner: ExchangePeer, numel: int, participants: list[Identity]) -> RawSender:
    """Opens round 7 (fp32, one shard of `numel` values, owned by `owner`) and returns a
    raw sender to it."""
    spec = RoundSpec(
        run_id=RUN,
        round=7,
        codec="fp32",
        plan=ShardPlan((0, numel)),
        owners=(owner.endpoint,),
        participants={i.node_id: i.public_key for i in participants},
        deadline=time.time() + 60,
        gather_timeout_s=10.0,
    )
    owner.open_round(spec)
    return RawSender(owner, spec)


def test_malformed_and_hostile_streams_get_precise_codes_and_never_touch_the_mean(
    make_peers,
) -> None:
    (owner,) = make_peers(1, tls=False)
    honest, mallory, outsider = Identity.generate(), Identity.generate(), Identity.generate()
    numel = 1000
    codec = make_codec("fp32")
    raw = one_owner_round(owner, numel, [honest, mallory])
    good = codec.encode(torch.randn(numel))
    bad = codec.encode(torch.full((numel,), 1e6))  # what mallory would love to slip in
    nan = bytearray(bad)
    nan[-4:] = bytes.fromhex("0000c07f")  # a NaN in the last value
    code = grpc.StatusCode
    cases = {
        "no header first": ([peer_pb2.ContributionChunk(data=bad)], code.INVALID_ARGUMENT),
        "empty stream": ([], code.INVALID_ARGUMENT),
        "a second header": (
            [peer_pb2.ContributionChunk(header=raw.header(mallory, bad))] * 2,
            code.INVALID_ARGUMENT,
        ),
    }
    for name, (messages, expected) in cases.items():
        assert raw.push(messages) == expected, name
    h = raw.header
    assert raw.send(h(mallory, bad, run_id="other-run"), [bad]) == code.FAILED_PRECONDITION
    assert raw.send(h(mallory, bad, round=8), [bad]) == code.UNAVAILABLE  # not open yet
    assert raw.send(h(mallory, bad, shard=1), [bad]) == code.NOT_FOUND  # wrong shard id
    assert raw.send(h(mallory, bad, shard=2**31), [bad]) == code.NOT_FOUND
    assert raw.send(h(outsider, bad), [bad]) == code.PERMISSION_DENIED
    assert raw.send(h(mallory, bad, codec_id=4), [bad]) == code.INVALID_ARGUMENT
    assert raw.send(h(mallory, bad, numel=numel + 1), [bad]) == code.INVALID_ARGUMENT
    assert raw.send(h(mallory, bad, tokens=0), [bad]) == code.INVALID_ARGUMENT
    assert raw.send(h(mallory, bad, tokens=1 << 40), [bad]) == code.INVALID_ARGUMENT
    assert raw.send(h(mallory, bad, payload_hash=b"x"), [bad]) == code.INVALID_ARGUMENT
    # Sizes: declared larger than the codec's, a stream longer or shorter than declared,
    # and one message beyond gRPC's limit.
    assert raw.send(h(mallory, bad, payload_bytes=10**12), [bad]) == code.RESOURCE_EXHAUSTED
    assert raw.send(h(mallory, bad, payload_bytes=100), [bad]) == code.INVALID_ARGUMENT
    assert raw.send(h(mallory, bad), [bad, b"x"]) == code.RESOURCE_EXHAUSTED
    assert raw.send(h(mallory, bad), [bad[:-1]]) == code.INVALID_ARGUMENT
    assert raw.send(h(mallory, bad), [bad + bytes(2 * CHUNK_BYTES)]) == code.RESOURCE_EXHAUSTED
    # Integrity and authenticity.
    assert raw.send(h(mallory, good), [bad]) == code.DATA_LOSS  # hash of other bytes
    assert raw.send(h(mallory, bytes(nan)), [bytes(nan)]) == code.INVALID_ARGUMENT  # NaN
    garbage = b"NOT" + bad[3:]
    assert raw.send(h(mallory, garbage), [garbage]) == code.INVALID_ARGUMENT  # bad magic
    forged = h(mallory, bad)
    forged.signature = honest.sign(b"something else")
    assert raw.send(forged, [bad]) == code.UNAUTHENTICATED
    unsigned = h(mallory, bad)
    unsigned.ClearField("signature")
    assert raw.send(unsigned, [bad]) == code.UNAUTHENTICATED
    impersonation = h(mallory, bad, sender=honest.node_id)  # signed by mallory as honest
    assert raw.send(impersonation, [bad]) == code.UNAUTHENTICATED

    # Once rejected, even a well-formed contribution from mallory stays out this round.
    assert raw.send(h(mallory, good), [good]) == code.PERMISSION_DENIED
    # The honest contribution goes in once; a replay is refused.
    assert raw.send(h(honest, good), [good[:700], good[700:]]) == code.OK
    assert raw.send(h(honest, good), [good]) == code.ALREADY_EXISTS
    owner.exclude(7, mallory.node_id, "sent only malformed streams")  # commit now

    mean = peer_pb2_grpc.PeerStub(raw.channel).FetchMean(
        peer_pb2.FetchMeanRequest(run_id=RUN, round=7, shard=0), timeout=20
    )
    messages = list(mean)
    header = messages[0].header
    payload = b"".join(m.data for m in messages[1:])
    assert [c.node_id for c in header.contributors] == [honest.node_id]
    # Mallory's first signed offence (the wrong codec) excluded it from the round.
    assert [(e.node_id, e.reason) for e in header.excluded] == [
        (mallory.node_id, f"rejected: codec 4, the run uses {codec.codec_id}")
    ]
    assert payload == codec.encode(codec.decode(good, numel))  # the mean of one = itself
    assert raw.send(h(mallory, bad), [bad]) == code.DEADLINE_EXCEEDED  # committed
    with pytest.raises(grpc.RpcError) as err:
        list(raw.stub.FetchMean(peer_pb2.FetchMeanRequest(run_id="x", round=7), timeout=5))
    assert err.value.code() == code.FAILED_PRECONDITION
    raw.channel.close()


def test_an_offence_after_a_withdrawal_is_still_recorded(make_peers) -> None:
    # A withdrawal (or a departure) excludes a participant as a fault; a malformed
    # payload it sends anyway is still an offence, the reason the commit records (and
    # what counts towards a ban): withdrawing cannot launder it.
    (owner,) = make_peers(1, tls=False)
    honest, mallory = Identity.generate(), Identity.generate()
    numel = 1000
    codec = make_codec("fp32")
    raw = one_owner_round(owner, numel, [honest, mallory])
    owner.exclude(7, mallory.node_id, "withdrew: training diverged")
    bad = codec.encode(torch.randn(numel))
    assert raw.send(raw.header(mallory, bad, codec_id=4), [bad]) == grpc.StatusCode.INVALID_ARGUMENT
    good = codec.encode(torch.randn(numel))
    assert raw.send(raw.header(honest, good), [good]) == grpc.StatusCode.OK  # the last awaited
    mean = peer_pb2_grpc.PeerStub(raw.channel).FetchMean(
        peer_pb2.FetchMeanRequest(run_id=RUN, round=7, shard=0), timeout=20
    )
    header = list(mean)[0].header
    assert [c.node_id for c in header.contributors] == [honest.node_id]
    assert [(e.node_id, e.reason) for e in header.excluded] == [
        (mallory.node_id, f"rejected: codec 4, the run uses {codec.codec_id}")
    ]
    raw.channel.close()


def test_a_copy_of_another_contribution_and_a_stale_one_are_rejected(make_peers) -> None:
    (owner,) = make_peers(1, tls=False)
    honest, copycat, other = Identity.generate(), Identity.generate(), Identity.generate()
    numel = 20_000
    codec = make_codec("fp32")
    raw = one_owner_round(owner, numel, [honest, copycat, other])
    original = codec.encode(payload_of(1, numel))
    code = grpc.StatusCode
    assert raw.send(raw.header(copycat, original, round=6), [original]) == code.NOT_FOUND  # stale
    assert raw.send(raw.header(honest, original), [original]) == code.OK
    # Signed by the copycat itself, so the signature verifies: only the bytes give it away.
    assert raw.send(raw.header(copycat, original), [original]) == code.OK
    stub = peer_pb2_grpc.PeerStub(raw.channel)

    def evidence_status(run_id: str = RUN, shard: int = 0) -> grpc.StatusCode:
        request = peer_pb2.FetchEvidenceRequest(run_id=run_id, round=7, shard=shard)
        try:
            list(stub.FetchEvidence(request, timeout=20))
        except grpc.RpcError as err:
            return err.code()
        return code.OK

    assert evidence_status() == code.FAILED_PRECONDITION  # the shard is still open
    mine = codec.encode(payload_of(2, numel))
    assert raw.send(raw.header(other, mine), [mine]) == code.OK  # the last one: commits
    assert evidence_status(run_id="another") == code.FAILED_PRECONDITION
    assert evidence_status(shard=1) == code.NOT_FOUND
    # What the coordinator audits: every signed contribution, in the owner's order, and
    # the owner's claim that the copycat offended holds up against them.
    assert owner.endpoint is not None
    evidence = owner.fetch_evidence(owner.endpoint, 7, 0, timeout=20)
    assert [e.header.sender for e in evidence] == [honest.node_id, copycat.node_id, other.node_id]
    assert [e.payload for e in evidence] == [original, original, mine]
    claims = {copycat.node_id: "rejected: a copy", other.node_id: "rejected: invented"}
    false = false_rejections(raw.spec, 0, evidence, claims, screening=True, direction=False)
    assert false == {other.node_id: "its contribution passes every check"}
    messages = list(
        peer_pb2_grpc.PeerStub(raw.channel).FetchMean(
            peer_pb2.FetchMeanRequest(run_id=RUN, round=7, shard=0), timeout=20
        )
    )
    header = messages[0].header
    assert sorted(c.node_id for c in header.contributors) == sorted([honest.node_id, other.node_id])
    assert [(e.node_id, e.reason) for e in header.excluded] == [
        (copycat.node_id, f"rejected: a copy of {honest.node_id}'s contribution")
    ]


def test_a_push_whose_status_was_lost_mid_stream_is_tried_again() -> None:
    """A server that answers while the client still writes its stream (an owner that
    had not opened the round) leaves the client with INTERNAL "Internal error from
    Core", not the owner's status: the push is retried like UNAVAILABLE. Any other
    INTERNAL is final."""
    from starling.exchange.client import ExchangeClient
    from starling.exchange.transport import TrafficLedger

    client = ExchangeClient(
        Identity.generate(), TrafficLedger(), RateLimiter(None), RateLimiter(None)
    )

    def failing(details: str, times: int):
        calls = []

        async def attempt() -> str:
            calls.append(1)
            if len(calls) <= times:
                raise grpc.aio.AioRpcError(
                    grpc.StatusCode.INTERNAL,
                    grpc.aio.Metadata(),
                    grpc.aio.Metadata(),
                    details=details,
                )
            return "pushed"

        return attempt, calls

    attempt, calls = failing("Internal error from Core", 2)
    assert asyncio.run(client._retry(time.time() + 10, "owner", attempt)) == "pushed"
    assert len(calls) == 3
    attempt, calls = failing("something else broke", 1)
    with pytest.raises(ExchangeError, match="INTERNAL"):
        asyncio.run(client._retry(time.time() + 10, "owner", attempt))
    assert len(calls) == 1

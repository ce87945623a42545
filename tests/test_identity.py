"""Identities, signatures and certificate pinning."""

from __future__ import annotations

import stat

import pytest

from starling.exchange import PeerConfig
from starling.exchange.peer import ExchangePeer
from starling.identity import (
    CertificatePinError,
    Identity,
    certificate_fingerprint,
    contribution_message,
    create_tls_certificate,
    fetch_pinned_certificate,
    mean_message,
    node_id_of,
    verify,
)


def test_node_id_derives_from_the_public_key() -> None:
    identity = Identity.generate()
    assert identity.node_id == node_id_of(identity.public_key)
    assert len(identity.node_id) == 32
    assert Identity.generate().node_id != identity.node_id
    with pytest.raises(ValueError, match="32 bytes"):
        node_id_of(b"short")


def test_signatures_verify_only_for_the_signed_message_and_key() -> None:
    alice, mallory = Identity.generate(), Identity.generate()
    message = contribution_message("run", 3, alice.node_id, 1, 4, 1000, 512, b"\x01" * 32)
    signature = alice.sign(message)
    assert verify(alice.public_key, message, signature)
    assert not verify(mallory.public_key, message, signature)
    for other in (
        contribution_message("run", 4, alice.node_id, 1, 4, 1000, 512, b"\x01" * 32),  # round
        contribution_message("run", 3, alice.node_id, 2, 4, 1000, 512, b"\x01" * 32),  # shard
        contribution_message("run", 3, alice.node_id, 1, 4, 1000, 513, b"\x01" * 32),  # tokens
        contribution_message("run2", 3, alice.node_id, 1, 4, 1000, 512, b"\x01" * 32),  # run
        contribution_message("run", 3, alice.node_id, 1, 4, 1000, 512, b"\x02" * 32),  # payload
    ):
        assert not verify(alice.public_key, other, signature)
    assert not verify(alice.public_key, message, bytes(64))
    assert not verify(alice.public_key, message, b"")


def test_signed_messages_of_different_kinds_or_splits_never_collide() -> None:
    mean = mean_message("run", 3, 1, 4, 1000, b"\x01" * 32, [])
    contribution = contribution_message("run", 3, "x", 1, 4, 1000, 0, b"\x01" * 32)
    assert mean != contribution
    # Length prefixes: moving a character between adjacent string fields changes the bytes.
    assert contribution_message("ab", 0, "c", 0, 0, 0, 0, b"") != contribution_message(
        "a", 0, "bc", 0, 0, 0, 0, b""
    )


def test_identity_is_created_private_and_then_reused(tmp_path) -> None:
    path = tmp_path / "id" / "node.key"
    first = Identity.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Identity.load_or_create(path).node_id == first.node_id
    path.write_text("not a key")
    with pytest.raises(ValueError):
        Identity.load_or_create(path)


def test_pinned_certificate_is_fetched_from_a_real_tls_server_and_mismatch_refused() -> None:
    tls = create_tls_certificate(["127.0.0.1"])
    with ExchangePeer(Identity.generate(), PeerConfig("run"), tls) as peer:
        assert peer.port is not None
        pem = fetch_pinned_certificate("127.0.0.1", peer.port, tls.fingerprint, timeout=10)
        assert certificate_fingerprint(pem) == tls.fingerprint
        other = create_tls_certificate(["127.0.0.1"]).fingerprint
        with pytest.raises(CertificatePinError, match="expected"):
            fetch_pinned_certificate("127.0.0.1", peer.port, other, timeout=10)


def test_a_client_pinned_to_another_certificate_cannot_reach_the_owner() -> None:
    from starling.exchange import ExchangeError
    from starling.exchange.plan import PeerEndpoint

    tls = create_tls_certificate(["127.0.0.1"])
    with (
        ExchangePeer(Identity.generate(), PeerConfig("run"), tls) as server,
        ExchangePeer(Identity.generate(), PeerConfig("run", reachable=False), None) as client,
    ):
        assert server.endpoint is not None
        wrong = create_tls_certificate(["127.0.0.1"]).fingerprint
        impostor = PeerEndpoint(server.endpoint.node_id, server.endpoint.address, wrong)
        with pytest.raises(ExchangeError):
            client.fetch_state(impostor)
        # The right pin gets through TLS to the service (which holds no state yet).
        with pytest.raises(ExchangeError, match="NOT_FOUND|no global state"):
            client.fetch_state(server.endpoint)

"""Identities, signatures and pinned TLS.

A node is an Ed25519 key pair; its id is derived from the public key, so nobody can
claim another's id. What a node signs is a canonical byte string with a domain label
(so a signature over one kind of message can never be replayed as another) and
length-prefixed fields (so no two field tuples share an encoding).

Transport security needs no CA: every server has a self-signed ECDSA P-256 certificate
(gRPC's TLS does not negotiate Ed25519 certificates) and clients know its SHA-256
fingerprint in advance (in the join URL, or from the coordinator). A client pins the
certificate it fetched and checked, so the gRPC handshake itself refuses any other.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import socket
import ssl
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from blake3 import blake3
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID

NODE_ID_BYTES = 16  # node id = first 16 bytes of SHA-256(public key), as 32 hex chars
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
# The name every Starling certificate carries and every client asks for: peers are
# identified by pinned fingerprints, not by DNS names, so one fixed name serves all.
TLS_SERVER_NAME = "starling.peer"


def node_id_of(public_key: bytes) -> str:
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise ValueError(f"an Ed25519 public key has 32 bytes, got {len(public_key)}")
    return hashlib.sha256(public_key).digest()[:NODE_ID_BYTES].hex()


@dataclass(frozen=True)
class Identity:
    """A node's Ed25519 key pair."""

    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: Path) -> Identity:
        """The key at `path` (PKCS#8 PEM), created with mode 0600 the first time."""
        if path.exists():
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError(f"{path} does not hold an Ed25519 private key")
            return cls(key)
        identity = cls.generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = identity.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        return identity

    @property
    def public_key(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def node_id(self) -> str:
        return node_id_of(self.public_key)

    def sign(self, message: bytes) -> bytes:
        return self.private_key.sign(message)


def payload_hasher() -> blake3:
    """The hash of contribution and mean payloads (BLAKE3-256): an incremental hasher."""
    return blake3(max_threads=1)  # the cores are busy with the exchange itself


def payload_hash(payload: bytes | bytearray | memoryview) -> bytes:
    return blake3(payload).digest()


def verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except InvalidSignature:
        return False
    return True


def _canonical(label: str, fields: Iterable[str | int | bytes]) -> bytes:
    """label NUL, then each field as a type tag and a length-prefixed value."""
    out = [label.encode(), b"\0"]
    for field in fields:
        if isinstance(field, bool):  # bool is an int subclass; never a protocol field
            raise TypeError("booleans are not signed fields")
        if isinstance(field, int):
            out.append(b"i" + struct.pack("<Q", field))
        else:
            raw = field.encode() if isinstance(field, str) else field
            out.append((b"s" if isinstance(field, str) else b"b") + struct.pack("<I", len(raw)))
            out.append(raw)
    return b"".join(out)


def contribution_message(
    run_id: str,
    round_: int,
    sender: str,
    shard: int,
    codec_id: int,
    numel: int,
    tokens: int,
    payload_hash: bytes,
) -> bytes:
    """What a contributor signs: binds its payload to one run, round, shard and weight,
    so it cannot be replayed into another round or shard, nor reweighted."""
    fields = (run_id, round_, sender, shard, codec_id, numel, tokens, payload_hash)
    return _canonical("starling/contribution/v1", fields)


def request_message(
    method: str,
    run_id: str,
    round_: int,
    node_id: str,
    timestamp_ms: int,
    nonce: bytes,
    body_sha256: bytes,
) -> bytes:
    """What a node signs on every coordinator request: the method (a signature for one
    method is useless for another), the run, the round it knows, itself, when, a nonce
    (so a copy is a detectable replay) and the SHA-256 of the request's bytes."""
    fields = (method, run_id, round_, node_id, timestamp_ms, nonce, body_sha256)
    return _canonical("starling/request/v1", fields)


def mean_message(
    run_id: str,
    round_: int,
    shard: int,
    codec_id: int,
    numel: int,
    payload_hash: bytes,
    contributors: Sequence[tuple[str, int, bytes]],
) -> bytes:
    """What a shard owner signs: its committed mean and exactly whose contributions
    (node id, tokens, payload hash) it averaged."""
    fields: list[str | int | bytes] = [run_id, round_, shard, codec_id, numel, payload_hash]
    fields.append(len(contributors))
    for node_id, tokens, sha in contributors:
        fields.extend((node_id, tokens, sha))
    return _canonical("starling/mean/v1", fields)


# --- TLS --------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsCertificate:
    """A server's self-signed certificate and key (PEM)."""

    cert_pem: bytes
    key_pem: bytes

    @property
    def fingerprint(self) -> str:
        return certificate_fingerprint(self.cert_pem)

    def save(self, cert_path: Path, key_path: Path) -> None:
        cert_path.write_bytes(self.cert_pem)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self.key_pem)

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> TlsCertificate:
        return cls(cert_path.read_bytes(), key_path.read_bytes())


def create_tls_certificate(hosts: Sequence[str] = (), days: int = 3650) -> TlsCertificate:
    """A self-signed ECDSA P-256 certificate for TLS_SERVER_NAME plus `hosts` (names or
    IP addresses), valid from an hour ago (clock skew) for `days`."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, TLS_SERVER_NAME)])
    alt_names: list[x509.GeneralName] = [x509.DNSName(TLS_SERVER_NAME)]
    for host in hosts:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt_names.append(x509.DNSName(host))
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        # Self-signed and pinned: it is its own trust anchor, hence ca=True.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return TlsCertificate(cert.public_bytes(serialization.Encoding.PEM), key_pem)


def certificate_fingerprint(cert_pem_or_der: bytes) -> str:
    """'sha256:<hex>' of the certificate's DER encoding."""
    der = cert_pem_or_der
    if cert_pem_or_der.lstrip().startswith(b"-----BEGIN"):
        der = ssl.PEM_cert_to_DER_cert(cert_pem_or_der.decode())
    return "sha256:" + hashlib.sha256(der).hexdigest()


class CertificatePinError(ConnectionError):
    """The server presented a certificate other than the pinned one."""


def fetch_pinned_certificate(host: str, port: int, fingerprint: str, timeout: float) -> bytes:
    """Fetches the server's certificate with a bare TLS handshake, checks it against the
    fingerprint known in advance, and returns it as PEM, to be the gRPC channel's only
    trusted root (so the real connection is refused if the server changes)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # trust comes from the fingerprint, checked below
    context.set_alpn_protocols(["h2"])  # gRPC servers refuse handshakes without h2
    with socket.create_connection((host, port), timeout=timeout) as sock:
        with context.wrap_socket(sock, server_hostname=TLS_SERVER_NAME) as tls:
            der = tls.getpeercert(binary_form=True)
    if der is None:
        raise CertificatePinError(f"{host}:{port} presented no certificate")
    got = certificate_fingerprint(der)
    if got != fingerprint:
        raise CertificatePinError(
            f"{host}:{port} presented certificate {got}, expected {fingerprint}"
        )
    return ssl.DER_cert_to_PEM_cert(der).encode()

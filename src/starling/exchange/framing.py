"""The data path of the peer protocol's streams, without protobuf's copies.

Every chunk message of peer.proto (ContributionChunk, MeanChunk, StateChunk) is a
oneof of a header (field 1) or `bytes data = 2`. Hundreds of megabytes a round travel as
data chunks, and building, serializing, parsing and reading a protobuf message copies
each byte four times. So data chunks are written straight in protobuf's wire format
(tag 0x12, varint length, bytes: exactly what protobuf would emit) with one copy, and
read as a memoryview into the received bytes with none. Anything that is not a single
canonical data field (headers, or another encoder's legal variations) goes through the
real protobuf parser, so any conforming client interoperates.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from starling.serving import RequestThrottle, guarded
from starling.v1 import peer_pb2

DATA_TAG = 0x12  # field number 2, wire type 2 (length-delimited)
PEER_SERVICE = "starling.v1.Peer"

M = TypeVar("M", peer_pb2.ContributionChunk, peer_pb2.MeanChunk, peer_pb2.StateChunk)


def varint(value: int) -> bytes:
    """Protobuf's base-128 varint encoding of a non-negative integer."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def length_delimited(field_number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field (wire type 2) holding `payload`: appending it
    to a serialized message sets that field (used to place a signature or header)."""
    return varint((field_number << 3) | 2) + varint(len(payload)) + payload


def data_message(piece: bytes | memoryview) -> bytes:
    """A serialized chunk message holding `piece` as its data (one copy)."""
    return b"".join((bytes((DATA_TAG,)), varint(len(piece)), piece))


def data_messages(payload: bytes | bytearray | memoryview, chunk_bytes: int) -> list[bytes]:
    """The payload as serialized data messages of at most `chunk_bytes` each."""
    view = memoryview(payload)
    return [data_message(view[i : i + chunk_bytes]) for i in range(0, len(view), chunk_bytes)]


def data_message_size(n: int) -> int:
    """Serialized size of a data chunk message carrying n bytes."""
    return 1 + len(varint(n)) + n


def stream_messages(header: Any, payload: bytes | bytearray, chunk_bytes: int) -> list[bytes]:
    """A whole header-then-chunks stream, serialized once (served to many fetchers)."""
    return [header.SerializeToString(), *data_messages(payload, chunk_bytes)]


def unpack(item: M | memoryview) -> tuple[M | None, memoryview | None, int]:
    """A received chunk as (header message or None, data or None, serialized size)."""
    if isinstance(item, memoryview):
        return None, item, data_message_size(len(item))
    if item.WhichOneof("kind") == "data":
        return None, memoryview(item.data), item.ByteSize()
    return item, None, item.ByteSize()


def split_data(raw: bytes) -> memoryview | None:
    """The data of a serialized chunk message that is exactly one data field, as a view
    (no copy); None for anything else (a header, or a non-canonical encoding)."""
    if len(raw) < 2 or raw[0] != DATA_TAG:
        return None
    length, shift, offset = 0, 0, 1
    while offset < len(raw) and shift < 64:
        byte = raw[offset]
        length |= (byte & 0x7F) << shift
        offset += 1
        if not byte & 0x80:
            return memoryview(raw)[offset:] if offset + length == len(raw) else None
        shift += 7
    return None


def parser(message_type: type[M]) -> Callable[[bytes], M | memoryview]:
    """A deserializer yielding a memoryview for data chunks, the message otherwise."""

    def parse(raw: bytes) -> M | memoryview:
        data = split_data(raw)
        return data if data is not None else message_type.FromString(raw)

    return parse


def serialize(item: Any) -> bytes:
    """A serializer for streams of pre-serialized bytes mixed with messages."""
    return item if isinstance(item, bytes) else item.SerializeToString()


def add_peer_service(
    servicer: Any, server: grpc.aio.Server, throttle: RequestThrottle | None = None
) -> None:
    """Registers the Peer service like the generated add_PeerServicer_to_server, but
    with the data-path (de)serializers above, behind starling.serving's guard
    (malformed requests answered INVALID_ARGUMENT; the throttle, if any, in front)."""
    handlers = {
        "PushContribution": grpc.stream_unary_rpc_method_handler(
            servicer.PushContribution,
            request_deserializer=parser(peer_pb2.ContributionChunk),
            response_serializer=peer_pb2.PushReceipt.SerializeToString,
        ),
        "FetchMean": grpc.unary_stream_rpc_method_handler(
            servicer.FetchMean,
            request_deserializer=peer_pb2.FetchMeanRequest.FromString,
            response_serializer=serialize,
        ),
        "FetchState": grpc.unary_stream_rpc_method_handler(
            servicer.FetchState,
            request_deserializer=peer_pb2.FetchStateRequest.FromString,
            response_serializer=serialize,
        ),
        "FetchEvidence": grpc.unary_stream_rpc_method_handler(
            servicer.FetchEvidence,
            request_deserializer=peer_pb2.FetchEvidenceRequest.FromString,
            response_serializer=serialize,
        ),
    }
    # The global state is a whole-model download: a node asks for it once when it
    # joins or falls behind; evidence is every contribution to a shard.
    costs = {"FetchState": 10.0, "FetchEvidence": 10.0}
    generic = grpc.method_handlers_generic_handler(PEER_SERVICE, guarded(handlers, throttle, costs))
    server.add_generic_rpc_handlers((generic,))


class PeerCalls:
    """The Peer service's client calls on one channel, with the data-path serializers."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.push_contribution = channel.stream_unary(
            f"/{PEER_SERVICE}/PushContribution",
            request_serializer=serialize,
            response_deserializer=peer_pb2.PushReceipt.FromString,
        )
        self.fetch_mean = channel.unary_stream(
            f"/{PEER_SERVICE}/FetchMean",
            request_serializer=peer_pb2.FetchMeanRequest.SerializeToString,
            response_deserializer=parser(peer_pb2.MeanChunk),
        )
        self.fetch_state = channel.unary_stream(
            f"/{PEER_SERVICE}/FetchState",
            request_serializer=peer_pb2.FetchStateRequest.SerializeToString,
            response_deserializer=parser(peer_pb2.StateChunk),
        )
        self.fetch_evidence = channel.unary_stream(
            f"/{PEER_SERVICE}/FetchEvidence",
            request_serializer=peer_pb2.FetchEvidenceRequest.SerializeToString,
            response_deserializer=parser(peer_pb2.ContributionChunk),
        )

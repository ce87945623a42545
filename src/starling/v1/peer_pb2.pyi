from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ContributionHeader(_message.Message):
    __slots__ = ("run_id", "round", "sender", "shard", "codec_id", "numel", "tokens", "payload_bytes", "payload_hash", "signature")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    CODEC_ID_FIELD_NUMBER: _ClassVar[int]
    NUMEL_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_HASH_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    sender: str
    shard: int
    codec_id: int
    numel: int
    tokens: int
    payload_bytes: int
    payload_hash: bytes
    signature: bytes
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., sender: _Optional[str] = ..., shard: _Optional[int] = ..., codec_id: _Optional[int] = ..., numel: _Optional[int] = ..., tokens: _Optional[int] = ..., payload_bytes: _Optional[int] = ..., payload_hash: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class ContributionChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: ContributionHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[ContributionHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PushReceipt(_message.Message):
    __slots__ = ("bytes_received", "contributions")
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    bytes_received: int
    contributions: int
    def __init__(self, bytes_received: _Optional[int] = ..., contributions: _Optional[int] = ...) -> None: ...

class FetchEvidenceRequest(_message.Message):
    __slots__ = ("run_id", "round", "shard")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    shard: int
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., shard: _Optional[int] = ...) -> None: ...

class FetchMeanRequest(_message.Message):
    __slots__ = ("run_id", "round", "shard", "requester")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    shard: int
    requester: str
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., shard: _Optional[int] = ..., requester: _Optional[str] = ...) -> None: ...

class Contributor(_message.Message):
    __slots__ = ("node_id", "tokens", "payload_hash")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_HASH_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    tokens: int
    payload_hash: bytes
    def __init__(self, node_id: _Optional[str] = ..., tokens: _Optional[int] = ..., payload_hash: _Optional[bytes] = ...) -> None: ...

class Exclusion(_message.Message):
    __slots__ = ("node_id", "reason")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    reason: str
    def __init__(self, node_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class MeanHeader(_message.Message):
    __slots__ = ("run_id", "round", "shard", "codec_id", "numel", "payload_bytes", "payload_hash", "contributors", "excluded", "owner", "owner_signature")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    CODEC_ID_FIELD_NUMBER: _ClassVar[int]
    NUMEL_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_HASH_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTORS_FIELD_NUMBER: _ClassVar[int]
    EXCLUDED_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    OWNER_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    shard: int
    codec_id: int
    numel: int
    payload_bytes: int
    payload_hash: bytes
    contributors: _containers.RepeatedCompositeFieldContainer[Contributor]
    excluded: _containers.RepeatedCompositeFieldContainer[Exclusion]
    owner: str
    owner_signature: bytes
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., shard: _Optional[int] = ..., codec_id: _Optional[int] = ..., numel: _Optional[int] = ..., payload_bytes: _Optional[int] = ..., payload_hash: _Optional[bytes] = ..., contributors: _Optional[_Iterable[_Union[Contributor, _Mapping]]] = ..., excluded: _Optional[_Iterable[_Union[Exclusion, _Mapping]]] = ..., owner: _Optional[str] = ..., owner_signature: _Optional[bytes] = ...) -> None: ...

class MeanChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: MeanHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[MeanHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class FetchStateRequest(_message.Message):
    __slots__ = ("run_id", "requester")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    requester: str
    def __init__(self, run_id: _Optional[str] = ..., requester: _Optional[str] = ...) -> None: ...

class StateHeader(_message.Message):
    __slots__ = ("run_id", "round", "total_bytes", "sha256", "fingerprint")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    total_bytes: int
    sha256: bytes
    fingerprint: str
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[bytes] = ..., fingerprint: _Optional[str] = ...) -> None: ...

class StateChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: StateHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[StateHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

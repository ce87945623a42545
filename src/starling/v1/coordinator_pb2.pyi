from starling.v1 import peer_pb2 as _peer_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Auth(_message.Message):
    __slots__ = ("node_id", "round", "timestamp_ms", "nonce", "signature")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    round: int
    timestamp_ms: int
    nonce: bytes
    signature: bytes
    def __init__(self, node_id: _Optional[str] = ..., round: _Optional[int] = ..., timestamp_ms: _Optional[int] = ..., nonce: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class Capabilities(_message.Message):
    __slots__ = ("device", "memory_bytes", "upload_mbps", "download_mbps", "software")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_MBPS_FIELD_NUMBER: _ClassVar[int]
    DOWNLOAD_MBPS_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_FIELD_NUMBER: _ClassVar[int]
    device: str
    memory_bytes: int
    upload_mbps: float
    download_mbps: float
    software: str
    def __init__(self, device: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., upload_mbps: _Optional[float] = ..., download_mbps: _Optional[float] = ..., software: _Optional[str] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("public_key", "capabilities", "advertise_address", "cert_fingerprint", "join_token", "auth")
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    ADVERTISE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CERT_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    JOIN_TOKEN_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    public_key: bytes
    capabilities: Capabilities
    advertise_address: str
    cert_fingerprint: str
    join_token: str
    auth: Auth
    def __init__(self, public_key: _Optional[bytes] = ..., capabilities: _Optional[_Union[Capabilities, _Mapping]] = ..., advertise_address: _Optional[str] = ..., cert_fingerprint: _Optional[str] = ..., join_token: _Optional[str] = ..., auth: _Optional[_Union[Auth, _Mapping]] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("node_id", "reachable", "reachability_detail", "heartbeat_interval_s", "lease_s", "run")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REACHABLE_FIELD_NUMBER: _ClassVar[int]
    REACHABILITY_DETAIL_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    reachable: bool
    reachability_detail: str
    heartbeat_interval_s: float
    lease_s: float
    run: RunInfo
    def __init__(self, node_id: _Optional[str] = ..., reachable: _Optional[bool] = ..., reachability_detail: _Optional[str] = ..., heartbeat_interval_s: _Optional[float] = ..., lease_s: _Optional[float] = ..., run: _Optional[_Union[RunInfo, _Mapping]] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("phase", "state_round", "auth")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    STATE_ROUND_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    phase: str
    state_round: int
    auth: Auth
    def __init__(self, phase: _Optional[str] = ..., state_round: _Optional[int] = ..., auth: _Optional[_Union[Auth, _Mapping]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("lease_s", "round", "round_phase", "resync")
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ROUND_PHASE_FIELD_NUMBER: _ClassVar[int]
    RESYNC_FIELD_NUMBER: _ClassVar[int]
    lease_s: float
    round: int
    round_phase: str
    resync: bool
    def __init__(self, lease_s: _Optional[float] = ..., round: _Optional[int] = ..., round_phase: _Optional[str] = ..., resync: _Optional[bool] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("reason", "auth")
    REASON_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    reason: str
    auth: Auth
    def __init__(self, reason: _Optional[str] = ..., auth: _Optional[_Union[Auth, _Mapping]] = ...) -> None: ...

class LeaveResponse(_message.Message):
    __slots__ = ("tokens_trained",)
    TOKENS_TRAINED_FIELD_NUMBER: _ClassVar[int]
    tokens_trained: int
    def __init__(self, tokens_trained: _Optional[int] = ...) -> None: ...

class GetRunRequest(_message.Message):
    __slots__ = ("unused",)
    UNUSED_FIELD_NUMBER: _ClassVar[int]
    unused: str
    def __init__(self, unused: _Optional[str] = ...) -> None: ...

class RunInfo(_message.Message):
    __slots__ = ("run_id", "name", "config_toml", "manifest_json", "tokenizer_sha256", "latest_checkpoint", "numel", "coordinator_node_id", "coordinator_public_key")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONFIG_TOML_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_SHA256_FIELD_NUMBER: _ClassVar[int]
    LATEST_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    NUMEL_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    name: str
    config_toml: str
    manifest_json: str
    tokenizer_sha256: str
    latest_checkpoint: CheckpointInfo
    numel: int
    coordinator_node_id: str
    coordinator_public_key: bytes
    def __init__(self, run_id: _Optional[str] = ..., name: _Optional[str] = ..., config_toml: _Optional[str] = ..., manifest_json: _Optional[str] = ..., tokenizer_sha256: _Optional[str] = ..., latest_checkpoint: _Optional[_Union[CheckpointInfo, _Mapping]] = ..., numel: _Optional[int] = ..., coordinator_node_id: _Optional[str] = ..., coordinator_public_key: _Optional[bytes] = ...) -> None: ...

class FetchFileRequest(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class FileHeader(_message.Message):
    __slots__ = ("path", "size", "sha256")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    path: str
    size: int
    sha256: str
    def __init__(self, path: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: FileHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[FileHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class AcquireLeaseRequest(_message.Message):
    __slots__ = ("finished", "auth")
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    finished: str
    auth: Auth
    def __init__(self, finished: _Optional[str] = ..., auth: _Optional[_Union[Auth, _Mapping]] = ...) -> None: ...

class DataLease(_message.Message):
    __slots__ = ("file", "tokens", "sha256", "lease_s", "tokens_trained")
    FILE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    TOKENS_TRAINED_FIELD_NUMBER: _ClassVar[int]
    file: str
    tokens: int
    sha256: str
    lease_s: float
    tokens_trained: int
    def __init__(self, file: _Optional[str] = ..., tokens: _Optional[int] = ..., sha256: _Optional[str] = ..., lease_s: _Optional[float] = ..., tokens_trained: _Optional[int] = ...) -> None: ...

class ReportTokensRequest(_message.Message):
    __slots__ = ("round", "file", "tokens", "done", "auth")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    round: int
    file: str
    tokens: int
    done: bool
    auth: Auth
    def __init__(self, round: _Optional[int] = ..., file: _Optional[str] = ..., tokens: _Optional[int] = ..., done: _Optional[bool] = ..., auth: _Optional[_Union[Auth, _Mapping]] = ...) -> None: ...

class ReportTokensResponse(_message.Message):
    __slots__ = ("round_tokens", "round_budget", "closed")
    ROUND_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ROUND_BUDGET_FIELD_NUMBER: _ClassVar[int]
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    round_tokens: int
    round_budget: int
    closed: bool
    def __init__(self, round_tokens: _Optional[int] = ..., round_budget: _Optional[int] = ..., closed: _Optional[bool] = ...) -> None: ...

class GetRoundRequest(_message.Message):
    __slots__ = ("round", "current", "known_version", "wait_s", "auth")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    KNOWN_VERSION_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    round: int
    current: bool
    known_version: int
    wait_s: float
    auth: Auth
    def __init__(self, round: _Optional[int] = ..., current: _Optional[bool] = ..., known_version: _Optional[int] = ..., wait_s: _Optional[float] = ..., auth: _Optional[_Union[Auth, _Mapping]] = ...) -> None: ...

class PeerInfo(_message.Message):
    __slots__ = ("node_id", "address", "cert_fingerprint", "public_key")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CERT_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    cert_fingerprint: str
    public_key: bytes
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., cert_fingerprint: _Optional[str] = ..., public_key: _Optional[bytes] = ...) -> None: ...

class ExchangePlan(_message.Message):
    __slots__ = ("codec", "bounds", "owners", "participants", "deadline_unix", "reassigned", "gather_timeout_s", "verifiers", "gone", "withdrawn")
    CODEC_FIELD_NUMBER: _ClassVar[int]
    BOUNDS_FIELD_NUMBER: _ClassVar[int]
    OWNERS_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_FIELD_NUMBER: _ClassVar[int]
    REASSIGNED_FIELD_NUMBER: _ClassVar[int]
    GATHER_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    VERIFIERS_FIELD_NUMBER: _ClassVar[int]
    GONE_FIELD_NUMBER: _ClassVar[int]
    WITHDRAWN_FIELD_NUMBER: _ClassVar[int]
    codec: str
    bounds: _containers.RepeatedScalarFieldContainer[int]
    owners: _containers.RepeatedCompositeFieldContainer[PeerInfo]
    participants: _containers.RepeatedCompositeFieldContainer[PeerInfo]
    deadline_unix: float
    reassigned: _containers.RepeatedScalarFieldContainer[int]
    gather_timeout_s: float
    verifiers: _containers.RepeatedCompositeFieldContainer[PeerInfo]
    gone: _containers.RepeatedScalarFieldContainer[str]
    withdrawn: _containers.RepeatedCompositeFieldContainer[_peer_pb2.Exclusion]
    def __init__(self, codec: _Optional[str] = ..., bounds: _Optional[_Iterable[int]] = ..., owners: _Optional[_Iterable[_Union[PeerInfo, _Mapping]]] = ..., participants: _Optional[_Iterable[_Union[PeerInfo, _Mapping]]] = ..., deadline_unix: _Optional[float] = ..., reassigned: _Optional[_Iterable[int]] = ..., gather_timeout_s: _Optional[float] = ..., verifiers: _Optional[_Iterable[_Union[PeerInfo, _Mapping]]] = ..., gone: _Optional[_Iterable[str]] = ..., withdrawn: _Optional[_Iterable[_Union[_peer_pb2.Exclusion, _Mapping]]] = ...) -> None: ...

class ShardCommit(_message.Message):
    __slots__ = ("shard", "owner", "status", "detail", "held", "verifier", "mean_hash", "mean_status")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    VERIFIER_FIELD_NUMBER: _ClassVar[int]
    MEAN_HASH_FIELD_NUMBER: _ClassVar[int]
    MEAN_STATUS_FIELD_NUMBER: _ClassVar[int]
    shard: int
    owner: str
    status: str
    detail: str
    held: _containers.RepeatedCompositeFieldContainer[_peer_pb2.Contributor]
    verifier: str
    mean_hash: bytes
    mean_status: str
    def __init__(self, shard: _Optional[int] = ..., owner: _Optional[str] = ..., status: _Optional[str] = ..., detail: _Optional[str] = ..., held: _Optional[_Iterable[_Union[_peer_pb2.Contributor, _Mapping]]] = ..., verifier: _Optional[str] = ..., mean_hash: _Optional[bytes] = ..., mean_status: _Optional[str] = ...) -> None: ...

class Commit(_message.Message):
    __slots__ = ("round", "contributors", "tokens", "bytes", "duration_s", "fingerprint", "shards", "excluded", "committed_unix")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTORS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    EXCLUDED_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_UNIX_FIELD_NUMBER: _ClassVar[int]
    round: int
    contributors: _containers.RepeatedCompositeFieldContainer[_peer_pb2.Contributor]
    tokens: int
    bytes: int
    duration_s: float
    fingerprint: str
    shards: _containers.RepeatedCompositeFieldContainer[ShardCommit]
    excluded: _containers.RepeatedCompositeFieldContainer[_peer_pb2.Exclusion]
    committed_unix: float
    def __init__(self, round: _Optional[int] = ..., contributors: _Optional[_Iterable[_Union[_peer_pb2.Contributor, _Mapping]]] = ..., tokens: _Optional[int] = ..., bytes: _Optional[int] = ..., duration_s: _Optional[float] = ..., fingerprint: _Optional[str] = ..., shards: _Optional[_Iterable[_Union[ShardCommit, _Mapping]]] = ..., excluded: _Optional[_Iterable[_Union[_peer_pb2.Exclusion, _Mapping]]] = ..., committed_unix: _Optional[float] = ...) -> None: ...

class RoundState(_message.Message):
    __slots__ = ("round", "phase", "version", "deadline_unix", "budget", "tokens", "plan", "commit", "checkpoint_due")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_DUE_FIELD_NUMBER: _ClassVar[int]
    round: int
    phase: str
    version: int
    deadline_unix: float
    budget: int
    tokens: int
    plan: ExchangePlan
    commit: Commit
    checkpoint_due: bool
    def __init__(self, round: _Optional[int] = ..., phase: _Optional[str] = ..., version: _Optional[int] = ..., deadline_unix: _Optional[float] = ..., budget: _Optional[int] = ..., tokens: _Optional[int] = ..., plan: _Optional[_Union[ExchangePlan, _Mapping]] = ..., commit: _Optional[_Union[Commit, _Mapping]] = ..., checkpoint_due: _Optional[bool] = ...) -> None: ...

class ReportShardRequest(_message.Message):
    __slots__ = ("round", "shard", "held", "excluded", "gram", "auth")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    EXCLUDED_FIELD_NUMBER: _ClassVar[int]
    GRAM_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    round: int
    shard: int
    held: _containers.RepeatedCompositeFieldContainer[_peer_pb2.Contributor]
    excluded: _containers.RepeatedCompositeFieldContainer[_peer_pb2.Exclusion]
    gram: _containers.RepeatedScalarFieldContainer[float]
    auth: Auth
    def __init__(self, round: _Optional[int] = ..., shard: _Optional[int] = ..., held: _Optional[_Iterable[_Union[_peer_pb2.Contributor, _Mapping]]] = ..., excluded: _Optional[_Iterable[_Union[_peer_pb2.Exclusion, _Mapping]]] = ..., gram: _Optional[_Iterable[float]] = ..., auth: _Optional[_Union[Auth, _Mapping]] = ...) -> None: ...

class ReportMeanRequest(_message.Message):
    __slots__ = ("round", "shard", "header", "auth")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    round: int
    shard: int
    header: _peer_pb2.MeanHeader
    auth: Auth
    def __init__(self, round: _Optional[int] = ..., shard: _Optional[int] = ..., header: _Optional[_Union[_peer_pb2.MeanHeader, _Mapping]] = ..., auth: _Optional[_Union[Auth, _Mapping]] = ...) -> None: ...

class ReportMeanResponse(_message.Message):
    __slots__ = ("settled",)
    SETTLED_FIELD_NUMBER: _ClassVar[int]
    settled: bool
    def __init__(self, settled: _Optional[bool] = ...) -> None: ...

class ReportShardResponse(_message.Message):
    __slots__ = ("decided",)
    DECIDED_FIELD_NUMBER: _ClassVar[int]
    decided: bool
    def __init__(self, decided: _Optional[bool] = ...) -> None: ...

class ReportExchangeRequest(_message.Message):
    __slots__ = ("round", "bytes_sent", "bytes_received", "exchange_s", "failed_owners", "auth")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    EXCHANGE_S_FIELD_NUMBER: _ClassVar[int]
    FAILED_OWNERS_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    round: int
    bytes_sent: int
    bytes_received: int
    exchange_s: float
    failed_owners: _containers.RepeatedScalarFieldContainer[str]
    auth: Auth
    def __init__(self, round: _Optional[int] = ..., bytes_sent: _Optional[int] = ..., bytes_received: _Optional[int] = ..., exchange_s: _Optional[float] = ..., failed_owners: _Optional[_Iterable[str]] = ..., auth: _Optional[_Union[Auth, _Mapping]] = ...) -> None: ...

class ReportExchangeResponse(_message.Message):
    __slots__ = ("ok",)
    OK_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    def __init__(self, ok: _Optional[bool] = ...) -> None: ...

class WithdrawRequest(_message.Message):
    __slots__ = ("round", "reason", "auth")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    round: int
    reason: str
    auth: Auth
    def __init__(self, round: _Optional[int] = ..., reason: _Optional[str] = ..., auth: _Optional[_Union[Auth, _Mapping]] = ...) -> None: ...

class WithdrawResponse(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class ReportFingerprintRequest(_message.Message):
    __slots__ = ("round", "fingerprint", "auth")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    round: int
    fingerprint: str
    auth: Auth
    def __init__(self, round: _Optional[int] = ..., fingerprint: _Optional[str] = ..., auth: _Optional[_Union[Auth, _Mapping]] = ...) -> None: ...

class ReportFingerprintResponse(_message.Message):
    __slots__ = ("expected", "resync", "previous_expected")
    EXPECTED_FIELD_NUMBER: _ClassVar[int]
    RESYNC_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_EXPECTED_FIELD_NUMBER: _ClassVar[int]
    expected: str
    resync: bool
    previous_expected: str
    def __init__(self, expected: _Optional[str] = ..., resync: _Optional[bool] = ..., previous_expected: _Optional[str] = ...) -> None: ...

class ReportProgressRequest(_message.Message):
    __slots__ = ("round", "loss", "tokens_per_s", "bytes_sent", "bytes_received", "utilization", "train_loss", "round_tokens", "auth")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    ROUND_TOKENS_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    round: int
    loss: float
    tokens_per_s: float
    bytes_sent: int
    bytes_received: int
    utilization: float
    train_loss: float
    round_tokens: int
    auth: Auth
    def __init__(self, round: _Optional[int] = ..., loss: _Optional[float] = ..., tokens_per_s: _Optional[float] = ..., bytes_sent: _Optional[int] = ..., bytes_received: _Optional[int] = ..., utilization: _Optional[float] = ..., train_loss: _Optional[float] = ..., round_tokens: _Optional[int] = ..., auth: _Optional[_Union[Auth, _Mapping]] = ...) -> None: ...

class ReportProgressResponse(_message.Message):
    __slots__ = ("ok",)
    OK_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    def __init__(self, ok: _Optional[bool] = ...) -> None: ...

class CheckpointHeader(_message.Message):
    __slots__ = ("round", "size", "sha256", "fingerprint", "auth")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    round: int
    size: int
    sha256: str
    fingerprint: str
    auth: Auth
    def __init__(self, round: _Optional[int] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ..., fingerprint: _Optional[str] = ..., auth: _Optional[_Union[Auth, _Mapping]] = ...) -> None: ...

class CheckpointChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: CheckpointHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[CheckpointHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class CheckpointInfo(_message.Message):
    __slots__ = ("round", "sha256", "size", "fingerprint", "created_unix")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    round: int
    sha256: str
    size: int
    fingerprint: str
    created_unix: float
    def __init__(self, round: _Optional[int] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ..., fingerprint: _Optional[str] = ..., created_unix: _Optional[float] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ("unused",)
    UNUSED_FIELD_NUMBER: _ClassVar[int]
    unused: str
    def __init__(self, unused: _Optional[str] = ...) -> None: ...

class PeerStatus(_message.Message):
    __slots__ = ("node_id", "device", "reachable", "state", "last_seen_s", "rounds_contributed", "tokens_trained", "resync")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    REACHABLE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_S_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_CONTRIBUTED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_TRAINED_FIELD_NUMBER: _ClassVar[int]
    RESYNC_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    device: str
    reachable: bool
    state: str
    last_seen_s: float
    rounds_contributed: int
    tokens_trained: int
    resync: bool
    def __init__(self, node_id: _Optional[str] = ..., device: _Optional[str] = ..., reachable: _Optional[bool] = ..., state: _Optional[str] = ..., last_seen_s: _Optional[float] = ..., rounds_contributed: _Optional[int] = ..., tokens_trained: _Optional[int] = ..., resync: _Optional[bool] = ...) -> None: ...

class RunStatus(_message.Message):
    __slots__ = ("run_id", "name", "round", "phase", "tokens_trained", "target_tokens", "peers", "last_commit", "latest_checkpoint", "join_url")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_TRAINED_FIELD_NUMBER: _ClassVar[int]
    TARGET_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    LAST_COMMIT_FIELD_NUMBER: _ClassVar[int]
    LATEST_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    JOIN_URL_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    name: str
    round: int
    phase: str
    tokens_trained: int
    target_tokens: int
    peers: _containers.RepeatedCompositeFieldContainer[PeerStatus]
    last_commit: Commit
    latest_checkpoint: CheckpointInfo
    join_url: str
    def __init__(self, run_id: _Optional[str] = ..., name: _Optional[str] = ..., round: _Optional[int] = ..., phase: _Optional[str] = ..., tokens_trained: _Optional[int] = ..., target_tokens: _Optional[int] = ..., peers: _Optional[_Iterable[_Union[PeerStatus, _Mapping]]] = ..., last_commit: _Optional[_Union[Commit, _Mapping]] = ..., latest_checkpoint: _Optional[_Union[CheckpointInfo, _Mapping]] = ..., join_url: _Optional[str] = ...) -> None: ...

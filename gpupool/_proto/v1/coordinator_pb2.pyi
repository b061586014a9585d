import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from gpupool._proto.v1 import agent_pb2 as _agent_pb2
from gpupool._proto.v1 import control_pb2 as _control_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ConnectRequest(_message.Message):
    __slots__ = ("client", "client_version")
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    CLIENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    client: str
    client_version: str
    def __init__(self, client: _Optional[str] = ..., client_version: _Optional[str] = ...) -> None: ...

class ConnectReply(_message.Message):
    __slots__ = ("session", "coordinator_version", "ready_agents", "ca_certificate", "lease_seconds")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_VERSION_FIELD_NUMBER: _ClassVar[int]
    READY_AGENTS_FIELD_NUMBER: _ClassVar[int]
    CA_CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    session: str
    coordinator_version: str
    ready_agents: int
    ca_certificate: str
    lease_seconds: float
    def __init__(self, session: _Optional[str] = ..., coordinator_version: _Optional[str] = ..., ready_agents: _Optional[int] = ..., ca_certificate: _Optional[str] = ..., lease_seconds: _Optional[float] = ...) -> None: ...

class RenewRequest(_message.Message):
    __slots__ = ("session", "observed")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_FIELD_NUMBER: _ClassVar[int]
    session: str
    observed: _containers.RepeatedCompositeFieldContainer[ObservedThroughput]
    def __init__(self, session: _Optional[str] = ..., observed: _Optional[_Iterable[_Union[ObservedThroughput, _Mapping]]] = ...) -> None: ...

class ObservedThroughput(_message.Message):
    __slots__ = ("agent_id", "bytes", "seconds")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    bytes: int
    seconds: float
    def __init__(self, agent_id: _Optional[str] = ..., bytes: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class RenewReply(_message.Message):
    __slots__ = ("lease_seconds", "offline_agents")
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    OFFLINE_AGENTS_FIELD_NUMBER: _ClassVar[int]
    lease_seconds: float
    offline_agents: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, lease_seconds: _Optional[float] = ..., offline_agents: _Optional[_Iterable[str]] = ...) -> None: ...

class GrantRequest(_message.Message):
    __slots__ = ("session", "agent_ids")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    AGENT_IDS_FIELD_NUMBER: _ClassVar[int]
    session: str
    agent_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, session: _Optional[str] = ..., agent_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class Capability(_message.Message):
    __slots__ = ("agent_id", "token", "expires")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    token: str
    expires: float
    def __init__(self, agent_id: _Optional[str] = ..., token: _Optional[str] = ..., expires: _Optional[float] = ...) -> None: ...

class GrantReply(_message.Message):
    __slots__ = ("capabilities",)
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    capabilities: _containers.RepeatedCompositeFieldContainer[Capability]
    def __init__(self, capabilities: _Optional[_Iterable[_Union[Capability, _Mapping]]] = ...) -> None: ...

class EnrolRequest(_message.Message):
    __slots__ = ("csr_pem", "name")
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    csr_pem: bytes
    name: str
    def __init__(self, csr_pem: _Optional[bytes] = ..., name: _Optional[str] = ...) -> None: ...

class EnrolReply(_message.Message):
    __slots__ = ("agent_id", "certificate_pem", "ca_certificate_pem", "capability_key_pem", "mqtt_username", "mqtt_password", "topic_prefix")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    CA_CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    CAPABILITY_KEY_PEM_FIELD_NUMBER: _ClassVar[int]
    MQTT_USERNAME_FIELD_NUMBER: _ClassVar[int]
    MQTT_PASSWORD_FIELD_NUMBER: _ClassVar[int]
    TOPIC_PREFIX_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    certificate_pem: bytes
    ca_certificate_pem: bytes
    capability_key_pem: bytes
    mqtt_username: str
    mqtt_password: str
    topic_prefix: str
    def __init__(self, agent_id: _Optional[str] = ..., certificate_pem: _Optional[bytes] = ..., ca_certificate_pem: _Optional[bytes] = ..., capability_key_pem: _Optional[bytes] = ..., mqtt_username: _Optional[str] = ..., mqtt_password: _Optional[str] = ..., topic_prefix: _Optional[str] = ...) -> None: ...

class DisconnectRequest(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: str
    def __init__(self, session: _Optional[str] = ...) -> None: ...

class DisconnectReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAgentsRequest(_message.Message):
    __slots__ = ("include_offline",)
    INCLUDE_OFFLINE_FIELD_NUMBER: _ClassVar[int]
    include_offline: bool
    def __init__(self, include_offline: _Optional[bool] = ...) -> None: ...

class AgentRecord(_message.Message):
    __slots__ = ("status", "telemetry", "seconds_since_seen", "trust", "network_bytes_per_second")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    TELEMETRY_FIELD_NUMBER: _ClassVar[int]
    SECONDS_SINCE_SEEN_FIELD_NUMBER: _ClassVar[int]
    TRUST_FIELD_NUMBER: _ClassVar[int]
    NETWORK_BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    status: _control_pb2.AgentStatus
    telemetry: _control_pb2.AgentTelemetry
    seconds_since_seen: float
    trust: AgentTrust
    network_bytes_per_second: float
    def __init__(self, status: _Optional[_Union[_control_pb2.AgentStatus, _Mapping]] = ..., telemetry: _Optional[_Union[_control_pb2.AgentTelemetry, _Mapping]] = ..., seconds_since_seen: _Optional[float] = ..., trust: _Optional[_Union[AgentTrust, _Mapping]] = ..., network_bytes_per_second: _Optional[float] = ...) -> None: ...

class AgentTrust(_message.Message):
    __slots__ = ("checks", "mismatches", "score", "quarantined", "reason")
    CHECKS_FIELD_NUMBER: _ClassVar[int]
    MISMATCHES_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    QUARANTINED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    checks: int
    mismatches: int
    score: float
    quarantined: bool
    reason: str
    def __init__(self, checks: _Optional[int] = ..., mismatches: _Optional[int] = ..., score: _Optional[float] = ..., quarantined: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class ReportVerificationRequest(_message.Message):
    __slots__ = ("session", "agent_id", "reference_agent_id", "agreed", "detail")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    AGREED_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    session: str
    agent_id: str
    reference_agent_id: str
    agreed: bool
    detail: str
    def __init__(self, session: _Optional[str] = ..., agent_id: _Optional[str] = ..., reference_agent_id: _Optional[str] = ..., agreed: _Optional[bool] = ..., detail: _Optional[str] = ...) -> None: ...

class ReportVerificationReply(_message.Message):
    __slots__ = ("trust", "counted", "note")
    TRUST_FIELD_NUMBER: _ClassVar[int]
    COUNTED_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    trust: AgentTrust
    counted: bool
    note: str
    def __init__(self, trust: _Optional[_Union[AgentTrust, _Mapping]] = ..., counted: _Optional[bool] = ..., note: _Optional[str] = ...) -> None: ...

class ListAgentsReply(_message.Message):
    __slots__ = ("agents", "broker_connected", "broker_detail")
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    BROKER_CONNECTED_FIELD_NUMBER: _ClassVar[int]
    BROKER_DETAIL_FIELD_NUMBER: _ClassVar[int]
    agents: _containers.RepeatedCompositeFieldContainer[AgentRecord]
    broker_connected: bool
    broker_detail: str
    def __init__(self, agents: _Optional[_Iterable[_Union[AgentRecord, _Mapping]]] = ..., broker_connected: _Optional[bool] = ..., broker_detail: _Optional[str] = ...) -> None: ...

class PlaceRequest(_message.Message):
    __slots__ = ("session", "meta", "exclude_agents", "backend")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_AGENTS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    session: str
    meta: _agent_pb2.ArrayMeta
    exclude_agents: _containers.RepeatedScalarFieldContainer[str]
    backend: str
    def __init__(self, session: _Optional[str] = ..., meta: _Optional[_Union[_agent_pb2.ArrayMeta, _Mapping]] = ..., exclude_agents: _Optional[_Iterable[str]] = ..., backend: _Optional[str] = ...) -> None: ...

class ShardPlacement(_message.Message):
    __slots__ = ("agent_id", "endpoint", "worker", "start", "stop", "capability")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    endpoint: str
    worker: int
    start: int
    stop: int
    capability: Capability
    def __init__(self, agent_id: _Optional[str] = ..., endpoint: _Optional[str] = ..., worker: _Optional[int] = ..., start: _Optional[int] = ..., stop: _Optional[int] = ..., capability: _Optional[_Union[Capability, _Mapping]] = ...) -> None: ...

class PlaceReply(_message.Message):
    __slots__ = ("shards",)
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    shards: _containers.RepeatedCompositeFieldContainer[ShardPlacement]
    def __init__(self, shards: _Optional[_Iterable[_Union[ShardPlacement, _Mapping]]] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("all",)
    ALL_FIELD_NUMBER: _ClassVar[int]
    all: bool
    def __init__(self, all: _Optional[bool] = ...) -> None: ...

class JobInfo(_message.Message):
    __slots__ = ("job_id", "client", "started", "state", "arrays_placed", "bytes_placed", "ended_reason", "renewed", "token_name")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ARRAYS_PLACED_FIELD_NUMBER: _ClassVar[int]
    BYTES_PLACED_FIELD_NUMBER: _ClassVar[int]
    ENDED_REASON_FIELD_NUMBER: _ClassVar[int]
    RENEWED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_NAME_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    client: str
    started: _timestamp_pb2.Timestamp
    state: str
    arrays_placed: int
    bytes_placed: int
    ended_reason: str
    renewed: _timestamp_pb2.Timestamp
    token_name: str
    def __init__(self, job_id: _Optional[str] = ..., client: _Optional[str] = ..., started: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., state: _Optional[str] = ..., arrays_placed: _Optional[int] = ..., bytes_placed: _Optional[int] = ..., ended_reason: _Optional[str] = ..., renewed: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., token_name: _Optional[str] = ...) -> None: ...

class EndJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class EndJobReply(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: JobInfo
    def __init__(self, job: _Optional[_Union[JobInfo, _Mapping]] = ...) -> None: ...

class ListJobsReply(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[JobInfo]
    def __init__(self, jobs: _Optional[_Iterable[_Union[JobInfo, _Mapping]]] = ...) -> None: ...

class AdminRequest(_message.Message):
    __slots__ = ("agent_id", "reason", "no_move")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    NO_MOVE_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    reason: str
    no_move: bool
    def __init__(self, agent_id: _Optional[str] = ..., reason: _Optional[str] = ..., no_move: _Optional[bool] = ...) -> None: ...

class AdminReply(_message.Message):
    __slots__ = ("agent", "command_id", "evacuation")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    EVACUATION_FIELD_NUMBER: _ClassVar[int]
    agent: _control_pb2.AgentStatus
    command_id: str
    evacuation: Evacuation
    def __init__(self, agent: _Optional[_Union[_control_pb2.AgentStatus, _Mapping]] = ..., command_id: _Optional[str] = ..., evacuation: _Optional[_Union[Evacuation, _Mapping]] = ...) -> None: ...

class MovedBuffers(_message.Message):
    __slots__ = ("session", "agent_id", "endpoint", "worker", "buffers", "bytes")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    session: str
    agent_id: str
    endpoint: str
    worker: int
    buffers: int
    bytes: int
    def __init__(self, session: _Optional[str] = ..., agent_id: _Optional[str] = ..., endpoint: _Optional[str] = ..., worker: _Optional[int] = ..., buffers: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...

class Evacuation(_message.Message):
    __slots__ = ("agent_id", "moved", "buffers_moved", "bytes_moved", "buffers_left", "bytes_left", "problems", "seconds")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    MOVED_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_MOVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_MOVED_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_LEFT_FIELD_NUMBER: _ClassVar[int]
    BYTES_LEFT_FIELD_NUMBER: _ClassVar[int]
    PROBLEMS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    moved: _containers.RepeatedCompositeFieldContainer[MovedBuffers]
    buffers_moved: int
    bytes_moved: int
    buffers_left: int
    bytes_left: int
    problems: _containers.RepeatedScalarFieldContainer[str]
    seconds: float
    def __init__(self, agent_id: _Optional[str] = ..., moved: _Optional[_Iterable[_Union[MovedBuffers, _Mapping]]] = ..., buffers_moved: _Optional[int] = ..., bytes_moved: _Optional[int] = ..., buffers_left: _Optional[int] = ..., bytes_left: _Optional[int] = ..., problems: _Optional[_Iterable[str]] = ..., seconds: _Optional[float] = ...) -> None: ...

class MoveSource(_message.Message):
    __slots__ = ("agent_id", "worker", "start", "stop")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    worker: int
    start: int
    stop: int
    def __init__(self, agent_id: _Optional[str] = ..., worker: _Optional[int] = ..., start: _Optional[int] = ..., stop: _Optional[int] = ...) -> None: ...

class PlanMovesRequest(_message.Message):
    __slots__ = ("session", "meta", "sources", "exclude_agents")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_AGENTS_FIELD_NUMBER: _ClassVar[int]
    session: str
    meta: _agent_pb2.ArrayMeta
    sources: _containers.RepeatedCompositeFieldContainer[MoveSource]
    exclude_agents: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, session: _Optional[str] = ..., meta: _Optional[_Union[_agent_pb2.ArrayMeta, _Mapping]] = ..., sources: _Optional[_Iterable[_Union[MoveSource, _Mapping]]] = ..., exclude_agents: _Optional[_Iterable[str]] = ...) -> None: ...

class Segment(_message.Message):
    __slots__ = ("target", "source", "start", "stop", "moved")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    MOVED_FIELD_NUMBER: _ClassVar[int]
    target: int
    source: int
    start: int
    stop: int
    moved: bool
    def __init__(self, target: _Optional[int] = ..., source: _Optional[int] = ..., start: _Optional[int] = ..., stop: _Optional[int] = ..., moved: _Optional[bool] = ...) -> None: ...

class PlanMovesReply(_message.Message):
    __slots__ = ("targets", "segments")
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    targets: _containers.RepeatedCompositeFieldContainer[ShardPlacement]
    segments: _containers.RepeatedCompositeFieldContainer[Segment]
    def __init__(self, targets: _Optional[_Iterable[_Union[ShardPlacement, _Mapping]]] = ..., segments: _Optional[_Iterable[_Union[Segment, _Mapping]]] = ...) -> None: ...

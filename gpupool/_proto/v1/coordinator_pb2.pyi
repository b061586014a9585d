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
    __slots__ = ("session", "coordinator_version", "ready_agents")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_VERSION_FIELD_NUMBER: _ClassVar[int]
    READY_AGENTS_FIELD_NUMBER: _ClassVar[int]
    session: str
    coordinator_version: str
    ready_agents: int
    def __init__(self, session: _Optional[str] = ..., coordinator_version: _Optional[str] = ..., ready_agents: _Optional[int] = ...) -> None: ...

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
    __slots__ = ("status", "telemetry", "seconds_since_seen")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    TELEMETRY_FIELD_NUMBER: _ClassVar[int]
    SECONDS_SINCE_SEEN_FIELD_NUMBER: _ClassVar[int]
    status: _control_pb2.AgentStatus
    telemetry: _control_pb2.AgentTelemetry
    seconds_since_seen: float
    def __init__(self, status: _Optional[_Union[_control_pb2.AgentStatus, _Mapping]] = ..., telemetry: _Optional[_Union[_control_pb2.AgentTelemetry, _Mapping]] = ..., seconds_since_seen: _Optional[float] = ...) -> None: ...

class ListAgentsReply(_message.Message):
    __slots__ = ("agents",)
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    agents: _containers.RepeatedCompositeFieldContainer[AgentRecord]
    def __init__(self, agents: _Optional[_Iterable[_Union[AgentRecord, _Mapping]]] = ...) -> None: ...

class PlaceRequest(_message.Message):
    __slots__ = ("session", "meta", "exclude_agents")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_AGENTS_FIELD_NUMBER: _ClassVar[int]
    session: str
    meta: _agent_pb2.ArrayMeta
    exclude_agents: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, session: _Optional[str] = ..., meta: _Optional[_Union[_agent_pb2.ArrayMeta, _Mapping]] = ..., exclude_agents: _Optional[_Iterable[str]] = ...) -> None: ...

class ShardPlacement(_message.Message):
    __slots__ = ("agent_id", "endpoint", "worker", "start", "stop")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    endpoint: str
    worker: int
    start: int
    stop: int
    def __init__(self, agent_id: _Optional[str] = ..., endpoint: _Optional[str] = ..., worker: _Optional[int] = ..., start: _Optional[int] = ..., stop: _Optional[int] = ...) -> None: ...

class PlaceReply(_message.Message):
    __slots__ = ("shards",)
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    shards: _containers.RepeatedCompositeFieldContainer[ShardPlacement]
    def __init__(self, shards: _Optional[_Iterable[_Union[ShardPlacement, _Mapping]]] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class JobInfo(_message.Message):
    __slots__ = ("job_id", "client", "started", "state", "arrays_placed", "bytes_placed")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ARRAYS_PLACED_FIELD_NUMBER: _ClassVar[int]
    BYTES_PLACED_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    client: str
    started: _timestamp_pb2.Timestamp
    state: str
    arrays_placed: int
    bytes_placed: int
    def __init__(self, job_id: _Optional[str] = ..., client: _Optional[str] = ..., started: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., state: _Optional[str] = ..., arrays_placed: _Optional[int] = ..., bytes_placed: _Optional[int] = ...) -> None: ...

class ListJobsReply(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[JobInfo]
    def __init__(self, jobs: _Optional[_Iterable[_Union[JobInfo, _Mapping]]] = ...) -> None: ...

class AdminRequest(_message.Message):
    __slots__ = ("agent_id", "reason")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    reason: str
    def __init__(self, agent_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class AdminReply(_message.Message):
    __slots__ = ("agent", "command_id")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    agent: _control_pb2.AgentStatus
    command_id: str
    def __init__(self, agent: _Optional[_Union[_control_pb2.AgentStatus, _Mapping]] = ..., command_id: _Optional[str] = ...) -> None: ...

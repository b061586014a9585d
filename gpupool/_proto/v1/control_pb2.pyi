import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AgentState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AGENT_STATE_UNSPECIFIED: _ClassVar[AgentState]
    AGENT_STATE_READY: _ClassVar[AgentState]
    AGENT_STATE_CORDONED: _ClassVar[AgentState]
    AGENT_STATE_DRAINING: _ClassVar[AgentState]
    AGENT_STATE_OFFLINE: _ClassVar[AgentState]

class CommandKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMMAND_KIND_UNSPECIFIED: _ClassVar[CommandKind]
    COMMAND_KIND_DRAIN: _ClassVar[CommandKind]
    COMMAND_KIND_CORDON: _ClassVar[CommandKind]
    COMMAND_KIND_UNCORDON: _ClassVar[CommandKind]
    COMMAND_KIND_END_SESSION: _ClassVar[CommandKind]
AGENT_STATE_UNSPECIFIED: AgentState
AGENT_STATE_READY: AgentState
AGENT_STATE_CORDONED: AgentState
AGENT_STATE_DRAINING: AgentState
AGENT_STATE_OFFLINE: AgentState
COMMAND_KIND_UNSPECIFIED: CommandKind
COMMAND_KIND_DRAIN: CommandKind
COMMAND_KIND_CORDON: CommandKind
COMMAND_KIND_UNCORDON: CommandKind
COMMAND_KIND_END_SESSION: CommandKind

class GpuInfo(_message.Message):
    __slots__ = ("index", "uuid", "model", "memory_total", "memory_free", "compute_capability", "pcie_generation", "pcie_width", "pcie_max_generation", "pcie_max_width", "driver_version")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FREE_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    PCIE_GENERATION_FIELD_NUMBER: _ClassVar[int]
    PCIE_WIDTH_FIELD_NUMBER: _ClassVar[int]
    PCIE_MAX_GENERATION_FIELD_NUMBER: _ClassVar[int]
    PCIE_MAX_WIDTH_FIELD_NUMBER: _ClassVar[int]
    DRIVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    index: int
    uuid: str
    model: str
    memory_total: int
    memory_free: int
    compute_capability: str
    pcie_generation: int
    pcie_width: int
    pcie_max_generation: int
    pcie_max_width: int
    driver_version: str
    def __init__(self, index: _Optional[int] = ..., uuid: _Optional[str] = ..., model: _Optional[str] = ..., memory_total: _Optional[int] = ..., memory_free: _Optional[int] = ..., compute_capability: _Optional[str] = ..., pcie_generation: _Optional[int] = ..., pcie_width: _Optional[int] = ..., pcie_max_generation: _Optional[int] = ..., pcie_max_width: _Optional[int] = ..., driver_version: _Optional[str] = ...) -> None: ...

class Worker(_message.Message):
    __slots__ = ("index", "backend", "gpu", "memory_limit", "memory_used", "buffers", "gemm_f32_gflops", "gemm_f16_gflops", "host_to_device_gbps", "temperature_limit_c")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_FIELD_NUMBER: _ClassVar[int]
    GEMM_F32_GFLOPS_FIELD_NUMBER: _ClassVar[int]
    GEMM_F16_GFLOPS_FIELD_NUMBER: _ClassVar[int]
    HOST_TO_DEVICE_GBPS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_LIMIT_C_FIELD_NUMBER: _ClassVar[int]
    index: int
    backend: str
    gpu: GpuInfo
    memory_limit: int
    memory_used: int
    buffers: int
    gemm_f32_gflops: float
    gemm_f16_gflops: float
    host_to_device_gbps: float
    temperature_limit_c: float
    def __init__(self, index: _Optional[int] = ..., backend: _Optional[str] = ..., gpu: _Optional[_Union[GpuInfo, _Mapping]] = ..., memory_limit: _Optional[int] = ..., memory_used: _Optional[int] = ..., buffers: _Optional[int] = ..., gemm_f32_gflops: _Optional[float] = ..., gemm_f16_gflops: _Optional[float] = ..., host_to_device_gbps: _Optional[float] = ..., temperature_limit_c: _Optional[float] = ...) -> None: ...

class AgentStatus(_message.Message):
    __slots__ = ("schema_version", "agent_id", "name", "version", "endpoint", "state", "backend", "workers", "hostname", "updated", "note", "started", "signature", "certificate_fingerprint", "bulk_port", "allow_python", "move_request")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    BULK_PORT_FIELD_NUMBER: _ClassVar[int]
    ALLOW_PYTHON_FIELD_NUMBER: _ClassVar[int]
    MOVE_REQUEST_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    agent_id: str
    name: str
    version: str
    endpoint: str
    state: AgentState
    backend: str
    workers: _containers.RepeatedCompositeFieldContainer[Worker]
    hostname: str
    updated: _timestamp_pb2.Timestamp
    note: str
    started: _timestamp_pb2.Timestamp
    signature: bytes
    certificate_fingerprint: str
    bulk_port: int
    allow_python: bool
    move_request: int
    def __init__(self, schema_version: _Optional[int] = ..., agent_id: _Optional[str] = ..., name: _Optional[str] = ..., version: _Optional[str] = ..., endpoint: _Optional[str] = ..., state: _Optional[_Union[AgentState, str]] = ..., backend: _Optional[str] = ..., workers: _Optional[_Iterable[_Union[Worker, _Mapping]]] = ..., hostname: _Optional[str] = ..., updated: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., note: _Optional[str] = ..., started: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., signature: _Optional[bytes] = ..., certificate_fingerprint: _Optional[str] = ..., bulk_port: _Optional[int] = ..., allow_python: _Optional[bool] = ..., move_request: _Optional[int] = ...) -> None: ...

class WorkerTelemetry(_message.Message):
    __slots__ = ("index", "memory_used", "memory_limit", "buffers", "gpu_memory_free", "utilization_percent", "temperature_c", "power_w")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_FIELD_NUMBER: _ClassVar[int]
    GPU_MEMORY_FREE_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_PERCENT_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_C_FIELD_NUMBER: _ClassVar[int]
    POWER_W_FIELD_NUMBER: _ClassVar[int]
    index: int
    memory_used: int
    memory_limit: int
    buffers: int
    gpu_memory_free: int
    utilization_percent: float
    temperature_c: float
    power_w: float
    def __init__(self, index: _Optional[int] = ..., memory_used: _Optional[int] = ..., memory_limit: _Optional[int] = ..., buffers: _Optional[int] = ..., gpu_memory_free: _Optional[int] = ..., utilization_percent: _Optional[float] = ..., temperature_c: _Optional[float] = ..., power_w: _Optional[float] = ...) -> None: ...

class AgentTelemetry(_message.Message):
    __slots__ = ("schema_version", "agent_id", "time", "workers", "ops_executed", "bytes_received", "bytes_sent", "signature", "kernel_cache_hits", "kernel_compiles")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    OPS_EXECUTED_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    KERNEL_CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    KERNEL_COMPILES_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    agent_id: str
    time: _timestamp_pb2.Timestamp
    workers: _containers.RepeatedCompositeFieldContainer[WorkerTelemetry]
    ops_executed: int
    bytes_received: int
    bytes_sent: int
    signature: bytes
    kernel_cache_hits: int
    kernel_compiles: int
    def __init__(self, schema_version: _Optional[int] = ..., agent_id: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., workers: _Optional[_Iterable[_Union[WorkerTelemetry, _Mapping]]] = ..., ops_executed: _Optional[int] = ..., bytes_received: _Optional[int] = ..., bytes_sent: _Optional[int] = ..., signature: _Optional[bytes] = ..., kernel_cache_hits: _Optional[int] = ..., kernel_compiles: _Optional[int] = ...) -> None: ...

class AgentCommand(_message.Message):
    __slots__ = ("schema_version", "command_id", "kind", "reason", "issued", "session", "agent_id", "signature", "keep_buffers")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ISSUED_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    KEEP_BUFFERS_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    command_id: str
    kind: CommandKind
    reason: str
    issued: _timestamp_pb2.Timestamp
    session: str
    agent_id: str
    signature: bytes
    keep_buffers: bool
    def __init__(self, schema_version: _Optional[int] = ..., command_id: _Optional[str] = ..., kind: _Optional[_Union[CommandKind, str]] = ..., reason: _Optional[str] = ..., issued: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., session: _Optional[str] = ..., agent_id: _Optional[str] = ..., signature: _Optional[bytes] = ..., keep_buffers: _Optional[bool] = ...) -> None: ...

from gpupool._proto.v1 import control_pb2 as _control_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ArrayMeta(_message.Message):
    __slots__ = ("dtype", "shape")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class UploadHeader(_message.Message):
    __slots__ = ("buffer_id", "worker", "meta", "session", "has_rows", "start", "stop")
    BUFFER_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    HAS_ROWS_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    buffer_id: str
    worker: int
    meta: ArrayMeta
    session: str
    has_rows: bool
    start: int
    stop: int
    def __init__(self, buffer_id: _Optional[str] = ..., worker: _Optional[int] = ..., meta: _Optional[_Union[ArrayMeta, _Mapping]] = ..., session: _Optional[str] = ..., has_rows: _Optional[bool] = ..., start: _Optional[int] = ..., stop: _Optional[int] = ...) -> None: ...

class UploadRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UploadHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[UploadHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class UploadReply(_message.Message):
    __slots__ = ("buffer_id", "nbytes")
    BUFFER_ID_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    buffer_id: str
    nbytes: int
    def __init__(self, buffer_id: _Optional[str] = ..., nbytes: _Optional[int] = ...) -> None: ...

class DownloadRequest(_message.Message):
    __slots__ = ("buffer_id", "chunk_bytes", "has_rows", "start", "stop")
    BUFFER_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    HAS_ROWS_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    buffer_id: str
    chunk_bytes: int
    has_rows: bool
    start: int
    stop: int
    def __init__(self, buffer_id: _Optional[str] = ..., chunk_bytes: _Optional[int] = ..., has_rows: _Optional[bool] = ..., start: _Optional[int] = ..., stop: _Optional[int] = ...) -> None: ...

class DownloadChunk(_message.Message):
    __slots__ = ("meta", "chunk")
    META_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    meta: ArrayMeta
    chunk: bytes
    def __init__(self, meta: _Optional[_Union[ArrayMeta, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class Scalar(_message.Message):
    __slots__ = ("f", "i", "b", "dtype")
    F_FIELD_NUMBER: _ClassVar[int]
    I_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    f: float
    i: int
    b: bool
    dtype: str
    def __init__(self, f: _Optional[float] = ..., i: _Optional[int] = ..., b: _Optional[bool] = ..., dtype: _Optional[str] = ...) -> None: ...

class Constant(_message.Message):
    __slots__ = ("meta", "data")
    META_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    meta: ArrayMeta
    data: bytes
    def __init__(self, meta: _Optional[_Union[ArrayMeta, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Operand(_message.Message):
    __slots__ = ("buffer", "scalar", "constant")
    BUFFER_FIELD_NUMBER: _ClassVar[int]
    SCALAR_FIELD_NUMBER: _ClassVar[int]
    CONSTANT_FIELD_NUMBER: _ClassVar[int]
    buffer: str
    scalar: Scalar
    constant: Constant
    def __init__(self, buffer: _Optional[str] = ..., scalar: _Optional[_Union[Scalar, _Mapping]] = ..., constant: _Optional[_Union[Constant, _Mapping]] = ...) -> None: ...

class Op(_message.Message):
    __slots__ = ("op", "inputs", "output", "expect", "has_axis", "axis", "params", "axes", "keepdims", "kernel", "loop", "outputs", "expects")
    OP_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    EXPECT_FIELD_NUMBER: _ClassVar[int]
    HAS_AXIS_FIELD_NUMBER: _ClassVar[int]
    AXIS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    AXES_FIELD_NUMBER: _ClassVar[int]
    KEEPDIMS_FIELD_NUMBER: _ClassVar[int]
    KERNEL_FIELD_NUMBER: _ClassVar[int]
    LOOP_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    EXPECTS_FIELD_NUMBER: _ClassVar[int]
    op: str
    inputs: _containers.RepeatedCompositeFieldContainer[Operand]
    output: str
    expect: ArrayMeta
    has_axis: bool
    axis: int
    params: _containers.RepeatedScalarFieldContainer[int]
    axes: _containers.RepeatedScalarFieldContainer[int]
    keepdims: bool
    kernel: Kernel
    loop: Loop
    outputs: _containers.RepeatedScalarFieldContainer[str]
    expects: _containers.RepeatedCompositeFieldContainer[ArrayMeta]
    def __init__(self, op: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[Operand, _Mapping]]] = ..., output: _Optional[str] = ..., expect: _Optional[_Union[ArrayMeta, _Mapping]] = ..., has_axis: _Optional[bool] = ..., axis: _Optional[int] = ..., params: _Optional[_Iterable[int]] = ..., axes: _Optional[_Iterable[int]] = ..., keepdims: _Optional[bool] = ..., kernel: _Optional[_Union[Kernel, _Mapping]] = ..., loop: _Optional[_Union[Loop, _Mapping]] = ..., outputs: _Optional[_Iterable[str]] = ..., expects: _Optional[_Iterable[_Union[ArrayMeta, _Mapping]]] = ...) -> None: ...

class Kernel(_message.Message):
    __slots__ = ("kind", "name", "in_params", "out_params", "operation", "map_expr", "reduce_expr", "post_map_expr", "identity", "preamble", "code", "grid", "block", "options", "shared_mem")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    IN_PARAMS_FIELD_NUMBER: _ClassVar[int]
    OUT_PARAMS_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    MAP_EXPR_FIELD_NUMBER: _ClassVar[int]
    REDUCE_EXPR_FIELD_NUMBER: _ClassVar[int]
    POST_MAP_EXPR_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    PREAMBLE_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    GRID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEM_FIELD_NUMBER: _ClassVar[int]
    kind: str
    name: str
    in_params: str
    out_params: str
    operation: str
    map_expr: str
    reduce_expr: str
    post_map_expr: str
    identity: str
    preamble: str
    code: str
    grid: _containers.RepeatedScalarFieldContainer[int]
    block: _containers.RepeatedScalarFieldContainer[int]
    options: _containers.RepeatedScalarFieldContainer[str]
    shared_mem: int
    def __init__(self, kind: _Optional[str] = ..., name: _Optional[str] = ..., in_params: _Optional[str] = ..., out_params: _Optional[str] = ..., operation: _Optional[str] = ..., map_expr: _Optional[str] = ..., reduce_expr: _Optional[str] = ..., post_map_expr: _Optional[str] = ..., identity: _Optional[str] = ..., preamble: _Optional[str] = ..., code: _Optional[str] = ..., grid: _Optional[_Iterable[int]] = ..., block: _Optional[_Iterable[int]] = ..., options: _Optional[_Iterable[str]] = ..., shared_mem: _Optional[int] = ...) -> None: ...

class Loop(_message.Message):
    __slots__ = ("trips", "counter", "carry", "body", "next")
    TRIPS_FIELD_NUMBER: _ClassVar[int]
    COUNTER_FIELD_NUMBER: _ClassVar[int]
    CARRY_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    NEXT_FIELD_NUMBER: _ClassVar[int]
    trips: int
    counter: str
    carry: _containers.RepeatedScalarFieldContainer[str]
    body: _containers.RepeatedCompositeFieldContainer[Op]
    next: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, trips: _Optional[int] = ..., counter: _Optional[str] = ..., carry: _Optional[_Iterable[str]] = ..., body: _Optional[_Iterable[_Union[Op, _Mapping]]] = ..., next: _Optional[_Iterable[str]] = ...) -> None: ...

class ExecuteRequest(_message.Message):
    __slots__ = ("worker", "ops", "fetch", "free", "session")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    OPS_FIELD_NUMBER: _ClassVar[int]
    FETCH_FIELD_NUMBER: _ClassVar[int]
    FREE_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    worker: int
    ops: _containers.RepeatedCompositeFieldContainer[Op]
    fetch: _containers.RepeatedScalarFieldContainer[str]
    free: _containers.RepeatedScalarFieldContainer[str]
    session: str
    def __init__(self, worker: _Optional[int] = ..., ops: _Optional[_Iterable[_Union[Op, _Mapping]]] = ..., fetch: _Optional[_Iterable[str]] = ..., free: _Optional[_Iterable[str]] = ..., session: _Optional[str] = ...) -> None: ...

class Fetched(_message.Message):
    __slots__ = ("buffer_id", "meta", "data")
    BUFFER_ID_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    buffer_id: str
    meta: ArrayMeta
    data: bytes
    def __init__(self, buffer_id: _Optional[str] = ..., meta: _Optional[_Union[ArrayMeta, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ExecuteReply(_message.Message):
    __slots__ = ("fetched", "memory_used")
    FETCHED_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_FIELD_NUMBER: _ClassVar[int]
    fetched: _containers.RepeatedCompositeFieldContainer[Fetched]
    memory_used: int
    def __init__(self, fetched: _Optional[_Iterable[_Union[Fetched, _Mapping]]] = ..., memory_used: _Optional[int] = ...) -> None: ...

class FreeRequest(_message.Message):
    __slots__ = ("buffer_ids", "session")
    BUFFER_IDS_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    buffer_ids: _containers.RepeatedScalarFieldContainer[str]
    session: str
    def __init__(self, buffer_ids: _Optional[_Iterable[str]] = ..., session: _Optional[str] = ...) -> None: ...

class FreeReply(_message.Message):
    __slots__ = ("freed", "bytes_freed")
    FREED_FIELD_NUMBER: _ClassVar[int]
    BYTES_FREED_FIELD_NUMBER: _ClassVar[int]
    freed: int
    bytes_freed: int
    def __init__(self, freed: _Optional[int] = ..., bytes_freed: _Optional[int] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthReply(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: _control_pb2.AgentStatus
    def __init__(self, status: _Optional[_Union[_control_pb2.AgentStatus, _Mapping]] = ...) -> None: ...

class PullSource(_message.Message):
    __slots__ = ("agent_id", "buffer_id", "start", "stop", "capability", "endpoint", "whole")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    BUFFER_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    WHOLE_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    buffer_id: str
    start: int
    stop: int
    capability: str
    endpoint: str
    whole: bool
    def __init__(self, agent_id: _Optional[str] = ..., buffer_id: _Optional[str] = ..., start: _Optional[int] = ..., stop: _Optional[int] = ..., capability: _Optional[str] = ..., endpoint: _Optional[str] = ..., whole: _Optional[bool] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("worker", "output", "sources", "combine", "axis", "expect", "session")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    COMBINE_FIELD_NUMBER: _ClassVar[int]
    AXIS_FIELD_NUMBER: _ClassVar[int]
    EXPECT_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    worker: int
    output: str
    sources: _containers.RepeatedCompositeFieldContainer[PullSource]
    combine: str
    axis: int
    expect: ArrayMeta
    session: str
    def __init__(self, worker: _Optional[int] = ..., output: _Optional[str] = ..., sources: _Optional[_Iterable[_Union[PullSource, _Mapping]]] = ..., combine: _Optional[str] = ..., axis: _Optional[int] = ..., expect: _Optional[_Union[ArrayMeta, _Mapping]] = ..., session: _Optional[str] = ...) -> None: ...

class PullReply(_message.Message):
    __slots__ = ("buffer_id", "nbytes", "bytes_pulled")
    BUFFER_ID_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    BYTES_PULLED_FIELD_NUMBER: _ClassVar[int]
    buffer_id: str
    nbytes: int
    bytes_pulled: int
    def __init__(self, buffer_id: _Optional[str] = ..., nbytes: _Optional[int] = ..., bytes_pulled: _Optional[int] = ...) -> None: ...

class RunPythonRequest(_message.Message):
    __slots__ = ("worker", "session", "payload")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    worker: int
    session: str
    payload: bytes
    def __init__(self, worker: _Optional[int] = ..., session: _Optional[str] = ..., payload: _Optional[bytes] = ...) -> None: ...

class RunPythonReply(_message.Message):
    __slots__ = ("payload",)
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    def __init__(self, payload: _Optional[bytes] = ...) -> None: ...

class InventoryRequest(_message.Message):
    __slots__ = ("settle_seconds",)
    SETTLE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    settle_seconds: float
    def __init__(self, settle_seconds: _Optional[float] = ...) -> None: ...

class ResidentBuffer(_message.Message):
    __slots__ = ("session", "buffer_id", "worker", "meta", "nbytes")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    BUFFER_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    session: str
    buffer_id: str
    worker: int
    meta: ArrayMeta
    nbytes: int
    def __init__(self, session: _Optional[str] = ..., buffer_id: _Optional[str] = ..., worker: _Optional[int] = ..., meta: _Optional[_Union[ArrayMeta, _Mapping]] = ..., nbytes: _Optional[int] = ...) -> None: ...

class InventoryReply(_message.Message):
    __slots__ = ("buffers", "settled")
    BUFFERS_FIELD_NUMBER: _ClassVar[int]
    SETTLED_FIELD_NUMBER: _ClassVar[int]
    buffers: _containers.RepeatedCompositeFieldContainer[ResidentBuffer]
    settled: bool
    def __init__(self, buffers: _Optional[_Iterable[_Union[ResidentBuffer, _Mapping]]] = ..., settled: _Optional[bool] = ...) -> None: ...

class BufferHome(_message.Message):
    __slots__ = ("session", "buffer_id", "agent_id", "endpoint", "worker")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    BUFFER_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    session: str
    buffer_id: str
    agent_id: str
    endpoint: str
    worker: int
    def __init__(self, session: _Optional[str] = ..., buffer_id: _Optional[str] = ..., agent_id: _Optional[str] = ..., endpoint: _Optional[str] = ..., worker: _Optional[int] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("moves", "final", "left", "left_bytes", "note")
    MOVES_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    LEFT_FIELD_NUMBER: _ClassVar[int]
    LEFT_BYTES_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    moves: _containers.RepeatedCompositeFieldContainer[BufferHome]
    final: bool
    left: int
    left_bytes: int
    note: str
    def __init__(self, moves: _Optional[_Iterable[_Union[BufferHome, _Mapping]]] = ..., final: _Optional[bool] = ..., left: _Optional[int] = ..., left_bytes: _Optional[int] = ..., note: _Optional[str] = ...) -> None: ...

class ForwardReply(_message.Message):
    __slots__ = ("forwarded", "bytes_forwarded", "missing")
    FORWARDED_FIELD_NUMBER: _ClassVar[int]
    BYTES_FORWARDED_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    forwarded: int
    bytes_forwarded: int
    missing: _containers.RepeatedCompositeFieldContainer[BufferHome]
    def __init__(self, forwarded: _Optional[int] = ..., bytes_forwarded: _Optional[int] = ..., missing: _Optional[_Iterable[_Union[BufferHome, _Mapping]]] = ...) -> None: ...

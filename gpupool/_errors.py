"""Exceptions raised by gpupool.

The hierarchy::

    GpupoolError
    ├── TransportError                  the network failed us
    │   ├── ConnectError                  could not reach the coordinator, an agent or the broker
    │   ├── DeadlineExceeded              a call ran past its deadline
    │   ├── StreamClosed                  a stream ended before its declared size
    │   └── AgentLost                     the coordinator shows the agent offline: its rows are lost
    ├── ProtocolError                   a peer sent something we cannot read
    │   ├── FrameDecodeError              a malformed payload
    │   └── VersionMismatch               a schema version we do not speak
    ├── SchedulingError                 the pool cannot place the work
    │   ├── NoCapacity                    ready agents lack the memory
    │   └── PlacementError                no ready agents, unknown agent, bad request to the coordinator
    ├── RemoteError                     an agent refused or failed an operation
    │   ├── RemoteKernelError             the op itself failed on the agent
    │   ├── DeviceOutOfMemory             the worker's memory limit or the device's memory
    │   ├── BufferNotFound                the agent does not hold the buffer (freed, or lost with a restart)
    │   └── AgentNotAccepting             the agent is draining or has no such worker
    ├── AuthError                       credentials refused
    └── UsageError                      the caller misused the API (raised before anything is sent)
        ├── UnsupportedDType              also a TypeError
        ├── ShapeMismatch                 also a ValueError
        └── ArrayFreed                    the array was freed or its pool closed

Errors from grpc.aio and aiomqtt are translated into these in one place
(:mod:`gpupool.protocol.errors`), chained with ``raise ... from exc``.
"""

from __future__ import annotations

__all__ = [
    "AgentLost",
    "AgentNotAccepting",
    "ArrayFreed",
    "AuthError",
    "BufferNotFound",
    "ConnectError",
    "DeadlineExceeded",
    "DeviceOutOfMemory",
    "FrameDecodeError",
    "GpupoolError",
    "NoCapacity",
    "PlacementError",
    "ProtocolError",
    "RemoteError",
    "RemoteKernelError",
    "SchedulingError",
    "ShapeMismatch",
    "StreamClosed",
    "TransportError",
    "UnsupportedDType",
    "UsageError",
    "VersionMismatch",
]


class GpupoolError(Exception):
    """Base of every error gpupool raises on purpose."""


class TransportError(GpupoolError):
    """The network between two gpupool parts failed.

    Args:
        peer: the address or id of the other side.
        detail: what failed.
    """

    def __init__(self, peer: str, detail: str) -> None:
        self.peer = peer
        self.detail = detail
        super().__init__(f"{peer}: {detail}")


class ConnectError(TransportError):
    """Could not reach a coordinator, agent or broker."""


class DeadlineExceeded(TransportError):
    """A network call ran past its deadline."""


class StreamClosed(TransportError):
    """A stream ended before it carried what it declared."""


class AgentLost(TransportError):
    """The coordinator shows an agent offline while a call to it was waiting: the call was abandoned.

    Args:
        agent_id: the agent.
        rows: ``(start, stop)`` of the array rows it held for the failed operation, when known.
    """

    def __init__(self, agent_id: str, rows: tuple[int, int] | None = None) -> None:
        self.agent_id = agent_id
        self.rows = rows
        held = f"; rows {rows[0]}:{rows[1]} of the array it held are lost" if rows else ""
        super().__init__(
            agent_id,
            f"agent {agent_id} went offline (the coordinator shows it so); the call was abandoned{held}",
        )

    def with_rows(self, start: int, stop: int) -> AgentLost:
        """The same loss, naming the rows."""
        return AgentLost(self.agent_id, (start, stop))


class ShardsLost(AgentLost):
    """Rows of an array were lost with an agent (or its worker) and cannot be made again.

    Args:
        agent_id: the agent that held them.
        array: the array, as its repr names it ("" when it was an intermediate of a computation).
        rows: ``(start, stop)``.
        why: why they cannot be rebuilt.
    """

    def __init__(self, agent_id: str, array: str, rows: tuple[int, int], why: str) -> None:
        super().__init__(agent_id, rows)
        self.array = array
        self.why = why
        what = array or "an array"
        self.args = (
            agent_id,
            f"agent {agent_id} lost rows {rows[0]}:{rows[1]} of {what}, which cannot be rebuilt: {why}",
        )

    def __str__(self) -> str:
        return str(self.args[1])


class ProtocolError(GpupoolError):
    """A peer sent a payload we cannot use."""


class FrameDecodeError(ProtocolError):
    """A malformed payload.

    Args:
        what: which payload (topic, message type).
        detail: why it could not be decoded.
    """

    def __init__(self, what: str, detail: str) -> None:
        self.what = what
        self.detail = detail
        super().__init__(f"cannot decode {what}: {detail}")


class VersionMismatch(ProtocolError):
    """A payload's schema version is one we do not speak.

    Args:
        what: which payload.
        got: the version it carries.
        supported: the version this build speaks.
    """

    def __init__(self, what: str, got: int, supported: int) -> None:
        self.what = what
        self.got = got
        self.supported = supported
        super().__init__(f"{what} has schema version {got}; this gpupool speaks {supported}")


class SchedulingError(GpupoolError):
    """The pool cannot place or run the requested work."""


class NoCapacity(SchedulingError):
    """The ready agents cannot hold the requested array.

    Args:
        needed: bytes requested.
        available: bytes free over all ready workers.
        ready_workers: how many workers were considered.
    """

    def __init__(self, needed: int, available: int, ready_workers: int) -> None:
        self.needed = needed
        self.available = available
        self.ready_workers = ready_workers
        super().__init__(
            f"no capacity: need {needed} bytes, {available} bytes free on {ready_workers} ready worker(s)"
        )


class PlacementError(SchedulingError):
    """Placement failed for a reason other than capacity (no ready agents, unknown agent)."""


class RemoteError(GpupoolError):
    """An agent refused or failed an operation.

    Args:
        agent_id: the agent that answered.
        message: the agent's own words.
        buffer_id: the buffer concerned, if any.
        code: the gRPC status code name the agent returned.
    """

    def __init__(self, agent_id: str, message: str, *, buffer_id: str = "", code: str = "") -> None:
        self.agent_id = agent_id
        self.buffer_id = buffer_id
        self.remote_message = message
        self.code = code
        where = f"agent {agent_id}" + (f", buffer {buffer_id}" if buffer_id else "")
        super().__init__(f"{where}: {message}")


class RemoteKernelError(RemoteError):
    """The operation itself failed on the agent (bad operands, a failing kernel)."""


class DeviceOutOfMemory(RemoteError):
    """The worker's memory limit, or the device's memory, cannot hold the result or upload."""


class BufferNotFound(RemoteError):
    """The agent does not hold the buffer: it was freed, or lost when the agent restarted."""


class BufferMoved(BufferNotFound):
    """The agent no longer holds the buffer because it moved it to another worker (a drain, or the rig's
    owner taking the GPU back), under the same session and buffer id: the client follows it there.

    Args:
        to_agent: the agent that holds the buffer now.
        to_endpoint: that agent's data-plane address.
        to_worker: the worker there.
    """

    def __init__(
        self,
        agent_id: str,
        message: str,
        *,
        buffer_id: str = "",
        code: str = "",
        to_agent: str = "",
        to_endpoint: str = "",
        to_worker: int = 0,
    ) -> None:
        super().__init__(agent_id, message, buffer_id=buffer_id, code=code)
        self.to_agent = to_agent
        self.to_endpoint = to_endpoint
        self.to_worker = to_worker


class AgentNotAccepting(RemoteError):
    """The agent takes no new work (draining) or has no such worker."""


class AuthError(GpupoolError):
    """Credentials were refused, or are missing, malformed, expired or revoked.

    Args:
        message: what was refused and what to do about it.
        peer: the coordinator or agent that refused them ("" when refused locally).
        agent_id: the agent, when an agent refused them.
    """

    def __init__(self, message: str, *, peer: str = "", agent_id: str = "") -> None:
        self.peer = peer
        self.agent_id = agent_id
        super().__init__(message)


class UsageError(GpupoolError):
    """The caller misused the API; nothing was sent."""


class UnsupportedDType(UsageError, TypeError):
    """An array dtype gpupool does not carry.

    Args:
        dtype: the offending dtype, as a string.
        supported: the dtypes gpupool carries.
    """

    def __init__(self, dtype: str, supported: tuple[str, ...]) -> None:
        self.dtype = dtype
        self.supported = supported
        super().__init__(f"unsupported dtype {dtype!r}; gpupool carries {', '.join(supported)}")


class ShapeMismatch(UsageError, ValueError):
    """Operand shapes that do not broadcast or multiply.

    Args:
        op: the operation.
        shapes: the operand shapes.
        detail: what is wrong with them.
    """

    def __init__(self, op: str, shapes: tuple[tuple[int, ...], ...], detail: str = "") -> None:
        self.op = op
        self.shapes = shapes
        shown = ", ".join(str(s) for s in shapes)
        super().__init__(f"{op}: shapes {shown} do not match" + (f" ({detail})" if detail else ""))


class ArrayFreed(UsageError):
    """The array was freed, or its pool was closed."""

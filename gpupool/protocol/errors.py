"""Translation between gpupool exceptions and gRPC status, in one place for both sides.

An agent or coordinator that refuses a call aborts with a status code and the trailing metadata
``gpupool-error`` (a kind from :data:`ErrorKind`) and ``gpupool-buffer`` (the buffer concerned).
The client turns that back into the precise exception with :func:`translate_rpc_error`.
"""

from __future__ import annotations

from typing import Final, Literal, NoReturn
from urllib.parse import quote

import grpc

from gpupool import _errors as e

__all__ = [
    "AGENT_KEY",
    "BUFFER_KEY",
    "ERROR_KEY",
    "MOVED_KEY",
    "ErrorKind",
    "RpcRefusal",
    "abort",
    "translate_rpc_error",
]

ERROR_KEY: Final = "gpupool-error"
BUFFER_KEY: Final = "gpupool-buffer"
#: Set by the coordinator when a refusal concerns one agent (``RpcRefusal(extra={"agent": id})``).
AGENT_KEY: Final = "gpupool-agent"
#: Set by an agent refusing a call on a buffer it moved away: ``agent_id|endpoint|worker`` of its new home
#: (``RpcRefusal("buffer-moved", ..., extra={"moved-to": ...})``).
MOVED_KEY: Final = "gpupool-moved-to"

ErrorKind = Literal[
    "bad-request",
    "buffer-not-found",
    "buffer-moved",
    "buffer-exists",
    "out-of-memory",
    "not-accepting",
    "kernel-failed",
    "no-capacity",
    "no-agents",
    "unknown-agent",
    "unknown-session",
    "version-mismatch",
    "not-confirmed",
    "broker-unavailable",
    "unauthenticated",
    "permission-denied",
    "peer-unavailable",
]

_CODES: Final[dict[str, grpc.StatusCode]] = {
    "bad-request": grpc.StatusCode.INVALID_ARGUMENT,
    "buffer-not-found": grpc.StatusCode.NOT_FOUND,
    # The agent moved the buffer to another worker (drain, pause); trailing metadata ``gpupool-moved-to``
    # says where: "agent_id|endpoint|worker" (MOVED_KEY).
    "buffer-moved": grpc.StatusCode.NOT_FOUND,
    "buffer-exists": grpc.StatusCode.ALREADY_EXISTS,
    "out-of-memory": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "not-accepting": grpc.StatusCode.FAILED_PRECONDITION,
    "kernel-failed": grpc.StatusCode.INVALID_ARGUMENT,
    "no-capacity": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "no-agents": grpc.StatusCode.UNAVAILABLE,
    "unknown-agent": grpc.StatusCode.NOT_FOUND,
    "unknown-session": grpc.StatusCode.NOT_FOUND,
    "version-mismatch": grpc.StatusCode.FAILED_PRECONDITION,
    # An admin command was sent but the agent's status did not show it in time.
    "not-confirmed": grpc.StatusCode.DEADLINE_EXCEEDED,
    # The coordinator could not reach the MQTT broker, so a command was not sent.
    "broker-unavailable": grpc.StatusCode.UNAVAILABLE,
    # No credentials, or ones the coordinator or agent does not know (or that expired or were revoked).
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    # Good credentials of the wrong role, or for another session or agent.
    "permission-denied": grpc.StatusCode.PERMISSION_DENIED,
    # An agent pulling rows (Pull) could not read them from another agent: unreachable, dead, stalled.
    "peer-unavailable": grpc.StatusCode.UNAVAILABLE,
}


class RpcRefusal(Exception):
    """Raised inside a servicer to refuse a call; the server's wrapper turns it into a gRPC status.

    Args:
        kind: the precise condition.
        message: words for the caller.
        buffer_id: the buffer concerned, if any.
    """

    def __init__(
        self, kind: ErrorKind, message: str, *, buffer_id: str = "", extra: dict[str, str] | None = None
    ) -> None:
        self.kind: ErrorKind = kind
        self.message = message
        self.buffer_id = buffer_id
        self.extra = dict(extra or {})
        super().__init__(message)

    @property
    def code(self) -> grpc.StatusCode:
        """The gRPC status code for this refusal."""
        return _CODES[self.kind]


def metadata_value(text: str) -> str:
    """``text`` as a metadata value may carry it: printable ASCII kept, anything else percent-encoded
    (a value gRPC cannot send would turn a precise refusal into INTERNAL)."""
    if text.isascii() and text.isprintable():
        return text
    return quote(text, safe="")


async def abort(context: grpc.aio.ServicerContext[object, object], refusal: RpcRefusal) -> NoReturn:
    """End the call with the refusal's status and metadata."""
    extra = tuple((f"gpupool-{key}", metadata_value(value)) for key, value in refusal.extra.items())
    buffer_id = metadata_value(refusal.buffer_id)
    context.set_trailing_metadata(((ERROR_KEY, refusal.kind), (BUFFER_KEY, buffer_id), *extra))
    await context.abort(refusal.code, refusal.message)
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


_REMOTE: Final[dict[str, type[e.RemoteError]]] = {
    "buffer-not-found": e.BufferNotFound,
    "out-of-memory": e.DeviceOutOfMemory,
    "not-accepting": e.AgentNotAccepting,
    "kernel-failed": e.RemoteKernelError,
    "bad-request": e.RemoteKernelError,
    "buffer-exists": e.RemoteKernelError,
}


def _status(exc: grpc.RpcError) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    """Code, details and trailing metadata of a failed call, sync (``grpc.Call``) or async alike."""
    if not isinstance(exc, grpc.aio.AioRpcError | grpc.Call):
        return grpc.StatusCode.UNKNOWN, str(exc) or type(exc).__name__, {}
    code = exc.code()
    details = exc.details() or code.name
    meta: dict[str, str] = {}
    for item in exc.trailing_metadata() or ():
        pair: tuple[object, ...] = tuple(item)  # type: ignore[arg-type]  # grpc-stubs: opaque metadatum
        if len(pair) == 2 and isinstance(pair[0], str) and isinstance(pair[1], str):
            meta[pair[0]] = pair[1]
    return code, details, meta


def translate_rpc_error(exc: grpc.RpcError, *, peer: str, agent_id: str = "") -> e.GpupoolError:
    """The gpupool exception for a failed call (sync or async) to ``peer`` (an agent when ``agent_id``).

    The one translation of gRPC failures in gpupool; the caller raises the result ``from exc``.
    """
    code, details, meta = _status(exc)
    kind = meta.get(ERROR_KEY, "")
    buffer_id = meta.get(BUFFER_KEY, "").split("/", 1)[-1]  # an agent names a session's buffers session/id
    if code == grpc.StatusCode.UNKNOWN and not meta and not isinstance(exc, grpc.Call | grpc.aio.AioRpcError):
        return e.ConnectError(peer, details)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and kind != "not-confirmed":
        return e.DeadlineExceeded(peer, details)
    if kind == "broker-unavailable":
        return e.TransportError(peer, f"the coordinator cannot reach its MQTT broker: {details}")
    if code == grpc.StatusCode.UNAVAILABLE and not kind:
        return e.ConnectError(peer, details)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        what = f"agent {agent_id}" if agent_id else f"the coordinator at {peer}"
        hint = (
            "the coordinator grants capabilities with placements; the session may have ended"
            if agent_id
            else "set GPUPOOL_TOKEN to a token of the pool (`gpupool up` writes one to "
            "<state-dir>/client.env; "
            "an operator makes one with `gpupool token create --role client`)"
        )
        return e.AuthError(
            f"{what} refused the credentials: {details} — {hint}", peer=peer, agent_id=agent_id
        )
    if code == grpc.StatusCode.PERMISSION_DENIED:
        what = f"agent {agent_id}" if agent_id else f"the coordinator at {peer}"
        return e.AuthError(f"{what} refused the call: {details}", peer=peer, agent_id=agent_id)
    if code == grpc.StatusCode.CANCELLED and not kind:
        return e.StreamClosed(peer, details)
    if kind == "no-capacity":
        try:
            return e.NoCapacity(
                int(meta["gpupool-needed"]), int(meta["gpupool-available"]), int(meta["gpupool-workers"])
            )
        except (KeyError, ValueError):
            return e.SchedulingError(details)
    if kind in ("no-agents", "unknown-agent", "unknown-session"):
        return e.PlacementError(details)
    if kind == "version-mismatch":
        return e.ProtocolError(f"{peer}: {details}")
    if kind == "not-confirmed":
        return e.DeadlineExceeded(peer, details)
    if kind == "bad-request" and not agent_id:
        return e.UsageError(f"{peer}: {details}")  # the coordinator refusing a malformed request
    if kind == "buffer-moved":
        to_agent, _, rest = meta.get(MOVED_KEY, "").partition("|")
        to_endpoint, _, worker = rest.partition("|")
        return e.BufferMoved(
            agent_id or peer,
            details,
            buffer_id=buffer_id,
            code=code.name,
            to_agent=to_agent,
            to_endpoint=to_endpoint,
            to_worker=int(worker) if worker.isdigit() else 0,
        )
    # The coordinator names the agent a refusal concerns (an admin command to an offline agent).
    agent_id = agent_id or meta.get(AGENT_KEY, "")
    if agent_id or kind in _REMOTE:
        cls = _REMOTE.get(kind, e.RemoteError)
        if not kind and code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            cls = e.DeviceOutOfMemory  # e.g. a message over the size limit
        return cls(agent_id or peer, details, buffer_id=buffer_id, code=code.name)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return e.UsageError(f"{peer}: {details}")
    return e.TransportError(peer, f"{code.name}: {details}")

"""The bulk byte path between agents: rows of a buffer over a plain TCP (or TLS) socket, with no gRPC.

A pull moves most of its bytes from one agent to another. Over ``DownloadRaw`` every chunk is copied four
times in user space (sliced into ``bytes`` for gRPC, into gRPC's slices, out of them into ``bytes``, into
the result): on a 2-core machine that made moves half as fast as Dask's worker-to-worker transfer. Here
the holder sends the rows' memory as it lies (``socket.sendall`` of a memoryview) and the puller receives
them straight into the result's rows (``recv_into``), so the only copies are the kernel's; both run in
threads, with the GIL released while the bytes move.

One read per connection::

    puller -> holder   MAGIC, u32 length, a serialized DownloadRequest (rows of one buffer),
                       u32 length, the capability (UTF-8; empty on an insecure agent)
    holder -> puller   b"M", u32 length, a serialized ArrayMeta, then exactly that array's bytes
                 or    b"R", u32 length, a JSON refusal {"kind", "message", "buffer_id"} (and "moved_to"
                                   for a buffer-moved refusal: agent_id|endpoint|worker)

Integers are big-endian. The holder checks the capability and confines the buffer id to its session as
its gRPC guard does (:mod:`gpupool.agent.bulk`); where this path cannot be reached (a rig forwarding only
its gRPC port) the puller reads over ``DownloadRaw`` instead (:mod:`gpupool.agent.peers`).

Every function here blocks: call them in a thread, on a socket with a timeout set (each wait for the peer
is then bounded), and pass a ``deadline`` (``time.monotonic()``) for the transfer as a whole.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from typing import Final

from gpupool._errors import FrameDecodeError
from gpupool._proto.v1 import agent_pb2
from gpupool.protocol.errors import ErrorKind, RpcRefusal
from gpupool.protocol.rawstream import decode_message

__all__ = [
    "MAGIC",
    "MAX_CAPABILITY_BYTES",
    "MAX_REQUEST_BYTES",
    "encode_meta",
    "encode_refusal",
    "encode_request",
    "read_reply",
    "read_request",
    "recv_into",
    "send_all",
]

#: Opens every request: a stray connection (or another protocol) is told apart at once.
MAGIC: Final = b"GPB1"
#: Largest serialized DownloadRequest, capability, meta and refusal accepted.
MAX_REQUEST_BYTES: Final = 4096
MAX_CAPABILITY_BYTES: Final = 16384
MAX_META_BYTES: Final = 4096
MAX_REFUSAL_BYTES: Final = 16384

#: Bytes handed to one send or receive call: a deadline is checked between them.
SLICE_BYTES: Final = 16 << 20

_LENGTH: Final = struct.Struct(">I")
_META: Final = b"M"
_REFUSAL: Final = b"R"


def encode_request(request: agent_pb2.DownloadRequest, capability: str) -> bytes:
    """What a puller sends to read ``request``'s rows, showing ``capability``."""
    body = request.SerializeToString()
    token = capability.encode()
    return b"".join((MAGIC, _LENGTH.pack(len(body)), body, _LENGTH.pack(len(token)), token))


def read_request(sock: socket.socket) -> tuple[agent_pb2.DownloadRequest, str]:
    """The holder's side of :func:`encode_request`.

    Raises:
        FrameDecodeError: not this protocol, a field too long, or a request that does not parse.
        ConnectionError: the puller closed the connection early.
        TimeoutError: the puller went quiet past the socket's timeout.
    """
    if _recv_exactly(sock, len(MAGIC)) != MAGIC:
        raise FrameDecodeError("a bulk request", "it does not open with the bulk protocol's magic")
    body = _recv_exactly(sock, _read_length(sock, MAX_REQUEST_BYTES, "a bulk request"))
    token = _recv_exactly(sock, _read_length(sock, MAX_CAPABILITY_BYTES, "a capability"))
    request = decode_message(body, agent_pb2.DownloadRequest, what="a bulk request")
    try:
        return request, token.decode()
    except UnicodeDecodeError as exc:
        raise FrameDecodeError("a capability", str(exc)) from None


def encode_meta(meta: agent_pb2.ArrayMeta) -> bytes:
    """The holder's answer before the rows' bytes: their dtype and shape."""
    body = meta.SerializeToString()
    return b"".join((_META, _LENGTH.pack(len(body)), body))


def encode_refusal(refusal: RpcRefusal) -> bytes:
    """The holder's answer when it will not send the rows."""
    fields = {"kind": refusal.kind, "message": refusal.message[:4000], "buffer_id": refusal.buffer_id[:512]}
    if "moved-to" in refusal.extra:
        fields["moved_to"] = refusal.extra["moved-to"][:1024]
    body = json.dumps(fields).encode()
    return b"".join((_REFUSAL, _LENGTH.pack(len(body)), body))


def read_reply(sock: socket.socket) -> agent_pb2.ArrayMeta | RpcRefusal:
    """The puller's side of :func:`encode_meta` / :func:`encode_refusal`: the meta, or the refusal.

    Raises:
        FrameDecodeError: an answer that is neither.
        ConnectionError, TimeoutError: as :func:`read_request`.
    """
    tag = _recv_exactly(sock, 1)
    if tag == _META:
        body = _recv_exactly(sock, _read_length(sock, MAX_META_BYTES, "a bulk meta"))
        return decode_message(body, agent_pb2.ArrayMeta, what="a bulk meta")
    if tag != _REFUSAL:
        raise FrameDecodeError("a bulk reply", f"unknown tag {tag!r}")
    body = _recv_exactly(sock, _read_length(sock, MAX_REFUSAL_BYTES, "a bulk refusal"))
    try:
        fields = json.loads(body)
        kind: ErrorKind = fields["kind"]
        moved_to = fields.get("moved_to")
        extra = {"moved-to": moved_to} if isinstance(moved_to, str) else None
        return RpcRefusal(
            kind, str(fields["message"]), buffer_id=str(fields.get("buffer_id", "")), extra=extra
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise FrameDecodeError("a bulk refusal", str(exc)) from None


def send_all(sock: socket.socket, data: memoryview, *, deadline: float) -> None:
    """Send every byte of ``data`` (no copy), in slices, by ``deadline``.

    Raises:
        TimeoutError: the deadline passed, or a slice waited past the socket's timeout.
        OSError: the connection broke.
    """
    for offset in range(0, len(data), SLICE_BYTES):
        _check(deadline)
        sock.sendall(data[offset : offset + SLICE_BYTES])


def recv_into(sock: socket.socket, target: memoryview, *, deadline: float) -> None:
    """Fill ``target`` (bytes) from the socket by ``deadline``.

    Raises:
        ConnectionError: the holder closed the connection before ``target`` was full.
        TimeoutError: as :func:`send_all`.
    """
    offset = 0
    size = len(target)
    while offset < size:
        _check(deadline)
        received = sock.recv_into(target[offset:], min(size - offset, SLICE_BYTES))
        if not received:
            raise ConnectionError(f"the connection closed after {offset} of {size} bytes")
        offset += received


def _check(deadline: float) -> None:
    if time.monotonic() > deadline:
        raise TimeoutError("the transfer ran past its deadline")


def _read_length(sock: socket.socket, limit: int, what: str) -> int:
    length: int = _LENGTH.unpack(_recv_exactly(sock, _LENGTH.size))[0]
    if length > limit:
        raise FrameDecodeError(what, f"{length} bytes, more than the {limit} allowed")
    return length


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    buffer = bytearray(size)
    view = memoryview(buffer)
    offset = 0
    while offset < size:
        received = sock.recv_into(view[offset:])
        if not received:
            raise ConnectionError(f"the connection closed after {offset} of {size} bytes")
        offset += received
    return bytes(buffer)

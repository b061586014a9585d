"""Who may use the agent's data plane: each call shows a capability, and touches only its session's buffers.

An enrolled agent serves the ``Agent`` service behind a :class:`Guard`. Before a handler runs, the guard
verifies the call's ``gpupool-capability`` (signed by the coordinator for one session on this agent, short
lived, checked offline with the coordinator's public key), then rewrites the request so the handler sees
only the capability's session: the request's session field is set to it, and every buffer id is
qualified as ``<session>/<id>``. Another session's buffers are thus not just forbidden but unnameable,
and an id a client chose cannot collide with anyone else's. Replies are rewritten back.

The coordinator's own calls (``Inventory`` and ``Forward``, when it moves this agent's buffers away) show a
capability of its own session, :data:`~gpupool.security.capability.COORDINATOR_SESSION`: those calls take
no other, and no other call takes it.

An agent run ``--insecure`` has no guard: calls name their session themselves (a trusted network).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final

import grpc

from gpupool._errors import AuthError, FrameDecodeError
from gpupool._proto.v1 import agent_pb2
from gpupool.protocol.errors import RpcRefusal, abort
from gpupool.protocol.rawstream import decode_message
from gpupool.security.capability import COORDINATOR_SESSION, CapabilityVerifier
from gpupool.transport.rpc import CAPABILITY_KEY

__all__ = ["Guard", "qualify", "unqualify"]

Context = grpc.aio.ServicerContext[Any, Any]

#: Longest buffer id a client may use.
MAX_BUFFER_ID: Final = 256


def qualify(session: str, buffer_id: str) -> str:
    """The agent's own name for a session's buffer."""
    return f"{session}/{buffer_id}"


def unqualify(buffer_id: str) -> str:
    """The client's name for a buffer (what follows the session)."""
    return buffer_id.split("/", 1)[1] if "/" in buffer_id else buffer_id


class Guard:
    """Checks capabilities and confines calls to their session.

    Args:
        verifier: checks capabilities (for this agent, with the coordinator's key).
        clock: seconds since the epoch.
    """

    def __init__(self, verifier: CapabilityVerifier, *, clock: Callable[[], float] = time.time) -> None:
        self._verifier = verifier
        self._clock = clock

    def session_of(self, context: Context, claimed: str = "") -> str:
        """The session the call's capability is for.

        Raises:
            RpcRefusal: ``unauthenticated`` (no capability, or one that does not verify, has expired,
                is for another agent or an ended session); ``permission-denied`` (the request names
                another session).
        """
        token = ""
        for key, value in context.invocation_metadata() or ():
            if key == CAPABILITY_KEY and isinstance(value, str):
                token = value
        return self.session_of_token(token, claimed)

    def session_of_token(self, token: str, claimed: str = "") -> str:
        """:meth:`session_of` for a capability shown some other way than in call metadata (the bulk path).

        Raises:
            RpcRefusal: as :meth:`session_of`.
        """
        if not token:
            raise RpcRefusal(
                "unauthenticated",
                "this agent takes calls only with a capability (gpupool-capability metadata) that the "
                "pool's coordinator grants a session with its placements",
            )
        try:
            capability = self._verifier.verify(token, now=self._clock())
        except AuthError as exc:
            raise RpcRefusal("unauthenticated", str(exc)) from exc
        if capability.session == COORDINATOR_SESSION:
            raise RpcRefusal("permission-denied", "the coordinator's capability is for its own calls only")
        if claimed and claimed != capability.session:
            raise RpcRefusal("permission-denied", "the request names a session other than its capability's")
        return capability.session

    def check_coordinator(self, context: Context) -> None:
        """Refuse a call that does not show the coordinator's own capability for this agent.

        Raises:
            RpcRefusal: ``unauthenticated`` (none, or one that does not verify or has expired),
                ``permission-denied`` (a session's capability).
        """
        token = ""
        for key, value in context.invocation_metadata() or ():
            if key == CAPABILITY_KEY and isinstance(value, str):
                token = value
        if not token:
            raise RpcRefusal("unauthenticated", "this call needs the coordinator's capability")
        try:
            capability = self._verifier.verify(token, now=self._clock())
        except AuthError as exc:
            raise RpcRefusal("unauthenticated", str(exc)) from exc
        if capability.session != COORDINATOR_SESSION:
            raise RpcRefusal("permission-denied", "only the coordinator may make this call")

    # -- each method: authorize, rewrite the request, run the handler, rewrite the reply ------------------

    def upload(
        self,
        handler: Callable[
            [AsyncIterator[agent_pb2.UploadRequest], Context], Awaitable[agent_pb2.UploadReply]
        ],
    ) -> Callable[[AsyncIterator[agent_pb2.UploadRequest], Context], Awaitable[agent_pb2.UploadReply]]:
        """Guard ``Upload``."""

        async def guarded(
            requests: AsyncIterator[agent_pb2.UploadRequest], context: Context
        ) -> agent_pb2.UploadReply:
            try:
                session = self.session_of(context)
            except RpcRefusal as refusal:
                await abort(context, refusal)

            async def rewritten() -> AsyncIterator[agent_pb2.UploadRequest]:
                first = True
                async for request in requests:
                    if first and request.WhichOneof("kind") == "header":
                        _confine_header(request.header, session)
                    first = False
                    yield request

            reply = await handler(rewritten(), context)
            reply.buffer_id = unqualify(reply.buffer_id)
            return reply

        return guarded

    def upload_raw(
        self, handler: Callable[[AsyncIterator[bytes], Context], Awaitable[bytes]]
    ) -> Callable[[AsyncIterator[bytes], Context], Awaitable[bytes]]:
        """Guard ``UploadRaw`` (its first message is a serialized header)."""

        async def guarded(requests: AsyncIterator[bytes], context: Context) -> bytes:
            try:
                session = self.session_of(context)
            except RpcRefusal as refusal:
                await abort(context, refusal)

            async def rewritten() -> AsyncIterator[bytes]:
                first = True
                async for message in requests:
                    if first:
                        try:
                            header = decode_message(message, agent_pb2.UploadHeader, what="an upload header")
                        except FrameDecodeError:
                            yield message  # the handler refuses it with its own words
                        else:
                            _confine_header(header, session)
                            yield header.SerializeToString()
                        first = False
                        continue
                    yield message

            reply_bytes = await handler(rewritten(), context)
            reply = agent_pb2.UploadReply.FromString(reply_bytes)
            reply.buffer_id = unqualify(reply.buffer_id)
            return reply.SerializeToString()

        return guarded

    def download(
        self, handler: Callable[[agent_pb2.DownloadRequest, Context], Awaitable[None]]
    ) -> Callable[[agent_pb2.DownloadRequest, Context], Awaitable[None]]:
        """Guard ``Download``."""

        async def guarded(request: agent_pb2.DownloadRequest, context: Context) -> None:
            try:
                request.buffer_id = _qualified(self.session_of(context), request.buffer_id)
            except RpcRefusal as refusal:
                await abort(context, refusal)
            await handler(request, context)

        return guarded

    def download_raw(
        self, handler: Callable[[bytes, Context], Awaitable[None]]
    ) -> Callable[[bytes, Context], Awaitable[None]]:
        """Guard ``DownloadRaw`` (its request is a serialized DownloadRequest)."""

        async def guarded(data: bytes, context: Context) -> None:
            try:
                session = self.session_of(context)
                request = decode_message(data, agent_pb2.DownloadRequest, what="a download request")
                request.buffer_id = _qualified(session, request.buffer_id)
            except FrameDecodeError as exc:
                await abort(context, RpcRefusal("bad-request", str(exc)))
            except RpcRefusal as refusal:
                await abort(context, refusal)
            await handler(request.SerializeToString(), context)

        return guarded

    def confine_read(self, request: agent_pb2.DownloadRequest, token: str) -> None:
        """Guard a read of the bulk byte path (:mod:`gpupool.agent.bulk`) as ``DownloadRaw`` is guarded: the
        capability ``token`` must hold, and the buffer id is qualified with its session (in place).

        Raises:
            RpcRefusal: as :meth:`session_of`, or bad-request for a buffer id too long.
        """
        request.buffer_id = _qualified(self.session_of_token(token), request.buffer_id)

    def execute(
        self, handler: Callable[[agent_pb2.ExecuteRequest, Context], Awaitable[agent_pb2.ExecuteReply]]
    ) -> Callable[[agent_pb2.ExecuteRequest, Context], Awaitable[agent_pb2.ExecuteReply]]:
        """Guard ``Execute``: every output, input, fetch and free is the session's."""

        async def guarded(request: agent_pb2.ExecuteRequest, context: Context) -> agent_pb2.ExecuteReply:
            try:
                session = self.session_of(context, request.session)
                request.session = session
                for op in request.ops:
                    _confine_op(op, session)
                request.fetch[:] = [_qualified(session, b) for b in request.fetch]
                request.free[:] = [_qualified(session, b) for b in request.free]
            except RpcRefusal as refusal:
                await abort(context, refusal)
            reply = await handler(request, context)
            for fetched in reply.fetched:
                fetched.buffer_id = unqualify(fetched.buffer_id)
            return reply

        return guarded

    def pull(
        self, handler: Callable[[agent_pb2.PullRequest, Context], Awaitable[agent_pb2.PullReply]]
    ) -> Callable[[agent_pb2.PullRequest, Context], Awaitable[agent_pb2.PullReply]]:
        """Guard ``Pull``: the output and this agent's own sources are the session's.

        A remote source's buffer id is left as the client named it: the agent holding it confines it to
        the session of the capability shown there, which the puller checks is this call's
        (:meth:`gpupool.agent.peers.Peers.resolve`).
        """

        async def guarded(request: agent_pb2.PullRequest, context: Context) -> agent_pb2.PullReply:
            try:
                session = self.session_of(context, request.session)
                request.session = session
                request.output = _qualified(session, request.output)
                for source in request.sources:
                    if source.agent_id == self._verifier.agent_id:
                        source.buffer_id = _qualified(session, source.buffer_id)
                    elif len(source.buffer_id) > MAX_BUFFER_ID:
                        raise RpcRefusal("bad-request", f"a buffer id longer than {MAX_BUFFER_ID} characters")
            except RpcRefusal as refusal:
                await abort(context, refusal)
            reply = await handler(request, context)
            reply.buffer_id = unqualify(reply.buffer_id)
            return reply

        return guarded

    def run_python(
        self, handler: Callable[[agent_pb2.RunPythonRequest, Context], Awaitable[agent_pb2.RunPythonReply]]
    ) -> Callable[[agent_pb2.RunPythonRequest, Context], Awaitable[agent_pb2.RunPythonReply]]:
        """Guard ``RunPython``: a capability of this agent, for the session the request names (if any)."""

        async def guarded(request: agent_pb2.RunPythonRequest, context: Context) -> agent_pb2.RunPythonReply:
            try:
                request.session = self.session_of(context, request.session)
            except RpcRefusal as refusal:
                await abort(context, refusal)
            return await handler(request, context)

        return guarded

    def inventory(
        self, handler: Callable[[agent_pb2.InventoryRequest, Context], Awaitable[agent_pb2.InventoryReply]]
    ) -> Callable[[agent_pb2.InventoryRequest, Context], Awaitable[agent_pb2.InventoryReply]]:
        """Guard ``Inventory``: the coordinator's only; each buffer id as its session names it."""

        async def guarded(request: agent_pb2.InventoryRequest, context: Context) -> agent_pb2.InventoryReply:
            try:
                self.check_coordinator(context)
            except RpcRefusal as refusal:
                await abort(context, refusal)
            reply = await handler(request, context)
            for buffer in reply.buffers:
                buffer.buffer_id = _session_name(buffer.session, buffer.buffer_id)
            return reply

        return guarded

    def forward(
        self, handler: Callable[[agent_pb2.ForwardRequest, Context], Awaitable[agent_pb2.ForwardReply]]
    ) -> Callable[[agent_pb2.ForwardRequest, Context], Awaitable[agent_pb2.ForwardReply]]:
        """Guard ``Forward``: the coordinator's only; each buffer id qualified with the session it names."""

        async def guarded(request: agent_pb2.ForwardRequest, context: Context) -> agent_pb2.ForwardReply:
            try:
                self.check_coordinator(context)
                for home in request.moves:
                    if not home.session:
                        raise RpcRefusal(
                            "bad-request", f"a move of buffer {home.buffer_id[:64]!r} names no session"
                        )
                    home.buffer_id = _qualified(home.session, home.buffer_id)
            except RpcRefusal as refusal:
                await abort(context, refusal)
            reply = await handler(request, context)
            for home in reply.missing:
                home.buffer_id = _session_name(home.session, home.buffer_id)
            return reply

        return guarded

    def free(
        self, handler: Callable[[agent_pb2.FreeRequest, Context], Awaitable[agent_pb2.FreeReply]]
    ) -> Callable[[agent_pb2.FreeRequest, Context], Awaitable[agent_pb2.FreeReply]]:
        """Guard ``Free``: by id within the session, or the whole session."""

        async def guarded(request: agent_pb2.FreeRequest, context: Context) -> agent_pb2.FreeReply:
            try:
                session = self.session_of(context, request.session)
                request.session = session
                request.buffer_ids[:] = [_qualified(session, b) for b in request.buffer_ids]
            except RpcRefusal as refusal:
                await abort(context, refusal)
            return await handler(request, context)

        return guarded


def _session_name(session: str, buffer_id: str) -> str:
    """A registry id (``<session>/<id>``) as the session names it."""
    return buffer_id.removeprefix(f"{session}/")


def _qualified(session: str, buffer_id: str) -> str:
    if len(buffer_id) > MAX_BUFFER_ID:
        raise RpcRefusal("bad-request", f"a buffer id longer than {MAX_BUFFER_ID} characters")
    return qualify(session, buffer_id) if buffer_id else buffer_id


def _confine_op(op: agent_pb2.Op, session: str) -> None:
    """Qualify every buffer id an op names with ``session``: its output(s), its buffer inputs and, for a
    loop, every name in its body (carried values, the counter, the body's ops, recursively), so that a
    loop body cannot name another session's buffer either."""
    op.output = _qualified(session, op.output)
    op.outputs[:] = [_qualified(session, name) for name in op.outputs]
    for operand in op.inputs:
        if operand.WhichOneof("kind") == "buffer":
            operand.buffer = _qualified(session, operand.buffer)
    if op.HasField("loop"):
        loop = op.loop
        loop.carry[:] = [_qualified(session, name) for name in loop.carry]
        loop.next[:] = [_qualified(session, name) for name in loop.next]
        loop.counter = _qualified(session, loop.counter)
        for body_op in loop.body:
            _confine_op(body_op, session)


def _confine_header(header: agent_pb2.UploadHeader, session: str) -> None:
    if header.session and header.session != session:
        raise RpcRefusal("permission-denied", "the upload names a session other than its capability's")
    header.session = session
    header.buffer_id = _qualified(session, header.buffer_id)

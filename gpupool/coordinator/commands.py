"""Admin commands to agents: sent on the agent's commands topic, confirmed by the agent's next status.

The coordinator does not change an agent's state itself: the agent applies the command and republishes
its retained status, and only that status, seen in the registry, confirms the command.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from typing import Final

from google.protobuf.timestamp_pb2 import Timestamp

from gpupool._errors import AgentNotAccepting, DeadlineExceeded
from gpupool._proto.v1 import control_pb2
from gpupool._proto.v1.control_pb2 import AgentCommand, AgentStatus, CommandKind
from gpupool.coordinator.registry import Registry, state_name
from gpupool.protocol.codec import encode_json
from gpupool.protocol.topics import Topics

__all__ = ["TARGET_STATE", "AgentCommander", "Publish"]

Publish = Callable[[str, bytes], Awaitable[None]]
"""Sends ``payload`` on ``topic`` (QoS 1, not retained), raising ConnectError or DeadlineExceeded."""

#: The state an agent's status shows once it has applied each command.
TARGET_STATE: Final[dict[int, int]] = {
    control_pb2.COMMAND_KIND_DRAIN: control_pb2.AGENT_STATE_DRAINING,
    control_pb2.COMMAND_KIND_CORDON: control_pb2.AGENT_STATE_CORDONED,
    control_pb2.COMMAND_KIND_UNCORDON: control_pb2.AGENT_STATE_READY,
}


class AgentCommander:
    """Sends commands and waits for their confirmation.

    The owner calls :meth:`status_applied` after every status it applies to the registry, from the
    same event loop.

    Args:
        registry: where agents' statuses land.
        topics: the pool's topic names.
        publish: how to send a message to the broker.
        timeout: seconds to wait for the agent's status to show the command (``Timeouts.command``).
        sign: signs each command in place (agents of a secured pool obey only signed commands).
    """

    def __init__(
        self,
        *,
        registry: Registry,
        topics: Topics,
        publish: Publish,
        timeout: float,
        sign: Callable[[AgentCommand], None] | None = None,
    ) -> None:
        self._registry = registry
        self._topics = topics
        self._publish = publish
        self._timeout = timeout
        self._sign = sign
        self._changed = asyncio.Event()

    def _command(
        self,
        agent_id: str,
        kind: CommandKind,
        reason: str = "",
        session: str = "",
        *,
        keep_buffers: bool = False,
    ) -> AgentCommand:
        issued = Timestamp()
        issued.GetCurrentTime()
        command = AgentCommand(
            command_id=secrets.token_hex(6),
            kind=kind,
            reason=reason,
            issued=issued,
            session=session,
            agent_id=agent_id,
            keep_buffers=keep_buffers,
        )
        if self._sign is not None:
            self._sign(command)
        return command

    async def end_session(self, agent_id: str, session: str) -> None:
        """Tell the agent a session ended (it frees the session's buffers); no confirmation awaited.

        Raises:
            ConnectError, DeadlineExceeded: the broker did not take the command.
        """
        command = self._command(agent_id, control_pb2.COMMAND_KIND_END_SESSION, session=session)
        await self._publish(self._topics.commands(agent_id), encode_json(command))

    def status_applied(self) -> None:
        """Wake every command waiting for a status."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def send(
        self, agent_id: str, kind: CommandKind, reason: str, *, keep_buffers: bool = False
    ) -> tuple[AgentStatus, str]:
        """Send ``kind`` to the agent and return its confirming status and the command's id (a DRAIN with
        ``keep_buffers`` asks the agent not to have its buffers moved away).

        Raises:
            AgentNotAccepting: the agent is offline, or went offline before confirming.
            ConnectError: the broker could not be reached, so the command was not sent.
            DeadlineExceeded: the broker did not take the command, or the agent's status did not show
                it within the deadline (the command may still take effect later).
        """
        target = TARGET_STATE[kind]
        entry = self._registry.get(agent_id)
        if entry is None or entry.state == control_pb2.AGENT_STATE_OFFLINE:
            raise AgentNotAccepting(agent_id, "is offline; commands cannot reach it")
        command = self._command(agent_id, kind, reason, keep_buffers=keep_buffers)
        await self._publish(self._topics.commands(agent_id), encode_json(command))
        try:
            async with asyncio.timeout(self._timeout):
                while True:
                    entry = self._registry.get(agent_id)
                    if entry is None or entry.state == control_pb2.AGENT_STATE_OFFLINE:
                        raise AgentNotAccepting(
                            agent_id, f"went offline before confirming command {command.command_id}"
                        )
                    if entry.state == target:
                        confirmed = AgentStatus()
                        confirmed.CopyFrom(entry.status)
                        return confirmed, command.command_id
                    await self._changed.wait()
        except TimeoutError as exc:
            shown = state_name(entry.state) if entry is not None else "unknown"
            raise DeadlineExceeded(
                agent_id,
                f"command {command.command_id} ({CommandKind.Name(kind)}) was sent, but the agent's status "
                f"still shows {shown}, not {state_name(target)}, after {self._timeout:g} s",
            ) from exc

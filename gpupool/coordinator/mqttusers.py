"""Agents' MQTT users, created and deleted through Mosquitto's dynamic-security plugin.

Each enrolled agent gets a user named by its agent id and a role, ``gpupool-agent-<id>``, that lets it
publish only its own status and telemetry and subscribe only to its own commands. Commands travel as the
plugin's JSON (``{"commands": [...]}``) on ``$CONTROL/dynamic-security/v1``; the plugin answers every
command on ``$CONTROL/dynamic-security/v1/response``, echoing its ``correlationData``, which is how
answers find their callers. The broker must run the plugin (:mod:`gpupool.broker.secure`), and the
coordinator must be logged in as its admin user.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any, Final

from gpupool._config import Timeouts
from gpupool._errors import DeadlineExceeded, ProtocolError, UsageError
from gpupool.protocol.topics import COORDINATOR_MQTT_USER, DYNSEC_CONTROL_TOPIC, DYNSEC_RESPONSE_TOPIC, Topics

__all__ = [
    "CONTROL_RESPONSE_TOPIC",
    "CONTROL_TOPIC",
    "MqttUsers",
    "agent_acls",
    "agent_role",
]

log = logging.getLogger(__name__)

# The same names as gpupool.broker.secure, which the coordinator does not import.
CONTROL_TOPIC: Final = DYNSEC_CONTROL_TOPIC
CONTROL_RESPONSE_TOPIC: Final = DYNSEC_RESPONSE_TOPIC
ADMIN_USERNAME: Final = COORDINATOR_MQTT_USER

Publish = Callable[[str, bytes], Awaitable[None]]
"""Publishes ``(topic, payload)`` with QoS 1; raises ConnectError or DeadlineExceeded."""


def agent_role(agent_id: str) -> str:
    """The name of the agent's role."""
    return f"gpupool-agent-{agent_id}"


def agent_acls(topics: Topics, agent_id: str) -> list[dict[str, Any]]:
    """The agent's ACLs: publish its status and telemetry, subscribe to and receive its commands."""

    def allow(acltype: str, topic: str) -> dict[str, Any]:
        return {"acltype": acltype, "topic": topic, "allow": True, "priority": 0}

    return [
        allow("publishClientSend", topics.status(agent_id)),
        allow("publishClientSend", topics.telemetry(agent_id)),
        allow("subscribePattern", topics.commands(agent_id)),
        allow("publishClientReceive", topics.commands(agent_id)),
    ]


@dataclass(frozen=True, slots=True)
class _Reply:
    """The plugin's answer to one command."""

    command: str
    error: str | None


class MqttUsers:
    """Creates and deletes agents' MQTT users over a connection somebody else owns.

    The owner subscribes to :data:`CONTROL_RESPONSE_TOPIC` before the first call and hands every payload
    on it to :meth:`handle_response`; answers to other administrators' commands are ignored. Calls are
    serialised, one batch of commands in flight at a time.

    Args:
        publish: publishes ``(topic, payload)`` with QoS 1 on the admin's connection.
        topics: the pool's topic names, for the agents' ACLs.
        timeouts: ``rpc`` bounds each call, both batches of :meth:`ensure_agent` included.
        reserved: user names no agent may take (the coordinator's own).
    """

    def __init__(
        self,
        *,
        publish: Publish,
        topics: Topics,
        timeouts: Timeouts = Timeouts(),
        reserved: Collection[str] = (ADMIN_USERNAME,),
    ) -> None:
        self._publish = publish
        self._topics = topics
        self._timeouts = timeouts
        self._reserved = frozenset(reserved)
        self._token = secrets.token_hex(4)  # tells our answers from other administrators'
        self._serial = 0
        self._pending: dict[str, asyncio.Future[_Reply]] = {}
        self._lock = asyncio.Lock()

    async def ensure_agent(self, agent_id: str, password: str) -> None:
        """Create the agent's user and role, or reset an existing user's password and role.

        Resetting disconnects the agent's current session (Mosquitto enforces changes that way).

        Raises:
            UsageError: an agent id that cannot be a user name or topic level, or an empty password.
            ProtocolError: the broker refused a command (the reason is in the message).
            DeadlineExceeded: no answer within ``timeouts.rpc``.
            ConnectError: not connected to the broker.
        """
        self._check_agent_id(agent_id)
        if not password:
            raise UsageError(f"agent {agent_id}: an MQTT password may not be empty")
        role = agent_role(agent_id)
        acls = agent_acls(self._topics, agent_id)
        async with self._deadline("ensure", agent_id):
            created_role, created_client = await self._send(
                agent_id,
                [
                    {"command": "createRole", "rolename": role, "acls": acls},
                    {
                        "command": "createClient",
                        "username": agent_id,
                        "password": password,
                        "textname": f"gpupool agent {agent_id}",
                        "roles": [{"rolename": role}],
                    },
                ],
                tolerated=("Role already exists", "Client already exists"),
            )
            repairs: list[dict[str, Any]] = []
            if created_role.error is not None:
                repairs.append({"command": "modifyRole", "rolename": role, "acls": acls})
            if created_client.error is not None:
                # modifyClient, not setClientPassword + addClientRole: in Mosquitto 2.0 adding a role
                # the client already has answers "Internal error".
                repairs.append(
                    {
                        "command": "modifyClient",
                        "username": agent_id,
                        "password": password,
                        "roles": [{"rolename": role}],
                    }
                )
            if repairs:
                await self._send(agent_id, repairs)

    async def delete_agent(self, agent_id: str) -> None:
        """Delete the agent's user and role; one already gone is fine.

        The agent's current session is disconnected and it cannot log in again.

        Raises:
            UsageError: an agent id that cannot be a user name or topic level.
            ProtocolError: the broker refused a command.
            DeadlineExceeded: no answer within ``timeouts.rpc``.
            ConnectError: not connected to the broker.
        """
        self._check_agent_id(agent_id)
        async with self._deadline("delete", agent_id):
            await self._send(
                agent_id,
                [
                    {"command": "deleteClient", "username": agent_id},
                    {"command": "deleteRole", "rolename": agent_role(agent_id)},
                ],
                tolerated=("Client not found", "Role not found"),
            )

    def handle_response(self, payload: bytes) -> None:
        """Deliver the plugin's answers in one payload from :data:`CONTROL_RESPONSE_TOPIC`."""
        try:
            responses = json.loads(payload)["responses"]
            replies = [
                (str(r["correlationData"]), _Reply(str(r["command"]), _text_or_none(r.get("error"))))
                for r in responses
                if isinstance(r, dict) and "correlationData" in r
            ]
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("dynamic-security answer we cannot read (%s): %.200r", exc, payload)
            return
        for correlation, reply in replies:
            future = self._pending.pop(correlation, None)
            if future is not None and not future.done():
                future.set_result(reply)

    def _check_agent_id(self, agent_id: str) -> None:
        if not agent_id or any(c in agent_id for c in "/+#\0") or agent_id in self._reserved:
            raise UsageError(
                f"agent id {agent_id!r} cannot be an MQTT user name and topic level "
                "(empty, holding '/', '+' or '#', or the coordinator's own name)"
            )

    @contextlib.asynccontextmanager
    async def _deadline(self, what: str, agent_id: str) -> AsyncIterator[None]:
        """Bound a call by ``timeouts.rpc``, raising DeadlineExceeded when it runs out."""
        try:
            async with asyncio.timeout(self._timeouts.rpc):
                yield
        except TimeoutError as exc:
            raise DeadlineExceeded(
                CONTROL_TOPIC,
                f"no answer to {what} for agent {agent_id} within {self._timeouts.rpc:g} s (is the admin "
                f"subscribed to {CONTROL_RESPONSE_TOPIC} and allowed to publish to {CONTROL_TOPIC}?)",
            ) from exc

    async def _send(
        self, agent_id: str, commands: list[dict[str, Any]], *, tolerated: Collection[str] = ()
    ) -> list[_Reply]:
        """Send one batch and wait for every answer; raise on an error not ``tolerated``."""
        async with self._lock:
            loop = asyncio.get_running_loop()
            futures: list[asyncio.Future[_Reply]] = []
            for command in commands:
                self._serial += 1
                command["correlationData"] = f"gpupool-{self._token}-{self._serial}"
                futures.append(loop.create_future())
                self._pending[command["correlationData"]] = futures[-1]
            try:
                await self._publish(CONTROL_TOPIC, json.dumps({"commands": commands}).encode())
                replies = [await future for future in futures]
            finally:
                for command in commands:
                    self._pending.pop(command["correlationData"], None)
        for reply in replies:
            if reply.error is not None and reply.error not in tolerated:
                raise ProtocolError(f"the broker refused {reply.command} for agent {agent_id}: {reply.error}")
        return replies


def _text_or_none(value: object) -> str | None:
    return None if value is None else str(value)

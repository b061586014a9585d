"""A simulated agent for the coordinator's tests: a real aiomqtt client speaking the control-plane protocol.

It publishes a retained AgentStatus with an OFFLINE last will, publishes telemetry when asked, and
answers commands as the real agent does: apply, then republish the retained status. It has no data plane.

Run as a script (``python simagent.py --broker URL --prefix P --id ID``) it connects, publishes its
status, prints a ready line and holds the connection until killed: killing it drops the connection
without an MQTT DISCONNECT, so the broker publishes the last will.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import time
from collections.abc import Sequence
from types import TracebackType

import aiomqtt
from google.protobuf.timestamp_pb2 import Timestamp

from gpupool._config import parse_broker_url
from gpupool._process import announce_ready
from gpupool._proto.v1 import control_pb2
from gpupool._proto.v1.control_pb2 import AgentCommand, AgentStatus, AgentTelemetry, Worker, WorkerTelemetry
from gpupool.protocol.codec import decode_json, encode_json
from gpupool.protocol.topics import Topics

READY = control_pb2.AGENT_STATE_READY
CORDONED = control_pb2.AGENT_STATE_CORDONED
DRAINING = control_pb2.AGENT_STATE_DRAINING
OFFLINE = control_pb2.AGENT_STATE_OFFLINE

_AFTER_COMMAND = {
    control_pb2.COMMAND_KIND_DRAIN: DRAINING,
    control_pb2.COMMAND_KIND_CORDON: CORDONED,
    control_pb2.COMMAND_KIND_UNCORDON: READY,
}


def now_stamp() -> Timestamp:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp


class SimulatedAgent:
    """One simulated agent.

    Args:
        broker_url: the broker.
        topics: the test's topics.
        agent_id: its id.
        name: its name.
        workers: ``(memory_limit, memory_used)`` per worker.
        state: the state it starts in.
        answer_commands: False for an agent that ignores commands (to test the admin deadline).
    """

    def __init__(
        self,
        broker_url: str,
        topics: Topics,
        agent_id: str,
        *,
        name: str = "",
        workers: Sequence[tuple[int, int]] = ((1 << 30, 0),),
        state: int = READY,
        answer_commands: bool = True,
    ) -> None:
        self.topics = topics
        self.agent_id = agent_id
        self.answer_commands = answer_commands
        self.commands: list[AgentCommand] = []
        self.status = AgentStatus(
            agent_id=agent_id,
            name=name or f"sim-{agent_id}",
            version="0.1.0",
            endpoint=f"127.0.0.1:{40000 + sum(map(ord, agent_id)) % 20000}",
            state=state,  # type: ignore[arg-type]
            backend="numpy",
            workers=[
                Worker(index=i, backend="numpy", memory_limit=lim, memory_used=used)
                for i, (lim, used) in enumerate(workers)
            ],
            hostname="simhost",
            started=now_stamp(),
            updated=now_stamp(),
        )
        will = AgentStatus()
        will.CopyFrom(self.status)
        will.state = OFFLINE
        broker = parse_broker_url(broker_url)
        self._client = aiomqtt.Client(
            broker.host,
            broker.port,
            identifier=f"sim-{agent_id}-{time.monotonic_ns() % 1_000_000}",
            will=aiomqtt.Will(topics.status(agent_id), encode_json(will), qos=1, retain=True),
            keepalive=10,
            timeout=10,
        )
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> SimulatedAgent:
        async with asyncio.timeout(10):
            await self._client.__aenter__()
            await self._client.subscribe(self.topics.commands(self.agent_id), qos=1)
        self._reader = asyncio.create_task(self._read(), name=f"sim[{self.agent_id}].read")
        await self.publish_status()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
            async with asyncio.timeout(5):
                # Leave nothing retained behind on a shared broker.
                await self._client.publish(self.topics.status(self.agent_id), b"", qos=1, retain=True)
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
            async with asyncio.timeout(5):
                await self._client.__aexit__(None, None, None)

    async def publish_status(self, **changes: object) -> None:
        """Publish the retained status, after setting the given fields (``state=CORDONED``)."""
        for key, value in changes.items():
            setattr(self.status, key, value)
        self.status.updated.GetCurrentTime()
        async with asyncio.timeout(10):
            await self._client.publish(
                self.topics.status(self.agent_id), encode_json(self.status), qos=1, retain=True
            )

    async def publish_telemetry(self, used: Sequence[int]) -> None:
        """Publish telemetry with these bytes used per worker."""
        telemetry = AgentTelemetry(
            agent_id=self.agent_id,
            time=now_stamp(),
            workers=[
                WorkerTelemetry(index=w.index, memory_limit=w.memory_limit, memory_used=u)
                for w, u in zip(self.status.workers, used, strict=True)
            ],
        )
        async with asyncio.timeout(10):
            await self._client.publish(self.topics.telemetry(self.agent_id), encode_json(telemetry), qos=0)

    async def _read(self) -> None:
        try:
            await self._answer()
        except aiomqtt.MqttError:
            pass  # the broker went away (a test that restarts it)

    async def _answer(self) -> None:
        async for message in self._client.messages:
            if self.topics.parse(message.topic.value) != (self.agent_id, "commands"):
                continue
            payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
            command = decode_json(payload, AgentCommand, what="command")
            self.commands.append(command)
            # END_SESSION changes no state (a real agent frees the session's buffers): nothing to publish.
            if self.answer_commands and command.kind in _AFTER_COMMAND:
                await self.publish_status(state=_AFTER_COMMAND[command.kind])


async def clear_retained(broker_url: str, topics: Topics, agent_ids: Sequence[str]) -> None:
    """Remove retained statuses a test left on the broker (a last will's, say)."""
    broker = parse_broker_url(broker_url)
    async with asyncio.timeout(10), aiomqtt.Client(broker.host, broker.port) as client:
        for agent_id in agent_ids:
            await client.publish(topics.status(agent_id), b"", qos=1, retain=True)


async def _hold(broker_url: str, prefix: str, agent_id: str) -> None:
    async with SimulatedAgent(broker_url, Topics(prefix), agent_id):
        announce_ready("simagent", agent_id=agent_id)
        stopped = asyncio.Event()  # held until the test stops it (SIGTERM) or kills it, an hour at most
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopped.set)
        await asyncio.wait_for(stopped.wait(), 3600)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--broker", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--id", required=True)
    args = parser.parse_args()
    asyncio.run(_hold(args.broker, args.prefix, args.id))

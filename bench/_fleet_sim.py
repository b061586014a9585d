"""Many simulated agents in one process, for the fleet section: ``python -m bench._fleet_sim ...``.

Each simulated agent is a real aiomqtt client with its own MQTT session: a last will (its status with
state OFFLINE, retained, QoS 1), a subscription to its commands topic, and a retained READY
:class:`AgentStatus` shaped like a real rig's (one CuPy worker with a GpuInfo, a memory limit and use,
an endpoint, a name, a version). It has no data plane and answers no commands.

Protocol with the bench (lines on stdin and stdout):
    1. connect every client (CONNECT with the will, SUBSCRIBE), then print
       ``{"event": "ready", "role": "fleet-sim", "agents": N, "connect_s": S}``;
    2. on a ``go`` line on stdin, publish every agent's status at once and wait for every PUBACK, then
       print ``{"event": "published", "agents": N, "publish_s": S}`` (S from reading ``go``); from then
       on each agent publishes telemetry every ``--telemetry`` seconds (QoS 0, as the real agent does
       at its heartbeat), the agents of the process taking turns evenly over that period;
    3. hold the sessions until killed: SIGKILL drops every connection without an MQTT DISCONNECT, so
       the broker publishes the wills. End of stdin (the bench died) ends the process the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

import aiomqtt
from google.protobuf.timestamp_pb2 import Timestamp

from gpupool._config import parse_broker_url
from gpupool._proto.v1 import control_pb2
from gpupool._proto.v1.control_pb2 import AgentStatus, AgentTelemetry, GpuInfo, Worker, WorkerTelemetry
from gpupool._version import __version__
from gpupool.protocol.codec import encode_json
from gpupool.protocol.topics import Topics

GIB = 1 << 30
#: Concurrent CONNECTs per process: enough to be quick, few enough not to overflow the broker's backlog.
CONNECTING_AT_ONCE = 50


def agent_id(run: str, number: int) -> str:
    """The id of simulated agent ``number`` of a run (12 characters, like a real agent id)."""
    return f"{run[:4]}{number:08x}"


def agent_status(run: str, number: int) -> AgentStatus:
    """A READY status like a rig with one 8 GiB GTX 1070 on an x1 riser would publish."""
    stamp = Timestamp()
    stamp.GetCurrentTime()
    memory_total = 8 * GIB
    used = (number % 7) * 64 * (1 << 20)
    gpu = GpuInfo(
        index=0,
        uuid=f"GPU-{run}-{number:08x}-0000-0000-000000000000",
        model="NVIDIA GeForce GTX 1070",
        memory_total=memory_total,
        memory_free=memory_total - used - 300 * (1 << 20),
        compute_capability="6.1",
        pcie_generation=1,
        pcie_width=1,
        pcie_max_generation=3,
        pcie_max_width=16,
        driver_version="550.120",
    )
    rig, gpu_number = divmod(number, 8)
    return AgentStatus(
        schema_version=1,
        agent_id=agent_id(run, number),
        name=f"rig{rig:04d}-gpu{gpu_number}",
        version=__version__,
        endpoint=f"10.{number >> 16 & 255}.{number >> 8 & 255}.{number & 255}:50052",
        state=control_pb2.AGENT_STATE_READY,
        backend="cupy",
        workers=[
            Worker(
                index=0,
                backend="cupy",
                gpu=gpu,
                memory_limit=memory_total * 8 // 10,
                memory_used=used,
                buffers=number % 7,
            )
        ],
        hostname=f"rig{rig:04d}",
        updated=stamp,
        started=stamp,
    )


def agent_telemetry(status: AgentStatus, beat: int) -> bytes:
    """The telemetry the agent of ``status`` sends at heartbeat number ``beat``."""
    stamp = Timestamp()
    stamp.GetCurrentTime()
    worker = status.workers[0]
    report = AgentTelemetry(
        schema_version=1,
        agent_id=status.agent_id,
        time=stamp,
        workers=[
            WorkerTelemetry(
                index=0,
                memory_used=worker.memory_used,
                memory_limit=worker.memory_limit,
                buffers=worker.buffers,
                gpu_memory_free=worker.gpu.memory_free,
                utilization_percent=float(beat * 7 % 100),
                temperature_c=55.0 + beat % 10,
                power_w=90.0 + beat % 30,
            )
        ],
        ops_executed=beat * 3,
        bytes_received=beat << 20,
        bytes_sent=beat << 19,
    )
    return encode_json(report)


class Fleet:
    """The simulated agents ``first .. first + count - 1`` of a run, each with its own MQTT session."""

    def __init__(self, broker_url: str, prefix: str, run: str, first: int, count: int) -> None:
        self._broker = parse_broker_url(broker_url)
        self._topics = Topics(prefix)
        self._run = run
        self._numbers = range(first, first + count)
        self._clients: dict[int, aiomqtt.Client] = {}
        self._statuses: dict[int, AgentStatus] = {}

    async def connect(self) -> None:
        """Open every session: CONNECT with the last will, then SUBSCRIBE to the commands topic."""
        gate = asyncio.Semaphore(CONNECTING_AT_ONCE)

        async def one(number: int) -> None:
            status = agent_status(self._run, number)
            self._statuses[number] = status
            will = AgentStatus()
            will.CopyFrom(status)
            will.state = control_pb2.AGENT_STATE_OFFLINE
            will.note = "last will: the agent dropped off the broker"
            client = aiomqtt.Client(
                self._broker.host,
                self._broker.port,
                identifier=f"fleet-{self._run}-{number}",
                will=aiomqtt.Will(
                    self._topics.status(status.agent_id), encode_json(will), qos=1, retain=True
                ),
                clean_session=True,
                keepalive=10,  # the real agent's MqttSession default
                timeout=30,
            )
            async with gate:
                await client.__aenter__()  # never left: the process is killed with the sessions open
                await client.subscribe(self._topics.commands(status.agent_id), qos=1)
            self._clients[number] = client

        async with asyncio.TaskGroup() as group:
            for number in self._numbers:
                group.create_task(one(number))

    async def publish(self) -> None:
        """Publish every agent's retained status at once; return when the broker acknowledged all."""
        async with asyncio.TaskGroup() as group:
            for number, client in self._clients.items():
                topic = self._topics.status(agent_id(self._run, number))
                payload = encode_json(self._statuses[number])
                group.create_task(client.publish(topic, payload, qos=1, retain=True))

    async def send_telemetry(self, every: float) -> None:
        """Forever: each agent's telemetry every ``every`` seconds, one agent after another."""
        beat = 0
        pause = every / max(1, len(self._clients))
        next_at = time.monotonic()
        while True:
            beat += 1
            for number, client in self._clients.items():
                status = self._statuses[number]
                topic = self._topics.telemetry(status.agent_id)
                await client.publish(topic, agent_telemetry(status, beat), qos=0)
                next_at += pause
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))


def _exit_on_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        print(f"fleet-sim: {task.exception()!r}", file=sys.stderr, flush=True)
        os._exit(1)


def _say(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


async def _main(args: argparse.Namespace) -> None:
    fleet = Fleet(args.broker, args.prefix, args.run, args.first, args.count)
    started = time.perf_counter()
    await fleet.connect()
    _say(event="ready", role="fleet-sim", agents=args.count, connect_s=time.perf_counter() - started)
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    while (line := await stdin.readline()) and line.strip() != b"go":
        pass
    if not line:
        os._exit(0)  # the bench went away before saying go
    started = time.perf_counter()
    await fleet.publish()
    _say(event="published", agents=args.count, publish_s=time.perf_counter() - started)
    if args.telemetry > 0:
        telemetry = asyncio.create_task(fleet.send_telemetry(args.telemetry))
        telemetry.add_done_callback(_exit_on_failure)
    await stdin.read()  # hold the sessions until killed, or until the bench goes away
    os._exit(0)  # no DISCONNECT: the broker publishes the wills, as after a crash


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench._fleet_sim", description=__doc__)
    parser.add_argument("--broker", required=True, help="mqtt://host:port")
    parser.add_argument("--prefix", required=True, help="the run's topic prefix")
    parser.add_argument("--run", required=True, help="a short hex run id, part of every agent id")
    parser.add_argument("--first", type=int, default=0, help="number of the first agent")
    parser.add_argument("--count", type=int, required=True, help="how many agents")
    parser.add_argument(
        "--telemetry", type=float, default=3.0, help="seconds between an agent's telemetry (0: none)"
    )
    asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()

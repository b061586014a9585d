"""The fleet section: the coordinator with 1,000 agents on a real broker.

What runs: an MQTT broker (our own Mosquitto, configured by :func:`gpupool.broker.start_broker` with
``set_tcp_nodelay true``, unless ``--broker`` names one); the coordinator as its own process
(``python -m gpupool.coordinator``, on a topic prefix of this run's own); and the simulated agents,
250 real MQTT sessions per subprocess (:mod:`bench._fleet_sim`), each with an OFFLINE last will, a
retained READY status like a one-GPU rig's, and telemetry every 3 s once registered, as the real agent
sends at its default heartbeat. Everything shares this machine's two cores with the bench itself, so
the figures are pessimistic next to a coordinator whose agents run on other machines.

Figures (all clocks are ``time.perf_counter()`` in the bench process):
    register   The simulators first open every session (CONNECT with the will, SUBSCRIBE; timed on its
               own as "connect"). The clock starts just before the bench writes ``go`` to the first
               simulator's stdin; each simulator then publishes all its agents' statuses at once
               (QoS 1, retained). It stops when the bench receives the first ListAgents reply that
               lists every agent READY; the bench polls every 20 ms, so the figure is an upper bound
               by up to one poll. Target <= 5 s.
    ingested   agents / register time: the status messages the coordinator took in per second, a
               lower bound (the simulators' publishing is inside the time); the same for the wills.
    Place      After every agent has sent telemetry once: the Place RPC for a float32 array of
               64 rows per agent, split by the coordinator over all 1,000 workers (each reply holds
               1,000 shards), a grpc.aio round trip from the bench, median of >= 50 calls after 4
               warm-up ones; beside it the same call while only 2 agents were registered (before the
               fleet), and the pure placement functions in-process: place_rows (the typed API) and
               split_rows (what the coordinator runs). Target <= 5 ms for the round trip and place_rows.
    memory     the coordinator's resident set (psutil RSS) before any agent (after a first Connect and
               ListAgents) and with every agent registered and reporting telemetry.
    offline    The clock starts just before SIGKILL of the first simulator process (the kernel closes
               their sockets without an MQTT DISCONNECT, so the broker publishes the wills) and stops at
               the first ListAgents reply (include_offline) showing every agent OFFLINE. No target.

Targets are rows with better="lower", baseline = the target itself (named "target") and target = 1.0:
the ratio is target / measured, so "met" means measured <= target.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import grpc
import psutil

from bench._fleet_sim import agent_id, agent_status
from bench.common import Context, Result, percentile
from gpupool._config import MAX_MESSAGE_BYTES, parse_broker_url
from gpupool._process import Child, spawn
from gpupool._proto.v1 import control_pb2, coordinator_pb2_grpc
from gpupool._proto.v1 import coordinator_pb2 as pb
from gpupool.broker import start_broker
from gpupool.placement import WorkerCapacity, place_rows, split_rows
from gpupool.protocol.codec import encode_json
from gpupool.protocol.topics import Topics
from gpupool.security.store import StateStore
from gpupool.transport.rpc import bearer_metadata

__all__ = ["FleetFigures", "measure", "results", "run"]

SECTION = "fleet"
ROOT = Path(__file__).resolve().parent.parent
AGENTS_PER_PROCESS = 250
REGISTER_TARGET_S = 5.0
PLACE_TARGET_MS = 5.0
#: Pause between two ListAgents polls while a clock runs; a poll's own time adds to it.
POLL_INTERVAL_S = 0.02
#: Each simulated agent's telemetry period once registered: the real agent's default heartbeat.
TELEMETRY_EVERY_S = 3.0
ROWS_PER_WORKER = 64
ROW_ELEMENTS = 256  # float32: 1 KiB rows, 64 KiB per worker per array; telemetry resets what Place reserves


@dataclass(slots=True)
class FleetFigures:
    """What one fleet run measured: seconds, bytes, and the counts the coordinator showed."""

    agents: int
    processes: int
    prefix: str = ""
    connect_s: float = 0.0
    register_s: float = 0.0
    publish_s: float = 0.0
    registered: int = 0
    reporting: int = 0
    rss_empty: int = 0
    rss_full: int = 0
    place_fleet: list[float] = field(default_factory=list)
    place_fleet_shards: int = 0
    place_two: list[float] = field(default_factory=list)
    place_rows: list[float] = field(default_factory=list)
    split_rows: list[float] = field(default_factory=list)
    list_agents: list[float] = field(default_factory=list)
    offline_s: float = 0.0
    offline: int = 0
    register_curve: list[tuple[float, int]] = field(default_factory=list)
    offline_curve: list[tuple[float, int]] = field(default_factory=list)


def run(ctx: Context) -> list[Result]:
    """The fleet section: 1,000 agents in 4 processes (40 in 2 in quick mode)."""
    agents = 40 if ctx.quick else 1000
    figures = measure(
        agents=agents,
        processes=2 if ctx.quick else -(-agents // AGENTS_PER_PROCESS),
        broker_url=ctx.broker_url,
        place_calls=10 if ctx.quick else max(50, 10 * ctx.repeats),
        telemetry_every=1.0 if ctx.quick else TELEMETRY_EVERY_S,
    )
    return results(figures)


def measure(
    *,
    agents: int,
    processes: int,
    broker_url: str | None = None,
    place_calls: int = 50,
    telemetry_every: float = TELEMETRY_EVERY_S,
) -> FleetFigures:
    """Run the whole fleet scenario once and return its raw figures.

    On a shared broker (``broker_url`` given) it clears the retained statuses it leaves behind. The
    coordinator's and simulators' logs are kept, and named in the error, only when a run fails.

    Raises:
        ConnectError: the broker or the coordinator did not come up.
        AssertionError: a simulator failed, or the coordinator did not show every agent registered,
            reporting, or offline in time.
    """
    run_id = secrets.token_hex(4)
    logs = Path(tempfile.mkdtemp(prefix="gpupool-bench-fleet-"))
    figures = FleetFigures(agents=agents, processes=processes, prefix=f"gpupool-bench-{run_id}")
    with contextlib.ExitStack() as stack:
        shared = broker_url is not None
        if broker_url is None:
            broker = start_broker("mosquitto")
            stack.callback(broker.stop)
            broker_url = str(broker.ready["url"])
        stderr = stack.enter_context(open(logs / "coordinator.log", "wb"))
        argv = ["--broker", broker_url, "--listen", "127.0.0.1:0", "--topic-prefix", figures.prefix]
        argv += ["--min-shard-bytes", "0"]  # one shard on every worker, however small: the cost measured
        # The simulated agents never enrol: the coordinator believes their unsigned statuses (a signed
        # status costs the coordinator ~60 us more to verify; bench/transfer.py measures the data plane).
        state_dir = logs / "state"
        with StateStore.open(state_dir) as store:
            token, _ = store.create_token(role="client", name="bench", ttl=None, now=time.time())
        argv += ["--state-dir", str(state_dir), "--allow-unenrolled"]
        coordinator = spawn(
            "coordinator", [sys.executable, "-m", "gpupool.coordinator", *argv], stderr=stderr
        )
        stack.callback(coordinator.stop)
        scenario = _Scenario(figures, broker_url, run_id, coordinator, logs, telemetry_every, token)
        asyncio.run(scenario.run(place_calls, clear_retained=shared))
    shutil.rmtree(logs, ignore_errors=True)
    return figures


def results(f: FleetFigures) -> list[Result]:
    """The figures as result rows."""
    n = f"{f.agents:,}"
    place_p90 = percentile(f.place_fleet, 90) * 1e3
    return [
        Result(
            SECTION,
            f"register {n} agents",
            f.register_s,
            "s",
            better="lower",
            baseline_name="target",
            baseline=REGISTER_TARGET_S,
            target=1.0,
            note=f"'go' to ListAgents all READY; {f.processes} simulator processes",
        ),
        Result(
            SECTION,
            "statuses ingested",
            f.agents / f.register_s if f.register_s else 0.0,
            "msg/s",
            note="lower bound",
        ),
        Result(SECTION, f"connect {n} MQTT sessions", f.connect_s, "s", better="lower", note="before 'go'"),
        Result(
            SECTION,
            f"Place over {n} agents, round trip",
            statistics.median(f.place_fleet) * 1e3,
            "ms",
            better="lower",
            baseline_name="target",
            baseline=PLACE_TARGET_MS,
            target=1.0,
            note=f"{f.place_fleet_shards} shards; p90 {place_p90:.2f} ms",
            samples=f.place_fleet,
        ),
        Result(
            SECTION,
            "Place over 2 agents, round trip",
            statistics.median(f.place_two) * 1e3,
            "ms",
            better="lower",
            samples=f.place_two,
        ),
        Result(
            SECTION,
            f"place_rows over {n} workers",
            statistics.median(f.place_rows) * 1e3,
            "ms",
            better="lower",
            baseline_name="target",
            baseline=PLACE_TARGET_MS,
            target=1.0,
            note="in-process",
            samples=f.place_rows,
        ),
        Result(
            SECTION,
            f"split_rows over {n} workers",
            statistics.median(f.split_rows) * 1e3,
            "ms",
            better="lower",
            note="in-process; what Place runs",
            samples=f.split_rows,
        ),
        Result(
            SECTION,
            f"ListAgents of {n} agents, round trip",
            statistics.median(f.list_agents) * 1e3,
            "ms",
            better="lower",
            note="with telemetry",
            samples=f.list_agents,
        ),
        Result(SECTION, "coordinator RSS, no agents", f.rss_empty / (1 << 20), "MiB", better="lower"),
        Result(
            SECTION,
            f"coordinator RSS, {n} agents",
            f.rss_full / (1 << 20),
            "MiB",
            better="lower",
            note=f"{(f.rss_full - f.rss_empty) / max(1, f.agents) / 1024:.1f} KiB per agent",
        ),
        Result(
            SECTION,
            f"all {n} offline after SIGKILL",
            f.offline_s,
            "s",
            better="lower",
            note="last wills",
        ),
        Result(
            SECTION,
            "wills ingested",
            f.agents / f.offline_s if f.offline_s else 0.0,
            "msg/s",
            note="lower bound",
        ),
    ]


class _Scenario:
    """One run, step by step; each step fills in ``figures``."""

    def __init__(
        self,
        figures: FleetFigures,
        broker_url: str,
        run_id: str,
        coordinator: Child,
        logs: Path,
        telemetry_every: float,
        token: str,
    ) -> None:
        self.figures = figures
        self.metadata = bearer_metadata(token)
        self.broker_url = broker_url
        self.run_id = run_id
        self.topics = Topics(figures.prefix)
        self.coordinator = coordinator
        self.logs = logs
        self.telemetry_every = telemetry_every
        self.simulators: list[asyncio.subprocess.Process] = []
        self.pair_run = secrets.token_hex(4)  # the two agents of the 2-agent baseline
        while self.pair_run[:4] == run_id[:4]:  # agent ids start with their run's first 4 digits
            self.pair_run = secrets.token_hex(4)
        self.stub: coordinator_pb2_grpc.CoordinatorStub | None = None

    async def run(self, place_calls: int, *, clear_retained: bool) -> None:
        """Play the scenario, then clean up whatever happened."""
        try:
            await self._play(place_calls)
        finally:
            await self._clean_up(clear_retained)

    async def _play(self, place_calls: int) -> None:
        f = self.figures
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
        async with grpc.aio.insecure_channel(
            str(self.coordinator.ready["listen"]), options=options
        ) as channel:
            self.stub = stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            session = (
                await stub.Connect(
                    pb.ConnectRequest(client="bench@fleet"), timeout=10, metadata=self.metadata
                )
            ).session
            await stub.ListAgents(pb.ListAgentsRequest(), timeout=10, metadata=self.metadata)
            f.rss_empty = _rss(self.coordinator.pid)
            f.place_two = await self._place_over_two(session, place_calls)

            started = time.perf_counter()
            await self._start_simulators()
            f.connect_s = time.perf_counter() - started

            started = time.perf_counter()  # just before the first "go"
            for simulator in self.simulators:
                assert simulator.stdin is not None
                simulator.stdin.write(b"go\n")
            for simulator in self.simulators:
                assert simulator.stdin is not None
                await simulator.stdin.drain()
            f.registered = await self._wait_for(
                lambda records: _count(records, self.run_id, control_pb2.AGENT_STATE_READY),
                include_offline=False,
                what=f"{f.agents} agents registered",
                curve=f.register_curve,
            )
            f.register_s = time.perf_counter() - started
            f.publish_s = max([await self._published(s) for s in self.simulators], default=0.0)

            f.reporting = await self._wait_for(
                lambda records: sum(1 for r in records if r.HasField("telemetry")),
                include_offline=False,
                what=f"telemetry from all {f.agents} agents",
                within=self.telemetry_every * 5 + 30,
                every=0.25,
            )
            rows = f.agents * ROWS_PER_WORKER
            f.place_fleet, f.place_fleet_shards = await self._time_place(session, rows, place_calls)
            f.list_agents = await _timed(
                lambda: stub.ListAgents(pb.ListAgentsRequest(), timeout=10, metadata=self.metadata), 20
            )
            f.rss_full = _rss(self.coordinator.pid)
            f.place_rows, f.split_rows = _time_placement(self.run_id, f.agents, rows, max(200, place_calls))

            started = time.perf_counter()  # just before the first SIGKILL
            for simulator in self.simulators:
                simulator.kill()
            f.offline = await self._wait_for(
                lambda records: _count(records, self.run_id, control_pb2.AGENT_STATE_OFFLINE),
                include_offline=True,
                what=f"{f.agents} agents offline",
                curve=f.offline_curve,
            )
            f.offline_s = time.perf_counter() - started

    async def _clean_up(self, clear_retained: bool) -> None:
        """Kill the simulators left, and on a shared broker clear the retained statuses of the run."""
        for simulator in self.simulators:
            with contextlib.suppress(ProcessLookupError):
                simulator.kill()
            await simulator.wait()
        if not clear_retained:
            return  # our own broker keeps nothing once stopped (persistence off)
        self.coordinator.stop()  # or it would log a thousand agents forgotten
        agents = [agent_id(self.run_id, n) for n in range(self.figures.agents)]
        agents += [agent_id(self.pair_run, n) for n in range(2)]
        broker = parse_broker_url(self.broker_url)
        async with asyncio.timeout(30), aiomqtt.Client(broker.host, broker.port) as client:
            for agent in agents:
                await client.publish(self.topics.status(agent), b"", qos=1, retain=True)

    async def _place_over_two(self, session: str, calls: int) -> list[float]:
        """Place round trips while only two agents are registered (published from here, then cleared)."""
        broker = parse_broker_url(self.broker_url)
        pair = [agent_status(self.pair_run, number) for number in range(2)]
        async with asyncio.timeout(60), aiomqtt.Client(broker.host, broker.port) as client:
            for status in pair:
                await client.publish(
                    self.topics.status(status.agent_id), encode_json(status), qos=1, retain=True
                )
            await self._wait_for(
                lambda records: _count(records, self.pair_run, control_pb2.AGENT_STATE_READY),
                include_offline=False,
                what="2 agents registered",
                expect=2,
            )
            samples, shards = await self._time_place(session, 2 * ROWS_PER_WORKER, calls)
            assert shards == 2, f"Place over 2 agents gave {shards} shards"
            for status in pair:
                await client.publish(self.topics.status(status.agent_id), b"", qos=1, retain=True)
            await self._wait_for(
                lambda records: len(records), include_offline=True, what="the 2 agents forgotten", expect=0
            )
        return samples

    async def _time_place(self, session: str, rows: int, calls: int) -> tuple[list[float], int]:
        assert self.stub is not None
        place = self.stub.Place
        request = pb.PlaceRequest(session=session)
        request.meta.dtype = "float32"
        request.meta.shape.extend([rows, ROW_ELEMENTS])
        shards = len((await place(request, timeout=10, metadata=self.metadata)).shards)
        samples = await _timed(lambda: place(request, timeout=10, metadata=self.metadata), calls, warmup=4)
        return samples, shards

    async def _start_simulators(self) -> None:
        """Start the simulator processes and wait until every session is connected."""
        per_process = -(-self.figures.agents // self.figures.processes)
        with open(self.logs / "simulators.log", "wb") as log:  # noqa: ASYNC230 - local disk, once
            for first in range(0, self.figures.agents, per_process):
                argv = ["--broker", self.broker_url, "--prefix", self.figures.prefix, "--run", self.run_id]
                argv += ["--first", str(first), "--count", str(min(per_process, self.figures.agents - first))]
                argv += ["--telemetry", str(self.telemetry_every)]
                simulator = await asyncio.create_subprocess_exec(
                    *[sys.executable, "-m", "bench._fleet_sim", *argv],
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=log,
                    cwd=ROOT,  # where ``bench`` imports from
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                )
                self.simulators.append(simulator)
        for simulator in self.simulators:
            await self._line(simulator, "ready", within=60)

    async def _published(self, simulator: asyncio.subprocess.Process) -> float:
        return float((await self._line(simulator, "published", within=30))["publish_s"])

    async def _line(
        self, simulator: asyncio.subprocess.Process, event: str, *, within: float
    ) -> dict[str, Any]:
        """The simulator's next stdout line for ``event``."""
        assert simulator.stdout is not None
        async with asyncio.timeout(within):
            while raw := await simulator.stdout.readline():
                with contextlib.suppress(ValueError):
                    message = json.loads(raw)
                    if isinstance(message, dict) and message.get("event") == event:
                        return message
        raise AssertionError(f"a simulator exited before {event!r}; see {self.logs / 'simulators.log'}")

    async def _wait_for(
        self,
        check: Callable[[list[pb.AgentRecord]], int],
        *,
        include_offline: bool,
        what: str,
        expect: int | None = None,
        within: float = 60.0,
        curve: list[tuple[float, int]] | None = None,
        every: float = POLL_INTERVAL_S,
    ) -> int:
        """Poll ListAgents until ``check(records)`` equals ``expect`` (default: the fleet's size)."""
        assert self.stub is not None
        wanted = self.figures.agents if expect is None else expect
        started = time.perf_counter()
        request = pb.ListAgentsRequest(include_offline=include_offline)
        while True:
            got = check(
                list((await self.stub.ListAgents(request, timeout=10, metadata=self.metadata)).agents)
            )
            if curve is not None:
                curve.append((time.perf_counter() - started, got))
            if got == wanted:
                return got
            if time.perf_counter() - started > within:
                raise AssertionError(f"{what}: not within {within:g} s (last: {got}); logs in {self.logs}")
            await asyncio.sleep(every)


def _count(records: list[pb.AgentRecord], run_id: str, state: int) -> int:
    """How many of a run's agents the records show in ``state``."""
    head = run_id[:4]
    return sum(1 for r in records if r.status.agent_id.startswith(head) and r.status.state == state)


def _rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


async def _timed(call: Callable[[], Awaitable[object]], repeats: int, *, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        await call()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - started)
    return samples


def _time_placement(run_id: str, agents: int, rows: int, repeats: int) -> tuple[list[float], list[float]]:
    """place_rows and split_rows over workers like the simulated agents' (in-process, no network)."""
    workers = [
        WorkerCapacity(s.agent_id, s.endpoint, 0, s.workers[0].memory_limit - s.workers[0].memory_used)
        for s in (agent_status(run_id, number) for number in range(agents))
    ]
    free = [w.free_bytes for w in workers]
    row_bytes = ROW_ELEMENTS * 4
    assert len(place_rows(rows, row_bytes, workers)) == len(split_rows(rows, row_bytes, free)) == agents
    timings: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        started = time.perf_counter()
        place_rows(rows, row_bytes, workers)
        middle = time.perf_counter()
        split_rows(rows, row_bytes, free)
        timings[0].append(middle - started)
        timings[1].append(time.perf_counter() - middle)
    return timings

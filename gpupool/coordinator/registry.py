"""The coordinator's view of the agents: pure state, fed decoded MQTT payloads, tested without a network.

:class:`Registry` applies :class:`AgentStatus` and :class:`AgentTelemetry` messages and answers with what
happened, as past-tense events. It keeps each agent's workers and their free memory: the worker's limit
minus what it holds, from the newest of status and telemetry, minus what the coordinator placed there
since that report (the upload may not have reached the agent's next report yet).

It is built for pools of a thousand agents and more: applying a message costs the same however many
agents there are, and what every Place or ListAgents call reads (the ready workers in layout order,
the agents in listing order) is kept between calls and rebuilt only after a status changes it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from operator import attrgetter

from google.protobuf.timestamp_pb2 import Timestamp

from gpupool._errors import PlacementError
from gpupool._proto.v1 import control_pb2
from gpupool._proto.v1.control_pb2 import AgentState, AgentStatus, AgentTelemetry
from gpupool.placement import RowShard, WorkerCapacity

__all__ = [
    "AgentEntry",
    "AgentForgotten",
    "AgentRegistered",
    "AgentRestarted",
    "AgentStateChanged",
    "AgentWentOffline",
    "ReadyWorkers",
    "Registry",
    "RegistryEvent",
    "WorkerMemory",
    "state_name",
]

READY: AgentState = control_pb2.AGENT_STATE_READY
OFFLINE: AgentState = control_pb2.AGENT_STATE_OFFLINE


def state_name(state: int) -> str:
    """``"ready"``, ``"cordoned"``, ``"draining"``, ``"offline"`` (``"unspecified"`` for 0)."""
    try:
        return control_pb2.AgentState.Name(state).removeprefix("AGENT_STATE_").lower()
    except ValueError:
        return f"state-{state}"


@dataclass(frozen=True, slots=True)
class AgentRegistered:
    """The coordinator saw an agent's status for the first time."""

    agent_id: str
    name: str
    state: int


@dataclass(frozen=True, slots=True)
class AgentStateChanged:
    """An agent's status moved between READY, CORDONED and DRAINING, or came back from OFFLINE."""

    agent_id: str
    name: str
    old: int
    new: int


@dataclass(frozen=True, slots=True)
class AgentWentOffline:
    """An agent's status turned OFFLINE: its last will, or a clean stop."""

    agent_id: str
    name: str
    previous: int


@dataclass(frozen=True, slots=True)
class AgentRestarted:
    """An agent came back with a new start time: whatever it held is gone."""

    agent_id: str
    name: str


@dataclass(frozen=True, slots=True)
class AgentForgotten:
    """An agent's retained status was cleared (an empty payload): the operator removed it."""

    agent_id: str


RegistryEvent = AgentRegistered | AgentStateChanged | AgentWentOffline | AgentRestarted | AgentForgotten


@dataclass(slots=True)
class WorkerMemory:
    """One worker's memory as the coordinator reckons it.

    Attributes:
        limit: bytes the worker may hold, from the latest report.
        used: bytes it held at that report.
        placed: bytes the coordinator placed on it since that report.
    """

    limit: int
    used: int
    placed: int = 0
    #: Measured float32 GEMM GFLOP/s from the status (0.0: not measured).
    speed: float = 0.0
    #: Measured float16 GEMM GFLOP/s (0.0: not measured).
    speed_f16: float = 0.0
    #: The agent's temperature limit for it (0.0: none), and whether its latest telemetry was above it.
    temperature_limit: float = 0.0
    hot: bool = False

    @property
    def free(self) -> int:
        """Bytes still free; negative when placements overshoot the last report."""
        return self.limit - self.used - self.placed


@dataclass(slots=True)
class AgentEntry:
    """What the registry knows of one agent. Callers read it; only the :class:`Registry` changes it.

    Attributes:
        status: the latest status (the whole message, as the agent sent it).
        telemetry: the latest telemetry, if any arrived since the agent registered.
        last_seen: when the latest status or telemetry arrived, on the caller's clock.
        memory: the agent's workers by index.
        report_time: the agent's timestamp of the memory figures in effect, in seconds (0: unknown).
        silenced_from: the state it had before :meth:`Registry.expire_unseen` showed it offline for
            silence (None otherwise); a sign of life restores it.
    """

    status: AgentStatus
    telemetry: AgentTelemetry | None
    last_seen: float
    memory: dict[int, WorkerMemory] = field(default_factory=dict)
    report_time: float = 0.0
    silenced_from: int | None = None

    @property
    def agent_id(self) -> str:
        """The agent's id."""
        return self.status.agent_id

    @property
    def name(self) -> str:
        """The agent's name (its id when it gave none)."""
        return self.status.name or self.status.agent_id

    @property
    def state(self) -> int:
        """The agent's state (a ``control_pb2.AgentState`` value)."""
        return int(self.status.state)


@dataclass(frozen=True, slots=True)
class ReadyWorkers:
    """The workers that may take new rows, at one moment, in layout order: by agent id, then index.

    Parallel sequences, one item per worker, as :func:`gpupool.placement.split_rows` takes them. Hand
    its split to :meth:`Registry.reserve_split` before the next ``await``, while the figures hold.

    Attributes:
        agent_ids: each worker's agent.
        endpoints: each worker's agent's data-plane address.
        workers: each worker's index on its agent.
        free: each worker's free bytes, as :attr:`WorkerMemory.free` reckoned them.
        speed: each worker's measured speed (float32 GEMM GFLOP/s; 0.0 where not measured).
        memory: the registry's own records of the workers, for :meth:`Registry.reserve_split` only.
        speed_f16: each worker's float16 GEMM GFLOP/s (0.0 where not measured).
    """

    agent_ids: Sequence[str]
    endpoints: Sequence[str]
    workers: Sequence[int]
    free: Sequence[int]
    memory: Sequence[WorkerMemory] = field(repr=False)
    speed: Sequence[float] = ()
    speed_f16: Sequence[float] = ()

    def speed_for(self, dtype: str) -> Sequence[float]:
        """The speeds that size shards of ``dtype``: the float16 figures for float16 arrays where every
        worker measured one, else the float32 ones."""
        if dtype == "float16" and self.speed_f16 and all(s > 0 for s in self.speed_f16):
            return self.speed_f16
        return self.speed

    def __len__(self) -> int:
        return len(self.free)


def _placement_key(entry: AgentEntry) -> tuple[int, str, tuple[int, ...]]:
    """What decides whether and where an agent's workers take rows (not their free memory)."""
    return (entry.state, entry.status.endpoint, tuple(entry.memory))


def _listing_key(entry: AgentEntry) -> tuple[str, str]:
    return (entry.name, entry.agent_id)


def _seconds(stamp: Timestamp) -> float:
    """A protobuf Timestamp in seconds (0.0 when unset)."""
    return stamp.ToNanoseconds() / 1e9


class Registry:
    """The agents the coordinator knows, keyed by id. Not thread-safe: one event loop owns it."""

    def __init__(self) -> None:
        self._agents: dict[str, AgentEntry] = {}
        # Kept between calls, dropped when a status changes what they hold (None: rebuild when asked).
        self._listing: list[AgentEntry] | None = None
        self._ready: ReadyWorkers | None = None
        # Agents clients' verification caught returning wrong answers (gpupool.coordinator.trust): like
        # cordoned ones, they take no new rows. Kept by id, known or not yet (loaded before statuses come).
        self._quarantined: set[str] = set()
        #: How many memory reports (statuses and telemetry) have been taken in: a placement that found no
        #: room while some of it was only placed, not yet reported, waits for this to move.
        self.reports = 0

    def __len__(self) -> int:
        return len(self._agents)

    def get(self, agent_id: str) -> AgentEntry | None:
        """The agent with exactly this id, if known."""
        return self._agents.get(agent_id)

    def agents(self) -> list[AgentEntry]:
        """Every known agent, offline ones included, by name and then id."""
        if self._listing is None:
            self._listing = sorted(self._agents.values(), key=_listing_key)
        return list(self._listing)

    def apply_status(self, status: AgentStatus, *, now: float) -> list[RegistryEvent]:
        """Take in an agent's status (retained or fresh); ``now`` is the caller's clock.

        The state always follows the status; its memory figures apply only if they are not older than
        the ones in effect (a retained status redelivered after a reconnect can be older than telemetry).
        """
        agent_id = status.agent_id
        copy = AgentStatus()
        copy.CopyFrom(status)
        entry = self._agents.get(agent_id)
        if entry is None:
            entry = AgentEntry(status=copy, telemetry=None, last_seen=now)
            self._agents[agent_id] = entry
            self._apply_workers(entry, copy, force=True)
            self._listing = self._ready = None
            return [AgentRegistered(agent_id, entry.name, entry.state)]
        events: list[RegistryEvent] = []
        old_state = entry.state
        old_name = entry.name
        old_placement = _placement_key(entry)
        old_started = _seconds(entry.status.started)
        new_started = _seconds(copy.started)
        restarted = bool(new_started and old_started and new_started != old_started)
        entry.status = copy
        entry.last_seen = now
        entry.silenced_from = None
        self.reports += 1
        if restarted:
            entry.telemetry = None
            events.append(AgentRestarted(agent_id, entry.name))
        self._apply_workers(entry, copy, force=restarted)
        if entry.name != old_name:
            self._listing = None
        if _placement_key(entry) != old_placement:
            self._ready = None
        if entry.state != old_state:
            if entry.state == OFFLINE:
                events.append(AgentWentOffline(agent_id, entry.name, old_state))
            else:
                events.append(AgentStateChanged(agent_id, entry.name, old_state, entry.state))
        return events

    def apply_telemetry(self, telemetry: AgentTelemetry, *, now: float) -> list[RegistryEvent]:
        """Take in an agent's telemetry; that of an agent without a status yet is dropped."""
        entry = self._agents.get(telemetry.agent_id)
        if entry is None:
            return []
        copy = AgentTelemetry()
        copy.CopyFrom(telemetry)
        entry.telemetry = copy
        entry.last_seen = now
        self.reports += 1
        self._apply_memory(
            entry, ((w.index, w.memory_limit, w.memory_used) for w in copy.workers), _seconds(copy.time)
        )
        for worker in copy.workers:
            memory = entry.memory.get(worker.index)
            if memory is not None:
                limit = memory.temperature_limit
                memory.hot = bool(limit) and worker.temperature_c > limit
        if entry.silenced_from is None:
            return []
        # Shown offline for silence, and now heard from again (a resumed SIGSTOP, a healed link).
        restored, entry.silenced_from = entry.silenced_from, None
        entry.status.state = restored  # type: ignore[assignment]
        entry.status.note = ""
        self._ready = None
        return [AgentStateChanged(entry.agent_id, entry.name, OFFLINE, restored)]

    def forget(self, agent_id: str) -> list[RegistryEvent]:
        """Drop an agent (its retained status was cleared)."""
        if self._agents.pop(agent_id, None) is None:
            return []
        self._listing = self._ready = None
        return [AgentForgotten(agent_id)]

    def expire_unseen(self, since: float, *, note: str) -> list[RegistryEvent]:
        """Mark OFFLINE every agent not heard from since ``since`` (the caller's clock).

        For after a broker restart: a live agent republishes its status when it reconnects, and a broker
        that keeps retained messages sends them again, but an agent that died while the broker was down
        has no last will left to send.
        """
        events: list[RegistryEvent] = []
        for entry in self._agents.values():
            if entry.state != OFFLINE and entry.last_seen < since:
                previous = entry.state
                entry.silenced_from = previous
                entry.status.state = OFFLINE
                entry.status.note = note
                events.append(AgentWentOffline(entry.agent_id, entry.name, previous))
        if events:
            self._ready = None
        return events

    def resolve(self, query: str) -> AgentEntry:
        """The agent named by a full id, a unique id prefix, or a unique name, in that order.

        Raises:
            PlacementError: no agent, or more than one, matches; the message says which.
        """
        if not query:
            raise PlacementError("no agent named: give an agent id, a unique id prefix, or a name")
        exact = self._agents.get(query)
        if exact is not None:
            return exact
        for kind, matches in (
            ("name", [a for a in self._agents.values() if a.status.name == query]),
            ("id prefix", [a for a in self._agents.values() if a.agent_id.startswith(query)]),
        ):
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                listed = ", ".join(sorted(f"{a.agent_id} ({a.name})" for a in matches))
                raise PlacementError(
                    f"{query!r} is ambiguous: {len(matches)} agents match by {kind}: {listed}"
                )
        raise PlacementError(
            f"no agent {query!r}: not an id, id prefix or name of any of {len(self)} known agents"
        )

    def set_quarantined(self, agent_id: str, quarantined: bool) -> None:
        """Quarantine an agent (its workers take no new rows) or take it back."""
        if (agent_id in self._quarantined) != quarantined:
            if quarantined:
                self._quarantined.add(agent_id)
            else:
                self._quarantined.discard(agent_id)
            self._ready = None

    def is_quarantined(self, agent_id: str) -> bool:
        """Whether the agent is quarantined."""
        return agent_id in self._quarantined

    def quarantined_ready(self) -> int:
        """How many READY agents are quarantined now."""
        return sum(
            1
            for agent_id in self._quarantined
            if (entry := self._agents.get(agent_id)) is not None and entry.state == READY
        )

    def ready(self, exclude: Iterable[str] = ()) -> ReadyWorkers:
        """The workers of READY agents with an endpoint, not quarantined, less those of agents in
        ``exclude``."""
        ready = self._ready
        if ready is None:
            slots = [
                (entry.agent_id, entry.status.endpoint, index, memory)
                for entry in sorted(self._agents.values(), key=attrgetter("agent_id"))
                if entry.state == READY and entry.status.endpoint and entry.agent_id not in self._quarantined
                for index, memory in sorted(entry.memory.items())
            ]
            ready = self._ready = _ready_workers(slots)
        skip = set(exclude)
        # A worker over its temperature limit takes no new rows until it cools (its telemetry says).
        if not skip.isdisjoint(ready.agent_ids) or any(m.hot for m in ready.memory):
            kept = zip(ready.agent_ids, ready.endpoints, ready.workers, ready.memory, strict=True)
            ready = _ready_workers([slot for slot in kept if slot[0] not in skip and not slot[3].hot])
        # Free memory changes with every report and placement: read it afresh each time.
        return ReadyWorkers(
            ready.agent_ids,
            ready.endpoints,
            ready.workers,
            [m.free for m in ready.memory],
            ready.memory,
            [m.speed for m in ready.memory],
            [m.speed_f16 for m in ready.memory],
        )

    def ready_workers(self, exclude: Iterable[str] = ()) -> list[WorkerCapacity]:
        """The workers of :meth:`ready`, with their free memory."""
        ready = self.ready(exclude)
        return [
            WorkerCapacity(*worker)
            for worker in zip(ready.agent_ids, ready.endpoints, ready.workers, ready.free, strict=True)
        ]

    def hot_workers(self) -> int:
        """How many workers of READY agents are over their temperature limit now."""
        ready = (entry for entry in self._agents.values() if entry.state == READY)
        return sum(memory.hot for entry in ready for memory in entry.memory.values())

    def count_by_state(self) -> dict[str, int]:
        """How many agents are in each state, by :func:`state_name`."""
        counts: dict[str, int] = {}
        for entry in self._agents.values():
            name = state_name(entry.state)
            counts[name] = counts.get(name, 0) + 1
        return counts

    def reserve(self, shards: Sequence[RowShard], row_bytes: int) -> None:
        """Count placed shards against their workers until those report again."""
        for shard in shards:
            entry = self._agents.get(shard.agent_id)
            if entry is not None and shard.worker in entry.memory:
                entry.memory[shard.worker].placed += shard.rows * row_bytes

    @staticmethod
    def unreported(ready: ReadyWorkers) -> int:
        """Bytes placed on ``ready``'s workers that their agents have not reported holding yet."""
        return sum(memory.placed for memory in ready.memory)

    @staticmethod
    def reserve_split(ready: ReadyWorkers, split: Iterable[tuple[int, int, int]], row_bytes: int) -> None:
        """:meth:`reserve` for a :func:`~gpupool.placement.split_rows` split of ``ready``'s workers."""
        memory = ready.memory
        for position, start, stop in split:
            memory[position].placed += (stop - start) * row_bytes

    def _apply_workers(self, entry: AgentEntry, status: AgentStatus, *, force: bool) -> None:
        """Make the worker set the status's; take its memory figures if they are new enough."""
        listed = {w.index for w in status.workers}
        for index in list(entry.memory):
            if index not in listed:
                del entry.memory[index]
        for worker in status.workers:
            memory = entry.memory.setdefault(
                worker.index, WorkerMemory(worker.memory_limit, worker.memory_used)
            )
            memory.speed = float(worker.gemm_f32_gflops)
            memory.speed_f16 = float(worker.gemm_f16_gflops)
            memory.temperature_limit = float(worker.temperature_limit_c)
        figures = ((w.index, w.memory_limit, w.memory_used) for w in status.workers)
        self._apply_memory(entry, figures, _seconds(status.updated), force=force)

    @staticmethod
    def _apply_memory(
        entry: AgentEntry, figures: Iterable[tuple[int, int, int]], report_time: float, *, force: bool = False
    ) -> None:
        """Take memory figures unless older than those in effect (an unknown time counts as new)."""
        if not force and report_time and entry.report_time and report_time < entry.report_time:
            return
        for index, limit, used in figures:
            memory = entry.memory.get(index)
            if memory is not None:
                memory.limit, memory.used, memory.placed = int(limit), int(used), 0
        if report_time:
            entry.report_time = report_time


def _ready_workers(slots: Sequence[tuple[str, str, int, WorkerMemory]]) -> ReadyWorkers:
    """``(agent id, endpoint, worker index, memory)`` slots as parallel tuples, ``free`` left empty."""
    return ReadyWorkers(
        agent_ids=tuple(slot[0] for slot in slots),
        endpoints=tuple(slot[1] for slot in slots),
        workers=tuple(slot[2] for slot in slots),
        free=(),
        memory=tuple(slot[3] for slot in slots),
    )

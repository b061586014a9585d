"""``gpupool status | agents | drain | cordon | uncordon | jobs``: the coordinator seen by an operator.

A small synchronous gRPC client for the Coordinator and Admin services (every call has a deadline),
and the commands that print what it returns. Failed calls raise the exceptions of
:mod:`gpupool._errors`; :func:`gpupool.cli.main.main` turns them into one line on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Self, TextIO

import grpc
from google.protobuf import json_format

from gpupool._config import Timeouts
from gpupool._errors import ConnectError, GpupoolError, TransportError
from gpupool._proto.v1 import control_pb2, coordinator_pb2, coordinator_pb2_grpc
from gpupool.cli._table import format_age, format_bytes, render_table
from gpupool.protocol.errors import ERROR_KEY, translate_rpc_error

__all__ = [
    "AdminAction",
    "CoordinatorClient",
    "PoolSummary",
    "agent_memory",
    "run_admin",
    "run_agents",
    "run_jobs",
    "run_status",
    "state_name",
    "translate_sync_error",
    "workers_summary",
]

AdminAction = Literal["drain", "cordon", "uncordon"]


class CoordinatorClient:
    """A synchronous client for the coordinator's Coordinator and Admin services.

    Use it as a context manager; it owns one channel.

    Args:
        address: the coordinator's ``host:port``.
        timeout: the deadline, in seconds, of each query.
        command_timeout: the deadline of drain, cordon and uncordon, which wait for the agent's answer.
    """

    def __init__(self, address: str, *, timeout: float = 10.0, command_timeout: float | None = None) -> None:
        self.address = address
        self.timeout = timeout
        self.command_timeout = command_timeout if command_timeout is not None else Timeouts().command + 5.0
        self._channel = grpc.insecure_channel(address)
        self._coordinator = coordinator_pb2_grpc.CoordinatorStub(self._channel)  # type: ignore[no-untyped-call]
        self._admin = coordinator_pb2_grpc.AdminStub(self._channel)  # type: ignore[no-untyped-call]

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def list_agents(self, *, include_offline: bool = False) -> list[coordinator_pb2.AgentRecord]:
        """The registry, sorted by name then id.

        Raises:
            ConnectError, DeadlineExceeded, GpupoolError: the call failed.
        """
        request = coordinator_pb2.ListAgentsRequest(include_offline=include_offline)
        reply: coordinator_pb2.ListAgentsReply = self._call(
            self._coordinator.ListAgents, request, self.timeout
        )
        return sorted(reply.agents, key=lambda r: (r.status.name, r.status.agent_id))

    def list_jobs(self) -> list[coordinator_pb2.JobInfo]:
        """Every job (client session) the coordinator knows, oldest first.

        Raises:
            ConnectError, DeadlineExceeded, GpupoolError: the call failed.
        """
        reply: coordinator_pb2.ListJobsReply = self._call(
            self._coordinator.ListJobs, coordinator_pb2.ListJobsRequest(), self.timeout
        )
        return sorted(reply.jobs, key=lambda j: (j.started.seconds, j.started.nanos, j.job_id))

    def command(self, action: AdminAction, agent: str, *, reason: str = "") -> coordinator_pb2.AdminReply:
        """Drain, cordon or uncordon ``agent`` (an id, a unique id prefix, or a name).

        Returns once the agent's status shows the new state.

        Raises:
            PlacementError: no such agent, or an ambiguous prefix.
            ConnectError, DeadlineExceeded, GpupoolError: the call failed.
        """
        method = {"drain": self._admin.Drain, "cordon": self._admin.Cordon, "uncordon": self._admin.Uncordon}
        request = coordinator_pb2.AdminRequest(agent_id=agent, reason=reason)
        reply: coordinator_pb2.AdminReply = self._call(method[action], request, self.command_timeout)
        return reply

    def _call(self, method: Callable[..., Any], request: object, timeout: float) -> Any:
        try:
            return method(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise translate_sync_error(exc, self.address) from exc


def translate_sync_error(exc: grpc.RpcError, peer: str) -> GpupoolError:
    """The gpupool exception for a failed synchronous call (the async side's mapping).

    ConnectError means the coordinator itself could not be reached; a coordinator that answers but
    cannot reach its broker gives a plain TransportError.
    """
    if not isinstance(exc, grpc.Call):
        return ConnectError(peer, str(exc))
    pairs = tuple(exc.trailing_metadata() or ())
    if (ERROR_KEY, "broker-unavailable") in pairs:
        return TransportError(peer, f"the coordinator cannot reach its MQTT broker: {exc.details()}")
    aio_error = grpc.aio.AioRpcError(
        exc.code(), grpc.aio.Metadata(), grpc.aio.Metadata(*pairs), exc.details(), None
    )
    return translate_rpc_error(aio_error, peer=peer)


# -- formatting ---------------------------------------------------------------------------------------


def state_name(state: int) -> str:
    """``AGENT_STATE_CORDONED`` -> ``cordoned``."""
    try:
        name = control_pb2.AgentState.Name(state)
    except ValueError:
        return f"state-{state}"
    return name.removeprefix("AGENT_STATE_").lower()


def workers_summary(status: control_pb2.AgentStatus) -> str:
    """``2x RTX 3060, 1x GTX 1070``, or ``1x CPU`` for NumPy workers."""
    kinds = Counter(
        worker.gpu.model if worker.HasField("gpu") and worker.gpu.model else "CPU"
        for worker in status.workers
    )
    return ", ".join(f"{count}x {model}" for model, count in kinds.items()) or "-"


def agent_memory(record: coordinator_pb2.AgentRecord) -> tuple[int, int]:
    """``(used, limit)`` bytes over the agent's workers, from its latest telemetry if there is some."""
    if record.HasField("telemetry") and record.telemetry.workers:
        workers = record.telemetry.workers
        return sum(w.memory_used for w in workers), sum(w.memory_limit for w in workers)
    return sum(w.memory_used for w in record.status.workers), sum(
        w.memory_limit for w in record.status.workers
    )


def agents_table(records: Sequence[coordinator_pb2.AgentRecord]) -> str:
    """The table ``gpupool agents`` prints."""
    rows = []
    for record in records:
        status = record.status
        used, limit = agent_memory(record)
        rows.append(
            [
                status.name or "-",
                status.agent_id,
                state_name(status.state),
                status.backend or "-",
                workers_summary(status),
                f"{format_bytes(used)} / {format_bytes(limit)}",
                status.endpoint or "-",
                format_age(record.seconds_since_seen),
            ]
        )
    headers = ["NAME", "ID", "STATE", "BACKEND", "WORKERS", "MEMORY", "ENDPOINT", "LAST SEEN"]
    return render_table(headers, rows)


def jobs_table(jobs: Sequence[coordinator_pb2.JobInfo]) -> str:
    """The table ``gpupool jobs`` prints."""
    rows = []
    for job in jobs:
        started = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.started.seconds))
            if job.HasField("started")
            else "-"
        )
        rows.append(
            [
                job.job_id,
                job.client or "-",
                job.state or "-",
                started,
                job.arrays_placed,
                format_bytes(job.bytes_placed),
            ]
        )
    return render_table(["JOB", "CLIENT", "STATE", "STARTED", "ARRAYS", "PLACED"], rows, align="<<<<>>")


# -- the commands -------------------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> CoordinatorClient:
    # Commands wait for the agent's answer, so they get at least the default command deadline.
    return CoordinatorClient(
        args.coordinator, timeout=args.timeout, command_timeout=max(args.timeout, Timeouts().command + 5.0)
    )


def run_agents(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """``gpupool agents [--json] [--all] [--watch SECONDS]``."""
    with _client(args) as client:
        while True:
            records = client.list_agents(include_offline=args.all)
            if args.json:
                text = json.dumps(
                    [
                        json_format.MessageToDict(r, always_print_fields_with_no_presence=True)
                        for r in records
                    ],
                    indent=2,
                )
            elif records:
                text = agents_table(records)
            else:
                text = "no agents" + ("" if args.all else " (gpupool agents --all includes offline ones)")
            if args.watch is None:
                print(text, file=out)
                return 0
            if out.isatty():
                out.write("\x1b[H\x1b[2J")
            print(f"{time.strftime('%H:%M:%S')}  {client.address}\n{text}\n", file=out, flush=True)
            try:
                time.sleep(args.watch)
            except KeyboardInterrupt:
                return 0


@dataclass(frozen=True, slots=True)
class PoolSummary:
    """The numbers ``gpupool status`` shows.

    Attributes:
        coordinator: the coordinator's address.
        agents: how many agents are in each state (ready, cordoned, draining, offline).
        workers: how many workers of serving agents use each backend.
        memory_used: bytes held by serving agents' workers.
        memory_limit: bytes those workers may hold.
        jobs_running: client sessions still open.
        jobs_total: client sessions the coordinator knows.
    """

    coordinator: str
    agents: dict[str, int]
    workers: dict[str, int]
    memory_used: int
    memory_limit: int
    jobs_running: int
    jobs_total: int

    @classmethod
    def of(
        cls,
        address: str,
        records: Sequence[coordinator_pb2.AgentRecord],
        jobs: Sequence[coordinator_pb2.JobInfo],
    ) -> PoolSummary:
        """Summarise the registry and the jobs."""
        states = Counter(state_name(r.status.state) for r in records)
        serving = [r for r in records if r.status.state != control_pb2.AGENT_STATE_OFFLINE]
        memory = [agent_memory(r) for r in serving]
        return cls(
            coordinator=address,
            agents={name: states.get(name, 0) for name in ("ready", "cordoned", "draining", "offline")},
            workers=dict(
                sorted(Counter(w.backend or "?" for r in serving for w in r.status.workers).items())
            ),
            memory_used=sum(used for used, _ in memory),
            memory_limit=sum(limit for _, limit in memory),
            jobs_running=sum(1 for j in jobs if j.state == "running"),
            jobs_total=len(jobs),
        )

    def lines(self) -> list[str]:
        """The summary as aligned ``label  value`` lines."""
        workers = str(sum(self.workers.values()))
        if self.workers:
            workers += " (" + ", ".join(f"{n} {backend}" for backend, n in self.workers.items()) + ")"
        rows = [
            ("coordinator", self.coordinator),
            ("agents", ", ".join(f"{n} {state}" for state, n in self.agents.items())),
            ("workers", workers),
            ("memory", f"{format_bytes(self.memory_used)} used of {format_bytes(self.memory_limit)}"),
            ("jobs", f"{self.jobs_running} running, {self.jobs_total} in all"),
        ]
        return [f"{label:<13}{value}" for label, value in rows]


def run_status(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """``gpupool status [--json]``: a summary of the pool."""
    with _client(args) as client:
        records = client.list_agents(include_offline=True)
        jobs = client.list_jobs()
    summary = PoolSummary.of(client.address, records, jobs)
    if args.json:
        print(json.dumps(dataclasses.asdict(summary), indent=2), file=out)
    else:
        print("\n".join(summary.lines()), file=out)
    return 0


def run_admin(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """``gpupool drain|cordon|uncordon ID [--reason TEXT]``: prints the agent's new state."""
    action: AdminAction = args.command
    with _client(args) as client:
        reply = client.command(action, args.agent, reason=args.reason)
    status = reply.agent
    print(f"{status.name or status.agent_id} ({status.agent_id}) is now {state_name(status.state)}", file=out)
    return 0


def run_jobs(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """``gpupool jobs [--json]``: every client session the coordinator knows."""
    with _client(args) as client:
        jobs = client.list_jobs()
    if args.json:
        print(
            json.dumps(
                [json_format.MessageToDict(j, always_print_fields_with_no_presence=True) for j in jobs],
                indent=2,
            ),
            file=out,
        )
    elif jobs:
        print(jobs_table(jobs), file=out)
    else:
        print("no jobs", file=out)
    return 0

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
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Self, TextIO

from google.protobuf import json_format

from gpupool._config import Timeouts
from gpupool._errors import TransportError
from gpupool._proto.v1 import control_pb2, coordinator_pb2
from gpupool.cli._table import format_age, format_bytes, render_table
from gpupool.transport.coordinator import CoordinatorClient as RpcClient
from gpupool.transport.coordinator import PoolCredentials

__all__ = [
    "AdminAction",
    "CoordinatorClient",
    "PoolSummary",
    "agent_memory",
    "agent_network",
    "agent_state",
    "agent_trust",
    "run_admin",
    "run_agents",
    "run_end_job",
    "run_jobs",
    "run_status",
    "state_name",
    "workers_summary",
]

AdminAction = Literal["drain", "cordon", "uncordon", "forget"]

#: Seconds ``gpupool drain`` waits for the agent's buffers to move, unless ``--move-timeout`` says otherwise.
MOVE_TIMEOUT = 600.0


class CoordinatorClient:
    """The operator's typed calls to a coordinator (over the transport's ``CoordinatorClient``).

    Use it as a context manager; it owns one channel.

    Args:
        credentials: the coordinator's address, the token (an admin token for drain, cordon, forget and
            ending jobs) and the pool CA.
        timeout: the deadline, in seconds, of each query.
        command_timeout: the deadline of drain, cordon and uncordon, which wait for the agent's answer.
    """

    def __init__(
        self, credentials: PoolCredentials, *, timeout: float = 10.0, command_timeout: float | None = None
    ) -> None:
        self.address = credentials.address
        self.timeout = timeout
        self.command_timeout = command_timeout if command_timeout is not None else Timeouts().command + 5.0
        self._client = RpcClient(credentials, timeout=timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel."""
        self._client.close()

    def list_agents(self, *, include_offline: bool = False) -> coordinator_pb2.ListAgentsReply:
        """The registry, sorted by name then id, and the coordinator's broker state.

        Raises:
            ConnectError, DeadlineExceeded, AuthError, GpupoolError: the call failed.
        """
        request = coordinator_pb2.ListAgentsRequest(include_offline=include_offline)
        reply: coordinator_pb2.ListAgentsReply = self._client.call("ListAgents", request)
        records = sorted(reply.agents, key=lambda r: (r.status.name, r.status.agent_id))
        del reply.agents[:]
        reply.agents.extend(records)
        return reply

    def list_jobs(self, *, all_sessions: bool = True) -> list[coordinator_pb2.JobInfo]:
        """Sessions the coordinator knows, oldest first: every one (admin token) or the token's own.

        Raises:
            ConnectError, DeadlineExceeded, AuthError, GpupoolError: the call failed.
        """
        reply: coordinator_pb2.ListJobsReply = self._client.call(
            "ListJobs", coordinator_pb2.ListJobsRequest(all=all_sessions)
        )
        return sorted(reply.jobs, key=lambda j: (j.started.seconds, j.started.nanos, j.job_id))

    def command(
        self,
        action: AdminAction,
        agent: str,
        *,
        reason: str = "",
        no_move: bool = False,
        move_timeout: float = MOVE_TIMEOUT,
    ) -> coordinator_pb2.AdminReply:
        """Drain, cordon, uncordon or forget ``agent`` (an id, a unique id prefix, or a name).

        Returns once the agent's status shows the new state (forget: once it is gone); a drain, once the
        agent's buffers moved to other agents (unless ``no_move``), within ``move_timeout`` more seconds.

        Raises:
            PlacementError: no such agent, or an ambiguous prefix.
            ConnectError, DeadlineExceeded, AuthError, GpupoolError: the call failed.
        """
        request = coordinator_pb2.AdminRequest(agent_id=agent, reason=reason, no_move=no_move)
        timeout = self.command_timeout
        if action == "drain" and not no_move:
            timeout += move_timeout
        reply: coordinator_pb2.AdminReply = self._client.call(action.capitalize(), request, timeout=timeout)
        return reply

    def end_job(self, job_id: str) -> coordinator_pb2.JobInfo:
        """End a session by hand (admin).

        Raises:
            PlacementError: no such job.
            AuthError: not an admin token.
        """
        reply: coordinator_pb2.EndJobReply = self._client.call(
            "EndJob", coordinator_pb2.EndJobRequest(job_id=job_id)
        )
        return reply.job


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
    """The table ``gpupool agents`` prints, and a line under it for each quarantined agent saying why."""
    rows = []
    for record in records:
        status = record.status
        used, limit = agent_memory(record)
        rows.append(
            [
                status.name or "-",
                status.agent_id,
                agent_state(record),
                status.backend or "-",
                workers_summary(status),
                f"{format_bytes(used)} / {format_bytes(limit)}",
                agent_speed(status),
                agent_network(record),
                agent_trust(record),
                status.endpoint or "-",
                agent_options(status),
                format_age(record.seconds_since_seen),
            ]
        )
    headers = ["NAME", "ID", "STATE", "BACKEND", "WORKERS", "MEMORY", "GFLOP/S", "NET", "TRUST"]
    headers += ["ENDPOINT", "OPTIONS", "LAST SEEN"]
    reasons = [
        f"{r.status.name or r.status.agent_id} ({r.status.agent_id}) is quarantined: "
        f"{r.trust.reason or 'wrong answers'}; `gpupool uncordon {r.status.agent_id}` takes it back"
        for r in records
        if r.trust.quarantined
    ]
    return "\n".join([render_table(headers, rows), *reasons])


def agent_state(record: coordinator_pb2.AgentRecord) -> str:
    """The agent's state, or ``quarantined`` when clients' verification caught it giving wrong answers
    (placement skips it whatever its own state says)."""
    return "quarantined" if record.trust.quarantined else state_name(record.status.state)


def agent_trust(record: coordinator_pb2.AgentRecord) -> str:
    """``0.83 (4/4 ok)``: the verification score and how many checks agreed; "-" before any check."""
    trust = record.trust
    if not trust.checks:
        return "-"
    return f"{trust.score:.2f} ({trust.checks - trust.mismatches}/{trust.checks} ok)"


def agent_network(record: coordinator_pb2.AgentRecord) -> str:
    """The network throughput clients observed to and from the agent, smoothed, in MB/s; "-" if none."""
    rate = record.network_bytes_per_second / 1e6
    if rate <= 0:
        return "-"
    return f"{rate:,.0f} MB/s" if rate >= 10 else f"{rate:.2g} MB/s"


def agent_speed(status: control_pb2.AgentStatus) -> str:
    """The workers' measured float32 GEMM speed, summed (placement sizes shards by it); "-" if unmeasured."""
    total = sum(worker.gemm_f32_gflops for worker in status.workers)
    return f"{total:,.0f}" if total > 0 else "-"


def agent_options(status: control_pb2.AgentStatus) -> str:
    """What the agent offers beyond the data plane: its bulk byte path's port, and whether its owner lets it
    run Python tasks (``--allow-python``)."""
    options = []
    if status.bulk_port:
        options.append(f"bulk:{status.bulk_port}")
    if status.allow_python:
        options.append("python")
    return ",".join(options) or "-"


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
                job.ended_reason or "-",
            ]
        )
    headers = ["JOB", "CLIENT", "STATE", "STARTED", "ARRAYS", "PLACED", "ENDED"]
    return render_table(headers, rows, align="<<<<>><")


# -- the commands -------------------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> CoordinatorClient:
    # Commands wait for the agent's answer, so they get at least the default command deadline.
    credentials = PoolCredentials.from_env(args.coordinator, token=args.token, ca=args.ca)
    return CoordinatorClient(
        credentials, timeout=args.timeout, command_timeout=max(args.timeout, Timeouts().command + 5.0)
    )


def _check_broker(reply: coordinator_pb2.ListAgentsReply, address: str) -> None:
    """Raise when the coordinator cannot reach its broker: its registry may be stale or empty."""
    if not reply.broker_connected:
        raise TransportError(
            address,
            (reply.broker_detail or "the coordinator cannot reach its MQTT broker")
            + "; the agents shown may be stale",
        )


def run_agents(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """``gpupool agents [--json] [--all] [--watch SECONDS]``."""
    with _client(args) as client:
        while True:
            reply = client.list_agents(include_offline=args.all)
            records = list(reply.agents)
            if args.watch is None:
                _check_broker(reply, client.address)
            elif not reply.broker_connected:
                print(f"gpupool: {reply.broker_detail}", file=sys.stderr)
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
        agents: how many agents are in each state (ready, cordoned, draining, offline; quarantined
            where any is).
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
        states = Counter(agent_state(r) for r in records)
        serving = [r for r in records if r.status.state != control_pb2.AGENT_STATE_OFFLINE]
        memory = [agent_memory(r) for r in serving]
        return cls(
            coordinator=address,
            agents={
                name: states.get(name, 0)
                for name in ("ready", "cordoned", "draining", "quarantined", "offline")
                if name != "quarantined" or states.get(name)
            },
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
        reply = client.list_agents(include_offline=True)
        jobs = client.list_jobs(all_sessions=False)
    summary = PoolSummary.of(client.address, list(reply.agents), jobs)
    if args.json:
        print(json.dumps(dataclasses.asdict(summary), indent=2), file=out)
    else:
        print("\n".join(summary.lines()), file=out)
    _check_broker(reply, client.address)
    return 0


def evacuation_lines(evacuation: coordinator_pb2.Evacuation) -> list[str]:
    """What ``gpupool drain`` prints of the moves: a line per session and target, a total, what stayed."""
    lines = [
        f"  moved {group.buffers} buffer(s), {format_bytes(group.bytes)}, of session "
        f"{group.session or '(none)'} to agent {group.agent_id} worker {group.worker}"
        for group in evacuation.moved
    ]
    if evacuation.buffers_moved or evacuation.buffers_left:
        lines.append(
            f"moved {evacuation.buffers_moved} buffer(s), {format_bytes(evacuation.bytes_moved)}, "
            f"to {len({group.agent_id for group in evacuation.moved})} agent(s) in {evacuation.seconds:.1f} s"
        )
    elif not evacuation.problems:
        lines.append("it held no buffers: nothing to move")
    else:
        lines.append("nothing moved:")
    if evacuation.buffers_left:
        lines.append(
            f"{evacuation.buffers_left} buffer(s), {format_bytes(evacuation.bytes_left)}, stay on the agent "
            "(it serves them until they are freed)"
        )
    lines.extend(f"  {problem}" for problem in evacuation.problems)
    return lines


def run_admin(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """``gpupool drain|cordon|uncordon ID [--reason TEXT]``: prints the agent's new state (and for a drain,
    what moved where; ``--no-move`` keeps the agent's buffers where they are)."""
    action: AdminAction = args.command
    no_move = bool(getattr(args, "no_move", False))
    with _client(args) as client:
        reply = client.command(
            action,
            args.agent,
            reason=args.reason,
            no_move=no_move,
            move_timeout=getattr(args, "move_timeout", MOVE_TIMEOUT),
        )
    status = reply.agent
    if action == "forget":
        print(
            f"{status.name or status.agent_id} ({status.agent_id}) is forgotten and its enrolment revoked",
            file=out,
        )
    else:
        print(
            f"{status.name or status.agent_id} ({status.agent_id}) is now {state_name(status.state)}",
            file=out,
        )
    if action == "drain" and reply.HasField("evacuation"):
        print("\n".join(evacuation_lines(reply.evacuation)), file=out)
    return 0


def run_jobs(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """``gpupool jobs [--json] [--mine]``: client sessions (every one with an admin token)."""
    if getattr(args, "job_action", None) == "end":
        return run_end_job(args, out)
    with _client(args) as client:
        jobs = client.list_jobs(all_sessions=not args.mine)
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


def run_end_job(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """``gpupool jobs end ID``: end a session as an expired lease would (admin token)."""
    with _client(args) as client:
        job = client.end_job(args.job_id)
    print(f"job {job.job_id} ({job.client}) is {job.state}: {job.ended_reason}", file=out)
    return 0

"""What the client API hands back about the pool: agents, GPUs, shards."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from gpupool._proto.v1 import control_pb2, coordinator_pb2

__all__ = ["AgentInfo", "AgentStateName", "GpuInfo", "Shard", "agent_info_from_record", "state_name"]

AgentStateName = Literal["ready", "cordoned", "draining", "offline", "unknown"]

_STATES: dict[int, AgentStateName] = {
    control_pb2.AGENT_STATE_READY: "ready",
    control_pb2.AGENT_STATE_CORDONED: "cordoned",
    control_pb2.AGENT_STATE_DRAINING: "draining",
    control_pb2.AGENT_STATE_OFFLINE: "offline",
}


def state_name(state: int) -> AgentStateName:
    """The lower-case name of an AgentState value."""
    return _STATES.get(state, "unknown")


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """One GPU of an agent, as NVML described it (zero or empty where NVML could not say)."""

    index: int
    model: str
    memory_total: int
    memory_free: int
    compute_capability: str
    pcie_generation: int
    pcie_width: int
    uuid: str


@dataclass(frozen=True, slots=True)
class AgentInfo:
    """One agent in the pool's registry.

    Memory figures are the sums over the agent's workers: ``memory_limit`` is what the agent lets gpupool
    hold, ``memory_used`` what resident buffers take. ``enrolled`` says whether it holds a certificate of
    the pool CA (its fingerprint is ``certificate``): such an agent is dialled with TLS, checked against its
    id, and takes calls only with capabilities; an agent run ``--insecure`` is open to anyone.
    """

    id: str
    name: str
    state: AgentStateName
    backend: str
    endpoint: str
    hostname: str
    version: str
    workers: int
    gpus: tuple[GpuInfo, ...]
    memory_limit: int
    memory_used: int
    seconds_since_seen: float
    note: str
    certificate: str = ""
    #: The workers' measured float32 GEMM speed, summed (GFLOP/s; 0.0 where not measured): what placement
    #: sizes shards by.
    gemm_gflops: float = 0.0
    #: What clients' verification found of its results: (agreed + 1) / (checks + 2), the checks counted,
    #: how many of them disagreed, and whether placement skips it for that (until an operator uncordons it).
    trust: float = 0.5
    checks: int = 0
    mismatches: int = 0
    quarantined: bool = False
    #: The network throughput clients observed to and from it, smoothed (bytes/s; 0.0: none reported).
    network_bytes_per_second: float = 0.0

    @property
    def enrolled(self) -> bool:
        """Whether the agent enrolled with the pool CA (rather than running ``--insecure``)."""
        return bool(self.certificate)

    @property
    def memory_free(self) -> int:
        """Bytes the agent can still take."""
        return max(0, self.memory_limit - self.memory_used)


@dataclass(frozen=True, slots=True)
class Shard:
    """Rows ``[start, stop)`` of a remote array, held by one worker of one agent."""

    agent_id: str
    start: int
    stop: int
    worker: int = 0

    @property
    def rows(self) -> int:
        """How many rows the shard holds."""
        return self.stop - self.start


def agent_info_from_record(record: coordinator_pb2.AgentRecord) -> AgentInfo:
    """An :class:`AgentInfo` from the coordinator's registry record (telemetry wins where newer)."""
    status = record.status
    used = {w.index: w.memory_used for w in status.workers}
    limit = {w.index: w.memory_limit for w in status.workers}
    if record.HasField("telemetry"):
        for w in record.telemetry.workers:
            used[w.index] = w.memory_used
            limit[w.index] = w.memory_limit or limit.get(w.index, 0)
    gpus = tuple(
        GpuInfo(
            index=w.gpu.index,
            model=w.gpu.model,
            memory_total=w.gpu.memory_total,
            memory_free=w.gpu.memory_free,
            compute_capability=w.gpu.compute_capability,
            pcie_generation=w.gpu.pcie_generation,
            pcie_width=w.gpu.pcie_width,
            uuid=w.gpu.uuid,
        )
        for w in status.workers
        if w.HasField("gpu")
    )
    return AgentInfo(
        id=status.agent_id,
        name=status.name,
        state=state_name(status.state),
        backend=status.backend,
        endpoint=status.endpoint,
        hostname=status.hostname,
        version=status.version,
        workers=len(status.workers),
        gpus=gpus,
        memory_limit=sum(limit.values()),
        memory_used=sum(used.values()),
        seconds_since_seen=record.seconds_since_seen,
        note=status.note,
        certificate=status.certificate_fingerprint,
        gemm_gflops=float(sum(w.gemm_f32_gflops for w in status.workers)),
        trust=record.trust.score if record.HasField("trust") else 0.5,
        checks=record.trust.checks,
        mismatches=record.trust.mismatches,
        quarantined=record.trust.quarantined,
        network_bytes_per_second=record.network_bytes_per_second,
    )

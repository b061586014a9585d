"""What the agent tells the pool about itself: the retained status and the periodic telemetry."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from google.protobuf.timestamp_pb2 import Timestamp

from gpupool._proto.v1 import control_pb2
from gpupool.agent import kernel_cache
from gpupool.agent.buffers import BufferRegistry
from gpupool.agent.discovery import GpuTelemetry
from gpupool.agent.procworker import AnyWorker
from gpupool.protocol.codec import SCHEMA_VERSION

__all__ = ["Counters", "Identity", "build_status", "build_telemetry", "now"]


def now() -> Timestamp:
    """The current time as a protobuf timestamp."""
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp


@dataclass(slots=True)
class Counters:
    """Work done since start, reported in telemetry. Updated on the event loop only.

    The kernel counts are those of the worker processes (read each heartbeat); telemetry adds this
    process's own kernel cache (:func:`gpupool.agent.kernel_cache.counts`: in-process workers).
    """

    ops_executed: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    #: Kernel cache (hits, compiles) last read from each worker process, by worker index.
    worker_kernels: dict[int, tuple[int, int]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class Identity:
    """The parts of the status that do not change while the agent runs.

    Attributes:
        agent_id: the agent's id.
        name: its human name.
        version: gpupool's version.
        endpoint: ``host:port`` of the data plane, as clients should dial it.
        hostname: this machine's hostname.
        backend: ``"cupy"`` or ``"numpy"``.
        note: why this backend (may be empty).
        started: when the agent started.
        bulk_port: the port of its bulk byte path on the endpoint's host (0: none).
        allow_python: whether its owner lets it run Python tasks.
        temperature_limit: degrees C above which its GPUs take no new rows (0: none).
    """

    agent_id: str
    name: str
    version: str
    endpoint: str
    hostname: str
    backend: str
    note: str
    started: Timestamp
    bulk_port: int = 0
    allow_python: bool = False
    temperature_limit: float = 0.0


def build_status(
    identity: Identity,
    state: control_pb2.AgentState,
    workers: Sequence[AnyWorker],
    registry: BufferRegistry,
    gpu_telemetry: Mapping[int, GpuTelemetry] | None = None,
) -> control_pb2.AgentStatus:
    """The agent's status now; ``gpu_telemetry`` (by worker index) refreshes each GPU's memory free."""
    status = control_pb2.AgentStatus(
        schema_version=SCHEMA_VERSION,
        agent_id=identity.agent_id,
        name=identity.name,
        version=identity.version,
        endpoint=identity.endpoint,
        state=state,
        backend=identity.backend,
        hostname=identity.hostname,
        updated=now(),
        note=identity.note,
        started=identity.started,
        bulk_port=identity.bulk_port,
        allow_python=identity.allow_python,
    )
    for worker in workers:
        usage = registry.usage(worker.index)
        down = worker.down
        if down:  # a worker process that kept dying: nothing is to be placed there
            status.note = f"{status.note}; {down}" if status.note else down
        entry = status.workers.add(
            index=worker.index,
            backend=worker.backend.name,
            memory_limit=0 if down else usage.limit,
            memory_used=usage.used,
            buffers=usage.buffers,
            gemm_f32_gflops=worker.measured.gemm_f32_gflops,
            gemm_f16_gflops=worker.measured.gemm_f16_gflops,
            host_to_device_gbps=worker.measured.host_to_device_gbps,
        )
        if worker.gpu is not None:
            entry.temperature_limit_c = identity.temperature_limit
            entry.gpu.CopyFrom(worker.gpu)
            seen = (gpu_telemetry or {}).get(worker.index)
            if seen is not None and seen.memory_free:
                entry.gpu.memory_free = seen.memory_free
    return status


def build_telemetry(
    agent_id: str,
    workers: Sequence[AnyWorker],
    registry: BufferRegistry,
    gpu_telemetry: Mapping[int, GpuTelemetry],
    counters: Counters,
) -> control_pb2.AgentTelemetry:
    """One telemetry report; ``gpu_telemetry`` is by worker index (absent for NumPy workers)."""
    kernels = kernel_cache.counts()
    report = control_pb2.AgentTelemetry(
        schema_version=SCHEMA_VERSION,
        agent_id=agent_id,
        time=now(),
        ops_executed=counters.ops_executed,
        bytes_received=counters.bytes_received,
        bytes_sent=counters.bytes_sent,
        kernel_cache_hits=kernels.hits + sum(hits for hits, _ in counters.worker_kernels.values()),
        kernel_compiles=kernels.compiles + sum(compiles for _, compiles in counters.worker_kernels.values()),
    )
    for worker in workers:
        usage = registry.usage(worker.index)
        gpu = gpu_telemetry.get(worker.index, GpuTelemetry())
        report.workers.add(
            index=worker.index,
            memory_used=usage.used,
            memory_limit=usage.limit,
            buffers=usage.buffers,
            gpu_memory_free=gpu.memory_free,
            utilization_percent=gpu.utilization_percent,
            temperature_c=gpu.temperature_c,
            power_w=gpu.power_w,
        )
    return report

"""The agent's configuration, as the command line or a launcher gives it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from gpupool._config import DEFAULT_TOPIC_PREFIX, BrokerAddress, Timeouts, parse_memory_limit
from gpupool.security.pki import AgentIdentity

__all__ = ["DEFAULT_AGENT_PORT", "AgentConfig", "BackendChoice"]

BackendChoice = Literal["auto", "cupy", "numpy"]

#: The port an agent listens on when ``--listen`` names none (the coordinator's default is 50051).
DEFAULT_AGENT_PORT = 50052


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentConfig:
    """Everything an :class:`~gpupool.agent.runtime.Agent` needs to start.

    Attributes:
        broker: the MQTT broker to register with.
        agent_id: this agent's id (a fresh random one unless given).
        name: a human name; the hostname unless given.
        listen_host: the interface the gRPC data plane binds.
        listen_port: its port; 0 picks a free one (the ready line and the status tell which).
        advertise: the host clients should dial; empty means the listen host, or this machine's
            address when listening on every interface.
        bulk_port: the port of the bulk byte path other agents read rows from, on ``listen_host``
            (0 picks a free one); None for none (rows go over gRPC only).
        backend: ``auto`` (CuPy where CUDA works, else NumPy), ``cupy`` (fail without CUDA) or ``numpy``.
        allow_kernels: run users' CUDA kernels (op ``kernel``); refused with permission-denied otherwise.
        fuse_kernels: on CuPy workers, run elementwise chains of programs as kernels the agent generates
            (experimental until run on a GPU).
        worker_processes: each worker's buffers and compute in a process of its own, supervised and
            restarted by the agent (:mod:`gpupool.agent.procworker`); False keeps them in the agent's
            process (``--in-process-workers``: no fault isolation, a little less latency per call).
        control_socket: the Unix socket the rig's owner pauses and resumes the agent through
            (:mod:`gpupool.agent.control`); "" for none.
        pause_schedule: windows of the rig's local time in which the agent is paused, as
            ``gpupool-agent pause`` pauses it (``Mon-Fri 08:00-18:00``: :mod:`gpupool.agent.schedule`).
        max_temperature: degrees C above which a GPU worker takes no new rows (the coordinator skips it
            while its telemetry says so); 0 for no limit.
        allow_python: run users' Python tasks (``RunPython``, each in a process of its own); refused
            with permission-denied otherwise.
        memory_limit: per worker, a percentage of the GPU's memory (of host RAM for a NumPy worker)
            or a size (``80%``, ``6GiB``, ``1000000``).
        session_memory_limit: per worker, the most one session may hold there, resident and reserved:
            a percentage of the worker's limit or a size (``50%``, ``512MiB``); empty for no cap.
        topic_prefix: the first MQTT topic level.
        heartbeat: seconds between telemetry reports.
        timeouts: deadlines for network waits.
        shutdown_grace: seconds in-flight calls get to finish on a clean stop.
        identity: what enrolment gave the agent (its id, certificate, the coordinator's key); None for
            an ``insecure`` agent, which serves plaintext and takes calls without capabilities.
        insecure: allow no identity, and plaintext beyond loopback (development only).
    """

    broker: BrokerAddress
    agent_id: str
    name: str
    listen_host: str = "0.0.0.0"
    listen_port: int = DEFAULT_AGENT_PORT
    advertise: str = ""
    bulk_port: int | None = 0
    backend: BackendChoice = "auto"
    allow_kernels: bool = False
    allow_python: bool = False
    max_temperature: float = 85.0
    control_socket: str = ""
    pause_schedule: tuple[str, ...] = ()
    fuse_kernels: bool = False
    worker_processes: bool = True
    memory_limit: str = "80%"
    session_memory_limit: str = ""
    topic_prefix: str = DEFAULT_TOPIC_PREFIX
    heartbeat: float = field(default_factory=lambda: Timeouts().heartbeat)
    timeouts: Timeouts = field(default_factory=Timeouts)
    shutdown_grace: float = 2.0
    identity: AgentIdentity | None = None
    insecure: bool = False

    def session_limit(self, worker_limit: int) -> int | None:
        """The cap on one session's bytes on a worker of ``worker_limit`` bytes; None for none.

        Raises:
            UsageError: an unreadable ``session_memory_limit``.
        """
        if not self.session_memory_limit:
            return None
        return parse_memory_limit(self.session_memory_limit, worker_limit)

"""A whole pool on this machine: broker, coordinator and agents as subprocesses.

:class:`LocalPool` is what ``gpupool up`` and ``gpupool demo`` run, and what end-to-end tests use as
their fixture::

    with LocalPool(agents=2, port=0, backend="numpy") as pool:
        os.environ["GPUPOOL_COORDINATOR"] = pool.coordinator_address
        ...

Every part is a real program started with :func:`gpupool._process.spawn` and found through its ready
line, so a pool here behaves like one spread over many hosts. Agents start in parallel. Once started,
the pool waits until the coordinator lists every agent as READY.

Credentials included (see :mod:`gpupool._localstate`): the pool's state dir holds the CA and tokens; the
agents enrol with a join token, serve TLS and check capabilities; the embedded Mosquitto (with its
dynamic-security plugin) admits only the coordinator and the enrolled agents. ``secure=False`` runs
open agents (``--insecure``) instead, for tests of the open mode and for comparison in benchmarks.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, Self, TypeVar

from gpupool._config import DEFAULT_TOPIC_PREFIX, parse_broker_url
from gpupool._errors import ConnectError, DeadlineExceeded, GpupoolError, UsageError
from gpupool._localstate import LocalCredentials, prepare_local_state, write_env_files
from gpupool._process import Child, spawn
from gpupool._proto.v1 import control_pb2, coordinator_pb2
from gpupool.broker import BrokerKind, mosquitto_secure_available, start_broker
from gpupool.client.pool import Pool, connect
from gpupool.transport.coordinator import CoordinatorClient, PoolCredentials

__all__ = ["Backend", "LocalPool"]

Backend = Literal["auto", "cupy", "numpy"]
T = TypeVar("T")

#: Environment variables that cap the threads of NumPy's BLAS and OpenMP in each agent, so that N agents
#: on one host do not each start one thread per core.
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


class LocalPool:
    """A broker, a coordinator and ``agents`` agents on this machine, each a subprocess.

    Use it as a context manager (or call :meth:`start` and :meth:`stop`). Every option is keyword-only.

    Args:
        agents: how many agents to start.
        broker_url: an MQTT broker to use; None starts an embedded one (Mosquitto from PATH, else amqtt).
        broker_kind: which embedded broker to start ("auto", "mosquitto", "amqtt").
        port: the coordinator's gRPC port on 127.0.0.1; 0 picks a free one.
        topic_prefix: the MQTT topic prefix; None reads ``$GPUPOOL_TOPIC_PREFIX``, else "gpupool".
        backend: each agent's ``--backend``.
        memory_limit: each agent's ``--memory-limit`` ("80%", "512MiB"); None shares 80% among the agents,
            since agents on one machine share its memory (or its GPUs).
        agent_args: extra command-line arguments for every agent.
        coordinator_args: extra command-line arguments for the coordinator.
        env: extra environment variables for every child.
        threads_per_agent: caps BLAS/OpenMP threads in each agent (unless ``env`` or the environment
            sets them); None divides the CPU cores among the agents, 0 leaves them alone.
        start_timeout: seconds each program has to print its ready line.
        ready_timeout: seconds, after the programs are up, for the coordinator to list every agent READY.
        stop_timeout: seconds each stage of :meth:`stop` waits before it kills what is left.
        rpc_timeout: the deadline of each call to the coordinator while waiting.
        stderr: where the children's logs go (inherited by default; ``subprocess.DEVNULL`` silences them).
        state_dir: the pool's state dir (CA, tokens, agents' identities); None makes a temporary one,
            removed on stop.
        secure: enrolled agents with TLS and capabilities, and a dynamic-security Mosquitto when the
            broker is embedded Mosquitto; False: open ``--insecure`` agents (tokens are still needed).
    """

    def __init__(
        self,
        *,
        agents: int = 2,
        broker_url: str | None = None,
        broker_kind: BrokerKind = "auto",
        port: int = 50051,
        topic_prefix: str | None = None,
        backend: Backend = "auto",
        memory_limit: str | None = None,
        agent_args: Sequence[str] = (),
        coordinator_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        threads_per_agent: int | None = None,
        start_timeout: float = 60.0,
        ready_timeout: float = 30.0,
        stop_timeout: float = 10.0,
        rpc_timeout: float = 5.0,
        stderr: IO[bytes] | int | None = None,
        state_dir: Path | None = None,
        secure: bool = True,
    ) -> None:
        if agents < 0:
            raise UsageError(f"agents must be zero or more, not {agents}")
        if not 0 <= port <= 65535:
            raise UsageError(f"port must be from 0 to 65535, not {port}")
        if broker_url is not None:
            parse_broker_url(broker_url)  # fail early on a malformed URL
        self._initial_agents = agents
        self._external_broker_url = broker_url
        self._broker_kind: BrokerKind = broker_kind
        self._port = port
        self.topic_prefix = topic_prefix or os.environ.get("GPUPOOL_TOPIC_PREFIX") or DEFAULT_TOPIC_PREFIX
        self.backend: Backend = backend
        self._memory_limit = memory_limit or f"{80 / max(1, agents):g}%"
        self._agent_args = tuple(agent_args)
        self._coordinator_args = tuple(coordinator_args)
        self._env = dict(env or {})
        self._threads_per_agent = threads_per_agent
        self._start_timeout = start_timeout
        self._ready_timeout = ready_timeout
        self._stop_timeout = stop_timeout
        self._rpc_timeout = rpc_timeout
        self._stderr = stderr
        self._temporary_state = state_dir is None
        self.state_dir = state_dir or Path(tempfile.mkdtemp(prefix="gpupool-pool-"))
        self.secure = secure
        self.credentials: LocalCredentials | None = None
        self._coordinator_client: CoordinatorClient | None = None

        self.broker: Child | None = None
        self.coordinator: Child | None = None
        self.agents: list[Child] = []
        self._broker_url: str | None = broker_url
        self._next_agent = 0
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=32, thread_name_prefix="gpupool.local")
        self._inflight: list[Future[Any]] = []
        self._started = False
        self._stopped = False

    # -- the context manager --------------------------------------------------------------------------

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- where things are -----------------------------------------------------------------------------

    @property
    def broker_url(self) -> str:
        """The broker's URL (``mqtt://127.0.0.1:PORT``).

        Raises:
            UsageError: the pool has not started its broker.
        """
        if self._broker_url is None:
            raise UsageError("the pool has not started yet")
        return self._broker_url

    @property
    def broker_kind(self) -> str:
        """What runs the broker: "mosquitto" or "amqtt" when embedded, "external" otherwise."""
        if self.broker is None:
            return "external"
        return str(self.broker.ready.get("kind", "unknown"))

    @property
    def embedded_broker(self) -> bool:
        """Whether this pool started (and owns) its broker."""
        return self._external_broker_url is None

    @property
    def client_token(self) -> str:
        """A client token of this pool (what ``client.env`` exports)."""
        return self._credentials().client_token

    @property
    def admin_token(self) -> str:
        """The operator's admin token (what ``admin.env`` exports)."""
        return self._credentials().admin_token

    def connect(self, **options: Any) -> Pool:
        """A client session on this pool, with its client token (options go to :func:`gpupool.connect`)."""
        options.setdefault("token", self.client_token)
        return connect(self.coordinator_address, **options)

    def _credentials(self) -> LocalCredentials:
        if self.credentials is None:
            raise UsageError("the pool has not started yet")
        return self.credentials

    def coordinator_client(self) -> CoordinatorClient:
        """A client of the coordinator with the admin token (owned by the pool; do not close it)."""
        if self._coordinator_client is None:
            self._coordinator_client = CoordinatorClient(
                PoolCredentials(address=self.coordinator_address, token=self.admin_token),
                timeout=self._rpc_timeout,
            )
        return self._coordinator_client

    @property
    def coordinator_address(self) -> str:
        """The coordinator's gRPC address (``127.0.0.1:PORT``).

        Raises:
            UsageError: the pool has not started its coordinator.
        """
        if self.coordinator is None:
            raise UsageError("the pool has not started yet")
        return str(self.coordinator.ready["listen"])

    def live_agents(self) -> list[Child]:
        """The agents whose processes are still running."""
        return [agent for agent in self.agents if agent.alive()]

    # -- starting -------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the broker (if embedded), the coordinator and the agents; return once all are READY.

        On any failure, including KeyboardInterrupt, everything started so far is stopped before the
        exception propagates.

        Raises:
            ConnectError: a program did not come up, or exited while starting.
            DeadlineExceeded: the coordinator did not list every agent READY within ``ready_timeout``.
            UsageError: the pool was already started.
        """
        if self._started:
            raise UsageError("a LocalPool starts once; make a new one")
        self._started = True
        try:
            self.credentials = prepare_local_state(self.state_dir)
            if self._external_broker_url is None:
                self._in_background(self._start_broker).result()
            self._in_background(self._start_coordinator).result()
            write_env_files(self.credentials, self.coordinator_address)
            self._start_agents(self._initial_agents)
            self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def add_agent(
        self,
        *,
        name: str | None = None,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        wait: bool = True,
    ) -> Child:
        """Start one more agent and (with ``wait``) return once the coordinator lists it READY.

        Args:
            name: the agent's ``--name``; ``agent-<n>`` by default.
            args: extra arguments for this agent only.
            env: extra environment variables for this agent only (e.g. ``GPUPOOL_SLOWDOWN`` in a benchmark).
            wait: whether to wait until the coordinator lists it READY.

        Raises:
            ConnectError: the agent did not come up.
            DeadlineExceeded: the coordinator did not list it READY in time.
        """
        self._check_running()
        (child,) = self._start_agents(1, names=[name] if name else None, args=args, env=env)
        if wait:
            self.wait_ready([child])
        return child

    # Each program starts on a helper thread that records the Child itself: a KeyboardInterrupt (or the
    # SIGTERM `gpupool up` turns into one) lands in the main thread, never between a Popen and its
    # recording, so stop() always finds every process that was started.

    def _in_background(self, start: Callable[[], T]) -> Future[T]:
        future = self._executor.submit(start)
        with self._lock:
            self._inflight = [f for f in self._inflight if not f.done()] + [future]
        return future

    def _start_broker(self) -> None:
        # A secure broker needs Mosquitto's dynamic-security plugin; amqtt (the fallback) has none.
        secure = self.secure and self._broker_kind != "amqtt" and mosquitto_secure_available()
        self.broker = start_broker(
            self._broker_kind,
            timeout=self._start_timeout,
            secure=secure,
            state_dir=self.state_dir / "broker" if secure else None,
            topic_prefix=self.topic_prefix,
        )
        self._broker_url = str(self.broker.ready["url"])

    @property
    def secure_broker(self) -> bool:
        """Whether the pool's broker admits only its coordinator and enrolled agents."""
        return self.broker is not None and bool(self.broker.ready.get("secure"))

    def _start_coordinator(self) -> None:
        credentials = self._credentials()
        broker_url = self.broker_url
        env = dict(self._env)
        argv = [sys.executable, "-m", "gpupool.coordinator"]
        if self.secure_broker:
            assert self.broker is not None
            host_port = broker_url.removeprefix("mqtt://")
            broker_url = f"mqtt://{self.broker.ready['admin_username']}@{host_port}"
            env["GPUPOOL_BROKER_PASSWORD"] = str(self.broker.ready["admin_password"])  # not on argv
            argv += ["--manage-mqtt-users"]
        if not self.secure:
            argv += ["--allow-unenrolled"]
        argv += ["--broker", broker_url, "--state-dir", str(credentials.coordinator_dir)]
        argv += ["--listen", f"127.0.0.1:{self._port}", "--topic-prefix", self.topic_prefix]
        argv += self._coordinator_args
        self.coordinator = spawn(
            "coordinator", argv, timeout=self._start_timeout, env=env, stderr=self._stderr
        )

    def _start_agents(
        self,
        count: int,
        *,
        names: Sequence[str] | None = None,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> list[Child]:
        """Spawn ``count`` agents at once, then wait for each one's ready line."""
        with self._lock:
            first = self._next_agent
            self._next_agent += count
        labels = list(names) if names else [f"agent-{first + i}" for i in range(count)]
        start = functools.partial(self._start_agent, args=args, env=env)
        futures = [self._in_background(functools.partial(start, label)) for label in labels]
        for future in futures:
            future.exception()  # waits; each spawn gives up by itself after start_timeout
        started = [future.result() for future in futures if future.exception() is None]
        with self._lock:  # keep the order of the names, not of the ready lines
            self.agents = [a for a in self.agents if a not in started] + started
        for future in futures:
            failure = future.exception()
            if failure is not None:
                raise failure
        return started

    def _start_agent(self, name: str, *, args: Sequence[str], env: Mapping[str, str] | None = None) -> Child:
        argv = [sys.executable, "-m", "gpupool.agent", "--broker", self.broker_url, "--listen", "127.0.0.1:0"]
        argv += ["--name", name, "--topic-prefix", self.topic_prefix, "--backend", self.backend]
        if self.secure:
            agent_dir = self._credentials().agent_dir(name)
            argv += ["--state-dir", str(agent_dir), "--coordinator", self.coordinator_address]
        else:
            argv += ["--insecure"]
        if self._memory_limit is not None:
            argv += ["--memory-limit", self._memory_limit]
        argv += [*self._agent_args, *args]
        environment = {**self._agent_env(), **(env or {})}
        child = spawn("agent", argv, timeout=self._start_timeout, env=environment, stderr=self._stderr)
        with self._lock:
            self.agents.append(child)
        return child

    def _agent_env(self) -> dict[str, str]:
        env = dict(self._env)
        if self.secure:
            env["GPUPOOL_JOIN_TOKEN"] = self._credentials().join_token  # not on argv, where ps shows it
        threads = self._threads_per_agent
        if threads is None:
            threads = max(1, (os.cpu_count() or 1) // max(1, self._initial_agents))
        if threads > 0:
            for variable in _THREAD_VARIABLES:
                if variable not in env and variable not in os.environ:
                    env[variable] = str(threads)
        return env

    # -- waiting on the coordinator -------------------------------------------------------------------

    def list_agents(self, *, include_offline: bool = False) -> list[coordinator_pb2.AgentRecord]:
        """The coordinator's registry, as ``gpupool agents`` shows it.

        Raises:
            ConnectError, DeadlineExceeded: the coordinator did not answer.
        """
        self._check_running()
        reply = self.coordinator_client().call(
            "ListAgents", coordinator_pb2.ListAgentsRequest(include_offline=include_offline)
        )
        return list(reply.agents)

    def wait_ready(self, agents: Iterable[Child] | None = None, *, timeout: float | None = None) -> None:
        """Wait until the coordinator lists each of ``agents`` (default: every live agent) as READY.

        Raises:
            ConnectError: an awaited agent's process exited.
            DeadlineExceeded: not all of them were READY within ``timeout`` (default ``ready_timeout``).
        """
        self._check_running()
        awaited = list(agents) if agents is not None else self.live_agents()
        limit = self._ready_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        missing: set[str] = {str(agent.ready.get("agent_id", "")) for agent in awaited}
        last_error = ""
        client = self.coordinator_client()
        while True:
            for agent in awaited:
                if not agent.alive():
                    raise ConnectError(
                        str(agent.ready.get("name", "agent")),
                        f"exited with code {agent.process.returncode} before it was READY",
                    )
            if self.coordinator is not None and not self.coordinator.alive():
                raise ConnectError(
                    self.coordinator_address,
                    f"coordinator exited with code {self.coordinator.process.returncode}",
                )
            left = deadline - time.monotonic()
            try:
                reply = client.call(
                    "ListAgents",
                    coordinator_pb2.ListAgentsRequest(include_offline=False),
                    timeout=max(0.1, min(self._rpc_timeout, left)),
                )
            except GpupoolError as exc:
                last_error = f"; last ListAgents error: {exc}"
            else:
                ready = {
                    record.status.agent_id
                    for record in reply.agents
                    if record.status.state == control_pb2.AGENT_STATE_READY
                }
                missing -= ready
                if not missing:
                    return
                last_error = ""
            if time.monotonic() >= deadline:
                raise DeadlineExceeded(
                    self.coordinator_address,
                    f"agents {sorted(missing)} not READY within {limit:.0f} s{last_error}",
                )
            time.sleep(0.05)

    # -- faults and changes ---------------------------------------------------------------------------

    def kill_agent(self, index: int) -> None:
        """SIGKILL agent ``index``: no goodbye, so its status turns OFFLINE by the broker's last will."""
        self.agents[index].kill()
        self._close_pipes(self.agents[index])

    def stop_agent(self, index: int) -> int | None:
        """Stop agent ``index`` cleanly (SIGTERM, SIGKILL after ``stop_timeout``); returns its exit code."""
        agent = self.agents[index]
        code = agent.stop(self._stop_timeout)
        self._close_pipes(agent)
        return code

    def restart_coordinator(self, *, down_for: float = 0.0) -> None:
        """Stop the coordinator (SIGTERM) and start it again on the same port and state dir.

        Raises:
            ConnectError: it did not come back.
        """
        self._check_running()
        assert self.coordinator is not None
        port = int(self.coordinator_address.rsplit(":", 1)[1])
        old = self.coordinator
        old.stop(self._stop_timeout)
        self._close_pipes(old)
        if down_for > 0:
            time.sleep(down_for)
        saved, self._port = self._port, port
        try:
            self._start_coordinator()
        finally:
            self._port = saved

    def restart_broker(self, *, down_for: float = 0.0) -> None:
        """Stop the embedded broker and start it again on the same port (retained state is lost).

        Args:
            down_for: seconds to leave it down before starting it again.

        Raises:
            UsageError: the broker is not embedded.
            ConnectError: it did not come back.
        """
        self._check_running()
        if self.broker is None:
            raise UsageError("the pool uses an external broker; restart it yourself")
        old = self.broker
        port = int(old.ready["port"])
        kind = str(old.ready.get("kind", self._broker_kind))
        old.stop(self._stop_timeout)
        self._close_pipes(old)
        if down_for > 0:
            time.sleep(down_for)
        restarted_kind: BrokerKind = "amqtt" if kind == "amqtt" else "mosquitto"
        # Both brokers bind with SO_REUSEADDR, so the port is free again as soon as the old one exited.
        self.broker = start_broker(restarted_kind, port=port, timeout=self._start_timeout)

    # -- stopping -------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop the agents, then the coordinator, then an embedded broker; idempotent and bounded.

        Each stage sends SIGTERM to its processes together, waits up to ``stop_timeout`` and kills
        whatever is left, so no child outlives the pool.
        """
        if self._stopped:
            return
        self._stopped = True
        with self._lock:
            inflight, self._inflight = self._inflight, []
        for future in inflight:  # programs still starting: each records its Child, or gives up in time
            try:
                future.exception(timeout=self._start_timeout + self._stop_timeout)
            except Exception:  # TimeoutError: spawn is bounded, so this is a last resort
                pass
        self._executor.shutdown(wait=False)
        if self._coordinator_client is not None:
            self._coordinator_client.close()
        self._stop_all(self.agents)
        if self.coordinator is not None:
            self._stop_all([self.coordinator])
        if self.broker is not None:
            self._stop_all([self.broker])
        if self._temporary_state:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def _stop_all(self, children: Sequence[Child]) -> None:
        for child in children:
            if child.alive():
                try:
                    child.process.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + self._stop_timeout
        for child in children:
            try:
                child.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
            self._close_pipes(child)

    @staticmethod
    def _close_pipes(child: Child) -> None:
        """Close our end of a finished child's stdout (its reader thread then sees EOF or an error)."""
        if child.process.poll() is None or child.process.stdout is None:
            return
        try:
            child.process.stdout.close()
        except (OSError, ValueError, RuntimeError):
            pass

    def _check_running(self) -> None:
        if not self._started or self._stopped:
            raise UsageError("the pool is not running")

"""The proxy device: a connection to a pool, from which remote arrays are made.

:class:`Pool` is the public face; the plumbing (event loop, channels, capabilities, uploads, programs and
frees) is its :class:`~gpupool.client.session.Session`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextvars import ContextVar, Token
from typing import Any, Literal

import numpy as np

from gpupool._config import Timeouts
from gpupool._errors import UsageError
from gpupool.client import replicas
from gpupool.client.array import RemoteArray, from_spec
from gpupool.client.graph import ArraySpec
from gpupool.client.layout import check_rows
from gpupool.client.lineage import Keep
from gpupool.client.operands import native_contiguous
from gpupool.client.session import Session
from gpupool.client.tasks import DEFAULT_RETRIES, Replicated, TaskFuture, Tasks
from gpupool.client.types import AgentInfo, agent_info_from_record
from gpupool.protocol.codec import check_dtype
from gpupool.transport.coordinator import PoolCredentials

__all__ = ["Pool", "active_pool", "connect"]

#: The pools made current in this context, innermost last: ``with pool:`` pushes one until the block ends,
#: :meth:`Pool.use` until another is used. A context variable, so each thread (and asyncio task) has its
#: own, as CuPy's current device is per thread: a new thread starts with none.
_CURRENT: ContextVar[tuple[Pool, ...]] = ContextVar("gpupool_current_pools", default=())


class Pool:
    """A connection to a gpupool coordinator, and the device remote arrays live on.

    Use :func:`connect` to make one; close it (or use it as a context manager) to free every buffer it made.
    Its plumbing is :attr:`_session` (a :class:`~gpupool.client.session.Session`), not part of the API.

    Args:
        credentials: the coordinator's address, this user's token, and the pool CA if the coordinator
            serves TLS.
        timeouts: deadlines for every call.
        client: how the coordinator lists this session in ``gpupool jobs``.
        progress: whether long calls show a progress bar (None: when stderr is a terminal).
    """

    def __init__(
        self,
        credentials: PoolCredentials,
        *,
        timeouts: Timeouts = Timeouts(),
        client: str | None = None,
        progress: bool | None = None,
        keep_uploads: Keep = "host",
        twins: bool = True,
        verify: float = 0.0,
    ) -> None:
        self._session = Session(
            credentials,
            timeouts=timeouts,
            client=client,
            progress=progress,
            keep_uploads=keep_uploads,
            twins=twins,
            verify=verify,
        )
        self._entered: list[Token[tuple[Pool, ...]]] = []
        self._tasks = Tasks(self._session)

    # -- what the session says --------------------------------------------------------------------
    @property
    def session(self) -> str:
        """This session's id (as ``gpupool jobs`` lists it)."""
        return self._session.id

    @property
    def address(self) -> str:
        """The coordinator's ``host:port``."""
        return self._session.address

    @property
    def timeouts(self) -> Timeouts:
        """The deadlines of every call."""
        return self._session.timeouts

    @property
    def lease(self) -> float:
        """Seconds the coordinator keeps the session's buffers without a renewal (0: no lease)."""
        return self._session.lease

    @property
    def coordinator_version(self) -> str:
        """The coordinator's gpupool version."""
        return self._session.coordinator_version

    @property
    def offline_agents(self) -> frozenset[str]:
        """The agents the coordinator showed offline at the last heartbeat."""
        return self._session.offline_agents

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._session.closed

    # -- the API ----------------------------------------------------------------------------------
    def agents(self, *, include_offline: bool = False) -> list[AgentInfo]:
        """The agents in the pool's registry (ready, cordoned and draining; offline ones on request)."""
        records = self._session.list_agents(include_offline=include_offline)
        return [agent_info_from_record(record) for record in records]

    def asarray(
        self,
        data: object,
        dtype: object = None,
        *,
        rows: Sequence[int] | None = None,
        backend: Literal["", "cupy", "numpy"] = "",
    ) -> RemoteArray:
        """Upload ``data`` (an array or nested sequence), its rows sharded over the ready agents.

        By default the coordinator splits the rows by the agents' free memory. ``rows`` chooses the
        sharding instead: row counts, one per shard, in row order (zero-row shards allowed), adding up to
        ``len(data)``; the shards go to the ready agents in agent id order, round robin when there are more
        shards than agents. Two arrays uploaded with the same ``rows`` have the same layout. ``backend``
        ``"cupy"`` places the rows only on agents whose workers run CuPy (where user kernels run,
        :class:`gpupool.ElementwiseKernel` and its kin); ``""`` on any.

        Raises:
            UnsupportedDType: a dtype gpupool does not carry (before anything is sent).
            UsageError: a 0-d array (shard along axis 0 needs one); ``rows`` that are not non-negative
                integers adding up to the row count, or given with a remote array.
            NoCapacity, PlacementError: the pool cannot take it (PlacementError too when no ready agent
                runs ``backend``).
            DeviceOutOfMemory, RemoteError: an agent refused its shard (nothing is left behind).
        """
        self._session.check_open()
        if isinstance(data, RemoteArray):
            if rows is not None:
                raise UsageError(
                    "rows= shards host data; re-shard a remote array through the host with "
                    "pool.asarray(x.get(), rows=...)"
                )
            return data if dtype is None else data.astype(dtype)
        host = np.asarray(data, dtype=check_dtype(dtype)) if dtype is not None else np.asarray(data)
        check_dtype(host.dtype)
        if host.ndim == 0:
            raise UsageError("pool.asarray needs an array of at least one dimension (rows are sharded)")
        counts = None if rows is None else check_rows(rows, host.shape[0])
        host = native_contiguous(host)
        pieces = self._session.upload(host, rows=counts, backend=backend)
        replicas.protect(self._session, host, pieces)
        return from_spec(
            ArraySpec(session=self._session, shape=host.shape, dtype=host.dtype, layout=tuple(pieces))
        )

    # -- independent tasks ------------------------------------------------------------------------
    def submit(
        self,
        fn: Callable[..., Any],
        /,
        *args: Any,
        retries: int = DEFAULT_RETRIES,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> TaskFuture:
        """Run ``fn(*args, **kwargs)`` as a task on one worker; its future.

        ``fn`` is traced now into a program of the agents' ops (:mod:`gpupool.client.trace`): write it
        with gpupool's namespace (``gp.exp``, ``x @ w``, ``gp.where``, :func:`gpupool.fori_loop`).
        Arguments may be Python scalars, small host arrays (sent inline) and data sets given with
        :meth:`replicate`. The result comes back as NumPy arrays, in the structure ``fn`` returned. A task
        whose agent is lost runs again on another worker, up to ``retries`` times. ``timeout`` bounds one
        run (default: from the traced work; 600 s for a Python task). ``retries`` and ``timeout`` are
        gpupool's; every other keyword goes to ``fn``.

        A function that cannot be traced runs as Python (cloudpickle, in a process of its own) on agents
        whose owners started them with ``--allow-python``; where there are none it is refused.

        Raises:
            TracingError: ``fn`` does something that cannot be traced (the message says what).
        """
        return self._tasks.submit(fn, args, kwargs, retries=retries, timeout=timeout)

    def map(
        self,
        fn: Callable[..., Any],
        /,
        *iterables: Iterable[Any],
        retries: int = DEFAULT_RETRIES,
        timeout: float | None = None,
    ) -> list[TaskFuture]:
        """Run ``fn`` on each item (one of each iterable per task, as the builtin ``map``) as tasks, one per
        worker at a time, placed as workers free up; the futures, in the items' order (a progress bar shows
        for long maps). Everything :meth:`submit` says holds for each task.

        Raises:
            TracingError: ``fn`` cannot be traced for some item; no task is queued then.
        """
        return self._tasks.map(fn, iterables, retries=retries, timeout=timeout)

    def replicate(self, data: Any) -> Replicated:
        """One whole copy of ``data`` (a host or remote array) on each worker that runs tasks, for tasks to
        read locally: pass the handle as a task's argument."""
        return self._tasks.replicate(data)

    def use(self) -> Pool:
        """Make this the current pool (where ``gp.zeros``, ``gp.asarray``... create arrays) in this thread,
        until another is used or it closes, as ``cupy.cuda.Device(1).use()``; returns it.

        Raises:
            UsageError: the pool is closed.
        """
        if self.closed:
            raise UsageError(f"{self!r} is closed: it cannot be the current pool")
        others = tuple(p for p in _CURRENT.get() if p is not self and not p.closed)
        _CURRENT.set((*others, self))
        return self

    def close(self) -> None:
        """Free every buffer this session made, end the session, and stop the loop; tasks not finished fail
        (UsageError). Idempotent."""
        self._tasks.close()
        self._session.close()

    def __enter__(self) -> Pool:
        """The current pool inside the block (:meth:`use`); the one before it again after."""
        if self.closed:
            raise UsageError(f"{self!r} is closed: it cannot be the current pool")
        self._entered.append(_CURRENT.set((*_CURRENT.get(), self)))
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            token = self._entered.pop()
            _CURRENT.reset(token)
        except (IndexError, ValueError, RuntimeError):  # left in another context: just drop this pool
            _CURRENT.set(tuple(p for p in _CURRENT.get() if p is not self))
        finally:
            self.close()

    def __repr__(self) -> str:
        """Address, session, state and the agents the session uses (no call is made), e.g.
        ``<gpupool.Pool 127.0.0.1:50051 session=job-3f2a… open, using 2 agents: 3f2a1b0c, 9c81d07e>``."""
        if self.closed:
            return f"<gpupool.Pool {self.address} session={self.session} closed>"
        agents = self._session.agents_in_use
        using = f"using {len(agents)} agent{'s' * (len(agents) != 1)}"
        names = (
            ": " + ", ".join(a[:8] for a in agents[:6]) + (", ..." if len(agents) > 6 else "")
            if agents
            else ""
        )
        return f"<gpupool.Pool {self.address} session={self.session} open, {using}{names}>"


def active_pool() -> Pool | None:
    """The innermost open pool made current in this context (``with pool:`` or :meth:`Pool.use`), if any."""
    for pool in reversed(_CURRENT.get()):
        if not pool.closed:
            return pool
    return None


def connect(
    address: str | None = None,
    *,
    token: str | None = None,
    ca: str | bytes | None = None,
    timeouts: Timeouts | None = None,
    client: str | None = None,
    progress: bool | None = None,
    keep_uploads: Keep = "host",
    twins: bool = True,
    verify: float = 0.0,
) -> Pool:
    """Connect to a pool's coordinator.

    Args:
        address: ``host:port``; default ``$GPUPOOL_COORDINATOR``, else ``127.0.0.1:50051``.
        token: a client token; default ``$GPUPOOL_TOKEN`` (``gpupool up`` writes one to
            ``<state-dir>/client.env``).
        ca: the pool CA (a PEM file's path, or its bytes) for a coordinator that serves TLS; default
            ``$GPUPOOL_CA``.
        timeouts: deadlines for every call (defaults: :class:`gpupool.Timeouts`).
        client: how ``gpupool jobs`` lists this session (default ``user@host``).
        progress: show a progress bar on stderr for uploads, downloads and computations that take more
            than about a second; default: when stderr is a terminal (and ``$CI`` is unset).
        keep_uploads: what the client keeps of the rows it uploads, so that shards lost with an agent are
            rebuilt on another from lineage: ``"host"`` (default) a copy in this process, as many bytes
            as were uploaded, kept while an array made from them lives; ``"replica"`` a copy of each
            uploaded array's shard on another agent (pool memory instead of the client's; made agent to
            agent); ``"none"`` nothing, and a lost uploaded shard (or one computed from it) raises
            :class:`gpupool.ShardsLost`.
        twins: when one shard's program runs far behind its siblings' (a slow or overloaded rig), run
            it on another worker too and take the first result; the slow worker's buffers move to the
            winner's for good (``False``: wait for every shard where it is).
        verify: the fraction of programs (0 to 1) re-run on a second agent from the same inputs (made
            again there from lineage) and compared: exactly for integers, within a per-dtype tolerance
            for floats; a third agent breaks a tie. A wrong result is redone elsewhere before it is
            returned, and reported to the coordinator, which quarantines an agent that keeps being wrong.
            Each check costs the program's run again plus fetching its results (skipped above 32 MiB).

    Raises:
        ConnectError: nothing listens at the address (at once), or no coordinator answered in time.
        AuthError: the coordinator refused the token (missing, unknown, revoked, expired).
    """
    credentials = PoolCredentials.from_env(address, token=token, ca=ca)
    return Pool(
        credentials,
        timeouts=timeouts or Timeouts(),
        client=client,
        progress=progress,
        keep_uploads=keep_uploads,
        twins=twins,
        verify=verify,
    )

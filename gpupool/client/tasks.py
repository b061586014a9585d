"""Independent tasks on the pool's workers: ``pool.submit``, ``pool.map`` and ``pool.replicate``.

Each task is a function traced on the client into a program of the agents' ops
(:mod:`gpupool.client.trace`); a worker runs it whole, reading its data sets locally, and the results
come back inline. The pool's workers take tasks from one queue, one at a time each by default (a GPU runs
one training at a time best), so faster workers take more; a task whose agent is lost or stops answering
runs again on another worker, a bounded number of times, with the lost agent left out. The futures are
:class:`concurrent.futures.Future`\\s: ``result``, ``exception``, ``as_completed`` and ``wait`` work.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final

import cloudpickle
import numpy as np

from gpupool._errors import (
    AgentLost,
    ConnectError,
    DeadlineExceeded,
    DeviceOutOfMemory,
    PlacementError,
    RemoteKernelError,
    UsageError,
)
from gpupool._proto.v1 import agent_pb2, control_pb2
from gpupool.client.graph import GraphArray
from gpupool.client.layout import Piece, Place
from gpupool.client.progress import Tracker
from gpupool.client.session import Session
from gpupool.client.trace import Trace, TracingError, rename, trace
from gpupool.protocol.codec import check_dtype, op_outputs

__all__ = ["DEFAULT_RETRIES", "Replicated", "TaskFuture", "Tasks"]

#: How many times a task runs again after its agent was lost, by default.
DEFAULT_RETRIES: Final = 2
#: Seconds a view of the pool's workers is trusted before it is asked for again.
SLOTS_FRESH: Final = 5.0
#: Tasks whose work (bytes touched, as traced) is at most BATCH_WORK run up to BATCH to a program.
BATCH: Final = 64
BATCH_WORK: Final = 1 << 20
#: Seconds a Python task may run, unless its caller says otherwise (``timeout=``).
PYTHON_TIMEOUT: Final = 600.0
#: Failures that mean the worker, not the task: the task runs again elsewhere.
_LOST: Final = (AgentLost, ConnectError, DeadlineExceeded)


class TaskFuture(concurrent.futures.Future):  # type: ignore[type-arg]
    """The result of one task. ``where`` names the agent and worker that ran it (once it has run)."""

    where: str = ""


class Replicated:
    """A data set with one whole copy on each worker that runs tasks (made as workers first need it), for
    tasks to read locally. Pass it as a task's argument; free it with :meth:`free` (or drop it).

    The client keeps the host array, to copy it to a worker that joins later or to replace a lost copy.
    """

    def __init__(self, session: Session, host: np.ndarray) -> None:
        check_dtype(host.dtype)
        if not host.ndim:
            raise UsageError(
                "pool.replicate takes an array of at least one dimension; pass scalars as they are"
            )
        self._session = session
        self.host = np.ascontiguousarray(host)
        self.shape: tuple[int, ...] = tuple(host.shape)
        self.dtype: np.dtype[Any] = host.dtype
        self._copies: dict[Place, Piece] = {}
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _release, session, self._copies)

    def __repr__(self) -> str:
        return f"Replicated({self.dtype.name}{list(self.shape)} on {len(self._copies)} worker(s))"

    async def copy_on(self, slot: Piece) -> str:
        """The buffer id of the copy on ``slot``'s worker, uploaded first if there is none (loop thread)."""
        with self._lock:
            copy = self._copies.get(slot.place)
        if copy is None:
            copy = replace(slot, start=0, stop=self.shape[0], buffer_id=self._session.new_buffer_id())
            await self._session.upload_pieces(self.host, [copy], lineage=False)  # kept here: self.host
            with self._lock:
                self._copies[slot.place] = copy
        return copy.buffer_id

    def forget(self, agent_id: str) -> None:
        """Drop the copies on a lost agent (made again if it comes back and runs a task)."""
        with self._lock:
            for place in [p for p, piece in self._copies.items() if piece.agent_id == agent_id]:
                del self._copies[place]

    def free(self) -> None:
        """Free every copy now."""
        self._finalizer()


def _release(session: Session, copies: dict[Place, Piece]) -> None:
    if not session.closed:
        session.release(list(copies.values()))
    copies.clear()


@dataclass(eq=False)
class _Task:
    trace: Trace | None  # None for a Python task
    data: tuple[Replicated, ...]
    future: TaskFuture
    retries: int
    label: str
    timeout: float | None = None
    python: bytes = b""  # a Python task's cloudpickle bytes
    attempts: int = 0
    excluded: set[str] = field(default_factory=set)

    @property
    def memory(self) -> int:
        """Bytes the task may take on a worker (unknown for a Python task: 0)."""
        return self.trace.memory_bytes if self.trace is not None else 0

    @property
    def work(self) -> int:
        """Bytes the task touches, as traced (a Python task's are unknown: never batched)."""
        return self.trace.work_bytes if self.trace is not None else BATCH_WORK + 1


class Tasks:
    """The task queue of one session (the pool's ``submit``/``map``/``replicate``).

    Args:
        session: the pool's session.
        per_worker: tasks a worker runs at once.
    """

    def __init__(self, session: Session, *, per_worker: int = 1) -> None:
        self._session = session
        self._per_worker = per_worker
        self._queue: collections.deque[_Task] = collections.deque()
        self._slots: list[Piece] = []
        self._slots_at = 0.0
        self._running: collections.Counter[Place] = collections.Counter()
        self._granted: set[str] = set()
        self._labels: dict[str, str] = {}
        self._futures: weakref.WeakSet[TaskFuture] = weakref.WeakSet()
        self._python_agents: set[str] = set()
        self._free: dict[Place, int] = {}  # each worker's free bytes, as last listed

    def replicate(self, value: Any) -> Replicated:
        """One copy of ``value`` (a host array or a remote array) per worker, for tasks."""
        host = value.get() if isinstance(value, GraphArray) else np.asarray(value)
        return Replicated(self._session, host)

    def submit(
        self,
        fn: Callable[..., Any],
        args: Sequence[Any],
        kwargs: dict[str, Any],
        *,
        retries: int,
        timeout: float | None = None,
    ) -> TaskFuture:
        """Trace ``fn(*args, **kwargs)`` now and queue it.

        Raises:
            TracingError: ``fn`` did what cannot be traced (nothing is queued).
        """
        return self._enqueue([self._task(fn, args, kwargs, retries, timeout)])[0]

    def map(
        self,
        fn: Callable[..., Any],
        iterables: Sequence[Iterable[Any]],
        *,
        retries: int,
        timeout: float | None = None,
    ) -> list[TaskFuture]:
        """Trace ``fn`` over the items (each task's arguments: one item of each iterable) and queue them all.

        Raises:
            TracingError: ``fn`` could not be traced for some item (nothing is queued).
        """
        tasks = [self._task(fn, items, {}, retries, timeout) for items in zip(*iterables, strict=False)]
        futures = self._enqueue(tasks)
        if futures:
            tracker = self._session.track("map", total=len(futures), unit="tasks")
            tracker.__enter__()
            for future in futures:
                future.add_done_callback(functools.partial(_progress, tracker, futures))
        return futures

    def _task(
        self,
        fn: Callable[..., Any],
        args: Sequence[Any],
        kwargs: dict[str, Any],
        retries: int,
        timeout: float | None = None,
    ) -> _Task:
        if not callable(fn):
            raise UsageError(f"a task is a function, not a {type(fn).__name__}")
        data: list[Replicated] = []

        def bound(value: Any) -> tuple[tuple[int, ...], np.dtype[Any]] | None:
            if isinstance(value, Replicated):
                data.append(value)
                return value.shape, value.dtype
            if isinstance(value, GraphArray):
                raise TracingError(
                    "a task reads a sharded remote array: give it as pool.replicate(x), so that each "
                    "worker reads a whole copy locally"
                )
            return None

        name = getattr(fn, "__name__", "task")
        try:
            traced = trace(fn, args, kwargs, bound=bound)
        except TracingError as exc:
            return self._python_task(fn, args, kwargs, retries, timeout, exc)
        return _Task(traced, tuple(data), TaskFuture(), max(0, int(retries)), name, timeout)

    def _python_task(
        self,
        fn: Callable[..., Any],
        args: Sequence[Any],
        kwargs: dict[str, Any],
        retries: int,
        timeout: float | None,
        why: TracingError,
    ) -> _Task:
        """A function that cannot be traced, as a Python task for agents whose owners allow them.

        Raises:
            TracingError: no agent of the pool runs Python tasks (``why``, and that), or an argument is a
                sharded remote array.
        """
        self._fresh_slots()
        if not self._python_agents:
            raise TracingError(
                f"{why} No ready agent of this pool runs Python tasks (its owner's gpupool-agent "
                "--allow-python), so the function cannot run as Python either."
            ) from None

        def host(value: Any) -> Any:
            if isinstance(value, Replicated):
                return value.host
            if isinstance(value, GraphArray):
                raise TracingError("a Python task reads a remote array: give it as pool.replicate(x)")
            return value

        payload = cloudpickle.dumps((fn, [host(a) for a in args], {k: host(v) for k, v in kwargs.items()}))
        name = getattr(fn, "__name__", "task")
        return _Task(None, (), TaskFuture(), max(0, int(retries)), name, timeout, python=payload)

    # -- the queue (its state lives on the session's loop) ----------------------------------------------

    def close(self) -> None:
        """Fail every task not finished yet (the pool is closing): nobody waits on them for ever."""
        for future in list(self._futures):
            _settle(future, error=UsageError("the pool closed before this task finished"))

    def _enqueue(self, tasks: list[_Task]) -> list[TaskFuture]:
        if not tasks:
            return []
        self._session.check_open()
        self._futures.update(task.future for task in tasks)
        self._fresh_slots()
        self._session.spawn(self._add(tasks))
        return [task.future for task in tasks]

    def _fresh_slots(self) -> None:
        """Ask the coordinator for the pool's workers again where the view is older than SLOTS_FRESH."""
        if not self._slots or time.monotonic() - self._slots_at > SLOTS_FRESH:
            self._refresh_slots()

    def _refresh_slots(self) -> None:
        slots = []
        python: set[str] = set()
        free: dict[Place, int] = {}
        for record in self._session.list_agents():
            status = record.status
            used = {w.index: w.memory_used for w in status.workers}
            used.update({w.index: w.memory_used for w in record.telemetry.workers})  # fresher, if any
            if status.state != control_pb2.AGENT_STATE_READY:  # cordoned, draining: no new tasks
                continue
            for worker in status.workers:
                slots.append(
                    Piece(
                        agent_id=status.agent_id,
                        endpoint=status.endpoint,
                        worker=worker.index,
                        start=0,
                        stop=0,
                        buffer_id="",
                    )
                )
                self._labels[status.agent_id] = status.name or status.agent_id[:8]
                free[(status.endpoint, worker.index)] = worker.memory_limit - used.get(worker.index, 0)
                if status.allow_python:
                    python.add(status.agent_id)
        if not slots:
            raise PlacementError("no ready agent takes tasks")
        self._slots, self._slots_at, self._python_agents = slots, time.monotonic(), python
        self._free = free

    async def _add(self, tasks: list[_Task]) -> None:
        self._queue.extend(tasks)
        wanted = {slot.agent_id for slot in self._slots} - self._granted
        if wanted:
            try:
                await self._session.grant(sorted(wanted))
            except Exception as exc:
                self._fail_all(exc)
                return
            self._granted |= wanted
        self._start_workers()

    def _start_workers(self) -> None:
        for slot in self._slots:
            while self._queue and self._running[slot.place] < self._per_worker:
                self._running[slot.place] += 1
                asyncio.get_running_loop().create_task(self._work(slot))
        if self._queue and not any(self._running.values()):
            self._fail_all(PlacementError("every worker that could run these tasks was lost"))

    async def _work(self, slot: Piece) -> None:
        try:
            while self._queue:
                batch = self._take(slot)
                if not batch:
                    return
                if not await self._attempt(batch, slot):
                    return  # this worker is lost: it takes no more tasks
        finally:
            self._running[slot.place] -= 1
            if self._queue and not any(self._running.values()):
                self._fail_all(PlacementError("every worker that could run these tasks was lost"))

    def _take(self, slot: Piece) -> list[_Task]:
        """The next task ``slot`` may run, and after a small one more small ones (up to :data:`BATCH`, their
        work within :data:`BATCH_WORK`): tiny tasks share one program, one round trip."""
        batch: list[_Task] = []
        work = 0
        index = 0
        while index < len(self._queue) and len(batch) < BATCH:
            task = self._queue[index]
            if (
                slot.agent_id in task.excluded
                or (task.python and slot.agent_id not in self._python_agents)
                or not self._fits(task, slot)
            ):
                index += 1
                continue
            small = task.work <= BATCH_WORK
            if batch and (not small or work + task.work > BATCH_WORK):
                break
            del self._queue[index]
            if task.future.done():  # failed by a closing pool meanwhile
                continue
            # a retry is running already; a first attempt starts unless the caller cancelled it
            if task.attempts or task.future.set_running_or_notify_cancel():
                batch.append(task)
                work += task.work
                if not small:
                    break
        return batch

    def _fits(self, task: _Task, slot: Piece) -> bool:
        """Whether ``slot`` may take ``task``: its worker had the memory the task may take, or no worker had
        (then any may try, and the agent decides)."""
        needed = task.memory
        if not needed or self._free.get(slot.place, needed) >= needed:
            return True
        return not any(free >= needed for place, free in self._free.items() if self._live(place))

    def _live(self, place: Place) -> bool:
        return any(slot.place == place for slot in self._slots)

    def _elsewhere(self, task: _Task, slot: Piece) -> bool:
        """Whether another live agent than ``slot``'s may still take ``task``."""
        return any(s.agent_id != slot.agent_id and s.agent_id not in task.excluded for s in self._slots)

    async def _attempt(self, batch: list[_Task], slot: Piece) -> bool:
        """Run ``batch`` on ``slot``; False when the worker was lost (the tasks queued again, or failed).
        A batch that fails for another reason runs again task by task, so that only the failing task fails."""
        try:
            results = await self._run(batch, slot)
        except _LOST as exc:
            self._slots = [s for s in self._slots if s.agent_id != slot.agent_id]
            for task in reversed(batch):
                for data in task.data:
                    data.forget(slot.agent_id)
                if task.attempts < task.retries:
                    task.attempts += 1
                    task.excluded.add(slot.agent_id)
                    self._queue.appendleft(task)
                else:
                    _settle(task.future, error=exc)
            self._start_workers()
            return False
        except Exception as exc:
            if len(batch) > 1:
                for task in batch:
                    if not await self._attempt([task], slot):
                        return False
                return True
            task = batch[0]
            if (
                isinstance(exc, DeviceOutOfMemory)
                and task.attempts < task.retries
                and self._elsewhere(task, slot)
            ):
                # Too big for this worker now: another with more room runs it.
                task.attempts += 1
                task.excluded.add(slot.agent_id)
                self._free[slot.place] = min(self._free.get(slot.place, 0), task.memory - 1)
                self._queue.appendleft(task)
                self._start_workers()
                return True
            _settle(task.future, error=exc)
            return True
        where = f"{self._labels.get(slot.agent_id, slot.agent_id[:8])}/{slot.worker}"
        for task, result in zip(batch, results, strict=True):
            task.future.where = where
            _settle(task.future, result=result)
        return True

    async def _run(self, batch: list[_Task], slot: Piece) -> list[Any]:
        """One program of every task of ``batch`` (each with buffer names of its own); their results."""
        if batch[0].python:
            return [await self._run_python(batch[0], slot)]
        session = self._session
        ops: list[agent_pb2.Op] = []
        fetch: list[str] = []
        namers = []
        traces = [task.trace for task in batch if task.trace is not None]
        for task, traced in zip(batch, traces, strict=True):
            prefix = session.new_buffer_id()
            pairs = zip(traced.inputs, task.data, strict=True)
            inputs = {name: await data.copy_on(slot) for name, data in pairs}
            namer = functools.partial(_name, inputs, prefix)
            namers.append(namer)
            ops += rename(traced.ops, namer)
            fetch += [namer(name) for name in traced.fetch]
        created = [name for op in ops for name in op_outputs(op)]
        work_bytes = sum(traced.work_bytes for traced in traces)
        work_flops = sum(traced.work_flops for traced in traces)
        timeout = session.timeouts.for_work(work_bytes, work_flops)
        if len(batch) == 1 and batch[0].timeout is not None:
            timeout = batch[0].timeout
        fetched = await session.channel(slot.agent_id, slot.endpoint).execute(
            slot.worker,
            ops,
            session=session.id,
            fetch=fetch,
            free=created,
            timeout=timeout,
        )
        return [
            _rebuild(traced.results, functools.partial(_fetched, fetched, namer))
            for traced, namer in zip(traces, namers, strict=True)
        ]

    async def _run_python(self, task: _Task, slot: Piece) -> Any:
        """A Python task on ``slot``'s worker: its result, or what it raised, as a RemoteKernelError."""
        payload = await self._session.channel(slot.agent_id, slot.endpoint).run_python(
            slot.worker, task.python, session=self._session.id, timeout=task.timeout or PYTHON_TIMEOUT
        )
        outcome = cloudpickle.loads(payload)
        if outcome[0] == "ok":
            return outcome[1]
        _, kind, message, where = outcome
        raise RemoteKernelError(slot.agent_id, f"the Python task raised {kind}: {message}\n{where}")

    def _fail_all(self, exc: BaseException) -> None:
        while self._queue:
            task = self._queue.popleft()
            if task.future.done():
                continue
            if task.attempts or task.future.set_running_or_notify_cancel():
                _settle(task.future, error=exc)


def _settle(future: TaskFuture, *, result: Any = None, error: BaseException | None = None) -> None:
    """Complete ``future`` unless it is complete already (a pool closing races the task finishing)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


def _name(inputs: dict[str, str], prefix: str, name: str) -> str:
    """A task's buffer name in one run: its data set's copy, or the name under the run's prefix."""
    return inputs.get(name) or f"{prefix}.{name}"


def _fetched(fetched: dict[str, np.ndarray], namer: Callable[[str], str], name: str) -> np.ndarray:
    return fetched[namer(name)]


def _rebuild(shape: Any, value: Callable[[str], np.ndarray]) -> Any:
    kind, content = shape
    if kind == "fetch":
        array = value(content)
        return array[()] if array.ndim == 0 else array
    if kind == "value":
        return content
    if kind == "dict":
        return {k: _rebuild(v, value) for k, v in content.items()}
    items = [_rebuild(v, value) for v in content]
    return tuple(items) if kind == "tuple" else items


def _progress(tracker: Tracker, futures: list[TaskFuture], _done: object) -> None:
    tracker.advance()
    if tracker.done >= len(futures):
        tracker.__exit__(None, None, None)

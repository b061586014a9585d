"""Choosing the backend and making the workers: one per usable GPU, or one NumPy worker for the host.

``auto`` takes CuPy where NVML finds GPUs, CuPy imports and a trivial CUDA op succeeds on a device;
anything short of that gives one NumPy worker and a note saying why (in the status, and on stderr at
start-up). ``cupy`` insists on CUDA; ``numpy`` never touches it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import numpy as np

from gpupool._config import parse_memory_limit
from gpupool._errors import UsageError
from gpupool._proto.v1 import control_pb2
from gpupool.agent.backend import ArrayBackend, NumpyBackend
from gpupool.agent.config import BackendChoice
from gpupool.agent.discovery import Nvml, NvmlGpu, NvmlUnavailable
from gpupool.agent.measure import Measured
from gpupool.agent.turns import TurnGate
from gpupool.protocol.errors import RpcRefusal

__all__ = ["WORKER_THREADS", "Worker", "WorkerSetup", "host_memory", "plan_workers"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Threads per worker: programs of this many sessions are in flight at once (their ops still take turns);
#: more wait for a thread. Idle threads cost nothing, and each is bound to the worker's device.
WORKER_THREADS: Final = 8


class Worker:
    """One execution unit: a backend bound to a device, and the threads that compute on it.

    Programs of different sessions are in flight at once, each in a thread of its own (every thread is
    bound to the device, as CuPy keeps one current device per thread), but their ops take turns
    (:meth:`turn`), one at a time and round-robin across sessions; a session's own programs run one
    after another, in arrival order (:meth:`lane`). The event loop stays free while they run.

    Args:
        index: the worker number shards name (the CUDA device index for CuPy).
        backend: the worker's compute.
        memory_limit: bytes of buffers it may hold.
        gpu: NVML's description of its GPU, None for a NumPy worker.
        nvml_index: the GPU's NVML index, for telemetry (None without one).
        thread_name: the name prefix of its threads.
        threads: how many threads it computes with, at most (programs in flight at once).
    """

    def __init__(
        self,
        *,
        index: int,
        backend: ArrayBackend,
        memory_limit: int,
        gpu: control_pb2.GpuInfo | None = None,
        nvml_index: int | None = None,
        thread_name: str = "gpupool.worker",
        threads: int = WORKER_THREADS,
    ) -> None:
        self.index = index
        self.backend = backend
        self.memory_limit = memory_limit
        self.gpu = gpu
        self.nvml_index = nvml_index
        self._executor = ThreadPoolExecutor(
            threads, thread_name_prefix=thread_name, initializer=backend.bind_thread
        )
        self._gate = TurnGate()
        self._lanes: dict[str, _Lane] = {}
        self._count_lock = threading.Lock()
        self._in_flight = 0  # calls submitted and not yet finished in their thread
        #: Its speed, once measured (:func:`gpupool.agent.measure.measure`, at the agent's start).
        self.measured = Measured()

    def idle_for_inline(self, small: bool) -> bool:
        """Whether a ``small`` program (a few microseconds of work) may run right on the event loop: a NumPy
        worker with nothing in flight and no turn taken, so two thread hops would cost more than the work
        and order is kept."""
        if not small or self.backend.name != "numpy":
            return False
        with self._count_lock:
            busy = self._in_flight
        return busy == 0 and self._gate.idle()

    async def call(self, function: Callable[..., T], *args: Any) -> T:
        """Run ``function(*args)`` in one of the worker's threads and wait for it.

        A caller that stops waiting (cancelled) does not stop a function already running; the worker
        counts it as in flight until it returns.
        """
        future = self.submit(function, *args)  # counted out (its callback) before asyncio's wakes the caller
        return await asyncio.wrap_future(future)

    def submit(self, function: Callable[..., T], *args: Any) -> Future[T]:
        """Run ``function(*args)`` in one of the worker's threads (from any thread), counted as in flight."""
        with self._count_lock:
            self._in_flight += 1
        try:
            future = self._executor.submit(function, *args)
        except BaseException:
            self._finished(None)
            raise
        future.add_done_callback(self._finished)
        return future

    def _finished(self, _future: object) -> None:
        with self._count_lock:
            self._in_flight -= 1

    @property
    def down(self) -> str:
        """Why the worker is down for good: never, for one in the agent's own process ("")."""
        return ""

    @property
    def host_resident(self) -> bool:
        """Whether its arrays are host memory of this process (a NumPy worker in the agent's own process)."""
        return self.backend.host_resident

    async def allocate(self, dtype: np.dtype[Any], shape: tuple[int, ...], buffer_id: str) -> Any:
        """A new device array, for an upload or a pull to fill."""
        return await self.call(_allocate_on_device, self, dtype, shape, buffer_id)

    @contextlib.asynccontextmanager
    async def staging(self, nbytes: int) -> AsyncIterator[tuple[np.ndarray, np.ndarray]]:
        """Two staging blocks of ``nbytes`` for an upload to the device."""
        yield await self.call(_staging_buffers, self, nbytes)

    async def copy_in(self, array: Any, offset: int, block: np.ndarray, buffer_id: str) -> None:
        """One staging block into the device array's bytes from ``offset``."""
        await self.call(_copy_in, self, array, offset, block, buffer_id)

    async def to_host(self, array: Any, buffer_id: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """A host copy of a device array (or of its rows ``[start, stop)``)."""
        return await self.call(_to_host, self, array, buffer_id, rows)

    async def to_device(self, host: np.ndarray, buffer_id: str) -> Any:
        """A device array holding ``host``'s values."""
        return await self.call(_to_device, self, host, buffer_id)

    @contextlib.contextmanager
    def turn(self, session: str) -> Iterator[None]:
        """In a worker thread: hold the device for one op (or fused run) of ``session``.

        On a backend that computes asynchronously the turn ends only once the device has finished its
        work, so the next turn's op does not queue behind this one's.
        """
        self._gate.acquire(session)
        try:
            yield
            if not self.backend.host_resident:
                self.backend.synchronize()
        finally:
            self._gate.release()

    @contextlib.asynccontextmanager
    async def lane(self, session: str) -> AsyncIterator[None]:
        """On the event loop: wait until ``session`` has no other program in flight here, and hold that."""
        lane = self._lanes.get(session)
        if lane is None:
            self._lanes[session] = lane = _Lane()
        lane.users += 1
        try:
            async with lane.lock:
                yield
        finally:
            lane.users -= 1
            if lane.users == 0:
                del self._lanes[session]

    def shutdown(self) -> None:
        """Stop the worker's threads once their queued work is done (not waiting for it)."""
        self._executor.shutdown(wait=False, cancel_futures=True)


class _Lane:
    """A session's turn to have a program in flight on one worker, and how many callers want it."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


@dataclass(frozen=True, slots=True)
class WorkerSetup:
    """The workers an agent serves with.

    Attributes:
        backend: ``"cupy"`` or ``"numpy"``.
        workers: by index.
        note: why this backend, for operators ("" when every GPU serves through CuPy).
        nvml: the NVML session telemetry reads from, None when no worker has a GPU.
    """

    backend: str
    workers: tuple[Worker, ...]
    note: str
    nvml: Nvml | None

    def close(self) -> None:
        """Stop the workers' threads and close NVML."""
        for worker in self.workers:
            worker.shutdown()
        if self.nvml is not None:
            self.nvml.close()


def _allocate_on_device(worker: Worker, dtype: np.dtype[Any], shape: tuple[int, ...], buffer_id: str) -> Any:
    with _device_errors(worker, buffer_id):
        return worker.backend.empty(shape, dtype)


def _staging_buffers(worker: Worker, nbytes: int) -> tuple[np.ndarray, np.ndarray]:
    with _device_errors(worker, ""):
        return worker.backend.staging_buffer(nbytes), worker.backend.staging_buffer(nbytes)


def _copy_in(worker: Worker, array: Any, offset: int, block: np.ndarray, buffer_id: str) -> None:
    with _device_errors(worker, buffer_id):
        worker.backend.copy_in(array, offset, block)


def _to_host(worker: Worker, array: Any, buffer_id: str, rows: tuple[int, int] | None) -> np.ndarray:
    with _device_errors(worker, buffer_id, what=f"no host memory for buffer {buffer_id}"):
        if rows is not None:
            array = array[rows[0] : rows[1]]
        return worker.backend.to_host(array)


def _to_device(worker: Worker, host: np.ndarray, buffer_id: str) -> Any:
    with _device_errors(worker, buffer_id):
        return worker.backend.to_device(host)


@contextlib.contextmanager
def _device_errors(worker: Worker, buffer_id: str, *, what: str = "") -> Iterator[None]:
    """In the worker's thread: device out-of-memory and kernel errors as refusals."""
    try:
        yield
    except worker.backend.out_of_memory_errors as exc:
        message = f"{what}: {exc}" if what else f"worker {worker.index}: the device ran out of memory: {exc}"
        raise RpcRefusal("out-of-memory", message, buffer_id=buffer_id) from exc
    except worker.backend.kernel_errors as exc:
        raise RpcRefusal("kernel-failed", f"worker {worker.index}: {exc}", buffer_id=buffer_id) from exc


def host_memory() -> int:
    """Bytes of RAM in this host.

    Raises:
        UsageError: the OS does not say (give ``--memory-limit`` in bytes then).
    """
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError) as exc:
        raise UsageError("cannot tell this host's RAM; give --memory-limit as a size, e.g. 8GiB") from exc


def plan_workers(
    choice: BackendChoice,
    memory_limit: str,
    *,
    thread_label: str = "gpupool",
    nvml_module: Any | None = None,
) -> WorkerSetup:
    """Discover GPUs, choose the backend, and make the workers.

    Args:
        choice: ``auto``, ``cupy`` or ``numpy``.
        memory_limit: per worker, a percentage or a size (see :func:`gpupool._config.parse_memory_limit`).
        thread_label: prefix of the workers' thread names, e.g. ``gpupool[<agent-id>]``.
        nvml_module: a stand-in for ``pynvml`` (tests).

    Raises:
        UsageError: ``cupy`` asked for where CUDA is not usable, or an unreadable memory limit.
    """
    nvml: Nvml | None = None
    gpus: list[NvmlGpu] = []
    reason = ""
    try:
        nvml = Nvml.open(nvml_module)
        gpus = nvml.gpus()
        reason = "" if gpus else "NVML sees no GPU"
    except NvmlUnavailable as exc:
        reason = exc.reason
    if choice == "numpy":
        idle = f"; {len(gpus)} GPU(s) left idle" if gpus else ""
        return _numpy_setup(
            memory_limit, thread_label, f"NumPy backend chosen with --backend numpy{idle}", nvml
        )
    if choice == "auto" and not gpus:
        note = f"no GPU found through NVML ({reason}): serving one NumPy worker"
        return _numpy_setup(memory_limit, thread_label, note, nvml)
    from gpupool.agent import _cupy

    try:
        devices = _cupy.probe_cuda()
    except _cupy.CudaUnavailable as exc:
        if choice == "cupy":
            if nvml is not None:
                nvml.close()
            raise UsageError(f"--backend cupy, but CUDA is not usable here: {exc.reason}") from exc
        note = (
            f"{len(gpus)} GPU(s) found through NVML, but CUDA is not usable ({exc.reason}): "
            "serving one NumPy worker"
        )
        return _numpy_setup(memory_limit, thread_label, note, nvml)
    by_bus = {gpu.bus_id: gpu for gpu in gpus if gpu.bus_id}
    workers = []
    for device in devices:
        match = by_bus.get(device.bus_id)
        if match is None and not by_bus and len(gpus) == len(devices):
            match = gpus[device.index]  # NVML gave no bus ids; CUDA's order is the best guess
        if match is not None:
            gpu = control_pb2.GpuInfo()
            gpu.CopyFrom(match.info)
        else:
            gpu = control_pb2.GpuInfo(
                index=device.index,
                model=device.model,
                memory_total=device.memory_total,
                compute_capability=device.compute_capability,
            )
        total = gpu.memory_total or device.memory_total
        workers.append(
            Worker(
                index=device.index,
                backend=_cupy.CupyBackend(device.index),
                memory_limit=_limit(memory_limit, total, f"GPU {device.index}"),
                gpu=gpu,
                nvml_index=match.index if match is not None else None,
                thread_name=f"{thread_label}.worker{device.index}",
            )
        )
    note = ""
    if gpus and len(devices) < len(gpus):
        note = f"{len(devices)} of the {len(gpus)} GPU(s) NVML sees are usable through CUDA"
    elif not gpus:
        note = f"NVML is not usable ({reason}); GPU details come from CUDA"
    if not gpus:
        _closed(nvml)
        nvml = None
    return WorkerSetup("cupy", tuple(workers), note, nvml)


def _closed(nvml: Nvml | None) -> None:
    if nvml is not None:
        nvml.close()


def _limit(text: str, total: int, what: str) -> int:
    limit = parse_memory_limit(text, total)
    if limit <= 0:
        raise UsageError(f"memory limit {text!r} of {what} ({total} bytes) leaves nothing to use")
    return limit


def _numpy_setup(memory_limit: str, thread_label: str, note: str, nvml: Nvml | None) -> WorkerSetup:
    _closed(nvml)
    worker = Worker(
        index=0,
        backend=NumpyBackend(0),
        memory_limit=_limit(memory_limit, host_memory(), "host RAM"),
        thread_name=f"{thread_label}.worker0",
    )
    return WorkerSetup("numpy", (worker,), note, None)

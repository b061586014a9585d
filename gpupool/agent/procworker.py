"""A worker in a process of its own, as the agent sees it: spawned, supervised, restarted.

The agent keeps the books (:class:`~gpupool.agent.buffers.BufferRegistry`: ids, sessions, memory, what
exists) and the worker process keeps the arrays (:mod:`gpupool.agent.workerproc`). A resident buffer's
``array`` here is a :class:`RemoteArray`, a handle naming the array in the process; dropping the last
reference to it frees the array there. Bytes cross through a ring of shared staging blocks, each
copy overlapping the network as the in-process device path does.

When the process dies (a kernel's fault, a library's segfault, the kernel's OOM killer) or is killed
because a program hung past its deadline, every call waiting on it fails with a message naming the cause,
every buffer it held is marked lost in the registry (later reads say so, rather than "not found"), and a
fresh process starts after a short jittered wait. A worker that keeps dying (:data:`MAX_DEATHS` in
:data:`DEATH_WINDOW` seconds) stays down and refuses work, saying why.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import mmap
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Final

import numpy as np

from gpupool._proto.v1 import agent_pb2
from gpupool.agent.buffers import BufferRegistry, Reservation
from gpupool.agent.compound import COMPOUND, buffer_reads, scratch_bytes
from gpupool.agent.measure import Measured, slowdown
from gpupool.agent.program import ProgramCancelled, check_op, check_request, is_small
from gpupool.agent.workerproc import FAULT_OP, WorkerSpec
from gpupool.agent.workers import Worker
from gpupool.protocol.codec import op_outputs
from gpupool.protocol.errors import RpcRefusal

__all__ = [
    "BLOCK_BYTES",
    "DEATH_WINDOW",
    "MAX_DEATHS",
    "RING_BLOCKS",
    "AnyWorker",
    "ProcessWorker",
    "RemoteArray",
    "RowStream",
    "WorkerDied",
]

log = logging.getLogger(__name__)

#: Staging blocks shared with each worker process, and their size: uploads, downloads and pulls in flight
#: at once take two each; more wait for a block (within their own deadline).
RING_BLOCKS: Final = 8
BLOCK_BYTES: Final = 8 << 20
#: A worker process that dies this often within this many seconds is left down.
MAX_DEATHS: Final = 5
DEATH_WINDOW: Final = 60.0
#: Seconds a new worker process has to say it is ready (imports, a CUDA context).
START_TIMEOUT: Final = 120.0
#: A NumPy worker's arrays of this many bytes or more live in memory files the agent maps too, so that
#: uploads, downloads and moves read and write them in place (smaller ones cross through the ring).
SHARE_MIN_BYTES: Final = 1 << 20
#: Seconds a dropped handle's array waits to be freed with the next message before it is sent on its own.
FREE_DELAY: Final = 0.005
#: Seconds a program past its deadline has to stop by itself once cancelled, before its process is killed.
HANG_GRACE: Final = 2.0


#: What a worker process runs (``python -c``): the entry point only, not the agent's main module.
WORKER_COMMAND: Final = "from gpupool.agent.workerproc import entry; entry()"


class WorkerDied(Exception):
    """The worker process ended while a call waited on it; the message says how."""


class RemoteBackend:
    """What the agent's code asks of a process worker's backend: its name, and that it is not the host."""

    host_resident: Final = False

    def __init__(self, name: str) -> None:
        self.name = name


class RemoteArray:
    """A resident array in a worker process: its dtype and shape here, the array there (by ``key``)."""

    __slots__ = ("__weakref__", "dtype", "generation", "host", "key", "nbytes", "shape")

    def __init__(self, key: str, dtype: np.dtype[Any], shape: tuple[int, ...], generation: int) -> None:
        self.key = key
        self.dtype = dtype
        self.shape = shape
        self.nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        self.generation = generation
        #: The array's memory mapped here too (a NumPy worker's arrays of :data:`SHARE_MIN_BYTES` or more,
        #: once made or first read): the agent's network code fills and reads it in place.
        self.host: np.ndarray | None = None


@dataclass(frozen=True, slots=True)
class RowStream:
    """Rows of an array in a worker process, to be sent as they come through the staging blocks.

    Attributes:
        dtype, shape, nbytes: what is sent.
        chunks: the bytes on the event loop (each chunk valid until the next is asked for).
        chunks_sync: the bytes in a thread, each block within ``timeout`` seconds.
    """

    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    nbytes: int
    chunks: Callable[[], AsyncIterator[memoryview]]
    chunks_sync: Callable[[float], Iterator[memoryview]]


class _Ring:
    """Staging blocks in a memory file both processes map; handed out one at a time, returned after use."""

    def __init__(self, blocks: int, block_bytes: int) -> None:
        self.blocks = blocks
        self.block_bytes = block_bytes
        self._fd = os.memfd_create("gpupool-staging")
        os.ftruncate(self._fd, blocks * block_bytes)
        self._map = mmap.mmap(self._fd, blocks * block_bytes)
        self.array = np.frombuffer(self._map, np.uint8)
        self.array[:] = 0  # touched once here, so no transfer pays for the pages
        self.path = f"/proc/{os.getpid()}/fd/{self._fd}"
        self._free = list(range(blocks))
        self._ready = threading.Condition()

    def view(self, block: int, length: int) -> np.ndarray:
        start = block * self.block_bytes
        return self.array[start : start + length]

    def take(self, timeout: float) -> int:
        """A free block, waiting up to ``timeout`` seconds.

        Raises:
            TimeoutError: none came free in time.
        """
        with self._ready:
            if not self._ready.wait_for(lambda: bool(self._free), timeout):
                raise TimeoutError(f"no staging block came free within {timeout:g} s")
            return self._free.pop()

    async def take_async(self, wait: float) -> int:
        """:meth:`take` on the event loop (waiting in a thread only when no block is free)."""
        with self._ready:
            if self._free:
                return self._free.pop()
        return await asyncio.to_thread(self.take, wait)

    def give(self, block: int) -> None:
        with self._ready:
            self._free.append(block)
            self._ready.notify()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


@dataclass(frozen=True, slots=True)
class _Pending:
    """A call sent: its id and process (to cancel it there), and the future its answer resolves."""

    call: int
    generation: int
    future: Any  # asyncio.Future on the loop, concurrent.futures.Future from a thread


class _Child:
    """One worker process and its pipe; calls in flight by id."""

    def __init__(self, process: subprocess.Popen[bytes], conn: Connection, generation: int) -> None:
        self.process = process
        self.conn = conn
        self.generation = generation
        self.pending: dict[int, Any] = {}  # asyncio or concurrent futures, by call id
        self.alive = True
        self.deliberate = ""  # why the agent killed it, if it did


class ProcessWorker:
    """One worker, served by a process of its own; what the agent's servicers call instead of a
    :class:`~gpupool.agent.workers.Worker`'s threads.

    Args:
        planned: the worker as planned (its index, backend, memory limit, GPU); its threads go unused but
            for the per-session lanes.
        on_lost: called (from any thread) with the worker index and a reason when the process ends: the
            registry's buffers on it are lost.
        allow_kernels, fuse_kernels: the agent's options, for programs.
        faults: honour the fault-injection op (tests only: ``GPUPOOL_FAULT_INJECTION=1``).
    """

    host_resident: Final = False

    def __init__(
        self,
        planned: Worker,
        *,
        on_lost: Callable[[int, str], None],
        allow_kernels: bool = False,
        fuse_kernels: bool = False,
        faults: bool = False,
    ) -> None:
        self.index = planned.index
        self.memory_limit = planned.memory_limit
        self.gpu = planned.gpu
        self.nvml_index = planned.nvml_index
        self.backend = RemoteBackend(planned.backend.name)
        self.lane = planned.lane
        self._planned = planned
        self._on_lost = on_lost
        self._options = (allow_kernels, fuse_kernels, faults)
        self._ring = _Ring(RING_BLOCKS, BLOCK_BYTES)
        self._lock = threading.Lock()
        self._calls = itertools.count(1)
        self._keys = itertools.count(1)
        self._generation = 0
        self._child: _Child | None = None
        self._deaths: list[float] = []
        self._frees: list[str] = []  # keys of dropped handles not yet sent to the process
        self._down = ""  # why the worker stays down, once it has died too often
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        #: The process's own figures (measured as it starts; again by each new process).
        self.measured = Measured()

    # lifecycle

    async def start(self) -> None:
        """Spawn the process and wait until it is ready.

        Raises:
            RuntimeError: it did not start (its error is logged by the process itself).
        """
        self._loop = asyncio.get_running_loop()
        self._listen(await asyncio.to_thread(self._spawn))

    def _spawn(self) -> _Child:
        allow_kernels, fuse_kernels, faults = self._options
        spec = WorkerSpec(
            index=self.index,
            backend=self.backend.name,
            ring_path=self._ring.path,
            ring_blocks=self._ring.blocks,
            block_bytes=self._ring.block_bytes,
            allow_kernels=allow_kernels,
            fuse_kernels=fuse_kernels,
            faults=faults,
            log_level=logging.getLogger("gpupool").getEffectiveLevel(),
            thread_name=f"gpupool.worker{self.index}",
            slowdown=slowdown(),
        )
        mine, theirs = socket.socketpair()
        try:
            process = subprocess.Popen(
                [sys.executable, "-c", WORKER_COMMAND, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        conn = Connection(mine.detach())
        try:
            conn.send(spec)
            if not conn.poll(START_TIMEOUT):
                raise TimeoutError(f"worker {self.index}'s process did not start within {START_TIMEOUT:g} s")
            _, _, hello = conn.recv()
        except (EOFError, OSError, TimeoutError) as exc:
            process.kill()
            _reap(process)
            conn.close()
            raise RuntimeError(
                f"worker {self.index}'s process ended while starting ({_exit_of(process)}): {exc}"
            ) from exc
        with self._lock:
            self._generation += 1
            child = _Child(process, conn, self._generation)
            self._child = child
        self.measured = Measured(*hello["measured"])
        log.info("worker %d: process %d serves it (%s)", self.index, hello["pid"], hello["backend"])
        return child

    def shutdown(self) -> None:
        """End the worker process (not waiting for its calls) and the planned worker's threads."""
        self._closed = True
        with self._lock:
            child = self._child
        if child is not None:
            if self._loop is not None and not self._loop.is_closed():
                with contextlib.suppress(OSError, ValueError, RuntimeError):
                    self._loop.remove_reader(child.conn.fileno())
            with contextlib.suppress(OSError, ValueError):
                child.conn.send((0, "stop", (), []))
            try:
                child.process.wait(2)
            except subprocess.TimeoutExpired:
                child.process.kill()
                _reap(child.process)
        self._planned.shutdown()
        self._ring.close()

    @property
    def down(self) -> str:
        """Why the worker is down for good (its process kept dying); "" while it serves or restarts."""
        return self._down

    def kill(self, why: str) -> None:
        """End the process now (it hung): its calls fail and its buffers are lost, ``why`` the reason."""
        with self._lock:
            child = self._child
        if child is not None and child.alive:
            child.deliberate = why
            with contextlib.suppress(OSError):
                child.process.kill()

    # the pipe

    def _on_readable(self, child: _Child) -> None:
        """On the event loop, whenever the pipe has data: every answer waiting, each to its caller."""
        conn = child.conn
        try:
            while conn.poll():
                call, ok, value = conn.recv()
                with self._lock:
                    future = child.pending.pop(call, None)
                if future is None or future.done():
                    continue
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(_error_of(value))
        except (EOFError, OSError):
            with contextlib.suppress(ValueError, OSError, RuntimeError):
                self._require_loop().remove_reader(conn.fileno())
            name = f"gpupool.worker{self.index}.reap"
            threading.Thread(target=self._died, args=(child,), name=name).start()

    def _require_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("the worker process was not started on an event loop")
        return self._loop

    def _listen(self, child: _Child) -> None:
        self._require_loop().add_reader(child.conn.fileno(), self._on_readable, child)

    def _died(self, child: _Child) -> None:
        """In a thread of its own, once the pipe closed: fail the calls, lose the buffers, restart."""
        _reap(child.process)
        cause = child.deliberate or f"its process ended ({_exit_of(child.process)})"
        reason = f"worker {self.index}: {cause}"
        with self._lock:
            child.alive = False
            pending = list(child.pending.values())
            child.pending.clear()
            if self._child is child:
                self._child = None
                self._frees.clear()
        with contextlib.suppress(OSError):
            child.conn.close()
        loop = self._loop
        for future in pending:
            if isinstance(future, Future):
                if not future.done():
                    future.set_exception(WorkerDied(reason))
            elif loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(_fail, future, WorkerDied(reason))
        if self._closed:
            return
        log.error("%s; its buffers are lost and a fresh process starts", reason)
        self._on_lost(self.index, reason)
        now = time.monotonic()
        self._deaths = [t for t in self._deaths if now - t < DEATH_WINDOW] + [now]
        if len(self._deaths) >= MAX_DEATHS:
            self._down = f"{reason}; it died {len(self._deaths)} times in {DEATH_WINDOW:g} s and stays down"
            log.error("%s", self._down)
            self._on_lost(self.index, self._down)  # the status shows it: no memory to place on
            return
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(lambda: loop.create_task(self._restart()))

    async def _restart(self) -> None:
        for attempt in range(5):
            await asyncio.sleep(random.uniform(0.1, 0.5) * (2**attempt))
            if self._closed:
                return
            try:
                child = await asyncio.to_thread(self._spawn)
            except (RuntimeError, OSError) as exc:
                log.error("worker %d: restarting its process failed: %s", self.index, exc)
                continue
            self._listen(child)
            return
        self._down = f"worker {self.index}: its process could not be restarted"
        self._on_lost(self.index, self._down)

    def _send(self, name: str, args: Any, *, on_loop: bool = True) -> _Pending:
        """Send a call; its answer resolves an asyncio future (``on_loop``, from the loop's thread) or a
        concurrent one (from any thread).

        Raises:
            RpcRefusal: ``not-accepting`` while the process is down or restarting.
        """
        future: Any = asyncio.get_running_loop().create_future() if on_loop else Future()
        with self._lock:
            child = self._child
            if child is None or not child.alive:
                why = self._down or f"worker {self.index}'s process is restarting; try again shortly"
                raise RpcRefusal("not-accepting", why)
            call = next(self._calls)
            child.pending[call] = future
            frees, self._frees = self._frees, []
            try:
                child.conn.send((call, name, args, frees))
            except (OSError, ValueError) as exc:
                child.pending.pop(call, None)
                raise RpcRefusal("not-accepting", f"worker {self.index}'s process is gone: {exc}") from exc
        return _Pending(call, child.generation, future)

    def _free_later(self, key: str, generation: int) -> None:
        """A handle was dropped (any thread): free its array there with the next message, or within
        :data:`FREE_DELAY` seconds (one message fewer per program that frees what it made)."""
        with self._lock:
            if self._child is None or self._child.generation != generation:
                return  # that process (and the array) is gone
            self._frees.append(key)
            first = len(self._frees) == 1
        loop = self._loop
        if first and loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(loop.call_later, FREE_DELAY, self._flush_frees)

    def _flush_frees(self) -> None:
        with self._lock:
            child = self._child
            if not self._frees or child is None or not child.alive:
                return
            frees, self._frees = self._frees, []
            with contextlib.suppress(OSError, ValueError):
                child.conn.send((0, "free", frees, []))

    def _post(self, name: str, args: Any, generation: int) -> None:
        """A message with no answer (free, cancel), only to the process of ``generation``."""
        with self._lock:
            child = self._child
            if child is None or not child.alive or child.generation != generation:
                return
            with contextlib.suppress(OSError, ValueError):
                child.conn.send((0, name, args, []))

    async def _call(self, name: str, *args: Any) -> Any:
        try:
            return await self._send(name, args).future
        except WorkerDied as exc:
            raise RpcRefusal("not-accepting", f"{exc} during this call; its buffers are lost") from None

    # buffers

    def _handle(self, dtype: np.dtype[Any], shape: tuple[int, ...], generation: int) -> RemoteArray:
        key = f"k{next(self._keys)}"
        handle = RemoteArray(key, dtype, shape, generation)
        weakref.finalize(handle, self._free_later, key, generation)
        return handle

    def _generation_now(self) -> int:
        with self._lock:
            return self._generation

    async def allocate(self, dtype: np.dtype[Any], shape: tuple[int, ...], buffer_id: str) -> RemoteArray:
        """A new array in the process, for an upload or a pull to fill (in place, through
        :attr:`RemoteArray.host`, where the process shares it)."""
        handle = self._handle(dtype, shape, self._generation_now())
        shared = self._shares(handle)
        fd = await self._call("allocate", handle.key, dtype.str, shape, buffer_id, shared)
        if fd is not None:
            handle.host = self._map(fd, handle, buffer_id)
        return handle

    def _shares(self, handle: RemoteArray) -> bool:
        return self.shares(handle.nbytes)

    def shares(self, nbytes: int) -> bool:
        """Whether an array of ``nbytes`` is shared with the agent (:attr:`RemoteArray.host`)."""
        return self.backend.name == "numpy" and nbytes >= SHARE_MIN_BYTES

    def _map(self, fd: int, handle: RemoteArray, buffer_id: str) -> np.ndarray:
        """The process's memory file ``fd`` mapped here, as the handle's array."""
        child = self._child
        if child is None or child.generation != handle.generation:
            raise RpcRefusal(
                "buffer-not-found", f"buffer {buffer_id} was lost with worker {self.index}'s process"
            )
        try:
            descriptor = os.open(f"/proc/{child.process.pid}/fd/{fd}", os.O_RDWR)
            try:
                # Populated in one go: the pages are there (a reused file) or made here at once, not
                # faulted in one by one as the network code fills them.
                flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
                memory = mmap.mmap(descriptor, max(handle.nbytes, 1), flags=flags)
            finally:
                os.close(descriptor)
        except OSError as exc:
            raise RpcRefusal(
                "not-accepting", f"worker {self.index}: cannot map buffer {buffer_id}'s memory: {exc}"
            ) from exc
        count = handle.nbytes // handle.dtype.itemsize
        return np.frombuffer(memory, handle.dtype, count=count).reshape(handle.shape)

    async def host_view(self, array: RemoteArray, buffer_id: str) -> np.ndarray | None:
        """The array's memory, mapped here (moved into a shared file first if a program made it); None where
        the process does not share it (a CuPy worker, a small array)."""
        if array.host is not None or not self._shares(array):
            return array.host
        self._check_generation(array, buffer_id)
        fd = await self._call("share", array.key, buffer_id)
        if array.host is None:
            array.host = self._map(fd, array, buffer_id)
        return array.host

    @contextlib.asynccontextmanager
    async def staging(
        self, nbytes: int, *, wait: float = 30.0
    ) -> AsyncIterator[tuple[np.ndarray, np.ndarray]]:
        """Two staging blocks of ``nbytes`` (at most :data:`BLOCK_BYTES`), returned to the ring afterwards."""
        taken: list[int] = []
        try:
            for _ in range(2):
                taken.append(await self._ring.take_async(wait))
            yield self._ring.view(taken[0], nbytes), self._ring.view(taken[1], nbytes)
        finally:
            for block in taken:
                self._ring.give(block)

    def _block_of(self, view: np.ndarray) -> int:
        offset = view.ctypes.data - self._ring.array.ctypes.data
        return offset // self._ring.block_bytes

    async def copy_in(self, array: RemoteArray, offset: int, block: np.ndarray, buffer_id: str) -> None:
        """One staging block into the array's bytes from ``offset``."""
        self._check_generation(array, buffer_id)
        await self._call("copy_in", array.key, offset, self._block_of(block), block.nbytes, buffer_id)

    def _check_generation(self, array: RemoteArray, buffer_id: str) -> None:
        if array.generation != self._generation_now():
            raise RpcRefusal(
                "buffer-not-found",
                f"buffer {buffer_id} was lost with worker {self.index}'s process",
                buffer_id=buffer_id,
            )

    async def read_chunks(
        self,
        array: RemoteArray,
        buffer_id: str,
        rows: tuple[int, int] | None = None,
        *,
        wait: float = 30.0,
    ) -> AsyncIterator[memoryview]:
        """The array's bytes (rows ``[start, stop)`` of it), a staging block at a time; each chunk is valid
        until the next is asked for. The process fills one block while the caller sends the other."""
        spans = self._spans(array, buffer_id, rows)
        if not spans:
            return
        blocks = [await self._ring.take_async(wait)]
        pending: asyncio.Future[Any] | None = None
        try:
            blocks.append(await self._ring.take_async(wait))

            def fill(index: int) -> asyncio.Future[Any]:
                offset, length = spans[index]
                args = (array.key, offset, blocks[index % 2], length, buffer_id)
                return asyncio.ensure_future(self._call("copy_out", *args))

            waiting = pending = fill(0)
            for index, (_, length) in enumerate(spans):
                await waiting
                pending = None
                if index + 1 < len(spans):
                    waiting = pending = fill(index + 1)
                yield self._ring.view(blocks[index % 2], length).data
        finally:
            if pending is not None:  # a reader that stopped early: the block is not free until the copy ends
                with contextlib.suppress(Exception):
                    await asyncio.wait([pending])
                _retrieved(pending)
            for block in blocks:
                self._ring.give(block)

    def read_chunks_sync(
        self, array: RemoteArray, buffer_id: str, rows: tuple[int, int] | None, *, timeout: float
    ) -> Iterator[memoryview]:
        """:meth:`read_chunks` for a thread (the bulk path's senders)."""
        spans = self._spans(array, buffer_id, rows)
        if not spans:
            return
        blocks = [self._ring.take(timeout)]
        pending: Future[Any] | None = None
        try:
            blocks.append(self._ring.take(timeout))

            def fill(index: int) -> Future[Any]:
                offset, length = spans[index]
                args = (array.key, offset, blocks[index % 2], length, buffer_id)
                return self._send("copy_out", args, on_loop=False).future  # type: ignore[no-any-return]

            waiting = pending = fill(0)
            for index, (_, length) in enumerate(spans):
                try:
                    waiting.result(timeout)
                except WorkerDied as exc:
                    raise RpcRefusal("not-accepting", str(exc)) from None
                pending = None
                if index + 1 < len(spans):
                    waiting = pending = fill(index + 1)
                yield self._ring.view(blocks[index % 2], length).data
        finally:
            if pending is not None:  # a reader that stopped early: the block is not free until the copy ends
                with contextlib.suppress(Exception):
                    pending.result(timeout)
            for block in blocks:
                self._ring.give(block)

    def _spans(
        self, array: RemoteArray, buffer_id: str, rows: tuple[int, int] | None
    ) -> list[tuple[int, int]]:
        """(byte offset, length) of each staging block's worth of the array (or of its rows)."""
        self._check_generation(array, buffer_id)
        start, stop = _byte_range(array, rows)
        size = self._ring.block_bytes
        return [(offset, min(size, stop - offset)) for offset in range(start, stop, size)]

    def row_stream(
        self, array: RemoteArray, buffer_id: str, rows: tuple[int, int] | None, *, timeout: float
    ) -> RowStream:
        """The array (or rows ``[start, stop)`` of it) as a :class:`RowStream`."""
        self._check_generation(array, buffer_id)
        shape = array.shape if rows is None else (rows[1] - rows[0], *array.shape[1:])
        start, stop = _byte_range(array, rows)
        return RowStream(
            dtype=array.dtype,
            shape=shape,
            nbytes=stop - start,
            chunks=lambda: self.read_chunks(array, buffer_id, rows, wait=timeout),
            chunks_sync=lambda seconds: self.read_chunks_sync(array, buffer_id, rows, timeout=seconds),
        )

    async def to_host(
        self, array: RemoteArray, buffer_id: str, rows: tuple[int, int] | None = None
    ) -> np.ndarray:
        """A host copy of the array (or of rows ``[start, stop)``)."""
        shape = array.shape if rows is None else (rows[1] - rows[0], *array.shape[1:])
        try:
            host = np.empty(shape, array.dtype)
        except (MemoryError, ValueError) as exc:
            raise RpcRefusal(
                "out-of-memory", f"no host memory for buffer {buffer_id}: {exc}", buffer_id=buffer_id
            ) from exc
        view = host.reshape(-1).view(np.uint8)
        filled = 0
        async for chunk in self.read_chunks(array, buffer_id, rows):
            view[filled : filled + len(chunk)] = chunk
            filled += len(chunk)
        return host

    async def to_device(self, host: np.ndarray, buffer_id: str) -> RemoteArray:
        """A new array in the process holding ``host``'s values."""
        host = np.asarray(host, order="C")  # ascontiguousarray would make a 0-d array 1-d
        array = await self.allocate(host.dtype, tuple(host.shape), buffer_id)
        data = host.reshape(-1).view(np.uint8)
        size = self._ring.block_bytes
        async with self.staging(min(size, max(len(data), 1))) as blocks:
            waiting: list[asyncio.Future[Any] | None] = [None, None]
            for index, offset in enumerate(range(0, len(data), size)):
                slot = index % 2
                previous = waiting[slot]
                if previous is not None:
                    await previous
                piece = data[offset : offset + size]
                block = blocks[slot][: len(piece)]
                block[:] = piece
                waiting[slot] = asyncio.ensure_future(self.copy_in(array, offset, block, buffer_id))
            for left in waiting:
                if left is not None:
                    await left
        return array

    # programs

    async def execute(
        self,
        request: agent_pb2.ExecuteRequest,
        registry: BufferRegistry,
        *,
        deadline: float,
    ) -> agent_pb2.ExecuteReply:
        """Run a program in the process: checked, its memory reserved and its buffers named here; computed
        there; its outputs committed here as handles. All or nothing, as in-process.

        Raises:
            RpcRefusal: as :func:`~gpupool.agent.program.run_program`; ``kernel-failed`` naming the cause when
                the process died while running it.
            TimeoutError: past ``deadline`` seconds (the process is killed if the program does not stop).
            ProgramCancelled: the caller gave up; nothing is kept.
        """
        if self._options[2] and any(op.op == FAULT_OP for op in request.ops):
            # A test's fault-injection program: no buffers, the same waiting, cancelling and killing.
            return await self._run_there(request, {}, False, deadline)
        expected = check_request(request, registry)
        keys: dict[str, str] = {}
        reads: set[str] = set(request.fetch)
        for op in request.ops:
            reads.update(buffer_reads(op))
        generation = self._generation_now()
        for buffer_id in reads - expected.keys():
            handle = registry.get(buffer_id, worker=request.worker).array
            if not isinstance(handle, RemoteArray) or handle.generation != generation:
                raise RpcRefusal(
                    "buffer-not-found",
                    f"buffer {buffer_id} was lost with worker {self.index}'s process",
                    buffer_id=buffer_id,
                )
            keys[buffer_id] = handle.key
        reservations: list[Reservation] = []
        handles: dict[str, RemoteArray] = {}
        try:
            for output, result in expected.items():
                reservations.append(
                    registry.reserve(
                        worker=request.worker, buffer_id=output, nbytes=result.nbytes, session=request.session
                    )
                )
                handles[output] = self._handle(result.dtype, result.shape, generation)
                keys[output] = handles[output].key
            scratch = max((scratch_bytes(op, check_op) for op in request.ops if op.op in COMPOUND), default=0)
            if scratch:
                first = (
                    op_outputs(request.ops[0])[0] if request.ops and op_outputs(request.ops[0]) else "program"
                )
                reservations.append(
                    registry.reserve(
                        worker=request.worker,
                        buffer_id=f"{first}~scratch",
                        nbytes=scratch,
                        session=request.session,
                    )
                )
            reply = await self._run_there(request, keys, is_small(request, registry.nbytes_of), deadline)
            dropped = set(request.free)
            keep = [
                (reservation, handles[reservation.buffer_id])
                for reservation in reservations
                if reservation.buffer_id in handles and reservation.buffer_id not in dropped
            ]
            if keep and not registry.commit_all(keep, unless=threading.Event()):
                raise ProgramCancelled()
            registry.free(buffer_id for buffer_id in dropped if buffer_id not in expected)
            reply.memory_used = registry.usage(request.worker).used
            return reply
        finally:
            for reservation in reservations:
                registry.release(reservation)  # a no-op once committed

    async def _run_there(
        self, request: agent_pb2.ExecuteRequest, keys: dict[str, str], small: bool, deadline: float
    ) -> agent_pb2.ExecuteReply:
        """Send the program to the process and wait for its reply (see :meth:`_wait`).

        Raises:
            RpcRefusal: the process refused it, or ``kernel-failed`` naming the cause when it died meanwhile.
        """
        try:
            answer = await self._wait(
                self._send("execute", (request.SerializeToString(), keys, small)), deadline
            )
        except WorkerDied as exc:
            raise RpcRefusal(
                "kernel-failed", f"{exc} while running this program; its buffers are lost"
            ) from None
        return agent_pb2.ExecuteReply.FromString(answer)

    async def _wait(self, sent: _Pending, deadline: float) -> Any:
        """A program's answer within ``deadline`` seconds; past it, or when the caller gives up, the call is
        stopped there (:meth:`_stop_call`)."""
        sent.future.add_done_callback(_retrieved)
        try:
            async with asyncio.timeout(deadline):
                return await asyncio.shield(sent.future)
        except BaseException:
            await self._stop_call(sent)
            raise

    async def _stop_call(self, sent: _Pending) -> None:
        """The caller gave up (deadline, cancellation): cancel the call there; kill the process if it does not
        stop within :data:`HANG_GRACE` seconds (a hung kernel cannot be cancelled)."""
        if sent.future.done():
            return
        self._post("cancel", sent.call, sent.generation)
        try:
            await asyncio.wait_for(asyncio.shield(sent.future), HANG_GRACE)
        except TimeoutError:
            self.kill(
                f"a program ran past its deadline and did not stop; worker {self.index}'s process was killed"
            )
        except BaseException:  # it stopped (cancelled, failed): the process is fine
            return

    def idle(self) -> bool:
        """Whether no call is in flight in the process (and it serves)."""
        with self._lock:
            return self._child is not None and self._child.alive and not self._child.pending

    async def remeasure(self) -> Measured:
        """Measure the process's speed again (about 0.1 s of its time), kept for the status."""
        self.measured = Measured(*await self._call("measure"))
        return self.measured

    async def kernel_counts(self) -> tuple[int, int]:
        """The process's kernel cache (hits, compiles); zeros while it is restarting."""
        try:
            hits, compiles = await self._call("stats")
        except RpcRefusal:
            return 0, 0
        return int(hits), int(compiles)


def _fail(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


def _retrieved(future: asyncio.Future[Any]) -> None:
    """Mark an outcome seen (asyncio would log one nobody awaited, e.g. after a deadline)."""
    if not future.cancelled():
        future.exception()


def _byte_range(array: RemoteArray, rows: tuple[int, int] | None) -> tuple[int, int]:
    if rows is None:
        return 0, array.nbytes
    row_bytes = array.nbytes // array.shape[0] if array.shape and array.shape[0] else 0
    return rows[0] * row_bytes, rows[1] * row_bytes


def _error_of(value: tuple[str, str, str, str]) -> BaseException:
    what, kind, message, buffer_id = value
    if what == "cancelled":
        return ProgramCancelled()
    return RpcRefusal(kind, message, buffer_id=buffer_id)  # type: ignore[arg-type]


def _reap(process: subprocess.Popen[bytes]) -> None:
    """Wait (briefly: it was killed, or its pipe closed) for the process's exit status."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(5)


def _exit_of(process: subprocess.Popen[bytes]) -> str:
    code = process.poll()
    if code is None:
        return "still running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit status {code}"


#: A worker as the agent's servicers see it: in the agent's process, or in one of its own.
AnyWorker = Worker | ProcessWorker

"""A worker's own process: its buffers and its compute, apart from the agent's network and control plane.

The agent (:mod:`gpupool.agent.procworker`) starts one of these per worker (``python -m
gpupool.agent.workerproc FD``: a fresh interpreter that imports only gpupool, never the agent's own main
module) and talks to it over a socket pair, the :class:`WorkerSpec` first:
each message is ``(call, name, args, frees)`` and each answer ``(call, ok, value)``; ``frees`` are the
keys of arrays whose handles the agent dropped since its last message. The arrays live here, by
keys the agent chose; bytes in and out go through a ring of shared staging blocks both processes map
(``/proc/<agent>/fd/<memfd>``), so nothing large crosses the pipe. ``free`` and ``cancel`` are handled
by the reading thread as they arrive; everything else runs in the worker's threads, its ops taking
turns on the device as in the agent (:class:`~gpupool.agent.workers.Worker`).

A fault in here (a kernel's illegal address, a segfault in a library, a hang) ends this process only: the
agent answers its caller, marks this worker's buffers lost and starts a fresh process. A CUDA error that
leaves the context unusable ends the process on purpose, after answering, for the same reason.

With ``GPUPOOL_FAULT_INJECTION=1`` (tests only) a process also honours :data:`FAULT_OP` (a fault on
purpose) and ``GPUPOOL_FAULT_CORRUPT`` (wrong answers on purpose, :mod:`gpupool.agent.corruption`).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import logging
import mmap
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Final

import numpy as np

from gpupool._proto.v1 import agent_pb2
from gpupool.agent.backend import ArrayBackend, NumpyBackend
from gpupool.agent.buffers import Buffer, Reservation, WorkerUsage
from gpupool.agent.corruption import CORRUPT_ENV, Corrupter, CorruptSetting, corrupt
from gpupool.agent.measure import measure
from gpupool.agent.program import ProgramCancelled, device_errors, run_program
from gpupool.agent.workers import Worker
from gpupool.protocol.errors import RpcRefusal

__all__ = ["FAULT_INJECTION_ENV", "FAULT_OP", "WorkerSpec", "main"]

log = logging.getLogger(__name__)

#: The op a test program sends to make a worker fail on purpose (``op.kernel.name`` says how: ``segfault``,
#: ``abort``, ``hang``, ``sticky``); honoured only where the agent runs with ``GPUPOOL_FAULT_INJECTION=1``.
FAULT_OP: Final = "fault_inject"

#: Bytes of freed arrays' memory files a NumPy worker process keeps to reuse (memory not counted against
#: the worker's limit): filling fresh shared memory faults each page in, at about a third of the speed.
SPARE_BYTES: Final = 256 << 20

#: Set to ``1`` where an agent starts, this lets its workers honour :data:`FAULT_OP` (tests only).
FAULT_INJECTION_ENV: Final = "GPUPOOL_FAULT_INJECTION"

#: CUDA errors after which the context is unusable (cudaErrorIllegalAddress and its kin, 700-720).
_STICKY_MARKERS: Final = (
    "illegal memory access",
    "illegal address",
    "unspecified launch failure",
    "misaligned address",
    "illegal instruction",
    "hardware stack error",
    "cudaErrorLaunchFailure",
    "cudaErrorIllegalAddress",
    "cudaErrorAssert",
    "device-side assert",
)


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What a worker process serves with (picklable: it crosses the spawn)."""

    index: int
    backend: str
    ring_path: str
    ring_blocks: int
    block_bytes: int
    allow_kernels: bool
    fuse_kernels: bool
    faults: bool
    log_level: int
    thread_name: str
    slowdown: float = 1.0


def main(conn: Connection, spec: WorkerSpec) -> None:
    """Serve until the agent closes the pipe (or dies)."""
    logging.basicConfig(
        level=spec.log_level, format=f"%(asctime)s worker{spec.index} %(levelname)s %(message)s"
    )
    _die_with_parent()
    backend: ArrayBackend
    if spec.backend == "cupy":
        from gpupool.agent import _cupy

        backend = _cupy.CupyBackend(spec.index)
    else:
        backend = NumpyBackend(spec.index)
    worker = Worker(index=spec.index, backend=backend, memory_limit=1 << 62, thread_name=spec.thread_name)
    fd = os.open(spec.ring_path, os.O_RDWR)
    try:
        ring = mmap.mmap(fd, spec.ring_blocks * spec.block_bytes)
    finally:
        os.close(fd)
    with contextlib.suppress(ValueError, OSError):  # shared arrays hold a descriptor each
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    staging = np.frombuffer(ring, np.uint8)
    if spec.backend == "cupy":
        _pin(staging)
    _Server(conn, worker, staging, spec, corrupter=_corrupter(spec)).serve()


def _corrupter(spec: WorkerSpec) -> Corrupter | None:
    """What ``GPUPOOL_FAULT_CORRUPT`` asks of this process: nothing unless fault injection is on.

    Raises:
        ValueError: a malformed setting (the process ends as it starts; the agent's log says why).
    """
    text = os.environ.get(CORRUPT_ENV, "")
    if not text:
        return None
    if not spec.faults:
        log.warning(
            "worker %d: %s is set but ignored: fault injection is off (%s is not 1)",
            spec.index,
            CORRUPT_ENV,
            FAULT_INJECTION_ENV,
        )
        return None
    setting = CorruptSetting.parse(text)
    log.warning(
        "worker %d: fault injection: corrupting the first result of %g of programs (seed %d)",
        spec.index,
        setting.fraction,
        setting.seed,
    )
    return Corrupter(setting, worker=spec.index)


def _pin(staging: np.ndarray) -> None:
    """Page-lock the staging ring for CUDA (copies from pageable memory go at a fraction of the speed)."""
    try:
        import cupy

        cupy.cuda.runtime.hostRegister(staging.ctypes.data, staging.nbytes, 1)  # cudaHostRegisterPortable
    except Exception as exc:  # page-locking can fail where plain memory works; copies are slower then
        log.warning("staging blocks not page-locked (%s): uploads and downloads copy from plain memory", exc)


def _die_with_parent() -> None:
    """Ask Linux to end this process with SIGKILL when the agent ends (a SIGKILLed agent included)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the agent was gone before the call above
        os._exit(0)
    # Ctrl-C in a terminal and systemd's stop signal the whole group: the agent stops this process itself
    # (a "stop" message, then SIGKILL), after answering its callers; it must not die first, mid-call.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _Server:
    """The process's one reader of the pipe, its arrays, and the calls running in the worker's threads."""

    def __init__(
        self,
        conn: Connection,
        worker: Worker,
        ring: np.ndarray,
        spec: WorkerSpec,
        *,
        corrupter: Corrupter | None = None,
    ) -> None:
        self._conn = conn
        self._worker = worker
        self._backend = worker.backend
        self._ring = ring
        self._spec = spec
        self._arrays: dict[str, Any] = {}
        self._fds: dict[str, int] = {}  # memory files of shared arrays, by key, open while they live
        self._spare: list[tuple[int, int]] = []  # freed arrays' memory files kept for reuse: (fd, bytes)
        self._spare_bytes = 0
        self._arrays_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._cancel: dict[int, threading.Event] = {}
        self._corrupter = corrupter

    def serve(self) -> None:
        self._backend.bind_thread()
        measured = measure(self._backend, factor=self._spec.slowdown)
        hello = {"backend": self._backend.name, "pid": os.getpid(), "measured": dataclasses.astuple(measured)}
        self._reply(0, True, hello)
        while True:
            try:
                call, name, args, frees = self._conn.recv()
            except (EOFError, OSError):
                os._exit(0)  # the agent closed the pipe or died: nothing here is anyone's any more
            if frees or name == "free":  # arrays whose handles the agent dropped, before anything else
                with self._arrays_lock:
                    for key in (*frees, *(args if name == "free" else ())):
                        self._arrays.pop(key, None)
                        fd = self._fds.pop(key, None)
                        if fd is not None:
                            self._keep_spare(fd)
            if name == "free":
                continue
            if name == "cancel":
                event = self._cancel.get(args)
                if event is not None:
                    event.set()
                continue
            if name == "stop":
                os._exit(0)
            if name == "stats" or (name == "execute" and args[2] and self._worker.idle_for_inline(True)):
                # A few microseconds of work with the device idle: here, with no thread hop.
                self._run(call, name, args, threading.Event())
                continue
            cancelled = threading.Event()
            self._cancel[call] = cancelled
            future: Future[Any] = self._worker.submit(self._run, call, name, args, cancelled)
            future.add_done_callback(functools.partial(self._forget, call))

    def _forget(self, call: int, _future: object) -> None:
        self._cancel.pop(call, None)

    def _run(self, call: int, name: str, args: tuple[Any, ...], cancelled: threading.Event) -> None:
        sticky = False
        try:
            value = getattr(self, f"_do_{name}")(cancelled, *args)
        except RpcRefusal as exc:
            sticky = _is_sticky(exc.message)
            self._reply(call, False, ("refusal", exc.kind, exc.message, exc.buffer_id))
        except ProgramCancelled:
            self._reply(call, False, ("cancelled", "", "", ""))
        except BaseException as exc:  # reported, not raised: the agent's caller gets it
            sticky = _is_sticky(str(exc))
            self._reply(call, False, ("refusal", "kernel-failed", f"worker {self._spec.index}: {exc!r}", ""))
        else:
            self._reply(call, True, value)
        if sticky:
            # The CUDA context is unusable: every later call would fail. End here, answered, so the
            # agent starts a fresh process with a fresh context.
            log.error("a CUDA error left the device unusable; this worker process ends to be restarted")
            sys.stderr.flush()
            os._exit(70)

    def _reply(self, call: int, ok: bool, value: Any) -> None:
        with self._send_lock:
            try:
                self._conn.send((call, ok, value))
            except (OSError, ValueError):
                os._exit(0)

    # the calls

    def _array(self, key: str, buffer_id: str) -> Any:
        with self._arrays_lock:
            array = self._arrays.get(key)
        if array is None:
            raise RpcRefusal(
                "buffer-not-found", f"buffer {buffer_id} is not in the worker", buffer_id=buffer_id
            )
        return array

    def _block(self, index: int, length: int) -> np.ndarray:
        start = index * self._spec.block_bytes
        return self._ring[start : start + length]

    def _do_allocate(
        self,
        _c: threading.Event,
        key: str,
        dtype: str,
        shape: tuple[int, ...],
        buffer_id: str,
        shared: bool,
    ) -> int | None:
        """A new array under ``key``; ``shared`` (NumPy only): in a memory file the agent maps (its
        descriptor number is the answer), so that the agent's network code fills and reads it in place."""
        if shared:
            array, fd = self._shared_empty(np.dtype(dtype), shape, buffer_id)
        else:
            with device_errors(self._backend, self._spec.index):
                array = self._backend.empty(shape, np.dtype(dtype))
            fd = None
        with self._arrays_lock:
            self._arrays[key] = array
            if fd is not None:
                self._fds[key] = fd
        return fd

    def _shared_empty(
        self, dtype: np.dtype[Any], shape: tuple[int, ...], buffer_id: str
    ) -> tuple[np.ndarray, int]:
        if self._backend.name != "numpy":
            raise RpcRefusal("bad-request", "only a NumPy worker shares its arrays with the agent")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        try:
            fd = self._spare_file(nbytes)
            if fd is None:
                fd = os.memfd_create(f"gpupool-{buffer_id}"[:200], os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, max(nbytes, 1))
                memory = mmap.mmap(fd, max(nbytes, 1))
            except BaseException:
                os.close(fd)
                raise
        except OSError as exc:
            raise RpcRefusal(
                "out-of-memory",
                f"worker {self._spec.index}: no shared memory for {buffer_id}: {exc}",
                buffer_id=buffer_id,
            ) from exc
        return np.frombuffer(memory, dtype, count=nbytes // dtype.itemsize).reshape(shape), fd

    def _spare_file(self, nbytes: int) -> int | None:
        """A freed array's memory file to reuse for ``nbytes`` (its pages already there: filling it does not
        fault page by page), the closest in size of at least half; None if none is kept."""
        with self._arrays_lock:
            fitting = [item for item in self._spare if item[1] * 2 >= nbytes and item[1] <= nbytes * 2]
            if not fitting:
                return None
            chosen = min(fitting, key=lambda item: abs(item[1] - nbytes))
            self._spare.remove(chosen)
            self._spare_bytes -= chosen[1]
            return chosen[0]

    def _keep_spare(self, fd: int) -> None:
        """Keep a freed array's memory file for the next one (under the lock), up to :data:`SPARE_BYTES` in
        all; close it otherwise."""
        size = os.fstat(fd).st_size
        if self._spare_bytes + size > SPARE_BYTES:
            os.close(fd)
            return
        self._spare.append((fd, size))
        self._spare_bytes += size

    def _do_share(self, _c: threading.Event, key: str, buffer_id: str) -> int:
        """The descriptor of the array's memory file, moving it into one first (once) if a program made it."""
        with self._arrays_lock:
            fd = self._fds.get(key)
        if fd is not None:
            return fd
        array = self._array(key, buffer_id)
        shared, fd = self._shared_empty(array.dtype, tuple(array.shape), buffer_id)
        shared[...] = array
        with self._arrays_lock:
            if key not in self._arrays:  # freed meanwhile
                os.close(fd)
                raise RpcRefusal("buffer-not-found", f"buffer {buffer_id} was freed", buffer_id=buffer_id)
            self._arrays[key] = shared
            self._fds[key] = fd
        return fd

    def _do_copy_in(
        self, _c: threading.Event, key: str, offset: int, block: int, length: int, buffer_id: str
    ) -> None:
        array = self._array(key, buffer_id)
        with device_errors(self._backend, self._spec.index):
            self._backend.copy_in(array, offset, self._block(block, length))

    def _do_copy_out(
        self, _c: threading.Event, key: str, offset: int, block: int, length: int, buffer_id: str
    ) -> None:
        array = self._contiguous(key, buffer_id)
        with device_errors(self._backend, self._spec.index):
            self._backend.copy_out(array, offset, self._block(block, length))

    def _contiguous(self, key: str, buffer_id: str) -> Any:
        """The array, made C-contiguous in place of itself once (a view a program kept, say), so that its
        rows are byte ranges."""
        array = self._array(key, buffer_id)
        if array.flags.c_contiguous:
            return array
        with device_errors(self._backend, self._spec.index):
            copy = self._backend.xp.ascontiguousarray(array)
        with self._arrays_lock:
            if key in self._arrays:
                self._arrays[key] = copy
        return copy

    def _do_execute(
        self, cancelled: threading.Event, request_bytes: bytes, keys: dict[str, str], inline: bool
    ) -> bytes:
        request = agent_pb2.ExecuteRequest.FromString(request_bytes)
        if self._spec.faults:
            for op in request.ops:
                if op.op == FAULT_OP:
                    _inject(op.kernel.name, self._spec.index)
        store = _ProgramStore(self, keys, request.worker)
        started = time.perf_counter()
        reply = run_program(
            request,
            backend=self._backend,
            registry=store,  # type: ignore[arg-type]  # the subset a program uses
            cancelled=cancelled,
            turn=None if inline else functools.partial(self._worker.turn, request.session),
            allow_kernels=self._spec.allow_kernels,
            fuse_kernels=self._spec.fuse_kernels,
        )
        if self._corrupter is not None:
            self._corrupt(self._corrupter, request, keys, reply)
        if self._spec.slowdown > 1.0:  # a slower card, for tests and benchmarks (GPUPOOL_SLOWDOWN)
            time.sleep((self._spec.slowdown - 1.0) * (time.perf_counter() - started))
        return reply.SerializeToString()

    def _corrupt(
        self,
        corrupter: Corrupter,
        request: agent_pb2.ExecuteRequest,
        keys: dict[str, str],
        reply: agent_pb2.ExecuteReply,
    ) -> None:
        """Fault injection: one wrong value in the program's first result, kept and fetched alike, if
        ``corrupter`` picks this program (:mod:`gpupool.agent.corruption`)."""
        chosen = corrupter.choose(request)
        if chosen is None:
            return
        key = keys.get(chosen.buffer_id) if chosen.buffer_id not in request.free else None
        with self._arrays_lock:
            kept = self._arrays.get(key) if key is not None else None
        with device_errors(self._backend, self._spec.index):
            made = corrupt(chosen, reply, kept, to_host=self._backend.to_host)
        if made is None:
            return
        if made.kept is not None and key is not None:
            with self._arrays_lock:
                if key in self._arrays:
                    self._arrays[key] = made.kept
        corrupted, programs = corrupter.count()
        log.warning(
            "worker %d: %s; %d of %d programs corrupted so far",
            self._spec.index,
            made.describe(),
            corrupted,
            programs,
        )

    def _do_measure(self, _c: threading.Event) -> tuple[float, float, float]:
        """The worker's speed again (in one of its threads, bound to its device)."""
        return dataclasses.astuple(measure(self._backend, factor=self._spec.slowdown))

    def _do_stats(self, _c: threading.Event) -> tuple[int, int]:
        from gpupool.agent import kernel_cache

        counts = kernel_cache.counts()
        return counts.hits, counts.compiles


def _inject(how: str, index: int) -> None:
    """A fault on purpose (tests): what a faulting kernel or a hung one does to a worker process."""
    log.warning("worker %d: injecting a fault: %s", index, how)
    if how == "segfault":
        ctypes.string_at(0)  # a real SIGSEGV
    elif how == "abort":
        os.abort()
    elif how == "hang":
        while True:  # ignores cancellation, as a kernel stuck on the device would
            time.sleep(3600)
    elif how == "sticky":
        raise RpcRefusal("kernel-failed", "CUDA error: an illegal memory access was encountered (injected)")
    raise RpcRefusal("bad-request", f"unknown fault {how!r} (segfault, abort, hang, sticky)")


def _is_sticky(message: str) -> bool:
    lowered = message.lower()
    return any(marker.lower() in lowered for marker in _STICKY_MARKERS)


class _ProgramStore:
    """The part of :class:`~gpupool.agent.buffers.BufferRegistry` a program uses, over this process's arrays.

    The agent has already checked the program, reserved its memory and made sure its outputs are new; here
    reservations are bookkeeping only, buffer ids map to this process's keys through ``keys`` (inputs and
    outputs alike), and a commit stores the arrays under their keys.
    """

    def __init__(self, server: _Server, keys: dict[str, str], worker: int) -> None:
        self._server = server
        self._keys = keys
        self._worker = worker

    def check_worker(self, worker: int) -> None:
        if worker != self._worker:
            raise RpcRefusal("not-accepting", f"this worker process is worker {self._worker}, not {worker}")

    def contains(self, buffer_id: str) -> bool:
        return False  # the agent refused outputs that exist

    def get(self, buffer_id: str, *, worker: int | None = None) -> Buffer:
        key = self._keys.get(buffer_id)
        if key is None:
            raise RpcRefusal("buffer-not-found", f"buffer {buffer_id} not found", buffer_id=buffer_id)
        array = self._server._array(key, buffer_id)
        return Buffer(buffer_id, self._worker, array, int(array.nbytes), "")

    def reserve(self, *, worker: int, buffer_id: str, nbytes: int, session: str) -> Reservation:
        return Reservation(buffer_id, worker, nbytes, session)

    def release(self, reservation: Reservation) -> None:
        reservation.active = False

    def commit_all(self, pairs: Iterable[tuple[Reservation, Any]], *, unless: threading.Event) -> bool:
        stored = [(self._keys[reservation.buffer_id], array) for reservation, array in pairs]
        if unless.is_set():
            return False
        with self._server._arrays_lock:
            self._server._arrays.update(stored)
        return True

    def free(self, buffer_ids: Iterable[str]) -> tuple[int, int]:
        return 0, 0  # the agent frees them in its registry, and its handles free the keys here

    def usage(self, worker: int) -> WorkerUsage:
        return WorkerUsage(0, 0, 0, 0)  # the agent fills in memory_used from its own registry


def entry() -> None:
    """``python -c 'from gpupool.agent.workerproc import entry; entry()' FD``: the agent's pipe is FD."""
    conn = Connection(int(sys.argv[1]))
    main(conn, conn.recv())

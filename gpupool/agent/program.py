"""Running one Execute request: a small program of ops over a worker's buffers, all or nothing.

:func:`run_program` runs in one of the worker's threads (see :class:`~gpupool.agent.workers.Worker`),
each op taking its turn on the device with other sessions' programs. It checks the whole request before
computing anything, reserves each output's memory before its op runs, and commits the outputs only once
every op, the device synchronisation and the fetch succeeded; on any failure, or if the caller gave up
(``cancelled``), it releases everything it reserved and drops its intermediates, and the error it raises
holds none of them, so a failing program leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any, Final

import numpy as np

from gpupool._proto.v1 import agent_pb2
from gpupool.agent.backend import ArrayBackend
from gpupool.agent.buffers import BufferRegistry, Reservation
from gpupool.agent.compound import (
    COMPOUND,
    buffer_reads,
    check_any,
    compound_work,
    run_loop,
    scratch_bytes,
)
from gpupool.agent.cufuse import generate, run_generated
from gpupool.agent.fusion import Run, plan_runs, run_fused
from gpupool.agent.kernels import check_kernel, run_kernel
from gpupool.agent.ops import (
    Expected,
    apply_op,
    constant_array,
    op_args,
    scalar_value,
)
from gpupool.protocol.codec import meta_of, op_outputs, op_results
from gpupool.protocol.errors import RpcRefusal
from gpupool.protocol.opnames import CONTRACTIONS, ORDERING

__all__ = [
    "FETCH_LIMIT",
    "SMALL_ELEMENTS",
    "Program",
    "ProgramCancelled",
    "device_errors",
    "estimate_work",
    "forget_frames",
    "is_small",
    "run_program",
]

#: Most bytes an Execute returns inline (docs/contracts.md); larger results are downloaded.
FETCH_LIMIT: Final = 16 << 20


#: A program whose results hold at most this many elements in all runs without a thread hop (NumPy).
SMALL_ELEMENTS: Final = 1 << 14


def is_small(request: agent_pb2.ExecuteRequest, resident_nbytes: Callable[[str], int]) -> bool:
    """Whether ``request`` is cheap enough to run on the agent's event loop (see ``Worker.call``): no
    matrix product, and its results and the resident buffers it reads hold few elements in all (a sort's
    results counted ``log2 n`` times)."""
    produced: set[str] = set()
    budget = SMALL_ELEMENTS * 8  # bytes, counting float64
    for op in request.ops:
        if op.op in CONTRACTIONS or op.op in COMPOUND:
            return False
        for item in op.inputs:
            if item.WhichOneof("kind") == "buffer" and item.buffer not in produced:
                budget -= resident_nbytes(item.buffer)
        elements = max(math.prod(op.expect.shape), 0)  # negative dimensions are refused later
        budget -= 8 * elements * _sorting_factor(op.op, elements)
        if budget < 0:
            return False
        produced.add(op.output)
    return True


def _sorting_factor(name: str, elements: int) -> int:
    """Operations per element of an op: ``log2 n`` for sorting ``n`` elements, else 1."""
    return max(elements.bit_length(), 1) if name in ORDERING else 1


def estimate_work(
    request: agent_pb2.ExecuteRequest, resident_nbytes: Callable[[str], int]
) -> tuple[int, int]:
    """The work ``request`` asks for: (bytes its ops read and write, floating-point operations), for
    deadlines (``Timeouts.for_work``). Pure; an unchecked request gives an estimate all the same.

    A matmul or tmatmul counts ``2 * m * n * k``, with the contracted length from its operands' sizes (a
    resident buffer's size comes from ``resident_nbytes``, its elements counted at the result's element
    size, which counts an operand of a narrower dtype short; the deadline's margins cover that); a sort,
    argsort or partition ``n log2 n``; any other op one operation per element it reads or writes.
    Fetched resident buffers count once more, for the copy out.
    """
    declared: dict[str, tuple[int, int]] = {}  # output -> (bytes, elements), for later ops' operands

    def op_work(op: agent_pb2.Op) -> tuple[int, int]:
        if op.op in COMPOUND:
            for name, meta in op_results(op):
                elements = max(math.prod(meta.shape), 0)
                declared[name] = (elements * _itemsize(meta), elements)
            return compound_work(op, op_work)
        elements = max(math.prod(op.expect.shape), 0)  # negative dimensions are refused later
        itemsize = _itemsize(op.expect)
        sizes = [_operand_size(item, declared, resident_nbytes, itemsize) for item in op.inputs]
        touched = sum(nbytes for nbytes, _ in sizes) + elements * itemsize
        if op.op in CONTRACTIONS and len(sizes) == 2:
            # The contracted length: matmul (m, k) @ (k, n) has k² m n / (m n); tmatmul (m, k).T @ (m, n)
            # has m² k n / (k n).
            product = sizes[0][1] * sizes[1][1]
            flops = 2 * elements * math.isqrt(product // max(elements, 1))
        else:
            largest = max([elements, *(count for _, count in sizes)])
            flops = largest * _sorting_factor(op.op, largest)
        declared[op.output] = (elements * itemsize, elements)
        return touched, flops

    touched = 0
    flops = 0
    for op in request.ops:
        op_touched, op_flops = op_work(op)
        touched += op_touched
        flops += op_flops
    touched += sum(resident_nbytes(buffer_id) for buffer_id in request.fetch if buffer_id not in declared)
    return touched, flops


def _itemsize(meta: agent_pb2.ArrayMeta) -> int:
    try:
        return max(np.dtype(meta.dtype).itemsize, 1) if meta.dtype else 8
    except (TypeError, ValueError):  # an unsupported dtype, refused later
        return 8


def _operand_size(
    item: agent_pb2.Operand,
    declared: dict[str, tuple[int, int]],
    resident_nbytes: Callable[[str], int],
    itemsize: int,
) -> tuple[int, int]:
    """An operand's (bytes, elements) for :func:`estimate_work`."""
    kind = item.WhichOneof("kind")
    if kind == "buffer":
        if item.buffer in declared:
            return declared[item.buffer]
        nbytes = resident_nbytes(item.buffer)
        return nbytes, nbytes // itemsize
    if kind == "constant":
        return len(item.constant.data), max(math.prod(item.constant.meta.shape), 0)
    return 0, 1


class ProgramCancelled(Exception):
    """The caller gave up on the program before it committed; nothing was kept."""


def run_program(
    request: agent_pb2.ExecuteRequest,
    *,
    backend: ArrayBackend,
    registry: BufferRegistry,
    cancelled: threading.Event | None = None,
    turn: Callable[[], AbstractContextManager[object]] | None = None,
    allow_kernels: bool = False,
    fuse_kernels: bool = False,
) -> agent_pb2.ExecuteReply:
    """Run ``request`` on ``backend`` (in one of its worker's threads): check, step op by op, commit.

    Args:
        request: the program.
        backend: the worker's compute.
        registry: the agent's buffers.
        cancelled: set by a caller that gave up; checked before each op and at the commit.
        turn: makes a context manager that holds the worker's device for one step (an op or a fused
            run; the last one with the commit), see ``Worker.turn``; none when the program has the
            device to itself (the event loop's inline path).
        allow_kernels: run users' kernels (the agent's ``--allow-kernels``); refused otherwise.
        fuse_kernels: on a CuPy worker, run elementwise chains as generated kernels (``--fuse-kernels``).

    Raises:
        RpcRefusal: ``bad-request`` (malformed op, wrong result shape, fetch over :data:`FETCH_LIMIT`),
            ``buffer-not-found``, ``buffer-exists``, ``out-of-memory``, ``kernel-failed``,
            ``not-accepting`` (no such worker). Nothing the program created is kept.
        ProgramCancelled: ``cancelled`` was set before the outputs were committed.
    """
    cancelled = cancelled or threading.Event()
    take_turn = turn or contextlib.nullcontext
    program = Program(
        request,
        backend=backend,
        registry=registry,
        cancelled=cancelled,
        allow_kernels=allow_kernels,
        fuse_kernels=fuse_kernels,
    )
    try:
        while True:
            if cancelled.is_set():
                raise ProgramCancelled()
            with device_errors(backend, request.worker), take_turn():  # the turn's end may wait on the device
                if not program.done:
                    program.step()
                if program.done:  # the commit shares the last op's turn: one wait fewer
                    return program.commit()
    except BaseException as exc:
        forget_frames(exc)
        raise
    finally:
        program.discard()


class Program:
    """One Execute request on one worker, in three parts: check (made), :meth:`step` until :attr:`done`,
    then :meth:`commit`; :meth:`discard` once at the end, whatever happened.

    Each step reserves its outputs' memory (as if unfused: a conservative bound) before computing them,
    and the outputs are committed together only at the end, so a failure at any point leaves nothing
    behind once :meth:`discard` has released the reservations and dropped the intermediates.

    Args:
        request: the program; checked whole on construction, before anything is computed.
        backend: the worker's compute.
        registry: the agent's buffers.
        cancelled: the caller's flag; the commit keeps nothing once it is set.

    Raises:
        RpcRefusal: on construction, as :func:`run_program` says, for anything wrong with the request.
    """

    def __init__(
        self,
        request: agent_pb2.ExecuteRequest,
        *,
        backend: ArrayBackend,
        registry: BufferRegistry,
        cancelled: threading.Event,
        allow_kernels: bool = False,
        fuse_kernels: bool = False,
    ) -> None:
        registry.check_worker(request.worker)
        self._expected = check_request(request, registry)
        self._allow_kernels = allow_kernels
        self._generate = fuse_kernels and backend.name == "cupy"
        self._request = request
        self._ops = request.ops
        self._backend = backend
        self._registry = registry
        self._cancelled = cancelled
        self._dropped = set(request.free)
        self._fetched = set(request.fetch)
        fused = backend.name == "numpy" or self._generate
        self._runs = plan_runs(self._ops, self._expected, self._dropped, self._fetched) if fused else {}
        # The index of the last op that reads each buffer, so that "is it read after op i" costs one look-up
        # (scanning the later ops instead made a program of n ops cost n^2: 4 s for 4,000 small ops).
        self._last_read: dict[str, int] = {}
        if fused:
            for index, op in enumerate(self._ops):
                for buffer_id in buffer_reads(op):
                    self._last_read[buffer_id] = index
        self._index = 0
        self._local: dict[str, Any] = {}
        self._reservations: list[Reservation] = []

    @property
    def done(self) -> bool:
        """Whether every op has run."""
        return self._index >= len(self._ops)

    def step(self) -> None:
        """Reserve the next op's output and compute it, or a whole fused run's.

        Raises:
            RpcRefusal: ``out-of-memory`` (over the limit, or the device's), ``kernel-failed``,
                ``bad-request``, ``buffer-not-found``.
        """
        start = self._index
        run = self._runs.get(start)
        end = run.end if run is not None else start + 1
        for op in self._ops[start:end]:
            for output in op_outputs(op):
                self._reservations.append(
                    self._registry.reserve(
                        worker=self._request.worker,
                        buffer_id=output,
                        nbytes=self._expected[output].nbytes,
                        session=self._request.session,
                    )
                )
        op = self._ops[start]
        if op.op in COMPOUND:
            self._step_compound(op)
            self._index = end
            return
        if run is not None and self._generate:
            self._step_generated(run)
            self._index = end
            return
        with device_errors(self._backend, self._request.worker):
            if run is not None:
                self._local.update(
                    run_fused(
                        self._backend.xp,
                        self._ops,
                        run,
                        self._expected,
                        resolve=self._operand,
                        needed_whole=functools.partial(self._needed_whole, end=end),
                        kernel_errors=self._backend.kernel_errors,
                    )
                )
            else:
                self._apply(self._ops[start])
        self._index = end

    def _apply(self, op: agent_pb2.Op) -> None:
        """One (non-compound) op, unfused."""
        self._local[op.output] = apply_op(
            self._backend.xp,
            op.op,
            [self._operand(item) for item in op.inputs],
            self._expected[op.output],
            args=op_args(op),
            kernel_errors=self._backend.kernel_errors,
        )

    def _step_generated(self, run: Run) -> None:
        """A run on a CuPy worker as one generated kernel (:mod:`gpupool.agent.cufuse`), then its folded
        reduction as an op; op by op where the chain cannot be generated or does not compile."""
        chain = self._ops[run.start : run.stop]
        with device_errors(self._backend, self._request.worker):
            generated = generate(
                chain,
                self._expected,
                dtype_of=lambda buffer_id: self._buffer(buffer_id).dtype,
                needed=functools.partial(self._needed_whole, end=run.stop),
            )
            outputs = None
            if generated is not None:
                outputs = run_generated(self._backend, generated, self._expected, resolve=self._buffer)
            if outputs is None:
                for op in chain:
                    self._apply(op)
            else:
                self._local.update(outputs)
            if run.folds:
                self._apply(self._ops[run.stop])

    def _step_compound(self, op: agent_pb2.Op) -> None:
        """Run a loop (or a kernel), its body's scratch memory reserved while it runs."""
        scratch = scratch_bytes(op, check_op)
        reservation = None
        if scratch:
            reservation = self._registry.reserve(
                worker=self._request.worker,
                buffer_id=f"{op_outputs(op)[0]}~scratch",
                nbytes=scratch,
                session=self._request.session,
            )
        names = op_outputs(op)
        try:
            expects = [self._expected[name] for name in names]
            with device_errors(self._backend, self._request.worker):
                inputs = [self._operand(item) for item in op.inputs]
                if op.op == "kernel":
                    results = self._kernel(op, inputs, expects)
                else:
                    results = run_loop(
                        op,
                        inputs,
                        expects,
                        backend=self._backend,
                        outer=self._buffer,
                        checkpoint=self._checkpoint,
                        run_kernel=self._kernel,
                    )
        finally:
            if reservation is not None:
                self._registry.release(reservation)
        self._local.update(zip(names, results, strict=True))

    def _kernel(self, op: agent_pb2.Op, inputs: list[Any], expects: list[Expected]) -> list[Any]:
        return run_kernel(
            self._backend,
            op.kernel,
            inputs,
            expects,
            allowed=self._allow_kernels,
            axes=op.axes,
            keepdims=op.keepdims,
        )

    def _checkpoint(self) -> None:
        if self._cancelled.is_set():
            raise ProgramCancelled()

    def _buffer(self, buffer_id: str) -> Any:
        if buffer_id in self._local:
            return self._local[buffer_id]
        return self._registry.get(buffer_id, worker=self._request.worker).array

    def commit(self) -> agent_pb2.ExecuteReply:
        """Wait for the device, fetch, keep the outputs not freed, and free what the request frees.

        Raises:
            RpcRefusal: ``out-of-memory`` or ``kernel-failed`` from the device.
            ProgramCancelled: the caller gave up first; nothing is kept.
        """
        with device_errors(self._backend, self._request.worker):
            self._backend.synchronize()
            fetched = [self._fetch(buffer_id) for buffer_id in self._request.fetch]
        keep = [
            (reservation, self._local[reservation.buffer_id])
            for reservation in self._reservations
            if reservation.buffer_id not in self._dropped
        ]
        if keep and not self._registry.commit_all(keep, unless=self._cancelled):
            raise ProgramCancelled()
        if self._cancelled.is_set() and not keep:
            raise ProgramCancelled()
        self._registry.free(buffer_id for buffer_id in self._dropped if buffer_id not in self._expected)
        worker = self._request.worker
        return agent_pb2.ExecuteReply(fetched=fetched, memory_used=self._registry.usage(worker).used)

    def discard(self) -> None:
        """Release every reservation not committed and drop the intermediates (idempotent)."""
        for reservation in self._reservations:
            self._registry.release(reservation)  # a no-op for the committed ones
        self._reservations.clear()
        self._local.clear()

    def _operand(self, item: agent_pb2.Operand) -> Any:
        kind = item.WhichOneof("kind")
        if kind == "buffer":
            return self._buffer(item.buffer)
        if kind == "scalar":
            return scalar_value(item.scalar)
        if kind == "constant":
            return self._backend.to_device(constant_array(item.constant))
        raise RpcRefusal("bad-request", "an operand names neither a buffer, a scalar nor a constant")

    def _fetch(self, buffer_id: str) -> agent_pb2.Fetched:
        if buffer_id in self._local:
            array = self._local[buffer_id]
        else:
            array = self._registry.get(buffer_id, worker=self._request.worker).array
        host = self._backend.to_host(array)
        return agent_pb2.Fetched(
            buffer_id=buffer_id, meta=meta_of(host.dtype, tuple(host.shape)), data=host.tobytes()
        )

    def _needed_whole(self, buffer_id: str, *, end: int) -> bool:
        """Whether a fused run's output must exist in full: kept, fetched, or read by a later op."""
        if buffer_id not in self._dropped or buffer_id in self._fetched:
            return True
        return self._last_read.get(buffer_id, -1) >= end


@contextlib.contextmanager
def device_errors(backend: ArrayBackend, worker: int) -> Iterator[None]:
    """The backend's out-of-memory and kernel errors as refusals (``out-of-memory``, ``kernel-failed``)."""
    try:
        yield
    except backend.out_of_memory_errors as exc:
        message = f"worker {worker}: the device ran out of memory: {exc}"
        raise RpcRefusal("out-of-memory", message) from exc
    except backend.kernel_errors as exc:
        raise RpcRefusal("kernel-failed", f"worker {worker}: {type(exc).__name__}: {exc}") from exc


def forget_frames(error: BaseException) -> None:
    """Clear the variables of the finished frames that ``error``, its causes and contexts passed through.

    An exception keeps its traceback, and the traceback every frame it left with all their variables: a
    failed program's operands and intermediates, an upload's half-filled array. Kept anywhere (a gRPC
    call's state holds the error it aborted with, in a reference cycle that waits for the cyclic
    collector), it would keep that memory too. Frames still running are left as they are.
    """
    pending = [error]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)
        pending.extend(chained for chained in (current.__cause__, current.__context__) if chained is not None)


def check_op(op: agent_pb2.Op) -> list[tuple[str, Expected]]:
    """An op checked whole (a kernel's source and options too); its outputs and declared results."""
    return check_any(op, check_kernel=_check_kernel)


def _check_kernel(op: agent_pb2.Op) -> None:
    check_kernel(op.kernel, len(op.inputs), len(op_outputs(op)))


def check_request(request: agent_pb2.ExecuteRequest, registry: BufferRegistry) -> dict[str, Expected]:
    """Every output's declared result, after checking the whole request; nothing computed yet."""
    expected: dict[str, Expected] = {}
    for op in request.ops:
        for output, result in check_op(op):
            if output in expected or registry.contains(output):
                raise RpcRefusal("buffer-exists", f"buffer {output} already exists", buffer_id=output)
            expected[output] = result
    fetch_bytes = 0
    for buffer_id in request.fetch:
        if buffer_id in expected:
            fetch_bytes += expected[buffer_id].nbytes
        else:
            fetch_bytes += registry.get(buffer_id, worker=request.worker).nbytes
    if fetch_bytes > FETCH_LIMIT:
        raise RpcRefusal(
            "bad-request",
            f"fetch of {fetch_bytes} bytes is over the {FETCH_LIMIT}-byte inline limit; download instead",
        )
    return expected

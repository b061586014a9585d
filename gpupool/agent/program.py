"""Running one Execute request: a small program of ops over a worker's buffers, all or nothing.

:func:`run_program` runs in the worker's own thread (see :class:`~gpupool.agent.backend.ArrayBackend`).
It checks the whole request before computing anything, reserves each output's memory before its op
runs, and commits the outputs only once every op, the device synchronisation and the fetch succeeded;
on any failure, or if the caller gave up (``cancelled``), it releases everything it reserved, so a
failing program leaves nothing behind.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, Final

from gpupool._proto.v1 import agent_pb2
from gpupool.agent.backend import ArrayBackend
from gpupool.agent.buffers import BufferRegistry, Reservation
from gpupool.agent.fusion import plan_runs, run_fused
from gpupool.agent.ops import Expected, apply_op, arity, constant_array, expected_result, scalar_value
from gpupool.protocol.codec import meta_of
from gpupool.protocol.errors import RpcRefusal

__all__ = ["FETCH_LIMIT", "SMALL_ELEMENTS", "ProgramCancelled", "is_small", "run_program"]

#: Most bytes an Execute returns inline (docs/contracts.md); larger results are downloaded.
FETCH_LIMIT: Final = 16 << 20


#: A program whose results hold at most this many elements in all runs without a thread hop (NumPy).
SMALL_ELEMENTS: Final = 1 << 14


def is_small(request: agent_pb2.ExecuteRequest, resident_nbytes: Callable[[str], int]) -> bool:
    """Whether ``request`` is cheap enough to run on the agent's event loop (see ``Worker.call``): no
    matmul, and its results and the resident buffers it reads hold few elements in all."""
    produced: set[str] = set()
    budget = SMALL_ELEMENTS * 8  # bytes, counting float64
    for op in request.ops:
        if op.op == "matmul":
            return False
        for item in op.inputs:
            if item.WhichOneof("kind") == "buffer" and item.buffer not in produced:
                budget -= resident_nbytes(item.buffer)
        count = 8
        for n in op.expect.shape:
            count *= n
        budget -= count
        if budget < 0:
            return False
        produced.add(op.output)
    return True


class ProgramCancelled(Exception):
    """The caller gave up on the program before it committed; nothing was kept."""


def run_program(
    request: agent_pb2.ExecuteRequest,
    *,
    backend: ArrayBackend,
    registry: BufferRegistry,
    cancelled: threading.Event | None = None,
) -> agent_pb2.ExecuteReply:
    """Run ``request`` on ``backend`` (its worker's thread), then fetch, then free.

    Raises:
        RpcRefusal: ``bad-request`` (malformed op, wrong result shape, fetch over :data:`FETCH_LIMIT`),
            ``buffer-not-found``, ``buffer-exists``, ``out-of-memory``, ``kernel-failed``,
            ``not-accepting`` (no such worker). Nothing the program created is kept.
        ProgramCancelled: ``cancelled`` was set before the outputs were committed.
    """
    worker = request.worker
    registry.check_worker(worker)
    expected = _check_request(request, registry)
    cancelled = cancelled or threading.Event()
    reservations: list[Reservation] = []
    local: dict[str, Any] = {}
    ops = request.ops
    dropped = set(request.free)
    runs = plan_runs(ops, expected, dropped, set(request.fetch)) if backend.name == "numpy" else {}
    try:
        try:
            index = 0
            while index < len(ops):
                if cancelled.is_set():
                    raise ProgramCancelled()
                run = runs.get(index)
                covered = ops[index : run.end] if run is not None else ops[index : index + 1]
                for op in covered:  # memory is counted as if unfused: a conservative bound
                    reservations.append(
                        registry.reserve(
                            worker=worker,
                            buffer_id=op.output,
                            nbytes=expected[op.output].nbytes,
                            session=request.session,
                        )
                    )
                if run is not None:
                    end = run.end

                    def resolve(item: agent_pb2.Operand) -> Any:
                        return _operand(item, worker, local, backend, registry)

                    def needed_whole(buffer_id: str, end: int = end) -> bool:
                        return _needed_whole(buffer_id, ops, end, dropped, request.fetch)

                    local.update(
                        run_fused(
                            backend.xp,
                            ops,
                            run,
                            expected,
                            resolve=resolve,
                            needed_whole=needed_whole,
                            kernel_errors=backend.kernel_errors,
                        )
                    )
                    index = end
                    continue
                op = ops[index]
                operands = [_operand(item, worker, local, backend, registry) for item in op.inputs]
                local[op.output] = apply_op(
                    backend.xp,
                    op.op,
                    operands,
                    expected[op.output],
                    axis=op.axis if op.has_axis else None,
                    kernel_errors=backend.kernel_errors,
                )
                del operands
                index += 1
            backend.synchronize()
            fetched = [_fetch(buffer_id, worker, local, backend, registry) for buffer_id in request.fetch]
        except backend.out_of_memory_errors as exc:
            raise RpcRefusal(
                "out-of-memory", f"worker {worker}: the device ran out of memory: {exc}"
            ) from exc
        except backend.kernel_errors as exc:
            raise RpcRefusal("kernel-failed", f"worker {worker}: {type(exc).__name__}: {exc}") from exc
        keep = [
            (reservation, local[reservation.buffer_id])
            for reservation in reservations
            if reservation.buffer_id not in dropped
        ]
        if keep and not registry.commit_all(keep, unless=cancelled):
            raise ProgramCancelled()
        if cancelled.is_set() and not keep:
            raise ProgramCancelled()
        registry.free(buffer_id for buffer_id in dropped if buffer_id not in expected)
    finally:
        for reservation in reservations:
            registry.release(reservation)  # a no-op for the committed ones
    return agent_pb2.ExecuteReply(fetched=fetched, memory_used=registry.usage(worker).used)


def _check_request(request: agent_pb2.ExecuteRequest, registry: BufferRegistry) -> dict[str, Expected]:
    """Every output's declared result, after checking the whole request; nothing computed yet."""
    expected: dict[str, Expected] = {}
    for op in request.ops:
        needed = arity(op.op)
        if len(op.inputs) != needed:
            raise RpcRefusal("bad-request", f"op {op.op!r} takes {needed} operand(s), got {len(op.inputs)}")
        if not op.output:
            raise RpcRefusal("bad-request", f"op {op.op!r} names no output buffer")
        if op.output in expected or registry.contains(op.output):
            raise RpcRefusal("buffer-exists", f"buffer {op.output} already exists", buffer_id=op.output)
        expected[op.output] = expected_result(op)
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


def _operand(
    item: agent_pb2.Operand,
    worker: int,
    local: dict[str, Any],
    backend: ArrayBackend,
    registry: BufferRegistry,
) -> Any:
    kind = item.WhichOneof("kind")
    if kind == "buffer":
        if item.buffer in local:
            return local[item.buffer]
        return registry.get(item.buffer, worker=worker).array
    if kind == "scalar":
        return scalar_value(item.scalar)
    if kind == "constant":
        return backend.to_device(constant_array(item.constant))
    raise RpcRefusal("bad-request", "an operand names neither a buffer, a scalar nor a constant")


def _fetch(
    buffer_id: str, worker: int, local: dict[str, Any], backend: ArrayBackend, registry: BufferRegistry
) -> agent_pb2.Fetched:
    array = local[buffer_id] if buffer_id in local else registry.get(buffer_id, worker=worker).array
    host = backend.to_host(array)
    return agent_pb2.Fetched(
        buffer_id=buffer_id, meta=meta_of(host.dtype, tuple(host.shape)), data=host.tobytes()
    )


def _needed_whole(
    buffer_id: str, ops: Sequence[agent_pb2.Op], end: int, dropped: set[str], fetch: Sequence[str]
) -> bool:
    """Whether a fused run's output must exist in full: kept, fetched, or read by a later op."""
    if buffer_id not in dropped or buffer_id in fetch:
        return True
    return any(item.buffer == buffer_id for op in ops[end:] for item in op.inputs)

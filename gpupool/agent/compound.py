"""Ops that hold other ops or code, and may have several results: ``fori_loop`` (a counted loop run on the
agent, :func:`run_loop`) and ``kernel`` (a user's CuPy kernel, :mod:`gpupool.agent.kernels`).

A compound op names its results in ``outputs`` with their declarations in ``expects`` (``output`` and
``expect`` stay empty). A loop's body is a list of ops over the carried values (bound, each trip, to the
names in ``loop.carry``), the trip number (``loop.counter``, a 0-d int64) and the program's buffers; the
body's own outputs live only inside the loop. Everything is checked before anything runs
(:func:`check_compound`), and the body's ops are the agent's ordinary ops, so a loop can do nothing a
program of the same ops could not, only without a round trip per trip.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from gpupool._proto.v1 import agent_pb2
from gpupool.agent.backend import ArrayBackend
from gpupool.agent.ops import (
    Expected,
    apply_op,
    check_op,
    constant_array,
    expected_of,
    expected_result,
    op_args,
    scalar_value,
)
from gpupool.protocol.codec import op_outputs, op_results
from gpupool.protocol.errors import RpcRefusal

__all__ = [
    "COMPOUND",
    "MAX_BODY_OPS",
    "MAX_NESTING",
    "MAX_TRIPS",
    "buffer_reads",
    "check_any",
    "compound_work",
    "run_loop",
]

#: The compound ops.
COMPOUND: Final = frozenset({"fori_loop", "kernel"})
#: Most trips of one loop, ops in one body, and loops inside loops.
MAX_TRIPS: Final = 1 << 31
MAX_BODY_OPS: Final = 4096
MAX_NESTING: Final = 4


def check_any(
    op: agent_pb2.Op, *, depth: int = 0, check_kernel: Callable[[agent_pb2.Op], None] | None = None
) -> list[tuple[str, Expected]]:
    """Check ``op`` (compound or not) before anything runs; its outputs and their declared results.

    Args:
        check_kernel: checks a kernel op's source and options; None refuses kernels.

    Raises:
        RpcRefusal: bad-request for anything malformed.
    """
    if op.op not in COMPOUND:
        check_op(op)
        if not op.output:
            raise RpcRefusal("bad-request", f"op {op.op!r} names no output buffer")
        if op.outputs or op.expects:
            raise RpcRefusal("bad-request", f"op {op.op!r} has one result: outputs and expects are not its")
        return [(op.output, expected_result(op))]
    if op.op == "kernel" and not op.outputs:  # one result, declared as any op's
        if not op.output:
            raise RpcRefusal("bad-request", "a kernel op names no output buffer")
        if check_kernel is None:
            raise RpcRefusal("bad-request", "this agent does not run kernels")
        check_kernel(op)
        return [(op.output, expected_result(op))]
    if not op.outputs or len(op.outputs) != len(op.expects) or op.output or op.HasField("expect"):
        raise RpcRefusal(
            "bad-request",
            f"op {op.op!r} names its results in outputs, with as many expects, and no output or expect",
        )
    if len(set(op.outputs)) != len(op.outputs) or not all(op.outputs):
        raise RpcRefusal("bad-request", f"op {op.op!r}: outputs must be distinct, non-empty buffer ids")
    results = [(name, expected_of(meta, op=op.op, output=name)) for name, meta in op_results(op)]
    if op.op == "kernel":
        if check_kernel is None:
            raise RpcRefusal("bad-request", "this agent does not run kernels")
        check_kernel(op)
        return results
    _check_loop(op, [expected for _, expected in results], depth, check_kernel)
    return results


def _check_loop(
    op: agent_pb2.Op,
    final: Sequence[Expected],
    depth: int,
    check_kernel: Callable[[agent_pb2.Op], None] | None,
) -> None:
    if depth >= MAX_NESTING:
        raise RpcRefusal("bad-request", f"loops nest at most {MAX_NESTING} deep")
    if not op.HasField("loop"):
        raise RpcRefusal("bad-request", "a fori_loop op carries no loop")
    loop = op.loop
    carried = len(op.inputs)
    if not carried == len(loop.carry) == len(loop.next) == len(final):
        raise RpcRefusal(
            "bad-request",
            f"a loop carries {carried} values in, {len(loop.carry)} names, {len(loop.next)} next and "
            f"{len(final)} out: they must agree",
        )
    if not 0 <= loop.trips <= MAX_TRIPS:
        raise RpcRefusal("bad-request", f"a loop runs 0 to {MAX_TRIPS} trips, not {loop.trips}")
    if len(loop.body) > MAX_BODY_OPS:
        raise RpcRefusal("bad-request", f"a loop body holds at most {MAX_BODY_OPS} ops")
    names = [*loop.carry, *([loop.counter] if loop.counter else [])]
    if len(set(names)) != len(names) or not all(names):
        raise RpcRefusal("bad-request", "a loop's carry and counter names must be distinct and non-empty")
    scope: dict[str, Expected] = dict(zip(loop.carry, final, strict=True))
    for body_op in loop.body:
        for name, expected in check_any(body_op, depth=depth + 1, check_kernel=check_kernel):
            if name in scope or name == loop.counter:
                raise RpcRefusal("bad-request", f"a loop body makes {name!r} twice, or over a carried name")
            scope[name] = expected
    for index, (name, want) in enumerate(zip(loop.next, final, strict=True)):
        got = scope.get(name)
        if got is None:
            raise RpcRefusal(
                "bad-request", f"loop next {name!r} is neither a body output nor a carried value"
            )
        if (got.dtype, got.shape) != (want.dtype, want.shape):
            raise RpcRefusal(
                "bad-request",
                f"loop carry {index} would change from {want.dtype.name}{list(want.shape)} to "
                f"{got.dtype.name}{list(got.shape)} in a trip",
            )


def buffer_reads(op: agent_pb2.Op) -> Iterator[str]:
    """The program's buffers ``op`` reads: its buffer inputs, and what its loop body reads from outside."""
    for item in op.inputs:
        if item.WhichOneof("kind") == "buffer":
            yield item.buffer
    if op.op == "fori_loop":
        inside = {*op.loop.carry, op.loop.counter}
        for body_op in op.loop.body:
            for name in buffer_reads(body_op):
                if name not in inside:
                    yield name
            inside.update(op_outputs(body_op))


def scratch_bytes(op: agent_pb2.Op, expected: Callable[[agent_pb2.Op], list[tuple[str, Expected]]]) -> int:
    """Memory a loop's body may hold at once, besides the loop's outputs: every body output's (a bound)."""
    if op.op != "fori_loop":
        return 0
    total = 0
    for body_op in op.loop.body:
        total += sum(item.nbytes for _, item in expected(body_op)) + scratch_bytes(body_op, expected)
    return total


def compound_work(op: agent_pb2.Op, op_work: Callable[[agent_pb2.Op], tuple[int, int]]) -> tuple[int, int]:
    """(bytes touched, flops) of a compound op, for deadlines: a loop's body's work times its trips."""
    if op.op != "fori_loop":
        metas = list(op.expects) or [op.expect]
        elements = sum(max(math.prod(meta.shape), 0) for meta in metas)
        return elements * 8 * (1 + len(op.inputs)), elements
    touched = flops = 0
    for body_op in op.loop.body:
        step = compound_work(body_op, op_work) if body_op.op in COMPOUND else op_work(body_op)
        touched += step[0]
        flops += step[1]
    trips = max(op.loop.trips, 0)
    return touched * trips, flops * trips


def run_loop(
    op: agent_pb2.Op,
    init: Sequence[Any],
    expects: Sequence[Expected],
    *,
    backend: ArrayBackend,
    outer: Callable[[str], Any],
    checkpoint: Callable[[], None],
    run_kernel: Callable[[agent_pb2.Op, list[Any], list[Expected]], list[Any]] | None = None,
) -> list[Any]:
    """Run a checked ``fori_loop`` op: its final carried values.

    Args:
        init: the op's inputs, resolved (arrays of the declared dtypes and shapes).
        expects: the declared results.
        outer: a program buffer by id (resident, or made earlier in the program).
        checkpoint: called before each trip; raises to stop the loop (the caller gave up).
        run_kernel: runs a kernel op of the body; None where kernels are refused (checked already).

    Raises:
        RpcRefusal: bad-request (an initial value of another dtype or shape than declared), and what the
            body's ops raise.
    """
    xp = backend.xp
    loop = op.loop
    for index, (value, want) in enumerate(zip(init, expects, strict=True)):
        shape = tuple(getattr(value, "shape", ()))
        dtype = getattr(value, "dtype", None)
        if shape != want.shape or dtype != want.dtype:
            raise RpcRefusal(
                "bad-request",
                f"loop carry {index} starts as {getattr(dtype, 'name', type(value).__name__)}{list(shape)}, "
                f"not the declared {want.dtype.name}{list(want.shape)}",
            )
    declared = {
        name: item
        for body_op in loop.body
        for name, item in check_any(body_op, depth=1, check_kernel=_checked)
    }
    steps = [_prepare(body_op, declared, backend) for body_op in loop.body]
    carry = list(init)
    for trip in range(loop.trips):
        checkpoint()
        scope: dict[str, Any] = dict(zip(loop.carry, carry, strict=True))
        if loop.counter:
            scope[loop.counter] = np.int64(trip)
        for step in steps:
            operands = [
                (scope[value] if value in scope else outer(value)) if named else value
                for named, value in step.inputs
            ]
            if step.op.op == "fori_loop":
                results = run_loop(
                    step.op,
                    operands,
                    step.expects,
                    backend=backend,
                    outer=functools.partial(_lookup, scope, outer),
                    checkpoint=checkpoint,
                    run_kernel=run_kernel,
                )
                scope.update(zip(step.outputs, results, strict=True))
            elif step.op.op == "kernel":
                if run_kernel is None:
                    raise RpcRefusal("bad-request", "this agent does not run kernels")
                scope.update(zip(step.outputs, run_kernel(step.op, operands, step.expects), strict=True))
            else:
                # Inside the loop a result may view another value (a transpose, a slice): nothing outside
                # sees it; the loop's results are made to own their memory below.
                scope[step.outputs[0]] = apply_op(
                    xp,
                    step.op.op,
                    operands,
                    step.expects[0],
                    args=step.args,
                    kernel_errors=backend.kernel_errors,
                    own_memory=False,
                )
        carry = [scope[name] for name in loop.next]
    # A result must own C-contiguous memory: not be one of the inputs (no trips, a value carried
    # unchanged) or a view of another value, as any op's result.
    return [
        xp.array(value, copy=True, order="C")
        if any(value is item for item in init)
        or getattr(value, "base", None) is not None
        or not value.flags.c_contiguous
        else value
        for value in carry
    ]


@dataclass(frozen=True, slots=True)
class _Step:
    """A body op made ready once for every trip: its operands (``(True, name)`` to look up, ``(False,
    value)`` as they are), its parsed parameters, its results and their declarations."""

    op: agent_pb2.Op
    inputs: tuple[tuple[bool, Any], ...]
    args: Any
    outputs: tuple[str, ...]
    expects: list[Expected]


def _prepare(op: agent_pb2.Op, declared: dict[str, Expected], backend: ArrayBackend) -> _Step:
    inputs: list[tuple[bool, Any]] = []
    for item in op.inputs:
        kind = item.WhichOneof("kind")
        if kind == "buffer":
            inputs.append((True, item.buffer))
        elif kind == "scalar":
            inputs.append((False, scalar_value(item.scalar)))
        elif kind == "constant":
            inputs.append((False, backend.to_device(constant_array(item.constant))))
        else:
            raise RpcRefusal("bad-request", "an operand names neither a buffer, a scalar nor a constant")
    outputs = tuple(op_outputs(op))
    args = op_args(op) if op.op not in COMPOUND else None
    return _Step(op, tuple(inputs), args, outputs, [declared[name] for name in outputs])


def _lookup(scope: dict[str, Any], outer: Callable[[str], Any], name: str) -> Any:
    return scope[name] if name in scope else outer(name)


def _checked(op: agent_pb2.Op) -> None:
    """Re-checking a body already checked whole: kernels passed then."""

"""Arrays created on the pool: ``gp.zeros``, ``gp.full``, ``gp.arange``, ``gp.*_like``, ``gp.asarray``.

Nothing but the shape, dtype and a few scalars leaves the client: the coordinator places the rows
(:meth:`~gpupool.client.session.Session.place`), then one program per shard has its agent fill the shard
(the op table's ``full`` and ``arange``; ``random_uniform`` and ``random_normal`` for
:mod:`gpupool.random`). Arrays go to the current pool (:func:`~gpupool.client.current.current_pool`); a
``*_like`` of a remote array goes to that array's pool, with its layout, so the two meet shard by shard.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np

from gpupool._errors import UsageError
from gpupool._proto.v1 import agent_pb2
from gpupool.client.array import RemoteArray, from_spec
from gpupool.client.current import current_pool
from gpupool.client.graph import ArraySpec, Program, make_op, run_programs
from gpupool.client.layout import Piece
from gpupool.client.operands import (
    INLINE_LIMIT,
    buffer_operand,
    constant_operand,
    is_scalar,
    scalar_operand,
)
from gpupool.client.session import Session
from gpupool.protocol.codec import check_dtype

__all__ = [
    "ShapeLike",
    "Step",
    "arange",
    "asarray",
    "create",
    "create_by_steps",
    "empty",
    "empty_like",
    "eye",
    "full",
    "full_like",
    "linspace",
    "normalize_shape",
    "ones",
    "ones_like",
    "zeros",
    "zeros_like",
]

#: A shape as NumPy takes one: an int (1-D) or a sequence of ints.
ShapeLike: TypeAlias = "int | Sequence[int]"
#: The operands of a creation op on one shard.
ShardOperands: TypeAlias = Callable[[Piece], Sequence[agent_pb2.Operand]]
#: The params of a creation op on one shard, from its index in the layout.
ShardParams: TypeAlias = Callable[[int, Piece], Sequence[int]]


def normalize_shape(shape: ShapeLike) -> tuple[int, ...]:
    """``shape`` as a tuple, as NumPy reads it.

    Raises:
        UsageError: a negative dimension, or a 0-d shape (rows are sharded: arrays on the pool have at
            least one dimension, for now).
        TypeError: not an int or a sequence of ints.
    """
    dims = (operator.index(shape),) if not isinstance(shape, Sequence) else tuple(map(operator.index, shape))
    if any(n < 0 for n in dims):
        raise UsageError(f"negative dimensions are not allowed (shape {dims})")
    if not dims:
        raise UsageError("arrays created on the pool need at least one dimension (rows are sharded)")
    return dims


@dataclass(frozen=True, slots=True)
class Step:
    """One op of a shard's program: its operands are the results of the ``takes`` steps before it (in
    order), then ``operands``; it makes an array of ``dtype`` and ``shape`` (the last step's is the
    shard's)."""

    op: str
    operands: Sequence[agent_pb2.Operand]
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    params: Sequence[int] = ()
    takes: int = 1


#: The steps that make one shard, from its index in the layout and its piece.
ShardSteps: TypeAlias = Callable[[int, Piece], Sequence[Step]]


def create(
    session: Session,
    shape: tuple[int, ...],
    dtype: np.dtype[Any],
    op: str,
    operands: ShardOperands,
    *,
    params: ShardParams | None = None,
    layout: Sequence[Piece] | None = None,
) -> RemoteArray:
    """A resident array whose shards the agents make with the creation op ``op``, one program per shard.

    Args:
        session: the pool's session.
        shape, dtype: the array's.
        op: a creation op of the agents' op table.
        operands: each shard's operands.
        params: each shard's params (by its index in the layout and its piece), if the op takes some.
        layout: the places and rows to use (new buffers are made there); default: the coordinator's.

    Raises:
        As :func:`create_by_steps`.
    """

    def steps(index: int, piece: Piece) -> list[Step]:
        rows = (piece.stop - piece.start, *shape[1:])
        given = params(index, piece) if params is not None else ()
        return [Step(op, operands(piece), dtype, rows, given, takes=0)]

    return create_by_steps(session, shape, dtype, steps, layout=layout)


def create_by_steps(
    session: Session,
    shape: tuple[int, ...],
    dtype: np.dtype[Any],
    steps: ShardSteps,
    *,
    layout: Sequence[Piece] | None = None,
) -> RemoteArray:
    """A resident array whose shards the agents make with a chain of ops each (intermediates freed in the
    same program); see :func:`create`.

    Raises:
        NoCapacity, PlacementError: the pool cannot take it.
        DeviceOutOfMemory, RemoteError: an agent refused its shard (nothing is left behind).
    """
    session.check_open()
    if layout is None:
        pieces = session.place(shape, dtype)
    else:
        pieces = [piece.with_buffer(session.new_buffer_id()) for piece in layout]
    programs: list[Program] = []
    for index, piece in enumerate(pieces):
        program = Program(piece, creates=[piece])
        chain = list(steps(index, piece))
        made: list[agent_pb2.Operand] = []
        for number, step in enumerate(chain):
            last = number == len(chain) - 1
            out = piece.buffer_id if last else session.new_buffer_id()
            inputs = [*made[len(made) - step.takes :], *step.operands]
            message = make_op(step.op, inputs, out, step.dtype, step.shape)
            message.params.extend(step.params)
            program.ops.append(message)
            program.work_bytes += math.prod(step.shape) * step.dtype.itemsize
            if not last:
                program.free.append(out)
            made.append(buffer_operand(out))
        programs.append(program)
    run_programs(session, programs, what="create")
    return from_spec(ArraySpec(session=session, shape=shape, dtype=dtype, layout=tuple(pieces)))


def _fill_operands(fill_value: object, shape: tuple[int, ...], dtype: np.dtype[Any]) -> ShardOperands:
    """Each shard's fill value: a scalar, or a small array broadcast to the shape (sliced by rows when it
    has the rows' axis).

    Raises:
        OverflowError: NumPy's, for a Python int ``dtype`` cannot hold (-1 as uint8).
    """
    if is_scalar(fill_value):
        np.full((), fill_value, dtype)  # numpy.full's refusals (and warnings) here, not the agent's
        operand = scalar_operand(fill_value)
        return lambda piece: [operand]
    host = np.asarray(fill_value)
    check_dtype(host.dtype)
    try:
        broadcast = np.broadcast_shapes(host.shape, shape)
    except ValueError:
        broadcast = None
    if broadcast != shape:
        raise UsageError(f"a fill value of shape {host.shape} does not broadcast to shape {shape}")
    if host.nbytes > INLINE_LIMIT:
        raise UsageError(f"a fill value of {host.nbytes} bytes is too large to send: use gp.asarray")
    if host.ndim == len(shape) and host.shape[0] != 1:
        return lambda piece: [constant_operand(host[piece.start : piece.stop])]
    operand = constant_operand(host)
    return lambda piece: [operand]


def _new(shape: ShapeLike, fill_value: object, dtype: object) -> RemoteArray:
    dims = normalize_shape(shape)
    target = check_dtype(dtype)
    operands = _fill_operands(fill_value, dims, target)
    return create(current_pool()._session, dims, target, "full", operands)


def full(shape: ShapeLike, fill_value: object, dtype: object = None) -> RemoteArray:
    """An array of ``fill_value`` (a scalar, or an array that broadcasts to ``shape``) on the current
    pool, made there: as ``numpy.full``, the dtype defaults to the fill value's.

    Raises:
        UnsupportedDType: a dtype gpupool does not carry (before anything is sent).
        UsageError: a negative or 0-d shape, or a fill value that does not broadcast.
        NoCapacity, PlacementError, RemoteError: the pool cannot take it.
    """
    return _new(shape, fill_value, np.asarray(fill_value).dtype if dtype is None else dtype)


def zeros(shape: ShapeLike, dtype: object = np.float64) -> RemoteArray:
    """An array of zeros on the current pool, made there (see :func:`full`)."""
    return _new(shape, 0, dtype)


def ones(shape: ShapeLike, dtype: object = np.float64) -> RemoteArray:
    """An array of ones on the current pool, made there (see :func:`full`)."""
    return _new(shape, 1, dtype)


def empty(shape: ShapeLike, dtype: object = np.float64) -> RemoteArray:
    """An array on the current pool whose values are not to be relied on (zeros today; see :func:`full`)."""
    return _new(shape, 0, dtype)


def full_like(
    a: object, fill_value: object, dtype: object = None, shape: ShapeLike | None = None
) -> RemoteArray:
    """An array of ``fill_value`` with ``a``'s shape and dtype (unless given), as ``numpy.full_like``.

    For a remote ``a`` (and its shape), it is made on ``a``'s pool with ``a``'s layout, so the two meet shard
    by shard; for host data, on the current pool. Raises as :func:`full`.
    """
    if isinstance(a, RemoteArray):
        a.check()
        like_shape, like_dtype = a.shape, a.dtype
    else:
        host = np.asarray(a)
        like_shape, like_dtype = host.shape, host.dtype
    target = check_dtype(like_dtype if dtype is None else dtype)
    dims = like_shape if shape is None else normalize_shape(shape)
    if isinstance(a, RemoteArray) and dims == a.shape:
        operands = _fill_operands(fill_value, dims, target)
        return create(a.session, dims, target, "full", operands, layout=a.layout)
    return _new(dims, fill_value, target)


def zeros_like(a: object, dtype: object = None, shape: ShapeLike | None = None) -> RemoteArray:
    """Zeros with ``a``'s shape and dtype (unless given); see :func:`full_like`."""
    return full_like(a, 0, dtype, shape)


def ones_like(a: object, dtype: object = None, shape: ShapeLike | None = None) -> RemoteArray:
    """Ones with ``a``'s shape and dtype (unless given); see :func:`full_like`."""
    return full_like(a, 1, dtype, shape)


def empty_like(a: object, dtype: object = None, shape: ShapeLike | None = None) -> RemoteArray:
    """An array with ``a``'s shape and dtype (unless given) whose values are not to be relied on."""
    return full_like(a, 0, dtype, shape)


def arange(start: object, stop: object = None, step: object = None, dtype: object = None) -> RemoteArray:
    """Evenly spaced values in ``[start, stop)``, as ``numpy.arange``, made on the current pool's agents
    (each shard computes its own, exactly as NumPy fills them on NumPy agents).

    The dtype defaults to NumPy's: float64 if any argument is a float, else int64.

    Raises:
        ZeroDivisionError: ``step`` is zero (as NumPy).
        UnsupportedDType, UsageError, NoCapacity, PlacementError, RemoteError: as :func:`full`.
    """
    given = [v for v in (start, stop, step) if v is not None]
    if stop is None:
        start, stop = 0, start
    if step is None:
        step = 1
    values = (start, stop, step)
    if not all(isinstance(v, bool | int | float | np.integer | np.floating) for v in values):
        raise UsageError(f"arange takes real scalars, not {', '.join(type(v).__name__ for v in values)}")
    if step == 0:
        raise ZeroDivisionError("arange: the step is zero")
    if dtype is None:
        floating = any(isinstance(v, float | np.floating) for v in given)
        dtype = np.float64 if floating else np.int64
    target = check_dtype(dtype)
    # NumPy's length: ceil((stop - start) / step), in the arguments' own arithmetic.
    length = max(0, math.ceil((stop - start) / step))  # type: ignore[operator]
    operands = [scalar_operand(start), scalar_operand(step)]
    return create(
        current_pool()._session,
        (length,),
        target,
        "arange",
        lambda piece: operands,
        params=lambda index, piece: [piece.start],
    )


def asarray(data: object, dtype: object = None, *, rows: Sequence[int] | None = None) -> RemoteArray:
    """``data`` on the current pool (uploaded, as :meth:`gpupool.Pool.asarray`, ``rows`` choosing the
    sharding); a remote array is returned as it is (converted on its agents if ``dtype`` differs).

    Raises:
        As :meth:`gpupool.Pool.asarray`.
    """
    if isinstance(data, RemoteArray):
        if rows is not None:
            raise UsageError(
                "rows= shards host data; re-shard a remote array with gp.asarray(x.get(), rows=...)"
            )
        return data if dtype is None else data.astype(dtype)
    return current_pool().asarray(data, dtype, rows=rows)


def linspace(
    start: float, stop: float, num: int = 50, endpoint: bool = True, dtype: object = None
) -> RemoteArray:
    """``num`` evenly spaced values from ``start`` to ``stop`` (scalars), as ``numpy.linspace``, made on
    the current pool's agents with NumPy's own arithmetic (index * step + start, the end point exact).

    Raises:
        UsageError: a negative ``num``, or array bounds. Otherwise as :func:`full`.
    """
    count = operator.index(num)
    if count < 0:
        raise UsageError(f"linspace: the number of samples, {count}, is negative")
    if not (is_scalar(start) and is_scalar(stop)):
        raise UsageError("linspace takes scalar bounds on the pool")
    natural = np.result_type(start, stop)
    work = check_dtype(natural if natural.kind == "f" else np.float64)
    target = work if dtype is None else check_dtype(dtype)
    div = count - 1 if endpoint else count
    delta = np.subtract(stop, start, dtype=work)
    step = delta / div if div > 0 else None
    scale = [scalar_operand(delta if step is None or step == 0 else step)]
    stop_value = constant_operand(np.asarray([stop], dtype=work))

    def steps(index: int, piece: Piece) -> list[Step]:
        rows = piece.stop - piece.start
        one = (rows,)
        first = [scalar_operand(0), scalar_operand(1)]
        chain = [Step("arange", first, work, one, [piece.start], takes=0)]
        if step is not None and step == 0:  # as NumPy, for denormal steps
            chain.append(Step("divide", [scalar_operand(div)], work, one))
        chain.append(Step("multiply", scale, work, one))
        chain.append(Step("add", [scalar_operand(start)], work, one))
        if endpoint and count > 1 and piece.stop == count and rows > 0:
            chain.append(Step("slice", [], work, (rows - 1,), [0, rows - 1, 1]))
            chain.append(Step("concatenate", [stop_value], work, one, [0]))
        if target.kind in "iu":
            chain.append(Step("floor", [], work, one))
        if target != work:
            chain.append(Step("astype", [], target, one))
        return chain

    return create_by_steps(current_pool()._session, (count,), target, steps)


def eye(N: int, M: int | None = None, k: int = 0, dtype: object = np.float64) -> RemoteArray:
    """An ``N`` by ``M`` array with ones on diagonal ``k`` and zeros elsewhere, as ``numpy.eye``, made on
    the current pool's agents (each shard compares its row indices with the column indices).

    Raises:
        UsageError: a negative dimension. Otherwise as :func:`full`.
    """
    shape = normalize_shape((N, N if M is None else M))
    target = check_dtype(dtype)
    offset = operator.index(k)
    rows_of = np.dtype(np.int64)
    flag = np.dtype(np.bool_)
    count = [scalar_operand(0), scalar_operand(1)]
    diagonal = [scalar_operand(offset), scalar_operand(1)]

    def steps(index: int, piece: Piece) -> list[Step]:
        rows = piece.stop - piece.start
        chain = [
            Step("arange", diagonal, rows_of, (rows,), [piece.start], takes=0),  # row index + k
            Step("reshape", [], rows_of, (rows, 1), [rows, 1]),
            Step("arange", count, rows_of, (shape[1],), [0], takes=0),  # column index
            Step("equal", [], flag, (rows, shape[1]), takes=2),
        ]
        if target != flag:
            chain.append(Step("astype", [], target, (rows, shape[1])))
        return chain

    return create_by_steps(current_pool()._session, shape, target, steps)

"""How array operations become programs on the agents that hold the shards.

Every operation here follows one pattern: pick the *lead* operand (the remote array whose rows the
result's rows follow), build one program per lead shard, run those concurrently, and wrap the outputs
as a new remote array with the lead's row layout. Reductions across rows fetch small partials and
combine them on the client. A program that fails anywhere frees every output the others made.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from gpupool._errors import ShapeMismatch, UsageError
from gpupool._proto.v1 import agent_pb2
from gpupool.client.operands import (
    INLINE_LIMIT,
    buffer_operand,
    constant_operand,
    is_scalar,
    scalar_operand,
)
from gpupool.client.pool import Piece, Pool
from gpupool.protocol.codec import check_dtype, meta_of

if TYPE_CHECKING:
    from gpupool.client.array import RemoteArray

__all__ = ["cast", "elementwise", "matmul", "reduce", "replicate", "run_programs"]

Operand = Callable[[Piece], agent_pb2.Operand]


@dataclass(slots=True)
class Program:
    """The ops for one lead shard, and what they create, fetch and free."""

    place: Piece
    ops: list[agent_pb2.Op] = field(default_factory=list)
    fetch: list[str] = field(default_factory=list)
    free: list[str] = field(default_factory=list)
    creates: list[Piece] = field(default_factory=list)


def run_programs(pool: Pool, programs: Sequence[Program], *, what: str) -> list[dict[str, np.ndarray]]:
    """Run programs concurrently; returns each one's fetched arrays.

    Raises:
        The first failure, after freeing what the successful programs created.
    """

    async def go() -> list[dict[str, np.ndarray]]:
        calls = [
            pool.channel(p.place.agent_id, p.place.endpoint).execute(
                p.place.worker, p.ops, session=pool.session, fetch=p.fetch, free=p.free
            )
            for p in programs
        ]
        results = await asyncio.gather(*calls, return_exceptions=True)
        await pool.raise_after_cleanup(results, [p.creates for p in programs])
        return [r for r in results if isinstance(r, dict)]

    return pool.run(go(), timeout=pool.timeouts.rpc, what=what)


def replicate(pool: Pool, host: np.ndarray, pieces: Sequence[Piece]) -> dict[tuple[str, int], str]:
    """Upload a whole copy of ``host`` to each distinct worker of ``pieces``; returns place -> buffer id."""
    first = {piece.place: piece for piece in pieces}
    copies = [
        Piece(p.agent_id, p.endpoint, p.worker, 0, host.shape[0], pool.new_buffer_id())
        for p in first.values()
    ]
    pool.run(
        pool.upload_pieces(host, copies),
        timeout=pool.timeouts.for_stream(host.nbytes * len(copies)),
        what="replicate",
    )
    return {copy.place: copy.buffer_id for copy in copies}


def _op(
    name: str,
    inputs: Sequence[agent_pb2.Operand],
    output: str,
    dtype: np.dtype[Any],
    shape: tuple[int, ...],
    axis: int | None = None,
) -> agent_pb2.Op:
    return agent_pb2.Op(
        op=name,
        inputs=inputs,
        output=output,
        expect=meta_of(dtype, shape),
        has_axis=axis is not None,
        axis=axis or 0,
    )


def _same_layout(a: RemoteArray, b: RemoteArray) -> bool:
    return [(p.place, p.start, p.stop) for p in a.pieces] == [(p.place, p.start, p.stop) for p in b.pieces]


class _Operands:
    """Per-shard operands for one operation, and the temporary buffers they needed."""

    def __init__(self, lead: RemoteArray) -> None:
        self.lead = lead
        self.temporaries: list[Piece] = []

    def of(self, value: object, *, aligned: bool) -> Operand:
        """An operand builder for ``value``: a remote array, a host array or a scalar."""
        from gpupool.client.array import RemoteArray

        if isinstance(value, RemoteArray):
            if aligned and _same_layout(value, self.lead):
                ids = {p.start: p.buffer_id for p in value.pieces}
                return lambda piece: buffer_operand(ids[piece.start])
            value = value.get()  # another layout, or a broadcast operand: bring it over once
        if is_scalar(value):
            operand = scalar_operand(value)
            return lambda piece: operand
        host = np.asarray(value, order="C")
        if not aligned:
            if host.nbytes > INLINE_LIMIT:
                raise UsageError(
                    f"a broadcast operand of {host.nbytes} bytes is too large to send with each "
                    "program; pool.asarray it with the same rows instead"
                )
            operand = constant_operand(host)
            return lambda piece: operand
        if host.nbytes <= INLINE_LIMIT:
            return lambda piece: constant_operand(host[piece.start : piece.stop])
        pool = self.lead.pool
        temps = [piece.with_buffer(pool.new_buffer_id()) for piece in self.lead.pieces]
        pool.run(
            pool.upload_pieces(host, temps), timeout=pool.timeouts.for_stream(host.nbytes), what="upload"
        )
        self.temporaries.extend(temps)
        ids = {p.start: p.buffer_id for p in temps}
        return lambda piece: buffer_operand(ids[piece.start])

    def temporaries_of(self, piece: Piece) -> list[str]:
        """Temporary buffer ids on ``piece``'s rows, freed by its program."""
        return [t.buffer_id for t in self.temporaries if t.start == piece.start and t.place == piece.place]


def _normalize(value: object) -> object:
    from gpupool.client.array import RemoteArray

    if isinstance(value, RemoteArray):
        value.check()
        return value
    if is_scalar(value):
        return value[()] if isinstance(value, np.ndarray) else value
    host = np.asarray(value)
    check_dtype(host.dtype)
    return host


def _shape(value: object) -> tuple[int, ...]:
    return tuple(getattr(value, "shape", ()))


def _probe(value: object) -> object:
    """A stand-in with the same dtype and weak/strong typing, for working out result dtypes."""
    dtype = getattr(value, "dtype", None)
    return np.zeros((), dtype) if dtype is not None and not isinstance(value, np.generic) else value


def elementwise(name: str, inputs: Sequence[object]) -> RemoteArray:
    """Apply the NumPy ufunc or function ``name`` elementwise, with NumPy broadcasting and promotion.

    Raises:
        ShapeMismatch: the operands do not broadcast, or broadcasting would move the sharded axis.
        UnsupportedDType: an operand or the result has a dtype gpupool does not carry.
        RemoteKernelError: an agent's kernel failed (e.g. integers to negative powers).
    """
    from gpupool.client.array import RemoteArray

    values = [_normalize(v) for v in inputs]
    remotes = [v for v in values if isinstance(v, RemoteArray)]
    pool = remotes[0].pool
    if any(r.pool is not pool for r in remotes):
        raise UsageError(f"{name}: operands live in different pools")
    shapes = tuple(_shape(v) for v in values)
    try:
        result_shape = np.broadcast_shapes(*shapes)
    except ValueError as exc:
        raise ShapeMismatch(name, shapes, "operands do not broadcast") from exc
    func = getattr(np, name)
    with np.errstate(all="ignore"):
        dtype = check_dtype(np.asarray(func(*[_probe(v) for v in values])).dtype)
    rows, ndim = result_shape[0], len(result_shape)

    def carries_rows(v: object) -> bool:
        return len(_shape(v)) == ndim and _shape(v)[0] == rows

    lead = next((v for v in remotes if carries_rows(v)), None)
    if lead is None:
        raise ShapeMismatch(
            name,
            shapes,
            "broadcasting would spread a remote array over rows it does not "
            "hold; pool.asarray the larger operand first",
        )
    operands = _Operands(lead)
    builders = [operands.of(v, aligned=carries_rows(v) and rows > 1) for v in values]
    programs = []
    for piece in lead.pieces:
        out = piece.with_buffer(pool.new_buffer_id())
        op = _op(
            name,
            [b(piece) for b in builders],
            out.buffer_id,
            dtype,
            (piece.stop - piece.start, *result_shape[1:]),
        )
        programs.append(Program(piece, [op], free=operands.temporaries_of(piece), creates=[out]))
    run_programs(pool, programs, what=name)
    return RemoteArray(pool, result_shape, dtype, [p.creates[0] for p in programs])


def _reduced_dtype(op: str, dtype: np.dtype[Any]) -> np.dtype[Any]:
    return np.asarray(getattr(np, op)(np.zeros((1,), dtype))).dtype


def reduce(array: RemoteArray, op: str, axis: int | None) -> Any:
    """``array.<op>(axis=axis)`` for sum, prod, max, min, mean, any and all.

    Over all elements or over axis 0 (the sharded one), each shard reduces to a partial that the client
    combines: the result is a NumPy scalar or array. Over another axis the result stays remote, sharded
    like ``array``.

    Raises:
        numpy.exceptions.AxisError: an axis ``array`` does not have.
        ValueError: max or min of an empty array (as NumPy).
    """
    array.check()
    pool, shape = array.pool, array.shape
    result_dtype = _reduced_dtype(op, array.dtype)
    if axis is not None:
        if not -len(shape) <= axis < len(shape):
            raise np.exceptions.AxisError(axis, len(shape))
        axis %= len(shape)
    if axis is not None and axis > 0:
        from gpupool.client.array import RemoteArray

        out_shape = shape[:axis] + shape[axis + 1 :]
        programs = []
        for piece in array.pieces:
            out = piece.with_buffer(pool.new_buffer_id())
            rows_shape = (piece.stop - piece.start, *out_shape[1:])
            programs.append(
                Program(
                    piece,
                    [
                        _op(
                            op,
                            [buffer_operand(piece.buffer_id)],
                            out.buffer_id,
                            result_dtype,
                            rows_shape,
                            axis,
                        )
                    ],
                    creates=[out],
                )
            )
        run_programs(pool, programs, what=op)
        return RemoteArray(pool, out_shape, result_dtype, [p.creates[0] for p in programs])
    # Partials over all elements or over rows, combined here.
    partial_op = "sum" if op == "mean" else op
    partial_dtype = np.dtype(np.float64) if op == "mean" else result_dtype  # means add up in float64
    pieces = [p for p in array.pieces if p.stop > p.start]
    if not pieces:
        return getattr(np, op)(np.empty(shape, array.dtype), axis=axis)  # NumPy's own answer or error
    partial_shape = () if axis is None else shape[1:]
    programs = []
    for piece in pieces:
        tmp = pool.new_buffer_id()
        programs.append(
            Program(
                piece,
                [_op(partial_op, [buffer_operand(piece.buffer_id)], tmp, partial_dtype, partial_shape, axis)],
                fetch=[tmp],
                free=[tmp],
            )
        )
    fetched = run_programs(pool, programs, what=op)
    partials = np.stack([f[p.fetch[0]] for f, p in zip(fetched, programs, strict=True)])
    combine: Callable[..., Any] = getattr(np, "sum" if op == "mean" else op)
    combined = combine(partials, axis=0)
    if op == "mean":
        count = int(np.prod(shape)) if axis is None else shape[0]
        combined = combined / count
    result = np.asarray(combined).astype(result_dtype, copy=False)
    return result[()] if axis is None else result


def matmul(x: RemoteArray, w: object) -> RemoteArray:
    """``x @ w`` for a row-sharded 2-D ``x`` and a small ``w`` (host or remote), sent to each worker once.

    Raises:
        ShapeMismatch: ``x`` is not 2-D, ``w`` is not 1-D or 2-D, or the inner dimensions differ.
    """
    from gpupool.client.array import RemoteArray

    x.check()
    pool = x.pool
    if is_scalar(w):
        raise ShapeMismatch("matmul", (x.shape, ()), "matmul does not take scalars; use *")
    w_value = _normalize(w)
    assert isinstance(w_value, RemoteArray | np.ndarray)  # scalars were turned away above
    w_shape = _shape(w_value)
    if x.ndim != 2 or len(w_shape) not in (1, 2) or x.shape[1] != w_shape[0]:
        raise ShapeMismatch("matmul", (x.shape, w_shape), "need (n, k) @ (k, m) or (n, k) @ (k,)")
    w_dtype = w_value.dtype
    dtype = check_dtype(np.matmul(np.zeros((1, 1), x.dtype), np.zeros((1,) * len(w_shape), w_dtype)).dtype)
    out_tail = w_shape[1:]
    temporaries: dict[tuple[str, int], str] = {}
    constant: agent_pb2.Operand | None = None
    if isinstance(w_value, RemoteArray):
        buffers = w_value.replicate_to(x.pieces)  # kept with w, so the next x @ w sends nothing
    else:
        host = np.asarray(w_value, order="C")
        if host.nbytes <= INLINE_LIMIT:
            constant = constant_operand(host)
        else:  # too large to ride along: one temporary copy per worker, freed after the programs
            buffers = temporaries = replicate(pool, host, x.pieces)

    def operand(piece: Piece) -> agent_pb2.Operand:
        return constant if constant is not None else buffer_operand(buffers[piece.place])

    programs = []
    for piece in x.pieces:
        out = piece.with_buffer(pool.new_buffer_id())
        op = _op(
            "matmul",
            [buffer_operand(piece.buffer_id), operand(piece)],
            out.buffer_id,
            dtype,
            (piece.stop - piece.start, *out_tail),
        )
        programs.append(Program(piece, [op], creates=[out]))
    try:
        run_programs(pool, programs, what="matmul")
    finally:
        if temporaries:  # after every program: two shards on one worker share the copy
            by_place = {p.place: p for p in x.pieces}
            pool.run(
                pool.free_now([by_place[place].with_buffer(b) for place, b in temporaries.items()]),
                timeout=pool.timeouts.rpc,
                what="free",
            )
    return RemoteArray(pool, (x.shape[0], *out_tail), dtype, [p.creates[0] for p in programs])


def cast(array: RemoteArray, dtype: np.dtype[Any]) -> RemoteArray:
    """``array.astype(dtype)``, converted where the shards live."""
    from gpupool.client.array import RemoteArray

    array.check()
    pool = array.pool
    programs = []
    for piece in array.pieces:
        out = piece.with_buffer(pool.new_buffer_id())
        shape = (piece.stop - piece.start, *array.shape[1:])
        programs.append(
            Program(
                piece,
                [_op("astype", [buffer_operand(piece.buffer_id)], out.buffer_id, dtype, shape)],
                creates=[out],
            )
        )
    run_programs(pool, programs, what="astype")
    return RemoteArray(pool, array.shape, dtype, [p.creates[0] for p in programs])

"""Operations across the sharded axis 0, with rows moved agent to agent (:mod:`gpupool.client.rowmoves`):
``reshape`` and ``transpose``/``swapaxes`` that move axis 0, ``concatenate`` along it, ``sort``/``argsort``
along it, and ``xs @ ys.T`` for two sharded arrays.

Each runs in rounds: programs on the agents that hold the operand cut or reshape its shards, pulls move
the pieces to where the result's shards go (the client sends requests, not bytes), and the pieces made
for the move are freed. Each returns the :class:`~gpupool.client.graph.ArraySpec` of a resident array
(or of a pending one over resident buffers), for the caller's ``_make`` hook.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from gpupool._proto.v1 import agent_pb2
from gpupool.client import dispatch
from gpupool.client.dispatch import Unsupported
from gpupool.client.graph import ArraySpec, GraphArray, Node, Program, ProgramBuilder, make_op, run_programs
from gpupool.client.layout import Piece, Place
from gpupool.client.operands import buffer_operand
from gpupool.client.pulls import Pull, run_pulls
from gpupool.client.rowmoves import pulls_for, rebalance, resident, spans_of
from gpupool.client.rowsort import sample_sort
from gpupool.client.session import Session
from gpupool.moves import plan_moves

__all__ = ["concatenate_rows", "matmul_transposed", "reshape_rows", "sort_rows", "transpose_rows"]

Make = Callable[[ArraySpec], Any]


def _resident_spec(
    session: Session, shape: tuple[int, ...], dtype: Any, pieces: Sequence[Piece]
) -> ArraySpec:
    return ArraySpec(session=session, shape=shape, dtype=np.dtype(dtype), layout=tuple(pieces))


def _at(piece: Piece, start: int, stop: int, buffer_id: str) -> Piece:
    """A piece on ``piece``'s worker holding rows ``[start, stop)`` in ``buffer_id``."""
    return replace(piece, start=start, stop=stop, buffer_id=buffer_id)


def _free(session: Session, pieces: Sequence[Piece]) -> None:
    if pieces:
        session.run(session.free_now(pieces), timeout=session.timeouts.rpc, what="free")


def _check_size(name: str, array: GraphArray) -> None:
    if math.prod(array.shape) == 0:
        raise Unsupported(f"{name}: of an empty array")


# -- transpose and swapaxes across axis 0 -------------------------------------------------------------------


def transpose_rows(array: GraphArray, order: Sequence[int]) -> ArraySpec:
    """``np.transpose(array, order)`` where ``order[0] != 0``: an all-to-all move.

    The result's rows (``array``'s axis ``order[0]``) are placed by the coordinator. Each agent that holds
    a shard cuts it, in one program, into one transposed block per result shard; each result shard's agent
    pulls its blocks from all of them and joins them along the axis that was axis 0.

    Raises:
        Unsupported: an empty array (it runs on the host).
    """
    array.check()
    _check_size("transpose", array)
    order = tuple(order)
    axis, joined = order[0], order.index(0)
    session, dtype = array.session, array.dtype
    shape = tuple(array.shape[a] for a in order)
    targets = session.place(shape, dtype)
    programs: list[Program] = []
    blocks: list[list[Piece]] = []
    for index, piece in enumerate(array.layout):
        builder = ProgramBuilder(session, index, piece)
        source = buffer_operand(builder.emit(array))
        rows = piece.stop - piece.start
        made = []
        for target in targets:
            local = [rows, *array.shape[1:]]
            local[axis] = target.stop - target.start
            params: list[int] = []
            for at in range(axis + 1):
                params += (target.start, target.stop, 1) if at == axis else (0, local[at], 1)
            cut, out = session.new_buffer_id(), session.new_buffer_id()
            builder.program.ops.append(make_op("slice", [source], cut, dtype, tuple(local), params=params))
            builder.program.ops.append(
                make_op(
                    "transpose", [buffer_operand(cut)], out, dtype, tuple(local[a] for a in order), axes=order
                )
            )
            builder.program.free.append(cut)
            block = _at(piece, 0, target.stop - target.start, out)
            builder.program.creates.append(block)
            made.append(block)
        builder.program.work_bytes += 3 * rows * math.prod(array.shape[1:]) * dtype.itemsize
        programs.append(builder.program)
        blocks.append(made)
    run_programs(session, programs, what="transpose")
    try:
        pulls = [
            Pull(
                target=target,
                sources=tuple((made[t], 0, target.stop - target.start) for made in blocks),
                shape=(target.stop - target.start, *shape[1:]),
                dtype=dtype,
                axis=joined,
            )
            for t, target in enumerate(targets)
        ]
        run_pulls(session, pulls, what="transpose")
    finally:
        _free(session, [block for made in blocks for block in made])
    return _resident_spec(session, shape, dtype, targets)


# -- reshape across axis 0 -----------------------------------------------------------------------------------


def reshape_rows(array: GraphArray, shape: tuple[int, ...]) -> ArraySpec:
    """``np.reshape(array, shape)`` where the first axis changes: each result shard stays on the worker of
    the operand's shard it mostly overlaps, and only the elements that cross a shard boundary move.

    Each shard is first viewed as rows of ``g`` elements (``g`` the greatest common divisor of the two row
    sizes), so that both layouts cut the same rows; the moves are planned by
    :func:`gpupool.moves.plan_moves` and each result shard pulls its rows and reshapes them.

    Raises:
        Unsupported: an empty array, or a 0-d result (they run on the host).
    """
    array.check()
    _check_size("reshape", array)
    if not shape:
        raise Unsupported("reshape: to a 0-d array")
    session, dtype = array.session, array.dtype
    row, new_row = math.prod(array.shape[1:]), math.prod(shape[1:])
    g = math.gcd(row, new_row)
    programs: list[Program] = []
    views: list[Piece] = []
    for index, piece in enumerate(array.layout):
        builder = ProgramBuilder(session, index, piece)
        source = buffer_operand(builder.emit(array))
        rows = (piece.stop - piece.start) * row // g
        out = session.new_buffer_id()
        builder.program.ops.append(make_op("reshape", [source], out, dtype, (rows, g), params=(rows, g)))
        view = _at(piece, piece.start * row // g, piece.stop * row // g, out)
        builder.program.creates.append(view)
        builder.program.work_bytes += rows * g * dtype.itemsize
        programs.append(builder.program)
        views.append(view)
    run_programs(session, programs, what="reshape")
    try:
        bounds = [min(shape[0], piece.start * row // new_row) for piece in array.layout[1:]]
        starts, stops = [0, *bounds], [*bounds, shape[0]]
        targets = [
            _at(piece, start, stop, session.new_buffer_id())
            for piece, start, stop in zip(array.layout, starts, stops, strict=True)
        ]
        segments = plan_moves(spans_of(views), spans_of(targets, new_row // g))
        shapes = [(t.stop - t.start, *shape[1:]) for t in targets]
        run_pulls(session, pulls_for(views, targets, segments, shapes=shapes, dtype=dtype), what="reshape")
    finally:
        _free(session, views)
    return _resident_spec(session, shape, dtype, targets)


# -- concatenate along axis 0 --------------------------------------------------------------------------------


def concatenate_rows(arrays: Sequence[Any]) -> ArraySpec:
    """``np.concatenate(arrays, axis=0)`` of remote arrays however they are laid out: their shards, one
    after another, moved to a layout the coordinator places by free memory (``PlanMoves``); rows that
    land on the agent that holds them are copied there.

    Raises:
        Unsupported: an operand that is not a remote array of the same pool, or a 0-d one.
        ValueError: NumPy's, for shapes that do not concatenate.
    """
    if not arrays or not all(isinstance(a, GraphArray) for a in arrays):
        raise Unsupported("concatenate: every array must be remote")
    remotes: list[GraphArray] = list(arrays)
    session = remotes[0].session
    if any(a.session is not session for a in remotes) or any(a.ndim == 0 for a in remotes):
        raise Unsupported("concatenate: arrays of different pools, or 0-d arrays")
    shape = np.concatenate([np.empty(a.shape, np.bool_) for a in remotes], axis=0).shape
    dtype = np.result_type(*(a.dtype for a in remotes))
    kept: list[Any] = []  # the cast copies, alive until their rows have moved
    sources: list[Piece] = []
    offset = 0
    for array in remotes:
        if array.dtype != dtype:
            array = array._make(dispatch.cast(array, dtype))  # type: ignore[attr-defined]
            kept.append(array)
        sources += [replace(p, start=p.start + offset, stop=p.stop + offset) for p in resident(array)]
        offset += array.shape[0]
    targets = rebalance(session, sources, shape, dtype)
    del kept
    return _resident_spec(session, shape, dtype, targets)


# -- sort along axis 0 ---------------------------------------------------------------------------------------


def sort_rows(array: GraphArray, op: str, make: Make) -> ArraySpec:
    """``np.sort``/``np.argsort`` along axis 0.

    Two or more dimensions: axis 0 is moved last (an all-to-all), each shard sorts its own rows along it,
    and axis 0 is moved back. One dimension: a sample sort (:mod:`gpupool.client.rowsort`), its result
    moved back to ``array``'s layout (so the sorted array, or the indices, line up with ``array``).

    Raises:
        Unsupported: an empty array.
    """
    array.check()
    _check_size(op, array)
    dtype = np.dtype(np.intp) if op == "argsort" else array.dtype
    ndim = array.ndim
    if ndim >= 2:
        order = (*range(1, ndim), 0)
        moved = make(transpose_rows(array, order))
        node = Node(op, (moved,), depth=dispatch.depth_after([moved]), params=(ndim - 1,))
        ordered = make(dispatch.pending_spec(moved.shape, dtype, moved, node))
        return transpose_rows(ordered, tuple(int(a) for a in np.argsort(order)))
    return sample_sort(array, op, make)


# -- xs @ ys.T -----------------------------------------------------------------------------------------------


def matmul_transposed(x: GraphArray, y: GraphArray) -> ArraySpec:
    """``x @ y.T`` for two row-sharded 2-D arrays: each worker that holds rows of ``x`` pulls all of
    ``y``'s shards from their agents (agent to agent), transposes them once, and the product runs per
    shard of ``x``, pending like any matmul.

    Raises:
        Unsupported: operands that are not both 2-D remote arrays of one pool.
        ValueError: NumPy's, for inner dimensions that differ.
    """
    x.check()
    y.check()
    if x.ndim != 2 or y.ndim != 2 or x.session is not y.session:
        raise Unsupported("matmul: x @ y.T of two 2-D remote arrays of one pool")
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            f"matmul: Input operand 1 has a mismatch in its core dimension 0 (size {y.shape[1]} is "
            f"different from {x.shape[1]})"
        )
    session = x.session
    rows, inner = y.shape
    dtype = np.matmul(np.zeros((1, 1), x.dtype), np.zeros((1, 1), y.dtype)).dtype
    pieces = resident(y)
    places: dict[Place, Piece] = {}
    for piece in x.layout:
        places.setdefault(piece.place, piece)
    wholes = [_at(piece, 0, rows, session.new_buffer_id()) for piece in places.values()]
    sources = tuple((p, 0, p.stop - p.start) for p in pieces)
    run_pulls(
        session,
        [Pull(target=w, sources=sources, shape=y.shape, dtype=y.dtype) for w in wholes],
        what="matmul",
    )
    transposed: dict[Place, str] = {}
    programs = []
    for whole in wholes:
        out = session.new_buffer_id()
        op = make_op("transpose", [buffer_operand(whole.buffer_id)], out, y.dtype, (inner, rows), axes=(1, 0))
        programs.append(Program(whole, ops=[op], free=[whole.buffer_id], creates=[whole.with_buffer(out)]))
        transposed[whole.place] = out
    try:
        run_programs(session, programs, what="matmul")
    except BaseException:
        _free(session, wholes)
        raise

    def operand(piece: Piece) -> agent_pb2.Operand:
        return buffer_operand(transposed[piece.place])

    # The copies belong to the operand: released with the last node that holds it.
    weakref.finalize(operand, session.release, tuple(w.with_buffer(transposed[w.place]) for w in wholes))
    node = Node("matmul", (x, operand), depth=dispatch.depth_after([x]))
    return dispatch.pending_spec((x.shape[0], rows), dtype, x, node)

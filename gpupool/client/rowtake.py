"""``x[idx]`` and ``np.take(x, idx, axis=0)``: rows picked by a host integer array, moved agent to agent.

Three steps, none through the client:

1. each shard holding picked rows takes them, in the order they are picked (a ``take`` program);
2. the result's rows are placed by the coordinator (``PlanMoves``, by free memory); each result shard pulls,
   from every shard's picked rows, the run that falls in its rows (a run is contiguous: a shard's picks
   are in pick order), so it holds its rows grouped by source;
3. each result shard puts its rows in pick order with a ``take`` of its own: a pending op, fused with
   what follows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from gpupool.client import dispatch
from gpupool.client.dispatch import Unsupported
from gpupool.client.graph import ArraySpec, GraphArray, Node, Program, make_op, run_programs
from gpupool.client.layout import Piece
from gpupool.client.operands import INLINE_LIMIT, buffer_operand, constant_operand
from gpupool.client.pulls import Pull, run_pulls
from gpupool.client.rowmoves import resident

__all__ = ["take_rows"]

Make = Callable[[ArraySpec], Any]


def take_rows(array: GraphArray, indices: np.ndarray, make: Make) -> ArraySpec:
    """The spec of ``array[indices]`` for a 1-D host array of row indices (negative ones count from the
    end; repeats allowed), computed on the agents as the module says.

    Raises:
        IndexError: NumPy's, for an index out of range or not an integer.
        Unsupported: an empty result or operand, or more indices than ride inline with a program.
    """
    array.check()
    rows = array.shape[0]
    if indices.dtype == np.bool_:
        raise Unsupported("take: a host boolean mask on axis 0")
    if indices.size and indices.dtype.kind not in "iu":
        raise IndexError("arrays used as indices must be of integer (or boolean) type")
    picks = indices.astype(np.int64).reshape(-1)
    if picks.size and (picks.min() < -rows or picks.max() >= rows):
        raise IndexError(f"index out of bounds for axis 0 with size {rows}")
    if picks.size == 0 or math.prod(array.shape) == 0 or picks.nbytes > INLINE_LIMIT:
        raise Unsupported("take: of no rows, of an empty array, or too many indices to send inline")
    picks = picks % rows
    session, dtype, rest = array.session, array.dtype, array.shape[1:]
    sources = resident(array)
    owner = np.searchsorted([p.stop for p in sources], picks, side="right")

    # 1. Each shard takes its picked rows, in pick order.
    programs: list[Program] = []
    taken: list[tuple[Piece, np.ndarray]] = []  # the rows taken on a shard, and their positions in picks
    for index, piece in enumerate(sources):
        positions = np.flatnonzero(owner == index)
        if positions.size == 0:
            continue
        out = session.new_buffer_id()
        local = constant_operand(picks[positions] - piece.start)
        shape = (int(positions.size), *rest)
        program = Program(place=piece)
        program.ops.append(
            make_op("take", [buffer_operand(piece.buffer_id), local], out, dtype, shape, params=(0,))
        )
        part = piece.with_buffer(out)
        program.creates.append(part)
        program.work_bytes += math.prod(shape) * dtype.itemsize
        programs.append(program)
        taken.append((part, positions))
    run_programs(session, programs, what="take rows")
    parts = [part for part, _ in taken]
    try:
        # 2. The result's shards, placed by the coordinator; each pulls its run of every shard's picks.
        shape = (int(picks.size), *rest)
        offsets = np.cumsum([0, *(positions.size for _, positions in taken)])
        stand_ins = [
            replace(part, start=int(start), stop=int(stop))
            for part, start, stop in zip(parts, offsets[:-1], offsets[1:], strict=True)
        ]
        targets, _ = session.plan_moves(shape, dtype, stand_ins)
        pulls: list[Pull] = []
        orders: dict[tuple[int, int], np.ndarray] = {}
        for target in targets:
            runs: list[tuple[Piece, int, int]] = []
            grouped: list[np.ndarray] = []
            for part, positions in taken:
                low, high = np.searchsorted(positions, [target.start, target.stop])
                if high > low:
                    runs.append((part, int(low), int(high)))
                    grouped.append(positions[low:high])
            if not runs:  # a target of no rows still needs a buffer
                runs = [(parts[0], 0, 0)]
            order = np.argsort(np.concatenate(grouped), kind="stable") if grouped else np.zeros(0, np.int64)
            orders[target.start, target.stop] = order
            pulls.append(
                Pull(
                    target=target, sources=tuple(runs), shape=(target.stop - target.start, *rest), dtype=dtype
                )
            )
        run_pulls(session, pulls, what="take rows")
    finally:
        session.run(session.free_now(parts), timeout=session.timeouts.rpc, what="free")
    grouped_array = make(ArraySpec(session=session, shape=shape, dtype=dtype, layout=tuple(targets)))

    # 3. Each result shard puts its rows in pick order (pending, fused with what follows).
    def reorder(piece: Piece) -> Any:
        return constant_operand(orders[piece.start, piece.stop])

    node = Node("take", (grouped_array, reorder), depth=dispatch.depth_after([grouped_array]), params=(0,))
    return dispatch.pending_spec(shape, dtype, grouped_array, node)

"""``np.sort``/``np.argsort`` of a 1-D remote array by sample sort, rows moved agent to agent.

1. Each shard sorts itself (stably) and sends back a few evenly spaced samples (one program per shard).
2. The client picks ``p - 1`` splitters from the samples (``p`` shards); each shard counts its elements
   below each splitter (one program per shard; a few integers come back). The counts cut every sorted
   shard into ``p`` runs, one per bucket; equal values always fall in the same bucket, NaN in the last.
3. Bucket ``j``'s agent (shard ``j``'s) pulls run ``j`` of every shard and sorts what it got (argsort: the
   values and their global indices travel together; a stable argsort of the bucket orders the indices).
4. The result moves back to the operand's layout (most rows are where they go already when the splitters
   balance the buckets), so it lines up with the operand for elementwise work.

Ties keep their order, as NumPy's stable sort does (the agents' argsort is stable).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Final

import numpy as np

from gpupool.client import dispatch
from gpupool.client.graph import ArraySpec, GraphArray, Node, Program, ProgramBuilder, make_op, run_programs
from gpupool.client.layout import Piece
from gpupool.client.operands import buffer_operand, scalar_operand
from gpupool.client.pulls import Pull, run_pulls
from gpupool.client.rowmoves import reshard
from gpupool.client.session import Session

__all__ = ["OVERSAMPLE", "sample_sort"]

#: Samples each shard sends per shard of the array (more: buckets closer to even).
OVERSAMPLE: Final = 32

Make = Callable[[ArraySpec], Any]
_INDEX: Final = np.dtype(np.intp)


def sample_sort(array: GraphArray, op: str, make: Make) -> ArraySpec:
    """``np.sort(array)`` or ``np.argsort(array)`` (``op``) of a non-empty 1-D remote array.

    Raises:
        RemoteError: an agent refused a program or a pull; what was made for the sort is freed.
    """
    session, layout = array.session, array.layout
    values, indices, samples = _sort_shards(array, op)
    made = [*values, *indices]
    try:
        splitters = _splitters(samples, len(layout), array.dtype)
        counts = _count_below(session, values, splitters)
        buckets, bucket_indices = _exchange(session, layout, values, indices, counts, array.dtype)
    finally:
        session.run(session.free_now(made), timeout=session.timeouts.rpc, what="free")
    shape = array.shape
    spread = make(ArraySpec(session=session, shape=shape, dtype=array.dtype, layout=tuple(buckets)))
    if op == "sort":
        node = Node("sort", (spread,), depth=1, params=(0,))
        ordered = make(dispatch.pending_spec(shape, array.dtype, spread, node))
    else:
        where = make(ArraySpec(session=session, shape=shape, dtype=_INDEX, layout=tuple(bucket_indices)))
        local = make(dispatch.pending_spec(shape, _INDEX, spread, Node("argsort", (spread,), params=(0,))))
        node = Node("take", (where, local), depth=2, params=(0,))
        ordered = make(dispatch.pending_spec(shape, _INDEX, where, node))
    targets = [piece.with_buffer(session.new_buffer_id()) for piece in layout]
    reshard(ordered, targets)
    return ArraySpec(session=session, shape=shape, dtype=ordered.dtype, layout=tuple(targets))


def _sort_shards(array: GraphArray, op: str) -> tuple[list[Piece], list[Piece], list[np.ndarray]]:
    """Round 1: each shard sorted (and, for argsort, its elements' global indices in that order), kept;
    evenly spaced samples of each, fetched."""
    session, dtype = array.session, array.dtype
    programs: list[Program] = []
    values: list[Piece] = []
    indices: list[Piece] = []
    sample_ids: list[str] = []
    for index, piece in enumerate(array.layout):
        rows = piece.stop - piece.start
        builder = ProgramBuilder(session, index, piece)
        program = builder.program
        source = buffer_operand(builder.emit(array))
        ordered = session.new_buffer_id()
        if op == "sort":
            program.ops.append(make_op("sort", [source], ordered, dtype, (rows,), params=(0,)))
        else:
            order, at = session.new_buffer_id(), session.new_buffer_id()
            program.ops.append(make_op("argsort", [source], order, _INDEX, (rows,), params=(0,)))
            program.ops.append(
                make_op("take", [source, buffer_operand(order)], ordered, dtype, (rows,), params=(0,))
            )
            program.ops.append(
                make_op("add", [buffer_operand(order), scalar_operand(piece.start)], at, _INDEX, (rows,))
            )
            program.free.append(order)
            indices.append(piece.with_buffer(at))
            program.creates.append(indices[-1])
        values.append(piece.with_buffer(ordered))
        program.creates.append(values[-1])
        step = max(1, math.ceil(rows / (OVERSAMPLE * len(array.layout))))
        sample = session.new_buffer_id()
        taken = len(range(0, rows, step))
        program.ops.append(
            make_op("slice", [buffer_operand(ordered)], sample, dtype, (taken,), params=(0, rows, step))
        )
        program.fetch.append(sample)
        program.free.append(sample)
        program.work_bytes += 4 * rows * dtype.itemsize
        sample_ids.append(sample)
        programs.append(program)
    fetched = run_programs(session, programs, what=op)
    return values, indices, [f[s] for f, s in zip(fetched, sample_ids, strict=True)]


def _splitters(samples: Sequence[np.ndarray], buckets: int, dtype: np.dtype[Any]) -> list[Any]:
    """``buckets - 1`` splitters at even quantiles of the samples, as Python scalars (NaN as +inf, so
    that the counts below them grow with them and NaN lands in the last bucket)."""
    pooled = np.sort(np.concatenate(samples))
    if not pooled.size:
        return []
    picked = [pooled[(j * pooled.size) // buckets] for j in range(1, buckets)]
    if dtype.kind == "f":
        picked = [np.inf if np.isnan(value) else value for value in picked]
    return [value.item() if isinstance(value, np.generic) else value for value in picked]


def _count_below(session: Session, values: Sequence[Piece], splitters: Sequence[Any]) -> list[list[int]]:
    """Round 2: for each sorted shard, how many of its elements are below each splitter."""
    if not splitters:
        return [[] for _ in values]
    programs: list[Program] = []
    fetches: list[list[str]] = []
    for piece in values:
        rows = piece.stop - piece.start
        program = Program(piece)
        ids = []
        for splitter in splitters:
            below, count = session.new_buffer_id(), session.new_buffer_id()
            inputs = [buffer_operand(piece.buffer_id), scalar_operand(splitter)]
            program.ops.append(make_op("less", inputs, below, np.dtype(bool), (rows,)))
            program.ops.append(make_op("count_nonzero", [buffer_operand(below)], count, _INDEX, ()))
            program.free += [below, count]
            program.fetch.append(count)
            ids.append(count)
        programs.append(program)
        fetches.append(ids)
    fetched = run_programs(session, programs, what="sort")
    return [[int(f[i]) for i in ids] for f, ids in zip(fetched, fetches, strict=True)]


def _exchange(
    session: Session,
    layout: Sequence[Piece],
    values: Sequence[Piece],
    indices: Sequence[Piece],
    counts: Sequence[Sequence[int]],
    dtype: np.dtype[Any],
) -> tuple[list[Piece], list[Piece]]:
    """Round 3: bucket ``j`` (on shard ``j``'s worker) pulls run ``j`` of every sorted shard (and of its
    indices); returns the buckets' pieces, in row order."""
    cuts = [[0, *below, piece.stop - piece.start] for piece, below in zip(values, counts, strict=True)]
    buckets: list[Piece] = []
    bucket_indices: list[Piece] = []
    pulls: list[Pull] = []
    start = 0
    for j, place in enumerate(layout):
        runs = [(i, cut[j], cut[j + 1]) for i, cut in enumerate(cuts) if cut[j + 1] > cut[j]]
        rows = sum(stop - first for _, first, stop in runs)
        bucket = Piece(
            agent_id=place.agent_id,
            endpoint=place.endpoint,
            worker=place.worker,
            start=start,
            stop=start + rows,
            buffer_id=session.new_buffer_id(),
        )
        empty = [(0, 0, 0)]  # a bucket with no rows still gets its (empty) buffer
        buckets.append(bucket)
        sources = tuple((values[i], first, stop) for i, first, stop in runs or empty)
        pulls.append(Pull(target=bucket, sources=sources, shape=(rows,), dtype=dtype))
        if indices:
            bucket_indices.append(bucket.with_buffer(session.new_buffer_id()))
            sources = tuple((indices[i], first, stop) for i, first, stop in runs or empty)
            pulls.append(Pull(target=bucket_indices[-1], sources=sources, shape=(rows,), dtype=_INDEX))
        start += rows
    run_pulls(session, pulls, what="sort")
    return buckets, bucket_indices

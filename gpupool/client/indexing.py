"""``x[key]`` and ``x[key] = value`` on remote arrays, as far as they run where the shards live.

Reading: basic indices (ints, slices with any step, ``...``, ``None``) slice every axis. Along the sharded
axis 0 only the shards that hold selected rows get a ``slice`` op, and the result's rows are numbered
afresh (a negative step lists the pieces in the new, reversed order); that result is resident. A slice
that keeps all rows is a pending per-shard op. An integer on axis 0 (``x[5]``) gives that row as a NumPy
array (a download of one row). ``x[mask]`` with a remote 1-D bool mask laid out as ``x`` counts each shard's
rows first, then ``compress``\\ es them; ``x[:, idx]`` with a host integer (or bool) vector ``take``\\ s per
shard. Other keys raise :class:`~gpupool.client.dispatch.Unsupported` (the caller runs them on the host).

Writing (see :func:`where_inputs`): ``x[mask] = scalar`` and basic keys with a host value become a ``where``
that the caller assigns in place.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from gpupool.client import dispatch, layouts, reductions
from gpupool.client.dispatch import Unsupported
from gpupool.client.graph import ArraySpec, GraphArray, Node, ProgramBuilder, make_op, run_programs
from gpupool.client.layout import layout_key
from gpupool.client.operands import INLINE_LIMIT, buffer_operand, constant_operand
from gpupool.client.rowtake import take_rows

__all__ = ["getitem", "where_inputs"]


def _within(kept: range, low: int, high: int) -> range:
    """The part of ``kept`` whose values lie in ``[low, high)`` (a range again)."""
    step = kept.step
    if step > 0:
        first, last = -(-(low - kept.start) // step), -(-(high - kept.start) // step)
    else:
        first, last = (kept.start - high) // -step + 1, (kept.start - low) // -step + 1
    size = len(kept)
    return kept[min(max(first, 0), size) : min(max(last, 0), size)]


def _basic(shape: tuple[int, ...], key: tuple[Any, ...]) -> tuple[list[range], list[Any], bool]:
    """Each axis's kept range, the index that finishes the job on the sliced array (ints → 0, slices
    whole, ``None`` kept), and whether axis 0 got an integer.

    Raises:
        Unsupported: not a basic key. IndexError: NumPy's, for too many indices or one out of range.
    """
    if any(k is not None and k is not Ellipsis and not isinstance(k, int | np.integer | slice) for k in key):
        raise Unsupported("getitem: not a basic index")
    if sum(k is Ellipsis for k in key) > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    used = sum(k is not None and k is not Ellipsis for k in key)
    if used > len(shape):
        raise IndexError(
            f"too many indices for array: array is {len(shape)}-dimensional, but {used} were indexed"
        )
    fill = [slice(None)] * (len(shape) - used)
    items: list[Any] = []
    for k in key:
        items.extend(fill if k is Ellipsis else [k])
    if Ellipsis not in key:
        items.extend(fill)
    ranges: list[range] = []
    finish: list[Any] = []
    for k in items:
        if k is None:
            finish.append(None)
            continue
        length = shape[len(ranges)]
        if isinstance(k, slice):
            ranges.append(range(*k.indices(length)))
            finish.append(slice(None))
        else:
            at = operator.index(k)
            if not -length <= at < length:
                raise IndexError(f"index {at} is out of bounds for axis {len(ranges)} with size {length}")
            at %= length
            ranges.append(range(at, at + 1))
            finish.append(0)
    row_int = isinstance(items[0], int | np.integer) if items and shape else False
    return ranges, finish, bool(row_int)


def _as_slice(kept: range) -> slice:
    """The slice that selects ``kept``'s indices (an empty range's start may be -1, which a slice would
    read as the last index)."""
    if not kept:
        return slice(0, 0)
    return slice(kept.start, kept.stop if kept.stop >= 0 else None, kept.step)


def _triples(ranges: list[range]) -> tuple[int, ...]:
    return tuple(v for r in ranges for v in (r.start, r.stop, r.step))


def getitem(
    array: GraphArray, key: Any, make: Callable[[ArraySpec], GraphArray]
) -> tuple[ArraySpec, tuple[Any, ...] | None]:
    """``array[key]`` on the pool: the result's spec and, for an integer on axis 0, the index that turns
    the one-row result (once downloaded) into NumPy's answer. ``make`` turns the spec of a pending step
    (the per-shard slice a reshape then reads) into an array: one the array's in-place updates know reads
    it, so that they redirect it to the old value.

    Raises:
        Unsupported: a key that runs on the host copy. IndexError: NumPy's, for out-of-range indices.
    """
    array.check()
    key = key if isinstance(key, tuple) else (key,)
    if not array.shape:
        raise Unsupported("getitem: of a 0-d array")
    if any(isinstance(k, GraphArray) for k in key):
        return _masked(array, key), None
    if any(isinstance(k, list | np.ndarray) for k in key):
        return _taken(array, key, make), None
    ranges, finish, row_int = _basic(array.shape, key)
    sliced = tuple(len(r) for r in ranges)
    final = np.broadcast_to(np.empty((), np.bool_), sliced)[tuple(finish)].shape
    if row_int:
        return _rows(array, ranges, sliced, sliced), tuple(finish)
    if not final or final[0] != sliced[0] or next(i for i, f in enumerate(finish) if f is not None) != 0:
        raise Unsupported("getitem: a new axis before the sharded axis 0")
    if ranges[0] != range(array.shape[0]):
        return _rows(array, ranges, sliced, final), None
    if all(r == range(n) for r, n in zip(ranges[1:], array.shape[1:], strict=True)):
        return layouts.reshape(array, final), None
    rest = _triples(ranges[1:])
    node = Node(
        "slice",
        (array,),
        depth=dispatch.depth_after([array]),
        shard_params=lambda rows: (0, rows, 1, *rest),
    )
    spec = dispatch.pending_spec(sliced, array.dtype, array, node)
    if final == sliced:
        return spec, None
    return layouts.reshape(make(spec), final), None


def _rows(
    array: GraphArray, ranges: list[range], sliced: tuple[int, ...], final: tuple[int, ...]
) -> ArraySpec:
    """The selected rows (and slices of the other axes) in new pieces, one per shard that holds any."""
    session, kept = array.session, ranges[0]
    layout = list(enumerate(array.layout))
    if kept.step < 0:
        layout.reverse()
    chosen = [(i, p, _within(kept, p.start, p.stop)) for i, p in layout]
    chosen = [c for c in chosen if len(c[2])] or [(0, array.layout[0], range(0))]
    rest = _triples(ranges[1:])
    programs, pieces, start = [], [], 0
    for index, piece, part in chosen:
        count = len(part)
        builder = ProgramBuilder(session, index, piece)
        source = builder.emit(array)
        out = session.new_buffer_id()
        local = (part.start - piece.start, part.stop - piece.start, part.step) if count else (0, 0, 1)
        op = make_op(
            "slice", [buffer_operand(source)], out, array.dtype, (count, *sliced[1:]), params=(*local, *rest)
        )
        builder.program.ops.append(op)
        if final[1:] != sliced[1:]:
            builder.program.free.append(out)
            shaped, out = out, session.new_buffer_id()
            shape = (count, *final[1:])
            builder.program.ops.append(
                make_op("reshape", [buffer_operand(shaped)], out, array.dtype, shape, params=shape)
            )
        new = replace(piece.with_buffer(out), start=start, stop=start + count)
        builder.program.creates.append(new)
        programs.append(builder.program)
        pieces.append(new)
        start += count
    run_programs(session, programs, what="slice")
    return ArraySpec(session=session, shape=(start, *final[1:]), dtype=array.dtype, layout=tuple(pieces))


def _masked(array: GraphArray, key: tuple[Any, ...]) -> ArraySpec:
    """``array[mask]`` for a remote 1-D bool mask with ``array``'s layout: count per shard, then compress."""
    mask = key[0]
    if len(key) > 1 or mask.dtype != np.bool_ or mask.shape != array.shape[:1]:
        raise Unsupported("getitem: a remote index other than a row mask")
    if mask.session is not array.session or layout_key(mask.layout) != layout_key(array.layout):
        raise Unsupported("getitem: a row mask laid out differently")
    if array.shape[0] == 0:  # no rows to select: an empty copy
        return _rows(array, [range(n) for n in array.shape], array.shape, array.shape)
    counts = reductions.run_partials(mask, "sum", lambda rows: (), None, np.dtype(np.int64), keepdims=False)
    nonempty = [(i, p) for i, p in enumerate(array.layout) if p.stop > p.start]
    chosen = [(i, p, int(c)) for (i, p), c in zip(nonempty, counts, strict=True) if int(c)]
    chosen = chosen or [(nonempty[0][0], nonempty[0][1], 0)]
    session, rest = array.session, array.shape[1:]
    programs, pieces, start = [], [], 0
    for index, piece, count in chosen:
        builder = ProgramBuilder(session, index, piece)
        inputs = [buffer_operand(builder.emit(array)), buffer_operand(builder.emit(mask))]
        out = session.new_buffer_id()
        builder.program.ops.append(make_op("compress", inputs, out, array.dtype, (count, *rest)))
        new = replace(piece.with_buffer(out), start=start, stop=start + count)
        builder.program.creates.append(new)
        programs.append(builder.program)
        pieces.append(new)
        start += count
    run_programs(session, programs, what="compress")
    return ArraySpec(session=session, shape=(start, *rest), dtype=array.dtype, layout=tuple(pieces))


def _taken(array: GraphArray, key: tuple[Any, ...], make: Callable[[ArraySpec], GraphArray]) -> ArraySpec:
    """``array[..., idx, ...]``: one host int (or bool) vector on one axis, every other entry whole; on
    axis 0 the rows move agent to agent (:func:`~gpupool.client.rowtake.take_rows`)."""
    ranges, arrays = [], []
    for at, k in enumerate(key):
        if isinstance(k, list | np.ndarray):
            arrays.append((at, np.asarray(k)))
        elif not (isinstance(k, slice) and k == slice(None)):
            raise Unsupported("getitem: advanced indexing mixed with other indices")
        ranges.append(k)
    if len(arrays) != 1 or len(key) > array.ndim:
        raise Unsupported("getitem: more than one index array")
    axis, indices = arrays[0]
    length = array.shape[axis] if axis < array.ndim else 0
    if axis == 0 and indices.ndim == 1 and indices.dtype != np.bool_:
        return take_rows(array, indices, make)
    if axis == 0 or indices.ndim != 1:
        raise Unsupported("getitem: an index array on the sharded axis, or not 1-D")
    if indices.dtype == np.bool_:
        if indices.shape[0] != length:
            raise IndexError(f"boolean index did not match indexed array along axis {axis}")
        indices = np.flatnonzero(indices)
    if indices.size and indices.dtype.kind not in "iu":
        raise IndexError("arrays used as indices must be of integer (or boolean) type")
    indices = indices.astype(np.int64)
    if indices.size and (indices.min() < -length or indices.max() >= length):
        raise IndexError(f"index out of bounds for axis {axis} with size {length}")
    if indices.nbytes > INLINE_LIMIT:
        raise Unsupported("getitem: an index array too large to send with each program")
    constant = constant_operand(indices % max(length, 1))
    shape = (*array.shape[:axis], indices.size, *array.shape[axis + 1 :])
    node = Node("take", (array, lambda piece: constant), depth=dispatch.depth_after([array]), params=(axis,))
    return dispatch.pending_spec(shape, array.dtype, array, node)


def where_inputs(array: GraphArray, key: Any, value: Any, make: Callable[[ArraySpec], Any]) -> list[Any]:
    """What ``array[key] = value`` assigns: ``[condition, replacement]`` for ``where(condition,
    replacement, array)``; ``make`` turns the spec of a pending step (a reshaped mask, or the inner where
    of a key that selects along axis 0 and other axes) into an array.

    Raises:
        Unsupported: a key or value this does not run on the pool (a remote value, a value that varies along
            rows and other axes, a new axis, a remote mask with a non-scalar value).
    """
    array.check()
    key = key if isinstance(key, tuple) else (key,)
    if isinstance(value, GraphArray):
        raise Unsupported("setitem: a remote value")
    host = np.empty(np.shape(value), array.dtype)
    host[...] = value  # NumPy's assignment casting: x[0] = -1 of a uint8 x raises, as it does there
    if len(key) == 1 and isinstance(key[0], GraphArray):
        mask = key[0]
        if mask.dtype != np.bool_ or host.ndim or mask.shape not in (array.shape, array.shape[:1]):
            raise Unsupported("setitem: a remote mask takes a scalar, and is laid out as the array")
        if mask.shape != array.shape:
            mask = make(layouts.reshape(mask, (array.shape[0],) + (1,) * (array.ndim - 1)))
        return [mask, host[()]]
    if not array.shape or any(k is None for k in key):
        raise Unsupported("setitem: of a 0-d array, or with a new axis")
    ranges, finish, _ = _basic(array.shape, key)
    n, rest_shape = array.shape[0], array.shape[1:]
    rest_key = tuple(
        r.start if isinstance(f, int) else _as_slice(r) for r, f in zip(ranges[1:], finish[1:], strict=True)
    )
    selected = np.broadcast_to(np.empty((), np.bool_), tuple(len(r) for r in ranges))[tuple(finish)].shape
    np.broadcast_to(host, selected)  # NumPy's error for a value of the wrong shape
    row_kept = isinstance(finish[0], slice)
    by_row = row_kept and host.ndim == len(selected) and host.ndim > 0 and host.shape[0] != 1
    rest_mask = np.zeros(rest_shape, np.bool_)
    rest_mask[rest_key] = True
    replacement: Any
    if by_row:
        if len(selected) != 1:
            raise Unsupported("setitem: a value that varies along rows and other axes")
        column = np.zeros(n, array.dtype)
        column[np.arange(ranges[0].start, ranges[0].stop, ranges[0].step)] = host
        replacement = column.reshape((n,) + (1,) * len(rest_shape))
    else:
        full_rest = np.zeros(rest_shape, array.dtype)
        full_rest[rest_key] = host[0] if row_kept and host.ndim == len(selected) else host
        replacement = full_rest if rest_shape else full_rest[()]
    if max(np.asarray(replacement).nbytes, rest_mask.nbytes) > INLINE_LIMIT:
        raise Unsupported("setitem: a value too large to send with each program")
    row_mask = np.zeros(n, np.bool_)
    row_mask[np.arange(ranges[0].start, ranges[0].stop, ranges[0].step)] = True
    row_cond = row_mask.reshape((n,) + (1,) * len(rest_shape))
    if rest_mask.all():
        return [row_cond, replacement]
    if row_mask.all():
        return [rest_mask, replacement]
    return [row_cond, make(dispatch.elementwise("where", [rest_mask, replacement, array]))]

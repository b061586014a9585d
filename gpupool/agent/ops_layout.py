"""Ordering and layout within a shard, and ``tmatmul`` (docs/contracts.md).

Many of these give views of their operand (a slice, a reshape, a transpose);
:func:`~gpupool.agent.ops.apply_op` copies such results, so a new buffer never shares an existing buffer's
memory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np

from gpupool.agent.opargs import (
    MAX_DIMS,
    VARIADIC,
    Expected,
    OpArgs,
    OpSpec,
    normalize_axes,
    normalize_axis,
    param_axis,
    refuse,
)

__all__ = ["TABLE"]


def _sort(xp: Any, name: str, operands: Sequence[Any], expect: Expected, args: OpArgs) -> Any:
    x = xp.asarray(operands[0])
    axis = param_axis(name, args, x.ndim)
    if name == "sort":
        return xp.sort(x, axis=axis)
    # Stable, so equal values keep their order on every backend (CuPy's argsort is stable and takes
    # no other kind).
    return xp.argsort(x, axis=axis, **({"kind": "stable"} if xp is np else {}))


def _partition(xp: Any, name: str, operands: Sequence[Any], expect: Expected, args: OpArgs) -> Any:
    # CuPy sorts the whole axis here: the k-th element and the sides agree with NumPy, the order within
    # each side need not.
    x = xp.asarray(operands[0])
    axis = normalize_axis(name, args.params[0], x.ndim)
    length = x.shape[axis]
    kth = args.params[1]
    if not -length <= kth < length:
        raise refuse(name, f"kth {kth} is out of range for an axis of length {length}")
    return xp.partition(x, kth % length, axis=axis)


def _range_slice(name: str, axis: int, length: int, start: int, stop: int, step: int) -> slice:
    """The slice that keeps ``range(start, stop, step)`` of an axis of ``length``.

    Raises:
        RpcRefusal: ``bad-request`` for a zero step or a range reaching outside ``[0, length)``.
    """
    if step == 0:
        raise refuse(name, f"axis {axis}: the step is 0")
    kept = range(start, stop, step)
    if not kept:
        return slice(0, 0)
    first, last = kept[0], kept[-1]
    if not (0 <= first < length and 0 <= last < length):
        raise refuse(name, f"axis {axis}: range({start}, {stop}, {step}) leaves [0, {length})")
    if step > 0:
        return slice(first, last + 1, step)
    return slice(first, last - 1 if last > 0 else None, step)  # -1 would count from the end


def _slice(xp: Any, name: str, operands: Sequence[Any], expect: Expected, args: OpArgs) -> Any:
    x = xp.asarray(operands[0])
    if len(args.params) % 3:
        raise refuse(name, f"takes (start, stop, step) per axis, got {len(args.params)} params")
    triples = [args.params[at : at + 3] for at in range(0, len(args.params), 3)]
    if len(triples) > x.ndim:
        raise refuse(name, f"slices {len(triples)} axes of an array of {x.ndim} dimension(s)")
    index = tuple(_range_slice(name, axis, x.shape[axis], *triple) for axis, triple in enumerate(triples))
    return x[index]


def _take(xp: Any, name: str, operands: Sequence[Any], expect: Expected, args: OpArgs) -> Any:
    x = xp.asarray(operands[0])
    indices = xp.asarray(operands[1])
    if indices.dtype.kind not in "iu":
        raise refuse(name, f"indices must be integers, got {indices.dtype}")
    axis = param_axis(name, args, x.ndim)
    length = x.size if axis is None else x.shape[axis]
    if indices.size:
        # Checked here because CuPy's take wraps indices out of range around (this waits for the device).
        low, high = int(indices.min()), int(indices.max())
        if low < -length or high >= length:
            bad = low if low < -length else high
            raise IndexError(f"index {bad} is out of bounds for an axis of size {length}")
    return xp.take(x, indices, axis=axis)


def _compress(xp: Any, name: str, operands: Sequence[Any], expect: Expected, args: OpArgs) -> Any:
    x = xp.asarray(operands[0])
    mask = xp.asarray(operands[1])
    if mask.dtype != np.bool_ or mask.ndim != 1:
        raise refuse(name, f"takes a 1-D bool mask, got {mask.dtype} of shape {tuple(mask.shape)}")
    if x.ndim == 0 or mask.shape[0] != x.shape[0]:
        raise refuse(name, f"a mask of {mask.shape[0]} rows for an array of shape {tuple(x.shape)}")
    return xp.compress(mask, x, axis=0)


def _transpose(xp: Any, name: str, operands: Sequence[Any], expect: Expected, args: OpArgs) -> Any:
    x = xp.asarray(operands[0])
    if not args.axes:
        return xp.transpose(x)
    axes = normalize_axes(name, args.axes, x.ndim)
    if len(axes) != x.ndim:
        raise refuse(name, f"axes {args.axes} are not a permutation of {x.ndim} axes")
    return xp.transpose(x, axes)


def _reshape(xp: Any, name: str, operands: Sequence[Any], expect: Expected, args: OpArgs) -> Any:
    x = xp.asarray(operands[0])
    shape = args.params
    if any(n < 0 for n in shape) or math.prod(shape) != x.size:
        raise refuse(name, f"cannot reshape {tuple(x.shape)} to {shape}")
    return xp.reshape(x, shape)


def _expand_dims(xp: Any, name: str, operands: Sequence[Any], expect: Expected, args: OpArgs) -> Any:
    x = xp.asarray(operands[0])
    return xp.expand_dims(x, normalize_axis(name, args.params[0], x.ndim + 1))


def _squeeze(xp: Any, name: str, operands: Sequence[Any], expect: Expected, args: OpArgs) -> Any:
    x = xp.asarray(operands[0])
    if not args.axes:
        return xp.squeeze(x)
    axes = normalize_axes(name, args.axes, x.ndim)
    if any(x.shape[axis] != 1 for axis in axes):
        raise refuse(name, f"axes {args.axes} of shape {tuple(x.shape)} are not all of length 1")
    return xp.squeeze(x, axis=axes)


def _concatenate(xp: Any, name: str, operands: Sequence[Any], expect: Expected, args: OpArgs) -> Any:
    arrays = [xp.asarray(operand) for operand in operands]
    if not args.params:
        return xp.concatenate([xp.ravel(array) for array in arrays])
    return xp.concatenate(arrays, axis=normalize_axis(name, args.params[0], arrays[0].ndim))


def _swapaxes(xp: Any, name: str, operands: Sequence[Any], expect: Expected, args: OpArgs) -> Any:
    x = xp.asarray(operands[0])
    first, second = (normalize_axis(name, axis, x.ndim) for axis in args.params)
    return xp.swapaxes(x, first, second)


def _tmatmul(xp: Any, name: str, operands: Sequence[Any], expect: Expected, args: OpArgs) -> Any:
    # x.T @ y of two arrays sharded alike by rows: each shard's product is a partial sum of the whole.
    x = xp.asarray(operands[0])
    if x.ndim not in (1, 2):
        raise refuse(name, f"takes a 1-D or 2-D first operand, got {x.ndim}-D")
    return xp.matmul(x.T, operands[1])


#: The ordering and layout ops of the op table, and ``tmatmul``.
TABLE: Final[Mapping[str, OpSpec]] = {
    "sort": OpSpec(1, _sort, params=(0, 1)),
    "argsort": OpSpec(1, _sort, params=(0, 1)),
    "partition": OpSpec(1, _partition, params=(2, 2)),
    "slice": OpSpec(1, _slice, params=(0, 3 * MAX_DIMS)),
    "take": OpSpec(2, _take, params=(0, 1)),
    "compress": OpSpec(2, _compress),
    "transpose": OpSpec(1, _transpose, axes=True),
    "reshape": OpSpec(1, _reshape, params=(0, MAX_DIMS)),
    "expand_dims": OpSpec(1, _expand_dims, params=(1, 1)),
    "squeeze": OpSpec(1, _squeeze, axes=True),
    "concatenate": OpSpec(VARIADIC, _concatenate, params=(0, 1)),
    "swapaxes": OpSpec(1, _swapaxes, params=(2, 2)),
    "tmatmul": OpSpec(2, _tmatmul),
}

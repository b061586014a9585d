"""Reductions, partial results the client combines across shards, and scans (docs/contracts.md).

Every reduction takes ``axes`` (none: all of them; the older ``has_axis``/``axis`` names one) and
``keepdims``, as NumPy's do. Where NumPy would warn with ``warnings.warn`` (an empty mean, an all-NaN
slice, ``ddof`` at or past the count) the same values are computed without the warning: warning filters
are process-wide, so an op cannot silence them for itself from a worker thread.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np

from gpupool.agent.opargs import Compute, Expected, OpArgs, OpSpec, param_axis, reduced_axes, refuse

__all__ = ["TABLE"]


def _count(shape: tuple[int, ...], axes: tuple[int, ...] | None) -> int:
    """How many elements each result of a reduction over ``axes`` reduces."""
    if axes is None:
        return math.prod(shape)
    return math.prod(shape[axis] for axis in axes)


def _kept_shape(shape: tuple[int, ...], axes: tuple[int, ...] | None) -> tuple[int, ...]:
    """The shape a reduction over ``axes`` gives without keepdims."""
    if axes is None:
        return ()
    return tuple(n for axis, n in enumerate(shape) if axis not in axes)


def _accumulator(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """The dtype NumPy's mean and var compute in: floats in their own, the rest in float64."""
    return dtype if dtype.kind == "f" else np.dtype(np.float64)


def _reduce(xp: Any, name: str, operands: Sequence[Any], expect: Expected, args: OpArgs) -> Any:
    x = xp.asarray(operands[0])
    axes = reduced_axes(name, args, x.ndim)
    return getattr(xp, name)(x, axis=axes, keepdims=args.keepdims)


def _mean(xp: Any, name: str, operands: Sequence[Any], expect: Expected, args: OpArgs) -> Any:
    x = xp.asarray(operands[0])
    if name == "nanmean" and x.dtype.kind == "f":
        return _nanmean(xp, x, reduced_axes(name, args, x.ndim), args.keepdims)
    axes = reduced_axes(name, args, x.ndim)
    if _count(tuple(x.shape), axes) > 0:
        return xp.mean(x, axis=axes, keepdims=args.keepdims)
    # NumPy warns "Mean of empty slice" and gives nan: 0 / 0 gives it silently.
    return xp.sum(x, axis=axes, keepdims=args.keepdims, dtype=_accumulator(x.dtype)) / 0


def _nanmean(xp: Any, x: Any, axes: tuple[int, ...] | None, keepdims: bool) -> Any:
    # NumPy's nanmean, less its warning for an all-NaN slice: the sum of the numbers over their count.
    missing = xp.isnan(x)
    total = xp.sum(xp.where(missing, 0, x), axis=axes, keepdims=keepdims)
    count = xp.sum(~missing, axis=axes, keepdims=keepdims)
    return total / count


def _nan_reduce(xp: Any, name: str, operands: Sequence[Any], expect: Expected, args: OpArgs) -> Any:
    x = xp.asarray(operands[0])
    axes = reduced_axes(name, args, x.ndim)
    if name in ("nanmax", "nanmin") and xp is np:
        # What numpy.nanmax computes, less its warning for an all-NaN slice. (CuPy's nanmax is used there;
        # it may warn the same way, with the same values.)
        extreme: Any = np.fmax if name == "nanmax" else np.fmin
        return extreme.reduce(x, axis=axes, keepdims=args.keepdims)
    return getattr(xp, name)(x, axis=axes, keepdims=args.keepdims)


def _count_nonzero(xp: Any, name: str, operands: Sequence[Any], expect: Expected, args: OpArgs) -> Any:
    # A sum rather than xp.count_nonzero: CuPy's takes no keepdims.
    x = xp.asarray(operands[0])
    axes = reduced_axes(name, args, x.ndim)
    return xp.sum(x != 0, axis=axes, keepdims=args.keepdims, dtype=np.int64)


def _variance(xp: Any, name: str, operands: Sequence[Any], expect: Expected, args: OpArgs) -> Any:
    x = xp.asarray(operands[0])
    axes = reduced_axes(name, args, x.ndim)
    ddof = args.params[0] if args.params else 0
    if ddof < 0:
        raise refuse(name, f"ddof {ddof} is negative")
    count = _count(tuple(x.shape), axes)
    if count - ddof > 0:
        return getattr(xp, name)(x, axis=axes, ddof=ddof, keepdims=args.keepdims)
    # NumPy warns "Degrees of freedom <= 0" and divides the squared deviations by zero (inf, or nan where
    # they are 0 or the slice is empty): the same, without the warning.
    acc = _accumulator(x.dtype)
    mean = xp.sum(x, axis=axes, keepdims=True, dtype=acc) / count
    squares = xp.sum(xp.square(x - mean), axis=axes, keepdims=args.keepdims, dtype=acc)
    variance = squares / 0
    return xp.sqrt(variance) if name == "std" else variance


def _single_axis(name: str, args: OpArgs, ndim: int) -> int | None:
    """The one axis of argmax and argmin (None: the flattened array)."""
    axes = reduced_axes(name, args, ndim)
    if axes is None:
        return None
    if len(axes) != 1:
        raise refuse(name, f"takes one axis or none, got {len(axes)}")
    return axes[0]


def _arg_extreme(xp: Any, name: str, operands: Sequence[Any], expect: Expected, args: OpArgs) -> Any:
    x = xp.asarray(operands[0])
    axis = _single_axis(name, args, x.ndim)
    return getattr(xp, name)(x, axis=axis, keepdims=args.keepdims)


def _moments(xp: Any, name: str, operands: Sequence[Any], expect: Expected, args: OpArgs) -> Any:
    # count, mean and M2 (the sum of squared deviations from the mean), stacked on a new leading axis,
    # for Chan's parallel combination; as numpy.var computes them (two passes), in the result's float
    # dtype. An empty slice gives count 0, mean 0 and M2 0, which the combination ignores as it should.
    x = xp.asarray(operands[0])
    axes = reduced_axes(name, args, x.ndim)
    acc = _accumulator(expect.dtype)
    count = _count(tuple(x.shape), axes)
    total = xp.sum(x, axis=axes, keepdims=True, dtype=acc)
    if count == 0:
        mean = xp.zeros_like(total)
        squares = xp.zeros_like(total)
    else:
        mean = total / count
        squares = _squared_deviations(xp, x, mean, axes, acc)
    counts = xp.full(total.shape, count, dtype=acc)
    stacked = xp.stack([counts, mean.astype(acc, copy=False), squares])
    if args.keepdims:
        return stacked
    return stacked.reshape((3, *_kept_shape(tuple(x.shape), axes)))


#: Rows per block of the NumPy agent's second pass over a shard: about this many bytes, cache-sized.
_BLOCK_BYTES: Final = 1 << 18


def _squared_deviations(xp: Any, x: Any, mean: Any, axes: tuple[int, ...] | None, acc: np.dtype[Any]) -> Any:
    """The sum over ``axes`` (None: all) of ``|x - mean|**2``, keepdims. NumPy agents go over row blocks
    of about :data:`_BLOCK_BYTES` when axis 0 is reduced, so the deviations never make a shard-sized
    temporary (the first pass, the mean, reads the shard once; this is the second); CuPy squares in place."""

    def block_sum(block: Any) -> Any:
        deviations = block - mean
        if deviations.dtype.kind == "c":
            deviations = xp.abs(deviations)
        xp.multiply(deviations, deviations, out=deviations)
        return xp.sum(deviations, axis=axes, keepdims=True, dtype=acc)

    if xp is not np or x.ndim == 0 or x.shape[0] == 0 or (axes is not None and 0 not in axes):
        return block_sum(x)
    step = max(1, _BLOCK_BYTES // max(1, x[0].nbytes))
    squares = block_sum(x[:step])
    for start in range(step, x.shape[0], step):
        squares += block_sum(x[start : start + step])
    return squares


def _arg_partial(xp: Any, name: str, operands: Sequence[Any], expect: Expected, args: OpArgs) -> Any:
    # The extreme value and its index (along the axis, or into the flattened shard), stacked on a new
    # leading axis, both in the result's dtype.
    x = xp.asarray(operands[0])
    axis = _single_axis(name, args, x.ndim)
    index = getattr(xp, name.removesuffix("_partial"))(x, axis=axis, keepdims=True)
    value = xp.take(xp.ravel(x), index) if axis is None else xp.take_along_axis(x, index, axis=axis)
    if not args.keepdims:
        shape = _kept_shape(tuple(x.shape), None if axis is None else (axis,))
        index = index.reshape(shape)
        value = value.reshape(shape)
    return xp.stack([value.astype(expect.dtype), index.astype(expect.dtype)])


def _scan(xp: Any, name: str, operands: Sequence[Any], expect: Expected, args: OpArgs) -> Any:
    x = xp.asarray(operands[0])
    return getattr(xp, name)(x, axis=param_axis(name, args, x.ndim))


def _reduction(compute: Compute, params: int = 0) -> OpSpec:
    return OpSpec(1, compute, params=(0, params), axes=True, keepdims=True)


#: The reductions, partials and scans of the op table.
TABLE: Final[Mapping[str, OpSpec]] = {
    **{name: _reduction(_reduce) for name in ("sum", "prod", "max", "min", "any", "all")},
    "mean": _reduction(_mean),
    "nanmean": _reduction(_mean),
    "var": _reduction(_variance, params=1),
    "std": _reduction(_variance, params=1),
    "argmax": _reduction(_arg_extreme),
    "argmin": _reduction(_arg_extreme),
    "count_nonzero": _reduction(_count_nonzero),
    **{name: _reduction(_nan_reduce) for name in ("nansum", "nanprod", "nanmax", "nanmin")},
    "moments": _reduction(_moments),
    "argmax_partial": _reduction(_arg_partial),
    "argmin_partial": _reduction(_arg_partial),
    "cumsum": OpSpec(1, _scan, params=(0, 1)),
    "cumprod": OpSpec(1, _scan, params=(0, 1)),
}

"""Reductions with NumPy's signatures: ``axis`` (None, an int or a tuple), ``keepdims`` and ``ddof``.

Over axes that leave the sharded axis 0 alone, a reduction is one more pending op per shard (the spec of a
remote array). Over axes that include it (or over all of them), each shard computes what is pending and a
*partial* in the same program; the partials come back and are combined here into a NumPy value, as
docs/contracts.md describes: sums and extremes of partials; ``moments`` (count, mean, M2) merged with Chan's
formula for ``var`` and ``std``; ``argmax_partial``/``argmin_partial`` (value, index) for ``argmax`` and
``argmin``, where the first shard wins on ties and the first NaN wins. Like :mod:`~gpupool.client.dispatch`
this module makes no arrays.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Final

import numpy as np
from numpy.lib.array_utils import normalize_axis_tuple

from gpupool.client.dispatch import Unsupported, depth_after, pending_spec
from gpupool.client.graph import ArraySpec, GraphArray, Node
from gpupool.client.values import PendingValue, Request, run_requests

__all__ = ["ARG_REDUCTIONS", "REDUCTIONS", "reduce", "run_partials"]

#: Partials of these are the same op over the same axes, combined across shards by the function named.
_COMBINE: Final[dict[str, Callable[..., Any]]] = {
    "sum": np.sum,
    "prod": np.prod,
    "max": np.max,
    "min": np.min,
    "any": np.any,
    "all": np.all,
    "count_nonzero": np.sum,
    "nansum": np.sum,
    "nanprod": np.prod,
    "nanmax": np.fmax.reduce,
    "nanmin": np.fmin.reduce,
}
#: Every reduction :func:`reduce` takes.
REDUCTIONS: Final = frozenset({*_COMBINE, "mean", "nanmean", "var", "std", "argmax", "argmin"})
#: The ones that give indices and take one axis or none.
ARG_REDUCTIONS: Final = frozenset({"argmax", "argmin"})
_FLOAT64: Final = np.dtype(np.float64)
_INT64: Final = np.dtype(np.int64)


@functools.cache
def _result_dtype(op: str, dtype: np.dtype[Any]) -> np.dtype[Any]:
    """NumPy's result dtype for reduction ``op`` of ``dtype`` (worked out once per pair, then remembered)."""
    if op in ARG_REDUCTIONS or op == "count_nonzero":
        return _INT64
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return np.asarray(getattr(np, op)(np.ones((1,), dtype))).dtype


def _axes(op: str, axis: object, ndim: int) -> tuple[int, ...]:
    """The reduced axes, normalized and sorted (all of them for None).

    Raises:
        numpy.exceptions.AxisError: an axis out of range; ValueError: a repeated one (NumPy's errors).
        Unsupported: ``axis=()`` or a tuple of axes for argmax/argmin.
    """
    if axis is None:
        return tuple(range(ndim))
    if op in ARG_REDUCTIONS and not isinstance(axis, int | np.integer):
        raise TypeError(f"{op}: axis must be an integer or None, not {axis!r}")
    axes = tuple(sorted(normalize_axis_tuple(axis, ndim)))  # type: ignore[arg-type]
    if not axes:
        raise Unsupported(f"{op}: axis=() is not supported on remote arrays")
    return axes


def reduce(
    array: GraphArray, op: str, axis: object = None, *, keepdims: bool = False, ddof: float = 0
) -> ArraySpec | Any:
    """``np.<op>(array, axis=, keepdims=[, ddof=])`` for the ops of :data:`REDUCTIONS`.

    Returns the spec of a pending remote array when the sharded axis 0 is not reduced; otherwise a
    :class:`~gpupool.client.values.PendingValue` whose value is NumPy's (a NumPy scalar, or a Python int for
    ``count_nonzero`` over everything) and NumPy's own answer for no data.

    Raises:
        numpy.exceptions.AxisError, ValueError, TypeError: as NumPy for the same arguments (an empty
            max or argmax, a repeated axis).
        Unsupported: arguments gpupool does not run on the pool (``axis=()``, a negative or fractional ddof
            over other axes).
        RemoteError: an agent refused the program.
    """
    array.check()
    shape, ndim = array.shape, array.ndim
    axes = _axes(op, axis, ndim)
    dtype = _result_dtype(op, array.dtype)
    out_shape = tuple(1 if i in axes else n for i, n in enumerate(shape) if keepdims or i not in axes)
    arg_axis = None if axis is None else axes[0]
    if math.prod(shape) == 0 or ndim == 0:
        host = np.empty(shape, array.dtype)  # NumPy's own answer (or error) for no data
        kwargs: dict[str, Any] = {"ddof": ddof} if op in ("var", "std") else {}
        return getattr(np, op)(
            host, axis=arg_axis if op in ARG_REDUCTIONS else axes, keepdims=keepdims, **kwargs
        )
    if 0 not in axes:
        params: tuple[int, ...] = ()
        if op in ("var", "std") and ddof != 0:
            if int(ddof) != ddof or ddof < 0:
                raise Unsupported(f"{op}: ddof={ddof} is supported over the sharded axis only")
            params = (int(ddof),)
        node = Node(op, (array,), depth=depth_after([array]), params=params, axes=axes, keepdims=keepdims)
        return pending_spec(out_shape, dtype, array, node)
    if op in ARG_REDUCTIONS:
        requests, combine = _arg_over_rows(array, op, arg_axis)
    elif op in ("var", "std"):
        requests, combine = _variance_over_rows(array, op, axes, ddof)
    elif op in ("mean", "nanmean"):
        requests, combine = _mean_over_rows(array, op, axes)
    else:
        requests = [
            Request(array=array, op=op, partial_shape=_keeping(array.shape, axes), axes=axes, dtype=dtype)
        ]

        def combine(partials: Sequence[Sequence[np.ndarray]]) -> Any:
            return _COMBINE[op](np.concatenate(partials[0]), axis=0, keepdims=True)

    def finish(partials: Sequence[Sequence[np.ndarray]]) -> Any:
        result = np.asarray(combine(partials)).astype(dtype, copy=False).reshape(out_shape)
        if op == "count_nonzero" and axis is None and not keepdims:
            return int(result)
        return result[()] if result.ndim == 0 else result

    return PendingValue(requests, finish, shape=out_shape, dtype=dtype)


def _keeping(shape: tuple[int, ...], axes: tuple[int, ...]) -> Callable[[int], tuple[int, ...]]:
    """A shard's partial shape with keepdims: reduced axes of length 1."""
    return lambda rows: _kept(rows, shape, axes)


def _kept(rows: int, shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, ...]:
    """A shard's partial with keepdims: reduced axes of length 1."""
    return tuple(1 if i in axes else n for i, n in enumerate((rows, *shape[1:])))


def run_partials(
    array: GraphArray,
    op: str,
    partial_shape: Callable[[int], tuple[int, ...]],
    axes: tuple[int, ...] | None,
    dtype: np.dtype[Any],
    *,
    keepdims: bool = True,
    prepare: str | None = None,
) -> list[np.ndarray]:
    """Compute ``array``'s pending graph and ``op`` of it on each non-empty shard, in one program per shard;
    returns the partials in row order. ``prepare`` is a unary op applied first (``isnan``)."""
    request = Request(
        array=array,
        op=op,
        partial_shape=partial_shape,
        axes=axes,
        dtype=dtype,
        keepdims=keepdims,
        prepare=prepare,
    )
    return run_requests([request], what=op)[0]


def _count(shape: Sequence[int], axes: tuple[int, ...]) -> int:
    return math.prod(shape[i] for i in axes)


Planned = tuple[list[Request], Callable[[Sequence[Sequence[np.ndarray]]], Any]]


def _mean_over_rows(array: GraphArray, op: str, axes: tuple[int, ...]) -> Planned:
    # Sums in float64 over their count; nanmean counts the numbers (not NaN) of each slice.
    kept = _keeping(array.shape, axes)
    partial_op = "nansum" if op == "nanmean" else "sum"
    requests = [Request(array=array, op=partial_op, partial_shape=kept, axes=axes, dtype=_FLOAT64)]
    count_nans = op == "nanmean" and array.dtype.kind == "f"
    if count_nans:
        requests.append(
            Request(
                array=array, op="count_nonzero", partial_shape=kept, axes=axes, dtype=_INT64, prepare="isnan"
            )
        )

    def combine(partials: Sequence[Sequence[np.ndarray]]) -> Any:
        total = np.sum(np.concatenate(partials[0]), axis=0, keepdims=True)
        count = np.asarray(_count(array.shape, axes))
        if count_nans:
            count = count - np.sum(np.concatenate(partials[1]), axis=0, keepdims=True)
        with np.errstate(all="ignore"):
            return np.asarray(total / count)

    return requests, combine


def _variance_over_rows(array: GraphArray, op: str, axes: tuple[int, ...], ddof: float) -> Planned:
    # Chan et al.: merge (count, mean, M2) shard by shard; then M2 / (n - ddof), as NumPy (max(n - ddof, 0)).
    shape = array.shape
    requests = [
        Request(
            array=array,
            op="moments",
            partial_shape=lambda rows: (3, *_kept(rows, shape, axes)),
            axes=axes,
            dtype=_FLOAT64,
        )
    ]

    def combine(partials: Sequence[Sequence[np.ndarray]]) -> Any:
        moments = partials[0]
        count, mean, m2 = (np.asarray(part) for part in moments[0])
        with np.errstate(all="ignore"):
            for partial in moments[1:]:
                nb, mean_b, m2_b = partial
                total = count + nb
                delta = mean_b - mean
                share = np.where(total > 0, nb / np.where(total > 0, total, 1), 0)
                mean = mean + delta * share
                m2 = m2 + m2_b + delta * delta * count * share
                count = total
            variance = m2 / np.maximum(count - ddof, 0)
            return np.sqrt(variance) if op == "std" else variance

    return requests, combine


def _arg_over_rows(array: GraphArray, op: str, axis: int | None) -> Planned:
    # Each shard's (value, index); global indices from the shard's first row; np.argmax/argmin over the
    # shards then picks the first extreme and the first NaN, as NumPy does over the whole array.
    kind = _FLOAT64 if array.dtype.kind == "f" else _INT64
    shape = array.shape
    row_size = math.prod(shape[1:])
    axes = None if axis is None else (0,)
    part_shape = (2,) if axis is None else (2, *shape[1:])
    requests = [
        Request(
            array=array,
            op=f"{op}_partial",
            partial_shape=lambda rows: part_shape,
            axes=axes,
            dtype=kind,
            keepdims=False,
        )
    ]
    starts = [p.start for p in array.layout if p.stop > p.start]

    def combine(all_partials: Sequence[Sequence[np.ndarray]]) -> Any:
        partials = all_partials[0]
        values = np.stack([part[0] for part in partials])
        indices = np.stack(
            [
                part[1].astype(np.int64) + (start if axis is not None else start * row_size)
                for part, start in zip(partials, starts, strict=True)
            ]
        )
        winner = getattr(np, op)(values, axis=0, keepdims=True)
        picked: np.ndarray = np.take_along_axis(indices, winner, axis=0)[0]
        return picked

    return requests, combine

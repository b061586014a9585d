"""NumPy functions the pool runs as compositions of the operations it runs: einsum's common contractions,
``linalg.norm``, ``cov``, ``median``/``percentile``/``quantile``, ``unique``, ``ptp``, ``average``, ``diff``,
``vstack``, ``stack`` along axis 0, ``take`` and the ``*_like`` creators.

Each handler takes NumPy's signature and works on remote arrays with NumPy calls (which dispatch to them), so
every step runs where the shards are; it raises :class:`~gpupool.client.dispatch.Unsupported` up front for
arguments it does not compose, and the call runs on the host copy with the one-time warning. Importing this
module registers the handlers with :mod:`gpupool.client.numpy_api` (the client package imports it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Final

import numpy as np

from gpupool.client import creation, numpy_api
from gpupool.client.array import RemoteArray
from gpupool.client.dispatch import Unsupported

__all__ = ["HANDLERS", "quantile_of", "vector_norm"]


def _remote(value: Any, name: str) -> RemoteArray:
    if not isinstance(value, RemoteArray):
        raise Unsupported(f"{name}: the first argument is not a remote array")
    return value


def _unset(name: str, **given: Any) -> None:
    """Refuse options the composition does not take (left at NumPy's defaults they are fine)."""
    for key, value in given.items():
        if value is not None and value is not np._NoValue and value is not False:
            raise Unsupported(f"{name}: {key}= runs on the host")


# -- creation ---------------------------------------------------------------------------------------------
def _like(fill: int | None) -> Callable[..., Any]:
    def handle(
        a: Any,
        *args: Any,
        dtype: Any = None,
        order: str = "K",
        subok: bool = True,
        shape: Any = None,
        **rest: Any,
    ) -> Any:
        value = fill
        if fill is None:  # full_like(a, fill_value, dtype=None, ...)
            if not args and "fill_value" not in rest:
                raise Unsupported("full_like: no fill value")
            value = args[0] if args else rest.pop("fill_value")
            args = args[1:]
        if args:
            dtype, *more = args
            if more:
                raise Unsupported("*_like: order/subok/shape given by position")
        if order not in ("K", "C", "A") or not subok or rest.pop("device", None) not in (None, "cpu") or rest:
            raise Unsupported("*_like: order, subok or device run on the host")
        return creation.full_like(_remote(a, "full_like"), value, dtype, shape)

    return handle


# -- norms, statistics --------------------------------------------------------------------------------------
def vector_norm(x: RemoteArray, *, axis: Any = None, keepdims: bool = False, ord: Any = 2) -> Any:
    """The ``ord``-norm (1, 2, inf, -inf) of a floating remote array's vectors along ``axis`` (None: all its
    elements as one vector), on the pool.

    Raises:
        Unsupported: another order or dtype.
    """
    if x.dtype.kind not in "fc" or ord not in (1, 2, math.inf, -math.inf):
        raise Unsupported(f"norm: ord={ord!r} of {x.dtype}")
    magnitude = np.absolute(x)
    if ord == 2:
        return np.sqrt(np.sum(magnitude * magnitude, axis=axis, keepdims=keepdims))
    if ord == 1:
        return np.sum(magnitude, axis=axis, keepdims=keepdims)
    return (np.max if ord == math.inf else np.min)(magnitude, axis=axis, keepdims=keepdims)


def _norm(x: Any, ord: Any = None, axis: Any = None, keepdims: bool = False) -> Any:
    array = _remote(x, "norm")
    if ord is None and (axis is None or isinstance(axis, int)):
        return vector_norm(array, axis=axis, keepdims=keepdims, ord=2)
    if isinstance(axis, int) or array.ndim == 1:
        return vector_norm(array, axis=axis, keepdims=keepdims, ord=ord)
    raise Unsupported("norm: matrix norms run on the host")


def _cov(
    m: Any,
    y: Any = None,
    rowvar: bool = True,
    bias: bool = False,
    ddof: Any = None,
    fweights: Any = None,
    aweights: Any = None,
    *,
    dtype: Any = None,
) -> Any:
    array = _remote(m, "cov")
    _unset("cov", y=y, fweights=fweights, aweights=aweights, dtype=dtype)
    if array.ndim != 2 or array.dtype.kind not in "biuf":
        raise Unsupported("cov: of other than a 2-D real array")
    work = array.astype(np.result_type(array.dtype, np.float64))
    samples = array.shape[1] if rowvar else array.shape[0]
    delta = (0 if bias else 1) if ddof is None else int(ddof)
    if rowvar:  # variables are the rows: centre each row, then the rows' inner products (agent to agent)
        centred = work - np.mean(work, axis=1, keepdims=True)
        product = centred @ centred.T
    else:  # variables are the columns: centre each column, then x.T @ x (partials combined)
        centred = work - np.mean(work, axis=0, keepdims=True)
        product = centred.T @ centred
    return product / max(samples - delta, 0)


def quantile_of(a: RemoteArray, q: float, axis: Any, keepdims: bool) -> Any:
    """NumPy's linear-method ``quantile(a, q, axis)`` from a sort on the pool: the two order statistics
    around ``q * (n - 1)`` interpolated as NumPy does, NaN wherever the slice holds one.

    Raises:
        Unsupported: complex or bool data, an axis that is not an int or None, an empty axis.
    """
    if a.dtype.kind not in "iuf" or not (axis is None or isinstance(axis, int)):
        raise Unsupported("quantile: of complex or bool data, or over several axes")
    data: Any
    if axis is None:
        data, along = np.reshape(a, (-1,)), 0
    else:
        data, along = a, int(np.lib.array_utils.normalize_axis_index(axis, a.ndim))
    count = data.shape[along]
    if count == 0 or a.size == 0:
        raise Unsupported("quantile: of an empty axis")
    if data.dtype.kind != "f":
        data = data.astype(np.float64)
    ordered = np.sort(data, axis=along)
    position = q * (count - 1)
    low = min(math.floor(position), count - 1)
    high = min(low + 1, count - 1)
    gamma = position - low

    def at(index: int) -> Any:
        key: list[Any] = [slice(None)] * data.ndim
        key[along] = index
        return ordered[tuple(key)]

    below, above = at(low), at(high)
    step = above - below
    value = above - step * (1 - gamma) if gamma >= 0.5 else below + step * gamma
    if data.dtype.kind == "f":
        holes = np.any(np.isnan(data), axis=along)
        value = np.where(holes, np.nan, value)
    if keepdims:
        value = np.expand_dims(value, along) if axis is not None else np.reshape(value, (1,) * a.ndim)
    return value


def _scalar_q(q: Any, scale: float) -> float:
    if not isinstance(q, int | float | np.integer | np.floating):
        raise Unsupported("quantile: of several q at once")
    value = float(q) / scale
    if not 0 <= value <= 1:
        raise ValueError(
            "Percentiles must be in the range [0, 100]" if scale == 100 else "Quantiles must be in [0, 1]"
        )
    return value


def _quantile_handler(name: str, scale: float) -> Callable[..., Any]:
    def handle(
        a: Any,
        q: Any,
        axis: Any = None,
        out: Any = None,
        overwrite_input: bool = False,
        method: str = "linear",
        keepdims: bool = False,
        *,
        weights: Any = None,
        interpolation: Any = None,
    ) -> Any:
        _unset(name, out=out, weights=weights, interpolation=interpolation)
        if method != "linear":
            raise Unsupported(f"{name}: method={method!r}")
        return quantile_of(_remote(a, name), _scalar_q(q, scale), axis, bool(keepdims))

    return handle


def _median(
    a: Any, axis: Any = None, out: Any = None, overwrite_input: bool = False, keepdims: bool = False
) -> Any:
    _unset("median", out=out)
    return quantile_of(_remote(a, "median"), 0.5, axis, bool(keepdims))


def _ptp(a: Any, axis: Any = None, out: Any = None, keepdims: Any = np._NoValue) -> Any:
    _unset("ptp", out=out)
    array = _remote(a, "ptp")
    keep = bool(keepdims) if keepdims is not np._NoValue else False
    return np.max(array, axis=axis, keepdims=keep) - np.min(array, axis=axis, keepdims=keep)


def _average(
    a: Any, axis: Any = None, weights: Any = None, returned: bool = False, *, keepdims: Any = np._NoValue
) -> Any:
    _unset("average", weights=weights, returned=returned)
    keep = bool(keepdims) if keepdims is not np._NoValue else False
    return np.mean(_remote(a, "average"), axis=axis, keepdims=keep)


# -- sets, differences, stacking ---------------------------------------------------------------------------
def _unique(
    ar: Any,
    return_index: bool = False,
    return_inverse: bool = False,
    return_counts: bool = False,
    axis: Any = None,
    *,
    equal_nan: bool = True,
    sorted: bool = True,
) -> Any:
    _unset("unique", return_index=return_index, return_inverse=return_inverse, return_counts=return_counts)
    array = _remote(ar, "unique")
    if axis is not None or array.size == 0 or array.dtype.kind == "c":
        raise Unsupported("unique: along an axis, of an empty or complex array")
    ordered = np.sort(np.reshape(array, (-1,)))
    first, rest, previous = ordered[:1], ordered[1:], ordered[:-1]
    fresh = rest != previous
    if equal_nan and array.dtype.kind == "f":  # NaNs sort last; keep the first of them only
        fresh = fresh & ~(np.isnan(rest) & np.isnan(previous))
    return np.concatenate([first, rest[fresh]])


def _diff(a: Any, n: int = 1, axis: int = -1, prepend: Any = np._NoValue, append: Any = np._NoValue) -> Any:
    array = _remote(a, "diff")
    if prepend is not np._NoValue or append is not np._NoValue or array.ndim == 0:
        raise Unsupported("diff: prepend/append run on the host")
    along = int(np.lib.array_utils.normalize_axis_index(axis, array.ndim))
    if along == 0 or n < 0:
        raise Unsupported("diff: along the sharded axis")
    result: Any = array
    for _ in range(n):
        later: list[Any] = [slice(None)] * array.ndim
        earlier: list[Any] = [slice(None)] * array.ndim
        later[along], earlier[along] = slice(1, None), slice(None, -1)
        result = (
            np.not_equal(result[tuple(later)], result[tuple(earlier)])
            if result.dtype == np.bool_
            else result[tuple(later)] - result[tuple(earlier)]
        )
    return result


def _arrays(name: str, tup: Any) -> list[RemoteArray]:
    arrays = list(tup)
    if not arrays or not all(isinstance(x, RemoteArray) for x in arrays):
        raise Unsupported(f"{name}: of other than remote arrays")
    return arrays


def _vstack(tup: Any, *, dtype: Any = None, casting: Any = "same_kind") -> Any:
    _unset("vstack", dtype=dtype)
    arrays = _arrays("vstack", tup)
    if any(x.ndim < 2 for x in arrays):
        raise Unsupported("vstack: of 1-D arrays")
    return np.concatenate(arrays, axis=0)


def _stack(
    arrays: Any, axis: int = 0, out: Any = None, *, dtype: Any = None, casting: Any = "same_kind"
) -> Any:
    _unset("stack", out=out, dtype=dtype)
    members = _arrays("stack", arrays)
    shape = members[0].shape
    if axis != 0 or any(x.shape != shape for x in members) or not shape:
        raise Unsupported("stack: along another axis (per shard) or of different shapes")
    return np.reshape(np.concatenate(members, axis=0), (len(members), *shape))


def _take(a: Any, indices: Any, axis: Any = None, out: Any = None, mode: str = "raise") -> Any:
    _unset("take", out=out)
    array = _remote(a, "take")
    if axis is None or mode != "raise" or not isinstance(indices, list | tuple | np.ndarray):
        raise Unsupported("take: of the flattened array, with a mode, or a scalar index")
    along = int(np.lib.array_utils.normalize_axis_index(axis, array.ndim))
    return array[(slice(None),) * along + (np.asarray(indices),)]


# -- einsum ------------------------------------------------------------------------------------------------
def _order(result: Any, have: Sequence[str], want: str) -> Any:
    if list(have) == list(want):
        return result
    return np.transpose(result, [list(have).index(letter) for letter in want])


def _einsum(subscripts: Any, *operands: Any, out: Any = None, optimize: Any = False, **rest: Any) -> Any:
    _unset("einsum", out=out)
    if rest or not isinstance(subscripts, str) or "->" not in subscripts or "." in subscripts:
        raise Unsupported("einsum: implicit output, ellipses or options")
    spec, output = subscripts.replace(" ", "").split("->")
    inputs = spec.split(",")
    if (
        len(inputs) != len(operands)
        or any(len(set(s)) != len(s) for s in inputs)
        or len(set(output)) != len(output)
    ):
        raise Unsupported("einsum: repeated indices (diagonals, traces)")
    if not any(isinstance(x, RemoteArray) for x in operands):
        raise Unsupported("einsum: no remote operand")
    if len(operands) == 1:
        (letters,), (x,) = inputs, operands
        summed = tuple(i for i, letter in enumerate(letters) if letter not in output)
        reduced = np.sum(x, axis=summed) if summed else x
        return _order(reduced, [letter for letter in letters if letter in output], output)
    if len(operands) != 2:
        raise Unsupported("einsum: of more than two operands")
    (sa, sb), (a, b) = inputs, operands
    shared = [letter for letter in sa if letter in sb]
    if any(letter in output for letter in shared):  # an elementwise product, then sums
        if set(sa) != set(sb):
            raise Unsupported("einsum: batch indices with free ones")
        aligned = b if sa == sb else np.transpose(b, [sb.index(letter) for letter in sa])
        product = a * aligned
        summed = tuple(i for i, letter in enumerate(sa) if letter not in output)
        reduced = np.sum(product, axis=summed) if summed else product
        return _order(reduced, [letter for letter in sa if letter in output], output)
    if len(shared) != 1 or len(sa) > 2 or len(sb) > 2:
        raise Unsupported("einsum: outer products and multiple contractions")
    (letter,) = shared
    left = a if sa[-1] == letter else a.T
    right = b if sb[0] == letter else b.T
    free = [x for x in sa if x != letter] + [x for x in sb if x != letter]
    if set(free) != set(output):
        raise Unsupported("einsum: a free index summed away")
    return _order(left @ right, free, output)


#: What this module registers with :mod:`gpupool.client.numpy_api`.
HANDLERS: Final[dict[str, Callable[..., Any]]] = {
    "zeros_like": _like(0),
    "ones_like": _like(1),
    "empty_like": _like(0),
    "full_like": _like(None),
    "norm": _norm,
    "cov": _cov,
    "median": _median,
    "percentile": _quantile_handler("percentile", 100.0),
    "quantile": _quantile_handler("quantile", 1.0),
    "ptp": _ptp,
    "average": _average,
    "unique": _unique,
    "diff": _diff,
    "vstack": _vstack,
    "stack": _stack,
    "einsum": _einsum,
    "take": _take,
}

numpy_api.register(HANDLERS)

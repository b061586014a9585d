"""The functions of the ``gpupool`` namespace: NumPy's names and the Array API standard's (2024.12).

``import gpupool as gp`` is an Array API namespace: ``gp.asarray``, ``gp.sin``, ``gp.sum``... take and give
arrays of the namespace (remote arrays, and the 0-d arrays and small results the client keeps), with the
standard's signatures. Each runs NumPy's function of the same meaning through
:func:`gpupool.client.namespace.call`: on the pool where gpupool runs it there, else on the host copy with
:class:`~gpupool.HostFallbackWarning` (``gp.coverage()`` counts which). Creation functions
(:mod:`gpupool._creation`) make arrays on the current pool.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from gpupool._errors import UsageError
from gpupool.client.array import RemoteArray
from gpupool.client.device import check_device
from gpupool.client.namespace import call, lift, to_namespace
from gpupool.client.values import PendingValue
from gpupool.protocol.opnames import ELEMENTWISE

__all__ = [
    *sorted(ELEMENTWISE | {"true_divide"}),
    "abs",
    "acos",
    "acosh",
    "all",
    "any",
    "argmax",
    "argmin",
    "argsort",
    "asin",
    "asinh",
    "astype",
    "atan",
    "atan2",
    "atanh",
    "bitwise_invert",
    "bitwise_left_shift",
    "bitwise_right_shift",
    "broadcast_arrays",
    "broadcast_to",
    "can_cast",
    "clip",
    "concat",
    "concatenate",
    "conj",
    "count_nonzero",
    "cumulative_prod",
    "cumulative_sum",
    "diff",
    "e",
    "expand_dims",
    "finfo",
    "flip",
    "iinfo",
    "imag",
    "inf",
    "isdtype",
    "matmul",
    "matrix_transpose",
    "max",
    "mean",
    "min",
    "moveaxis",
    "nan",
    "newaxis",
    "nonzero",
    "permute_dims",
    "pi",
    "pow",
    "prod",
    "real",
    "repeat",
    "reshape",
    "result_type",
    "roll",
    "round",
    "searchsorted",
    "sort",
    "squeeze",
    "stack",
    "std",
    "sum",
    "take",
    "take_along_axis",
    "tensordot",
    "tile",
    "unique_all",
    "unique_counts",
    "unique_inverse",
    "unique_values",
    "unstack",
    "var",
    "vecdot",
    "where",
]

e: Final = np.e
inf: Final = np.inf
nan: Final = np.nan
pi: Final = np.pi
newaxis: Final = None

# -- elementwise: NumPy's ufuncs, under NumPy's names and the standard's -------------------------------
add = lift(np.add)
subtract = lift(np.subtract)
multiply = lift(np.multiply)
divide = true_divide = lift(np.divide)
floor_divide = lift(np.floor_divide)
remainder = lift(np.remainder)
power = pow = lift(np.power)
float_power = lift(np.float_power)
maximum = lift(np.maximum)
minimum = lift(np.minimum)
fmax = lift(np.fmax)
fmin = lift(np.fmin)
arctan2 = atan2 = lift(np.arctan2)
hypot = lift(np.hypot)
copysign = lift(np.copysign)
nextafter = lift(np.nextafter)
logaddexp = lift(np.logaddexp)
equal = lift(np.equal)
not_equal = lift(np.not_equal)
less = lift(np.less)
less_equal = lift(np.less_equal)
greater = lift(np.greater)
greater_equal = lift(np.greater_equal)
logical_and = lift(np.logical_and)
logical_or = lift(np.logical_or)
logical_xor = lift(np.logical_xor)
logical_not = lift(np.logical_not)
bitwise_and = lift(np.bitwise_and)
bitwise_or = lift(np.bitwise_or)
bitwise_xor = lift(np.bitwise_xor)
left_shift = bitwise_left_shift = lift(np.left_shift)
right_shift = bitwise_right_shift = lift(np.right_shift)
invert = bitwise_invert = lift(np.invert)
negative = lift(np.negative)
positive = lift(np.positive)
absolute = abs = lift(np.absolute)
sign = lift(np.sign)
signbit = lift(np.signbit)
reciprocal = lift(np.reciprocal)
conjugate = conj = lift(np.conjugate)
exp = lift(np.exp)
exp2 = lift(np.exp2)
expm1 = lift(np.expm1)
log = lift(np.log)
log2 = lift(np.log2)
log10 = lift(np.log10)
log1p = lift(np.log1p)
sqrt = lift(np.sqrt)
cbrt = lift(np.cbrt)
square = lift(np.square)
sin = lift(np.sin)
cos = lift(np.cos)
tan = lift(np.tan)
arcsin = asin = lift(np.arcsin)
arccos = acos = lift(np.arccos)
arctan = atan = lift(np.arctan)
sinh = lift(np.sinh)
cosh = lift(np.cosh)
tanh = lift(np.tanh)
arcsinh = asinh = lift(np.arcsinh)
arccosh = acosh = lift(np.arccosh)
arctanh = atanh = lift(np.arctanh)
floor = lift(np.floor)
ceil = lift(np.ceil)
rint = lift(np.rint)
trunc = lift(np.trunc)
isnan = lift(np.isnan)
isinf = lift(np.isinf)
isfinite = lift(np.isfinite)
real = lift(np.real)
imag = lift(np.imag)


def clip(x: Any, /, min: Any = None, max: Any = None) -> Any:
    """``x`` limited to ``[min, max]`` (either may be None or an array)."""
    if min is None and max is None:
        return astype(x, x.dtype)
    return call(np.clip, (x, min, max), {})


def round(x: Any, /, *, decimals: int = 0) -> Any:
    """Rounded to ``decimals`` decimals, halves to even."""
    return call(np.round, (x,), {"decimals": decimals})


def where(condition: Any, x1: Any, x2: Any, /) -> Any:
    """``x1`` where ``condition`` is true, else ``x2``."""
    return call(np.where, (condition, x1, x2), {})


# -- reductions and statistics --------------------------------------------------------------------------
def _kw(**kwargs: Any) -> dict[str, Any]:
    """Keyword arguments without the ones left at None (so NumPy's defaults, which the pool runs, apply)."""
    return {k: v for k, v in kwargs.items() if v is not None}


def sum(x: Any, /, *, axis: Any = None, dtype: Any = None, keepdims: bool = False) -> Any:
    """Sum over ``axis`` (None: all)."""
    return call(np.sum, (x,), _kw(axis=axis, dtype=dtype, keepdims=keepdims))


def prod(x: Any, /, *, axis: Any = None, dtype: Any = None, keepdims: bool = False) -> Any:
    """Product over ``axis``."""
    return call(np.prod, (x,), _kw(axis=axis, dtype=dtype, keepdims=keepdims))


def mean(x: Any, /, *, axis: Any = None, keepdims: bool = False) -> Any:
    """Arithmetic mean over ``axis``."""
    return call(np.mean, (x,), _kw(axis=axis, keepdims=keepdims))


def max(x: Any, /, *, axis: Any = None, keepdims: bool = False) -> Any:
    """Maximum over ``axis``."""
    return call(np.max, (x,), _kw(axis=axis, keepdims=keepdims))


def min(x: Any, /, *, axis: Any = None, keepdims: bool = False) -> Any:
    """Minimum over ``axis``."""
    return call(np.min, (x,), _kw(axis=axis, keepdims=keepdims))


def var(x: Any, /, *, axis: Any = None, correction: float = 0.0, keepdims: bool = False) -> Any:
    """Variance over ``axis``, ``correction`` delta degrees of freedom."""
    return call(np.var, (x,), _kw(axis=axis, ddof=correction, keepdims=keepdims))


def std(x: Any, /, *, axis: Any = None, correction: float = 0.0, keepdims: bool = False) -> Any:
    """Standard deviation over ``axis``, ``correction`` delta degrees of freedom."""
    return call(np.std, (x,), _kw(axis=axis, ddof=correction, keepdims=keepdims))


def all(x: Any, /, *, axis: Any = None, keepdims: bool = False) -> Any:
    """Whether every element over ``axis`` is true."""
    return call(np.all, (x,), _kw(axis=axis, keepdims=keepdims))


def any(x: Any, /, *, axis: Any = None, keepdims: bool = False) -> Any:
    """Whether any element over ``axis`` is true."""
    return call(np.any, (x,), _kw(axis=axis, keepdims=keepdims))


def argmax(x: Any, /, *, axis: int | None = None, keepdims: bool = False) -> Any:
    """Index of the first maximum (of the flattened array for ``axis=None``)."""
    return call(np.argmax, (x,), _kw(axis=axis, keepdims=keepdims))


def argmin(x: Any, /, *, axis: int | None = None, keepdims: bool = False) -> Any:
    """Index of the first minimum."""
    return call(np.argmin, (x,), _kw(axis=axis, keepdims=keepdims))


def count_nonzero(x: Any, /, *, axis: Any = None, keepdims: bool = False) -> Any:
    """How many elements over ``axis`` are not zero."""
    return call(np.count_nonzero, (x,), {"axis": axis, "keepdims": keepdims})


def cumulative_sum(
    x: Any, /, *, axis: int | None = None, dtype: Any = None, include_initial: bool = False
) -> Any:
    """Running sums along ``axis`` (may be None for a 1-D array), after a zero if ``include_initial``."""
    if not include_initial and dtype is None and (axis is not None or getattr(x, "ndim", 1) == 1):
        return call(np.cumsum, (x,), {"axis": axis})
    return call(np.cumulative_sum, (x,), {"axis": axis, "dtype": dtype, "include_initial": include_initial})


def cumulative_prod(
    x: Any, /, *, axis: int | None = None, dtype: Any = None, include_initial: bool = False
) -> Any:
    """Running products along ``axis``, after a one if ``include_initial``."""
    if not include_initial and dtype is None and (axis is not None or getattr(x, "ndim", 1) == 1):
        return call(np.cumprod, (x,), {"axis": axis})
    return call(np.cumulative_prod, (x,), {"axis": axis, "dtype": dtype, "include_initial": include_initial})


diff = lift(np.diff)


# -- sorting, searching, sets ----------------------------------------------------------------------------
def sort(x: Any, /, *, axis: int = -1, descending: bool = False, stable: bool = True) -> Any:
    """Sorted along ``axis`` (descending if asked)."""
    result = call(np.sort, (x,), {"axis": axis})
    return flip(result, axis=axis) if descending else result


def argsort(x: Any, /, *, axis: int = -1, descending: bool = False, stable: bool = True) -> Any:
    """Indices that sort ``x`` along ``axis``; stable, equal elements keep their order descending too."""
    if not descending:
        return call(np.argsort, (x,), {"axis": axis, "kind": "stable"})
    reverse = call(np.flip, (x,), {"axis": axis})
    order = call(np.argsort, (reverse,), {"axis": axis, "kind": "stable"})
    return flip(x.shape[axis] - 1 - order, axis=axis)


searchsorted = lift(np.searchsorted)
nonzero = lift(np.nonzero)
unique_all = lift(np.unique_all)
unique_counts = lift(np.unique_counts)
unique_inverse = lift(np.unique_inverse)
unique_values = lift(np.unique_values)


# -- manipulation, indexing, linear algebra ---------------------------------------------------------------
def concat(arrays: Any, /, *, axis: int | None = 0) -> Any:
    """``arrays`` joined along ``axis`` (None: flattened first)."""
    return call(np.concatenate, (tuple(arrays),), {"axis": axis})


concatenate = lift(np.concatenate)
stack = lift(np.stack)
unstack = lift(np.unstack)
expand_dims = lift(np.expand_dims)
squeeze = lift(np.squeeze)
flip = lift(np.flip)
moveaxis = lift(np.moveaxis)
roll = lift(np.roll)
tile = lift(np.tile)
repeat = lift(np.repeat)
broadcast_to = lift(np.broadcast_to)


def broadcast_arrays(*arrays: Any) -> list[Any]:
    """The arrays broadcast against one another."""
    return list(call(np.broadcast_arrays, arrays, {}))


take = lift(np.take)
take_along_axis = lift(np.take_along_axis)
matmul = lift(np.matmul)
matrix_transpose = lift(np.matrix_transpose)
tensordot = lift(np.tensordot)
vecdot = lift(np.vecdot)


def permute_dims(x: Any, /, axes: tuple[int, ...]) -> Any:
    """The axes of ``x`` in the order ``axes``."""
    return call(np.transpose, (x, tuple(axes)), {})


def reshape(x: Any, /, shape: tuple[int, ...], *, copy: bool | None = None) -> Any:
    """``x`` with the same elements in ``shape`` (one ``-1`` may stand for the rest)."""
    if copy is False:
        raise ValueError("reshape(copy=False): gpupool reshapes make new arrays")
    return call(np.reshape, (x, tuple(shape)), {})


# -- data types -------------------------------------------------------------------------------------------
def _dtype_of(value: Any) -> Any:
    return value.dtype if isinstance(value, RemoteArray | PendingValue) else value


def astype(x: Any, dtype: Any, /, *, copy: bool = True, device: Any = None) -> Any:
    """``x`` converted to ``dtype`` (a new array unless ``copy=False`` and it already has it)."""
    check_device(device)
    if isinstance(x, RemoteArray):
        if np.dtype(dtype) == x.dtype and not copy:
            return x
        return x.copy() if np.dtype(dtype) == x.dtype else x.astype(dtype)
    return to_namespace(np.asarray(x).astype(dtype, copy=copy), None)


def can_cast(from_: Any, to: Any, /) -> builtins.bool:
    """Whether ``from_`` (a dtype or an array) casts to ``to`` under the standard's rules."""
    return builtins.bool(np.can_cast(_dtype_of(from_), to))


def result_type(*arrays_and_dtypes: Any) -> Any:
    """The dtype the standard's promotion gives ``arrays_and_dtypes`` (Python scalars count weakly)."""
    if not arrays_and_dtypes:
        raise UsageError("result_type needs at least one array or dtype")
    return np.result_type(*(_dtype_of(value) for value in arrays_and_dtypes))


def isdtype(dtype: Any, kind: Any) -> builtins.bool:
    """Whether ``dtype`` is of ``kind`` (a dtype, a kind name such as ``"real floating"``, or a tuple)."""
    return builtins.bool(np.isdtype(dtype, kind))


@dataclass(frozen=True, slots=True)
class finfo_object:
    """Machine limits of a floating dtype, as Python numbers (the standard's ``finfo_object``)."""

    bits: int
    eps: float
    max: float
    min: float
    smallest_normal: float
    dtype: Any


@dataclass(frozen=True, slots=True)
class iinfo_object:
    """Machine limits of an integer dtype, as Python ints (the standard's ``iinfo_object``)."""

    bits: int
    max: int
    min: int
    dtype: Any


def finfo(type: Any, /) -> finfo_object:
    """Machine limits of a floating dtype (or an array's); a complex dtype's are its real part's."""
    info = np.finfo(_dtype_of(type))
    return finfo_object(
        bits=int(info.bits),
        eps=float(info.eps),
        max=float(info.max),
        min=float(info.min),
        smallest_normal=float(info.smallest_normal),
        dtype=np.dtype(_dtype_of(type)) if np.dtype(_dtype_of(type)).kind == "f" else info.dtype,
    )


def iinfo(type: Any, /) -> iinfo_object:
    """Machine limits of an integer dtype (or an array's)."""
    info = np.iinfo(_dtype_of(type))
    return iinfo_object(bits=int(info.bits), max=int(info.max), min=int(info.min), dtype=info.dtype)

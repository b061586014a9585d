"""NumPy-style functions at the top level (``gp.tanh(x)``, ``gp.sum(x, axis=0)``).

Ufuncs are NumPy's own: called on a remote array they dispatch through ``__array_ufunc__``, on host data
they compute locally, exactly as NumPy would. Reductions and ``matmul`` likewise defer to the array.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gpupool.protocol.opnames import ELEMENTWISE

__all__ = sorted(
    ELEMENTWISE | {"abs", "all", "any", "matmul", "max", "mean", "min", "prod", "sum", "where", "true_divide"}
)

add = np.add
subtract = np.subtract
multiply = np.multiply
divide = true_divide = np.divide
floor_divide = np.floor_divide
remainder = np.remainder
power = np.power
maximum = np.maximum
minimum = np.minimum
fmax = np.fmax
fmin = np.fmin
arctan2 = np.arctan2
hypot = np.hypot
equal = np.equal
not_equal = np.not_equal
less = np.less
less_equal = np.less_equal
greater = np.greater
greater_equal = np.greater_equal
logical_and = np.logical_and
logical_or = np.logical_or
logical_xor = np.logical_xor
logical_not = np.logical_not
negative = np.negative
positive = np.positive
absolute = abs = np.absolute
sign = np.sign
exp = np.exp
exp2 = np.exp2
expm1 = np.expm1
log = np.log
log2 = np.log2
log10 = np.log10
log1p = np.log1p
sqrt = np.sqrt
square = np.square
sin = np.sin
cos = np.cos
tan = np.tan
arcsin = np.arcsin
arccos = np.arccos
arctan = np.arctan
sinh = np.sinh
cosh = np.cosh
tanh = np.tanh
floor = np.floor
ceil = np.ceil
rint = np.rint
trunc = np.trunc
isnan = np.isnan
isinf = np.isinf
isfinite = np.isfinite
matmul = np.matmul
where = np.where


def sum(x: Any, axis: int | None = None) -> Any:
    """Sum of ``x`` (remote or host) over all elements or one axis."""
    return np.sum(x, axis=axis)


def mean(x: Any, axis: int | None = None) -> Any:
    """Mean of ``x`` over all elements or one axis."""
    return np.mean(x, axis=axis)


def max(x: Any, axis: int | None = None) -> Any:
    """Maximum of ``x`` over all elements or one axis."""
    return np.max(x, axis=axis)


def min(x: Any, axis: int | None = None) -> Any:
    """Minimum of ``x`` over all elements or one axis."""
    return np.min(x, axis=axis)


def prod(x: Any, axis: int | None = None) -> Any:
    """Product of ``x`` over all elements or one axis."""
    return np.prod(x, axis=axis)


def any(x: Any, axis: int | None = None) -> Any:
    """Whether any element of ``x`` is true."""
    return np.any(x, axis=axis)


def all(x: Any, axis: int | None = None) -> Any:
    """Whether every element of ``x`` is true."""
    return np.all(x, axis=axis)

"""What a remote array offers NumPy code: operators (in-place ones too), NumPy's protocols and methods.

:class:`ArrayMethods` is the base of :class:`~gpupool.client.array.RemoteArray`; it works through two hooks
the array implements: ``_make(spec)`` (a new array from an :class:`~gpupool.client.graph.ArraySpec`) and
``_assign(spec)`` (this array, and so every alias of it, becomes the spec's value: the in-place operators).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any, Final

import numpy as np

from gpupool._errors import UsageError
from gpupool.client import dispatch, indexing, numpy_api
from gpupool.client.coverage import run_on_host
from gpupool.client.device import ArrayApiObject
from gpupool.client.dispatch import Unsupported
from gpupool.client.graph import ArraySpec, GraphArray
from gpupool.client.transposed import Transposed
from gpupool.protocol.opnames import ELEMENTWISE

__all__ = ["ArrayMethods"]

#: Bitwise ufuncs that mean the logical ones on bool operands (the only ones gpupool runs them on).
_ON_BOOLS: Final = {
    "bitwise_and": "logical_and",
    "bitwise_or": "logical_or",
    "bitwise_xor": "logical_xor",
    "invert": "logical_not",
}


def _is_bool(value: object) -> bool:
    return isinstance(value, bool | np.bool_) or getattr(value, "dtype", None) == np.dtype(bool)


class ArrayMethods(GraphArray, ArrayApiObject):
    """NumPy's operators, protocols and methods over the two hooks ``_make`` and ``_assign``."""

    __slots__ = ()

    def _make(self, spec: ArraySpec) -> Any:
        """A new remote array from ``spec``."""
        raise NotImplementedError

    def _assign(self, spec: ArraySpec) -> Any:
        """Repoint this array to ``spec`` (computed from its present value); returns ``self``."""
        raise NotImplementedError

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        raise NotImplementedError

    # -- NumPy protocols --------------------------------------------------------------------------
    def __array_ufunc__(self, ufunc: np.ufunc, method: str, *inputs: Any, **kwargs: Any) -> Any:
        name = ufunc.__name__
        if name in _ON_BOOLS and all(_is_bool(v) for v in inputs):
            name = _ON_BOOLS[name]
        out = kwargs.pop("out", None)
        if kwargs.pop("casting", "same_kind") != "same_kind" or method != "__call__" or kwargs:
            return NotImplemented
        if name == "matmul" and out is None:
            if inputs[0] is not self or isinstance(inputs[1], Transposed):
                return NotImplemented  # x @ y.T: the view's own __array_ufunc__ runs it (agent to agent)
            return self._make(dispatch.matmul(self, inputs[1]))
        if name not in ELEMENTWISE:  # a ufunc the agents do not run: on the host copy, with the warning
            if out is not None:
                kwargs["out"] = out
            return run_on_host(name, ufunc, inputs, kwargs)
        if out is None:
            return self._make(dispatch.elementwise(name, inputs))
        targets = out if isinstance(out, tuple) else (out,)
        if len(targets) != 1:
            raise UsageError(f"{name}: takes one out= array")
        target = targets[0]
        if isinstance(target, ArrayMethods):
            return target._assign(dispatch.inplace(name, target, inputs))
        result = self._make(dispatch.elementwise(name, inputs))
        np.copyto(target, result.get(), casting="same_kind")  # out= a host array: filled with the result
        return target

    def __array_function__(self, func: Any, types: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        return numpy_api.dispatch_function(func, tuple(args), kwargs)

    # -- the Array API's array object --------------------------------------------------------------
    @property
    def mT(self) -> Any:
        """The last two axes swapped (a stack of matrices transposed)."""
        if self.ndim < 2:
            raise ValueError(f"mT needs at least 2 dimensions, not {self.ndim}")
        return self._call(np.swapaxes, axis1=-1, axis2=-2)

    def _host_copy(self) -> np.ndarray:
        return self.get()

    def copy(self) -> Any:
        """A new array with the same values (copied where the shards live)."""
        return self._make(dispatch.cast(self, self.dtype))

    # -- reductions and other methods (NumPy's signatures, as far as gpupool runs them) ---------------
    def _call(self, function: Any, **kwargs: Any) -> Any:
        return numpy_api.call(function.__name__, function, (self,), kwargs)

    def sum(self, axis: Any = None, *, keepdims: bool = False) -> Any:
        """Sum over ``axis`` (None, an int or a tuple): a NumPy value where the sharded axis 0 is reduced,
        else a pending remote array."""
        return self._call(np.sum, axis=axis, keepdims=keepdims)

    def mean(self, axis: Any = None, *, keepdims: bool = False) -> Any:
        """Arithmetic mean; placement of the result as for :meth:`sum`."""
        return self._call(np.mean, axis=axis, keepdims=keepdims)

    def max(self, axis: Any = None, *, keepdims: bool = False) -> Any:
        """Maximum; placement of the result as for :meth:`sum`."""
        return self._call(np.max, axis=axis, keepdims=keepdims)

    def min(self, axis: Any = None, *, keepdims: bool = False) -> Any:
        """Minimum; placement of the result as for :meth:`sum`."""
        return self._call(np.min, axis=axis, keepdims=keepdims)

    def prod(self, axis: Any = None, *, keepdims: bool = False) -> Any:
        """Product; placement of the result as for :meth:`sum`."""
        return self._call(np.prod, axis=axis, keepdims=keepdims)

    def any(self, axis: Any = None, *, keepdims: bool = False) -> Any:
        """Whether any element is true; placement of the result as for :meth:`sum`."""
        return self._call(np.any, axis=axis, keepdims=keepdims)

    def all(self, axis: Any = None, *, keepdims: bool = False) -> Any:
        """Whether every element is true; placement of the result as for :meth:`sum`."""
        return self._call(np.all, axis=axis, keepdims=keepdims)

    def var(self, axis: Any = None, *, ddof: float = 0, keepdims: bool = False) -> Any:
        """Variance with ``ddof`` delta degrees of freedom; over the sharded axis from per-shard moments."""
        return self._call(np.var, axis=axis, ddof=ddof, keepdims=keepdims)

    def std(self, axis: Any = None, *, ddof: float = 0, keepdims: bool = False) -> Any:
        """Standard deviation; as :meth:`var`."""
        return self._call(np.std, axis=axis, ddof=ddof, keepdims=keepdims)

    def argmax(self, axis: int | None = None, *, keepdims: bool = False) -> Any:
        """Indices of the maxima (flattened for ``axis=None``; the first on ties, the first NaN wins)."""
        return self._call(np.argmax, axis=axis, keepdims=keepdims)

    def argmin(self, axis: int | None = None, *, keepdims: bool = False) -> Any:
        """Indices of the minima; as :meth:`argmax`."""
        return self._call(np.argmin, axis=axis, keepdims=keepdims)

    def clip(self, min: Any = None, max: Any = None) -> Any:
        """Values limited to ``[min, max]`` (either may be None), on the agents."""
        return self._call(np.clip, a_min=min, a_max=max)

    def round(self, decimals: int = 0) -> Any:
        """Rounded to ``decimals`` decimals, as ``np.round`` (halves to even)."""
        return self._call(np.round, decimals=decimals)

    def cumsum(self, axis: int | None = None) -> Any:
        """Running sums along ``axis`` (a remote array); along axis 0 the shards add their predecessors'
        totals in a second round. The flattened scan of a 2-D or larger array runs on the host."""
        return self._call(np.cumsum, axis=axis)

    def cumprod(self, axis: int | None = None) -> Any:
        """Running products; as :meth:`cumsum`."""
        return self._call(np.cumprod, axis=axis)

    # -- indexing and layouts (gpupool.client.indexing, gpupool.client.layouts) ------------------------
    def __getitem__(self, key: Any) -> Any:
        """``x[key]``: see :mod:`gpupool.client.indexing`; an integer on axis 0 gives a NumPy row, keys it
        does not run on the pool run on the host copy with a one-time warning."""
        try:
            spec, finish = indexing.getitem(self, key, self._make)
        except Unsupported:
            return run_on_host("getitem", operator.getitem, (self, key), {})
        result = self._make(spec)
        return result if finish is None else result.get()[finish]

    def __setitem__(self, key: Any, value: Any) -> None:
        """``x[key] = value`` in place (every alias sees it): a remote mask with a scalar, or basic indices
        with a host value, as a ``where`` on the agents.

        Raises:
            Unsupported: other keys or values (see :func:`gpupool.client.indexing.where_inputs`).
        """
        condition, replacement = indexing.where_inputs(self, key, value, self._make)
        self._assign(dispatch.inplace("where", self, [condition, replacement, self]))

    @property
    def T(self) -> Any:
        """The transpose: a :class:`~gpupool.client.transposed.Transposed` view for a 2-D array (``x.T @ y``
        runs on the pool), the array itself for 1-D."""
        if self.ndim < 2:
            return self
        if self.ndim == 2:
            return Transposed(self)
        return self._call(np.transpose)

    def transpose(self, *axes: Any) -> Any:
        """Permuted axes (per shard where axis 0 stays first; ``.T`` for 2-D with no axes)."""
        order = axes[0] if len(axes) == 1 and not isinstance(axes[0], int) else axes or None
        if self.ndim == 2 and order in (None, (1, 0), [1, 0]):
            return self.T
        return self._call(np.transpose, axes=order)

    def swapaxes(self, axis1: int, axis2: int) -> Any:
        """Two axes swapped (per shard when neither is 0)."""
        return self._call(np.swapaxes, axis1=axis1, axis2=axis2)

    def reshape(self, *shape: Any) -> Any:
        """A new shape with the same first axis, per shard (others run on the host copy)."""
        return self._call(np.reshape, shape=shape[0] if len(shape) == 1 else shape)

    def squeeze(self, axis: Any = None) -> Any:
        """Axes of length 1 removed (per shard unless it is axis 0)."""
        return self._call(np.squeeze, axis=axis)

    # -- operators --------------------------------------------------------------------------------
    def _inplace(self, name: str, other: Any) -> Any:
        if name in _ON_BOOLS and _is_bool(self) and _is_bool(other):
            name = _ON_BOOLS[name]
        if name not in ELEMENTWISE:
            raise TypeError(f"{name}: not supported on remote arrays of {self.dtype}")
        return self._assign(dispatch.inplace(name, self, [self, other]))

    def __iadd__(self, other: Any) -> Any:
        return self._inplace("add", other)

    def __isub__(self, other: Any) -> Any:
        return self._inplace("subtract", other)

    def __imul__(self, other: Any) -> Any:
        return self._inplace("multiply", other)

    def __itruediv__(self, other: Any) -> Any:
        return self._inplace("divide", other)

    def __ifloordiv__(self, other: Any) -> Any:
        return self._inplace("floor_divide", other)

    def __imod__(self, other: Any) -> Any:
        return self._inplace("remainder", other)

    def __ipow__(self, other: Any) -> Any:
        return self._inplace("power", other)

    def __iand__(self, other: Any) -> Any:
        return self._inplace("bitwise_and", other)

    def __ior__(self, other: Any) -> Any:
        return self._inplace("bitwise_or", other)

    def __ixor__(self, other: Any) -> Any:
        return self._inplace("bitwise_xor", other)

    def __ilshift__(self, other: Any) -> Any:
        return self._inplace("left_shift", other)

    def __irshift__(self, other: Any) -> Any:
        return self._inplace("right_shift", other)

    def __add__(self, other: Any) -> Any:
        return np.add(self, other)

    def __radd__(self, other: Any) -> Any:
        return np.add(other, self)

    def __sub__(self, other: Any) -> Any:
        return np.subtract(self, other)

    def __rsub__(self, other: Any) -> Any:
        return np.subtract(other, self)

    def __mul__(self, other: Any) -> Any:
        return np.multiply(self, other)

    def __rmul__(self, other: Any) -> Any:
        return np.multiply(other, self)

    def __truediv__(self, other: Any) -> Any:
        return np.divide(self, other)

    def __rtruediv__(self, other: Any) -> Any:
        return np.divide(other, self)

    def __floordiv__(self, other: Any) -> Any:
        return np.floor_divide(self, other)

    def __rfloordiv__(self, other: Any) -> Any:
        return np.floor_divide(other, self)

    def __mod__(self, other: Any) -> Any:
        return np.remainder(self, other)

    def __rmod__(self, other: Any) -> Any:
        return np.remainder(other, self)

    def __pow__(self, other: Any) -> Any:
        return np.power(self, other)

    def __rpow__(self, other: Any) -> Any:
        return np.power(other, self)

    def __and__(self, other: Any) -> Any:
        return np.bitwise_and(self, other)

    def __rand__(self, other: Any) -> Any:
        return np.bitwise_and(other, self)

    def __or__(self, other: Any) -> Any:
        return np.bitwise_or(self, other)

    def __ror__(self, other: Any) -> Any:
        return np.bitwise_or(other, self)

    def __xor__(self, other: Any) -> Any:
        return np.bitwise_xor(self, other)

    def __rxor__(self, other: Any) -> Any:
        return np.bitwise_xor(other, self)

    def __invert__(self) -> Any:
        return np.invert(self)

    def __lshift__(self, other: Any) -> Any:
        return np.left_shift(self, other)

    def __rlshift__(self, other: Any) -> Any:
        return np.left_shift(other, self)

    def __rshift__(self, other: Any) -> Any:
        return np.right_shift(self, other)

    def __rrshift__(self, other: Any) -> Any:
        return np.right_shift(other, self)

    def __matmul__(self, other: Any) -> Any:
        if isinstance(other, Transposed):
            return NotImplemented  # x @ y.T: the view's __rmatmul__ runs it (agent to agent)
        return self._make(dispatch.matmul(self, other))

    def __neg__(self) -> Any:
        return np.negative(self)

    def __pos__(self) -> Any:
        return np.positive(self)

    def __abs__(self) -> Any:
        return np.absolute(self)

    def __lt__(self, other: Any) -> Any:
        return np.less(self, other)

    def __le__(self, other: Any) -> Any:
        return np.less_equal(self, other)

    def __gt__(self, other: Any) -> Any:
        return np.greater(self, other)

    def __ge__(self, other: Any) -> Any:
        return np.greater_equal(self, other)

    def __eq__(self, other: Any) -> Any:  # elementwise, as NumPy's
        return np.equal(self, other)

    def __ne__(self, other: Any) -> Any:
        return np.not_equal(self, other)

"""Tracing a Python function into a program of the agents' ops, as ``jax.jit`` traces (for ``pool.map``).

A task's function is called once, on the client, with :class:`Traced` stand-ins for its array arguments.
Every operation on them (operators, NumPy's ufuncs and functions, gpupool's namespace, methods) records an
agent op with the result's dtype and shape worked out by NumPy's rules, and hands back another stand-in;
nothing is computed. What comes out is a :class:`Trace`: the ops, the arguments they read and the
results to fetch. A rig then runs only gpupool's op set, never the user's Python.

What needs a value (``if x.sum() > 0``, ``float(x)``, ``x.get()``, a NumPy function gpupool does not
trace) raises :class:`TracingError` at once, naming the construct and what to write instead
(``gp.where``, :func:`fori_loop`). Python loops are unrolled; :func:`fori_loop` keeps a loop as one op
that the agent runs trip after trip.
"""

from __future__ import annotations

import functools
import itertools
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
from numpy.lib.array_utils import normalize_axis_index

from gpupool._errors import UsageError
from gpupool._proto.v1 import agent_pb2
from gpupool.client.operands import buffer_operand, constant_operand, is_scalar, scalar_operand
from gpupool.protocol.codec import check_dtype, meta_of, op_results
from gpupool.protocol.opnames import BINARY, UNARY

__all__ = [
    "MAX_INLINE_BYTES",
    "MAX_RESULT_BYTES",
    "Recorder",
    "Trace",
    "Traced",
    "TracingError",
    "fori_loop",
    "trace",
]

#: Host data a task may carry inline (its small arrays); larger data goes through ``pool.replicate``.
MAX_INLINE_BYTES: Final = 4 << 20
#: The most a task may return: its results come back inline with the program (the agent's FETCH_LIMIT).
MAX_RESULT_BYTES: Final = 16 << 20


class TracingError(UsageError):
    """A task's function did something that cannot become a program of the agents' ops."""


#: The recorder of the function (or loop body) being traced in this context, if any.
_ACTIVE: ContextVar[Recorder | None] = ContextVar("gpupool_trace", default=None)


def active_recorder() -> Recorder | None:
    """The recorder of the function or loop body being traced here, None outside a trace (for the parts of
    gp's namespace that record ops themselves, such as ``gp.random``'s draws)."""
    return _ACTIVE.get()


@dataclass(eq=False)
class Recorder:
    """The ops one function (or one loop body) records, in order; ids are unique across nested bodies."""

    counter: Iterator[int] = field(default_factory=itertools.count)
    ops: list[agent_pb2.Op] = field(default_factory=list)
    parent: Recorder | None = None
    inline_bytes: list[int] = field(default_factory=lambda: [0])

    def new_id(self) -> str:
        return f"t{next(self.counter)}"

    def child(self) -> Recorder:
        return Recorder(counter=self.counter, parent=self, inline_bytes=self.inline_bytes)

    def owns(self, recorder: Recorder) -> bool:
        """Whether values of ``recorder`` are visible here (this recorder or an enclosing one)."""
        current: Recorder | None = self
        while current is not None:
            if current is recorder:
                return True
            current = current.parent
        return False

    def constant(self, host: np.ndarray) -> Traced:
        """A host array as a value of this trace (sent inline once, then read by id)."""
        host = np.asarray(host)
        check_dtype(host.dtype)
        self.inline_bytes[0] += host.nbytes
        if self.inline_bytes[0] > MAX_INLINE_BYTES:
            raise TracingError(
                f"a task carries at most {MAX_INLINE_BYTES >> 20} MiB of host arrays inline; give larger "
                "data sets once with pool.replicate(array) and pass the handle"
            )
        return self.record("astype", [constant_operand(host)], host.dtype, host.shape)

    def record(
        self,
        name: str,
        inputs: Sequence[agent_pb2.Operand],
        dtype: np.dtype[Any],
        shape: tuple[int, ...],
        *,
        params: Sequence[int] = (),
        axes: Sequence[int] | None = None,
        keepdims: bool = False,
    ) -> Traced:
        out = self.new_id()
        self.ops.append(
            agent_pb2.Op(
                op=name,
                inputs=inputs,
                output=out,
                expect=meta_of(np.dtype(dtype), tuple(shape)),
                params=list(params),
                axes=list(axes or ()),
                keepdims=keepdims,
            )
        )
        return Traced(self, out, tuple(int(n) for n in shape), np.dtype(dtype))


# -- the stand-in -------------------------------------------------------------------------------------------

_UFUNC_NAMES: Final = {"true_divide": "divide", "abs": "absolute", "conj": "conjugate"}
_REDUCTIONS: Final[dict[str, Callable[..., Any]]] = {
    "sum": np.sum,
    "prod": np.prod,
    "max": np.max,
    "min": np.min,
    "mean": np.mean,
    "any": np.any,
    "all": np.all,
    "var": np.var,
    "std": np.std,
    "argmax": np.argmax,
    "argmin": np.argmin,
    "nansum": np.nansum,
    "nanmean": np.nanmean,
    "nanmax": np.nanmax,
    "nanmin": np.nanmin,
}


class Traced:
    """A value of a task while it is traced: a dtype and a shape, and the op that will make it."""

    __slots__ = ("dtype", "name", "recorder", "shape")
    __array_priority__ = 1000

    def __init__(self, recorder: Recorder, name: str, shape: tuple[int, ...], dtype: np.dtype[Any]) -> None:
        self.recorder = recorder
        self.name = name
        self.shape = shape
        self.dtype = dtype

    def __repr__(self) -> str:
        return f"Traced({self.dtype.name}{list(self.shape)})"

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def T(self) -> Traced:
        return self.transpose()

    @property
    def mT(self) -> Traced:
        axes = list(range(self.ndim))
        axes[-2:] = axes[-1], axes[-2]
        return self.transpose(axes)

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d array")
        return self.shape[0]

    def __array_namespace__(self, *, api_version: str | None = None) -> Any:
        return sys.modules["gpupool"]  # the package imports this module; the namespace is the package

    # -- what needs a value ------------------------------------------------------------------------------

    def _needs_value(self, what: str, instead: str) -> TracingError:
        return TracingError(
            f"{what} needs the value of {self!r}, which a rig computes only after the task is traced: "
            f"{instead}. (Python that cannot be traced is not run on rigs.)"
        )

    def __bool__(self) -> bool:
        raise self._needs_value("`if`, `while`, `and`/`or` or bool()", "write gp.where(cond, a, b) instead")

    def __float__(self) -> float:
        raise self._needs_value("float()", "return the array from the task and convert the result")

    def __int__(self) -> int:
        raise self._needs_value("int()", "return the array from the task and convert the result")

    def __index__(self) -> int:
        raise self._needs_value("using an array as an index or a count", "use Python integers there")

    def __complex__(self) -> complex:
        raise self._needs_value("complex()", "return the array from the task and convert the result")

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        raise self._needs_value("np.asarray() (or a NumPy function gpupool does not trace)", "use gp.* ops")

    def __iter__(self) -> Iterator[Traced]:
        raise self._needs_value("iterating over an array", "use gp.fori_loop, or index with Python integers")

    def item(self) -> Any:
        raise self._needs_value(".item()", "return the array from the task and convert the result")

    def tolist(self) -> Any:
        raise self._needs_value(".tolist()", "return the array from the task")

    def get(self) -> Any:
        raise self._needs_value(".get()", "return the array from the task")

    # -- NumPy's protocols -------------------------------------------------------------------------------

    def __array_ufunc__(self, ufunc: np.ufunc, method: str, *inputs: Any, **kwargs: Any) -> Any:
        name = _UFUNC_NAMES.get(ufunc.__name__, ufunc.__name__)
        if method != "__call__" or name not in BINARY | UNARY or kwargs.keys() - {"dtype"}:
            raise TracingError(f"np.{ufunc.__name__}.{method} with {sorted(kwargs)} is not traced")
        result = self.recorder_for(inputs).elementwise(name, inputs)
        return result.astype(kwargs["dtype"]) if kwargs.get("dtype") is not None else result

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        handler = _FUNCTIONS.get(func.__name__)
        if handler is None:
            raise TracingError(
                f"np.{func.__name__} is not traced (yet); the traced functions are "
                f"{', '.join(sorted(_FUNCTIONS))} and the elementwise ufuncs"
            )
        return handler(*args, **kwargs)

    def recorder_for(self, values: Sequence[Any]) -> _Ops:
        return _Ops(_recorder_of(values) or self.recorder)

    # -- operators ---------------------------------------------------------------------------------------

    def _binary(name: str, reflected: bool = False) -> Callable[[Traced, Any], Traced]:  # type: ignore[misc]
        def method(self: Traced, other: Any) -> Traced:
            operands = (other, self) if reflected else (self, other)
            return _Ops(_recorder_of(operands) or self.recorder).elementwise(name, operands)

        return method

    __add__ = _binary("add")
    __radd__ = _binary("add", True)
    __sub__ = _binary("subtract")
    __rsub__ = _binary("subtract", True)
    __mul__ = _binary("multiply")
    __rmul__ = _binary("multiply", True)
    __truediv__ = _binary("divide")
    __rtruediv__ = _binary("divide", True)
    __floordiv__ = _binary("floor_divide")
    __rfloordiv__ = _binary("floor_divide", True)
    __mod__ = _binary("remainder")
    __rmod__ = _binary("remainder", True)
    __pow__ = _binary("power")
    __rpow__ = _binary("power", True)
    __and__ = _binary("bitwise_and")
    __rand__ = _binary("bitwise_and", True)
    __or__ = _binary("bitwise_or")
    __ror__ = _binary("bitwise_or", True)
    __xor__ = _binary("bitwise_xor")
    __rxor__ = _binary("bitwise_xor", True)
    __lt__ = _binary("less")
    __le__ = _binary("less_equal")
    __gt__ = _binary("greater")
    __ge__ = _binary("greater_equal")
    __eq__ = _binary("equal")  # type: ignore[assignment]
    __ne__ = _binary("not_equal")  # type: ignore[assignment]
    __hash__ = None  # type: ignore[assignment]
    del _binary

    def __matmul__(self, other: Any) -> Traced:
        return _matmul(self, other)

    def __rmatmul__(self, other: Any) -> Traced:
        return _matmul(other, self)

    def __neg__(self) -> Traced:
        return _Ops(self.recorder).elementwise("negative", (self,))

    def __pos__(self) -> Traced:
        return self

    def __abs__(self) -> Traced:
        return _Ops(self.recorder).elementwise("absolute", (self,))

    def __invert__(self) -> Traced:
        return _Ops(self.recorder).elementwise("invert", (self,))

    # -- methods -----------------------------------------------------------------------------------------

    def astype(self, dtype: Any, copy: bool = True) -> Traced:
        return _Ops(self.recorder).unary("astype", self, np.dtype(dtype), self.shape)

    def reshape(self, *shape: Any, **kwargs: Any) -> Traced:
        return _reshape(self, shape[0] if len(shape) == 1 and not isinstance(shape[0], int) else shape)

    def transpose(self, *axes: Any) -> Traced:
        order = tuple(axes[0]) if len(axes) == 1 and not isinstance(axes[0], int) else tuple(axes)
        return _transpose(self, order or None)

    def ravel(self) -> Traced:
        return _reshape(self, (-1,))

    flatten = ravel

    def clip(self, min: Any = None, max: Any = None) -> Any:
        return _clip(self, min, max)

    def squeeze(self, axis: Any = None) -> Traced:
        return _squeeze(self, axis)

    def __getitem__(self, key: Any) -> Traced:
        return _getitem(self, key)

    def sort(self, axis: int = -1, **kwargs: Any) -> Traced:
        raise TracingError("x.sort() sorts in place, which a trace cannot: write gp.sort(x, axis=...)")

    def argsort(self, axis: int | None = -1, **kwargs: Any) -> Traced:
        return _along("argsort", self, axis, **kwargs)

    def cumsum(self, axis: int | None = None, **kwargs: Any) -> Traced:
        return _along("cumsum", self, axis, **kwargs)

    def cumprod(self, axis: int | None = None, **kwargs: Any) -> Traced:
        return _along("cumprod", self, axis, **kwargs)

    def __setitem__(self, key: Any, value: Any) -> None:
        raise TracingError("assignment into a traced array is not traced: build the result with gp.where")


def _reduction_method(name: str) -> Callable[..., Traced]:
    def method(
        self: Traced, axis: Any = None, dtype: Any = None, out: Any = None, keepdims: bool = False, **kw: Any
    ) -> Traced:
        return _reduce(name, self, axis=axis, dtype=dtype, keepdims=keepdims, **kw)

    method.__name__ = name
    return method


for _name in ("sum", "prod", "max", "min", "mean", "any", "all", "var", "std", "argmax", "argmin"):
    setattr(Traced, _name, _reduction_method(_name))


# -- recording ops ------------------------------------------------------------------------------------------


def _recorder_of(values: Sequence[Any]) -> Recorder | None:
    """The innermost recorder among ``values``' stand-ins (a loop body's, over the function's)."""
    found: Recorder | None = None
    for value in values:
        if isinstance(value, Traced) and (found is None or value.recorder.owns(found)):
            found = value.recorder
    return found


@dataclass
class _Ops:
    recorder: Recorder

    def operand(self, value: Any) -> agent_pb2.Operand:
        if isinstance(value, Traced):
            if not self.recorder.owns(value.recorder):
                raise TracingError(f"{value!r} belongs to a loop body it was not returned from")
            return buffer_operand(value.name)
        if is_scalar(value) and not isinstance(value, np.ndarray):
            return scalar_operand(value)
        if isinstance(value, np.ndarray | list | tuple) or is_scalar(value):
            return buffer_operand(self.recorder.constant(np.asarray(value)).name)
        raise TracingError(f"a {type(value).__name__} is not an array, a scalar or a traced value")

    def elementwise(self, name: str, values: Sequence[Any]) -> Traced:
        probes = [_probe(v) for v in values]
        with np.errstate(all="ignore"):
            dtype = np.dtype(getattr(np, name)(*probes).dtype)
        shape = np.broadcast_shapes(*(_shape(v) for v in values))
        return self.recorder.record(name, [self.operand(v) for v in values], dtype, shape)

    def unary(self, name: str, value: Any, dtype: np.dtype[Any], shape: tuple[int, ...], **kw: Any) -> Traced:
        return self.recorder.record(name, [self.operand(value)], dtype, shape, **kw)


def _probe(value: Any) -> Any:
    """What stands for ``value`` when NumPy works out a result dtype: Python scalars stay weak."""
    if isinstance(value, Traced):
        return np.zeros((1,) * value.ndim if value.ndim else (), value.dtype)
    if isinstance(value, bool | int | float | complex):
        return value
    return (
        np.zeros((), np.asarray(value).dtype) if np.ndim(value) == 0 else np.zeros(1, np.asarray(value).dtype)
    )


def _shape(value: Any) -> tuple[int, ...]:
    return value.shape if isinstance(value, Traced) else tuple(np.shape(value))


def _ops(*values: Any) -> _Ops:
    recorder = _recorder_of(values)
    if recorder is None:
        raise TracingError("no traced value among the arguments")
    return _Ops(recorder)


def _axes(axis: Any, ndim: int) -> tuple[int, ...] | None:
    if axis is None:
        return None
    items = axis if isinstance(axis, tuple | list) else (axis,)
    try:
        return tuple(normalize_axis_index(int(a), ndim) for a in items)
    except (TypeError, ValueError) as exc:
        raise TracingError(f"axis {axis!r} of a {ndim}-d array: {exc}") from None


def _reduce(
    name: str, x: Any, *, axis: Any = None, dtype: Any = None, keepdims: bool = False, **kw: Any
) -> Traced:
    ops = _ops(x)
    if not isinstance(x, Traced):
        x = ops.recorder.constant(np.asarray(x))
    ddof = kw.pop("ddof", kw.pop("correction", 0))
    if kw:
        raise TracingError(f"{name}() with {sorted(kw)} is not traced")
    if dtype is not None:
        x = x.astype(dtype)
    axes = _axes(axis, x.ndim)
    if name in ("argmax", "argmin") and axes is not None and len(axes) > 1:
        raise TracingError(f"{name} over several axes")
    probe = np.ones((1,) * x.ndim, x.dtype)
    single = name in ("argmax", "argmin")
    args: dict[str, Any] = {"axis": (axes[0] if axes else None) if single else axes, "keepdims": keepdims}
    if name in ("var", "std"):
        args["ddof"] = 0
    with np.errstate(all="ignore"):
        result_dtype = np.dtype(_REDUCTIONS[name](probe, **args).dtype)
    reduced = set(range(x.ndim)) if axes is None else set(axes)
    shape = tuple(1 if i in reduced else n for i, n in enumerate(x.shape) if keepdims or i not in reduced)
    params = [int(ddof)] if name in ("var", "std") and ddof else []
    return ops.recorder.record(
        name, [ops.operand(x)], result_dtype, shape, params=params, axes=axes, keepdims=keepdims
    )


def _matmul(a: Any, b: Any) -> Traced:
    ops = _ops(a, b)
    sa, sb = _shape(a), _shape(b)
    if not sa or not sb:
        raise TracingError("matmul of a 0-d array; use *")
    left = (1, *sa) if len(sa) == 1 else sa
    right = (*sb, 1) if len(sb) == 1 else sb
    if left[-1] != right[-2]:
        raise TracingError(f"matmul of shapes {list(sa)} and {list(sb)}: {left[-1]} != {right[-2]}")
    batch = np.broadcast_shapes(left[:-2], right[:-2])
    shape = (*batch, *(() if len(sa) == 1 else (left[-2],)), *(() if len(sb) == 1 else (right[-1],)))
    dtype = np.matmul(np.zeros((1, 1), _probe_dtype(a)), np.zeros((1, 1), _probe_dtype(b))).dtype
    return ops.recorder.record("matmul", [ops.operand(a), ops.operand(b)], dtype, shape)


def _probe_dtype(value: Any) -> np.dtype[Any]:
    return value.dtype if isinstance(value, Traced) else np.asarray(value).dtype


def _reshape(x: Traced, shape: Any) -> Traced:
    target = (shape,) if isinstance(shape, int) else tuple(int(n) for n in shape)
    if target.count(-1) > 1:
        raise TracingError(f"reshape to {list(target)}: at most one -1")
    if -1 in target:
        known = math.prod(n for n in target if n != -1)
        target = tuple(x.size // known if known and n == -1 else n for n in target)
    if math.prod(target) != x.size or any(n < 0 for n in target):
        raise TracingError(f"cannot reshape {x!r} to {list(target)}")
    return _Ops(x.recorder).unary("reshape", x, x.dtype, target, params=target)


def _transpose(x: Traced, axes: tuple[int, ...] | None) -> Traced:
    order = tuple(reversed(range(x.ndim))) if axes is None else tuple(_axes(axes, x.ndim) or ())
    if sorted(order) != list(range(x.ndim)):
        raise TracingError(f"transpose axes {list(axes or ())} of a {x.ndim}-d array")
    shape = tuple(x.shape[i] for i in order)
    return _Ops(x.recorder).unary("transpose", x, x.dtype, shape, axes=order)


def _clip(x: Any, low: Any = None, high: Any = None, **kwargs: Any) -> Any:
    low = kwargs.pop("a_min", kwargs.pop("min", low))
    high = kwargs.pop("a_max", kwargs.pop("max", high))
    result = x
    if low is not None:
        result = _ops(result, low).elementwise("maximum", (result, low))
    if high is not None:
        result = _ops(result, high).elementwise("minimum", (result, high))
    return result


def _where(condition: Any, a: Any, b: Any) -> Traced:
    ops = _ops(condition, a, b)
    probes = [_probe(v) for v in (condition, a, b)]
    dtype = np.where(*probes).dtype
    shape = np.broadcast_shapes(*(_shape(v) for v in (condition, a, b)))
    return ops.recorder.record("where", [ops.operand(v) for v in (condition, a, b)], dtype, shape)


def _squeeze(x: Traced, axis: Any = None) -> Traced:
    axes = _axes(axis, x.ndim)
    removed = [i for i, n in enumerate(x.shape) if n == 1] if axes is None else list(axes)
    if any(x.shape[i] != 1 for i in removed):
        raise TracingError(f"cannot squeeze axes {removed} of {x!r}")
    shape = tuple(n for i, n in enumerate(x.shape) if i not in removed)
    return _Ops(x.recorder).unary("squeeze", x, x.dtype, shape, axes=removed)


def _expand_dims(x: Traced, axis: int) -> Traced:
    index = normalize_axis_index(axis, x.ndim + 1)
    shape = (*x.shape[:index], 1, *x.shape[index:])
    return _Ops(x.recorder).unary("expand_dims", x, x.dtype, shape, params=[index])


def _getitem(x: Traced, key: Any) -> Traced:
    """Basic indexing: slices and integers on the leading axes, ``None`` and ``...`` not yet."""
    if (
        isinstance(key, Traced | np.ndarray | list)
        and _probe_dtype(np.asarray(key) if isinstance(key, list) else key).kind in "iu"
    ):
        return _take(x, key, axis=0)  # rows by an integer array
    keys = key if isinstance(key, tuple) else (key,)
    if len(keys) > x.ndim or not all(isinstance(k, slice | int) and not isinstance(k, bool) for k in keys):
        raise TracingError(
            f"indexing with {key!r}: only slices and Python integers on leading axes are traced"
        )
    params: list[int] = []
    shape = list(x.shape)
    drop: list[int] = []
    for axis, item in enumerate(keys):
        if isinstance(item, int):
            index = item + x.shape[axis] if item < 0 else item
            if not 0 <= index < x.shape[axis]:
                raise TracingError(f"index {item} of axis {axis} with {x.shape[axis]} elements")
            item = slice(index, index + 1)
            drop.append(axis)
        start, stop, step = item.indices(x.shape[axis])
        params += [start, stop, step]
        shape[axis] = len(range(start, stop, step))
    result = _Ops(x.recorder).unary("slice", x, x.dtype, tuple(shape), params=params)
    return _squeeze(result, tuple(drop)) if drop else result


def _along(name: str, x: Any, axis: Any = -1, **kwargs: Any) -> Traced:
    """Sorts and running totals: along ``axis``, or over the flattened array for ``axis=None``."""
    ops = _ops(x)
    if kwargs.keys() - {"kind", "stable", "dtype"}:
        raise TracingError(f"{name}() with {sorted(kwargs)} is not traced")
    if not isinstance(x, Traced):
        x = ops.recorder.constant(np.asarray(x))
    if axis is None:
        shape: tuple[int, ...] = (x.size,)
        params: list[int] = []
    else:
        (index,) = _axes(axis, x.ndim) or (0,)
        shape, params = x.shape, [index]
    probe = getattr(np, name)(np.ones((1,) * max(x.ndim, 1), x.dtype), axis=None if axis is None else 0)
    dtype = np.dtype(kwargs["dtype"]) if kwargs.get("dtype") is not None else probe.dtype
    result = ops.recorder.record(name, [ops.operand(x)], dtype, shape, params=params)
    return result


def _concatenate(arrays: Any, axis: Any = 0, **kwargs: Any) -> Traced:
    items = list(arrays)
    if not items or kwargs.keys() - {"dtype", "casting"}:
        raise TracingError("concatenate of no arrays, or with out=")
    ops = _ops(*items)
    values = [v if isinstance(v, Traced) else ops.recorder.constant(np.asarray(v)) for v in items]
    dtype = np.result_type(*(np.zeros((1,) * v.ndim, v.dtype) for v in values))
    if kwargs.get("dtype") is not None:
        dtype = np.dtype(kwargs["dtype"])
    if axis is None:
        shape: tuple[int, ...] = (sum(v.size for v in values),)
        params: list[int] = []
    else:
        ndim = values[0].ndim
        (index,) = _axes(axis, ndim) or (0,)
        if any(
            v.ndim != ndim
            or v.shape[:index] + v.shape[index + 1 :]
            != values[0].shape[:index] + values[0].shape[index + 1 :]
            for v in values
        ):
            raise TracingError(f"concatenate of shapes {[list(v.shape) for v in values]} along axis {axis}")
        shape = (*values[0].shape[:index], sum(v.shape[index] for v in values), *values[0].shape[index + 1 :])
        params = [index]
    return ops.recorder.record("concatenate", [ops.operand(v) for v in values], dtype, shape, params=params)


def _stack(arrays: Any, axis: int = 0, **kwargs: Any) -> Traced:
    items = list(arrays)
    if not items:
        raise TracingError("stack of no arrays")
    ops = _ops(*items)
    values = [v if isinstance(v, Traced) else ops.recorder.constant(np.asarray(v)) for v in items]
    if len({v.shape for v in values}) != 1:
        raise TracingError(f"stack of arrays of shapes {[list(v.shape) for v in values]}")
    return _concatenate([_expand_dims(v, axis) for v in values], axis=axis, **kwargs)


def _take(x: Any, indices: Any, axis: Any = None, **kwargs: Any) -> Traced:
    ops = _ops(x, indices)
    if kwargs:
        raise TracingError(f"take() with {sorted(kwargs)} is not traced")
    if not isinstance(x, Traced):
        x = ops.recorder.constant(np.asarray(x))
    index_shape = _shape(indices)
    if _probe_dtype(indices).kind not in "iu":
        raise TracingError("take needs integer indices")
    if axis is None:
        shape: tuple[int, ...] = index_shape
        params: list[int] = []
    else:
        (at,) = _axes(axis, x.ndim) or (0,)
        shape, params = (*x.shape[:at], *index_shape, *x.shape[at + 1 :]), [at]
    return ops.recorder.record("take", [ops.operand(x), ops.operand(indices)], x.dtype, shape, params=params)


def _full_like(x: Any, fill: Any, dtype: Any = None, **kwargs: Any) -> Traced:
    ops = _ops(x)
    result_dtype = np.dtype(dtype) if dtype is not None else _probe_dtype(x)
    value = scalar_operand(np.asarray(fill, result_dtype)[()])
    return ops.recorder.record("full", [value], result_dtype, _shape(x))


_FUNCTIONS: Final[dict[str, Callable[..., Any]]] = {
    **{name: functools.partial(_reduce, name) for name in _REDUCTIONS},
    "matmul": _matmul,
    "dot": lambda a, b: _matmul(a, b) if _shape(a) and _shape(b) else a * b,
    "where": _where,
    "clip": _clip,
    "transpose": lambda x, axes=None: _transpose(x, tuple(axes) if axes is not None else None),
    "reshape": lambda x, shape=None, *a, **k: _reshape(x, shape if shape is not None else k["newshape"]),
    "squeeze": _squeeze,
    "expand_dims": _expand_dims,
    "ravel": lambda x: _reshape(x, (-1,)),
    "zeros_like": lambda x, dtype=None, **k: _full_like(x, 0, dtype),
    "ones_like": lambda x, dtype=None, **k: _full_like(x, 1, dtype),
    "full_like": lambda x, fill_value, dtype=None, **k: _full_like(x, fill_value, dtype),
    "astype": lambda x, dtype, **k: x.astype(dtype),
    "sort": functools.partial(_along, "sort"),
    "argsort": functools.partial(_along, "argsort"),
    "cumsum": functools.partial(_along, "cumsum"),
    "cumprod": functools.partial(_along, "cumprod"),
    "concatenate": _concatenate,
    "concat": _concatenate,
    "stack": _stack,
    "vstack": lambda arrays, **k: _concatenate([_at_least_2d(a) for a in arrays], axis=0, **k),
    "hstack": lambda arrays, **k: _hstack(list(arrays), **k),
    "take": _take,
    "outer": lambda a, b: _ops(a, b).elementwise(
        "multiply", (_reshape(a, (-1, 1)) if isinstance(a, Traced) else np.reshape(a, (-1, 1)), _flat(b))
    ),
}


def _hstack(items: list[Any], **kwargs: Any) -> Traced:
    """Columns side by side (1-D arrays end to end), as ``np.hstack``."""
    return _concatenate(items, axis=1 if items and len(_shape(items[0])) > 1 else 0, **kwargs)


def _at_least_2d(value: Any) -> Any:
    if isinstance(value, Traced):
        return _reshape(value, (1, value.size)) if value.ndim < 2 else value
    return np.atleast_2d(value)


def _flat(value: Any) -> Any:
    return _reshape(value, (-1,)) if isinstance(value, Traced) else np.ravel(value)


# -- loops --------------------------------------------------------------------------------------------------


def fori_loop(n: int, body: Callable[[Any, Any], Any], init: Any) -> Any:
    """``carry = body(i, carry)`` for ``i`` in ``range(n)``; the final carry.

    Inside a task that ``pool.map`` or ``pool.submit`` traces, the loop becomes one op that the agent runs
    trip after trip, with no round trip per step: ``init`` is an array or a tuple of arrays, ``body``
    returns the same structure with the same dtypes and shapes, and ``i`` is a 0-d int64 value. Anywhere
    else it is a plain Python loop over whatever ``body`` computes.

    Raises:
        TracingError: a body that changes a carried value's dtype or shape, or returns another structure.
    """
    values = list(init) if isinstance(init, tuple | list) else [init]
    recorder = _recorder_of(values) or _ACTIVE.get()
    if recorder is None:
        carry = init
        for i in range(int(n)):
            carry = body(i, carry)
        return carry
    if not isinstance(n, int | np.integer) or n < 0:
        raise TracingError(f"fori_loop runs a Python count of trips, not {n!r}")
    ops = _Ops(recorder)
    start = [v if isinstance(v, Traced) else recorder.constant(np.asarray(v)) for v in values]
    inner = recorder.child()
    carry_names = [inner.new_id() for _ in start]
    counter = inner.new_id()
    placeholders = [Traced(inner, name, v.shape, v.dtype) for name, v in zip(carry_names, start, strict=True)]
    index = Traced(inner, counter, (), np.dtype(np.int64))
    given = tuple(placeholders) if isinstance(init, tuple | list) else placeholders[0]
    token = _ACTIVE.set(inner)
    try:
        returned = body(index, given)
    finally:
        _ACTIVE.reset(token)
    out = list(returned) if isinstance(returned, tuple | list) else [returned]
    if len(out) != len(start) or isinstance(returned, tuple | list) != isinstance(init, tuple | list):
        raise TracingError(f"the loop body returned {len(out)} values for a carry of {len(start)}")
    nexts = []
    for k, (value, first) in enumerate(zip(out, start, strict=True)):
        if not isinstance(value, Traced):
            value = inner.constant(np.asarray(value, first.dtype))
        if (value.dtype, value.shape) != (first.dtype, first.shape):
            raise TracingError(
                f"the loop body changes carry {k} from {first.dtype.name}{list(first.shape)} to "
                f"{value.dtype.name}{list(value.shape)} (cast with .astype, e.g. i.astype(x.dtype))"
            )
        nexts.append(value.name)
    outputs = [recorder.new_id() for _ in start]
    recorder.ops.append(
        agent_pb2.Op(
            op="fori_loop",
            inputs=[ops.operand(v) for v in start],
            outputs=outputs,
            expects=[meta_of(v.dtype, v.shape) for v in start],
            loop=agent_pb2.Loop(trips=int(n), counter=counter, carry=carry_names, body=inner.ops, next=nexts),
        )
    )
    results = [Traced(recorder, name, v.shape, v.dtype) for name, v in zip(outputs, start, strict=True)]
    return tuple(results) if isinstance(init, tuple | list) else results[0]


# -- a whole function ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trace:
    """A function traced into ops: ``inputs`` are the buffer names that stand for array arguments (bound
    to buffers when it runs), ``results`` the structure of what it returned, with names to fetch."""

    ops: tuple[agent_pb2.Op, ...]
    inputs: tuple[str, ...]
    results: Any
    fetch: tuple[str, ...]
    work_bytes: int
    work_flops: int
    #: At most the memory its program takes on a worker: every value it makes (a loop's body's too).
    memory_bytes: int = 0


def trace(
    fn: Callable[..., Any],
    args: Sequence[Any],
    kwargs: dict[str, Any],
    *,
    bound: Callable[[Any], tuple[tuple[int, ...], np.dtype[Any]] | None],
) -> Trace:
    """Trace ``fn(*args, **kwargs)``.

    Args:
        bound: for an argument that stands for resident data (a replicated data set), its shape and dtype;
            None for any other value (scalars stay scalars, host arrays become inline constants).

    Raises:
        TracingError: what the function did cannot be traced (the message says what and why).
    """
    recorder = Recorder()
    inputs: list[str] = []

    def stand_in(value: Any) -> Any:
        meta = bound(value)
        if meta is not None:
            name = f"in{len(inputs)}"
            inputs.append(name)
            return Traced(recorder, name, meta[0], meta[1])
        if isinstance(value, np.ndarray) and value.ndim:
            return recorder.constant(value)
        return value

    traced_args = [stand_in(a) for a in args]
    traced_kwargs = {k: stand_in(v) for k, v in kwargs.items()}
    token = _ACTIVE.set(recorder)
    try:
        returned = fn(*traced_args, **traced_kwargs)
    finally:
        _ACTIVE.reset(token)
    fetch: list[str] = []

    def collect(value: Any) -> Any:
        if isinstance(value, Traced):
            if value.recorder is not recorder:
                raise TracingError("the task returned a value of a loop body; return the loop's result")
            fetch.append(value.name)
            return ("fetch", value.name)
        if isinstance(value, tuple | list):
            return (type(value).__name__, [collect(v) for v in value])
        if isinstance(value, dict):
            return ("dict", {k: collect(v) for k, v in value.items()})
        if value is None or is_scalar(value) or isinstance(value, str):
            return ("value", value)
        if isinstance(value, np.ndarray):
            return ("value", value)
        raise TracingError(
            f"a task returned a {type(value).__name__}: return arrays, scalars or containers of them"
        )

    results = collect(returned)
    sizes = {name: _nbytes(meta) for op in recorder.ops for name, meta in op_results(op)}
    returned_bytes = sum(sizes.get(name, 0) for name in dict.fromkeys(fetch))
    if returned_bytes > MAX_RESULT_BYTES:
        raise TracingError(
            f"a task's results come back inline, at most {MAX_RESULT_BYTES >> 20} MiB; this one returns "
            f"{returned_bytes} bytes: reduce them on the agent, or return less"
        )
    work_bytes, work_flops = _work(recorder.ops)
    unique = tuple(dict.fromkeys(fetch))
    memory = _memory(recorder.ops)
    return Trace(tuple(recorder.ops), tuple(inputs), results, unique, work_bytes, work_flops, memory)


def _nbytes(meta: agent_pb2.ArrayMeta) -> int:
    return math.prod(meta.shape) * np.dtype(meta.dtype).itemsize


def _memory(ops: Sequence[agent_pb2.Op]) -> int:
    """Bytes of every value ``ops`` make, loop bodies included: a bound on a program's memory."""
    total = 0
    for op in ops:
        total += sum(_nbytes(meta) for _, meta in op_results(op))
        if op.op == "fori_loop":
            total += _memory(op.loop.body)
    return total


def _work(ops: Sequence[agent_pb2.Op]) -> tuple[int, int]:
    """Bytes touched and flops, roughly, for the program's deadline (a loop's body times its trips)."""
    touched = flops = 0
    sizes: dict[str, int] = {}
    for op in ops:
        if op.op == "fori_loop":
            body_bytes, body_flops = _work(op.loop.body)
            touched += body_bytes * op.loop.trips
            flops += body_flops * op.loop.trips
            continue
        elements = math.prod(op.expect.shape)
        sizes[op.output] = elements
        touched += 8 * elements * (1 + len(op.inputs))
        if op.op == "matmul" and len(op.inputs) == 2:
            left = sizes.get(op.inputs[0].buffer, elements)
            flops += 2 * elements * max(1, math.isqrt(max(left, 1)))
        else:
            flops += elements
    return touched, flops


def rename(ops: Sequence[agent_pb2.Op], names: Callable[[str], str]) -> list[agent_pb2.Op]:
    """Copies of ``ops`` with every buffer name passed through ``names`` (loop bodies too)."""
    renamed = []
    for op in ops:
        copy = agent_pb2.Op()
        copy.CopyFrom(op)
        _rename_in_place(copy, names)
        renamed.append(copy)
    return renamed


def _rename_in_place(op: agent_pb2.Op, names: Callable[[str], str]) -> None:
    if op.output:
        op.output = names(op.output)
    op.outputs[:] = [names(n) for n in op.outputs]
    for item in op.inputs:
        if item.WhichOneof("kind") == "buffer":
            item.buffer = names(item.buffer)
    if op.HasField("loop"):
        loop = op.loop
        loop.carry[:] = [names(n) for n in loop.carry]
        loop.next[:] = [names(n) for n in loop.next]
        if loop.counter:
            loop.counter = names(loop.counter)
        for body_op in loop.body:
            _rename_in_place(body_op, names)

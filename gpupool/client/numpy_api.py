"""NumPy's functions on remote arrays (``__array_function__``): the ones gpupool runs on the pool, with
NumPy's signatures, and the host fallback for the rest (:mod:`gpupool.client.coverage`).

Each handler takes NumPy's arguments and returns a value, or the :class:`~gpupool.client.graph.ArraySpec`
of a remote array, which the array's ``_make`` hook (:class:`~gpupool.client.array.RemoteArray`) turns into
one. A handler raises :class:`~gpupool.client.dispatch.Unsupported` for arguments it does not run on the
pool; those calls, and every function without a handler, run on the host copy with a one-time warning.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any, Final

import numpy as np

from gpupool.client import crossaxis, dispatch, layouts, reductions
from gpupool.client.coverage import count, run_on_host
from gpupool.client.dispatch import Unsupported
from gpupool.client.graph import ArraySpec, GraphArray, Node
from gpupool.client.operands import constant_operand
from gpupool.client.transposed import Transposed

__all__ = ["HANDLED", "call", "dispatch_function", "register"]

#: NumPy's other names for the same functions.
_ALIASES: Final = {"amax": "max", "amin": "min", "around": "round", "round_": "round"}


def _remote(value: object, name: str) -> GraphArray:
    if not isinstance(value, GraphArray):
        raise Unsupported(f"{name}: the first argument is not a remote array")
    return value


def _defaults_only(name: str, extra: tuple[Any, ...], rest: Mapping[str, Any]) -> None:
    """Refuse arguments beyond those gpupool runs on the pool (``out=``, ``dtype=``, ``where=`` ...)."""
    if extra or any(v is not None and v is not np._NoValue and v is not True for v in rest.values()):
        raise Unsupported(f"{name}: arguments {sorted(rest)} run on the host")


def _reduction(op: str) -> Callable[..., Any]:
    def handle(a: Any, axis: Any = None, *extra: Any, keepdims: Any = False, **rest: Any) -> Any:
        ddof = rest.pop("ddof", 0) if op in ("var", "std") else 0
        _defaults_only(op, extra, rest)
        keep = bool(keepdims) if keepdims is not np._NoValue else False
        return reductions.reduce(_remote(a, op), op, axis, keepdims=keep, ddof=ddof)

    return handle


def _clip(a: Any, a_min: Any = None, a_max: Any = None, *extra: Any, **rest: Any) -> ArraySpec:
    low = rest.pop("min", None) if a_min is None else a_min
    high = rest.pop("max", None) if a_max is None else a_max
    _defaults_only("clip", extra, rest)
    array = _remote(a, "clip")
    if low is None and high is None:
        raise Unsupported("clip: neither bound given")
    if low is None:
        return dispatch.elementwise("minimum", [array, high])
    if high is None:
        return dispatch.elementwise("maximum", [array, low])
    return dispatch.elementwise("clip", [array, low, high])


def _round(a: Any, decimals: Any = 0, out: Any = None) -> ArraySpec:
    _defaults_only("round", (), {"out": out})
    array = _remote(a, "round")
    if array.dtype.kind == "b":
        raise Unsupported("round: of a bool array")
    return dispatch.unary("round", array, array.dtype, params=(int(decimals),))


def _where(condition: Any, x: Any = None, y: Any = None) -> ArraySpec:
    if x is None or y is None:
        raise Unsupported("where: with one argument (nonzero)")
    return dispatch.elementwise("where", [condition, x, y])


def _dot(a: Any, b: Any, out: Any = None) -> ArraySpec:
    _defaults_only("dot", (), {"out": out})
    if isinstance(b, Transposed):  # x @ y.T of two sharded arrays: y's rows pulled agent to agent
        return crossaxis.matmul_transposed(_remote(a, "dot"), b.base)
    return dispatch.matmul(_remote(a, "dot"), b)


def _scan(op: str) -> Callable[..., Any]:
    def handle(a: Any, axis: Any = None, dtype: Any = None, out: Any = None) -> Any:
        _defaults_only(op, (), {"dtype": dtype, "out": out})
        return scan(_remote(a, op), op, axis)

    return handle


def scan(array: GraphArray, op: str, axis: Any) -> Any:
    """``np.cumsum``/``np.cumprod`` of ``array``: per shard along another axis; along axis 0 (or the
    flattened 1-D array), per-shard scans that each add (multiply by) the totals of the shards before it.

    Raises:
        Unsupported: the flattened scan of an array with more than one dimension.
    """
    dtype = np.cumsum(np.zeros(1, array.dtype)).dtype
    if axis is None and array.ndim > 1:
        raise Unsupported(f"{op}: of the flattened array")
    axis = 0 if axis is None else int(np.lib.array_utils.normalize_axis_index(axis, array.ndim))
    local = dispatch.unary(op, array, dtype, params=(axis,))
    if axis > 0:
        return local
    total_op, combine = ("sum", np.add) if op == "cumsum" else ("prod", np.multiply)
    rest = array.shape[1:]
    totals = reductions.run_partials(array, total_op, lambda rows: (1, *rest), (0,), dtype)
    carry = np.full((1, *rest), 0 if op == "cumsum" else 1, dtype)
    carries: dict[tuple[int, int], Any] = {}
    nonempty = [p for p in array.layout if p.stop > p.start]
    for piece, total in zip(nonempty, totals, strict=True):
        carries[piece.start, piece.stop] = constant_operand(carry)
        with np.errstate(all="ignore"):
            carry = combine(carry, total).astype(dtype)
    identity = constant_operand(np.full((1, *rest), 0 if op == "cumsum" else 1, dtype))
    return _Carry("add" if op == "cumsum" else "multiply", local, carries, identity)


class _Carry:
    """A scan's second round: the local scan's spec and each shard's carry, for :func:`wrap` to chain."""

    def __init__(self, op: str, local: ArraySpec, carries: dict[tuple[int, int], Any], identity: Any) -> None:
        self.op, self.local, self.carries, self.identity = op, local, carries, identity

    def node(self, scanned: GraphArray) -> ArraySpec:
        carries, identity = self.carries, self.identity

        def operand(piece: Any) -> Any:
            return carries.get((piece.start, piece.stop), identity)

        node = Node(self.op, (scanned, operand), depth=dispatch.depth_after([scanned]))
        return dispatch.pending_spec(scanned.shape, scanned.dtype, scanned, node)


def _transpose(a: Any, axes: Any = None) -> ArraySpec:
    return layouts.transpose(_remote(a, "transpose"), axes)


def _swapaxes(a: Any, axis1: Any, axis2: Any) -> ArraySpec:
    return layouts.swapaxes(_remote(a, "swapaxes"), axis1, axis2)


def _reshape(a: Any, shape: Any = None, order: Any = "C", *, newshape: Any = None, copy: Any = None) -> Any:
    if order != "C" or copy is not None:
        raise Unsupported("reshape: order= or copy=")
    return layouts.reshape(_remote(a, "reshape"), newshape if shape is None else shape)


def _expand_dims(a: Any, axis: Any) -> ArraySpec:
    return layouts.expand_dims(_remote(a, "expand_dims"), axis)


def _squeeze(a: Any, axis: Any = None) -> ArraySpec:
    return layouts.squeeze(_remote(a, "squeeze"), axis)


def _ordering(op: str) -> Callable[..., Any]:
    def handle(a: Any, axis: Any = -1, kind: Any = None, order: Any = None, *, stable: Any = None) -> Any:
        _defaults_only(op, (), {"kind": kind, "order": order, "stable": stable})
        return layouts.sort(_remote(a, op), op, axis)

    return handle


def _partition(a: Any, kth: Any, axis: Any = -1, kind: Any = "introselect", order: Any = None) -> Any:
    _defaults_only("partition", (), {"order": order})
    return layouts.sort(_remote(a, "partition"), "partition", axis, kth)


def _concatenate(
    arrays: Any, axis: Any = 0, out: Any = None, *, dtype: Any = None, casting: Any = None
) -> Any:
    _defaults_only("concatenate", (), {"out": out, "dtype": dtype, "casting": casting})
    return layouts.concatenate(list(arrays), axis)


def _stack(arrays: Any, axis: Any = 0, out: Any = None, *, dtype: Any = None, casting: Any = None) -> Any:
    _defaults_only("stack", (), {"out": out, "dtype": dtype, "casting": casting})
    return layouts.stack(list(arrays), axis)


def _hstack(tup: Any, *, dtype: Any = None, casting: Any = None) -> Any:
    _defaults_only("hstack", (), {"dtype": dtype, "casting": casting})
    return layouts.hstack(list(tup))


_LAYOUTS: Final[Mapping[str, Callable[..., Any]]] = {
    "transpose": _transpose,
    "swapaxes": _swapaxes,
    "reshape": _reshape,
    "expand_dims": _expand_dims,
    "squeeze": _squeeze,
    "sort": _ordering("sort"),
    "argsort": _ordering("argsort"),
    "partition": _partition,
    "concatenate": _concatenate,
    "stack": _stack,
    "hstack": _hstack,
    "allclose": layouts.allclose,
    "array_equal": layouts.array_equal,
}

#: The NumPy functions gpupool runs on the pool, by name.
HANDLED: Final[Mapping[str, Callable[..., Any]]] = {
    **{op: _reduction(op) for op in reductions.REDUCTIONS},
    "clip": _clip,
    "round": _round,
    "where": _where,
    "dot": _dot,
    "cumsum": _scan("cumsum"),
    "cumprod": _scan("cumprod"),
    **_LAYOUTS,
}


#: Functions a higher client module runs on the pool by composing operations on remote arrays
#: (:mod:`gpupool.client.composite`), registered when it is imported: by name, as :data:`HANDLED`.
_REGISTERED: dict[str, Callable[..., Any]] = {}


def register(handlers: Mapping[str, Callable[..., Any]]) -> None:
    """Run NumPy's functions named in ``handlers`` with them (after :data:`HANDLED`'s, where that one
    raises :class:`~gpupool.client.dispatch.Unsupported`)."""
    _REGISTERED.update(handlers)


def _lead(values: Any) -> Any:
    for value in values:
        if isinstance(value, GraphArray):
            return value
        if isinstance(value, list | tuple):  # concatenate's and stack's sequence of arrays
            found = _lead(value)
            if found is not None:
                return found
    return None


def wrap(result: Any, lead: Any) -> Any:
    """A handler's result as what the caller gets: specs become remote arrays made by ``lead._make``."""
    if isinstance(result, _Carry):
        return wrap(result.node(lead._make(result.local)), lead)
    if isinstance(result, ArraySpec):
        return lead._make(result)
    return result


@functools.cache
def _signature(handler: Callable[..., Any]) -> inspect.Signature:
    """A handler's signature, worked out once (``inspect.signature`` costs tens of microseconds a call)."""
    return inspect.signature(handler)


def call(name: str, function: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run NumPy's ``function`` (called ``name``) on the pool if gpupool can, else on the host copy."""
    name = _ALIASES.get(name, name)
    for handler in (HANDLED.get(name), _REGISTERED.get(name)):
        if handler is None:
            continue
        try:
            _signature(handler).bind(*args, **kwargs)
        except TypeError:
            continue
        try:
            result = handler(*args, **kwargs)
        except Unsupported:
            continue
        count(name, "pool")
        return wrap(result, _lead([*args, *kwargs.values()]))
    return run_on_host(name, function, args, kwargs)


def dispatch_function(function: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``__array_function__``'s work: :func:`call` by the function's name."""
    return call(getattr(function, "__name__", repr(function)), function, tuple(args), dict(kwargs))

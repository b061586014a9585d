"""Layout and ordering ops: transpose, swapaxes, reshape, expand_dims, squeeze, sort/argsort/partition,
concatenate/stack/hstack, and the comparisons allclose/array_equal.

Where the sharded axis 0 stays in place they run per shard: each function returns the
:class:`~gpupool.client.graph.ArraySpec` of a pending array with its operand's row layout. Where the op moves
rows between shards (transpose, swapaxes or reshape across axis 0, concatenate along it, sort or argsort
along it) the rows move agent to agent (:mod:`gpupool.client.crossaxis`) and the result is resident. What
neither runs raises :class:`~gpupool.client.dispatch.Unsupported` (the host copy, with the warning, from
:mod:`gpupool.client.numpy_api`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from gpupool.client import crossaxis, dispatch, reductions
from gpupool.client.dispatch import Unsupported
from gpupool.client.graph import ArraySpec, GraphArray, Node
from gpupool.client.layout import layout_key

__all__ = [
    "allclose",
    "array_equal",
    "concatenate",
    "expand_dims",
    "reshape",
    "sort",
    "squeeze",
    "stack",
    "swapaxes",
    "transpose",
]


def _node(op: str, array: GraphArray, shape: tuple[int, ...], dtype: Any = None, **fields: Any) -> ArraySpec:
    array.check()
    node = Node(op, (array,), depth=dispatch.depth_after([array]), **fields)
    return dispatch.pending_spec(shape, np.dtype(dtype or array.dtype), array, node)


def _axis(name: str, axis: Any, ndim: int) -> int:
    return int(np.lib.array_utils.normalize_axis_index(int(axis), ndim))


def transpose(array: GraphArray, axes: Any = None) -> ArraySpec:
    """``np.transpose(array, axes)``: per shard where axis 0 stays first, else rows move agent to agent.

    Raises:
        Unsupported: an empty array whose axis 0 would move (it runs on the host).
    """
    ndim = array.ndim
    order = tuple(reversed(range(ndim))) if axes is None else tuple(_axis("transpose", a, ndim) for a in axes)
    if sorted(order) != list(range(ndim)):
        raise ValueError(f"axes {axes} don't match an array of {ndim} dimensions")
    if ndim and order[0] != 0:
        return crossaxis.transpose_rows(array, order)
    shape = tuple(array.shape[a] for a in order)
    return _node("transpose", array, shape, axes=order)


def swapaxes(array: GraphArray, first: Any, second: Any) -> ArraySpec:
    """``np.swapaxes``: per shard when neither axis is 0, else rows move agent to agent."""
    a, b = _axis("swapaxes", first, array.ndim), _axis("swapaxes", second, array.ndim)
    if 0 in (a, b) and a != b:
        order = list(range(array.ndim))
        order[a], order[b] = order[b], order[a]
        return crossaxis.transpose_rows(array, order)
    shape = list(array.shape)
    shape[a], shape[b] = shape[b], shape[a]
    return _node("swapaxes", array, tuple(shape), params=(a, b))


def reshape(array: GraphArray, shape: Any) -> ArraySpec:
    """``np.reshape``: per shard where axis 0 keeps its length (the other axes regrouped within each row),
    else the elements that cross a shard boundary move agent to agent.

    Raises:
        Unsupported: an empty array or a 0-d one, or a 0-d result, across axis 0 (they run on the host).
    """
    wanted = (int(shape),) if isinstance(shape, int | np.integer) else tuple(int(n) for n in shape)
    try:
        new = np.empty(array.shape, dtype=np.bool_).reshape(wanted).shape  # NumPy's checks and -1
    except ValueError:
        raise
    if not array.shape:
        raise Unsupported("reshape: of a 0-d array")
    if not new or new[0] != array.shape[0]:
        return crossaxis.reshape_rows(array, new)
    rest = new[1:]
    return _node("reshape", array, new, shard_params=lambda rows: (rows, *rest))


def expand_dims(array: GraphArray, axis: Any) -> ArraySpec:
    """``np.expand_dims`` at an axis after the first.

    Raises:
        Unsupported: a tuple of axes, or a new axis 0.
    """
    if isinstance(axis, tuple | list):
        raise Unsupported("expand_dims: a tuple of axes")
    at = _axis("expand_dims", axis, array.ndim + 1)
    if at == 0:
        raise Unsupported("expand_dims: a new axis 0 would move the sharded axis")
    shape = (*array.shape[:at], 1, *array.shape[at:])
    return _node("expand_dims", array, shape, params=(at,))


def squeeze(array: GraphArray, axis: Any = None) -> ArraySpec:
    """``np.squeeze`` of axes other than 0.

    Raises:
        Unsupported: it would remove axis 0.
        ValueError: NumPy's, for an axis whose length is not 1.
    """
    if axis is None:
        axes = tuple(i for i, n in enumerate(array.shape) if n == 1)
    else:
        items = axis if isinstance(axis, tuple | list) else (axis,)
        axes = tuple(sorted({_axis("squeeze", a, array.ndim) for a in items}))
        if any(array.shape[a] != 1 for a in axes):
            raise ValueError("cannot select an axis to squeeze out which has size not equal to one")
    if 0 in axes:
        raise Unsupported("squeeze: removes the sharded axis 0")
    if not axes:
        return _node("reshape", array, array.shape, shard_params=lambda rows: (rows, *array.shape[1:]))
    shape = tuple(n for i, n in enumerate(array.shape) if i not in axes)
    return _node("squeeze", array, shape, axes=axes)


def sort(array: GraphArray, op: str, axis: Any = -1, kth: Any = None) -> ArraySpec:
    """``np.sort``/``np.argsort``/``np.partition`` along an axis other than 0, per shard; ``sort`` and
    ``argsort`` along axis 0 with rows moved agent to agent (:func:`gpupool.client.crossaxis.sort_rows`).

    Raises:
        Unsupported: of the flattened array, a partition along axis 0, or a sequence of kth.
    """
    if axis is None or array.ndim == 0:
        raise Unsupported(f"{op}: of the flattened array")
    at = _axis(op, axis, array.ndim)
    if at == 0 and op != "partition":
        return crossaxis.sort_rows(array, op, array._make)  # type: ignore[attr-defined]
    if at == 0:
        raise Unsupported(f"{op}: along the sharded axis 0")
    dtype = np.dtype(np.intp) if op == "argsort" else array.dtype
    if op == "partition":
        if not isinstance(kth, int | np.integer):
            raise Unsupported("partition: a sequence of kth")
        length = array.shape[at]
        if not -length <= int(kth) < length:
            raise ValueError(f"kth(={kth}) out of bounds ({length})")
        return _node(op, array, array.shape, dtype, params=(at, int(kth) % length))
    return _node(op, array, array.shape, dtype, params=(at,))


def _same_layout(name: str, arrays: Sequence[Any]) -> list[GraphArray]:
    if not arrays or not all(isinstance(a, GraphArray) for a in arrays):
        raise Unsupported(f"{name}: every array must be remote")
    remotes: list[GraphArray] = list(arrays)
    first = remotes[0]
    if any(
        a.session is not first.session or layout_key(a.layout) != layout_key(first.layout) for a in remotes
    ):
        raise Unsupported(f"{name}: arrays laid out differently")
    for a in remotes:
        a.check()
    return remotes


def concatenate(arrays: Sequence[Any], axis: Any = 0) -> ArraySpec:
    """``np.concatenate``: along an axis other than 0 of arrays with the same row layout, per shard; along
    axis 0 of any remote arrays of one pool, with rows moved agent to agent.

    Raises:
        Unsupported: flattened, arrays laid out differently along another axis, or host operands.
    """
    remote = axis is not None and all(isinstance(a, GraphArray) and a.ndim for a in arrays)
    if remote and arrays and _axis("concatenate", axis, arrays[0].ndim) == 0:
        return crossaxis.concatenate_rows(arrays)
    remotes = _same_layout("concatenate", arrays)
    first = remotes[0]
    if axis is None or first.ndim == 0:
        raise Unsupported("concatenate: flattened")
    at = _axis("concatenate", axis, first.ndim)
    if at == 0:
        raise Unsupported("concatenate: along the sharded axis 0")
    shape = np.concatenate([np.empty(a.shape, np.bool_) for a in remotes], axis=at).shape
    dtype = np.result_type(*(a.dtype for a in remotes))
    node = Node("concatenate", tuple(remotes), depth=dispatch.depth_after(remotes), params=(at,))
    return dispatch.pending_spec(shape, dtype, first, node)


def stack(arrays: Sequence[Any], axis: Any = 0) -> ArraySpec:
    """``np.stack`` at an axis other than 0: each array gets a new axis there, then they are concatenated.

    Raises:
        Unsupported: at axis 0, or arrays laid out differently.
    """
    remotes = _same_layout("stack", arrays)
    if len({a.shape for a in remotes}) != 1:
        raise ValueError("all input arrays must have the same shape")
    at = _axis("stack", axis, remotes[0].ndim + 1)
    if at == 0:
        raise Unsupported("stack: along the sharded axis 0")
    # Real arrays (made by the operands' own hook), so an in-place update of an operand redirects them.
    expanded = [a._make(expand_dims(a, at)) for a in remotes]  # type: ignore[attr-defined]
    return concatenate(expanded, at)


def hstack(arrays: Sequence[Any]) -> ArraySpec:
    """``np.hstack``: along axis 1 of arrays of two or more dimensions, along axis 0 of 1-D arrays (rows
    moved agent to agent)."""
    if arrays and all(isinstance(a, GraphArray) and a.ndim == 1 for a in arrays):
        return crossaxis.concatenate_rows(arrays)
    remotes = _same_layout("hstack", arrays)
    if remotes[0].ndim < 2:
        raise Unsupported("hstack: of 1-D arrays with others")
    return concatenate(remotes, 1)


class _Pending(GraphArray):
    """A pending array that lives only inside a comparison computed at once (no in-place update can come
    between its making and its use)."""

    __slots__ = ("_layout", "dtype", "node", "session", "shape")

    def __init__(self, spec: ArraySpec) -> None:
        self.session, self.shape, self.dtype = spec.session, spec.shape, spec.dtype
        self.node, self._layout = spec.node, spec.layout

    @property
    def layout(self) -> Any:
        return self._layout

    def check(self) -> None:
        self.session.check_open()


def _shape_of(value: Any) -> tuple[int, ...]:
    return value.shape if isinstance(value, GraphArray) else tuple(np.shape(value))


def array_equal(a: Any, b: Any, equal_nan: bool = False) -> bool:
    """``np.array_equal``: an elementwise compare and an all-reduce on the pool."""
    if equal_nan or not isinstance(a, GraphArray):
        raise Unsupported("array_equal: equal_nan, or a first operand that is not remote")
    if _shape_of(b) != a.shape:
        return False
    if math.prod(a.shape) == 0:
        return True
    same = _Pending(dispatch.elementwise("equal", [a, b]))
    return bool(reductions.reduce(same, "all", None, keepdims=False))


def allclose(a: Any, b: Any, rtol: float = 1e-05, atol: float = 1e-08, equal_nan: bool = False) -> bool:
    """``np.allclose``: ``|a - b| <= atol + rtol * |b|`` (or equal) elementwise, then an all-reduce."""
    if equal_nan or not isinstance(a, GraphArray):
        raise Unsupported("allclose: equal_nan, or a first operand that is not remote")
    if math.prod(np.broadcast_shapes(a.shape, _shape_of(b))) == 0:
        return True
    diff = _Pending(dispatch.elementwise("subtract", [a, b]))
    gap = _Pending(dispatch.elementwise("absolute", [diff]))
    scale = _Pending(dispatch.elementwise("absolute", [b])) if isinstance(b, GraphArray) else np.abs(b)
    bound = (
        _Pending(dispatch.elementwise("multiply", [scale, rtol]))
        if isinstance(scale, GraphArray)
        else rtol * np.asarray(scale, dtype=np.float64)
    )
    limit = (
        _Pending(dispatch.elementwise("add", [bound, atol]))
        if isinstance(bound, GraphArray)
        else bound + atol
    )
    close = _Pending(dispatch.elementwise("less_equal", [gap, limit]))
    equal = _Pending(dispatch.elementwise("equal", [a, b]))
    either = _Pending(dispatch.elementwise("logical_or", [close, equal]))
    return bool(reductions.reduce(either, "all", None, keepdims=False))

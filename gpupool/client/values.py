"""Pending values: results that come back to the client, such as reductions over the sharded axis.

A :class:`PendingValue` is what ``x.sum()`` or ``x.mean(0)`` gives: a 0-d (or small) array that is not
computed yet. It holds :class:`Request`\\ s (a per-shard *partial* of a remote array, such as each shard's
sum) and how to combine the partials into a NumPy value. ``float()``, ``int()``, ``bool()``, ``.item()``,
``np.asarray`` force it (one round of programs); :func:`gpupool.compute` forces many at once, every partial
asked of a shard riding in that shard's one program. Arithmetic and comparisons with scalars or other
pending values stay pending, as NumPy's 0-d arrays give 0-d arrays: ``x.sum() == 3`` is forced by its
``bool()``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gpupool._proto.v1 import agent_pb2
from gpupool.client.device import ArrayApiObject
from gpupool.client.graph import GraphArray, ProgramBuilder, Round, make_op
from gpupool.client.operands import buffer_operand

__all__ = ["PendingValue", "Request", "plan_requests", "run_requests"]

#: What combines a value's partials (one list per request, in row order) into its NumPy value.
Combine = Callable[[Sequence[Sequence[np.ndarray]]], Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    """A partial of ``array`` on each non-empty shard: ``op`` over ``axes`` of the shard's rows (after the
    unary op ``prepare``, if any), of ``partial_shape(rows)`` and ``dtype``."""

    array: GraphArray
    op: str
    partial_shape: Callable[[int], tuple[int, ...]]
    axes: tuple[int, ...] | None
    dtype: np.dtype[Any]
    keepdims: bool = True
    prepare: str | None = None

    def emit(self, builder: ProgramBuilder) -> str:
        """Add the partial's ops to ``builder``'s program; returns the buffer id it fetches."""
        session, piece, array = builder.session, builder.piece, self.array
        source = builder.emit(array)
        if self.prepare is not None:
            prepared = session.new_buffer_id()
            rows_shape = (piece.stop - piece.start, *array.shape[1:])
            builder.program.ops.append(
                make_op(self.prepare, [buffer_operand(source)], prepared, np.dtype(bool), rows_shape)
            )
            builder.program.free.append(prepared)
            source = prepared
        partial = session.new_buffer_id()
        inputs: list[agent_pb2.Operand] = [buffer_operand(source)]
        shape = self.partial_shape(piece.stop - piece.start)
        builder.program.ops.append(
            make_op(self.op, inputs, partial, self.dtype, shape, axes=self.axes, keepdims=self.keepdims)
        )
        builder.program.fetch.append(partial)
        builder.program.free.append(partial)
        return partial


def plan_requests(
    round_: Round, requests: Sequence[Request]
) -> Callable[[dict[int, dict[str, np.ndarray]]], list[list[np.ndarray]]]:
    """Add ``requests`` to ``round_``; returns how to pick each one's partials out of the round's results."""
    wanted: list[list[tuple[int, str]]] = []
    for request in requests:
        request.array.check()
        layout = request.array.layout
        places = []
        for index, piece in enumerate(layout):
            if piece.stop > piece.start:
                builder = round_.builder(layout, index)
                places.append((id(builder), request.emit(builder)))
        wanted.append(places)

    def pick(results: dict[int, dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
        return [[results[b][buffer] for b, buffer in places] for places in wanted]

    return pick


def run_requests(requests: Sequence[Request], *, what: str) -> list[list[np.ndarray]]:
    """Each request's partials, in one round of programs."""
    round_ = Round(requests[0].array.session)
    pick = plan_requests(round_, requests)
    return pick(round_.run(what=what))


_UNSET: Any = object()


class PendingValue(ArrayApiObject):
    """A value the pool computes and the client combines: a NumPy array (0-d for a full reduction) not yet
    computed. ``shape``, ``dtype`` and ``ndim`` are known; :meth:`compute` (or ``float()``, ``int()``,
    ``bool()``, ``.item()``, ``np.asarray``) brings the value, which is then kept.

    Args:
        requests: the partials it needs.
        combine: makes the value of their partials.
        shape, dtype: the value's.
    """

    __slots__ = ("__weakref__", "_combine", "_requests", "_value", "dtype", "shape")
    __array_priority__ = 50.0
    __hash__ = None  # type: ignore[assignment]  # == is elementwise, as in NumPy

    def __init__(
        self, requests: Sequence[Request], combine: Combine, *, shape: tuple[int, ...], dtype: np.dtype[Any]
    ) -> None:
        self._requests = tuple(requests)
        self._combine = combine
        self._value: Any = _UNSET
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        for request in self._requests:
            request.array.add_reader(self)

    @classmethod
    def known(cls, value: Any) -> PendingValue:
        """A value already here: a 0-d array of the namespace (``gp.asarray(3.0)``), or a small result."""
        host = np.array(value)  # a copy: nothing else holds it, so __setitem__ cannot reach a caller's array
        result = cls((), _constant_of(host), shape=host.shape, dtype=host.dtype)
        result.resolve([])
        return result

    @property
    def requests(self) -> tuple[Request, ...]:
        """The partials still needed (none once computed)."""
        return self._requests

    @property
    def pending(self) -> bool:
        """Whether the value is still to be computed."""
        return self._value is _UNSET

    @property
    def ndim(self) -> int:
        """Number of dimensions."""
        return len(self.shape)

    @property
    def size(self) -> int:
        """Number of elements."""
        return int(np.prod(self.shape, dtype=np.int64))

    def resolve(self, partials: Sequence[Sequence[np.ndarray]]) -> Any:
        """The value, from its requests' partials (in :attr:`requests` order); kept from then on."""
        if self._value is _UNSET:
            self._value = self._combine(partials)
            self._requests = ()
        return self._value

    def compute(self) -> Any:
        """The value (a NumPy scalar or array), computing it if pending.

        Raises:
            RemoteError: an agent refused a program.
        """
        if self._value is _UNSET:
            partials = run_requests(self._requests, what="reduce") if self._requests else []
            self.resolve(partials)
        return self._value

    def __repr__(self) -> str:
        if self._value is _UNSET:
            return f"<gpupool.PendingValue shape={self.shape} dtype={self.dtype.name} pending>"
        return f"<gpupool.PendingValue {self._value!r}>"

    # -- forcing ------------------------------------------------------------------------------------
    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        host = np.asarray(self.compute())
        return host if dtype is None else host.astype(dtype, copy=False)

    def item(self, *args: Any) -> Any:
        """The value as a Python scalar (as ``ndarray.item``)."""
        return np.asarray(self.compute()).item(*args)

    def tolist(self) -> Any:
        """The value as (nested) Python lists or a scalar."""
        return np.asarray(self.compute()).tolist()

    def __float__(self) -> float:
        return float(np.asarray(self.compute()))

    def __int__(self) -> int:
        return int(np.asarray(self.compute()))

    def __index__(self) -> int:
        return operator.index(np.asarray(self.compute())[()])

    def __complex__(self) -> complex:
        return complex(np.asarray(self.compute()))

    def __bool__(self) -> bool:
        return bool(np.asarray(self.compute()))

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of unsized object")
        return self.shape[0]

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, PendingValue):
            key = np.asarray(key.compute())
        return PendingValue.known(np.asarray(self.compute())[key])

    def __setitem__(self, key: Any, value: Any) -> None:
        host = np.array(self.compute())  # a computed value is kept here: set it in place
        if isinstance(key, PendingValue):
            key = np.asarray(key.compute())
        host[key] = np.asarray(value.compute()) if isinstance(value, PendingValue) else value
        self._value = host if host.ndim else host[()]

    # -- the Array API's array object (namespace, device and DLPack from ArrayApiObject) -------------
    def _host_copy(self) -> np.ndarray:
        return np.asarray(self.compute())

    @property
    def T(self) -> PendingValue:
        """The transpose (of a computed value)."""
        return PendingValue.known(np.asarray(self.compute()).T)

    @property
    def mT(self) -> PendingValue:
        """The last two axes swapped."""
        if self.ndim < 2:
            raise ValueError(f"mT needs at least 2 dimensions, not {self.ndim}")
        return PendingValue.known(np.swapaxes(np.asarray(self.compute()), -1, -2))

    def __iter__(self) -> Any:
        return iter(np.asarray(self.compute()))

    def __format__(self, spec: str) -> str:
        return format(self.compute(), spec)

    # -- arithmetic and comparisons: pending results ---------------------------------------------------
    def _apply(self, function: Callable[..., Any], other: Any, *, reflected: bool = False) -> Any:
        if isinstance(other, GraphArray):
            return NotImplemented  # the remote array's operator runs (forcing this value as an operand)
        if not isinstance(other, PendingValue | np.ndarray | np.generic | bool | int | float | complex):
            return NotImplemented
        left_requests = self._requests
        split = len(left_requests)
        if isinstance(other, PendingValue):
            requests = (*left_requests, *other._requests)

            def operand(partials: Sequence[Sequence[np.ndarray]]) -> Any:
                return other.resolve(partials[split:])

        else:
            requests = left_requests

            def operand(partials: Sequence[Sequence[np.ndarray]]) -> Any:
                return other

        def combine(partials: Sequence[Sequence[np.ndarray]]) -> Any:
            mine, theirs = self.resolve(partials[:split]), operand(partials)
            return function(theirs, mine) if reflected else function(mine, theirs)

        probe_other = np.zeros(other.shape, other.dtype) if isinstance(other, PendingValue) else other
        probe_mine = np.zeros(self.shape, self.dtype)
        with np.errstate(all="ignore"):
            probe = np.asarray(
                function(probe_other, probe_mine) if reflected else function(probe_mine, probe_other)
            )
        result = PendingValue(requests, combine, shape=probe.shape, dtype=probe.dtype)
        if not requests:  # both already computed
            result.resolve([])
        return result

    def __add__(self, other: Any) -> Any:
        return self._apply(operator.add, other)

    def __radd__(self, other: Any) -> Any:
        return self._apply(operator.add, other, reflected=True)

    def __sub__(self, other: Any) -> Any:
        return self._apply(operator.sub, other)

    def __rsub__(self, other: Any) -> Any:
        return self._apply(operator.sub, other, reflected=True)

    def __mul__(self, other: Any) -> Any:
        return self._apply(operator.mul, other)

    def __rmul__(self, other: Any) -> Any:
        return self._apply(operator.mul, other, reflected=True)

    def __truediv__(self, other: Any) -> Any:
        return self._apply(operator.truediv, other)

    def __rtruediv__(self, other: Any) -> Any:
        return self._apply(operator.truediv, other, reflected=True)

    def __floordiv__(self, other: Any) -> Any:
        return self._apply(operator.floordiv, other)

    def __rfloordiv__(self, other: Any) -> Any:
        return self._apply(operator.floordiv, other, reflected=True)

    def __mod__(self, other: Any) -> Any:
        return self._apply(operator.mod, other)

    def __rmod__(self, other: Any) -> Any:
        return self._apply(operator.mod, other, reflected=True)

    def __pow__(self, other: Any) -> Any:
        return self._apply(operator.pow, other)

    def __rpow__(self, other: Any) -> Any:
        return self._apply(operator.pow, other, reflected=True)

    def __neg__(self) -> Any:
        return self._apply(lambda a, _: -a, 0)

    def __pos__(self) -> Any:
        return self._apply(lambda a, _: +a, 0)

    def __abs__(self) -> Any:
        return self._apply(lambda a, _: abs(a), 0)

    def __invert__(self) -> Any:
        return self._apply(lambda a, _: ~a, 0)

    def __matmul__(self, other: Any) -> Any:
        return self._apply(np.matmul, other)

    def __rmatmul__(self, other: Any) -> Any:
        return self._apply(np.matmul, other, reflected=True)

    def __and__(self, other: Any) -> Any:
        return self._apply(operator.and_, other)

    def __rand__(self, other: Any) -> Any:
        return self._apply(operator.and_, other, reflected=True)

    def __or__(self, other: Any) -> Any:
        return self._apply(operator.or_, other)

    def __ror__(self, other: Any) -> Any:
        return self._apply(operator.or_, other, reflected=True)

    def __xor__(self, other: Any) -> Any:
        return self._apply(operator.xor, other)

    def __rxor__(self, other: Any) -> Any:
        return self._apply(operator.xor, other, reflected=True)

    def __lshift__(self, other: Any) -> Any:
        return self._apply(operator.lshift, other)

    def __rlshift__(self, other: Any) -> Any:
        return self._apply(operator.lshift, other, reflected=True)

    def __rshift__(self, other: Any) -> Any:
        return self._apply(operator.rshift, other)

    def __rrshift__(self, other: Any) -> Any:
        return self._apply(operator.rshift, other, reflected=True)

    def __lt__(self, other: Any) -> Any:
        return self._apply(np.less, other)

    def __le__(self, other: Any) -> Any:
        return self._apply(np.less_equal, other)

    def __gt__(self, other: Any) -> Any:
        return self._apply(np.greater, other)

    def __ge__(self, other: Any) -> Any:
        return self._apply(np.greater_equal, other)

    def __eq__(self, other: Any) -> Any:  # elementwise, as NumPy's
        return self._apply(np.equal, other)

    def __ne__(self, other: Any) -> Any:
        return self._apply(np.not_equal, other)


def _constant_of(value: np.ndarray) -> Combine:
    def combine(partials: Sequence[Sequence[np.ndarray]]) -> Any:
        return value if value.ndim else value[()]

    return combine

"""How array operations become deferred nodes, and reductions become programs.

Every operation follows one pattern: pick the *lead* operand (the remote array whose rows the result's
rows follow), turn the other operands into per-shard operands, and return the spec of a pending array with
the lead's row layout (see :mod:`gpupool.client.graph`), which :mod:`gpupool.client.array` makes an array
of. Reductions over all elements or over rows build one program per shard that computes the pending graph
and a partial, fetch the partials and combine them here.
"""

from __future__ import annotations

import bisect
import math
import weakref
from collections.abc import Callable, Hashable, Sequence
from dataclasses import replace
from typing import Any, Final

import numpy as np

from gpupool._errors import ShapeMismatch, UsageError
from gpupool._proto.v1 import agent_pb2
from gpupool.client.graph import (
    ArraySpec,
    GraphArray,
    Node,
    PieceOperand,
    Round,
    make_op,
)
from gpupool.client.layout import Piece, Place, layout_key, whole_copies
from gpupool.client.operands import (
    INLINE_LIMIT,
    buffer_operand,
    constant_operand,
    is_scalar,
    native_contiguous,
    scalar_operand,
)
from gpupool.client.rowmoves import reshard
from gpupool.client.session import Session
from gpupool.client.values import PendingValue
from gpupool.protocol.codec import check_dtype

__all__ = [
    "Unsupported",
    "cast",
    "depth_after",
    "elementwise",
    "inplace",
    "kernel_op",
    "matmul",
    "pending_spec",
    "replicate",
    "unary",
]


def replicate(session: Session, host: np.ndarray, places: Sequence[Piece]) -> dict[Place, Piece]:
    """Upload a whole copy of ``host`` to each distinct worker of ``places``; returns the copies by place.

    The caller owns the copies (and frees them).
    """
    copies = whole_copies(places, host.shape[0], session.new_buffer_id)
    session.run(
        session.upload_pieces(host, copies),
        timeout=session.timeouts.for_stream(host.nbytes * len(copies)),
        what="replicate",
    )
    return {copy.place: copy for copy in copies}


class _Held:
    """A per-shard operand: the buffer among ``pieces`` whose ``key`` is the shard's. The buffers belong to
    the operand: they are released when it is garbage-collected (with the last node that holds it), and
    follow their place when it moves (:mod:`gpupool.client.recovery`)."""

    __slots__ = ("__weakref__", "_finalizer", "_key", "_pieces", "_session")

    def __init__(self, session: Session, pieces: Sequence[Piece], key: Callable[[Piece], Hashable]) -> None:
        self._session = session
        self._key = key
        self._pieces = tuple(pieces)
        self._finalizer = weakref.finalize(self, session.release, self._pieces)
        session.add_holder(self)

    def __call__(self, piece: Piece) -> agent_pb2.Operand:
        wanted = self._key(piece)
        for p in self._pieces:
            if self._key(p) == wanted:
                return buffer_operand(p.buffer_id)
        raise KeyError(f"no buffer held for rows {piece.start}:{piece.stop} on {piece.place}")

    def relocate(self, old: Place, to: Piece) -> None:
        if any(p.place == old for p in self._pieces):
            self._pieces = tuple(p.moved_to(to) if p.place == old else p for p in self._pieces)
            self._finalizer.detach()
            self._finalizer = weakref.finalize(self, self._session.release, self._pieces)

    def holding(self, buffer_id: str) -> str:
        return "an operand" if any(p.buffer_id == buffer_id for p in self._pieces) else ""


def _held(session: Session, pieces: Sequence[Piece], key: Callable[[Piece], Hashable]) -> PieceOperand:
    """A per-shard operand holding ``pieces`` (see :class:`_Held`)."""
    return _Held(session, pieces, key)


def _rows(piece: Piece) -> Hashable:
    return piece.place, piece.start, piece.stop


def _place(piece: Piece) -> Hashable:
    return piece.place


class Unsupported(UsageError):
    """An operation gpupool does not run on the pool with these arguments; NumPy's functions fall back to
    the host copy on it (:mod:`gpupool.client.numpy_api`), methods raise it."""


def pending_spec(shape: tuple[int, ...], dtype: np.dtype[Any], lead: GraphArray, node: Node) -> ArraySpec:
    """The spec of a pending array with ``lead``'s row layout, computed by ``node``."""
    return ArraySpec(session=lead.session, shape=shape, dtype=dtype, layout=lead.layout, node=node)


def depth_after(args: Sequence[object]) -> int:
    """The depth of a node over ``args``: one more than the deepest array among them."""
    return 1 + max((a.depth for a in args if isinstance(a, GraphArray)), default=0)


def _normalize(value: object) -> object:
    if isinstance(value, GraphArray):
        value.check()
        return value
    if is_scalar(value):
        return value[()] if isinstance(value, np.ndarray) else value
    host = np.asarray(value)
    check_dtype(host.dtype)
    return host


def _shape(value: object) -> tuple[int, ...]:
    return tuple(getattr(value, "shape", ()))


_RESULT_DTYPES: dict[tuple[object, ...], np.dtype[Any]] = {}
_SMALL_INT = 1 << 31


def _result_dtype(name: str, values: Sequence[object]) -> np.dtype[Any]:
    """NumPy's result dtype for ``name`` over these operands, by running it on stand-ins (cached).

    Python scalars are weakly typed, so only their type matters, except where NumPy refuses some values:
    a Python int out of an integer array's range (``uint8 * -1``, ``int8 + 200``) is keyed by the range
    it falls in; ints too big for int32 and integers to negative powers are probed every time.
    """
    key: tuple[object, ...] = (name,)
    for v in values:
        if isinstance(v, int) and (not -_SMALL_INT <= v < _SMALL_INT or (v < 0 and name == "power")):
            key = ()
            break
        key += (
            getattr(v, "dtype", None) if not isinstance(v, bool | int | float) else type(v),
            isinstance(v, np.generic),
            _int_range(v) if isinstance(v, int) and not isinstance(v, bool) else None,
        )
    cached = _RESULT_DTYPES.get(key) if key else None
    if cached is not None:
        return cached
    with np.errstate(all="ignore"):
        dtype = check_dtype(np.asarray(getattr(np, name)(*[_probe(v) for v in values])).dtype)
    if key:
        _RESULT_DTYPES[key] = dtype
    return dtype


#: The bounds of the integer dtypes below int64: a Python int's place among them decides which integer
#: arrays NumPy lets it meet (NEP 50).
_INT_BOUNDS: Final = (-(1 << 15), -(1 << 7), 0, 1 << 7, 1 << 8, 1 << 15, 1 << 16)


def _int_range(value: int) -> int:
    """Which of the ranges between :data:`_INT_BOUNDS` a Python int falls in."""
    return bisect.bisect_right(_INT_BOUNDS, value)


def _probe(value: object) -> object:
    """A stand-in with the same dtype and weak/strong typing, for working out result dtypes."""
    dtype = getattr(value, "dtype", None)
    return np.zeros((), dtype) if dtype is not None and not isinstance(value, np.generic) else value


class DeferredOperand:
    """A per-shard operand whose value is a pending value (a reduction such as ``x.mean(0)``), sent whole
    to every shard: computed when the programs that use it are built. :func:`gpupool.compute` and
    ``persist`` compute every such value their round reads together first, so ``(x - x.mean(0)) /
    x.std(0)`` costs one round for both reductions, then one for the result."""

    __slots__ = ("_operand", "value")

    def __init__(self, value: PendingValue) -> None:
        self.value = value
        self._operand: agent_pb2.Operand | None = None

    def __call__(self, piece: Piece) -> agent_pb2.Operand:
        if self._operand is None:
            host = np.asarray(self.value.compute())
            self._operand = scalar_operand(host) if host.ndim == 0 else constant_operand(host)
        return self._operand


def _argument(lead: GraphArray, value: object, *, aligned: bool) -> GraphArray | PieceOperand:
    """``value`` as an argument of a node led by ``lead``: a remote array with its layout, or an operand."""
    if isinstance(value, PendingValue):
        if value.pending and not aligned and value.size * value.dtype.itemsize <= INLINE_LIMIT:
            return DeferredOperand(value)
        value = _normalize(np.asarray(value.compute()))
    if isinstance(value, GraphArray):
        if aligned and layout_key(value.layout) == layout_key(lead.layout):
            return value
        if aligned and value.session is lead.session:
            # The same rows laid out otherwise: a copy in the lead's layout, moved agent to agent.
            session = lead.session
            targets = [p.with_buffer(session.new_buffer_id()) for p in lead.layout]
            return _held(session, reshard(value, targets), _rows)
        value = value.get()  # a broadcast operand (or another pool's): bring it over once
    if is_scalar(value):
        scalar = scalar_operand(value)
        return lambda piece: scalar
    host = np.asarray(value, order="C")
    if not aligned:
        if host.nbytes > INLINE_LIMIT:
            raise UsageError(
                f"a broadcast operand of {host.nbytes} bytes is too large to send with each "
                "program; pool.asarray it with the same rows instead"
            )
        constant = constant_operand(host)
        return lambda piece: constant
    if host.nbytes <= INLINE_LIMIT:
        return lambda piece: constant_operand(host[piece.start : piece.stop])
    # Large and row-aligned: upload it with the lead's layout, held by the operand.
    session = lead.session
    pieces = [p.with_buffer(session.new_buffer_id()) for p in lead.layout]
    session.run(
        session.upload_pieces(host, pieces),
        timeout=session.timeouts.for_stream(host.nbytes) * 2,
        what="upload",
    )
    return _held(session, pieces, _rows)


def elementwise(name: str, inputs: Sequence[object]) -> ArraySpec:
    """Apply the NumPy ufunc or function ``name`` elementwise, with NumPy broadcasting and promotion.

    The result is pending: it runs, fused with what follows, when a result is needed.

    Raises:
        ShapeMismatch: the operands do not broadcast, or broadcasting would move the sharded axis.
        UnsupportedDType: an operand or the result has a dtype gpupool does not carry.
    """
    values = [v if isinstance(v, PendingValue) and v.pending else _normalize(v) for v in inputs]
    remotes = [v for v in values if isinstance(v, GraphArray)]
    session = remotes[0].session
    if any(r.session is not session for r in remotes):
        raise UsageError(f"{name}: operands live in different pools")
    shapes = tuple(_shape(v) for v in values)
    try:
        result_shape = np.broadcast_shapes(*shapes)
    except ValueError as exc:
        raise ShapeMismatch(name, shapes, "operands do not broadcast") from exc
    dtype = _result_dtype(name, values)
    rows, ndim = result_shape[0], len(result_shape)

    def carries_rows(v: object) -> bool:
        return len(_shape(v)) == ndim and _shape(v)[0] == rows

    lead = next((v for v in remotes if carries_rows(v)), None)
    if lead is None:
        raise ShapeMismatch(
            name,
            shapes,
            "broadcasting would spread a remote array over rows it does not hold; pool.asarray the larger "
            "operand first",
        )
    # A one-row host operand may go whole to every shard (it broadcasts over any row count, none included);
    # a remote one stays aligned, or the lead itself would be downloaded and a shard of no rows would
    # broadcast it to one.
    args = tuple(
        _argument(lead, v, aligned=carries_rows(v) and (rows > 1 or isinstance(v, GraphArray)))
        for v in values
    )
    return pending_spec(result_shape, dtype, lead, Node(name, args, depth=depth_after(args)))


def matmul(x: GraphArray, w: object) -> ArraySpec:
    """``x @ w`` for a row-sharded 2-D ``x`` and a small ``w`` (host or remote), sent to each worker once.

    Raises:
        ShapeMismatch: ``x`` is not 2-D, ``w`` is not 1-D or 2-D, or the inner dimensions differ.
    """
    x.check()
    session = x.session
    if is_scalar(w):
        raise ShapeMismatch("matmul", (x.shape, ()), "matmul does not take scalars; use *")
    w_value = _normalize(w)
    assert isinstance(w_value, GraphArray | np.ndarray)  # scalars were turned away above
    w_shape = _shape(w_value)
    if x.ndim != 2 or len(w_shape) not in (1, 2) or x.shape[1] != w_shape[0]:
        raise ShapeMismatch("matmul", (x.shape, w_shape), "need (n, k) @ (k, m) or (n, k) @ (k,)")
    dtype = check_dtype(
        np.matmul(np.zeros((1, 1), x.dtype), np.zeros((1,) * len(w_shape), w_value.dtype)).dtype
    )
    argument: PieceOperand
    if isinstance(w_value, np.ndarray) and w_value.nbytes <= INLINE_LIMIT:
        constant = constant_operand(np.asarray(w_value, order="C"))
        argument = lambda piece: constant  # noqa: E731 - a per-shard operand, as the graph expects
    elif isinstance(w_value, np.ndarray):
        # A copy on each worker, held by the operand (so by the nodes that use it).
        copies = replicate(session, native_contiguous(w_value), x.layout)
        argument = _held(session, list(copies.values()), _place)
    else:
        # Copies on each worker, made once and kept with w.
        buffers = w_value.replicate_to(x.layout)

        def argument(piece: Piece, remote_w: GraphArray = w_value) -> agent_pb2.Operand:
            return buffer_operand(buffers[piece.place])

    holds = (w_value,) if isinstance(w_value, GraphArray) else ()
    node = Node("matmul", (x, argument), depth=depth_after([x]), holds=holds)
    return pending_spec((x.shape[0], *w_shape[1:]), dtype, x, node)


def cast(array: GraphArray, dtype: np.dtype[Any]) -> ArraySpec:
    """``array.astype(dtype)``, converted where the shards live (pending, like any elementwise op)."""
    array.check()
    return pending_spec(array.shape, dtype, array, Node("astype", (array,), depth=depth_after([array])))


def unary(name: str, array: GraphArray, dtype: np.dtype[Any], *, params: tuple[int, ...] = ()) -> ArraySpec:
    """``name`` applied to each shard of ``array`` with op ``params`` (``round``, a scan along another axis),
    pending; the result has ``array``'s shape and the given dtype."""
    array.check()
    node = Node(name, (array,), depth=depth_after([array]), params=params)
    return pending_spec(array.shape, dtype, array, node)


def inplace(name: str, target: GraphArray, inputs: Sequence[object]) -> ArraySpec:
    """``np.<name>(*inputs, out=target)``: the spec of the new value of ``target``, cast to its dtype as
    NumPy's ``casting="same_kind"`` does (the caller repoints ``target`` to it).

    Raises:
        TypeError: NumPy's own, where the result does not cast to ``target``'s dtype by same_kind.
        ValueError: the result's shape is not ``target``'s.
        UsageError: the result's rows would not live where ``target``'s do.
    """
    spec = elementwise(name, inputs)
    if spec.shape != target.shape:
        raise ValueError(
            f"non-broadcastable output operand with shape {target.shape} doesn't match the broadcast "
            f"shape {spec.shape}"
        )
    if layout_key(spec.layout) != layout_key(target.layout):
        raise UsageError(f"{name}: out= must be laid out like the operand whose rows the result follows")
    if spec.dtype != target.dtype and not np.can_cast(spec.dtype, target.dtype, "same_kind"):
        probes = [_probe(_normalize(v)) for v in inputs]
        getattr(np, name)(*probes, out=np.zeros((), target.dtype))  # raises NumPy's UFuncTypeError
        raise TypeError(f"cannot cast {name}'s {spec.dtype} result to {target.dtype} with same_kind casting")
    return replace(spec, dtype=target.dtype)


def kernel_op(
    kernel: agent_pb2.Kernel,
    inputs: Sequence[object],
    lead: GraphArray,
    dtype: np.dtype[Any],
    shape: tuple[int, ...],
    shard_shape: Callable[[int], tuple[int, ...]],
    *,
    whole: Sequence[bool],
    axes: Sequence[int] = (),
    keepdims: bool = False,
    one_row_each: bool = False,
) -> ArraySpec:
    """Run a user's kernel (op ``kernel``) on each shard of ``lead`` now; the spec of its resident result.

    ``inputs`` are the kernel's inputs in order: remote arrays with ``lead``'s rows meet it shard by shard
    (moved agent to agent if laid out otherwise); those marked ``whole``, and those without ``lead``'s
    rows, go whole to every shard (host values, or remote ones brought over once); scalars as scalars.
    Pending inputs are computed in the same program. A shard of ``rows`` rows gives a result of
    ``shard_shape(rows)``; the whole result has ``shape``, in ``lead``'s layout, or with
    ``one_row_each`` one row per shard (per-shard partials, the shard's index as its row). An input that
    is already a per-shard operand (a callable of the shard's piece) is used as it is.

    Raises:
        UsageError: inputs of different pools; a broadcast input too large to send with each program.
        RemoteError: an agent refused the kernel (``RemoteKernelError`` with the compiler's log).
    """
    session = lead.session

    def carries_rows(v: object) -> bool:
        return len(_shape(v)) == lead.ndim and lead.ndim > 0 and _shape(v)[0] == lead.shape[0]

    args: list[GraphArray | PieceOperand] = []
    for value, alone in zip(inputs, whole, strict=True):
        if callable(value) and not isinstance(value, GraphArray | PendingValue):
            args.append(value)  # already a per-shard operand
            continue
        if not (isinstance(value, PendingValue) and value.pending):
            value = _normalize(value)
        if isinstance(value, GraphArray) and value.session is not session:
            raise UsageError(f"kernel {kernel.name}: operands live in different pools")
        args.append(_argument(lead, value, aligned=not alone and carries_rows(value)))
    round_ = Round(session)
    layout = lead.layout
    pieces: list[Piece] = []
    for index, piece in enumerate(layout):
        builder = round_.builder(layout, index)
        operands = [buffer_operand(builder.emit(a)) if isinstance(a, GraphArray) else a(piece) for a in args]
        out = session.new_buffer_id()
        expected = shard_shape(piece.stop - piece.start)
        op = make_op("kernel", operands, out, dtype, expected, axes=axes, keepdims=keepdims)
        op.kernel.CopyFrom(kernel)
        builder.program.ops.append(op)
        placed = piece.with_buffer(out)
        builder.program.creates.append(placed)
        elements = (piece.stop - piece.start) * math.prod(lead.shape[1:])
        builder.program.work_bytes += elements * lead.dtype.itemsize * (1 + len(args))
        pieces.append(replace(placed, start=index, stop=index + 1) if one_row_each else placed)
    round_.run(what=f"kernel {kernel.name}")
    return ArraySpec(session=session, shape=shape, dtype=dtype, layout=tuple(pieces))

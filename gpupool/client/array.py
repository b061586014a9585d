"""RemoteArray: a handle to an array whose row shards stay resident on the pool's agents.

This is the one module that makes remote arrays, with :func:`from_spec`: from the
:class:`~gpupool.client.graph.ArraySpec` an operation (:mod:`~gpupool.client.dispatch`) or an upload hands
back.
"""

from __future__ import annotations

import asyncio
import functools
import operator
import weakref
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from gpupool._errors import ArrayFreed
from gpupool.client import dispatch, replicas
from gpupool.client.dispatch import DeferredOperand
from gpupool.client.graph import (
    MAX_DEPTH,
    ArraySpec,
    GraphArray,
    Node,
    Round,
    materialize,
    pending_arrays,
    plan_materialize,
)
from gpupool.client.layout import Piece, Place
from gpupool.client.losses import MAX_RECOVERIES, loss_of
from gpupool.client.methods import ArrayMethods
from gpupool.client.operands import native_contiguous
from gpupool.client.recovery import recover
from gpupool.client.reprs import array_html, array_repr
from gpupool.client.session import Session
from gpupool.client.types import Shard
from gpupool.client.values import PendingValue, plan_requests
from gpupool.client.waves import run_in_waves
from gpupool.protocol.codec import check_dtype

__all__ = ["RemoteArray", "compute", "from_spec", "persist", "upload"]


class RemoteArray(ArrayMethods):
    """An array in the pool: shape and dtype here, the data in row shards on the agents.

    NumPy code works on it: ufuncs (``np.tanh(x)``, ``x * 2 + 1``, ``x > 0``) run where the shards live and
    give new remote arrays; ``x @ w`` multiplies each row shard by a small ``w``; reductions combine per-shard
    partials; ``x.get()`` or ``np.asarray(x)`` brings the data back. Its buffers are freed when it is garbage
    collected, when :meth:`free` is called, or when the pool closes.

    Made by :meth:`gpupool.Pool.asarray` and by operations on other remote arrays, not directly.
    """

    __slots__ = (
        "__weakref__",
        "_dependents",
        "_finalizer",
        "_freed",
        "_pieces",
        "_readers",
        "_replicas",
        "dtype",
        "node",
        "session",
        "shape",
    )
    __array_priority__ = 100.0
    __hash__ = None  # type: ignore[assignment]  # == is elementwise, as in NumPy

    def __init__(
        self,
        session: Session,
        shape: tuple[int, ...],
        dtype: np.dtype[Any],
        layout: Sequence[Piece],
        *,
        node: Node | None = None,
    ) -> None:
        self.session = session
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)
        self.node = node
        self._pieces = session.recovery.current_all(layout)
        self._freed = False
        self._replicas: dict[Place, Piece] = {}
        self._finalizer: weakref.finalize[Any, Any] | None = None
        #: Pending arrays whose nodes read this one: an in-place update redirects them to its old value.
        #: (By id: arrays are unhashable, as NumPy's; a dead reference is skipped.)
        self._dependents: dict[int, weakref.ref[RemoteArray]] = {}
        #: Pending values (reductions) that read this array: an in-place update computes them first.
        self._readers: dict[int, weakref.ref[Any]] = {}
        if node is None:
            self._finalizer = weakref.finalize(self, session.release, self._pieces)
        session.add_holder(self)

    def relocate(self, old: Place, to: Piece) -> None:
        """Shards at ``old`` are at ``to``'s place now, under the same buffer ids (a lost worker's rebuilt
        elsewhere, or moved by a drain): point this array's pieces, replicas and finalizer there."""
        if not any(p.place == old for p in self._pieces) and old not in self._replicas:
            return
        self._pieces = tuple(p.moved_to(to) if p.place == old else p for p in self._pieces)
        replica = self._replicas.pop(old, None)
        if replica is not None:
            self._replicas[to.place] = replica.moved_to(to)
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = weakref.finalize(
                self, self.session.release, self._pieces + tuple(self._replicas.values())
            )

    def holding(self, buffer_id: str) -> str:
        """This array's repr if one of its shards or replicas is ``buffer_id``, else ""."""
        if self.node is None and any(p.buffer_id == buffer_id for p in self._pieces):
            return repr(self)
        if any(p.buffer_id == buffer_id for p in self._replicas.values()):
            return repr(self)
        return ""

    # -- description ------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Number of elements."""
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        """Bytes the array takes in the pool (one copy)."""
        return self.size * self.dtype.itemsize

    @property
    def shards(self) -> list[Shard]:
        """Where each block of rows lives (or will live, for a pending array)."""
        return [Shard(agent_id=p.agent_id, start=p.start, stop=p.stop, worker=p.worker) for p in self._pieces]

    @property
    def layout(self) -> tuple[Piece, ...]:
        """The shards' places and rows; their buffer ids are empty while the array is pending."""
        return self._pieces

    @property
    def pieces(self) -> tuple[Piece, ...]:
        """The resident shards, computing the array first if it is pending."""
        self.persist()
        return self._pieces

    @property
    def pending(self) -> bool:
        """Whether the array is still to be computed (see :meth:`persist`)."""
        return self.node is not None

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        """Shape, dtype, size, state and placement: ``<gpupool.RemoteArray shape=(1000, 8) dtype=float32
        31.2 KiB, pending tanh; 2 shards on 2 agents: 3f2a1b0c rows 0:500, 9c81d07e rows 500:1000>``."""
        pending = None if self.node is None else self.node.op
        return array_repr(self.shape, self.dtype, self._pieces, freed=self._freed, pending_op=pending)

    def _repr_html_(self) -> str:
        pending = None if self.node is None else self.node.op
        return array_html(self.shape, self.dtype, self._pieces, freed=self._freed, pending_op=pending)

    def check(self) -> None:
        """Raise :class:`ArrayFreed` if this array or its pool is gone."""
        if self._freed:
            raise ArrayFreed(f"{self!r} was freed")
        self.session.check_open()

    # -- computing and data movement --------------------------------------------------------------
    def persist(self) -> RemoteArray:
        """Compute the array if it is pending and keep it resident on the agents; returns ``self``.

        Elementwise ops, matmuls and per-row reductions are deferred and run, fused into one program per
        shard, when a result is needed: ``get()``, a reduction over rows, or this. Errors from the agents
        (out of memory, a failing kernel) surface here. :func:`gpupool.persist` does many arrays at once.
        """
        self.check()
        if self.node is not None:
            _resolve_deferred([self])
            _commit(materialize(self.session, [self]))
        return self

    def commit(self, pieces: Sequence[Piece]) -> None:
        """Make a pending array resident in ``pieces`` (what :func:`graph.materialize` computed; a place
        that moved while it ran is followed)."""
        self._pieces = self.session.recovery.current_all(pieces)
        self.node = None
        self._finalizer = weakref.finalize(self, self.session.release, self._pieces)

    def get(self) -> np.ndarray:
        """The whole array as a NumPy array (shards are fetched concurrently). A shard lost with its agent
        is rebuilt elsewhere from lineage first (:mod:`gpupool.client.recovery`)."""
        pieces = self.pieces
        out = np.empty(self.shape, self.dtype)
        session = self.session

        async def fetch() -> None:
            todo = list(pieces)
            for attempt in range(MAX_RECOVERIES + 1):
                results = await asyncio.gather(
                    *(
                        session.timed(
                            p.agent_id,
                            out[p.start : p.stop].nbytes,
                            session.channel(p.agent_id, p.endpoint).download_into(
                                p.buffer_id, out[p.start : p.stop]
                            ),
                        )
                        for p in todo
                    ),
                    return_exceptions=True,
                )
                failed = [(p, r) for p, r in zip(todo, results, strict=True) if isinstance(r, BaseException)]
                if not failed:
                    return
                for _, error in failed:
                    dead = session.recovery.dead_or(error)
                    if dead is not error:
                        raise dead from error
                    if attempt == MAX_RECOVERIES or loss_of(error) is None:
                        raise error
                todo = [await recover(session, p, error) for p, error in failed]
                session.recovery.check_alive(p.buffer_id for p in todo)

        with session.track("download", total=self.nbytes, unit="bytes"):
            session.run(
                fetch(),
                timeout=session.timeouts.for_stream(self.nbytes) * (MAX_RECOVERIES + 1),
                what="download",
            )
        return out

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        host = self.get()
        return host if dtype is None else host.astype(dtype, copy=False)

    def free(self) -> None:
        """Free the array's buffers now; later use raises :class:`ArrayFreed`. Idempotent."""
        if self._freed:
            return
        self._freed = True
        if self._finalizer is not None:
            self._finalizer.detach()
        pieces = [] if self.node is not None else list(self._pieces)
        pieces += list(self._replicas.values())
        self.node = None
        self._replicas.clear()
        if pieces and not self.session.closed:
            self.session.run(self.session.free_now(pieces), timeout=self.session.timeouts.rpc, what="free")

    def replicate_to(self, places: Sequence[Piece]) -> dict[Place, str]:
        """Whole copies of this array on the workers of ``places`` (made once, kept until freed)."""
        self.check()
        missing = [p for p in places if p.place not in self._replicas]
        if missing:
            self._replicas.update(dispatch.replicate(self.session, self.get(), missing))
            if self._finalizer is not None:
                self._finalizer.detach()
            self._finalizer = weakref.finalize(
                self, self.session.release, self._pieces + tuple(self._replicas.values())
            )
        return {place: piece.buffer_id for place, piece in self._replicas.items()}

    def astype(self, dtype: object) -> RemoteArray:
        """A copy converted to ``dtype``, made on the agents."""
        target = check_dtype(dtype)
        if target == self.dtype:
            return self
        return from_spec(dispatch.cast(self, target))

    def add_reader(self, value: Any) -> None:
        """Note a pending value that reads this array (an in-place update computes it first)."""
        self._readers[id(value)] = weakref.ref(value, _forget(self._readers, id(value)))

    # -- hooks of ArrayMethods ----------------------------------------------------------------------
    def _make(self, spec: ArraySpec) -> RemoteArray:
        return from_spec(spec)

    def _assign(self, spec: ArraySpec) -> RemoteArray:
        """Become ``spec``'s value (an in-place operator), which reads this array's present value.

        The present value moves to a snapshot array that takes over this one's buffers (or pending node)
        and replicas; ``spec``'s node and every pending array that read this one are redirected to it, so
        what was built before the update keeps seeing the old value, as NumPy's eager results do.
        """
        self.check()
        assert spec.node is not None, "an in-place result is pending"
        readers = [value for value in (r() for r in self._readers.values()) if value is not None]
        if readers:
            compute(*readers)
        self._readers = {}
        old = RemoteArray(self.session, self.shape, self.dtype, self._pieces, node=self.node)
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._replicas:
            old._replicas, self._replicas = self._replicas, {}
            assert old._finalizer is not None  # replicas are made of resident arrays
            old._finalizer.detach()
            old._finalizer = weakref.finalize(
                old, self.session.release, old._pieces + tuple(old._replicas.values())
            )
        _register(old)
        for reference in self._dependents.values():
            dependent = reference()
            if dependent is not None and dependent.node is not None:
                dependent.node = _redirect(dependent.node, self, old)
                old._dependents[id(dependent)] = reference
        self._dependents = {}
        self.node = _redirect(spec.node, self, old)
        self._pieces = spec.layout
        _register(self)
        if self.node.depth >= MAX_DEPTH:
            self.persist()
        return self

    def __bool__(self) -> bool:
        if self.size != 1:
            raise ValueError(
                "the truth value of a remote array with more than one element is ambiguous; "
                "use .any() or .all()"
            )
        return bool(self.get().reshape(()))

    def _single(self) -> Any:
        """The one element of a one-element array, fetched.

        Raises:
            TypeError: more or fewer elements, as NumPy says it for arrays.
        """
        if self.size != 1:
            raise TypeError("only single-element remote arrays can be converted to Python scalars")
        return self.get().reshape(())[()]

    def __int__(self) -> int:
        return int(self._single())

    def __complex__(self) -> complex:
        return complex(self._single())

    def __index__(self) -> int:
        if self.size != 1 or self.dtype.kind not in "iu":
            raise TypeError("only single-element integer remote arrays can be used as an index")
        return operator.index(self._single())

    def __float__(self) -> float:
        return float(self._single())


def from_spec(spec: ArraySpec) -> RemoteArray:
    """The array ``spec`` describes; a pending one whose chain reached :data:`~gpupool.client.graph.MAX_DEPTH`
    is computed at once, so programs and client-side recursion stay bounded."""
    array = RemoteArray(spec.session, spec.shape, spec.dtype, spec.layout, node=spec.node)
    _register(array)
    if spec.node is not None and spec.node.depth >= MAX_DEPTH:
        array.persist()
    return array


def upload(session: Session, host: np.ndarray) -> RemoteArray:
    """``host`` (one dimension or more) uploaded through ``session``, its rows placed by the coordinator.

    Raises:
        UnsupportedDType: a dtype gpupool does not carry. And as :meth:`Session.upload`.
    """
    check_dtype(host.dtype)
    host = native_contiguous(host)
    pieces = session.upload(host)
    replicas.protect(session, host, pieces)
    return from_spec(ArraySpec(session=session, shape=host.shape, dtype=host.dtype, layout=tuple(pieces)))


def persist(*arrays: RemoteArray) -> tuple[RemoteArray, ...]:
    """Compute pending arrays together: one round of programs per pool, one program per shard, so many
    small independent ops cost one round trip; returns the arrays. A batch that would not fit in the
    agents' memory at once runs in several rounds, waves that fit (:mod:`gpupool.client.waves`).

    Raises:
        DeviceOutOfMemory: one array's chain does not fit even on its own.
        RemoteError: an agent refused a program; the arrays of that wave are not changed (those of earlier
            waves stay computed).
    """
    by_session: dict[int, list[RemoteArray]] = {}
    for array in arrays:
        array.check()
        by_session.setdefault(id(array.session), []).append(array)
    for members in by_session.values():
        session = members[0].session
        run_in_waves(session, members, functools.partial(_persist_round, session))
    return arrays


def compute(*values: Any) -> tuple[Any, ...]:
    """The values of many pending arrays and reductions, computed together (as ``dask.compute``): one
    round of programs per pool, one program per shard carrying every array and every partial asked of it;
    returns NumPy values (remote arrays are brought back whole), in order. Other arguments come back as
    they are. A batch that would not fit in the agents' memory at once runs in waves, as :func:`persist`.

    Raises:
        DeviceOutOfMemory: one value's chain does not fit even on its own.
        RemoteError: an agent refused a program; the arrays and values of that wave are not changed (those
            of earlier waves stay computed).
    """
    by_session: dict[int, tuple[Session, list[RemoteArray], list[PendingValue]]] = {}
    for value in values:
        if isinstance(value, RemoteArray):
            value.check()
            by_session.setdefault(id(value.session), (value.session, [], []))[1].append(value)
        elif isinstance(value, PendingValue) and value.pending and value.requests:
            session = value.requests[0].array.session
            by_session.setdefault(id(session), (session, [], []))[2].append(value)
    for session, arrays, pending in by_session.values():
        items: list[RemoteArray | PendingValue] = [*arrays, *pending]
        run_in_waves(session, items, functools.partial(_compute_round, session))
    return tuple(
        value.get()
        if isinstance(value, RemoteArray)
        else value.compute()
        if isinstance(value, PendingValue)
        else value
        for value in values
    )


def _persist_round(session: Session, arrays: Sequence[RemoteArray]) -> None:
    """Compute pending arrays in one round of programs (a wave of :func:`persist`)."""
    _resolve_deferred(arrays)
    _commit(materialize(session, arrays))


def _compute_round(session: Session, values: Sequence[RemoteArray | PendingValue]) -> None:
    """Compute pending arrays and values in one round of programs (a wave of :func:`compute`)."""
    _resolve_deferred(
        [
            *(v for v in values if isinstance(v, RemoteArray)),
            *(r.array for v in values if isinstance(v, PendingValue) for r in v.requests),
        ]
    )
    round_ = Round(session)
    computed = plan_materialize(round_, [v for v in values if isinstance(v, RemoteArray)])
    pending = [v for v in values if isinstance(v, PendingValue)]
    picks = [plan_requests(round_, value.requests) for value in pending]
    results = round_.run(what="compute")
    _commit(computed)
    for value, pick in zip(pending, picks, strict=True):
        value.resolve(pick(results))


def _resolve_deferred(roots: Sequence[GraphArray]) -> None:
    """Compute together, in one round, the pending values that the pending graphs of ``roots`` read as
    operands (:class:`~gpupool.client.dispatch.DeferredOperand`), before their programs are built."""
    found: dict[int, PendingValue] = {}
    for array in pending_arrays(roots):
        assert array.node is not None
        for arg in array.node.args:
            if isinstance(arg, DeferredOperand) and arg.value.pending:
                found[id(arg.value)] = arg.value
    if found:
        compute(*found.values())


def _commit(computed: Sequence[tuple[RemoteArray, Sequence[Piece]]]) -> None:
    for array, pieces in computed:
        array.commit(pieces)


def _register(array: RemoteArray) -> None:
    """Record ``array`` as a dependent of the arrays its pending node reads."""
    if array.node is not None:
        for arg in (*array.node.args, *array.node.holds):
            if isinstance(arg, RemoteArray):
                arg._dependents[id(array)] = weakref.ref(array, _forget(arg._dependents, id(array)))


def _forget(table: dict[int, weakref.ref[Any]], key: int) -> Callable[[object], None]:
    """A weakref callback that drops a dead dependent from ``table``."""

    def drop(_: object) -> None:
        table.pop(key, None)

    return drop


def _redirect(node: Node, current: RemoteArray, old: RemoteArray) -> Node:
    """``node`` reading ``old`` wherever it read ``current``."""

    def swap(arg: Any) -> Any:
        return old if arg is current else arg

    return replace(node, args=tuple(swap(a) for a in node.args), holds=tuple(swap(h) for h in node.holds))

"""Deferred work: elementwise ops, matmuls and per-row reductions are recorded, then run as one program
per shard when a result is needed.

A pending array (a :class:`GraphArray`) holds a :class:`Node` (an op and its arguments) and its row layout,
but no buffers. :func:`materialize` computes any number of pending arrays: for each shard it walks the
graph, emits every op once, keeps the targets' outputs and frees the intermediates at the end of the same
program, so a chain such as ``((x * 2 + 1) ** 2).sum()`` is a single round trip per shard that the agent
can fuse. Intermediates the caller still holds are not kept: they are computed again if they are used
later (as in Dask).

This module and :mod:`~gpupool.client.dispatch` never make arrays: operations hand back an
:class:`ArraySpec`, and :mod:`gpupool.client.array` turns it into a
:class:`~gpupool.client.array.RemoteArray`.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias, TypeVar

import numpy as np

from gpupool._errors import AgentLost
from gpupool._proto.v1 import agent_pb2
from gpupool.client import stragglers
from gpupool.client.layout import LayoutKey, Piece, Place, layout_key
from gpupool.client.lineage import reads_of
from gpupool.client.losses import MAX_RECOVERIES, loss_of
from gpupool.client.operands import buffer_operand
from gpupool.client.recovery import recover
from gpupool.client.session import Session
from gpupool.client.verify import Distrusted, verify
from gpupool.protocol.codec import meta_of, op_outputs

__all__ = [
    "MAX_DEPTH",
    "ArraySpec",
    "GraphArray",
    "Node",
    "PieceOperand",
    "Program",
    "ProgramBuilder",
    "Round",
    "make_op",
    "materialize",
    "pending_arrays",
    "plan_materialize",
    "run_programs",
]

#: Longer chains are materialized as they grow, so programs and client-side recursion stay bounded.
MAX_DEPTH: Final = 48

PieceOperand: TypeAlias = Callable[[Piece], agent_pb2.Operand]


class GraphArray:
    """A remote array as the graph sees it: the base of :class:`~gpupool.client.array.RemoteArray`, which
    is the only implementation.

    The contract: ``session`` holds its buffers; ``shape`` and ``dtype`` describe it; ``node`` is how to
    compute it while it is pending, ``None`` once resident. :attr:`layout` has one piece per row shard, in
    row order (buffer ids are valid only when resident). :meth:`check` raises ``ArrayFreed`` once the array
    or its session is gone; :meth:`get` brings the data back; :meth:`replicate_to` makes whole copies on
    the workers of some pieces and returns their buffer ids by place.
    """

    __slots__ = ()

    session: Session
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    node: Node | None

    @property
    def ndim(self) -> int:
        """Number of dimensions."""
        return len(self.shape)

    @property
    def depth(self) -> int:
        """How many deferred ops stand between this array and resident data."""
        return self.node.depth if self.node is not None else 0

    @property
    def layout(self) -> tuple[Piece, ...]:
        """The shards' places and rows."""
        raise NotImplementedError

    def check(self) -> None:
        """Raise ``ArrayFreed`` if this array or its session is gone."""
        raise NotImplementedError

    def get(self) -> np.ndarray:
        """The whole array as a NumPy array."""
        raise NotImplementedError

    def replicate_to(self, places: Sequence[Piece]) -> dict[Place, str]:
        """Buffer ids of whole copies of this array on the workers of ``places``, by place."""
        raise NotImplementedError

    def add_reader(self, value: Any) -> None:
        """Note a pending value (with a ``compute()`` method) that reads this array, so that an in-place
        update computes it first, as NumPy's eager results would have seen the old value. Arrays that are
        never updated in place ignore it (the default)."""


@dataclass(frozen=True, slots=True)
class Node:
    """A deferred op: its arguments are arrays with the result's row layout, or per-shard operands
    (scalars, inline constants, replicated or row-aligned buffers)."""

    op: str
    args: tuple[GraphArray | PieceOperand, ...]
    axis: int | None = None
    depth: int = 1
    #: Op-specific integers, reduction axes (None: none sent) and keepdims (docs/contracts.md's op table).
    params: tuple[int, ...] = ()
    axes: tuple[int, ...] | None = None
    keepdims: bool = False
    #: Params that depend on the shard's row count (a reshape's shape), instead of ``params``.
    shard_params: Callable[[int], tuple[int, ...]] | None = None
    #: Arrays the op reads through per-shard operands (a remote ``w`` replicated for a matmul): kept alive
    #: with the node, and what an in-place update of one of them must redirect to its old value.
    holds: tuple[GraphArray, ...] = ()


def pending_arrays(roots: Iterable[GraphArray]) -> Iterator[GraphArray]:
    """Every pending array the graphs of ``roots`` compute (``roots`` among them), each once: what a round
    that computes ``roots`` emits (a shared node is emitted once per program)."""
    seen: set[int] = set()
    stack = list(roots)
    while stack:
        array = stack.pop()
        node = array.node
        if node is None or id(array) in seen:
            continue
        seen.add(id(array))
        yield array
        stack.extend(arg for arg in (*node.args, *node.holds) if isinstance(arg, GraphArray))


@dataclass(frozen=True, slots=True, kw_only=True)
class ArraySpec:
    """An operation's result, for :func:`gpupool.client.array.from_spec` to make an array of: pending
    (``node`` says how to compute it over ``layout``'s rows and places) or resident (in ``layout``'s
    buffers, owned by the array made from it)."""

    session: Session
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    layout: tuple[Piece, ...]
    node: Node | None = None


@dataclass(slots=True)
class Program:
    """The ops for one shard, and what they create, fetch and free; and the work they amount to, which
    sizes the program's deadline (:meth:`gpupool.Timeouts.for_work`)."""

    place: Piece
    ops: list[agent_pb2.Op] = field(default_factory=list)
    fetch: list[str] = field(default_factory=list)
    free: list[str] = field(default_factory=list)
    creates: list[Piece] = field(default_factory=list)
    work_bytes: int = 0
    work_flops: int = 0


def program_deadline(session: Session, programs: Sequence[Program]) -> float:
    """The deadline of running ``programs`` together: the largest one's work, at the session's floors."""
    timeouts = session.timeouts
    return max((timeouts.for_work(p.work_bytes, p.work_flops) for p in programs), default=timeouts.rpc)


def make_op(
    name: str,
    inputs: Sequence[agent_pb2.Operand],
    output: str,
    dtype: np.dtype[Any],
    shape: tuple[int, ...],
    axis: int | None = None,
    *,
    params: Sequence[int] = (),
    axes: Sequence[int] | None = None,
    keepdims: bool = False,
) -> agent_pb2.Op:
    """One Op message (``axes`` None or empty: none sent, which a reduction reads as all of them)."""
    return agent_pb2.Op(
        op=name,
        inputs=inputs,
        output=output,
        expect=meta_of(dtype, shape),
        has_axis=axis is not None,
        axis=axis or 0,
        params=params,
        axes=axes or (),
        keepdims=keepdims,
    )


class ProgramBuilder:
    """Emits the ops that compute pending arrays on one shard (index ``index`` of their common layout)."""

    def __init__(self, session: Session, index: int, piece: Piece) -> None:
        self.session = session
        self.index = index
        self.piece = piece
        self.program = Program(piece)
        self._emitted: dict[int, str] = {}

    def emit(self, array: GraphArray, *, keep: bool = False) -> str:
        """The buffer id holding ``array``'s rows on this shard, emitting ops as needed.

        With ``keep``, the output survives the program (it becomes the array's buffer); otherwise it is freed
        at the program's end.
        """
        node = array.node
        if node is None:
            array.check()
            return array.layout[self.index].buffer_id
        key = id(array)
        if key in self._emitted:
            out = self._emitted[key]
            if keep and out in self.program.free:  # wanted after all: promote the temporary
                self.program.free.remove(out)
                self.program.creates.append(self.piece.with_buffer(out))
            return out
        inputs = [
            buffer_operand(self.emit(arg)) if not callable(arg) else arg(self.piece) for arg in node.args
        ]
        out = self.session.new_buffer_id()
        rows = self.piece.stop - self.piece.start
        self.program.ops.append(
            make_op(
                node.op,
                inputs,
                out,
                array.dtype,
                (rows, *array.shape[1:]),
                node.axis,
                params=node.params if node.shard_params is None else node.shard_params(rows),
                axes=node.axes,
                keepdims=node.keepdims,
            )
        )
        elements = rows * math.prod(array.shape[1:])
        self.program.work_bytes += elements * array.dtype.itemsize * (1 + len(node.args))
        if node.op == "matmul":
            left = node.args[0]
            inner = left.shape[-1] if not callable(left) and left.shape else 1
            self.program.work_flops += 2 * elements * inner
        if keep:
            self.program.creates.append(self.piece.with_buffer(out))
        else:
            self.program.free.append(out)
        self._emitted[key] = out
        return out


def run_programs(session: Session, programs: Sequence[Program], *, what: str) -> list[dict[str, np.ndarray]]:
    """Run programs concurrently; returns each one's fetched arrays (``{}`` for empty programs).

    Buffers garbage-collected since the last call ride along in the programs' free lists. A single program
    goes straight from the calling thread (no hop to the session's event loop: it is the common case, and
    per-op latency is what it costs). A program whose worker was lost (or moved its buffers away) runs
    again where :func:`~gpupool.client.recovery.recover` rebuilt them, up to
    :data:`~gpupool.client.recovery.MAX_RECOVERIES` times; each program that ran is recorded in the
    session's lineage book.

    Raises:
        The first failure, after freeing what the successful programs created.
    """
    busy = [p for p in programs if p.ops or p.fetch or p.free]
    results: dict[int, dict[str, np.ndarray]] = {}
    for attempt in range(MAX_RECOVERIES + 1):
        last = attempt == MAX_RECOVERIES
        failed = _run_once(session, busy, results, what=what, last=last)
        failed += _verified(session, [p for p in busy if id(p) in results], results, last=last)
        if not failed:
            break
        for program, error in failed:
            program.place = session.run(
                recover(session, program.place, error), timeout=_recovery_deadline(session), what="recover"
            )
            session.recovery.follow((c.buffer_id for c in program.creates), program.place)
            session.recovery.check_alive(_reads(program))
        busy = [p for p, _ in failed]
    return [results.get(id(p), {}) for p in programs]


def _verified(
    session: Session, done: Sequence[Program], results: dict[int, dict[str, np.ndarray]], *, last: bool
) -> list[tuple[Program, BaseException]]:
    """Check a sample of the programs that ran (:mod:`gpupool.client.verify`); returns those found wrong,
    their results dropped and their agent to be given up, to run again elsewhere.

    Raises:
        Distrusted: one was found wrong on the ``last`` attempt.
    """
    wrong: list[tuple[Program, BaseException]] = []
    state = session.verification
    for program in done:
        if not state.wanted():
            continue
        bad = session.run(
            verify(session, program, results[id(program)]),
            timeout=_recovery_deadline(session) * 2,
            what="verify",
        )
        if bad:
            # What it kept is wrong too: forgotten here, made again by the run elsewhere.
            session.book.forget(c.buffer_id for c in program.creates)
            del results[id(program)]
            state.redone += 1
            error = Distrusted(bad, "verification")
            if last:
                raise error
            wrong.append((program, error))
    return wrong


def _reads(program: Program) -> list[str]:
    """The buffers ``program`` reads that it does not make (and those it fetches)."""
    made = {name for op in program.ops for name in op_outputs(op)}
    return reads_of(program.ops) + [b for b in program.fetch if b not in made]


def _recovery_deadline(session: Session) -> float:
    return session.timeouts.rpc * 4 + session.timeouts.connect


def _run_once(
    session: Session,
    busy: Sequence[Program],
    results: dict[int, dict[str, np.ndarray]],
    *,
    what: str,
    last: bool,
) -> list[tuple[Program, BaseException]]:
    """Run ``busy`` once, filling ``results`` by ``id`` of program; returns the programs that failed by a
    loss (to recover and run again), unless ``last``. Any other failure is raised, after freeing what the
    programs that succeeded created (and what earlier attempts created)."""
    if not busy:
        return []
    carried: dict[str, list[str]] = {}
    for p in busy:
        carried.setdefault(p.place.endpoint, []).extend(session.take_pending_frees(p.place.endpoint))
    frees = [[*p.free, *carried.pop(p.place.endpoint, ())] for p in busy]
    if len(busy) == 1:
        program = busy[0]
        try:
            with session.track(what):
                fetched = session.execute_now(
                    program.place,
                    program.ops,
                    fetch=program.fetch,
                    free=frees[0],
                    timeout=program_deadline(session, [program]),
                )
        except BaseException as exc:
            _requeue(session, program, frees[0])
            if not last and loss_of(exc) is not None:
                return [(program, exc)]
            _free_created(session, [p for p in busy if id(p) in results])
            dead = session.recovery.dead_or(exc)
            if dead is not exc:
                raise dead from exc
            raise
        _record(session, program, frees[0])
        results[id(program)] = fetched
        return []

    deadline = program_deadline(session, busy)
    tracker = session.track(what, total=len(busy), unit="programs")

    async def counted(call: Awaitable[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        try:
            return await call
        finally:
            tracker.advance()

    async def execute(p: Program, place: Piece) -> dict[str, np.ndarray]:
        free = frees[busy.index(p)] if place is p.place else p.free
        return await session.channel(place.agent_id, place.endpoint).execute(
            place.worker, p.ops, session=session.id, fetch=p.fetch, free=free, timeout=deadline
        )

    async def go() -> list[object]:
        outcome = await stragglers.run(
            session,
            busy,
            lambda p, place: counted(execute(p, place)) if place is p.place else execute(p, place),
            enabled=session.twins,
        )
        return [
            r.with_rows(p.place.start, p.place.stop) if isinstance(r, AgentLost) and r.rows is None else r
            for p, r in zip(busy, outcome, strict=True)
        ]

    with tracker:
        outcome = session.run(go(), timeout=deadline + session.timeouts.connect, what=what)
    failed: list[tuple[Program, BaseException]] = []
    fatal: BaseException | None = None
    for p, free, result in zip(busy, frees, outcome, strict=True):
        if isinstance(result, BaseException):
            _requeue(session, p, free)
            if not last and loss_of(result) is not None:
                failed.append((p, result))
            elif fatal is None:
                fatal = session.recovery.dead_or(result)
        else:
            assert isinstance(result, dict)
            _record(session, p, free)
            results[id(p)] = result
    if fatal is not None:
        _free_created(session, [p for p in busy if id(p) in results])
        raise fatal
    return failed


def _record(session: Session, program: Program, free: Sequence[str]) -> None:
    """Note in the session's lineage book what ``program`` kept and freed."""
    session.book.ran(program.place, program.ops, (c.buffer_id for c in program.creates), free)


def _free_created(session: Session, programs: Sequence[Program]) -> None:
    """Free what the programs that ran created (a round that failed keeps nothing)."""
    created = [c for p in programs for c in p.creates]
    if created:
        session.run(session.free_now(created), timeout=session.timeouts.rpc, what="free")


def _requeue(session: Session, program: Program, free: Sequence[str]) -> None:
    """Queue again the frees a failed ``program`` carried for others (its own ``free`` list leads)."""
    session.release(program.place.with_buffer(b) for b in free[len(program.free) :])


A = TypeVar("A", bound=GraphArray)


class Round:
    """The programs of one round, being built: one builder per shard of each layout, so everything asked
    of a shard in the round (arrays to keep, partials to fetch) runs in one program."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self._builders: dict[tuple[LayoutKey, int], ProgramBuilder] = {}

    def builder(self, layout: Sequence[Piece], index: int) -> ProgramBuilder:
        """The builder of shard ``index`` of ``layout``'s program."""
        key = (layout_key(layout), index)
        found = self._builders.get(key)
        if found is None:
            found = self._builders[key] = ProgramBuilder(self.session, index, layout[index])
        return found

    def run(self, *, what: str) -> dict[int, dict[str, np.ndarray]]:
        """Run the round's programs together; returns each builder's fetched arrays, by ``id`` of builder.

        Raises:
            RemoteError: an agent refused a program; nothing created is kept.
        """
        builders = list(self._builders.values())
        fetched = run_programs(self.session, [b.program for b in builders], what=what)
        return {id(b): f for b, f in zip(builders, fetched, strict=True)}


def plan_materialize(round_: Round, arrays: Sequence[A]) -> list[tuple[A, list[Piece]]]:
    """Add to ``round_`` the ops that compute every pending array in ``arrays``; returns each with the
    pieces that will hold it once the round has run (for the caller to commit)."""
    targets: list[A] = []
    for array in arrays:
        if array.node is not None and all(array is not t for t in targets):
            targets.append(array)
    outputs: list[tuple[A, list[Piece]]] = []
    for array in targets:
        layout = array.layout
        pieces = []
        for index, piece in enumerate(layout):
            out = round_.builder(layout, index).emit(array, keep=True)
            pieces.append(piece.with_buffer(out))
        outputs.append((array, pieces))
    return outputs


def materialize(session: Session, arrays: Sequence[A]) -> list[tuple[A, list[Piece]]]:
    """Compute every pending array in ``arrays``, in one round of programs (one per shard and layout, all
    concurrent); returns each computed array with the pieces that now hold it, for the caller to commit.

    Raises:
        RemoteError: an agent refused a program; nothing created is kept.
    """
    round_ = Round(session)
    outputs = plan_materialize(round_, arrays)
    if outputs:
        round_.run(what="compute")
    return outputs

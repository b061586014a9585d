"""Lineage: how each of a session's buffers was made, so that the shards an agent takes with it when it
dies are made again on another worker. Pure bookkeeping and planning, no I/O.

Every buffer a session keeps has a :class:`Recipe`: the rows the client uploaded (kept as a copy on the
client, see :data:`KEEP_MODES`), or the op that made it over its input buffers' recipes. Recipes refer to
recipes, not buffers, so a chain stays rebuildable after its intermediates are freed, as Dask's graphs do;
what the client keeps alive is the ops' descriptions and the uploaded rows, never remote memory.

:meth:`Book.plan` turns the buffers lost with one worker into one rebuild on a new worker: the uploads of
the rows they come from and one program that recomputes them under their own buffer ids (intermediates
under fresh ids, freed at its end), so every piece, program and operand that named them stays valid once
its place is moved.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

import numpy as np

from gpupool._proto.v1 import agent_pb2
from gpupool.client.layout import Piece, Place
from gpupool.protocol.codec import check_dtype, op_results, shape_of

__all__ = [
    "KEEP_MODES",
    "LINEAGE_LIMIT",
    "Book",
    "Keep",
    "Rebuild",
    "Recipe",
    "Unrebuildable",
    "buffer_refs",
    "reads_of",
]

#: What the client keeps of uploaded rows so that a lost shard can be rebuilt: "host" a copy on the client
#: (client memory: the bytes uploaded, while an array made from them lives), "replica" a copy of each
#: uploaded array's shard on a second agent (pool memory instead: the bytes uploaded again, moved agent to
#: agent; other uploads, an op's operands, keep a host copy), "none" nothing (a lost
#: uploaded shard cannot be rebuilt).
Keep = Literal["host", "replica", "none"]
KEEP_MODES: Final = ("host", "replica", "none")

#: Ops a recipe chain may hold; a longer chain is not rebuilt (its rebuild would cost as much as the work).
LINEAGE_LIMIT: Final = 4096


@dataclass(eq=False, slots=True, weakref_slot=True)
class Recipe:
    """How one buffer's value was made: ``host`` rows uploaded, or output ``output`` of ``op`` (as it was
    sent: its buffer operands named by the ids they had) over ``inputs`` (those ids' recipes).
    ``why_not`` non-empty: it cannot be rebuilt, and why."""

    nbytes: int
    op: agent_pb2.Op | None = None
    output: str = ""
    inputs: dict[str, Recipe] = field(default_factory=dict)
    host: np.ndarray | None = None
    why_not: str = ""
    depth: int = 0
    #: A whole copy of the buffer on another agent (its rows ``[0, n)``), and its dtype and shape.
    replica: Piece | None = None
    replica_meta: agent_pb2.ArrayMeta | None = None


def unknown(why: str, nbytes: int = 0) -> Recipe:
    """A recipe that cannot be followed."""
    return Recipe(nbytes, why_not=why)


class Unrebuildable(Exception):
    """A lost buffer has no way back: ``buffer_id``'s recipe (or one it needs) says why."""

    def __init__(self, buffer_id: str, why: str) -> None:
        self.buffer_id = buffer_id
        self.why = why
        super().__init__(f"buffer {buffer_id} cannot be rebuilt: {why}")


def _nbytes(meta: agent_pb2.ArrayMeta) -> int:
    try:
        return math.prod(shape_of(meta)) * check_dtype(meta.dtype).itemsize
    except Exception:  # an op that declares no result (it is checked by the agent, not here)
        return 0


def buffer_refs(op: agent_pb2.Op) -> list[str]:
    """The buffer ids ``op`` reads from its program: its buffer operands, and those its loop body reads
    that the body does not make itself."""
    refs = [o.buffer for o in op.inputs if o.WhichOneof("kind") == "buffer"]
    if op.HasField("loop"):
        inner = set(op.loop.carry) | {op.loop.counter}
        for body_op in op.loop.body:
            refs += [r for r in buffer_refs(body_op) if r not in inner and r not in refs]
            inner.update(name for name, _ in op_results(body_op))
    return refs


def reads_of(ops: Sequence[agent_pb2.Op]) -> list[str]:
    """The buffers ``ops`` (a program's, in order) read that they do not make themselves, each once."""
    made: set[str] = set()
    reads: list[str] = []
    for op in ops:
        reads += [r for r in buffer_refs(op) if r not in made and r not in reads]
        made.update(name for name, _ in op_results(op))
    return reads


def renamed(op: agent_pb2.Op, names: dict[str, str]) -> agent_pb2.Op:
    """A copy of ``op`` with the buffer ids in ``names`` (operands, body operands, outputs) renamed."""
    copy = agent_pb2.Op()
    copy.CopyFrom(op)
    _rename_in(copy, names)
    return copy


def _rename_in(op: agent_pb2.Op, names: dict[str, str]) -> None:
    for operand in op.inputs:
        if operand.WhichOneof("kind") == "buffer" and operand.buffer in names:
            operand.buffer = names[operand.buffer]
    if op.output in names:
        op.output = names[op.output]
    for index, out in enumerate(op.outputs):
        if out in names:
            op.outputs[index] = names[out]
    if op.HasField("loop"):
        inner = set(op.loop.carry) | {op.loop.counter}
        for body_op in op.loop.body:
            _rename_in(body_op, {k: v for k, v in names.items() if k not in inner})


@dataclass(slots=True)
class Rebuild:
    """What makes lost buffers again on one worker: upload ``uploads`` (buffer id, rows), then run
    ``ops`` in one program that frees ``free`` (its intermediates) at its end. ``nbytes`` is what it
    holds at its peak, at most."""

    uploads: list[tuple[str, np.ndarray]]
    ops: list[agent_pb2.Op]
    free: list[str]
    nbytes: int
    #: Lost buffers left out (a partial plan): buffer id -> why it cannot be rebuilt.
    dead: dict[str, str] = field(default_factory=dict)
    #: (buffer id, replica, its meta): buffers pulled whole from their replicas, before ``ops`` run.
    pulls: list[tuple[str, Piece, agent_pb2.ArrayMeta]] = field(default_factory=list)

    @property
    def made(self) -> list[str]:
        """Every buffer the rebuild makes on its worker (what to free if it cannot finish)."""
        ops = [name for op in self.ops for name, _ in op_results(op)]
        return [*(name for name, _ in self.uploads), *(name for name, _, _ in self.pulls), *ops]


@dataclass(slots=True)
class _Entry:
    piece: Piece
    recipe: Recipe


class Book:
    """A session's kept buffers: where each is (its piece) and how it was made.

    Args:
        keep: what to keep of uploaded rows (:data:`KEEP_MODES`).
    """

    def __init__(self, keep: Keep = "host") -> None:
        if keep not in KEEP_MODES:
            raise ValueError(f"keep must be one of {KEEP_MODES}, not {keep!r}")
        self.keep: Keep = keep
        self._entries: dict[str, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def recipe(self, buffer_id: str) -> Recipe | None:
        """The recipe of a kept buffer (None: not in the book)."""
        entry = self._entries.get(buffer_id)
        return None if entry is None else entry.recipe

    def piece(self, buffer_id: str) -> Piece | None:
        """Where a kept buffer is (None: not in the book)."""
        entry = self._entries.get(buffer_id)
        return None if entry is None else entry.piece

    # -- recording --------------------------------------------------------------------------------
    def kept(self, rows: np.ndarray, *, replicated: bool = False) -> np.ndarray | None:
        """What the book keeps of uploaded ``rows``: a copy (keep "host"; "replica" for rows that get no
        replica), or None. Safe to call from any thread (an upload makes it while its bytes travel)."""
        copy = self.keep == "host" or (self.keep == "replica" and not replicated)
        return np.array(rows, copy=True, order="C") if copy else None

    def replicated(
        self, piece: Piece, replica: Piece, meta: agent_pb2.ArrayMeta, release: Callable[[Piece], None]
    ) -> None:
        """``piece``'s buffer has a whole copy at ``replica`` (of ``meta``), freed by ``release`` once no
        recipe needs it any more."""
        recipe = Recipe(
            math.prod(shape_of(meta)) * check_dtype(meta.dtype).itemsize, replica=replica, replica_meta=meta
        )
        weakref.finalize(recipe, release, replica)
        self._entries[piece.buffer_id] = _Entry(piece, recipe)

    def uploaded(
        self, piece: Piece, rows: np.ndarray, kept: np.ndarray | Literal["make"] | None = "make"
    ) -> None:
        """``piece``'s buffer now holds ``rows``: ``kept`` is what :meth:`kept` made of them (None: nothing;
        made here by default)."""
        if isinstance(kept, str):
            kept = self.kept(rows)
        if kept is not None:
            recipe = Recipe(rows.nbytes, host=kept)
        else:
            recipe = unknown(
                "it was uploaded with keep_uploads='none' (the client kept no copy)", rows.nbytes
            )
        self._entries[piece.buffer_id] = _Entry(piece, recipe)

    def made_elsewhere(self, piece: Piece, why: str) -> None:
        """``piece``'s buffer was made by a path that keeps no lineage (``why``: by what)."""
        self._entries[piece.buffer_id] = _Entry(piece, unknown(why))

    def ran(
        self, place: Piece, ops: Sequence[agent_pb2.Op], kept: Iterable[str], freed: Iterable[str]
    ) -> None:
        """A program at ``place`` ran ``ops``, keeping ``kept`` and freeing ``freed`` at its end."""
        local: dict[str, Recipe] = {}
        for op in ops:
            inputs: dict[str, Recipe] = {}
            for ref in buffer_refs(op):
                found = local.get(ref) or self.recipe(ref)
                inputs[ref] = found if found is not None else unknown(f"it reads buffer {ref}, unknown here")
            depth = 1 + max((r.depth for r in inputs.values()), default=0)
            for out, meta in op_results(op):
                why = f"its lineage is longer than {LINEAGE_LIMIT} ops" if depth > LINEAGE_LIMIT else ""
                local[out] = Recipe(_nbytes(meta), op=op, output=out, inputs=inputs, depth=depth, why_not=why)
        for buffer_id in kept:
            if buffer_id in local:
                self._entries[buffer_id] = _Entry(place.with_buffer(buffer_id), local[buffer_id])
        self.forget(freed)

    def forget(self, buffer_ids: Iterable[str]) -> None:
        """Buffers freed: they need no rebuilding (recipes that read them keep theirs)."""
        for buffer_id in buffer_ids:
            self._entries.pop(buffer_id, None)

    # -- losing and moving ------------------------------------------------------------------------
    def on(self, place: Place) -> list[str]:
        """The kept buffers at ``place``, oldest first. (A snapshot: a garbage-collected array's buffers
        may be forgotten from another thread meanwhile.)"""
        return [b for b, e in list(self._entries.items()) if e.piece.place == place]

    def move(self, buffer_ids: Iterable[str], to: Piece) -> None:
        """The buffers now live at ``to``'s place (same ids)."""
        for buffer_id in buffer_ids:
            entry = self._entries.get(buffer_id)
            if entry is not None:
                entry.piece = entry.piece.moved_to(to)

    def plan(
        self,
        lost: Sequence[str],
        new_id: Callable[[], str],
        *,
        present: Iterable[str] = (),
        partial: bool = False,
        gone: Collection[str] = (),
    ) -> Rebuild:
        """How to make the ``lost`` buffers again, under their own ids, on one worker that already holds
        ``present`` (kept buffers there, which the rebuild may read). A ``partial`` plan leaves out the
        ones that cannot be rebuilt (its ``dead``) instead of failing. Replicas on the ``gone`` agents are
        not used.

        Raises:
            Unrebuildable: a lost buffer, or a value it needs, has no recipe to follow (not ``partial``).
        """
        plan = Rebuild(uploads=[], ops=[], free=[], nbytes=0)
        known = []
        for buffer_id in lost:
            if self.recipe(buffer_id) is not None:
                known.append(buffer_id)
            elif partial:
                plan.dead[buffer_id] = "the client has no record of it"
            else:
                raise Unrebuildable(buffer_id, "the client has no record of it")
        lost = known
        wanted = set(lost)
        wanted_as: dict[int, str] = {}  # id(recipe) -> the lost buffer it is the value of
        for buffer_id in lost:
            recipe = self.recipe(buffer_id)
            assert recipe is not None
            wanted_as[id(recipe)] = buffer_id
        have: dict[int, str] = {}  # id(recipe) -> the buffer holding its value on the new worker
        for buffer_id in present:
            recipe = self.recipe(buffer_id)
            if recipe is not None and buffer_id not in wanted:
                have[id(recipe)] = buffer_id
        emitted_ops: dict[int, dict[str, str]] = {}  # id(op) -> its outputs' names on the new worker

        def made(name: str) -> str:
            if name not in wanted:
                plan.free.append(name)  # an intermediate: freed at the program's end
            return name

        def emit(recipe: Recipe, blame: str) -> str:
            """The buffer holding ``recipe``'s value on the new worker, made if need be."""
            found = have.get(id(recipe))
            if found is not None:
                return found
            if recipe.why_not:
                raise Unrebuildable(blame, recipe.why_not)
            if recipe.replica is not None:
                if recipe.replica.agent_id in gone:
                    raise Unrebuildable(blame, f"its replica on agent {recipe.replica.agent_id} was lost too")
                assert recipe.replica_meta is not None
                name = made(wanted_as.get(id(recipe)) or new_id())
                plan.pulls.append((name, recipe.replica, recipe.replica_meta))
            elif recipe.host is not None:
                name = made(wanted_as.get(id(recipe)) or new_id())
                plan.uploads.append((name, recipe.host))
            else:
                assert recipe.op is not None
                names = emitted_ops.get(id(recipe.op))
                if names is None:
                    names = {ref: emit(source, blame) for ref, source in recipe.inputs.items()}
                    for out, _ in op_results(recipe.op):
                        names[out] = made(out if out in wanted else new_id())
                    emitted_ops[id(recipe.op)] = names
                    plan.ops.append(renamed(recipe.op, names))
                name = names[recipe.output]
            have[id(recipe)] = name
            plan.nbytes += recipe.nbytes
            return name

        for buffer_id in lost:
            recipe = self.recipe(buffer_id)
            assert recipe is not None
            try:
                emit(recipe, buffer_id)
            except Unrebuildable as exc:
                if not partial:
                    raise
                plan.dead[buffer_id] = exc.why
        return plan

"""Verification: a sample of programs re-run on a second agent and compared (issue 9, item 4).

A session made with ``gp.connect(..., verify=0.1)`` checks about one program in ten after it ran: the
program's inputs are made again on another agent from lineage (:mod:`gpupool.client.lineage`: uploaded
rows and the ops that made each input, never the first agent's bytes), the program runs there, and every
result it kept or fetched is compared: exactly for integers and booleans, within a tolerance per float
dtype (:data:`RTOL`); a matmul's result by Freivalds' check (:func:`freivalds`: the re-run costs a
matrix-vector product, not a matmul). When the two disagree, a third agent (if the pool has one) decides
which was wrong. Each verdict goes to the coordinator (``ReportVerification``), which keeps the agents' trust
scores and quarantines an agent whose results disagreed too often (``gpupool agents`` shows it).

A program found wrong is redone: the session gives its agent up (as if lost), rebuilds what it kept
there on another agent from lineage, and runs the program again there; the caller sees only the right
result. Programs whose results are larger than :data:`MAX_BYTES`, or whose inputs have no lineage, are
not checked (counted as skipped).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Sequence
from typing import Any, Final, Protocol

import numpy as np

from gpupool._errors import AgentLost, GpupoolError
from gpupool._proto.v1 import agent_pb2
from gpupool.client.layout import Piece
from gpupool.client.lineage import Unrebuildable, buffer_refs, reads_of
from gpupool.client.losses import Verification
from gpupool.client.operands import buffer_operand, constant_operand
from gpupool.client.recovery import new_place, rebuild_at
from gpupool.client.session import Session
from gpupool.client.verifyreport import report_verification
from gpupool.protocol.codec import check_dtype, meta_of, op_outputs, op_results, shape_of

__all__ = ["MAX_BYTES", "RTOL", "Distrusted", "Verification", "verify"]

#: Results larger than this (per program, bytes) are not checked: fetching them would cost more than
#: the program.
MAX_BYTES: Final = 32 << 20
#: Relative tolerance per float dtype (absolute: the same times the result's largest magnitude).
RTOL: Final = {"float16": 1e-2, "float32": 1e-4, "float64": 1e-9, "complex64": 1e-4, "complex128": 1e-9}

log = logging.getLogger(__name__)


class Distrusted(AgentLost):
    """An agent whose result disagreed with the same program re-run on other agents: its work is redone
    elsewhere (raised only if that fails too)."""

    def __init__(self, agent_id: str, detail: str) -> None:
        super().__init__(agent_id)
        self.detail = detail
        self.args = (
            agent_id,
            f"agent {agent_id} returned a wrong result ({detail}); redoing its work failed",
        )

    def __str__(self) -> str:
        return str(self.args[1])


class Checked(Protocol):
    """What verification needs of a program (:class:`gpupool.client.graph.Program`)."""

    place: Piece
    ops: list[agent_pb2.Op]
    fetch: list[str]
    creates: list[Piece]


def _compared(program: Checked) -> dict[str, agent_pb2.ArrayMeta]:
    """The results to compare, with their declared metas: what the program keeps and fetches."""
    metas = {out: meta for op in program.ops for out, meta in op_results(op)}
    wanted = [c.buffer_id for c in program.creates] + list(program.fetch)
    return {b: metas[b] for b in dict.fromkeys(wanted) if b in metas}


def _nbytes(meta: agent_pb2.ArrayMeta) -> int:
    return math.prod(shape_of(meta)) * check_dtype(meta.dtype).itemsize


def differs(mine: np.ndarray, theirs: np.ndarray) -> str:
    """ "" when two results agree (exactly for integers and booleans, within :data:`RTOL` for floats),
    else what differs."""
    if mine.shape != theirs.shape or mine.dtype != theirs.dtype:
        return f"{mine.dtype}{list(mine.shape)} against {theirs.dtype}{list(theirs.shape)}"
    if mine.dtype.kind in "fc":
        rtol = RTOL.get(mine.dtype.name, 1e-6)
        finite = np.abs(theirs[np.isfinite(theirs)])
        scale = float(np.max(finite)) if finite.size else 0.0
        close = np.isclose(mine, theirs, rtol=rtol, atol=rtol * scale, equal_nan=True)
    else:
        close = mine == theirs
    if bool(np.all(close)):
        return ""
    bad = np.argwhere(~np.asarray(close))
    where = tuple(int(i) for i in bad[0]) if bad.size else ()
    return (
        f"{int(bad.shape[0])} element(s) differ, first at {list(where)}: {mine[where]!r} vs {theirs[where]!r}"
    )


async def _run_at(
    session: Session, target: Piece, program: Checked, compared: Sequence[str], ops: Sequence[agent_pb2.Op]
) -> dict[str, np.ndarray]:
    """``ops`` (``program``'s, perhaps with Freivalds' products for its matmuls) re-run on ``target``'s
    worker over the program's inputs rebuilt there; returns the compared results (nothing is left
    there)."""
    inputs = reads_of(program.ops)
    plan = session.book.plan(inputs, session.new_buffer_id)
    made = [o for op in ops for o in op_outputs(op)]
    try:
        await rebuild_at(session, target, plan)
        channel = session.channel(target.agent_id, target.endpoint)
        return await channel.execute(
            target.worker,
            list(ops),
            session=session.id,
            fetch=list(compared),
            free=[*inputs, *made],
            timeout=session.timeouts.for_work(plan.nbytes * 4, 0),
        )
    except BaseException:
        channel = session.channel(target.agent_id, target.endpoint)
        await asyncio.gather(channel.free([*plan.made, *made]), return_exceptions=True)
        raise


async def _results_of(
    session: Session,
    program: Checked,
    compared: dict[str, agent_pb2.ArrayMeta],
    fetched: dict[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """The checked agent's results: what it fetched, and what it kept (downloaded)."""
    out = {b: fetched[b] for b in compared if b in fetched}
    channel = session.channel(program.place.agent_id, program.place.endpoint)
    for buffer_id, meta in compared.items():
        if buffer_id not in out:
            host = np.empty(shape_of(meta), check_dtype(meta.dtype))
            await channel.download_into(buffer_id, host)
            out[buffer_id] = host
    return out


def freivalds(
    session: Session, program: Checked, compared: dict[str, agent_pb2.ArrayMeta], rng: random.Random
) -> tuple[list[agent_pb2.Op], dict[str, np.ndarray]]:
    """``program``'s ops with each checkable matmul replaced by Freivalds' products, and the random
    vector of each: for ``C = x @ w`` (2-D, ``w`` of ``m`` columns, ``C`` compared and read by no later
    op), the re-run computes ``x @ (w @ r)`` for a random ``r`` of +-1s, to be compared with ``C @ r``:
    ``n*k`` multiply-adds instead of ``n*k*m``, and a wrong element of ``C`` shows (with probability at
    least 1/2 per check, in exact arithmetic; a changed element changes ``C @ r`` by its error)."""
    ops: list[agent_pb2.Op] = []
    vectors: dict[str, np.ndarray] = {}
    later_reads = [set(buffer_refs(op)) for op in program.ops]
    for index, op in enumerate(program.ops):
        out = op.output
        meta = compared.get(out)
        read_later = any(out in reads for reads in later_reads[index + 1 :])
        if (
            op.op != "matmul"
            or meta is None
            or read_later
            or len(op.inputs) != 2
            or len(meta.shape) != 2
            or check_dtype(meta.dtype).kind != "f"
        ):
            ops.append(op)
            continue
        n, m = (int(d) for d in meta.shape)
        k = _rows_of(session, program, op.inputs[1])
        if k is None:
            ops.append(op)
            continue
        dtype = check_dtype(meta.dtype)
        r = np.array([rng.choice((-1.0, 1.0)) for _ in range(m)], dtype=dtype)
        vector = session.new_buffer_id()
        ops.append(make_matmul(op.inputs[1], constant_operand(r), vector, dtype, (k,)))
        ops.append(make_matmul(op.inputs[0], buffer_operand(vector), out, dtype, (n,)))
        vectors[out] = r
    return ops, vectors


def make_matmul(
    left: agent_pb2.Operand, right: agent_pb2.Operand, out: str, dtype: np.dtype[Any], shape: tuple[int, ...]
) -> agent_pb2.Op:
    """A matmul op."""
    return agent_pb2.Op(op="matmul", inputs=[left, right], output=out, expect=meta_of(dtype, shape))


def _rows_of(session: Session, program: Checked, operand: agent_pb2.Operand) -> int | None:
    """The leading dimension of a 2-D operand (an inline constant, a buffer the program makes, or one
    the session's book knows), None if unknown or not 2-D."""
    kind = operand.WhichOneof("kind")
    if kind == "constant":
        shape = shape_of(operand.constant.meta)
        return shape[0] if len(shape) == 2 else None
    if kind != "buffer":
        return None
    metas = {out: meta for op in program.ops for out, meta in op_results(op)}
    if operand.buffer in metas:
        shape = shape_of(metas[operand.buffer])
        return shape[0] if len(shape) == 2 else None
    recipe = session.book.recipe(operand.buffer)
    if recipe is not None and recipe.host is not None and recipe.host.ndim == 2:
        return int(recipe.host.shape[0])
    if recipe is not None and recipe.op is not None:
        found = dict(op_results(recipe.op)).get(recipe.output)
        if found is not None and len(found.shape) == 2:
            return int(found.shape[0])
    return None


def _disagreement(mine: dict[str, np.ndarray], theirs: dict[str, np.ndarray]) -> str:
    for buffer_id, value in mine.items():
        other = theirs.get(buffer_id)
        if other is None:
            return f"buffer {buffer_id} missing from the re-run"
        detail = differs(value, other)
        if detail:
            return f"buffer {buffer_id}: {detail}"
    return ""


async def verify(session: Session, program: Checked, fetched: dict[str, np.ndarray]) -> str:
    """Check ``program``'s results (it ran at its place, giving ``fetched``) on another agent; returns the
    id of the agent found wrong if it was the program's own ("" otherwise: agreed, not checkable, or the
    other agent was the wrong one).

    Reports every verdict to the coordinator; a failure to report, or to re-run, is logged, never raised.
    """
    state = session.verification
    checked = program.place
    compared = _compared(program)
    if not compared or sum(_nbytes(m) for m in compared.values()) > MAX_BYTES:
        state.skipped += 1
        return ""
    try:
        mine = await _results_of(session, program, compared, fetched)
        size = sum(v.nbytes for v in mine.values())
        ops, vectors = freivalds(session, program, compared, state.rng)
        state.freivalds += len(vectors)
        mine = {b: v @ vectors[b] if b in vectors else v for b, v in mine.items()}
        reference = await new_place(session, size * 3 + 1, [checked.agent_id])
        theirs = await _run_at(session, reference, program, list(compared), ops)
    except (Unrebuildable, GpupoolError) as exc:
        log.info("verification of a program on agent %s skipped: %s", checked.agent_id, exc)
        state.skipped += 1
        return ""
    state.checked += 1
    detail = _disagreement(mine, theirs)
    if not detail:
        state.agreed += 1
        await _report(session, checked.agent_id, reference.agent_id, True, "")
        return ""
    # Which one is wrong? A third agent decides, where there is one.
    wrong, right = checked.agent_id, reference.agent_id
    try:
        judge = await new_place(session, size * 3 + 1, [checked.agent_id, reference.agent_id])
        third = await _run_at(session, judge, program, list(compared), ops)
        if not _disagreement(mine, third):
            wrong, right = reference.agent_id, checked.agent_id
    except (Unrebuildable, GpupoolError) as exc:
        log.info("no third agent to decide (%s): agent %s's result is taken as the wrong one", exc, wrong)
    state.wrong += 1
    state.caught.append(wrong)
    log.warning(
        "verification: agent %s returned a wrong result (%s); agent %s did not",
        wrong,
        detail,
        right,
    )
    await _report(session, wrong, right, False, detail)
    return wrong if wrong == checked.agent_id else ""


async def _report(session: Session, agent_id: str, reference: str, agreed: bool, detail: str) -> None:
    try:
        outcome = await report_verification(
            session.call_coordinator,
            session.id,
            agent_id=agent_id,
            reference_agent_id=reference,
            agreed=agreed,
            detail=detail,
        )
        if outcome.quarantined:
            log.warning("the coordinator quarantined agent %s: %s", agent_id, outcome.reason)
    except GpupoolError as exc:
        log.warning("could not report a verification of agent %s: %s", agent_id, exc)

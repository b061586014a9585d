"""Verification: a sample of programs re-run on a second agent and compared (issue 9, item 4).

A session made with ``gp.connect(..., verify=0.1)`` checks about one program in ten after it ran: the
program's inputs are made again on another agent from lineage (:mod:`gpupool.client.lineage`: uploaded
rows and the ops that made each input, never the first agent's bytes), the program runs there, and every
result it kept or fetched is compared: exactly for integers and booleans, within a tolerance per float
dtype (:data:`RTOL`). When the two disagree, a third agent (if the pool has one) decides which was
wrong. Each verdict goes to the coordinator (``ReportVerification``), which keeps the agents' trust
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
from collections.abc import Sequence
from typing import Final, Protocol

import numpy as np

from gpupool._errors import AgentLost, GpupoolError
from gpupool._proto.v1 import agent_pb2
from gpupool.client.layout import Piece
from gpupool.client.lineage import Unrebuildable, buffer_refs
from gpupool.client.losses import Verification
from gpupool.client.recovery import new_place, rebuild_at
from gpupool.client.session import Session
from gpupool.client.verifyreport import report_verification
from gpupool.protocol.codec import check_dtype, op_outputs, op_results, shape_of

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


def _inputs(program: Checked) -> list[str]:
    """The buffers ``program`` reads that it does not make."""
    made: set[str] = set()
    refs: list[str] = []
    for op in program.ops:
        refs += [r for r in buffer_refs(op) if r not in made and r not in refs]
        made.update(op_outputs(op))
    return refs


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
    session: Session, target: Piece, program: Checked, compared: Sequence[str]
) -> dict[str, np.ndarray]:
    """``program`` re-run on ``target``'s worker over its inputs rebuilt there; returns the compared
    results (nothing is left there)."""
    inputs = _inputs(program)
    plan = session.book.plan(inputs, session.new_buffer_id)
    made = [o for op in program.ops for o in op_outputs(op)]
    try:
        await rebuild_at(session, target, plan)
        channel = session.channel(target.agent_id, target.endpoint)
        return await channel.execute(
            target.worker,
            program.ops,
            session=session.id,
            fetch=list(compared),
            free=[*inputs, *made],
            timeout=session.timeouts.for_work(plan.nbytes * 4, 0),
        )
    except BaseException:
        channel = session.channel(target.agent_id, target.endpoint)
        await asyncio.gather(channel.free([*inputs, *made, *plan.free]), return_exceptions=True)
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
        reference = await new_place(session, size * 3 + 1, [checked.agent_id])
        theirs = await _run_at(session, reference, program, list(compared))
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
        third = await _run_at(session, judge, program, list(compared))
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

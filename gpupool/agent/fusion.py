"""Fused evaluation of elementwise chains on the NumPy backend.

A program such as ``t1 = x * 2; t2 = t1 + 1; t3 = t2 ** 2; p = sum(t3)`` with ``t1..t3`` freed at its end
would, op by op, write three full-size temporaries through memory. Here the chain runs over blocks of
rows instead: each block goes through every op while it is in cache, the temporaries are block-sized,
and a trailing reduction over all elements or over rows folds block partials, so only the outputs the
program keeps are written in full. Each block still goes through :func:`~gpupool.agent.ops.apply_op`,
so results, dtype casts and refusals are exactly those of the unfused path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from gpupool._proto.v1 import agent_pb2
from gpupool.agent.compound import buffer_reads
from gpupool.agent.ops import BINARY, UNARY, Expected, apply_op, op_args

__all__ = ["BLOCK_ELEMENTS", "Run", "plan_runs", "run_fused"]

#: Ops whose result at each position depends only on the operands at that position (broadcast operands
#: whole), so that a block of rows of the result is the op over the blocks of its operands.
ELEMENTWISE: Final = BINARY | UNARY | {"where", "astype", "clip", "round"}
#: Reductions whose block partials combine exactly as the whole would (mean is sent as sum by clients).
FOLDABLE: Final = {
    "sum": np.add,
    "prod": np.multiply,
    "max": np.maximum,
    "min": np.minimum,
    "any": np.logical_or,
    "all": np.logical_and,
}
#: Elements per block: large enough that per-op Python work is small beside the arithmetic.
BLOCK_ELEMENTS: Final = 1 << 17


@dataclass(frozen=True, slots=True)
class Run:
    """Ops ``start`` up to ``stop`` (exclusive) are one fused chain; with ``folds``, op ``stop`` is a
    reduction over the chain's last output, computed from block partials."""

    start: int
    stop: int
    folds: bool

    @property
    def end(self) -> int:
        """The index after the last op the run covers."""
        return self.stop + 1 if self.folds else self.stop


def plan_runs(
    ops: Sequence[agent_pb2.Op], expected: dict[str, Expected], free: set[str], fetch: set[str]
) -> dict[int, Run]:
    """Fusible runs of a program, by their first op's index. A run is worth it when it saves a full-size
    temporary: two or more elementwise ops of one shape, or one followed by a foldable reduction."""
    consumers: dict[str, list[int]] = {}
    for index, op in enumerate(ops):
        for buffer_id in buffer_reads(op):
            consumers.setdefault(buffer_id, []).append(index)
    runs: dict[int, Run] = {}
    index = 0
    while index < len(ops):
        if ops[index].op not in ELEMENTWISE or len(expected[ops[index].output].shape) == 0:
            index += 1
            continue
        shape = expected[ops[index].output].shape
        stop = index + 1
        while stop < len(ops) and ops[stop].op in ELEMENTWISE and expected[ops[stop].output].shape == shape:
            stop += 1
        last = ops[stop - 1].output
        folds = (
            stop < len(ops)
            and ops[stop].op in FOLDABLE
            and _reduces_rows(ops[stop], len(shape))
            and len(ops[stop].inputs) == 1
            and ops[stop].inputs[0].buffer == last
            and last in free
            and last not in fetch
            and consumers.get(last) == [stop]
        )
        if stop - index >= 2 or folds:
            runs[index] = Run(index, stop, folds)
        index = stop + (1 if folds else 0)
    return runs


def _reduces_rows(op: agent_pb2.Op, ndim: int) -> bool:
    """Whether reduction ``op`` over an array of ``ndim`` dimensions reduces over every axis or over the
    rows (axis 0) only, with or without keepdims: the reductions whose block partials fold."""
    if op.params:
        return False
    if not op.axes:
        return not op.has_axis or op.axis in (0, -ndim)
    if op.has_axis or not all(-ndim <= axis < ndim for axis in op.axes):
        return False  # refused when it runs
    axes = {axis % ndim for axis in op.axes}
    if len(axes) != len(op.axes):
        return False
    return axes == {0} or axes == set(range(ndim))


def run_fused(
    xp: Any,
    ops: Sequence[agent_pb2.Op],
    run: Run,
    expected: dict[str, Expected],
    *,
    resolve: Callable[[agent_pb2.Operand], Any],
    needed_whole: Callable[[str], bool],
    kernel_errors: tuple[type[BaseException], ...],
) -> dict[str, Any]:
    """Evaluate ``run`` block by block; returns the outputs that must exist in full (those ``needed_whole``
    says so of, and the folded reduction's result).

    Raises:
        RpcRefusal: as :func:`apply_op` would for the same ops.
        MemoryError: passed through.
    """
    chain = ops[run.start : run.stop]
    shape = expected[chain[0].output].shape
    rows = shape[0]
    row_elements = math.prod(shape[1:]) or 1
    step = max(1, BLOCK_ELEMENTS // row_elements)
    produced = {op.output for op in chain}
    # Each op's operands once: ("block", buffer id) for the chain's own values, ("whole", value) otherwise.
    # (Protobuf hands out a new wrapper on every access, so nothing is keyed by the messages themselves.)
    plan: list[list[tuple[str, Any]]] = [
        [
            ("block", item.buffer)
            if item.WhichOneof("kind") == "buffer" and item.buffer in produced
            else ("whole", resolve(item))
            for item in op.inputs
        ]
        for op in chain
    ]
    whole = {
        op.output: xp.empty(expected[op.output].shape, expected[op.output].dtype)
        for op in chain
        if needed_whole(op.output)
    }
    reduction = ops[run.stop] if run.folds else None
    partial: Any = None
    for begin in range(0, max(rows, 1), step):
        end = min(rows, begin + step)
        block: dict[str, Any] = {}
        for op, sources in zip(chain, plan, strict=True):
            operands = [
                block[value] if kind == "block" else _rows(value, begin, end, shape)
                for kind, value in sources
            ]
            want = expected[op.output]
            block_expect = Expected(want.dtype, (end - begin, *shape[1:]), 0)
            block[op.output] = apply_op(
                xp, op.op, operands, block_expect, args=op_args(op), kernel_errors=kernel_errors
            )
            if op.output in whole:
                whole[op.output][begin:end] = block[op.output]
        if reduction is not None:
            want = expected[reduction.output]
            piece = apply_op(
                xp,
                reduction.op,
                [block[chain[-1].output]],
                Expected(want.dtype, want.shape, 0),
                args=op_args(reduction),
                kernel_errors=kernel_errors,
            )
            if want.dtype.kind == "f":
                piece = piece.astype(np.float64)  # block partials add up in double precision
            partial = piece if partial is None else FOLDABLE[reduction.op](partial, piece)
    if reduction is not None:
        want = expected[reduction.output]
        whole[reduction.output] = xp.asarray(partial).astype(want.dtype, copy=False).reshape(want.shape)
    return whole


def _rows(value: Any, begin: int, end: int, shape: tuple[int, ...]) -> Any:
    """The rows of an operand that line up with the chain's block; broadcast operands pass whole."""
    vshape: tuple[int, ...] = tuple(getattr(value, "shape", ()))  # () for Python and NumPy scalars
    if len(vshape) == len(shape) and vshape[0] == shape[0] and shape[0] > 1:
        return value[begin:end]
    return value

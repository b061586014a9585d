"""The op table of the agent (docs/contracts.md): operands in, one array out, with any namespace.

Pure functions of an array namespace ``xp`` (``numpy`` or ``cupy``) and values; nothing here knows
about buffers, the network or threads, so the table is unit-tested with NumPy alone. This module holds
the table (:data:`TABLE`), the elementwise ops and :func:`apply_op`, which runs any op and checks its
result; the other families live in :mod:`~gpupool.agent.ops_stats` (reductions, partials, scans),
:mod:`~gpupool.agent.ops_layout` (ordering, layout, ``tmatmul``) and :mod:`~gpupool.agent.ops_create`
(arrays made on the agent), their parameters in :mod:`~gpupool.agent.opargs`. Refusals are
:class:`~gpupool.protocol.errors.RpcRefusal` (``bad-request`` for a malformed op or a result that is not
what the client expected, ``kernel-failed`` for operands NumPy or CuPy reject). Out-of-memory errors
pass through for the caller, who knows its backend's kinds of them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np

from gpupool._errors import FrameDecodeError, UnsupportedDType
from gpupool._proto.v1 import agent_pb2
from gpupool.agent import ops_create, ops_layout, ops_stats
from gpupool.agent.opargs import Expected, OpArgs, OpSpec, check_signature, op_args
from gpupool.protocol.codec import array_from_bytes, check_dtype, shape_of
from gpupool.protocol.errors import RpcRefusal
from gpupool.protocol.opnames import ALL_OPS, BINARY, REDUCTIONS, UNARY

__all__ = [
    "BINARY",
    "OPS",
    "REDUCTIONS",
    "TABLE",
    "UNARY",
    "Expected",
    "OpArgs",
    "apply_op",
    "arity",
    "check_op",
    "constant_array",
    "expected_of",
    "expected_result",
    "op_args",
    "scalar_value",
]

#: Every op name the agent runs (:data:`gpupool.protocol.opnames.ALL_OPS`).
OPS: Final = ALL_OPS

#: Exceptions NumPy and CuPy raise for operands an op rejects (shapes, dtypes, axes, overflow).
_OPERAND_ERRORS: Final[tuple[type[BaseException], ...]] = (ValueError, TypeError, IndexError, ArithmeticError)


def _ufunc(xp: Any, name: str, operands: Sequence[Any], expect: Expected, args: OpArgs) -> Any:
    function = getattr(xp, name, None)
    if function is None:  # an older CuPy lacking one of NumPy's functions
        namespace = getattr(xp, "__name__", "this backend")
        raise RpcRefusal("kernel-failed", f"op {name!r} is not available in {namespace}")
    return function(*operands)


def _astype(xp: Any, name: str, operands: Sequence[Any], expect: Expected, args: OpArgs) -> Any:
    return xp.asarray(operands[0]).astype(expect.dtype)


def _clip(xp: Any, name: str, operands: Sequence[Any], expect: Expected, args: OpArgs) -> Any:
    # CuPy's clip takes only an array first (it calls a.clip), hence asarray.
    return xp.clip(xp.asarray(operands[0]), operands[1], operands[2])


def _round(xp: Any, name: str, operands: Sequence[Any], expect: Expected, args: OpArgs) -> Any:
    # NumPy's round of integers with decimals >= 0 returns its operand itself; apply_op copies it.
    return xp.round(xp.asarray(operands[0]), decimals=args.params[0] if args.params else 0)


#: Every op: what it takes and how it computes (docs/contracts.md has the same table in words).
TABLE: Final[Mapping[str, OpSpec]] = {
    **{name: OpSpec(2, _ufunc) for name in BINARY},
    **{name: OpSpec(1, _ufunc) for name in UNARY},
    "where": OpSpec(3, _ufunc),
    "matmul": OpSpec(2, _ufunc),
    "astype": OpSpec(1, _astype),
    "clip": OpSpec(3, _clip),
    "round": OpSpec(1, _round, params=(0, 1)),
    **ops_stats.TABLE,
    **ops_layout.TABLE,
    **ops_create.TABLE,
}


def _spec(name: str) -> OpSpec:
    spec = TABLE.get(name)
    if spec is None:
        raise RpcRefusal("bad-request", f"unknown op {name!r}")
    return spec


def arity(name: str) -> int:
    """How many operands the op takes (``-1``: one or more).

    Raises:
        RpcRefusal: ``bad-request`` for a name outside the table.
    """
    return _spec(name).arity


def check_op(op: agent_pb2.Op) -> None:
    """Check an op's name, its operand count and which parameters it has, before anything computes (the
    values of its parameters are checked against its operands when it runs).

    Raises:
        RpcRefusal: ``bad-request`` for an unknown op, a wrong operand count or parameters it does not take.
    """
    check_signature(op.op, _spec(op.op), op_args(op), len(op.inputs))


def expected_result(op: agent_pb2.Op) -> Expected:
    """The result ``op`` declares.

    Raises:
        RpcRefusal: ``bad-request`` for a missing, unsupported or negative declaration.
    """
    if not op.HasField("expect") or not op.expect.dtype:
        raise RpcRefusal("bad-request", f"op {op.op!r} -> {op.output!r}: expect.dtype is required")
    return expected_of(op.expect, op=op.op, output=op.output)


def expected_of(meta: agent_pb2.ArrayMeta, *, op: str, output: str) -> Expected:
    """The result ``meta`` declares for output ``output`` of op ``op``.

    Raises:
        RpcRefusal: ``bad-request`` for an unsupported dtype or a negative dimension.
    """
    try:
        dtype = check_dtype(meta.dtype)
    except UnsupportedDType as exc:
        raise RpcRefusal("bad-request", f"op {op!r} -> {output!r}: {exc}") from exc
    shape = shape_of(meta)
    if any(n < 0 for n in shape):
        raise RpcRefusal("bad-request", f"op {op!r} -> {output!r}: negative dimension in {shape}")
    return Expected(dtype, shape, math.prod(shape) * dtype.itemsize)


def scalar_value(scalar: agent_pb2.Scalar) -> bool | int | float | np.generic:
    """A scalar operand: a weakly typed Python scalar when ``dtype`` is empty, else a NumPy scalar.

    Raises:
        RpcRefusal: ``bad-request`` for no value, an unsupported dtype or a value out of its range.
    """
    kind = scalar.WhichOneof("value")
    if kind is None:
        raise RpcRefusal("bad-request", "a scalar operand carries no value")
    value: bool | int | float = getattr(scalar, kind)
    if not scalar.dtype:
        return value
    try:
        typed: np.generic = check_dtype(scalar.dtype).type(value)
        return typed
    except UnsupportedDType as exc:
        raise RpcRefusal("bad-request", f"scalar operand: {exc}") from exc
    except (OverflowError, ValueError) as exc:
        raise RpcRefusal("bad-request", f"scalar {value!r} does not fit {scalar.dtype}: {exc}") from exc


def constant_array(constant: agent_pb2.Constant) -> np.ndarray:
    """A constant operand as a host array (the caller puts it on the device).

    Raises:
        RpcRefusal: ``bad-request`` for an unsupported dtype or data of the wrong size.
    """
    try:
        return array_from_bytes(constant.data, constant.meta)
    except (UnsupportedDType, FrameDecodeError) as exc:
        raise RpcRefusal("bad-request", f"constant operand: {exc}") from exc


def apply_op(
    xp: Any,
    name: str,
    operands: Sequence[Any],
    expect: Expected,
    *,
    axis: int | None = None,
    args: OpArgs | None = None,
    kernel_errors: tuple[type[BaseException], ...] = (),
    own_memory: bool = True,
) -> Any:
    """Run one op of the table and return its result, checked and cast as ``expect`` says.

    The result is a C-contiguous array of ``xp`` with exactly ``expect.shape`` and ``expect.dtype`` that
    shares no memory with the operands. Floating-point warnings are ignored, as NumPy's default only warns.

    Args:
        xp: the array namespace.
        name: the op.
        operands: its operands: arrays of ``xp``, Python or NumPy scalars.
        expect: the result it must give.
        axis: a reduction's single axis (the older ``has_axis``/``axis``); the same as in ``args``.
        args: its parameters (:func:`op_args` of its message); none for none.
        kernel_errors: the backend's errors that mean an op failed.
        own_memory: make the result C-contiguous memory of its own (False: a view of an operand may
            come back, for a caller that keeps the result from everything that outlives the operands).

    Raises:
        RpcRefusal: ``bad-request`` for an unknown op, a wrong operand count, malformed parameters or a
            result of another shape; ``kernel-failed`` for operands NumPy or CuPy reject (shapes that do
            not broadcast, a dtype an op does not take) or an error in ``kernel_errors``.
        MemoryError: and the backend's out-of-memory errors, passed through.
    """
    spec = _spec(name)
    if args is None:
        args = OpArgs(axis=axis)
    elif axis is not None:
        args = dataclasses.replace(args, axis=axis)
    check_signature(name, spec, args, len(operands))
    rejected: tuple[type[BaseException], ...] = (*_OPERAND_ERRORS, *kernel_errors)
    try:
        with np.errstate(all="ignore"):
            result = xp.asarray(spec.compute(xp, name, operands, expect, args))
            if tuple(result.shape) != expect.shape:
                raise RpcRefusal(
                    "bad-request",
                    f"op {name!r} gives shape {tuple(result.shape)}, the request expects {expect.shape}",
                )
            if result.dtype != expect.dtype:
                result = result.astype(expect.dtype)
            if not own_memory:
                return result
            result = xp.asarray(result, order="C")  # ascontiguousarray would make 0-d arrays 1-d
            if result.base is not None or any(result is operand for operand in operands):
                # A view (slice, reshape) or an operand itself (round of integers) would share an input
                # buffer's memory, which freeing that buffer would then not give back. (CuPy has .base too.)
                result = result.copy()
            return result
    except RpcRefusal:
        raise
    except rejected as exc:
        if isinstance(exc, MemoryError):
            raise
        raise RpcRefusal("kernel-failed", f"op {name!r}: {type(exc).__name__}: {exc}") from exc

"""The op table of the agent (docs/contracts.md): operands in, one array out, with any namespace.

Pure functions of an array namespace ``xp`` (``numpy`` or ``cupy``) and values; nothing here knows
about buffers, the network or threads, so the table is unit-tested with NumPy alone. Refusals are
:class:`~gpupool.protocol.errors.RpcRefusal` (``bad-request`` for a malformed op or a result that is not
what the client expected, ``kernel-failed`` for operands NumPy or CuPy reject). Out-of-memory errors
pass through for the caller, who knows its backend's kinds of them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from gpupool._errors import FrameDecodeError, UnsupportedDType
from gpupool._proto.v1 import agent_pb2
from gpupool.protocol.codec import array_from_bytes, check_dtype, shape_of
from gpupool.protocol.errors import RpcRefusal
from gpupool.protocol.opnames import BINARY, REDUCTIONS, UNARY

__all__ = [
    "BINARY",
    "OPS",
    "REDUCTIONS",
    "UNARY",
    "Expected",
    "apply_op",
    "arity",
    "constant_array",
    "expected_result",
    "scalar_value",
]

OPS: Final = BINARY | UNARY | REDUCTIONS | {"where", "matmul", "astype"}

#: Exceptions NumPy and CuPy raise for operands an op rejects (shapes, dtypes, axes, overflow).
_OPERAND_ERRORS: Final[tuple[type[BaseException], ...]] = (ValueError, TypeError, IndexError, ArithmeticError)


def arity(name: str) -> int:
    """How many operands the op takes.

    Raises:
        RpcRefusal: ``bad-request`` for a name outside the table.
    """
    if name in BINARY or name == "matmul":
        return 2
    if name in UNARY or name in REDUCTIONS or name == "astype":
        return 1
    if name == "where":
        return 3
    raise RpcRefusal("bad-request", f"unknown op {name!r}")


@dataclass(frozen=True, slots=True)
class Expected:
    """The result an op must produce.

    Attributes:
        dtype: the result is cast to it.
        shape: the result must have it.
        nbytes: bytes the result takes, counted against the worker's limit before the op runs.
    """

    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    nbytes: int


def expected_result(op: agent_pb2.Op) -> Expected:
    """The result ``op`` declares.

    Raises:
        RpcRefusal: ``bad-request`` for a missing, unsupported or negative declaration.
    """
    if not op.HasField("expect") or not op.expect.dtype:
        raise RpcRefusal("bad-request", f"op {op.op!r} -> {op.output!r}: expect.dtype is required")
    try:
        dtype = check_dtype(op.expect.dtype)
    except UnsupportedDType as exc:
        raise RpcRefusal("bad-request", f"op {op.op!r} -> {op.output!r}: {exc}") from exc
    shape = shape_of(op.expect)
    if any(n < 0 for n in shape):
        raise RpcRefusal("bad-request", f"op {op.op!r} -> {op.output!r}: negative dimension in {shape}")
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
    kernel_errors: tuple[type[BaseException], ...] = (),
) -> Any:
    """Run one op of the table and return its result, checked and cast as ``expect`` says.

    The result is a C-contiguous array of ``xp`` with exactly ``expect.shape`` and ``expect.dtype``.
    Floating-point warnings are ignored, as NumPy's default only warns.

    Raises:
        RpcRefusal: ``bad-request`` for an unknown op, a wrong operand count or a result of another
            shape; ``kernel-failed`` for operands NumPy or CuPy reject (shapes that do not broadcast,
            a dtype an op does not take) or an error in ``kernel_errors``.
        MemoryError: and the backend's out-of-memory errors, passed through.
    """
    needed = arity(name)
    if len(operands) != needed:
        raise RpcRefusal("bad-request", f"op {name!r} takes {needed} operand(s), got {len(operands)}")
    rejected: tuple[type[BaseException], ...] = (*_OPERAND_ERRORS, *kernel_errors)
    try:
        with np.errstate(all="ignore"):
            result = _compute(xp, name, operands, expect, axis)
            result = xp.asarray(result)
            if tuple(result.shape) != expect.shape:
                raise RpcRefusal(
                    "bad-request",
                    f"op {name!r} gives shape {tuple(result.shape)}, the request expects {expect.shape}",
                )
            if result.dtype != expect.dtype:
                result = result.astype(expect.dtype)
            return xp.asarray(result, order="C")  # ascontiguousarray would make 0-d arrays 1-d
    except RpcRefusal:
        raise
    except rejected as exc:
        if isinstance(exc, MemoryError):
            raise
        raise RpcRefusal("kernel-failed", f"op {name!r}: {type(exc).__name__}: {exc}") from exc


def _compute(xp: Any, name: str, operands: Sequence[Any], expect: Expected, axis: int | None) -> Any:
    if name == "astype":
        return xp.asarray(operands[0]).astype(expect.dtype)
    function = getattr(xp, name, None)
    if function is None:  # an older CuPy lacking one of NumPy's functions
        namespace = getattr(xp, "__name__", "this backend")
        raise RpcRefusal("kernel-failed", f"op {name!r} is not available in {namespace}")
    if name in REDUCTIONS and axis is not None:
        return function(operands[0], axis=axis)
    return function(*operands)

"""Turning Python and NumPy values into program operands, and host arrays into what travels."""

from __future__ import annotations

from typing import Final

import numpy as np

from gpupool._config import SUPPORTED_DTYPES
from gpupool._errors import UnsupportedDType, UsageError
from gpupool._proto.v1 import agent_pb2
from gpupool.protocol.codec import check_dtype, meta_of

__all__ = [
    "INLINE_LIMIT",
    "buffer_operand",
    "constant_operand",
    "is_scalar",
    "native_contiguous",
    "scalar_operand",
]

#: Host arrays up to this size travel inside the program; larger ones are uploaded as buffers first.
INLINE_LIMIT: Final = 16 << 20

_INT64 = np.iinfo(np.int64)


def is_scalar(value: object) -> bool:
    """Whether ``value`` is a Python or NumPy scalar (0-d arrays count)."""
    return isinstance(value, bool | int | float | complex | np.generic) or (
        isinstance(value, np.ndarray) and value.ndim == 0
    )


def scalar_operand(value: object) -> agent_pb2.Operand:
    """A scalar operand; Python scalars stay weakly typed as NumPy 2 treats them.

    Raises:
        UnsupportedDType: a dtype gpupool does not carry.
        UsageError: a Python int beyond int64.
    """
    if isinstance(value, np.ndarray):
        value = value[()]
    if isinstance(value, np.generic):
        dtype = check_dtype(value.dtype)
        item = value.item()
        if dtype.kind == "b":
            return agent_pb2.Operand(scalar=agent_pb2.Scalar(b=bool(item), dtype=dtype.name))
        if dtype.kind == "f":
            return agent_pb2.Operand(scalar=agent_pb2.Scalar(f=float(item), dtype=dtype.name))
        if dtype.kind == "c" or not _INT64.min <= item <= _INT64.max:  # no Scalar field holds them
            return constant_operand(np.asarray(value))
        return agent_pb2.Operand(scalar=agent_pb2.Scalar(i=int(item), dtype=dtype.name))
    if isinstance(value, bool):
        return agent_pb2.Operand(scalar=agent_pb2.Scalar(b=value))
    if isinstance(value, int):
        if not _INT64.min <= value <= _INT64.max:
            raise UsageError(f"integer {value} does not fit in int64")
        return agent_pb2.Operand(scalar=agent_pb2.Scalar(i=value))
    if isinstance(value, float):
        return agent_pb2.Operand(scalar=agent_pb2.Scalar(f=value))
    if isinstance(value, complex):
        # No weak complex on the wire: a complex128 constant, whose result the agent casts to the
        # dtype NumPy's rules (a weak complex) gave on the client.
        return constant_operand(np.asarray(value, np.complex128))
    raise UnsupportedDType(type(value).__name__, SUPPORTED_DTYPES)


def constant_operand(host: np.ndarray) -> agent_pb2.Operand:
    """A small host array sent inline with the program."""
    host = np.asarray(host, order="C")
    return agent_pb2.Operand(
        constant=agent_pb2.Constant(meta=meta_of(host.dtype, host.shape), data=host.tobytes())
    )


def buffer_operand(buffer_id: str) -> agent_pb2.Operand:
    """A resident buffer of the worker that runs the program."""
    return agent_pb2.Operand(buffer=buffer_id)


def native_contiguous(host: np.ndarray) -> np.ndarray:
    """``host`` as it is uploaded: C-contiguous, in native byte order (a copy only where needed)."""
    return np.ascontiguousarray(host, dtype=host.dtype.newbyteorder("="))

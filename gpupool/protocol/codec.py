"""Encoding of MQTT payloads (protobuf canonical JSON) and of arrays on the data plane."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final, TypeVar

import numpy as np
from google.protobuf import json_format
from google.protobuf.message import Message

from gpupool._config import CHUNK_BYTES, SUPPORTED_DTYPES
from gpupool._errors import FrameDecodeError, UnsupportedDType, VersionMismatch
from gpupool._proto.v1 import agent_pb2

__all__ = [
    "SCHEMA_VERSION",
    "array_from_bytes",
    "check_dtype",
    "decode_json",
    "encode_json",
    "iter_chunks",
    "meta_of",
    "op_outputs",
    "op_results",
    "shape_of",
]

#: The control-plane schema version every MQTT payload carries.
SCHEMA_VERSION: Final = 1

M = TypeVar("M", bound=Message)


def encode_json(message: Message) -> bytes:
    """A control-plane message as compact canonical JSON, with its schema version set."""
    if hasattr(message, "schema_version") and not message.schema_version:
        message.schema_version = SCHEMA_VERSION
    # Zero fields are printed too: an operator reading `mosquitto_sub` should see "memoryUsed": "0".
    return json_format.MessageToJson(
        message, indent=None, preserving_proto_field_name=False, always_print_fields_with_no_presence=True
    ).encode()


def decode_json(payload: bytes | bytearray | str, message_type: type[M], *, what: str) -> M:
    """Parse a control-plane payload.

    Unknown fields are ignored, so a newer minor version of a peer still reads.

    Raises:
        FrameDecodeError: not JSON of that message type.
        VersionMismatch: a schema version other than :data:`SCHEMA_VERSION`.
    """
    message = message_type()
    try:
        text = payload.decode() if isinstance(payload, bytes | bytearray) else payload
        json_format.Parse(text, message, ignore_unknown_fields=True)
    except (json_format.ParseError, UnicodeDecodeError, ValueError) as exc:
        raise FrameDecodeError(what, str(exc)) from exc
    version = getattr(message, "schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise VersionMismatch(what, version, SCHEMA_VERSION)
    return message


_CHECKED: dict[str, np.dtype[np.generic]] = {}


def check_dtype(dtype: object) -> np.dtype[np.generic]:
    """The NumPy dtype for ``dtype`` if gpupool carries it.

    Raises:
        UnsupportedDType: any other dtype (object, strings, datetimes, longdouble, big-endian, ...).
    """
    if isinstance(dtype, str):  # the wire's names: looked up on every op, so remembered
        known = _CHECKED.get(dtype)
        if known is None:
            known = _CHECKED[dtype] = _check_dtype(dtype)
        return known
    return _check_dtype(dtype)


def _check_dtype(dtype: object) -> np.dtype[np.generic]:
    try:
        resolved: np.dtype[np.generic] = np.dtype(dtype)  # type: ignore[call-overload]
    except (TypeError, ValueError, SyntaxError) as exc:  # NumPy parses strings like "01" or "(9,9)f8" too
        raise UnsupportedDType(str(dtype)[:64], SUPPORTED_DTYPES) from exc
    if resolved.name not in SUPPORTED_DTYPES or resolved.byteorder == ">":
        raise UnsupportedDType(resolved.str if resolved.byteorder == ">" else resolved.name, SUPPORTED_DTYPES)
    return resolved


def meta_of(dtype: np.dtype[np.generic], shape: tuple[int, ...]) -> agent_pb2.ArrayMeta:
    """The wire description of an array."""
    return agent_pb2.ArrayMeta(dtype=dtype.name, shape=list(shape))


def shape_of(meta: agent_pb2.ArrayMeta) -> tuple[int, ...]:
    """The shape a wire description names."""
    return tuple(int(n) for n in meta.shape)


def array_from_bytes(data: bytes | bytearray | memoryview, meta: agent_pb2.ArrayMeta) -> np.ndarray:
    """A NumPy view of ``data`` as the array ``meta`` describes (no copy).

    Raises:
        UnsupportedDType: a dtype gpupool does not carry.
        FrameDecodeError: a size that does not match the shape.
    """
    dtype = check_dtype(meta.dtype)
    shape = shape_of(meta)
    if any(n < 0 for n in shape):
        raise FrameDecodeError("array", f"negative dimension in shape {shape}")
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise FrameDecodeError(
            "array", f"{len(data)} bytes for {dtype.name}{list(shape)}, expected {expected}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def iter_chunks(array: np.ndarray, chunk_bytes: int = CHUNK_BYTES) -> Iterator[memoryview]:
    """C-order bytes of ``array`` in slices of ``chunk_bytes``, without copying a contiguous array."""
    # A 1-D uint8 view, not memoryview.cast: cast refuses shapes with a zero in them, e.g. (0, 3).
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8).data
    for start in range(0, len(flat), chunk_bytes):
        yield flat[start : start + chunk_bytes]


def op_results(op: agent_pb2.Op) -> list[tuple[str, agent_pb2.ArrayMeta]]:
    """The buffers an op makes, each with its declared result: ``outputs`` and ``expects`` for an op of
    several results (``fori_loop``, a kernel), else ``output`` and ``expect``."""
    if op.outputs:
        return list(zip(op.outputs, op.expects, strict=False))
    return [(op.output, op.expect)]


def op_outputs(op: agent_pb2.Op) -> list[str]:
    """The buffer ids an op makes (see :func:`op_results`)."""
    return list(op.outputs) or [op.output]

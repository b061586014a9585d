"""What an op is given besides its operands, and the checks the op families share.

:class:`Expected` is the result the client declared, :class:`OpArgs` the op's parameters (``Op.params``,
``Op.axes``, ``Op.keepdims`` and the older ``has_axis``/``axis``), :class:`OpSpec` what an op of the table
takes and how it computes. Pure: no backend, no buffers. Malformed parameters are refused with
``bad-request`` (:func:`refuse`), before the op computes anything.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from gpupool._proto.v1 import agent_pb2
from gpupool.protocol.errors import RpcRefusal

__all__ = [
    "MAX_DIMS",
    "VARIADIC",
    "Compute",
    "Expected",
    "OpArgs",
    "OpSpec",
    "check_signature",
    "normalize_axes",
    "normalize_axis",
    "op_args",
    "param_axis",
    "reduced_axes",
    "refuse",
]

#: ``OpSpec.arity`` of an op that takes one operand or more (``concatenate``).
VARIADIC: Final = -1
#: Most dimensions an array may have (NumPy 2's limit); bounds the params of reshape and slice.
MAX_DIMS: Final = 64


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


@dataclass(frozen=True, slots=True)
class OpArgs:
    """An op's parameters.

    Attributes:
        params: op-specific integers (``Op.params``; docs/contracts.md says which op takes which).
        axes: axes of reductions, ``transpose`` and ``squeeze`` (``Op.axes``).
        keepdims: reductions keep the reduced axes with length 1.
        axis: the older single reduction axis (``Op.axis`` when ``Op.has_axis``), None without one.
    """

    params: tuple[int, ...] = ()
    axes: tuple[int, ...] = ()
    keepdims: bool = False
    axis: int | None = None


#: How an op computes: ``(xp, name, operands, expect, args) -> array``. It may return a view of an
#: operand, a non-contiguous array or another dtype; :func:`~gpupool.agent.ops.apply_op` checks the shape,
#: casts and copies as needed.
Compute = Callable[[Any, str, Sequence[Any], Expected, OpArgs], Any]


@dataclass(frozen=True, slots=True)
class OpSpec:
    """One op of the table: what it takes, and how it computes.

    Attributes:
        arity: how many operands (:data:`VARIADIC`: one or more).
        compute: the computation.
        params: the fewest and the most ``params`` it takes.
        axes: whether it takes ``axes`` (and the older ``has_axis``/``axis``).
        keepdims: whether it takes ``keepdims``.
    """

    arity: int
    compute: Compute
    params: tuple[int, int] = (0, 0)
    axes: bool = False
    keepdims: bool = False


def op_args(op: agent_pb2.Op) -> OpArgs:
    """The parameters ``op`` carries."""
    return OpArgs(
        params=tuple(op.params),
        axes=tuple(op.axes),
        keepdims=op.keepdims,
        axis=op.axis if op.has_axis else None,
    )


def refuse(name: str, message: str) -> RpcRefusal:
    """A ``bad-request`` refusal for op ``name`` (to raise)."""
    return RpcRefusal("bad-request", f"op {name!r}: {message}")


def check_signature(name: str, spec: OpSpec, args: OpArgs, operands: int) -> None:
    """Check what an op is given against what it takes: its operand count and which parameters it has.

    ``has_axis`` is ignored on an op that takes no axes, as it always was; ``params``, ``axes`` and
    ``keepdims`` are refused there.

    Raises:
        RpcRefusal: ``bad-request`` for a wrong operand count or parameters the op does not take.
    """
    if spec.arity == VARIADIC:
        if operands < 1:
            raise RpcRefusal("bad-request", f"op {name!r} takes one operand or more, got none")
    elif operands != spec.arity:
        raise RpcRefusal("bad-request", f"op {name!r} takes {spec.arity} operand(s), got {operands}")
    fewest, most = spec.params
    if not fewest <= len(args.params) <= most:
        wanted = f"{fewest}" if fewest == most else f"{fewest} to {most}"
        raise refuse(name, f"takes {wanted} param(s), got {len(args.params)}")
    if args.axes and not spec.axes:
        raise refuse(name, "takes no axes")
    if args.keepdims and not spec.keepdims:
        raise refuse(name, "takes no keepdims")
    if args.axes and args.axis is not None:
        raise refuse(name, "give axes or has_axis, not both")


def normalize_axis(name: str, axis: int, ndim: int) -> int:
    """``axis`` of an array of ``ndim`` dimensions, counted from the start (negative counts from the end).

    Raises:
        RpcRefusal: ``bad-request`` for an axis outside ``[-ndim, ndim)``.
    """
    if not -ndim <= axis < ndim:
        raise refuse(name, f"axis {axis} is out of range for an array of {ndim} dimension(s)")
    return axis % ndim


def normalize_axes(name: str, axes: Sequence[int], ndim: int) -> tuple[int, ...]:
    """Each of ``axes`` normalised (see :func:`normalize_axis`).

    Raises:
        RpcRefusal: ``bad-request`` for an axis out of range or named twice.
    """
    normalized = tuple(normalize_axis(name, axis, ndim) for axis in axes)
    if len(set(normalized)) != len(normalized):
        raise refuse(name, f"axes {tuple(axes)} repeat an axis")
    return normalized


def reduced_axes(name: str, args: OpArgs, ndim: int) -> tuple[int, ...] | None:
    """The axes a reduction reduces, normalised: ``axes``, else the older ``axis``; None for all of them.

    Raises:
        RpcRefusal: ``bad-request`` for an axis out of range or named twice.
    """
    if args.axes:
        return normalize_axes(name, args.axes, ndim)
    if args.axis is not None:
        return (normalize_axis(name, args.axis, ndim),)
    return None


def param_axis(name: str, args: OpArgs, ndim: int) -> int | None:
    """``params[0]`` as an axis, normalised; None (the flattened array) without params.

    Raises:
        RpcRefusal: ``bad-request`` for an axis out of range.
    """
    if not args.params:
        return None
    return normalize_axis(name, args.params[0], ndim)

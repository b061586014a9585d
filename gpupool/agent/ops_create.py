"""Arrays made on the agent, from scalar operands and params: no upload (docs/contracts.md).

The result's shape and dtype are the op's ``expect``; the client sends each shard its part.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np

from gpupool.agent.opargs import Expected, OpArgs, OpSpec, refuse

__all__ = ["TABLE"]

_FLOATS: Final = (np.dtype(np.float32), np.dtype(np.float64))


def _full(xp: Any, name: str, operands: Sequence[Any], expect: Expected, args: OpArgs) -> Any:
    # As numpy.full: the fill value is cast to the dtype, and an array broadcasts to the shape.
    result = xp.empty(expect.shape, expect.dtype)
    result[...] = operands[0]
    return result


def _scalar(name: str, value: Any) -> Any:
    if not isinstance(value, bool | int | float | np.generic):
        raise refuse(name, f"takes scalar operands, got {type(value).__name__}")
    return value


def _arange(xp: Any, name: str, operands: Sequence[Any], expect: Expected, args: OpArgs) -> Any:
    # Element i of a shard whose first element is element `first` of the whole: start + step * (first + i),
    # computed as numpy.arange computes it, so the shards of a whole agree with it exactly.
    start, step = (_scalar(name, value) for value in operands)
    (first,) = args.params
    if len(expect.shape) != 1:
        raise refuse(name, f"makes 1-D arrays, not shape {expect.shape}")
    if first < 0:
        raise refuse(name, f"the first index {first} is negative")
    (length,) = expect.shape
    positions = xp.arange(first, first + length, dtype=np.int64)
    dtype = expect.dtype
    if dtype.kind == "f":
        # NumPy sets elements 0 and 1 to start and start + step, then fills start + i * delta in the
        # dtype, with delta = element 1 - element 0.
        origin, second = dtype.type(start), dtype.type(start + step)
        values = origin + positions.astype(dtype) * (second - origin)
        for position, value in ((0, origin), (1, second)):
            if first <= position < first + length:
                values[position - first] = value
        return values
    if isinstance(start, float | np.floating) or isinstance(step, float | np.floating):
        return start + positions * float(step)
    return start + positions * step


def _generator(xp: Any, seed: int, stream: int) -> Any:
    """A generator of its own for each (seed, stream)."""
    if xp is np:
        # Philox's 256-bit counter starts at stream * 2**128, so shards draw from disjoint blocks of one
        # key's sequence (a counter of just `stream` would give shard k shard 0's numbers shifted by k
        # blocks).
        return np.random.Generator(np.random.Philox(key=seed, counter=stream << 128))
    # CuPy: its Philox4x3210 takes no key or counter; it seeds cuRAND with 32 bits NumPy's SeedSequence
    # derives from [seed, stream] (so streams could collide, rarely), and holds a state of about 16 MiB
    # of device memory while it draws. Its numbers differ from NumPy's for the same seed.
    return xp.random.Generator(xp.random.Philox4x3210(seed=[seed, stream]))


def _random(xp: Any, name: str, operands: Sequence[Any], expect: Expected, args: OpArgs) -> Any:
    seed, stream = args.params
    if seed < 0 or stream < 0:
        raise refuse(name, f"seed {seed} and stream {stream} must not be negative")
    if expect.dtype not in _FLOATS:
        raise refuse(name, f"makes float32 or float64 arrays, not {expect.dtype}")
    generator = _generator(xp, seed, stream)
    if name == "random_uniform":
        low, high = operands
        return low + (high - low) * generator.random(expect.shape, dtype=expect.dtype)
    loc, scale = operands
    return loc + scale * generator.standard_normal(expect.shape, dtype=expect.dtype)


#: The creation ops of the op table.
TABLE: Final[Mapping[str, OpSpec]] = {
    "full": OpSpec(1, _full),
    "arange": OpSpec(2, _arange, params=(1, 1)),
    "random_uniform": OpSpec(2, _random, params=(2, 2)),
    "random_normal": OpSpec(2, _random, params=(2, 2)),
}

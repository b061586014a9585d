"""Random numbers made on the pool's agents (``gp.random``), as ``numpy.random``'s Generator API.

    rng = gp.random.default_rng(0)
    w = rng.standard_normal((4096, 64), dtype=gp.float32)   # drawn where its shards live; nothing uploaded

Each draw runs the op table's ``random_uniform`` or ``random_normal`` on every shard with params
``[seed, stream]``: the stream is the shard's index plus the generator's draw number times
:data:`STREAMS_PER_DRAW`, so shards draw independent numbers and every draw differs from the one before.
The same seed on a pool that lays the array out the same way (the same agents and rows) gives the same
numbers. They are **not** NumPy's numbers for that seed (``numpy.random.default_rng(0)`` draws other
values), and NumPy agents and CuPy agents draw different numbers from each other (docs/contracts.md).

Inside a task that ``pool.map`` traces, a draw is an op of the task's program (``size=None`` gives a 0-d
value): each task draws on its own worker, with no upload.
"""

from __future__ import annotations

import itertools
import secrets
from typing import Any, Final

import numpy as np

from gpupool._errors import UsageError
from gpupool.client.creation import ShapeLike, create, normalize_shape
from gpupool.client.current import current_pool
from gpupool.client.layout import Piece
from gpupool.client.operands import is_scalar, scalar_operand
from gpupool.client.trace import active_recorder
from gpupool.protocol.codec import check_dtype

__all__ = ["STREAMS_PER_DRAW", "Generator", "default_rng"]

#: Streams each draw owns: draw ``k`` uses streams ``[k * STREAMS_PER_DRAW, (k + 1) * STREAMS_PER_DRAW)``,
#: one per shard.
STREAMS_PER_DRAW: Final = 1 << 32
_SEEDS: Final = 1 << 63  # a seed is a non-negative int64 (the op's params)


class Generator:
    """Draws arrays of random numbers on the current pool's agents (see the module's docstring).

    Made by :func:`default_rng`. ``size=None`` draws one number and returns it as a Python float, as
    NumPy's generator does; otherwise a remote float32 or float64 array of that shape.

    Args:
        seed: a non-negative int below 2**63.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._draws = itertools.count()

    def __repr__(self) -> str:
        return f"<gpupool.random.Generator seed={self.seed}>"

    def random(self, size: ShapeLike | None = None, dtype: object = np.float64) -> Any:
        """Uniform numbers in ``[0, 1)``."""
        return self._draw("random_uniform", 0.0, 1.0, size, dtype)

    def uniform(
        self, low: float = 0.0, high: float = 1.0, size: ShapeLike | None = None, dtype: object = np.float64
    ) -> Any:
        """Uniform numbers in ``[low, high)`` (scalar bounds)."""
        return self._draw("random_uniform", low, high, size, dtype)

    def standard_normal(self, size: ShapeLike | None = None, dtype: object = np.float64) -> Any:
        """Numbers from the standard normal distribution."""
        return self._draw("random_normal", 0.0, 1.0, size, dtype)

    def normal(
        self, loc: float = 0.0, scale: float = 1.0, size: ShapeLike | None = None, dtype: object = np.float64
    ) -> Any:
        """Numbers from the normal distribution of mean ``loc`` and standard deviation ``scale`` (scalars).

        Raises:
            UsageError: a negative ``scale``.
        """
        if is_scalar(scale) and float(scale) < 0:
            raise UsageError(f"normal: scale {scale} is negative")
        return self._draw("random_normal", loc, scale, size, dtype)

    def _draw(self, op: str, first: object, second: object, size: ShapeLike | None, dtype: object) -> Any:
        """Raises:
        UnsupportedDType, UsageError: a dtype other than float32 and float64, array parameters, a bad size.
        NoCapacity, PlacementError, RemoteError: the pool cannot take it.
        """
        target = check_dtype(dtype)
        if target.kind != "f":
            raise UsageError(f"random numbers come in float32 or float64, not {target}")
        if not (is_scalar(first) and is_scalar(second)):
            raise UsageError("the pool's generator takes scalar parameters, not arrays")
        shape = (1,) if size is None else normalize_shape(size)
        operands = [scalar_operand(first), scalar_operand(second)]
        base = next(self._draws) * STREAMS_PER_DRAW
        if base >= _SEEDS:
            raise UsageError("this generator has drawn as many times as it can: make another")

        recorder = active_recorder()
        if recorder is not None:  # inside a task being traced: drawn by the task's own program
            drawn = recorder.record(
                op, operands, target, () if size is None else shape, params=[self.seed, base]
            )
            return drawn

        def params(index: int, piece: Piece) -> list[int]:
            return [self.seed, base + index]

        array = create(current_pool()._session, shape, target, op, lambda piece: operands, params=params)
        return float(array.get()[0]) if size is None else array


def default_rng(seed: int | None = None) -> Generator:
    """A :class:`Generator` drawing on the pool's agents; ``seed=None`` picks a random seed.

    Raises:
        UsageError: a seed that is not an int in ``[0, 2**63)``.
    """
    if seed is None:
        seed = secrets.randbelow(_SEEDS)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed < _SEEDS:
        raise UsageError(f"a seed is an int in [0, 2**63), not {seed!r}")
    return Generator(int(seed))

"""New homes for the buffers of an agent being drained: which worker of the other ready agents takes each.

Pure and synchronous, tested without a network (the coordinator's :mod:`gpupool.coordinator.evacuator` does
the moving). A buffer moves whole, keeping its session and id, so it needs one worker with room for all of it:
the largest buffers are placed first, each on the worker with the most room left (so buffers spread over the
pool rather than fill one worker), preferring a worker of the buffer's own backend (a CuPy buffer stays on a
GPU where one has room: a user's kernels run only there), then any. A buffer no worker has room for gets no
home and stays where it is.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Room", "plan_homes"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Room:
    """A worker that may take moved buffers.

    Attributes:
        free: bytes it can take (its limit less what it holds and what was placed on it unreported).
        backend: ``"cupy"`` or ``"numpy"`` ("" if unknown).
    """

    free: int
    backend: str = ""


def plan_homes(
    sizes: Sequence[int],
    backends: Sequence[str],
    rooms: Sequence[Room],
    *,
    avoid: Mapping[int, Collection[int]] | None = None,
) -> list[int | None]:
    """The worker (an index into ``rooms``) each buffer moves to, or None where none has room.

    Args:
        sizes: each buffer's bytes.
        backends: each buffer's backend now (its worker's), "" if unknown.
        rooms: the workers that may take buffers.
        avoid: by buffer index, workers that buffer must not go to (ones that refused it before).

    Raises:
        ValueError: ``sizes`` and ``backends`` differ in length, or a size or free figure is negative.
    """
    if len(sizes) != len(backends):
        raise ValueError(f"{len(sizes)} sizes but {len(backends)} backends")
    if any(size < 0 for size in sizes):
        raise ValueError("a buffer of negative size")
    left = [max(room.free, 0) for room in rooms]
    avoid = avoid or {}
    homes: list[int | None] = [None] * len(sizes)
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        size, backend = sizes[index], backends[index]
        barred = avoid.get(index, ())
        fitting = [w for w in range(len(rooms)) if left[w] >= size and w not in barred]
        alike = [w for w in fitting if backend and rooms[w].backend == backend]
        pool = alike or fitting
        if not pool:
            continue
        home = max(pool, key=lambda w: (left[w], -w))  # the most room left; the first worker on a tie
        homes[index] = home
        left[home] -= size
    return homes

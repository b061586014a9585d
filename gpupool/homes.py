"""New homes for the buffers of an agent being drained: which worker of the other ready agents takes each.

Pure and synchronous, tested without a network (the coordinator's :mod:`gpupool.coordinator.evacuator` does
the moving). A buffer moves whole, keeping its session and id, so it needs one worker with room for all of it:
the largest buffers are placed first, each on the worker with the most room left (so buffers spread over the
pool rather than fill one worker), preferring a worker of the buffer's own backend (a CuPy buffer stays on a
GPU where one has room: a user's kernels run only there), then any. A buffer no worker has room for gets no
home and stays where it is.

Buffers of one group (a session's buffers on one worker, which its programs read together: a program runs
on one worker and reads only that worker's buffers) move together, to one worker with room for all of them,
or stay together; a group that went somewhere in an earlier round goes there again when it can.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

__all__ = ["Room", "plan_homes"]

K = TypeVar("K", bound=Hashable)


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
    groups: Sequence[K] | None = None,
    prefer: Mapping[K, int] | None = None,
) -> list[int | None]:
    """The worker (an index into ``rooms``) each buffer moves to, or None where none has room.

    Args:
        sizes: each buffer's bytes.
        backends: each buffer's backend now (its worker's), "" if unknown.
        rooms: the workers that may take buffers.
        avoid: by buffer index, workers that buffer must not go to (ones that refused it before).
        groups: each buffer's group (default: each its own); a group's buffers get one home, or none.
        prefer: by group, the worker it should go to if it has room (where it went before).

    Raises:
        ValueError: ``sizes`` and ``backends`` differ in length, or a size or free figure is negative.
    """
    if len(sizes) != len(backends):
        raise ValueError(f"{len(sizes)} sizes but {len(backends)} backends")
    if any(size < 0 for size in sizes):
        raise ValueError("a buffer of negative size")
    left = [max(room.free, 0) for room in rooms]
    avoid = avoid or {}
    preferred: dict[Hashable, int] = {key: worker for key, worker in (prefer or {}).items()}
    keys: Sequence[Hashable] = groups if groups is not None else range(len(sizes))
    if len(keys) != len(sizes):
        raise ValueError(f"{len(sizes)} sizes but {len(keys)} groups")
    members: dict[Hashable, list[int]] = {}
    for index, key in enumerate(keys):
        members.setdefault(key, []).append(index)
    homes: list[int | None] = [None] * len(sizes)
    total = {key: sum(sizes[i] for i in found) for key, found in members.items()}
    for key in sorted(members, key=lambda k: (-total[k], members[k][0])):
        found = members[key]
        size = total[key]
        backend = next((backends[i] for i in found if backends[i]), "")
        barred = {w for i in found for w in avoid.get(i, ())}
        fitting = [w for w in range(len(rooms)) if left[w] >= size and w not in barred]
        alike = [w for w in fitting if backend and rooms[w].backend == backend]
        pool = alike or fitting
        if not pool:
            continue
        wanted = preferred.get(key)
        # Where it went before; else the most room left (the first worker on a tie).
        home = wanted if wanted in pool else max(pool, key=lambda w: (left[w], -w))
        for index in found:
            homes[index] = home
        left[home] -= size
    return homes

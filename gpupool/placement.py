"""Where the rows of a new array go: pure, synchronous functions, tested without a network.

:func:`place_rows` takes the workers of the ready agents and their free memory and gives contiguous row
ranges, one per worker that gets any rows. :func:`split_rows` is its arithmetic on plain lists, for a
caller that already holds the workers in layout order: the coordinator, which places over every ready
worker of the pool on each Place call and so keeps its per-worker Python work small.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from gpupool._errors import NoCapacity, PlacementError

__all__ = [
    "BACKENDS",
    "MIN_SHARD_BYTES",
    "SPEED_TOLERANCE",
    "RowShard",
    "WorkerCapacity",
    "agents_without_backend",
    "place_rows",
    "split_rows",
]

#: The backends a placement may ask for ("" for any).
BACKENDS = ("", "cupy", "numpy")

#: Measured speeds within this fraction of each other count as one speed (:func:`split_rows`): the spread
#: of repeated measurements of one card on a busy host.
SPEED_TOLERANCE = 0.25

#: The coordinator's default smallest shard worth its own worker: below it, one more round trip per op
#: costs more than the parallel work saves (a 1,000-element array goes to one worker, not two).
MIN_SHARD_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class WorkerCapacity:
    """One worker that may take rows, and how much memory it has free.

    Attributes:
        agent_id: the agent the worker belongs to.
        endpoint: the agent's data-plane address, ``host:port``.
        worker: the worker's index on that agent.
        free_bytes: memory the worker can still take (a negative figure counts as zero).
    """

    agent_id: str
    endpoint: str
    worker: int
    free_bytes: int


@dataclass(frozen=True, slots=True)
class RowShard:
    """Rows ``[start, stop)`` of an array, to be held by one worker.

    Attributes:
        agent_id: the agent that holds the rows.
        endpoint: the agent's data-plane address.
        worker: the worker's index on that agent.
        start: the first row.
        stop: one past the last row.
    """

    agent_id: str
    endpoint: str
    worker: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        """How many rows the shard holds."""
        return self.stop - self.start


def place_rows(
    rows: int, row_bytes: int, workers: Sequence[WorkerCapacity], *, min_shard_bytes: int = 0
) -> list[RowShard]:
    """Split ``rows`` rows of ``row_bytes`` bytes each over ``workers``, in proportion to free memory.

    The shards are contiguous, cover ``[0, rows)`` and are laid out in (agent id, worker) order; the
    same inputs, in any order, give the same split. Shares are rounded by largest remainder and never
    put more rows on a worker than its free memory holds. With fewer rows than workers, the workers
    with the most free memory get one row each; zero rows give one empty shard on the worker with the
    most free memory. Workers that get no rows are left out. Ties in free memory or in remainder go
    to the worker laid out first. With ``min_shard_bytes``, an array uses only as many workers (those with
    the most free memory, enough to hold it) as it has ``min_shard_bytes`` to give each.

    Raises:
        PlacementError: no workers, a worker listed twice, or a negative row count or row size (the
            caller's bug or a bad request; the coordinator refuses the call).
        NoCapacity: the workers' free memory cannot hold every row (the client handles it, e.g. by
            freeing arrays).
    """
    if rows < 0 or row_bytes < 0:
        raise PlacementError(f"cannot place {rows} rows of {row_bytes} bytes")
    if not workers:
        raise PlacementError("no ready workers to place rows on")
    keys = [(w.agent_id, w.worker, w.endpoint) for w in workers]
    laid_out = [workers[i] for i in sorted(range(len(workers)), key=keys.__getitem__)]
    if len({(w.agent_id, w.worker) for w in laid_out}) < len(laid_out):
        raise PlacementError("the same worker is listed twice")
    split = split_rows(rows, row_bytes, [w.free_bytes for w in laid_out], min_shard_bytes=min_shard_bytes)
    shards = []
    for position, start, stop in split:
        worker = laid_out[position]
        shards.append(RowShard(worker.agent_id, worker.endpoint, worker.worker, start, stop))
    return shards


def agents_without_backend(agents: Iterable[tuple[str, str, Sequence[str]]], backend: str) -> list[str]:
    """The ids of the agents that cannot take work needing ``backend`` ("" needs none: no agent).

    ``agents`` gives each agent's id, its status's backend and its workers' backends; an agent takes the
    work only if every worker of it runs ``backend`` (a worker that names none runs the agent's).

    Raises:
        PlacementError: a backend other than those of :data:`BACKENDS`.
    """
    if backend not in BACKENDS:
        raise PlacementError(f"unknown backend {backend!r}; known: 'cupy', 'numpy' or '' for any")
    if not backend:
        return []
    return [
        agent_id
        for agent_id, agent_backend, worker_backends in agents
        if (agent_backend != backend and not worker_backends)
        or any((w or agent_backend) != backend for w in worker_backends)
    ]


def split_rows(
    rows: int,
    row_bytes: int,
    free: Sequence[int],
    *,
    min_shard_bytes: int = 0,
    speed: Sequence[float] | None = None,
) -> list[tuple[int, int, int]]:
    """:func:`place_rows` for workers already in layout order, given only their free bytes.

    Returns ``(position, start, stop)`` for each worker that gets a shard, by position, so the caller
    maps positions back to its own workers. The rules are :func:`place_rows`'s; runs in O(n log n) for
    n workers with little Python work per worker (about a millisecond for 1,000 workers here).

    With ``speed`` (each worker's measured throughput, e.g. GEMM GFLOP/s), shares go by speed instead of
    free memory, still within each worker's free memory (what a fast worker cannot hold goes to the others
    with room), and ``min_shard_bytes`` picks the fastest workers; if any worker with room has no figure
    (0: not measured), free memory decides for all, as without ``speed``.

    Raises:
        PlacementError: no workers, or a negative row count or row size.
        NoCapacity: the free memory cannot hold every row.
    """
    if rows < 0 or row_bytes < 0:
        raise PlacementError(f"cannot place {rows} rows of {row_bytes} bytes")
    if not free:
        raise PlacementError("no ready workers to place rows on")
    # Orders below are sorts of positions by a list's __getitem__ (no Python-level key function); ties
    # keep the lower position, since Python's sort is stable, with reverse=True too.
    room = [f if f > 0 else 0 for f in free]  # negative: placed since the last report; counts as none
    capacity = [rows] * len(room) if row_bytes == 0 else [f // row_bytes for f in room]
    if sum(capacity) < rows:
        raise NoCapacity(rows * row_bytes, sum(room), len(room))
    if rows == 0:
        return [(max(range(len(room)), key=room.__getitem__), 0, 0)]  # max() keeps the first of equals
    usable = [i for i, c in enumerate(capacity) if c > 0]
    weight: Sequence[float] = room
    if speed is not None:
        if len(speed) != len(room):
            raise PlacementError(f"{len(speed)} speeds for {len(room)} workers")
        if usable and all(speed[i] > 0 for i in usable):
            weight = _settled(speed, usable)
    if min_shard_bytes > 0 and row_bytes > 0:
        usable = _fewest(usable, rows, max(1, rows * row_bytes // min_shard_bytes), weight, capacity)
    if rows < len(usable):
        counts = [0] * len(room)
        for i in sorted(usable, key=weight.__getitem__, reverse=True)[:rows]:
            counts[i] = 1
    else:
        counts = _proportional(rows, usable, weight, capacity)
    split: list[tuple[int, int, int]] = []
    start = 0
    for i, count in enumerate(counts):
        if count:
            split.append((i, start, start + count))
            start += count
    return split


def _settled(speed: Sequence[float], usable: list[int]) -> list[float]:
    """Speeds with measurement noise taken out: from the slowest up, workers within
    :data:`SPEED_TOLERANCE` of the slowest of their group share the group's mean (two like cards measured
    12% apart while they shared a machine's cores must still get equal shares)."""
    settled = list(speed)
    group: list[int] = []
    for i in sorted(usable, key=speed.__getitem__):
        if group and speed[i] > speed[group[0]] * (1 + SPEED_TOLERANCE):
            mean = sum(speed[j] for j in group) / len(group)
            for j in group:
                settled[j] = mean
            group = []
        group.append(i)
    if group:
        mean = sum(speed[j] for j in group) / len(group)
        for j in group:
            settled[j] = mean
    return settled


def _fewest(
    usable: list[int], rows: int, wanted: int, weight: Sequence[float], capacity: list[int]
) -> list[int]:
    """At least ``wanted`` of ``usable`` (heaviest first: most free memory, or fastest), more while they
    cannot hold ``rows``; returned in position order."""
    if wanted >= len(usable):
        return usable
    chosen = sorted(usable, key=weight.__getitem__, reverse=True)
    count, held = 0, 0
    while count < len(chosen) and (count < wanted or held < rows):
        held += capacity[chosen[count]]
        count += 1
    return sorted(chosen[:count])


def _proportional(rows: int, usable: list[int], weight: Sequence[float], capacity: list[int]) -> list[int]:
    """Rows per position: largest-remainder shares of ``rows`` by ``weight`` (free memory, or speed), within
    each capacity.

    ``usable`` lists the positions with room for a row, in order; their capacities add up to at least
    ``rows``. Positions outside ``usable`` get none.
    """
    if any(isinstance(weight[i], float) for i in usable):
        # Speeds: whole numbers in proportion (a millionth of the fastest as the unit), so that the
        # shares below stay exact integer arithmetic.
        top = max(weight[i] for i in usable) or 1.0
        weight = [round(w / top * 1_000_000) for w in weight]
    total = sum(weight[i] for i in usable)
    weights = [0] * len(capacity)
    for i in usable:
        weights[i] = int(weight[i]) if total > 0 else 1
    counts = [0] * len(capacity)
    remainders = [0] * len(capacity)
    # Water-filling: a worker whose share its memory cannot hold keeps what it can, and the rest is shared
    # again among the others by the same weights (at most one pass per worker clipped).
    active = list(usable)
    to_share = rows
    while active:
        weight_sum = sum(weights[i] for i in active) or len(active)
        clipped = [i for i in active if to_share * (weights[i] or 1) >= capacity[i] * weight_sum]
        if not clipped or len(clipped) == len(active):
            break
        for i in clipped:
            counts[i] = capacity[i]
            to_share -= capacity[i]
        active = [i for i in active if i not in set(clipped)]
    weight_sum = sum(weights[i] for i in active) or 1
    for i in active:
        share, remainders[i] = divmod(to_share * weights[i], weight_sum)
        counts[i] = min(share, capacity[i])
    left = rows - sum(counts)
    if left == 0:
        return counts
    # Largest remainder first; among equal remainders, the heaviest first, then position.
    most_free_first = sorted(usable, key=weights.__getitem__, reverse=True)
    for i in sorted(most_free_first, key=remainders.__getitem__, reverse=True):
        if left == 0:
            break
        if counts[i] < capacity[i]:
            counts[i] += 1
            left -= 1
    while left > 0:  # only when capacity clipped a share: fill whoever has the most room left
        roomiest = max(most_free_first, key=lambda i: capacity[i] - counts[i])
        take = min(left, capacity[roomiest] - counts[roomiest])
        counts[roomiest] += take
        left -= take
    return counts

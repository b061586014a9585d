"""Where the rows of a new array go: pure, synchronous functions, tested without a network.

The coordinator calls :func:`place_rows` with the workers of its ready agents and their free memory;
the result is a list of contiguous row ranges, one per worker that gets any rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gpupool._errors import NoCapacity, PlacementError

__all__ = ["RowShard", "WorkerCapacity", "place_rows"]


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


def _order(worker: WorkerCapacity) -> tuple[str, int, str]:
    """The order shards are laid out in: by agent, then worker, whatever order the caller gave."""
    return (worker.agent_id, worker.worker, worker.endpoint)


def _largest_first(worker: WorkerCapacity) -> tuple[int, str, int, str]:
    """Most free memory first; ties broken by agent and worker so the choice is deterministic."""
    return (-worker.free_bytes, *_order(worker))


def place_rows(rows: int, row_bytes: int, workers: Sequence[WorkerCapacity]) -> list[RowShard]:
    """Split ``rows`` rows of ``row_bytes`` bytes each over ``workers``, in proportion to free memory.

    The shards are contiguous, cover ``[0, rows)`` and are laid out in (agent id, worker) order; the
    same inputs, in any order, give the same split. Shares are rounded by largest remainder and never
    put more rows on a worker than its free memory holds. With fewer rows than workers, the workers
    with the most free memory get one row each; zero rows give one empty shard on the worker with the
    most free memory. Workers that get no rows are left out.

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
    if len({(w.agent_id, w.worker) for w in workers}) < len(workers):
        raise PlacementError("the same worker is listed twice")
    # Normalise negative free memory (placed since the last report) to zero.
    pool = sorted(
        (w if w.free_bytes >= 0 else WorkerCapacity(w.agent_id, w.endpoint, w.worker, 0) for w in workers),
        key=_largest_first,
    )
    capacity = {w: (rows if row_bytes == 0 else w.free_bytes // row_bytes) for w in pool}
    if sum(capacity.values()) < rows:
        raise NoCapacity(rows * row_bytes, sum(w.free_bytes for w in pool), len(pool))
    usable = [w for w in pool if capacity[w] > 0]
    if rows == 0:
        counts = {pool[0]: 0}
    elif rows < len(usable):
        counts = dict.fromkeys(usable[:rows], 1)
    else:
        counts = _proportional(rows, usable, capacity)
    shards: list[RowShard] = []
    start = 0
    for worker in sorted(counts, key=_order):
        count = counts[worker]
        if count == 0 and rows > 0:
            continue
        shards.append(RowShard(worker.agent_id, worker.endpoint, worker.worker, start, start + count))
        start += count
    return shards


def _proportional(
    rows: int, usable: list[WorkerCapacity], capacity: dict[WorkerCapacity, int]
) -> dict[WorkerCapacity, int]:
    """Largest-remainder shares of ``rows`` by free memory, each at most the worker's capacity.

    ``usable`` is sorted most free memory first and the capacities add up to at least ``rows``.
    """
    total = sum(w.free_bytes for w in usable)
    weights = {w: (w.free_bytes if total > 0 else 1) for w in usable}
    weight_sum = sum(weights.values())
    counts = {w: min(rows * weights[w] // weight_sum, capacity[w]) for w in usable}
    left = rows - sum(counts.values())
    # Largest remainder first; a stable sort keeps most-free-memory-first among equal remainders.
    by_remainder = sorted(usable, key=lambda w: -(rows * weights[w] % weight_sum))
    for worker in by_remainder:
        if left == 0:
            break
        if counts[worker] < capacity[worker]:
            counts[worker] += 1
            left -= 1
    while left > 0:  # only when capacity clipped a share: fill whoever has the most room left
        roomiest = max(usable, key=lambda w: capacity[w] - counts[w])
        take = min(left, capacity[roomiest] - counts[roomiest])
        counts[roomiest] += take
        left -= take
    return counts

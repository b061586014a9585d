"""Batched work in waves that fit the agents' memory: :func:`gpupool.persist` and :func:`gpupool.compute`
of many chains.

One round of programs carries every chain asked for, and an agent reserves the output of every op of a
program before it runs it (intermediates included, until the program ends), so a batch whose chains each
fit may not fit together. Here each chain's footprint is worked out from its graph (shapes and dtypes are
known on the client): the bytes its ops reserve on each worker, and the part that stays resident. The
chains are then grouped, in order, into waves that fit the workers' free memory; whatever is kept by one
wave counts against the next. Planning is pure; :func:`run_in_waves` runs the waves through a callable,
and splits a wave that an agent still refuses for memory (its figures were stale, another session took
memory) in halves, down to one chain.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, TypeVar

from gpupool._errors import DeviceOutOfMemory
from gpupool._proto.v1 import coordinator_pb2
from gpupool.client.graph import GraphArray, pending_arrays
from gpupool.client.layout import Place
from gpupool.client.session import Session
from gpupool.client.values import PendingValue, Request

__all__ = [
    "HEADROOM",
    "WAVE_CHECK_BYTES",
    "Chain",
    "array_chain",
    "footprint",
    "free_by_place",
    "plan_waves",
    "requests_chain",
    "run_in_waves",
    "total_bytes",
]

#: The share of a worker's reported free memory a wave plans to use: the report is a few seconds old
#: (uploads since are not in it) and other sessions share the worker.
HEADROOM: Final = 0.75
#: A batch that reserves less than this on every worker runs as one wave without asking for free memory.
WAVE_CHECK_BYTES: Final = 1 << 20

T = TypeVar("T")
V = TypeVar("V", bound="GraphArray | PendingValue")


@dataclass(frozen=True, slots=True)
class Chain:
    """What one chain of a batch needs on each worker (by ``(endpoint, worker)`` place).

    Attributes:
        peak: bytes its ops reserve there while its programs run.
        kept: the part of ``peak`` that stays resident afterwards (a persisted array).
    """

    peak: Mapping[Place, int] = field(default_factory=dict)
    kept: Mapping[Place, int] = field(default_factory=dict)


def _shard_bytes(array: GraphArray) -> Iterable[tuple[Place, int]]:
    """Each shard's place and size in bytes."""
    row_bytes = array.dtype.itemsize * math.prod(array.shape[1:])
    return ((piece.place, (piece.stop - piece.start) * row_bytes) for piece in array.layout)


def _pending_bytes(arrays: Iterable[GraphArray], peak: dict[Place, int]) -> None:
    """Add to ``peak`` the bytes of every pending array the graphs of ``arrays`` compute, each once (a
    program emits a shared node once)."""
    for array in pending_arrays(arrays):
        for place, nbytes in _shard_bytes(array):
            peak[place] += nbytes


def array_chain(array: GraphArray, *, keep: bool = True) -> Chain:
    """The footprint of computing ``array`` (none if it is resident); with ``keep``, its own shards stay."""
    peak: dict[Place, int] = defaultdict(int)
    _pending_bytes([array], peak)
    kept: dict[Place, int] = defaultdict(int)
    if keep and array.node is not None:
        for place, nbytes in _shard_bytes(array):
            kept[place] += nbytes
    return Chain(dict(peak), dict(kept))


def requests_chain(requests: Sequence[Request]) -> Chain:
    """The footprint of a pending value's partials: the pending graphs they read, the prepared copies
    (``isnan`` of each shard) and the partials, all freed when the program ends."""
    peak: dict[Place, int] = defaultdict(int)
    _pending_bytes([request.array for request in requests], peak)
    for request in requests:
        array = request.array
        for piece in array.layout:
            rows = piece.stop - piece.start
            if not rows:
                continue
            if request.prepare is not None:
                peak[piece.place] += rows * math.prod(array.shape[1:])  # a bool per element
            peak[piece.place] += request.dtype.itemsize * math.prod(request.partial_shape(rows))
    return Chain(dict(peak), {})


def free_by_place(records: Iterable[coordinator_pb2.AgentRecord]) -> dict[Place, int]:
    """Each worker's free bytes (its limit less what its buffers hold) from the coordinator's registry
    records, the latest telemetry winning over the status."""
    limit: dict[Place, int] = {}
    used: dict[Place, int] = {}
    for record in records:
        endpoint = record.status.endpoint
        for worker in record.status.workers:
            limit[endpoint, worker.index] = worker.memory_limit
            used[endpoint, worker.index] = worker.memory_used
        if record.HasField("telemetry"):
            for reported in record.telemetry.workers:
                place = (endpoint, reported.index)
                limit[place] = reported.memory_limit or limit.get(place, 0)
                used[place] = reported.memory_used
    return {place: limit[place] - used[place] for place in limit}


def plan_waves(
    chains: Sequence[Chain], free: Mapping[Place, int], *, headroom: float = HEADROOM
) -> list[list[int]]:
    """Group the chains, in order, into waves whose peaks fit ``headroom`` of each worker's ``free`` bytes;
    returns the chains' indices, wave by wave.

    What a wave keeps is taken from the budget of the waves after it. A chain that does not fit even on
    its own gets a wave of its own (the agent decides). Workers missing from ``free`` are not limited.
    """
    budget = {place: max(0.0, nbytes * headroom) for place, nbytes in free.items()}
    waves: list[list[int]] = []
    current: list[int] = []
    load: dict[Place, int] = defaultdict(int)
    held: dict[Place, int] = defaultdict(int)  # kept by the chains of the current wave
    for index, chain in enumerate(chains):
        fits = all(
            load[place] + nbytes <= budget[place] for place, nbytes in chain.peak.items() if place in budget
        )
        if current and not fits:
            waves.append(current)
            for place, nbytes in held.items():
                if place in budget:
                    budget[place] = max(0.0, budget[place] - nbytes)
            current, load, held = [], defaultdict(int), defaultdict(int)
        current.append(index)
        for place, nbytes in chain.peak.items():
            load[place] += nbytes
        for place, nbytes in chain.kept.items():
            held[place] += nbytes
    if current:
        waves.append(current)
    return waves


def _graph_bytes(arrays: Iterable[GraphArray]) -> int:
    """The bytes of every pending array the graphs of ``arrays`` compute, each once, over all workers."""
    seen: set[int] = set()
    stack = list(arrays)
    total = 0
    while stack:
        array = stack.pop()
        node = array.node
        if node is None or id(array) in seen:
            continue
        seen.add(id(array))
        total += array.dtype.itemsize * math.prod(array.shape)
        stack.extend(arg for arg in node.args if isinstance(arg, GraphArray))
    return total


def total_bytes(item: GraphArray | PendingValue) -> int:
    """What :func:`footprint` of ``item`` reserves over all workers together (a bound of what it reserves
    on any one), worked out without a per-worker breakdown."""
    if isinstance(item, GraphArray):
        return _graph_bytes([item])
    total = _graph_bytes([request.array for request in item.requests])
    for request in item.requests:
        array = request.array
        if request.prepare is not None:
            total += math.prod(array.shape)
        partial = request.dtype.itemsize * math.prod(request.partial_shape(max(array.shape[0], 1)))
        total += partial * len(array.layout)
    return total


def footprint(item: GraphArray | PendingValue) -> Chain:
    """An array's chain (kept once computed) or a pending value's (nothing kept)."""
    return array_chain(item) if isinstance(item, GraphArray) else requests_chain(item.requests)


def run_in_waves(
    session: Session, items: Sequence[V], run: Callable[[Sequence[V]], None], *, headroom: float = HEADROOM
) -> None:
    """Run ``items`` (pending arrays to keep, pending values) through ``run``, in waves that fit.

    A batch of one item, or one that reserves less than :data:`WAVE_CHECK_BYTES` in all, is one wave. Else
    the workers' free memory is asked of ``session``'s coordinator (a ListAgents call): a batch whose
    total fits ``headroom`` of the worker with the least is one wave still; otherwise :func:`plan_waves`
    groups the footprints of the items (:func:`footprint`).

    Raises:
        DeviceOutOfMemory: one item alone does not fit (a wave the agents refuse is split in halves first,
            down to single items). Whatever ``run`` raises otherwise. Waves before the failing one stay
            done.
    """
    waves = [list(range(len(items)))] if items else []
    if len(items) > 1:
        total = sum(total_bytes(item) for item in items)
        if total >= WAVE_CHECK_BYTES:
            free = free_by_place(session.list_agents())
            if total > headroom * min(free.values(), default=0):
                waves = plan_waves([footprint(item) for item in items], free, headroom=headroom)
    for wave in waves:
        _run_splitting([items[i] for i in wave], run)


def _run_splitting(items: Sequence[T], run: Callable[[Sequence[T]], None]) -> None:
    """``run(items)``; if an agent refuses it for memory, each half on its own (a failed round keeps
    nothing, so it can be run again)."""
    try:
        run(items)
    except DeviceOutOfMemory:
        if len(items) == 1:
            raise
        half = len(items) // 2
        _run_splitting(items[:half], run)
        _run_splitting(items[half:], run)

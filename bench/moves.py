"""Moves between agents: a 256 MiB array's two row halves, one on each of 2 agents, swap places, each agent
pulling the other's half straight from it (``Pull``; the client sends two requests, not the bytes), on an
open pool and on a secure one (TLS, capabilities). The baseline is Dask moving the same two blocks between
its 2 workers (a LocalCluster of 2 x 1, processes): a task pinned to the other worker for each block, so the
worker fetches it from its holder, as a computation's dependencies move; plaintext for the open pool, TLS
(Dask's ``Security.temporary()``) for the secure one, which is also shown against plaintext Dask.

Each contender's rounds interleave with the other's, the first alternating, so load from elsewhere lands
on all alike; the moved rows are checked against the host array once.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any

import numpy as np

from bench._pools import local_gpupool
from bench.common import Context, Result
from bench.transfer import _Dask, _sample
from gpupool.client.array import from_spec
from gpupool.client.graph import ArraySpec
from gpupool.client.layout import Piece
from gpupool.client.rowmoves import reshard

SECTION = "moves"


def _same(block: Any) -> Any:
    """A Dask task that returns its input: run on the other worker, it makes that worker fetch the block."""
    return block


class _GpupoolSwap:
    """Both halves of a resident array swap agents: each target pulls its rows from the other agent."""

    def __init__(self, host: np.ndarray, *, secure: bool, name: str) -> None:
        self.name = name
        self._host = host
        self._secure = secure
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> _GpupoolSwap:
        pool = self._stack.enter_context(local_gpupool(secure=self._secure))
        half = self._host.shape[0] // 2
        self._x = pool.asarray(self._host, rows=[half, self._host.shape[0] - half])
        self._pieces = self._x.layout
        if len({p.agent_id for p in self._pieces}) != 2:
            self._stack.close()
            raise RuntimeError(f"{self.name}: expected the halves on 2 agents")
        self._check()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()

    def _targets(self) -> list[Piece]:
        session = self._x.session
        first, second = self._pieces
        return [
            Piece(
                agent_id=other.agent_id,
                endpoint=other.endpoint,
                worker=other.worker,
                start=mine.start,
                stop=mine.stop,
                buffer_id=session.new_buffer_id(),
            )
            for mine, other in ((first, second), (second, first))
        ]

    def _check(self) -> None:
        session = self._x.session
        moved = reshard(self._x, self._targets())
        array = from_spec(ArraySpec(session=session, shape=self._x.shape, dtype=self._x.dtype, layout=moved))
        if not np.array_equal(array.get(), self._host):
            raise RuntimeError(f"{self.name}: the moved rows differ from the uploaded ones")
        array.free()

    def move(self) -> float:
        session = self._x.session
        targets = self._targets()
        start = time.perf_counter()
        reshard(self._x, targets)
        elapsed = time.perf_counter() - start
        session.run(session.free_now(targets), timeout=session.timeouts.rpc, what="free")
        return elapsed


class _DaskSwap:
    """Two blocks, freshly scattered one to each worker of a LocalCluster of 2 x 1 (untimed), each then
    fetched by the other worker (timed). Fresh blocks each round: a fetched block stays on the fetching
    worker as a replica, so fetching the same one again would move nothing. ``secure``: TLS everywhere."""

    def __init__(self, host: np.ndarray, *, secure: bool = False) -> None:
        self._parts = np.split(host, [host.shape[0] // 2])
        self._secure = secure
        self.name = "Dask TLS" if secure else "Dask"

    def __enter__(self) -> _DaskSwap:
        from bench.workloads import _dask_cluster

        self._cluster, self._client = _dask_cluster(secure=self._secure)
        self._workers = sorted(self._client.scheduler_info()["workers"])
        if len(self._workers) != 2:
            self.__exit__()
            raise RuntimeError(f"Dask: expected 2 workers, got {self._workers}")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._client.close()
        self._cluster.close()

    def move(self) -> float:
        from distributed import wait

        client = self._client
        blocks = [
            client.scatter(part, workers=[worker], hash=False)
            for part, worker in zip(self._parts, self._workers, strict=True)
        ]
        wait(blocks)
        start = time.perf_counter()
        moved = [
            client.submit(_same, block, workers=[other], allow_other_workers=False, pure=False)
            for block, other in zip(blocks, self._workers[::-1], strict=True)
        ]
        wait(moved)
        elapsed = time.perf_counter() - start
        client.cancel([*moved, *blocks])
        return elapsed


def run(ctx: Context) -> list[Result]:
    """GB/s of the swap through gpupool (open and secure) and Dask, and the ratios."""
    mib = 16 if ctx.quick else 256
    host = _sample(mib << 20)
    with contextlib.ExitStack() as stack:
        contenders: list[Any] = [
            stack.enter_context(_GpupoolSwap(host, secure=False, name="gpupool")),
            stack.enter_context(_GpupoolSwap(host, secure=True, name="gpupool TLS")),
        ]
        dask = _Dask.available()
        if dask:
            contenders.append(stack.enter_context(_DaskSwap(host)))
            contenders.append(stack.enter_context(_DaskSwap(host, secure=True)))
        samples: dict[str, list[float]] = {c.name: [] for c in contenders}
        for round_ in range(ctx.repeats + 1):
            for contender in contenders if round_ % 2 else contenders[::-1]:
                elapsed = contender.move()
                if round_:  # round 0 is the warm-up
                    samples[contender.name].append(elapsed)

    def gbps(name: str) -> float:
        return host.nbytes / statistics.median(samples[name]) / 1e9

    note = f"both halves swap agents; median of {ctx.repeats} after a warm-up run"
    results = []
    # Each pool against Dask secured alike; the secure pool against plaintext Dask too (no target).
    rows = [("gpupool", "Dask", 1.0), ("gpupool TLS", "Dask TLS", 1.0), ("gpupool TLS", "Dask", None)]
    for name, baseline, target in rows:
        secure = name.endswith("TLS")
        results.append(
            Result(
                SECTION,
                f"move {mib} MiB float32 between 2 agents{', TLS' if secure else ''}",
                gbps(name),
                "GB/s",
                baseline_name=f"{baseline} worker to worker" if dask else "",
                baseline=gbps(baseline) if dask else None,
                target=target if dask else None,
                note=note,
                samples=[host.nbytes / s / 1e9 for s in samples[name]],
            )
        )
    return results

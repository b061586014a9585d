"""Waves of batched work (gpupool.client.waves): the pure planning without a network, then gp.compute and
gp.persist on a pool of two agents with 8 MiB each, where the same batch in one round runs out of memory."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gpupool as gp
from gpupool._proto.v1 import control_pb2, coordinator_pb2
from gpupool.client.graph import GraphArray, Node, materialize
from gpupool.client.layout import Piece
from gpupool.client.values import Request
from gpupool.client.waves import (
    Chain,
    array_chain,
    footprint,
    free_by_place,
    plan_waves,
    requests_chain,
    run_in_waves,
    total_bytes,
)
from gpupool.local import LocalPool

A, B = ("a:1", 0), ("b:1", 0)


def _pieces(rows: Sequence[int]) -> tuple[Piece, ...]:
    """Shards of ``rows`` rows, alternately on A and B."""
    pieces, start = [], 0
    for index, count in enumerate(rows):
        endpoint, worker = (A, B)[index % 2]
        pieces.append(
            Piece(
                agent_id=endpoint[0],
                endpoint=endpoint,
                worker=worker,
                start=start,
                stop=start + count,
                buffer_id=f"b{index}",
            )
        )
        start += count
    return tuple(pieces)


class Fake(GraphArray):
    """A graph array with a layout and no pool: what the planning reads."""

    __slots__ = ("_layout", "dtype", "node", "shape")

    def __init__(self, shape: tuple[int, ...], dtype: Any, rows: Sequence[int], node: Node | None = None):
        self.shape, self.dtype, self.node = shape, np.dtype(dtype), node
        self._layout = _pieces(rows)

    @property
    def layout(self) -> tuple[Piece, ...]:
        return self._layout


def _op(name: str, *args: Any, shape: tuple[int, ...] = (10, 4), dtype: Any = np.float64) -> Fake:
    return Fake(shape, dtype, [6, 4], Node(name, tuple(args)))


def test_array_chain_counts_each_pending_array_once_per_shard() -> None:
    x = Fake((10, 4), np.float64, [6, 4])  # resident: costs nothing
    y = _op("add", x, lambda piece: None)
    z = _op("multiply", y, y)  # y is emitted once
    w = _op("less", z, x, dtype=np.bool_)
    chain = array_chain(w)
    assert chain.peak == {A: 6 * 4 * (8 + 8 + 1), B: 4 * 4 * (8 + 8 + 1)}
    assert chain.kept == {A: 6 * 4, B: 4 * 4}
    assert array_chain(w, keep=False).kept == {}
    assert array_chain(x) == Chain({}, {})


def test_requests_chain_counts_prepared_copies_and_partials() -> None:
    x = Fake((10, 4), np.float32, [6, 4, 0])
    y = Fake((10, 4), np.float32, [6, 4, 0], Node("tanh", (x,)))
    total = Request(
        array=y, op="sum", partial_shape=lambda rows: (1, 4), axes=(0,), dtype=np.dtype(np.float64)
    )
    nans = Request(
        array=y,
        op="count_nonzero",
        partial_shape=lambda rows: (1, 4),
        axes=(0,),
        dtype=np.dtype(np.int64),
        prepare="isnan",
    )
    chain = requests_chain([total, nans])
    # y's shards, then per non-empty shard: a bool per element, and two partials of 4 values.
    assert chain.peak == {A: 6 * 4 * 4 + 6 * 4 + 2 * 32, B: 4 * 4 * 4 + 4 * 4 + 2 * 32}
    assert chain.kept == {}


def test_plan_waves_fits_each_wave_and_counts_what_earlier_waves_keep() -> None:
    chain = Chain(peak={A: 30, B: 10}, kept={A: 10})
    # 100 free, 75 usable: two chains (60) fit, a third does not; then 20 are kept, 55 left: one fits.
    assert plan_waves([chain] * 4, {A: 100, B: 100}) == [[0, 1], [2], [3]]
    assert plan_waves([chain] * 4, {A: 1000, B: 1000}) == [[0, 1, 2, 3]]
    assert plan_waves([chain] * 3, {}) == [[0, 1, 2]]  # workers not reported: not limited
    assert plan_waves([Chain({A: 500})] * 2 + [chain], {A: 100}) == [[0], [1], [2]]  # too big: alone
    assert plan_waves([], {A: 100}) == []


def _record(endpoint: str, limit: int, used: int, telemetry_used: int | None = None) -> Any:
    record = coordinator_pb2.AgentRecord()
    record.status.endpoint = endpoint
    record.status.workers.append(control_pb2.Worker(index=0, memory_limit=limit, memory_used=used))
    if telemetry_used is not None:
        record.telemetry.workers.append(control_pb2.WorkerTelemetry(index=0, memory_used=telemetry_used))
    return record


def test_free_by_place_prefers_telemetry() -> None:
    records = [_record("a:1", 100, 10), _record("b:1", 100, 10, telemetry_used=70)]
    assert free_by_place(records) == {A: 90, B: 30}


def test_total_bytes_bounds_the_footprint_on_every_worker() -> None:
    x = Fake((10, 4), np.float32, [6, 4])
    y = Fake((10, 4), np.float32, [6, 4], Node("tanh", (x,)))
    z = Fake((10, 4), np.float64, [6, 4], Node("add", (y, y)))
    assert total_bytes(z) == sum(array_chain(z).peak.values()) == 10 * 4 * (4 + 8)
    value = gp.PendingValue(
        [
            Request(
                array=z, op="sum", partial_shape=lambda rows: (1, 4), axes=(0,), dtype=np.dtype(np.float64)
            )
        ],
        lambda partials: 0.0,
        shape=(4,),
        dtype=np.dtype(np.float64),
    )
    assert total_bytes(value) == sum(footprint(value).peak.values()) == 10 * 4 * (4 + 8) + 2 * 32
    assert footprint(value).kept == {}
    assert total_bytes(x) == 0


def test_run_in_waves_splits_a_wave_the_agents_refuse() -> None:
    items = [Fake((10,), np.float64, [5, 5]) for _ in range(5)]  # resident: one wave, nothing asked
    ran: list[list[int]] = []

    def run(wave: Sequence[Fake]) -> None:
        if len(wave) > 2:  # as an agent that cannot hold more than two chains' intermediates
            raise gp.DeviceOutOfMemory("a", "out of memory")
        ran.append([items.index(item) for item in wave])

    run_in_waves(None, items, run)  # type: ignore[arg-type]
    assert ran == [[0, 1], [2], [3, 4]]

    def refuse(wave: Sequence[Fake]) -> None:
        raise gp.DeviceOutOfMemory("a", "out of memory")

    with pytest.raises(gp.DeviceOutOfMemory):
        run_in_waves(None, items[:2], refuse)  # type: ignore[arg-type]


# -- on a pool whose agents hold 8 MiB each -----------------------------------------------------------------
LIMIT = 8 << 20
ROWS = 1 << 18  # 2 MiB of float64: 1 MiB on each agent; a chain of three ops reserves 3 MiB on each


@pytest.fixture(scope="module")
def small_pool(system_broker_url: str) -> Iterator[gp.Pool]:
    with (
        LocalPool(
            agents=2,
            broker_url=system_broker_url,
            port=0,
            topic_prefix=f"gpupool-test-{uuid.uuid4().hex[:10]}",
            backend="numpy",
            memory_limit=str(LIMIT),
            coordinator_args=["--min-shard-bytes", "0"],
            stderr=subprocess.DEVNULL,
        ) as local,
        local.connect() as pool,
    ):
        yield pool


def _chains(x: gp.RemoteArray, count: int) -> list[Any]:
    return [(x + i) * 2 - 1 for i in range(count)]


def test_compute_of_many_chains_runs_in_waves(small_pool: gp.Pool) -> None:
    host = np.arange(ROWS, dtype=np.float64)
    x = small_pool.asarray(host, rows=[ROWS // 2, ROWS // 2])
    assert 3 * ROWS * 8 // 2 * 12 > LIMIT  # twelve chains' intermediates do not fit together...
    with pytest.raises(gp.DeviceOutOfMemory):  # ...in one round of programs (as gp.compute sent them)
        materialize(small_pool._session, _chains(x, 12))
    sums = gp.compute(*(chain.sum() for chain in _chains(x, 12)))
    np.testing.assert_allclose(sums, [((host + i) * 2 - 1).sum() for i in range(12)])
    *means, last = gp.compute(*(chain.mean(axis=0) for chain in _chains(x, 11)), _chains(x, 12)[-1])
    np.testing.assert_allclose(means, [((host + i) * 2 - 1).mean() for i in range(11)])
    np.testing.assert_array_equal(last, (host + 11) * 2 - 1)
    x.free()


def test_persist_of_many_chains_runs_in_waves(small_pool: gp.Pool) -> None:
    host = np.arange(ROWS, dtype=np.float64)
    x = small_pool.asarray(host, rows=[ROWS // 2, ROWS // 2])
    ys = gp.persist(*_chains(x, 3))  # 3 MiB each on each agent, 1 MiB of it kept: not all at once
    assert not any(y.pending for y in ys)
    for i, y in enumerate(ys):
        np.testing.assert_array_equal(y.get(), (host + i) * 2 - 1)
        y.free()
    x.free()


def test_a_chain_too_large_alone_still_runs_out_of_memory(small_pool: gp.Pool) -> None:
    x = small_pool.asarray(np.ones(2 * ROWS), rows=[ROWS, ROWS])  # 2 MiB on each agent
    small = (x + 1).sum()
    large = (((x + 1) * 2 + 1) * 3).sum()  # four intermediates of 2 MiB: 8 MiB on each agent, with x 10
    with pytest.raises(gp.DeviceOutOfMemory):
        gp.compute(small, large)
    assert float(small) == 4 * ROWS  # the wave before the failing one stays done
    x.free()


@pytest.fixture(scope="module")
def half_mib_rows(small_pool: gp.Pool) -> tuple[np.ndarray, gp.RemoteArray]:
    """Half a MiB of float64 on each agent, uploaded once: the coordinator counts what it placed against an
    agent until the agent next reports, so uploading per example would exhaust it, frees or not."""
    host = np.linspace(-1, 1, ROWS // 2)
    return host, small_pool.asarray(host, rows=[ROWS // 4, ROWS // 4])


@settings(max_examples=10, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(depths=st.lists(st.integers(1, 3), min_size=2, max_size=14), arrays=st.integers(0, 2))
def test_batches_that_fit_one_at_a_time_fit_in_waves(
    half_mib_rows: tuple[np.ndarray, gp.RemoteArray], depths: list[int], arrays: int
) -> None:
    # Each chain fits beside x and the arrays kept: two ops a step, 3 MiB at most, with x and two kept
    # arrays 4.5 MiB of each agent's 8 MiB; together the chains reserve up to 42 MiB.
    host, x = half_mib_rows

    def chain(value: Any, depth: int, i: int) -> Any:
        for step in range(depth):
            value = value * 0.5 + (i + step)
        return value

    asked = [chain(x, d, i) if i < arrays else chain(x, d, i).sum() for i, d in enumerate(depths)]
    got = gp.compute(*asked)
    for i, (value, depth) in enumerate(zip(got, depths, strict=True)):
        want = chain(host, depth, i)
        np.testing.assert_allclose(value, want if i < arrays else want.sum(), rtol=1e-9, atol=1e-6)

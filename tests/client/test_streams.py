"""Shards moved over several streams each (``Streams``): row ranges uploaded into one buffer and downloaded
straight into their rows of the result, over two connections per agent, on the shared two-agent pool.

Every part boundary is exercised: with ``min_part_bytes=1`` any shard of two rows or more is split (up to
three parts), so odd row counts, one-row and empty shards, and every dtype cross it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import pytest

import gpupool as gp
from gpupool._config import SUPPORTED_DTYPES, Streams
from gpupool._errors import UsageError
from gpupool.local import LocalPool

from .conftest import AGENT_MEMORY

RNG = np.random.default_rng(5)


@pytest.fixture(scope="module")
def split_pool(local_pool: LocalPool, monkeypatch_module: pytest.MonkeyPatch) -> Iterator[gp.Pool]:
    """A session whose shards go in up to three parts each, over two connections per agent."""
    monkeypatch_module.setenv(Streams.ENVIRONMENT, "3,2")
    with local_pool.connect() as pool:
        session = pool._session
        assert session.streams == Streams(per_shard=3, connections=2)
        session.streams = dataclasses.replace(session.streams, min_part_bytes=1)
        yield pool


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def sample(dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    if dtype == "bool":
        return RNG.random(shape) > 0.5
    if dtype.startswith("complex"):
        return (RNG.standard_normal(shape) + 1j * RNG.standard_normal(shape)).astype(dtype)
    if dtype.startswith(("int", "uint")):
        info = np.iinfo(dtype)
        return RNG.integers(info.min, info.max, shape, endpoint=True, dtype=dtype)
    return RNG.standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("dtype", SUPPORTED_DTYPES)
def test_every_dtype_round_trips_in_parts(split_pool: gp.Pool, dtype: str) -> None:
    host = sample(dtype, (1001, 7))
    x = split_pool.asarray(host)
    np.testing.assert_array_equal(x.get(), host)
    x.free()


@pytest.mark.parametrize(
    "rows",
    [[0, 5, 1, 9], [1, 1, 1], [2, 0, 3], [100_003, 7]],
    ids=["empty-and-odd", "one-row-shards", "two-rows", "large-odd"],
)
def test_odd_one_row_and_empty_shards_round_trip(split_pool: gp.Pool, rows: list[int]) -> None:
    host = sample("float32", (sum(rows), 3))
    x = split_pool.asarray(host, rows=rows)
    assert [p.stop - p.start for p in x.pieces] == rows
    np.testing.assert_array_equal(x.get(), host)
    np.testing.assert_array_equal((x * 2).get(), host * 2)  # the buffers are whole on the agents
    x.free()


def test_rows_of_several_axes_and_a_zero_width_round_trip(split_pool: gp.Pool) -> None:
    for host in (sample("int16", (9, 4, 3)), np.zeros((6, 0), np.float64), sample("float64", (5,))):
        x = split_pool.asarray(host)
        np.testing.assert_array_equal(x.get(), host)
        x.free()


def test_a_refused_upload_in_parts_raises_itself_and_leaves_nothing(split_pool: gp.Pool) -> None:
    agent = next(a for a in split_pool.agents() if a.state == "ready")
    host = np.zeros((AGENT_MEMORY // 8 // 64 + 64, 64), np.float64)  # over one agent's limit
    session = split_pool._session

    async def upload() -> None:
        await session.grant([agent.id])
        await session.channel(agent.id, agent.endpoint).upload("too-big", 0, host, session.id)

    with pytest.raises(gp.DeviceOutOfMemory, match=agent.id):
        session.run(upload(), timeout=30, what="upload")
    fits = np.ones((AGENT_MEMORY // 8 // 64 // 2, 64))
    x = split_pool.asarray(fits)  # the memory is free again
    np.testing.assert_array_equal(x.get(), fits)
    x.free()


def test_streams_split_rows_evenly_and_only_large_shards() -> None:
    streams = Streams(per_shard=4, min_part_bytes=100)
    assert streams.parts(10, 1000) == [(0, 2), (2, 5), (5, 7), (7, 10)]
    assert streams.parts(3, 1000) == [(0, 1), (1, 2), (2, 3)]
    assert streams.parts(10, 250) == [(0, 5), (5, 10)]
    assert streams.parts(10, 99) == [(0, 10)]
    assert streams.parts(0, 0) == [(0, 0)]
    assert Streams().parts(1 << 20, 1 << 40) == [(0, 1 << 20)]


def test_streams_come_from_the_environment() -> None:
    assert Streams.from_environment({}) == Streams()
    assert Streams.from_environment({"GPUPOOL_STREAMS": "4"}) == Streams(per_shard=4)
    assert Streams.from_environment({"GPUPOOL_STREAMS": " 4,2 "}) == Streams(per_shard=4, connections=2)
    for bad in ("0", "x", "1,2,3", "2,-1", ","):
        with pytest.raises(UsageError, match="GPUPOOL_STREAMS"):
            Streams.from_environment({"GPUPOOL_STREAMS": bad})

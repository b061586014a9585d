"""Arrays created on the pool (zeros, full, arange, *_like, random numbers) against NumPy; none uploaded."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest

import gpupool as gp
from gpupool.client import pool as pool_module
from gpupool.client.session import Session
from gpupool.local import LocalPool
from gpupool.random import STREAMS_PER_DRAW

DTYPES = ["float32", "float64", "int32", "int64", "bool"]
SHAPES = [(1001, 3), (7,), (1,), (0,), (0, 3), (5, 2, 3)]


@pytest.fixture(autouse=True)
def current(pool: gp.Pool) -> Iterator[gp.Pool]:
    """The module's pool is the current pool in each test."""
    token = pool_module._CURRENT.set(())
    pool.use()
    try:
        yield pool
    finally:
        pool_module._CURRENT.reset(token)


def check(got: gp.RemoteArray, expected: np.ndarray) -> None:
    """Same shape, dtype and values, exactly."""
    assert isinstance(got, gp.RemoteArray)
    assert not got.pending
    host = got.get()
    assert host.shape == expected.shape
    assert host.dtype == expected.dtype, (host.dtype, expected.dtype)
    np.testing.assert_array_equal(host, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_zeros_ones_full_empty_equal_numpy(shape: tuple[int, ...], dtype: str) -> None:
    check(gp.zeros(shape, dtype), np.zeros(shape, dtype))
    check(gp.ones(shape, dtype=dtype), np.ones(shape, dtype))
    check(gp.full(shape, 7, dtype), np.full(shape, 7, dtype))
    empty = gp.empty(shape, dtype)
    assert (empty.shape, empty.dtype) == (shape, np.dtype(dtype))


def test_rows_are_split_over_both_agents(pool: gp.Pool) -> None:
    x = gp.zeros((1001, 4))
    assert {s.agent_id for s in x.shards} == {a.id for a in pool.agents()}
    assert x.shards[0].start == 0
    assert x.shards[-1].stop == 1001


@pytest.mark.parametrize("fill", [1.5, -3, True, np.float32(2.5), np.int32(-4), 0.0])
def test_full_takes_its_dtype_from_the_fill_value_as_numpy(fill: object) -> None:
    check(gp.full(11, fill), np.full(11, fill))
    check(gp.full((11, 2), fill, dtype=np.int64), np.full((11, 2), fill, dtype=np.int64))


def test_defaults_and_int_shapes_are_numpys() -> None:
    check(gp.zeros(4), np.zeros(4))
    check(gp.ones([3, 2]), np.ones([3, 2]))
    check(gp.full(np.int64(5), 2.0), np.full(5, 2.0))


def test_full_broadcasts_an_array_fill_value() -> None:
    row = np.array([1.0, -2.0, 3.0])
    check(gp.full((101, 3), row), np.full((101, 3), row))
    block = np.arange(101 * 3, dtype=np.int32).reshape(101, 3)
    check(gp.full((101, 3), block), np.full((101, 3), block))
    with pytest.raises(gp.UsageError, match="broadcast"):
        gp.full((101, 3), np.ones(4))


def test_like_functions_follow_the_array_and_its_layout() -> None:
    host = np.arange(1001 * 2, dtype=np.float32).reshape(1001, 2)
    x = gp.asarray(host)
    for made, expected in [
        (gp.zeros_like(x), np.zeros_like(host)),
        (gp.ones_like(x), np.ones_like(host)),
        (gp.full_like(x, 9), np.full_like(host, 9)),
        (gp.zeros_like(x, dtype=np.int32), np.zeros_like(host, dtype=np.int32)),
    ]:
        check(made, expected)
        assert made.shards == x.shards  # made where x lives: they meet shard by shard
    check((gp.empty_like(x) * 0).persist(), np.zeros_like(host))
    check(gp.ones_like(x, shape=(5,)), np.ones(5, np.float32))
    check(gp.zeros_like(host), np.zeros_like(host))  # host data: made on the current pool
    check(gp.full_like([[1, 2], [3, 4]], 7), np.full_like([[1, 2], [3, 4]], 7))
    check((gp.ones_like(x) + x).persist(), host + 1)


ARANGES: list[tuple[object, ...]] = [
    (10,),
    (1001,),
    (3, 17),
    (3, 1000, 7),
    (5, 0, -1),
    (0, 1, 0.1),
    (1, -2.5, -0.3),
    (2.5,),
    (0.5, 100.25, 0.125),
    (-7, 7, 3),
    (10, 5),
    (0, 10, 20),
]


@pytest.mark.parametrize("args", ARANGES)
def test_arange_equals_numpy_exactly(args: tuple[object, ...]) -> None:
    check(gp.arange(*args), np.arange(*args))


@pytest.mark.parametrize("dtype", ["float32", "float64", "int32", "int64"])
def test_arange_in_each_dtype(dtype: str) -> None:
    check(gp.arange(0, 1001, 1, dtype), np.arange(0, 1001, 1, dtype))
    check(gp.arange(3, 250, 2, dtype=dtype), np.arange(3, 250, 2, dtype=dtype))
    if np.dtype(dtype).kind == "f":
        check(gp.arange(0, 1, 0.01, dtype), np.arange(0, 1, 0.01, dtype))


def test_arange_with_numpy_scalars_takes_numpys_dtype() -> None:
    check(gp.arange(np.float32(0), np.float32(5)), np.arange(np.float32(0), np.float32(5)))
    check(gp.arange(np.int32(2), 9), np.arange(np.int32(2), 9))


def test_bad_arguments_raise_before_anything_is_sent() -> None:
    with pytest.raises(ZeroDivisionError):
        gp.arange(0, 5, 0)
    with pytest.raises(gp.UnsupportedDType):
        gp.zeros(3, np.str_)
    with pytest.raises(gp.UnsupportedDType):
        gp.full(3, "text")
    with pytest.raises(gp.UsageError, match="negative"):
        gp.ones((3, -1))
    with pytest.raises(TypeError):
        gp.zeros(2.5)  # type: ignore[arg-type]


@pytest.mark.parametrize(("fill", "dtype"), [(-1, "uint8"), (300, "int8"), (1 << 40, "uint32")])
def test_a_fill_value_numpy_refuses_is_refused_before_anything_is_sent(fill: int, dtype: str) -> None:
    # Regression: the agent refused it instead (RemoteKernelError, after the placement).
    with pytest.raises(OverflowError):
        np.full(3, fill, dtype)
    with pytest.raises(OverflowError, match="out of bounds"):
        gp.full(3, fill, dtype=dtype)
    with pytest.raises(OverflowError, match="out of bounds"):
        gp.full_like(gp.zeros(3, dtype=dtype), fill)


def test_zero_dimensional_arrays_are_values_kept_on_the_client() -> None:
    for made, expected in [
        (gp.zeros(()), np.zeros(())),
        (gp.full((), 7, dtype=gp.int8), np.full((), 7, np.int8)),
        (gp.asarray(2.5), np.asarray(2.5)),
        (gp.asarray(np.float32(3)), np.asarray(np.float32(3))),
        (gp.ones_like(gp.asarray(True)), np.ones((), bool)),
    ]:
        assert isinstance(made, gp.PendingValue)
        assert made.shape == ()
        assert made.dtype == expected.dtype
        assert made.__array_namespace__() is gp
        assert made.device == "gpupool"
        np.testing.assert_array_equal(np.asarray(made), expected)
    with pytest.raises(ValueError, match="copy"):
        gp.asarray(1.0, copy=False)


def test_asarray_uploads_to_the_current_pool(pool: gp.Pool) -> None:
    host = np.linspace(0, 1, 101)
    x = gp.asarray(host, dtype=np.float32)
    assert x.session is pool._session
    check(x, host.astype(np.float32))
    assert gp.asarray(x) is x
    check(gp.asarray(x, dtype=np.float64).persist(), host.astype(np.float32).astype(np.float64))


def _make_everything() -> list[gp.RemoteArray]:
    rng = gp.random.default_rng(3)
    x = gp.zeros((2048, 64))
    return [
        x,
        gp.ones((2048, 64), np.float32),
        gp.full((2048, 64), 2.5),
        gp.full_like(x, 1),
        gp.arange(100_000),
        rng.standard_normal((2048, 64)),
        rng.uniform(0, 1, (2048, 64)),
    ]


def test_creation_uploads_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("creation uploaded host data")

    monkeypatch.setattr(Session, "upload", refuse)
    monkeypatch.setattr(Session, "upload_pieces", refuse)
    arrays = _make_everything()
    assert all(not a.pending for a in arrays)


def _bytes_received(local_pool: LocalPool, *, after: float) -> int:
    """The agents' ``bytes_received`` telemetry, from reports all sent after ``after`` (a time.time())."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        records = local_pool.list_agents()
        times = [r.telemetry.time.seconds + r.telemetry.time.nanos / 1e9 for r in records]
        if records and all(r.HasField("telemetry") for r in records) and min(times) > after:
            return sum(r.telemetry.bytes_received for r in records)
        time.sleep(0.2)
    raise AssertionError("no fresh telemetry from the agents")


def test_the_agents_receive_no_bytes_for_created_arrays(local_pool: LocalPool) -> None:
    before = _bytes_received(local_pool, after=time.time())
    arrays = _make_everything()
    after = _bytes_received(local_pool, after=time.time())
    assert sum(a.nbytes for a in arrays) > 4 << 20
    assert after == before
    uploaded = gp.asarray(np.ones(1 << 17))  # the figure is live: an upload of 1 MiB shows in it
    assert _bytes_received(local_pool, after=time.time()) == after + uploaded.nbytes


# -- random numbers --------------------------------------------------------------------------------


def numpy_agents_draw(seed: int, draw: int, array: gp.RemoteArray, kind: str) -> np.ndarray:
    """What the NumPy agents draw for ``array`` (docs/contracts.md): one Philox stream per shard."""
    parts = []
    for index, shard in enumerate(array.shards):
        stream = draw * STREAMS_PER_DRAW + index
        generator = np.random.Generator(np.random.Philox(key=seed, counter=stream << 128))
        shape = (shard.rows, *array.shape[1:])
        draw_one = generator.random if kind == "uniform" else generator.standard_normal
        parts.append(draw_one(shape, dtype=array.dtype))
    return np.concatenate(parts)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_draws_are_reproducible_from_the_seed_and_layout(dtype: str) -> None:
    rng = gp.random.default_rng(42)
    first = rng.random((1001, 3), dtype=dtype)
    second = rng.standard_normal((1001, 3), dtype=dtype)
    check(first, numpy_agents_draw(42, 0, first, "uniform"))
    check(second, numpy_agents_draw(42, 1, second, "normal"))
    again = gp.random.default_rng(42).random((1001, 3), dtype=dtype)
    if again.shards == first.shards:  # the same layout: the same numbers
        check(again, first.get())


def test_draws_differ_between_calls_seeds_and_shards() -> None:
    rng = gp.random.default_rng(0)
    a, b = rng.random(1000).get(), rng.random(1000).get()
    c = gp.random.default_rng(1).random(1000).get()
    assert not np.array_equal(a, b)
    assert not np.array_equal(a, c)
    x = rng.random((1000,))
    halves = [x.get()[s.start : s.stop] for s in x.shards]
    assert len(halves) == 2
    assert not np.array_equal(halves[0][:100], halves[1][:100])


def test_distributions_have_their_moments() -> None:
    rng = gp.random.default_rng(2026)
    normal = rng.standard_normal(100_000).get()
    assert abs(normal.mean()) < 0.02
    assert abs(normal.std() - 1) < 0.02
    shifted = rng.normal(3.0, 2.0, (50_000, 2), dtype=np.float32).get()
    assert shifted.dtype == np.float32
    assert abs(shifted.mean() - 3) < 0.04
    assert abs(shifted.std() - 2) < 0.04
    uniform = rng.uniform(-1.0, 4.0, 100_000).get()
    assert uniform.min() >= -1.0
    assert uniform.max() < 4.0
    assert abs(uniform.mean() - 1.5) < 0.03
    assert isinstance(rng.random(), float)
    assert 0 <= rng.random() < 1


def test_generator_arguments_are_checked() -> None:
    rng = gp.random.default_rng()
    assert 0 <= rng.seed < 2**63
    with pytest.raises(gp.UsageError):
        rng.random(3, dtype=np.int64)
    with pytest.raises(gp.UsageError, match="negative"):
        rng.normal(0.0, -1.0, 3)
    with pytest.raises(gp.UsageError, match="scalar"):
        rng.uniform(np.zeros(3), 1.0, 3)  # type: ignore[arg-type]
    with pytest.raises(gp.UsageError, match="seed"):
        gp.random.default_rng(-1)


LINSPACES: list[tuple[tuple[object, ...], dict[str, object]]] = [
    ((0, 1), {}),
    ((0, 1, 1001), {}),
    ((-3.5, 7.25, 333), {"endpoint": False}),
    ((2, 2, 10), {}),
    ((5, -5, 101), {"dtype": np.float32}),
    ((0, 100, 1001), {"dtype": np.int64}),
    ((np.float32(0), np.float32(1), 77), {}),
    ((1, 2, 1), {}),
    ((1, 2, 0), {}),
    ((0, 1e-310, 5), {}),
]


@pytest.mark.parametrize(("args", "kwargs"), LINSPACES)
def test_linspace_equals_numpy(args: tuple[object, ...], kwargs: dict[str, object]) -> None:
    check(gp.linspace(*args, **kwargs), np.linspace(*args, **kwargs))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((5,), {}),
        ((101, 7), {}),
        ((7, 101), {"k": 3}),
        ((50,), {"k": -2, "dtype": np.int32}),
        ((3,), {"dtype": bool}),
    ],
)
def test_eye_equals_numpy(args: tuple[int, ...], kwargs: dict[str, object]) -> None:
    check(gp.eye(*args, **kwargs), np.eye(*args, **kwargs))  # type: ignore[arg-type]

"""Strategies and checks for the property tests of remote arrays against NumPy (test_properties*.py).

An example is a host array and a sharding of its rows (``rows=`` counts, zero-row and one-row shards
included, or None for the coordinator's own split); :func:`upload` puts it on the pool. :func:`assert_like`
compares a gpupool result with NumPy's: same shape and dtype, equal values for bool and ints, values within
the dtype's precision (scaled by the data's magnitude) for floats. :func:`on_pool` checks that what it
wraps ran on the pool: no host fallback, warned or counted.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import gpupool as gp
from gpupool.client.values import PendingValue
from gpupool.protocol.codec import check_dtype

#: The dtypes the examples draw: issue 7's five, and a narrow and an unsigned integer and float16 (where
#: NumPy's promotion and overflow rules differ most).
DTYPES = [
    np.dtype(t)
    for t in ("bool", "int32", "int64", "float32", "float64", "int8", "uint8", "uint32", "float16")
]
NUMERIC = [d for d in DTYPES if d.kind != "b"]
FLOATS = [d for d in DTYPES if d.kind == "f"]

#: Every property test runs under this: a modest number of examples (``GPUPOOL_PROPERTY_EXAMPLES`` for a
#: longer hunt), no deadline (a round trip to the agents is not the code under test's time), no database
#: left in the working tree.
POOL_SETTINGS = settings(
    max_examples=int(os.environ.get("GPUPOOL_PROPERTY_EXAMPLES", "30")),
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def elements(dtype: np.dtype[Any], *, small: bool = False) -> st.SearchStrategy[Any]:
    """Values of ``dtype`` that keep NumPy's own results finite and exact enough to compare: small
    integers (tiny with ``small``, for products), floats of moderate size."""
    if dtype.kind == "b":
        return st.booleans()
    if dtype.kind in "iu":
        bound = 3 if small else 50
        return st.integers(0 if dtype.kind == "u" else -bound, bound)
    bound = 2.0 if small else 100.0
    return st.floats(-bound, bound, width=dtype.itemsize * 8, allow_nan=False, allow_subnormal=False)


@st.composite
def partitions(draw: st.DrawFn, length: int, *, explicit: bool = False) -> tuple[int, ...] | None:
    """A sharding of ``length`` rows: None (the coordinator's split; never if ``explicit``) or 1 to 5 row
    counts adding up to it, empty and one-row shards included."""
    if not explicit and draw(st.integers(0, 4)) == 0:
        return None
    shards = draw(st.integers(1, 5))
    cuts = sorted(draw(st.lists(st.integers(0, length), min_size=shards - 1, max_size=shards - 1)))
    bounds = [0, *cuts, length]
    return tuple(b - a for a, b in itertools.pairwise(bounds))


def shapes(*, min_dims: int = 1, max_dims: int = 3, min_rows: int = 0) -> st.SearchStrategy[tuple[int, ...]]:
    """Array shapes: 0 to 8 rows (at least ``min_rows``), other axes 0 to 4 long."""
    return st.tuples(
        st.integers(min_rows, 8),
        hnp.array_shapes(min_dims=min_dims - 1, max_dims=max_dims - 1, min_side=0, max_side=4),
    ).map(lambda parts: (parts[0], *parts[1]))


@st.composite
def sharded(
    draw: st.DrawFn,
    dtypes: list[np.dtype[Any]] = DTYPES,
    shape: tuple[int, ...] | st.SearchStrategy[tuple[int, ...]] | None = None,
    *,
    small: bool = False,
    explicit: bool = False,
) -> tuple[np.ndarray, tuple[int, ...] | None]:
    """A host array and a sharding of its rows (always through ``rows=`` if ``explicit``)."""
    dtype = draw(st.sampled_from(dtypes))
    if shape is None:
        shape = shapes()
    if isinstance(shape, st.SearchStrategy):
        shape = draw(shape)
    host = draw(hnp.arrays(dtype, shape, elements=elements(dtype, small=small)))
    return host, draw(partitions(shape[0], explicit=explicit))


def upload(pool: gp.Pool, example: tuple[np.ndarray, tuple[int, ...] | None]) -> gp.RemoteArray:
    """The example's array on the pool, sharded as drawn."""
    host, rows = example
    array = pool.asarray(host, rows=rows)
    assert [s.rows for s in array.shards] == list(rows or [s.rows for s in array.shards])
    return array


def carried(dtype: np.dtype[Any]) -> bool:
    """Whether the pool carries ``dtype`` (NumPy's result dtype for bools is int8 or float16 at times)."""
    try:
        check_dtype(dtype)
    except gp.UnsupportedDType:
        return False
    return True


def to_host(value: Any) -> Any:
    """A gpupool result as NumPy: remote arrays downloaded, pending values computed."""
    if isinstance(value, gp.RemoteArray):
        return value.get()
    if isinstance(value, PendingValue):
        return value.compute()
    return value


def numpy_result(function: Callable[[], Any]) -> Any:
    """NumPy's answer, without the RuntimeWarnings of empty slices, ddof past the count or division by
    zero (the tests turn warnings into errors; gpupool computes the same values)."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        return function()


def quiet(function: Callable[[], Any]) -> Any:
    """gpupool's answer, forced, with NumPy's RuntimeWarnings silenced as for :func:`numpy_result`."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        return to_host(function())


def assert_like(got: Any, want: Any, *, scale: float = 1.0, exact_dtype: bool = True) -> None:
    """``got`` (forced) is NumPy's ``want``: shape, dtype and values; floats within a tolerance of their
    precision times ``scale`` (the magnitude of the data they were computed from)."""
    got = to_host(got)
    got_array, want_array = np.asarray(got), np.asarray(want)
    assert got_array.shape == want_array.shape, f"shape {got_array.shape} != NumPy's {want_array.shape}"
    if exact_dtype:
        assert got_array.dtype == want_array.dtype, f"dtype {got_array.dtype} != NumPy's {want_array.dtype}"
    if want_array.dtype.kind in "fc":
        precision = float(np.finfo(want_array.dtype).eps)
        np.testing.assert_allclose(  # compared in float64: a float16 tolerance would overflow
            got_array.astype(np.float64),
            want_array.astype(np.float64),
            rtol=precision * 64,
            atol=precision * 64 * max(scale, 1.0),
            equal_nan=True,
        )
    else:
        np.testing.assert_array_equal(got_array, want_array)


def magnitude(host: np.ndarray) -> float:
    """A scale for float tolerances: the sum of absolute values (what a sum's rounding error grows with)."""
    if host.dtype.kind == "b" or not host.size:
        return 1.0
    return float(np.abs(host.astype(np.float64)).sum())


@contextlib.contextmanager
def on_pool() -> Iterator[None]:
    """Check that the block ran on the pool: a :class:`gpupool.HostFallbackWarning` is an error, and no
    NumPy function was counted on the host (the warning comes once per function; the count every time)."""
    before = {name: counts["host"] for name, counts in gp.coverage().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error", gp.HostFallbackWarning)
        yield
    after = {name: counts["host"] for name, counts in gp.coverage().items()}
    fell_back = sorted(name for name, n in after.items() if n > before.get(name, 0))
    assert not fell_back, f"ran on the host: {fell_back}"

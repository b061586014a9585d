"""NumPy functions the pool runs by composition (gpupool.client.composite), against NumPy on a 2-agent pool:
each result equals NumPy's and no call falls back to the host."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import gpupool as gp

RNG = np.random.default_rng(7)
HOST = RNG.random((301, 6)).astype(np.float32)
HOST[7, 2] = np.nan  # a NaN in one row and one column
INTS = RNG.integers(-5, 5, size=(203, 4)).astype(np.int64)

CASES: dict[str, Callable[[Any, Any], Any]] = {
    "zeros_like": lambda x, i: np.zeros_like(x),
    "ones_like-int32": lambda x, i: np.ones_like(x, dtype=np.int32),
    "full_like": lambda x, i: np.full_like(x, 2.5),
    "empty_like-shape": lambda x, i: np.isfinite(np.empty_like(x, shape=(4, 6))) | True,
    "norm": lambda x, i: np.linalg.norm(x[8:]),
    "norm-axis1": lambda x, i: np.linalg.norm(x[8:], axis=1),
    "norm-ord1-axis0": lambda x, i: np.linalg.norm(x[8:], ord=1, axis=0),
    "cov-columns": lambda x, i: np.cov(x[8:], rowvar=False),
    "cov-rows": lambda x, i: np.cov(x[8:40]),
    "cov-ints-bias": lambda x, i: np.cov(i, rowvar=False, bias=True),
    "median-axis1": lambda x, i: np.median(x, axis=1),
    "median-axis0": lambda x, i: np.median(x, axis=0),
    "median-all": lambda x, i: np.median(x[8:]),
    "median-ints-keepdims": lambda x, i: np.median(i, axis=1, keepdims=True),
    "percentile": lambda x, i: np.percentile(x, 90, axis=1),
    "quantile-axis0": lambda x, i: np.quantile(x[8:], 0.3, axis=0),
    "ptp": lambda x, i: np.ptp(i, axis=0),
    "average": lambda x, i: np.average(x, axis=1),
    "unique-ints": lambda x, i: np.unique(i),
    "unique-floats-nan": lambda x, i: np.unique(np.round(x * 4)),
    "diff": lambda x, i: np.diff(i, axis=1),
    "diff-2": lambda x, i: np.diff(x, n=2, axis=-1),
    "vstack": lambda x, i: np.vstack([x, x[:5]]),
    "stack": lambda x, i: np.stack([i, i * 2]),
    "einsum-matmul": lambda x, i: np.einsum("ij,jk->ik", x[8:], HOST[:6, :3].copy()),
    "einsum-rowdot": lambda x, i: np.einsum("ij,ij->i", x, x),
    "einsum-colsum": lambda x, i: np.einsum("ij->j", x[8:]),
    "einsum-gram": lambda x, i: np.einsum("ji,jk->ik", x[8:], x[8:]),
    "einsum-transposed-out": lambda x, i: np.einsum("ij,jk->ki", i, INTS[:4, :2].copy()),
}


@pytest.mark.parametrize("name", list(CASES))
def test_composed_functions_equal_numpys_on_the_pool(pool: gp.Pool, name: str) -> None:
    case = CASES[name]
    expected = case(HOST, INTS)
    x, i = pool.asarray(HOST), pool.asarray(INTS)
    gp.coverage(reset=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", gp.HostFallbackWarning)
        got = case(x, i)
    assert all(counts["host"] == 0 for counts in gp.coverage().values())
    host = np.asarray(got)
    assert host.shape == np.shape(expected)
    assert host.dtype == np.asarray(expected).dtype
    np.testing.assert_allclose(host, expected, rtol=2e-5, atol=1e-5, equal_nan=True)


def test_what_the_compositions_do_not_take_runs_on_the_host(pool: gp.Pool) -> None:
    x = pool.asarray(HOST[8:])
    for call, expected in [
        (lambda a: np.percentile(a, [10, 90], axis=1), np.percentile(HOST[8:], [10, 90], axis=1)),
        (lambda a: np.median(a, axis=(0, 1)), np.median(HOST[8:], axis=(0, 1))),
        (lambda a: np.einsum("ii->i", a[:6]), np.einsum("ii->i", HOST[8:14])),
        (lambda a: np.unique(a, return_counts=True)[1], np.unique(HOST[8:], return_counts=True)[1]),
    ]:
        gp.coverage(reset=True)
        with pytest.warns(gp.HostFallbackWarning):
            got = call(x)
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6)

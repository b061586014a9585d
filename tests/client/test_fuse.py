"""``@gp.fuse`` on a real pool: remote results come back computed together, host inputs run on NumPy, and
a fused function inside a traced task is traced like any other code."""

from __future__ import annotations

import numpy as np
import pytest

import gpupool as gp
from gpupool.fuse import fuse


@gp.fuse
def affine_and_gap(x: gp.RemoteArray, y: gp.RemoteArray) -> tuple[gp.RemoteArray, gp.RemoteArray]:
    return x * y + 1, gp.abs(x - y)


def test_a_fused_call_computes_every_remote_result_together(pool: gp.Pool) -> None:
    a = np.linspace(-1, 1, 5000, dtype=np.float32)
    b = np.cos(a)
    x, y = pool.asarray(a), pool.asarray(b)
    out, gap = affine_and_gap(x, y)
    assert out.node is None  # computed and resident, not pending
    assert gap.node is None
    np.testing.assert_allclose(out.get(), a * b + 1, rtol=1e-6)
    np.testing.assert_allclose(gap.get(), np.abs(a - b), rtol=1e-6)


def test_nested_results_and_the_parenthesised_form(pool: gp.Pool) -> None:
    @fuse()
    def several(x: gp.RemoteArray) -> dict[str, list[gp.RemoteArray]]:
        return {"powers": [x * x, x * x * x], "same": [x]}

    data = np.arange(1, 100, dtype=np.float64)
    got = several(pool.asarray(data))
    assert all(item.node is None for item in got["powers"])
    np.testing.assert_array_equal(got["powers"][1].get(), data**3)
    assert several.__wrapped__.__name__ == "several"  # type: ignore[attr-defined]


def test_host_inputs_run_here_on_numpy() -> None:
    a = np.arange(4, dtype=np.float32)
    out, gap = affine_and_gap(a, a + 2)
    np.testing.assert_array_equal(out, a * (a + 2) + 1)
    np.testing.assert_array_equal(gap, np.full(4, 2, np.float32))


def test_a_fused_function_inside_a_task_is_traced(pool: gp.Pool) -> None:
    def task(x: np.ndarray) -> gp.RemoteArray:
        out, _ = affine_and_gap(x, x)
        return out

    futures = pool.map(task, [np.ones(8, np.float32), np.full(8, 2.0, np.float32)])
    results = [future.result(timeout=60) for future in futures]
    np.testing.assert_array_equal(results[1], np.full(8, 5.0, np.float32))


def test_an_error_in_the_function_surfaces_at_the_call(pool: gp.Pool) -> None:
    @gp.fuse
    def mismatched(x: gp.RemoteArray, y: gp.RemoteArray) -> gp.RemoteArray:
        return x + y

    with pytest.raises((ValueError, gp.UsageError)):
        mismatched(pool.asarray(np.ones(3)), pool.asarray(np.ones(4)))

"""Deferred execution: ops are recorded, then run as one program per shard when a result is needed."""

from __future__ import annotations

import gc
import time

import numpy as np
import pytest

import gpupool as gp
from gpupool.client.operands import INLINE_LIMIT


def used(pool: gp.Pool) -> int:
    """Bytes the pool's agents hold, once their reports have settled: agents report memory shortly after
    it changes (a few hundredths of a second, at most 5 times a second), so a read right after an upload
    may not show it yet. Two equal reads 0.5 s apart, within 10 s."""
    deadline = time.monotonic() + 10
    last = sum(a.memory_used for a in pool.agents())
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = sum(a.memory_used for a in pool.agents())
        if now == last:
            break
        last = now
    return last


def test_ops_are_pending_until_a_result_is_needed(pool: gp.Pool) -> None:
    a = np.arange(4000, dtype=np.float64).reshape(1000, 4)
    x = pool.asarray(a)
    y = np.tanh(x * 2 + 1) - x
    assert y.pending
    assert y.depth == 4
    assert [s.rows for s in y.shards] == [s.rows for s in x.shards]  # the layout is known before computing
    assert y.persist() is y
    assert not y.pending
    np.testing.assert_allclose(y.get(), np.tanh(a * 2 + 1) - a)


def test_a_chain_and_its_reduction_are_one_round_trip_that_keeps_nothing(pool: gp.Pool) -> None:
    a = np.random.default_rng(3).standard_normal((20_000, 16)).astype(np.float32)
    x = pool.asarray(a)
    before = used(pool)
    total = ((x * 2 + 1) ** 2).sum()
    np.testing.assert_allclose(total, ((a * 2 + 1) ** 2).sum(dtype=np.float64), rtol=1e-4)
    assert used(pool) == before  # the intermediates were freed inside the program


def test_many_independent_ops_persist_together(pool: gp.Pool) -> None:
    a = np.arange(1000, dtype=np.int64)
    x = pool.asarray(a)
    results = gp.persist(*(x + i for i in range(200)))
    assert not any(r.pending for r in results)
    for i in (0, 57, 199):
        np.testing.assert_array_equal(results[i].get(), a + i)


def test_shared_intermediates_are_computed_once_per_program_and_kept_when_asked(pool: gp.Pool) -> None:
    a = np.linspace(-1, 1, 3000).reshape(1000, 3)
    x = pool.asarray(a)
    y = x * 3
    z = y + 1
    w = y * y
    gp.persist(z, y, w)  # z depends on y, which is also a target: y's output is kept, not freed
    assert not y.pending
    np.testing.assert_allclose(y.get(), a * 3)
    np.testing.assert_allclose(z.get(), a * 3 + 1)
    np.testing.assert_allclose(w.get(), (a * 3) ** 2)


def test_an_intermediate_is_recomputed_when_used_later(pool: gp.Pool) -> None:
    a = np.arange(300, dtype=np.float32).reshape(100, 3)
    x = pool.asarray(a)
    y = x + 1
    z = (y * 2).persist()
    assert y.pending
    np.testing.assert_array_equal(y.get(), a + 1)
    np.testing.assert_array_equal(z.get(), (a + 1) * 2)


def test_long_chains_are_materialized_as_they_grow(pool: gp.Pool) -> None:
    a = np.zeros((500, 2), np.int64)
    x = pool.asarray(a)
    for _ in range(150):
        x = x + 1
    assert x.depth < 150
    np.testing.assert_array_equal(x.get(), a + 150)


def test_matmul_and_row_reductions_are_deferred_too(pool: gp.Pool) -> None:
    rng = np.random.default_rng(4)
    a = rng.standard_normal((800, 32))
    w = rng.standard_normal((32, 8))
    x = pool.asarray(a)
    y = np.tanh(x @ w) * 2 + 1
    row_max = y.max(axis=1)
    assert y.pending
    assert row_max.pending
    np.testing.assert_allclose(row_max.get(), (np.tanh(a @ w) * 2 + 1).max(axis=1))
    np.testing.assert_allclose(y.mean(axis=0), (np.tanh(a @ w) * 2 + 1).mean(axis=0))


def test_freeing_an_input_of_a_pending_array_is_caught(pool: gp.Pool) -> None:
    x = pool.asarray(np.ones((10, 2)))
    y = x + 1
    x.free()
    with pytest.raises(gp.ArrayFreed):
        y.get()


def test_large_host_operands_are_uploaded_once_and_freed_with_the_nodes_that_hold_them(pool: gp.Pool) -> None:
    rows = INLINE_LIMIT // (8 * 64) + 8  # a float64 operand of 64 columns is then over the inline limit
    rng = np.random.default_rng(21)
    a, b = rng.standard_normal((rows, 64)), rng.standard_normal((rows, 64))
    w = rng.standard_normal((64 + INLINE_LIMIT // (8 * 64), 64))  # too large to send with each program
    x = pool.asarray(a)
    small = pool.asarray(a[:4, :1].repeat(w.shape[0], axis=1))
    deadline = time.monotonic() + 15
    while used(pool) < x.nbytes + small.nbytes:  # what agents report lags their uploads a little
        assert time.monotonic() < deadline, "the agents never reported the uploads"
        time.sleep(0.05)
    before = used(pool)
    y = x + b  # row-aligned with x: uploaded once, in x's layout
    np.testing.assert_allclose(y.get(), a + b)
    np.testing.assert_allclose((small @ w).get(), a[:4, :1].repeat(w.shape[0], axis=1) @ w)
    del y
    gc.collect()
    deadline = time.monotonic() + 15
    while used(pool) > before:  # what agents report lags their frees a little
        assert time.monotonic() < deadline, f"{used(pool) - before} bytes still held"
        time.sleep(0.2)

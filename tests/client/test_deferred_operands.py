"""Pending reductions used as operands are computed together, one round before the programs that use them:
``(x - x.mean(0)) / x.std(0)`` costs two rounds, not three, and gives NumPy's values."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import gpupool as gp
from gpupool.client import graph

HOST = np.random.default_rng(3).random((500, 6))


@pytest.fixture
def rounds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The rounds of programs run (a spy on the real function: the programs still run)."""
    seen: list[str] = []
    real = graph.run_programs

    def spy(session: Any, programs: Any, *, what: str) -> Any:
        seen.append(what)
        return real(session, programs, what=what)

    monkeypatch.setattr(graph, "run_programs", spy)
    return seen


def test_two_reductions_as_operands_cost_one_round(pool: gp.Pool, rounds: list[str]) -> None:
    x = pool.asarray(HOST, rows=[200, 300])
    standardised = (x - x.mean(0)) / x.std(0)
    assert rounds == []  # nothing ran yet: the reductions are deferred operands
    standardised.persist()
    assert len(rounds) == 2
    np.testing.assert_allclose(standardised.get(), (HOST - HOST.mean(0)) / HOST.std(0))


def test_deferred_operands_keep_numpys_semantics(pool: gp.Pool) -> None:
    x = pool.asarray(HOST, rows=[250, 250])
    total = x.sum()
    scaled = x * total  # reads the sum before x changes
    x += 1
    np.testing.assert_allclose(scaled.get(), HOST * HOST.sum())
    np.testing.assert_allclose(x.get(), HOST + 1)

    def centre(a: Any) -> None:
        a -= a.mean(0)

    y = pool.asarray(HOST, rows=[100, 400])
    centre(y)
    np.testing.assert_allclose(y.get(), HOST - HOST.mean(0))
    z = pool.asarray(HOST.astype(np.float32))
    (value,) = gp.compute(((z - z.max(axis=0)) * z.min()).sum())
    expected = (
        (HOST.astype(np.float32) - HOST.astype(np.float32).max(0)) * HOST.astype(np.float32).min()
    ).sum()
    assert value.dtype == np.float32
    np.testing.assert_allclose(value, expected, rtol=1e-5)

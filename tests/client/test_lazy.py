"""Reductions over the sharded axis are pending values, forced by float/int/bool/item/np.asarray or, many at
once, by ``gp.compute`` in one round of programs."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import gpupool as gp
from gpupool.client.channels import AgentChannel
from gpupool.client.session import Session


@pytest.fixture
def programs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every program sent to an agent, by endpoint."""
    sent: list[str] = []
    execute, execute_now = AgentChannel.execute, Session.execute_now

    def counted(self: AgentChannel, *args: Any, **kwargs: Any) -> Any:
        sent.append("channel")
        return execute(self, *args, **kwargs)

    def counted_now(self: Session, place: Any, *args: Any, **kwargs: Any) -> Any:
        sent.append(place.endpoint)
        return execute_now(self, place, *args, **kwargs)

    monkeypatch.setattr(AgentChannel, "execute", counted)
    monkeypatch.setattr(Session, "execute_now", counted_now)
    return sent


def test_a_reduction_is_pending_until_forced(pool: gp.Pool, programs: list[str]) -> None:
    a = np.arange(1000, dtype=np.float64)
    x = pool.asarray(a)
    programs.clear()
    total = (x * 2).sum()
    assert total.pending
    assert total.shape == ()
    assert total.dtype == np.float64
    assert "pending" in repr(total)
    assert programs == []
    assert float(total) == (a * 2).sum()
    assert not total.pending
    sent = len(programs)
    assert int(total) == int((a * 2).sum())
    assert total.item() == (a * 2).sum()
    assert len(programs) == sent  # kept once computed


def test_forcing_by_int_bool_item_and_asarray(pool: gp.Pool) -> None:
    a = np.arange(12, dtype=np.int64).reshape(6, 2)
    x = pool.asarray(a)
    assert int(x.sum()) == 66
    assert x.max().item() == 11
    assert bool(x.any())
    assert not bool((x < 0).any())
    np.testing.assert_array_equal(np.asarray(x.sum(0)), a.sum(0))
    assert x.sum() == 66  # a pending 0-d bool, forced by assert
    check = x.sum() == 67
    assert check.pending
    assert check.dtype == np.bool_
    assert not check
    np.testing.assert_allclose(x.mean() / 2 + 1, a.mean() / 2 + 1)
    assert x.sum() + x.max() == 77


def test_compute_batches_many_reductions_in_one_program_per_shard(pool: gp.Pool, programs: list[str]) -> None:
    a = np.random.default_rng(0).standard_normal((500, 4))
    x = pool.asarray(a)
    shards = len([s for s in x.shards if s.rows])
    sums = [(x + i).sum() for i in range(2000)]
    y = x * 3
    programs.clear()
    values = gp.compute(*sums, y, x.mean(0), 5)
    assert len(programs) == shards
    np.testing.assert_allclose(values[:2000], [(a + i).sum() for i in range(2000)])
    np.testing.assert_allclose(values[2000], a * 3)
    np.testing.assert_allclose(values[2001], a.mean(0))
    assert values[2002] == 5
    assert not any(s.pending for s in sums)


def test_an_inplace_update_leaves_a_pending_reduction_its_old_value(pool: gp.Pool) -> None:
    x = pool.asarray(np.ones(100))
    before = x.sum()
    x += 1
    assert float(before) == 100
    assert float(x.sum()) == 200

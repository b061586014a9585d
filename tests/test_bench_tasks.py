"""The benchmark's tasks section at quick size, so its machinery stays working; no figure is checked.

The section itself raises if the pool's tiny tasks or trainings differ from NumPy's (checked before timing).
"""

from __future__ import annotations

import math

from bench import tasks
from bench.common import Context
from bench.transfer import _Dask


def test_the_tasks_section_times_pool_map_against_dask_and_numpy() -> None:
    rows = tasks.run(Context(repeats=1, quick=True))
    dask = _Dask.available()
    names = [row.name for row in rows]
    assert names[0] == "100 tiny tasks, pool.map of (data * i).sum(), replicated 1,000 f32"
    assert names[1:] == ["sweep of 8 MLP trainings, 2 agents"] * (3 if dask else 2)
    assert [row.baseline_name for row in rows[1:3]] == [
        "the same one after another, local NumPy, 1 BLAS thread",
        "the same one after another, local NumPy, 2 BLAS threads",
    ]
    assert rows[1].target == tasks.SWEEP_TARGET
    for row in rows:
        assert row.value > 0
        assert math.isfinite(row.value)
    assert (rows[0].baseline is not None) == dask

"""The benchmark's stragglers section at quick size, so its machinery stays working; no figure is checked.

The section itself raises if a chain's sum on the pool differs from NumPy's (every timed run checks it).
"""

from __future__ import annotations

import math

from bench import stragglers
from bench.common import Context


def test_the_stragglers_section_times_a_slowed_pool_against_a_healthy_one() -> None:
    (row,) = stragglers.run(Context(repeats=1, quick=True))
    assert row.baseline_name == "the same on three healthy agents"
    assert row.target == stragglers.TARGET
    assert row.value > 0
    assert row.baseline is not None
    assert math.isfinite(row.baseline)
    assert "without twins the slowed case took" in row.note

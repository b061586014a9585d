"""The benchmark's placement section at quick size, so its machinery stays working; no figure is checked.

The section itself raises if the chain's sum on the pool differs from NumPy's (checked before timing).
"""

from __future__ import annotations

import math

from bench import placement
from bench.common import Context


def test_the_placement_section_times_speed_shards_against_memory_shards() -> None:
    (row,) = placement.run(Context(repeats=1, quick=True))
    assert row.baseline_name == "shards by free memory (--placement memory)"
    assert row.target == placement.TARGET
    assert row.value > 0
    assert row.baseline is not None
    assert math.isfinite(row.baseline)
    assert "by memory [8192, 8192]" in row.note  # equal memory: halves

"""The benchmark's moves section at quick size, so its machinery stays working; no figure is checked.

The section itself raises if the moved rows differ from the uploaded ones (checked once per pool).
"""

from __future__ import annotations

import math

from bench import moves
from bench.common import Context
from bench.transfer import _Dask


def test_the_moves_section_swaps_halves_through_gpupool_and_dask() -> None:
    rows = moves.run(Context(repeats=1, quick=True))
    assert [row.name for row in rows] == [
        "move 16 MiB float32 between 2 agents",
        "move 16 MiB float32 between 2 agents, TLS",
        "move 16 MiB float32 between 2 agents, TLS",  # against Dask with TLS, then plaintext Dask
    ]
    for row in rows:
        assert row.value > 0
        assert math.isfinite(row.value)
        assert (row.baseline is not None) == _Dask.available()

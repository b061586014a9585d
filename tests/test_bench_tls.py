"""The benchmark's tls section at quick size, so its machinery stays working; no figure is checked.

The section starts a secure pool and an open one side by side and raises if either's bytes come back
different (after its warm-up upload, and after its last download), so a run that returns is a run whose
bytes arrived intact both ways.
"""

from __future__ import annotations

import math

from bench import tls
from bench.common import Context


def test_the_tls_section_compares_a_secure_pool_with_an_open_one() -> None:
    rows = tls.run(Context(repeats=1, quick=True))
    expected = [
        ("upload", "GB/s", "higher"),
        ("download", "GB/s", "higher"),
        ("op p50", "ms", "lower"),
        ("op p99", "ms", "lower"),
    ]
    assert len(rows) == len(expected)
    for row, (prefix, unit, better) in zip(rows, expected, strict=True):
        assert row.name.startswith(prefix), row
        assert (row.unit, row.better) == (unit, better), row
        assert row.baseline_name.startswith(tls.PLAINTEXT)
        assert row.baseline is not None
        assert row.ratio is not None
        assert all(math.isfinite(x) and x > 0 for x in (row.value, row.baseline, row.ratio)), row
    assert [len(row.samples) for row in rows[:2]] == [tls.TRANSFER_REPEATS] * 2
    assert [row.target for row in rows] == [0.7, 0.7, 1 / 1.2, None]

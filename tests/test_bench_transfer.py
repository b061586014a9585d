"""The benchmark's transfer section at quick size, so its machinery stays working; no figure is checked.

The section itself raises if gpupool's bytes come back different (after its warm-up upload, and after
its last download), so a run that returns is a run whose bytes arrived intact.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench import transfer
from bench.common import Context


def test_the_transfer_section_measures_every_contender_both_ways() -> None:
    rows = transfer.run(Context(repeats=2, quick=True))
    dask = transfer._Dask.available()
    per_direction = [
        ("", "bare gRPC", 0.8),
        ("", "raw TCP", None),
        *([("", "Dask", 1.0), (", TLS", "Dask", 1.0)] if dask else []),
        (f", {transfer.SPLIT} streams", "gpupool", None),
    ]
    expected = [
        (direction, suffix, baseline.replace("Dask", "Dask " + verb), target)
        for direction, verb in (("upload", "scatter"), ("download", "gather"))
        for suffix, baseline, target in per_direction
    ]
    assert [
        (
            row.name.split()[0],
            row.name.removeprefix(row.name.split(" agents")[0] + " agents"),
            row.baseline_name,
            row.target,
        )
        for row in rows
    ] == expected
    for row in rows:
        assert row.unit == "GB/s"
        assert row.baseline is not None
        assert row.ratio is not None
        assert all(math.isfinite(x) and x > 0 for x in (row.value, row.baseline, row.ratio)), row
        assert len(row.samples) == 2


def test_a_download_that_differs_is_caught() -> None:
    host = transfer._sample(1 << 20)
    contender = transfer._Gpupool(host)
    contender._last = host.copy()
    contender.check()
    contender._last = host.copy()
    contender._last[7, 3] += 1
    with pytest.raises(RuntimeError, match="differ"):
        contender.check()
    assert np.array_equal(host, transfer._sample(1 << 20))

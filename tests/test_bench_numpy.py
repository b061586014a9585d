"""The benchmark's numpy section at quick size, so its machinery stays working; no figure is checked.

The section checks every gpupool result against NumPy before timing it, so a run that returns is a run
whose results were right (or whose rows say that gpupool fell back to the host or could not run them).
"""

from __future__ import annotations

import math

import pytest

# Dask is the baseline, a benchmark-only dependency (the bench extra, which scripts/bench installs).
pytest.importorskip("dask.distributed", reason="needs the bench extra (pip install -e '.[bench]')")

from bench import numpy_workloads
from bench.common import Context


def test_the_numpy_section_times_every_row_against_dask_and_numpy() -> None:
    rows = numpy_workloads.run(Context(repeats=1, quick=True))
    assert len(rows) == 14
    kinds = ("standardise", "softmax", "k-means", "Gram", "logistic", "sort", "50 small")
    for kind, (against_dask, against_numpy) in zip(
        kinds, zip(rows[::2], rows[1::2], strict=True), strict=True
    ):
        assert against_dask.name.startswith(kind), against_dask.name
        assert against_dask.baseline_name.startswith("Dask 2x1")
        assert against_numpy.baseline_name.startswith("local NumPy")
        for row in (against_dask, against_numpy):
            assert row.section == "numpy"
            assert row.better == "lower"
            assert row.baseline is not None
            assert math.isfinite(row.baseline)
            assert row.baseline > 0
            if math.isnan(row.value):  # gpupool could not run it: the row says so, and has no ratio
                assert "not supported yet" in row.note
                assert row.ratio is None
            else:
                assert row.value > 0
                assert row.ratio is not None
    on_pool = ["host fallback" not in row.note and "not supported yet" not in row.note for row in rows[::2]]
    assert [row.target for row in rows[::2]] == [1.5 if ran else None for ran in on_pool[:6]] + [5.0]
    assert all(row.target is None for row in rows[1::2])

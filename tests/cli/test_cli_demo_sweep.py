"""``gpupool demo --sweep``: examples/sweep.py on a local pool, every training checked against NumPy."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from gpupool.cli.sweep import load_example


def test_the_sweep_demo_matches_numpy_and_says_where_each_training_ran() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gpupool.cli.main", "demo", "--sweep", "--quick", "--backend", "numpy"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert "8 of 8 results match NumPy's training" in done.stdout
    assert "all results match NumPy's" in done.stdout
    assert "MISMATCH" not in done.stdout
    assert "agent-" in done.stdout  # the table's "ran on" column names the agents
    assert "Traceback" not in done.stderr


def test_a_training_off_by_more_than_float32_rounding_is_reported_as_a_mismatch(
    capsys: pytest.CaptureFixture[str],
) -> None:
    example = load_example()
    sweep = example.Sweep(rows=64, learning_rates=(0.1, 1.0), widths=(4,), steps=3)
    want = example.run_numpy(sweep)
    rounding = [dataclasses.replace(r, loss=r.loss * (1 + 1e-6), where="agent-0/0") for r in want]
    assert example.report_checks(rounding, want) == 0
    bad_w1 = dict(want[1].params, w1=want[1].params["w1"] + 1e-2)
    wrong = [rounding[0], dataclasses.replace(want[1], params=bad_w1, where="agent-1/0")]
    assert example.report_checks(wrong, want) == 1
    out = capsys.readouterr().out
    assert "2 of 2 results match" in out
    assert "MISMATCH lr 1 width 4 on agent-1/0: w1 differs by up to 0.01" in out
    assert "1 of 2 results match" in out

"""``gpupool demo --sweep``: examples/sweep.py on a local pool, every training checked against NumPy."""

from __future__ import annotations

import subprocess
import sys


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

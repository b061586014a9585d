"""``gpupool demo``, the README's first command, as a new user runs it: a whole pool, checks, exit 0."""

from __future__ import annotations

import subprocess
import sys


def test_the_demo_passes_its_checks_and_leaves_nothing_running() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpupool.cli.main",
            "demo",
            "--rows",
            "5001",
            "--cols",
            "64",
            "--backend",
            "numpy",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert "all checks passed" in done.stdout
    assert done.stdout.count("  ok   ") == 5
    assert "FAIL" not in done.stdout
    assert "enrolled agents, TLS, capabilities" in done.stdout
    assert "Traceback" not in done.stderr

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


SMALL = ("--rows", "5001", "--cols", "64", "--backend", "numpy")


def test_the_demo_with_an_agent_killed_midway_still_passes_its_checks() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gpupool.cli.main", "demo", "--agents", "3", "--kill", *SMALL],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert "SIGKILLed agent-" in done.stdout
    assert "rebuilt elsewhere from lineage (1 recovery)" in done.stdout
    assert done.stdout.count("  ok   ") == 5
    assert "Traceback" not in done.stderr
